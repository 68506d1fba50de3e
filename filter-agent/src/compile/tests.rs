//! The compiled tables, read the way the kernel reads them (`emulate`),
//! must say what the reference evaluator says, stage by stage, on random
//! policies and packets.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use proptest::prelude::*;

use super::{emulate, *};
use crate::{
    model::Store,
    reference::{self, Reference, Who},
};

const NETS_V4: &[&str] = &[
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.3/32",
    "192.0.2.0/24",
    "192.0.2.128/25",
    "0.0.0.0/1",
];
const NETS_V6: &[&str] = &["fd00::/8", "fd00:1::/32", "fd00:1::5/128"];
const ADDRS: &[&str] = &[
    "10.1.2.3",
    "10.1.9.9",
    "10.200.0.1",
    "192.0.2.1",
    "192.0.2.200",
    "203.0.113.5",
    "fd00:1::5",
    "fd00:2::1",
];
const PORTS: &[&str] = &[
    "80",
    "443",
    "\"30000:32767\"",
    "\"1:1024\"",
    "\"8080:8090\"",
    "31000",
    "http",
];
const SELECTORS: &[&str] = &[
    "role == 'db'",
    "has(role)",
    "all()",
    "role != 'db'",
    "zone in {'a', 'b'}",
];

/// A rule's family: addresses are drawn from one family per rule (2.4).
#[derive(Debug, Clone, Copy)]
enum Fam {
    Any,
    V4,
    V6,
}

fn entity(fam: Fam, ports: bool, named: bool) -> impl Strategy<Value = String> {
    // Named ports only on the destination side (source ones are refused).
    let port_names: &'static [&'static str] = if named { PORTS } else { &PORTS[..6] };
    let nets: &'static [&'static str] = match fam {
        Fam::V6 => NETS_V6,
        _ => NETS_V4,
    };
    let with_nets = !matches!(fam, Fam::Any);
    (
        prop::collection::vec(prop::sample::select(nets), 0..3),
        prop::option::of(prop::sample::select(nets)),
        prop::option::of(prop::sample::select(SELECTORS)),
        prop::option::of(prop::sample::select(SELECTORS)),
        prop::option::of(prop::sample::select(&["global()", "has(x)"][..])),
        prop::collection::vec(prop::sample::select(port_names), 0..3),
        prop::option::of(prop::sample::select(&PORTS[..6])),
    )
        .prop_map(move |(n, not_net, sel, not_sel, ns, p, not_p)| {
            let mut e = String::new();
            if with_nets && !n.is_empty() {
                e += &format!("      nets: [{}]\n", n.join(", "));
            }
            if let (true, Some(x)) = (with_nets, not_net) {
                e += &format!("      notNets: [{x}]\n");
            }
            if let Some(s) = sel {
                e += &format!("      selector: \"{s}\"\n");
            }
            if let Some(s) = not_sel {
                e += &format!("      notSelector: \"{s}\"\n");
            }
            if let (Some(ns), true) = (ns, sel.is_some() || not_sel.is_some()) {
                e += &format!("      namespaceSelector: \"{ns}\"\n");
            }
            if ports && !p.is_empty() {
                e += &format!("      ports: [{}]\n", p.join(", "));
            }
            if let (true, Some(x)) = (ports, not_p) {
                e += &format!("      notPorts: [{x}]\n");
            }
            e
        })
}

fn rule() -> impl Strategy<Value = String> {
    let fam = prop_oneof![Just(Fam::Any), Just(Fam::V4), Just(Fam::V6)];
    let proto = prop::sample::select(&["", "TCP", "UDP", "ICMP", "ICMPv6", "17", "SCTP", "47"][..]);
    (fam, proto, any::<bool>()).prop_flat_map(|(fam, proto, not_proto)| {
        let ported = matches!(proto, "TCP" | "UDP" | "17" | "SCTP");
        let icmp = matches!(proto, "ICMP" | "ICMPv6");
        (
            prop::sample::select(&["Allow", "Deny", "Deny", "Log", "Pass"][..]),
            entity(fam, ported, false),
            entity(fam, ported, true),
            prop::option::of((
                prop::sample::select(&[0u8, 3, 8, 128][..]),
                prop::option::of(0u8..2),
            )),
            prop::option::of(prop::sample::select(&[0u8, 8][..])),
            any::<bool>(),
        )
            .prop_map(
                move |(action, src, dst, icmp_match, not_icmp, named_only)| {
                    let mut y = format!("  - action: {action}\n");
                    if !proto.is_empty() {
                        y += &format!("    protocol: {proto}\n");
                    }
                    if not_proto && proto.is_empty() {
                        y += "    notProtocol: UDP\n";
                    }
                    // ICMP is v4-only and ICMPv6 v6-only (validation).
                    match (proto, fam) {
                        ("ICMP", _) => y += "    ipVersion: 4\n",
                        ("ICMPv6", _) => y += "    ipVersion: 6\n",
                        (_, Fam::V4) => y += "    ipVersion: 4\n",
                        _ => {}
                    }
                    let fam_ok = !matches!((proto, fam), ("ICMP", Fam::V6) | ("ICMPv6", Fam::V4));
                    if fam_ok && !src.is_empty() {
                        y += &format!("    source:\n{src}");
                    }
                    if fam_ok && !dst.is_empty() {
                        y += &format!("    destination:\n{dst}");
                    } else if proto.is_empty() && !not_proto && named_only {
                        // Named ports alone need no protocol: each matches with
                        // the protocol its endpoint declares (Calico v3.32).
                        y += "    destination:\n      ports: [http]\n";
                    }
                    if icmp {
                        if let Some((t, c)) = icmp_match {
                            match c {
                                Some(c) => y += &format!("    icmp: {{type: {t}, code: {c}}}\n"),
                                None => y += &format!("    icmp: {{type: {t}}}\n"),
                            }
                        }
                        if let Some(t) = not_icmp {
                            y += &format!("    notICMP: {{type: {t}}}\n");
                        }
                    }
                    y
                },
            )
    })
}

fn policy(i: usize) -> impl Strategy<Value = String> {
    (
        prop::sample::select(&["normal", "normal", "forward", "pre-dnat", "untracked"][..]),
        prop::option::of(prop::sample::select(&[100u32, 200, 300][..])),
        prop::sample::select(&["role == 'pub'", "role == 'db'", "all()", "has(role)", "zone == 'a'"][..]),
        prop::sample::select(&["default", "security"][..]),
        prop::collection::vec(rule(), 0..4),
        prop::collection::vec(rule(), 0..3),
        prop::sample::select(&["", "[Ingress]", "[Egress]", "[Ingress, Egress]"][..]),
    )
        .prop_map(move |(kind, order, selector, tier, ingress, egress, types)| {
            let flags = match kind {
                "forward" => "  applyOnForward: true\n",
                "pre-dnat" => "  applyOnForward: true\n  preDNAT: true\n",
                "untracked" => "  applyOnForward: true\n  doNotTrack: true\n",
                _ => "",
            };
            let name = if tier == "default" { format!("p{i}") } else { format!("{tier}.p{i}") };
            let mut y = format!(
                "---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n  tier: {tier}\n  selector: \"{selector}\"\n{flags}"
            );
            if let Some(o) = order {
                y += &format!("  order: {o}\n");
            }
            let pre_dnat = kind == "pre-dnat";
            let types = if pre_dnat && types.contains("Egress") { "[Ingress]" } else { types };
            if !types.is_empty() {
                y += &format!("  types: {types}\n");
            }
            if !ingress.is_empty() {
                y += &format!("  ingress:\n{}", ingress.concat());
            }
            if !egress.is_empty() && !pre_dnat {
                y += &format!("  egress:\n{}", egress.concat());
            }
            y
        })
}

/// The fixed part: endpoints (one bound here, others elsewhere with
/// addresses and named ports), network sets, profiles and a tier.
fn fixture(security_tier: &str, profiles: &str, profile_rules: &[String]) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata:\n  name: hep\n  labels: {{role: pub}}\nspec:\n  node: n1\n  interfaceName: eth1\n  profiles: {profiles}\n  expectedIPs: [192.0.2.1]\n  ports:\n  - {{name: http, protocol: TCP, port: 8080}}\n\
---\napiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata:\n  name: db\n  labels: {{role: db, zone: a}}\nspec:\n  node: n2\n  interfaceName: eth0\n  expectedIPs: [10.1.2.3, fd00:1::5]\n  ports:\n  - {{name: http, protocol: TCP, port: 80}}\n  - {{name: http, protocol: UDP, port: 8081}}\n\
---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata:\n  name: gns\n  labels: {{role: db, zone: b}}\nspec:\n  nets: [203.0.113.0/24, 10.200.0.0/16]\n\
---\napiVersion: projectcalico.org/v3\nkind: NetworkSet\nmetadata:\n  name: ns1\n  namespace: x\n  labels: {{role: db}}\nspec:\n  nets: [192.0.2.200/32]\n\
---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata:\n  name: security\nspec:\n{security_tier}\
---\napiVersion: projectcalico.org/v3\nkind: Profile\nmetadata:\n  name: prof-a\nspec:\n  labelsToApply: {{zone: a}}\n  ingress:\n{}  egress:\n{}",
        profile_rules[0], profile_rules[1]
    )
}

fn store_text() -> impl Strategy<Value = String> {
    (
        prop::sample::select(
            &[
                "  order: 50\n",
                "  order: 2000000\n  defaultAction: Pass\n",
                "  defaultAction: Pass\n",
            ][..],
        ),
        prop::sample::select(
            &[
                "[]",
                "[prof-a]",
                "[projectcalico-default-allow]",
                "[prof-a, projectcalico-default-allow]",
            ][..],
        ),
        prop::collection::vec(rule(), 2..3),
        prop::collection::vec(policy(0), 1..2),
        prop::collection::vec(policy(1), 0..2),
        prop::collection::vec(policy(2), 0..2),
        prop::collection::vec(policy(3), 0..2),
    )
        .prop_map(|(tier, profiles, prules, p0, p1, p2, p3)| {
            let profile_rules = [prules[0].clone(), prules[1].clone()];
            format!(
                "{}\n{}{}{}{}",
                fixture(tier, profiles, &profile_rules),
                p0.concat(),
                p1.concat(),
                p2.concat(),
                p3.concat()
            )
        })
}

fn packet() -> impl Strategy<Value = reference::Packet> {
    (
        any::<bool>(),
        prop::sample::select(ADDRS),
        prop::sample::select(ADDRS),
        prop::sample::select(&[6u8, 17, 1, 58, 132, 47][..]),
        prop::sample::select(&[22u16, 80, 443, 1024, 8080, 8081, 8085, 30000, 31000, 32768][..]),
        prop::sample::select(&[80u16, 1000, 40000][..]),
        prop::sample::select(&[0u8, 3, 8, 128][..]),
        0u8..3,
        0u8..10,
    )
        .prop_map(|(v6, a, b, proto, dport, sport, t, c, frag)| {
            let pick = |s: &str, v6: bool| -> IpAddr {
                let ip: IpAddr = s.parse().expect("constant");
                match (ip, v6) {
                    (IpAddr::V4(_), true) => "fd00:2::1".parse().expect("constant"),
                    (IpAddr::V6(_), false) => "192.0.2.1".parse().expect("constant"),
                    _ => ip,
                }
            };
            let fragment = frag == 0;
            let (sport, dport, icmp) = match proto {
                6 | 17 | 132 if !fragment => (Some(sport), Some(dport), None),
                1 | 58 if !fragment => (None, None, Some((t, c))),
                _ => (None, None, None),
            };
            reference::Packet {
                src: pick(a, v6),
                dst: pick(b, v6),
                proto,
                sport,
                dport,
                icmp,
                established: false,
                forwarded: false,
                dnat_to: None,
            }
        })
}

fn load(text: &str) -> Store {
    let mut store = Store::default();
    let mut errors = Vec::new();
    store.add_text(Path::new("generated.yaml"), text, &mut errors);
    if errors.is_empty() {
        crate::model::validate::store(&store, &mut errors);
    }
    assert!(
        errors.is_empty(),
        "generated store does not validate: {errors:?}\n{text}"
    );
    store
}

fn node() -> Node {
    Node {
        name: "n1".into(),
        interfaces: BTreeMap::new(),
    }
}

fn who(o: &Owner) -> Who {
    match o {
        Owner::Policy { tier, policy, rule } => Who::Policy {
            tier: tier.to_string(),
            policy: policy.to_string(),
            rule: *rule,
        },
        Owner::TierEnd { tier } => Who::TierEnd {
            tier: tier.to_string(),
        },
        Owner::Profile { profile, rule } => Who::Profile {
            profile: profile.to_string(),
            rule: *rule,
        },
        Owner::NoProfileAllowed => Who::NoProfileAllowed,
    }
}

/// The fields the classifier reads, from a reference packet.
pub(crate) fn fields(p: &reference::Packet) -> emulate::Fields {
    emulate::Fields {
        src: p.src,
        dst: p.dst,
        proto: p.proto,
        sport: p.sport,
        dport: p.dport.or(p.icmp.map(|(t, c)| u16::from_be_bytes([t, c]))),
    }
}

/// Compares every table with the reference for one store and packet.
fn agree(store: &Store, compiled: &Compiled, p: &reference::Packet) -> Result<(), String> {
    let hep = store
        .host_endpoints
        .iter()
        .find(|h| h.meta.name == "hep")
        .expect("fixture");
    let r = Reference::new(store);
    for (stage, name) in filter_common::Stage::ALL.map(|s| (s as u32, s.name())) {
        for (dir, rdir) in [
            (direction::INGRESS, reference::Direction::Ingress),
            (direction::EGRESS, reference::Direction::Egress),
        ] {
            let rstage = reference::Stage::from_u32(stage).expect("a stage");
            let want = r.stage(hep, rstage, rdir, p);
            let t = compiled.table(stage, dir);
            let got = emulate::lookup(compiled, t, "eth1", fields(p));
            let (decided, logged) = match &got {
                Some(o) => (
                    o.decided
                        .map(|i| who(&compiled.owners[t.rules[i].owner as usize])),
                    o.logged
                        .iter()
                        .map(|i| who(&compiled.owners[t.rules[*i].owner as usize]))
                        .collect::<Vec<_>>(),
                ),
                None => (None, Vec::new()),
            };
            if decided != want.by || logged != want.logged {
                return Err(format!(
                    "{name} {rdir:?}: tables say {decided:?} logging {logged:?}; reference says {:?} by {:?} logging {:?}",
                    want.verdict, want.by, want.logged
                ));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// A compile that takes over fields from the last is the compile from
    /// scratch, whatever changed between them.
    #[test]
    fn a_compile_reusing_the_last_is_the_compile_from_scratch(a in store_text(), b in store_text()) {
        // Loaded as a reload loads them, so unchanged rules keep their
        // parsed items and their parts are taken over.
        let (mut reuse, mut parses) = (Reuse::default(), crate::model::Parses::default());
        for text in [&a, &b, &b, &a] {
            let texts = [("generated.yaml".into(), text.clone())];
            let store = Store::from_texts_reusing(&texts, &mut parses).expect("loads");
            let (got, _) = compile_reusing(&store, &node(), &mut reuse);
            prop_assert_eq!(got, compile(&load(text), &node()));
        }
    }

    /// Thousands of (store, packet) pairs per run: 300 stores × 16 packets
    /// × 8 tables.
    #[test]
    fn compiled_tables_agree_with_the_reference(text in store_text(), packets in prop::collection::vec(packet(), 16)) {
        let store = load(&text);
        let compiled = compile(&store, &node()).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        for p in &packets {
            if let Err(e) = agree(&store, &compiled, p) {
                return Err(TestCaseError::fail(format!("{e}\npacket {p:?}\n{text}")));
            }
        }
    }
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
    let t = c.table(stage::PRE_DNAT, direction::INGRESS);
    let f = |src: &str| emulate::Fields {
        src: src.parse().unwrap(),
        dst: "203.0.113.80".parse().unwrap(),
        proto: 6,
        sport: Some(4000),
        dport: Some(80),
    };
    let decided = |src| {
        emulate::lookup(&c, t, "eth1", f(src))
            .and_then(|o| o.decided)
            .map(|i| {
                (
                    c.owners[t.rules[i].owner as usize].clone(),
                    t.rules[i].action,
                )
            })
    };
    let owner = |p: &str| Owner::Policy {
        tier: "default".into(),
        policy: p.into(),
        rule: 0,
    };
    assert_eq!(
        decided("198.51.100.10"),
        Some((owner("whitelist"), action::ALLOW))
    );
    assert_eq!(
        decided("198.51.100.20"),
        Some((owner("deny-lb-port-80"), action::DENY))
    );
    assert_eq!(
        emulate::lookup(&c, t, "eth9", f("198.51.100.20")),
        None,
        "no endpoint, no verdict"
    );
}

#[test]
fn a_bare_host_endpoint_denies_local_traffic_and_allows_forwarded() {
    let store = load("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: w}\nspec: {node: n1, interfaceName: eth1}\n");
    let c = compile(&store, &node()).expect("compiles");
    let f = emulate::Fields {
        src: "192.0.2.9".parse().unwrap(),
        dst: "192.0.2.1".parse().unwrap(),
        proto: 6,
        sport: Some(1),
        dport: Some(8080),
    };
    let normal = c.table(stage::NORMAL, direction::INGRESS);
    let o = emulate::lookup(&c, normal, "eth1", f)
        .expect("normal stage always concerns a bound endpoint");
    assert_eq!(
        c.owners[normal.rules[o.decided.expect("decided")].owner as usize],
        Owner::NoProfileAllowed
    );
    assert_eq!(
        emulate::lookup(&c, c.table(stage::FORWARD, direction::INGRESS), "eth1", f),
        None
    );
}

#[test]
fn rules_the_tables_cannot_express_exactly_are_refused() {
    let store = load(
        "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: w}\nspec: {node: n1, interfaceName: eth1}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\n\
         spec:\n  ingress:\n  - action: Deny\n    protocol: TCP\n    destination: {notPorts: [http]}\n",
    );
    let err = compile(&store, &node()).expect_err("named notPorts");
    assert!(
        err.to_string().contains("spec.ingress[0]") && err.to_string().contains("notPorts"),
        "{err}"
    );
}

/// A named port without a rule protocol (Calico v3.32 on) matches each
/// endpoint port with the protocol that endpoint declares for it.
#[test]
fn a_named_port_without_protocol_matches_the_declared_protocol() {
    let store = load(
        "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: w, labels: {role: pub}}\nspec: {node: n1, interfaceName: eth1}\n\
         ---\napiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: db, labels: {role: db}}\n\
         spec:\n  node: n2\n  interfaceName: eth0\n  expectedIPs: [10.1.2.3]\n  ports:\n  - {name: http, protocol: TCP, port: 80}\n  - {name: http, protocol: UDP, port: 8081}\n\
         ---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: no-http-out}\n\
         spec:\n  selector: role == 'pub'\n  types: [Egress]\n  egress:\n\
         \x20 - action: Deny\n    destination: {ports: [http]}\n",
    );
    let c = compile(&store, &node()).expect("compiles");
    let t = c.table(stage::NORMAL, direction::EGRESS);
    let denied_by_rule = |proto: u8, dport: u16| {
        emulate::lookup(
            &c,
            t,
            "eth1",
            emulate::Fields {
                src: "192.0.2.1".parse().unwrap(),
                dst: "10.1.2.3".parse().unwrap(),
                proto,
                sport: Some(40000),
                dport: Some(dport),
            },
        )
        .and_then(|o| o.decided)
        .is_some_and(|i| {
            matches!(&c.owners[t.rules[i].owner as usize], Owner::Policy { policy, .. } if &**policy == "no-http-out")
        })
    };
    assert!(denied_by_rule(6, 80), "TCP to the TCP http port");
    assert!(denied_by_rule(17, 8081), "UDP to the UDP http port");
    assert!(!denied_by_rule(17, 80), "UDP to the TCP http port");
    assert!(!denied_by_rule(6, 8081), "TCP to the UDP http port");
}

#[test]
fn an_all_interfaces_endpoint_governs_every_interface_no_specific_one_claims() {
    let hep = |name: &str, iface: &str| {
        format!(
            "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata:\n  name: {name}\nspec:\n  node: n\n  interfaceName: '{iface}'\n  expectedIPs: [10.1.2.3]\n---\n"
        )
    };
    let store = load(&format!(
        "{}{}{}",
        hep("b-all", "*"),
        hep("a-all", "*"),
        hep("eth0", "eth0")
    ));
    let node = Node {
        name: "n".into(),
        interfaces: [
            "eth0",
            "eth1",
            "lo",
            "cali123",
            "kube-ipvs0",
            "vxlan.calico",
        ]
        .iter()
        .map(|i| (i.to_string(), Vec::new()))
        .collect(),
    };
    let bound: Vec<(String, String)> = order::bind_endpoints(&store, &node)
        .into_iter()
        .map(|(i, h)| (i, h.meta.name.clone()))
        .collect();
    let want: Vec<(String, String)> = [
        ("eth0", "eth0"),
        ("eth1", "a-all"),
        ("vxlan.calico", "a-all"),
    ]
    .iter()
    .map(|(i, h)| (i.to_string(), h.to_string()))
    .collect();
    assert_eq!(bound, want);
}

#[test]
fn a_changed_rule_reclassifies_only_the_fields_it_changed() {
    let text = |action: &str, net: &str| {
        format!(
            "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {{name: h, labels: {{role: x}}}}\n\
             spec: {{node: n1, interfaceName: eth0}}\n---\n\
             apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: p}}\n\
             spec:\n  selector: role == 'x'\n  ingress:\n  \
             - {{action: Deny, protocol: TCP, source: {{nets: [10.0.0.0/8]}}, destination: {{ports: [22]}}}}\n  \
             - {{action: {action}, protocol: UDP, source: {{nets: [{net}]}}}}\n"
        )
    };
    let mut reuse = Reuse::default();
    // Eight tables of six fields each.
    let fields = 8 * 6;
    let mut compile_text = |t: &str| {
        let store = load(t);
        let (got, reused) = compile_reusing(&store, &node(), &mut reuse);
        assert_eq!(got, compile(&store, &node()));
        reused
    };
    assert_eq!(compile_text(&text("Deny", "192.0.2.0/24")), 0);
    assert_eq!(compile_text(&text("Allow", "192.0.2.0/24")), fields);
    // The normal ingress table's IPv4 sources change; nothing else.
    assert_eq!(compile_text(&text("Allow", "198.51.100.0/24")), fields - 1);
}

#[test]
fn a_rule_that_selects_is_resolved_again_when_what_it_selects_changes() {
    let text = |net: &str| {
        format!(
            "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {{name: h, labels: {{role: x}}}}\n\
             spec: {{node: n1, interfaceName: eth0}}\n---\n\
             apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {{name: s, labels: {{k: v}}}}\n\
             spec:\n  nets:\n  - {net}\n---\n\
             apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: p}}\n\
             spec:\n  selector: role == 'x'\n  ingress:\n  \
             - action: Deny\n    source: {{selector: k == 'v'}}\n  \
             - action: Allow\n    source: {{nets: [10.0.0.0/8]}}\n"
        )
    };
    let (mut reuse, mut parses) = (Reuse::default(), crate::model::Parses::default());
    for net in ["192.0.2.0/24", "198.51.100.0/24"] {
        let texts = [("p.yaml".into(), text(net))];
        let store = Store::from_texts_reusing(&texts, &mut parses).expect("loads");
        let (got, _) = compile_reusing(&store, &node(), &mut reuse);
        assert_eq!(got, compile(&load(&text(net)), &node()), "{net}");
    }
    // The policy's items were shared all along.
    assert_eq!(parses.rules_taken(), 2);
}
