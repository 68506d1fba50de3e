//! The compiled tables, read the way the kernel reads them, must give the
//! same first matching rule as a plain rule-by-rule reading of the policy.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use super::*;
use crate::model::Store;

/// A packet as the classifier sees it.
#[derive(Debug, Clone, Copy)]
struct Pkt {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    /// `None`: no L4 ports (a non-first fragment).
    dport: Option<u16>,
}

fn addr_prefix(ip: IpAddr) -> Prefix {
    match ip {
        IpAddr::V4(a) => Prefix::new(u128::from(u32::from(a)), 32, 32),
        IpAddr::V6(a) => Prefix::new(u128::from(a), 128, 128),
    }
}

fn lpm(entries: &[(Prefix, u32)], key: Prefix) -> Option<u32> {
    entries
        .iter()
        .filter(|(p, _)| p.contains(key))
        .max_by_key(|(p, _)| p.len)
        .map(|(_, c)| *c)
}

/// The kernel's lookup (filter-ebpf `classify`), over the compiled value.
fn emulate(c: &Compiled, t: &Table, iface: &str, p: Pkt) -> Option<RuleInfo> {
    let mask = t.masks.get(iface)?;
    let (src, dst) = match p.src {
        IpAddr::V4(_) => (&t.src_v4, &t.dst_v4),
        IpAddr::V6(_) => (&t.src_v6, &t.dst_v6),
    };
    let s = lpm(src, addr_prefix(p.src)).expect("root entry");
    let d = lpm(dst, addr_prefix(p.dst)).expect("root entry");
    // Port trie: (proto, has_ports, port), longest match with the same
    // layout rules as the kernel key.
    let port = t
        .ports
        .iter()
        .filter(|e| match e.proto {
            None => true,
            Some(proto) => {
                proto == p.proto
                    && e.has_ports == Some(p.dport.is_some())
                    && p.dport.is_none_or(|port| {
                        Prefix::new(u128::from(e.port), 16, e.port_len).contains(Prefix::new(
                            u128::from(port),
                            16,
                            16,
                        ))
                    })
            }
        })
        .max_by_key(|e| (e.proto.is_some(), e.port_len))
        .expect("any-protocol entry")
        .class;
    let classes = &c.classes;
    let r = bits::first_common([
        mask,
        &classes[s as usize],
        &classes[d as usize],
        &classes[port as usize],
    ])?;
    Some(t.rules[r])
}

/// Plain reading of the pre-DNAT stage (calico-semantics.md 2, 3.3).
fn oracle(
    store: &Store,
    hep_labels: &BTreeMap<String, String>,
    p: Pkt,
) -> Option<(String, usize, Action)> {
    let mut pols: Vec<_> = store
        .global_policies
        .iter()
        .filter(|g| g.spec.pre_dnat)
        .collect();
    pols.sort_by(|a, b| policy_order(a, b));
    for g in pols {
        if !applies_to_host_endpoint(&g.spec, hep_labels) {
            continue;
        }
        for (i, r) in g.spec.ingress.iter().enumerate() {
            if rule_matches(r, p) {
                return Some((g.meta.name.clone(), i, r.action));
            }
        }
    }
    None
}

fn rule_matches(r: &Rule, p: Pkt) -> bool {
    let v4 = p.src.is_ipv4();
    if r.ip_version.is_some_and(|v| (v == 4) != v4) {
        return false;
    }
    let fam = |l: &[model::Cidr]| {
        l.iter()
            .filter(|c| c.0.is_ipv4() == v4)
            .map(|c| c.0)
            .collect::<Vec<_>>()
    };
    for l in [
        &r.source.nets,
        &r.source.not_nets,
        &r.destination.nets,
        &r.destination.not_nets,
    ] {
        if !l.is_empty() && fam(l).is_empty() {
            return false;
        }
    }
    let net_ok = |e: &model::EntityRule, ip: IpAddr| {
        (e.nets.is_empty() || fam(&e.nets).iter().any(|n| n.contains(ip)))
            && !fam(&e.not_nets).iter().any(|n| n.contains(ip))
    };
    if !net_ok(&r.source, p.src) || !net_ok(&r.destination, p.dst) {
        return false;
    }
    if r.protocol.is_some_and(|x| x.0 != p.proto) || r.not_protocol.is_some_and(|x| x.0 == p.proto)
    {
        return false;
    }
    let in_ports = |ports: &[Port], v: u16| {
        ports
            .iter()
            .any(|x| matches!(x, Port::Range { first, last } if (*first..=*last).contains(&v)))
    };
    let icmp_hit = |f: &model::IcmpFields, v: u16| {
        f.icmp_type.is_none_or(|t| (v >> 8) as u8 == t) && f.code.is_none_or(|c| v as u8 == c)
    };
    let d = &r.destination;
    let needs_ports =
        !d.ports.is_empty() || !d.not_ports.is_empty() || r.icmp.is_some() || r.not_icmp.is_some();
    match p.dport {
        None => !needs_ports,
        Some(v) => {
            (d.ports.is_empty() || in_ports(&d.ports, v))
                && !in_ports(&d.not_ports, v)
                && r.icmp.as_ref().is_none_or(|f| icmp_hit(f, v))
                && !r.not_icmp.as_ref().is_some_and(|f| icmp_hit(f, v))
        }
    }
}

/// xorshift64*: deterministic, so a failure replays from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[(self.next() % xs.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const NETS_V4: [&str; 6] = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.3/32",
    "192.0.2.0/24",
    "192.0.2.128/25",
    "0.0.0.0/1",
];
const NETS_V6: [&str; 3] = ["fd00::/8", "fd00:1::/32", "fd00:1::5/128"];
const ADDRS: [&str; 8] = [
    "10.1.2.3",
    "10.1.9.9",
    "10.200.0.1",
    "192.0.2.1",
    "192.0.2.200",
    "203.0.113.5",
    "fd00:1::5",
    "fd00:2::1",
];
const PORTS: [&str; 6] = ["80", "443", "30000:32767", "1:1024", "8080:8090", "31000"];

fn random_rule(rng: &mut Rng) -> String {
    let mut y = format!(
        "  - action: {}\n",
        rng.pick(&["Allow", "Deny", "Deny", "Pass"])
    );
    let proto = *rng.pick(&["", "TCP", "UDP", "ICMP", "ICMPv6", "17", "SCTP"]);
    if !proto.is_empty() {
        y += &format!("    protocol: {proto}\n");
    }
    if rng.chance(10) {
        y += &format!("    notProtocol: {}\n", rng.pick(&["TCP", "UDP"]));
    }
    let v6 = rng.chance(25);
    if !v6 && proto == "ICMPv6" || v6 && proto == "ICMP" {
        return random_rule(rng);
    }
    let nets: &[&str] = if v6 { &NETS_V6 } else { &NETS_V4 };
    for side in ["source", "destination"] {
        let mut e = String::new();
        if rng.chance(40) {
            e += &format!("      nets: [{}, {}]\n", rng.pick(nets), rng.pick(nets));
        }
        if rng.chance(20) {
            e += &format!("      notNets: [{}]\n", rng.pick(nets));
        }
        if side == "destination" && matches!(proto, "TCP" | "UDP" | "17" | "SCTP") {
            if rng.chance(50) {
                e += &format!(
                    "      ports: [{}, {}]\n",
                    rng.pick(&PORTS),
                    rng.pick(&PORTS)
                );
            }
            if rng.chance(15) {
                e += &format!("      notPorts: [{}]\n", rng.pick(&PORTS));
            }
        }
        if !e.is_empty() {
            y += &format!("    {side}:\n{e}");
        }
    }
    if matches!(proto, "ICMP" | "ICMPv6") && rng.chance(60) {
        let t = rng.pick(&[0u8, 3, 8, 128]);
        if rng.chance(50) {
            y += &format!("    icmp: {{type: {t}, code: {}}}\n", rng.pick(&[0u8, 1]));
        } else {
            y += &format!("    icmp: {{type: {t}}}\n");
        }
    }
    y
}

fn random_store(rng: &mut Rng) -> String {
    let mut text = String::from(
        "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata:\n  name: hep\n  labels:\n    role: public\nspec:\n  node: n1\n  interfaceName: eth1\n",
    );
    for p in 0..(1 + rng.next() % 4) {
        text += &format!(
            "---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: p{p}\nspec:\n  preDNAT: true\n  applyOnForward: true\n  order: {}\n  selector: {}\n  ingress:\n",
            rng.next() % 3 * 100,
            rng.pick(&["role == 'public'", "role == 'private'", "all()", "has(role)"])
        );
        for _ in 0..(1 + rng.next() % 5) {
            text += &random_rule(rng);
        }
    }
    text
}

fn load(text: &str) -> Store {
    let mut store = Store::default();
    let mut errors = Vec::new();
    store.add_text(Path::new("random.yaml"), text, &mut errors);
    assert!(errors.is_empty(), "{errors:?}\n{text}");
    store
}

fn node() -> Node {
    Node {
        name: "n1".into(),
        interfaces: BTreeMap::new(),
    }
}

#[test]
fn compiled_tables_agree_with_a_plain_reading() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let labels: BTreeMap<String, String> = [("role".to_string(), "public".to_string())].into();
    let mut checked = 0;
    for case in 0..400 {
        let text = random_store(&mut rng);
        let store = load(&text);
        let compiled = compile(&store, &node()).expect("compiles");
        let table = &compiled.tables[0];
        for _ in 0..40 {
            let v6 = rng.chance(30);
            let pick_addr = |rng: &mut Rng| loop {
                let a: IpAddr = rng.pick(&ADDRS).parse().expect("constant");
                if a.is_ipv6() == v6 {
                    break a;
                }
            };
            let proto = *rng.pick(&[6u8, 17, 1, 58, 132, 47]);
            let dport = match proto {
                1 | 58 => Some(u16::from_be_bytes([
                    *rng.pick(&[0u8, 3, 8, 128]),
                    *rng.pick(&[0u8, 1, 2]),
                ])),
                6 | 17 | 132 if rng.chance(90) => {
                    Some(*rng.pick(&[22u16, 80, 443, 1024, 1025, 8085, 30000, 31000, 32767, 32768]))
                }
                _ => None,
            };
            let pkt = Pkt {
                src: pick_addr(&mut rng),
                dst: pick_addr(&mut rng),
                proto,
                dport,
            };
            let got = emulate(&compiled, table, "eth1", pkt).map(|r| {
                (
                    compiled.policies[r.policy as usize].clone(),
                    r.rule as usize,
                    r.action,
                )
            });
            let want = oracle(&store, &labels, pkt).map(|(p, i, a)| (p, i, action_code(a)));
            assert_eq!(got, want, "case {case}, packet {pkt:?}\n{text}");
            checked += 1;
        }
    }
    assert_eq!(checked, 16_000);
}

#[test]
fn tutorial_lesson_3_allow_list_before_deny() {
    let store = load(
        "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: w, labels: {ibm.role: worker_public}}\nspec: {node: n1, interfaceName: eth1}\n\
         ---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: deny-lb-port-80}\n\
         spec:\n  applyOnForward: true\n  preDNAT: true\n  order: 800\n  selector: ibm.role=='worker_public'\n  ingress:\n\
         \x20 - action: Deny\n    protocol: TCP\n    destination: {nets: [203.0.113.80/32], ports: [80]}\n\
         ---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: whitelist}\n\
         spec:\n  applyOnForward: true\n  preDNAT: true\n  order: 500\n  selector: ibm.role=='worker_public'\n  ingress:\n\
         \x20 - action: Allow\n    protocol: TCP\n    source: {nets: [198.51.100.10/32]}\n    destination: {nets: [203.0.113.80/32], ports: [80]}\n",
    );
    let c = compile(&store, &node()).expect("compiles");
    assert_eq!(
        c.endpoints,
        vec![BoundEndpoint {
            iface: "eth1".into(),
            hep: "w".into()
        }]
    );
    let pkt = |src: &str| Pkt {
        src: src.parse().unwrap(),
        dst: "203.0.113.80".parse().unwrap(),
        proto: 6,
        dport: Some(80),
    };
    let v = |src| {
        emulate(&c, &c.tables[0], "eth1", pkt(src))
            .map(|r| (c.policies[r.policy as usize].as_str(), r.action))
    };
    assert_eq!(v("198.51.100.10"), Some(("whitelist", action::ALLOW)));
    assert_eq!(v("198.51.100.20"), Some(("deny-lb-port-80", action::DENY)));
    assert_eq!(
        emulate(&c, &c.tables[0], "eth9", pkt("198.51.100.20")),
        None,
        "no endpoint, no verdict"
    );
}

#[test]
fn unsupported_matches_are_refused_not_ignored() {
    let store = load(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\n\
         spec:\n  applyOnForward: true\n  preDNAT: true\n  ingress:\n  - action: Deny\n    source: {selector: \"a == 'b'\"}\n",
    );
    let err = compile(&store, &node()).expect_err("selector in rule");
    assert!(err.to_string().contains("spec.ingress[0].source"), "{err}");
}
