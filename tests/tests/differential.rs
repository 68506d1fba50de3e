//! The whole kernel pipeline against the reference evaluator.
//!
//! Random policy sets (all four stages, tiers, Log and Pass, profiles, IPv4
//! and IPv6 rules, ICMP) and random packets (both families, both
//! directions, host-bound, host-originated and forwarded, new and
//! established) go through the real programs under BPF_PROG_TEST_RUN, in
//! the order a packet meets them (ingress: `fw_xdp` then `fw_tc_in`, and
//! for forwarded packets `fw_tc_eg` of the outgoing interface with the mark
//! TC ingress left; egress: `fw_tc_eg`), and through
//! `reference::Reference::explain`. A disagreement is shrunk to a minimal
//! policy set and printed with the packet.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use etherparse::PacketBuilder;
use filter_agent::{
    compile::{self, Node},
    dataplane::{
        conntrack::Flow,
        live::{self, Route},
        Dataplane, Interfaces,
    },
    model::Store,
    reference::{self, Direction, Failsafe, Reference, Verdict},
};
use filter_tests::{privileged, unique, Rng};

const HEP_IF: u32 = 1; // lo: the host endpoint

const WORKER: &str = "198.51.100.1";
const WORKER6: &str = "2001:db8::1";
/// Peers: a client, another host, a load-balancer address (not the node's).
const PEERS4: [&str; 3] = ["198.51.100.10", "198.51.100.20", "203.0.113.80"];
const PEERS6: [&str; 3] = ["2001:db8::10", "2001:db8:1::20", "2001:db8:2::80"];

const NETS4: [&str; 6] = [
    "198.51.100.0/24",
    "198.51.100.10/32",
    "203.0.113.80/32",
    "0.0.0.0/1",
    "128.0.0.0/1",
    "198.51.100.1/32",
];
const NETS6: [&str; 4] = ["2001:db8::/64", "2001:db8::10/128", "::/1", "2001:db8::/32"];

/// One generated policy: its header lines and its rules, kept apart so a
/// failing case can be shrunk rule by rule.
#[derive(Clone, Debug)]
struct Policy {
    head: String,
    ingress: Vec<String>,
    egress: Vec<String>,
}

#[derive(Clone, Debug)]
struct Case {
    hep: String,
    policies: Vec<Policy>,
}

impl Case {
    fn text(&self) -> String {
        let mut t = self.hep.clone();
        for p in &self.policies {
            t += &p.head;
            t += "  ingress:\n";
            if p.ingress.is_empty() {
                t.truncate(t.len() - "  ingress:\n".len());
            } else {
                t += &p.ingress.concat();
            }
            if !p.egress.is_empty() {
                t += "  egress:\n";
                t += &p.egress.concat();
            }
        }
        t
    }
}

fn random_rule(rng: &mut Rng) -> String {
    let action = rng.pick(&["Allow", "Allow", "Deny", "Deny", "Log", "Pass"]);
    let v6 = rng.one_in(3);
    let protos: &[(&str, bool)] = if v6 {
        &[("TCP", true), ("UDP", true), ("ICMPv6", false), ("", false)]
    } else {
        &[("TCP", true), ("UDP", true), ("ICMP", false), ("", false)]
    };
    let (proto, ports) = *rng.pick(protos);
    let mut r = format!("  - action: {action}\n");
    if !proto.is_empty() {
        r += &format!("    protocol: {proto}\n");
    }
    let net = |rng: &mut Rng| {
        if v6 {
            rng.pick(&NETS6).to_string()
        } else {
            rng.pick(&NETS4).to_string()
        }
    };
    let mut src = String::new();
    if rng.one_in(2) {
        src += &format!("      nets: [\"{}\"]\n", net(rng));
    }
    if rng.one_in(6) {
        src += &format!("      notNets: [\"{}\"]\n", net(rng));
    }
    if ports && rng.one_in(4) {
        src += &format!(
            "      ports: [\"{}\"]\n",
            rng.pick(&["1:1023", "40000:40010", "1024:65535", "53"])
        );
    }
    let mut dst = String::new();
    if rng.one_in(2) {
        dst += &format!("      nets: [\"{}\"]\n", net(rng));
    }
    if ports && !rng.one_in(3) {
        dst += &format!(
            "      ports: [{}]\n",
            rng.pick(&["80", "\"30000:32767\"", "443", "\"1:1024\"", "22", "53"])
        );
    }
    if ports && rng.one_in(6) {
        dst += &format!("      notPorts: [{}]\n", rng.pick(&["80", "31000"]));
    }
    if !src.is_empty() {
        r += &format!("    source:\n{src}");
    }
    if !dst.is_empty() {
        r += &format!("    destination:\n{dst}");
    }
    if proto.starts_with("ICMP") && rng.one_in(2) {
        let types: &[u8] = if v6 { &[128, 129] } else { &[0, 8] };
        r += &format!("    icmp: {{type: {}}}\n", rng.pick(types));
    }
    if proto.is_empty() && rng.one_in(3) {
        r += &format!("    ipVersion: {}\n", if v6 { 6 } else { 4 });
    }
    r
}

fn random_case(rng: &mut Rng) -> Case {
    let profiles = rng.pick(&["[]", "[projectcalico-default-allow]", "[]"]);
    let hep = format!(
        "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {{name: hep, labels: {{role: pub}}}}\nspec: {{node: diff, interfaceName: lo, profiles: {profiles}}}\n\
         ---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: first}}\nspec: {{order: 10, defaultAction: {}}}\n",
        rng.pick(&["Deny", "Pass"])
    );
    let mut policies = Vec::new();
    for p in 0..(1 + rng.next_u64() % 6) {
        let tier = *rng.pick(&["default", "first"]);
        let name = if tier == "default" {
            format!("p{p}")
        } else {
            format!("first.p{p}")
        };
        let stage = *rng.pick(&[
            "  doNotTrack: true\n  applyOnForward: true\n",
            "  preDNAT: true\n  applyOnForward: true\n",
            "",
            "",
            "  applyOnForward: true\n",
        ]);
        let pre_dnat = stage.contains("preDNAT");
        let types = if pre_dnat {
            "[Ingress]"
        } else {
            rng.pick(&["[Ingress]", "[Egress]", "[Ingress, Egress]"])
        };
        let head = format!(
            "---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: {tier}\n{stage}  order: {}\n  selector: {}\n  types: {types}\n",
            rng.next_u64() % 3,
            rng.pick(&["role == 'pub'", "all()", "role == 'pub'", "role == 'other'"])
        );
        let rules = |rng: &mut Rng, on: bool| -> Vec<String> {
            if !on {
                return Vec::new();
            }
            (0..rng.next_u64() % 5).map(|_| random_rule(rng)).collect()
        };
        let ingress = rules(rng, types.contains("Ingress"));
        let egress = rules(rng, types.contains("Egress"));
        policies.push(Policy {
            head,
            ingress,
            egress,
        });
    }
    Case { hep, policies }
}

/// One random packet and where it goes.
#[derive(Clone, Copy, Debug)]
struct Probe {
    dir: Direction,
    forwarded: bool,
    established: bool,
    packet: reference::Packet,
    /// ICMP echo identifier (0 otherwise).
    echo_id: u16,
}

fn random_probe(rng: &mut Rng) -> Probe {
    let v6 = rng.one_in(3);
    let (node, peers): (&str, &[&str; 3]) = if v6 {
        (WORKER6, &PEERS6)
    } else {
        (WORKER, &PEERS4)
    };
    let ip = |s: &str| -> IpAddr { s.parse().expect("address") };
    let dir = if rng.one_in(2) {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    let forwarded = rng.one_in(4);
    let (src, dst) = match (dir, forwarded) {
        // Host-bound: to the node. Host-originated: from it.
        (Direction::Ingress, false) => (ip(rng.pick(peers)), ip(node)),
        (Direction::Egress, false) => (ip(node), ip(rng.pick(peers))),
        // Routed through: neither end is the node.
        (_, true) => (ip(rng.pick(peers)), ip(rng.pick(&peers[1..]))),
    };
    let proto = *rng.pick(&[6u8, 6, 17, 17, if v6 { 58 } else { 1 }]);
    let sport = *rng.pick(&[40005u16, 22, 53, 68, 5000]);
    let dport = *rng.pick(&[22u16, 80, 443, 53, 67, 68, 31000, 6443, 8080]);
    let mut p = reference::Packet::tcp(src, dst, dport);
    p.proto = proto;
    p.forwarded = forwarded;
    p.established = rng.one_in(4);
    let mut echo_id = 0;
    if proto == 1 || proto == 58 {
        let (request, reply) = if proto == 1 { (8, 0) } else { (128, 129) };
        let ty = *rng.pick(&[request, request, reply]);
        p.icmp = Some((ty, 0));
        p.sport = None;
        p.dport = None;
        echo_id = 7;
    } else {
        p.sport = Some(sport);
    }
    Probe {
        dir,
        forwarded,
        established: p.established,
        packet: p,
        echo_id,
    }
}

fn frame(p: &Probe) -> Vec<u8> {
    let q = &p.packet;
    let mut out = Vec::new();
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    macro_rules! l4 {
        ($b:expr) => {
            match (q.proto, q.icmp) {
                (6, _) => $b
                    .tcp(q.sport.expect("port"), q.dport.expect("port"), 1, 1024)
                    .syn()
                    .write(&mut out, &[]),
                (17, _) => $b
                    .udp(q.sport.expect("port"), q.dport.expect("port"))
                    .write(&mut out, &[]),
                (1, Some((8, _))) => $b.icmpv4_echo_request(p.echo_id, 1).write(&mut out, &[]),
                (1, Some((0, _))) => $b.icmpv4_echo_reply(p.echo_id, 1).write(&mut out, &[]),
                (58, Some((128, _))) => $b.icmpv6_echo_request(p.echo_id, 1).write(&mut out, &[]),
                (58, Some((129, _))) => $b.icmpv6_echo_reply(p.echo_id, 1).write(&mut out, &[]),
                other => panic!("no frame for {other:?}"),
            }
        };
    }
    match (q.src, q.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => l4!(eth.ipv4(s.octets(), d.octets(), 64)),
        (IpAddr::V6(s), IpAddr::V6(d)) => l4!(eth.ipv6(s.octets(), d.octets(), 64)),
        _ => unreachable!("one family per packet"),
    }
    .expect("build frame");
    out
}

/// The flow of a probe, as conntrack keys it.
fn flow(p: &Probe) -> Flow {
    let q = &p.packet;
    let (sport, dport) = match q.proto {
        1 | 58 => (p.echo_id, p.echo_id),
        _ => (q.sport.unwrap_or(0), q.dport.unwrap_or(0)),
    };
    Flow {
        src: q.src,
        dst: q.dst,
        proto: q.proto,
        sport,
        dport,
    }
}

/// The kernel's verdict: the programs run in the order the packet meets
/// them (`dataplane::live::judge`, which `explain --dataplane` uses too).
/// `other_if` is a non-endpoint interface forwarded packets use.
fn kernel(dp: &mut Dataplane, p: &Probe, other_if: u32) -> Verdict {
    let f = flow(p);
    dp.forget_flow(&f).expect("forget");
    if p.established {
        // An echo reply belongs to the flow its peer's request opened.
        let opened = match p.packet.icmp {
            Some((0 | 129, _)) => Flow {
                src: f.dst,
                dst: f.src,
                ..f
            },
            _ => f,
        };
        dp.open_flow(&opened, true, true).expect("record flow");
    }
    let data = frame(p);
    let route = Route {
        ingress: p.dir == Direction::Ingress,
        forwarded: p.forwarded,
        ifindex: HEP_IF,
        other_ifindex: other_if,
    };
    if live::judge(dp, &data, &data, route)
        .expect("test run")
        .allowed
    {
        Verdict::Allow
    } else {
        Verdict::Deny
    }
}

fn compile_case(case: &Case) -> Result<(Store, compile::Compiled), String> {
    let text = case.text();
    let mut store = Store::default();
    let mut errors = Vec::new();
    store.add_text(Path::new("random.yaml"), &text, &mut errors);
    if !errors.is_empty() {
        return Err(format!("{errors:?}"));
    }
    let node = Node {
        name: "diff".into(),
        interfaces: BTreeMap::new(),
    };
    let compiled = compile::compile(&store, &node).map_err(|e| e.to_string())?;
    Ok((store, compiled))
}

/// Both verdicts for `probe` under `case` (published first).
fn verdicts(
    dp: &mut Dataplane,
    case: &Case,
    probe: &Probe,
    other_if: u32,
) -> Option<(Verdict, Verdict)> {
    let (store, compiled) = compile_case(case).ok()?;
    let ifaces: Interfaces = [("lo".to_string(), HEP_IF)].into();
    dp.publish(&compiled, &ifaces).expect("publish");
    Some((
        kernel(dp, probe, other_if),
        reference_verdict(&store, probe),
    ))
}

fn reference_verdict(store: &Store, p: &Probe) -> Verdict {
    let hep = &store.host_endpoints[0];
    Reference::new(store)
        .explain(hep, p.dir, &p.packet, &Failsafe::from_store(store, "diff"))
        .verdict
}

/// Drops policies, then rules, while the disagreement stays.
fn shrink(dp: &mut Dataplane, mut case: Case, probe: &Probe, other_if: u32) -> Case {
    let differs = |dp: &mut Dataplane, c: &Case| {
        verdicts(dp, c, probe, other_if).is_some_and(|(k, r)| k != r)
    };
    let mut progress = true;
    while progress {
        progress = false;
        for i in (0..case.policies.len()).rev() {
            let mut c = case.clone();
            c.policies.remove(i);
            if differs(dp, &c) {
                case = c;
                progress = true;
            }
        }
        for i in 0..case.policies.len() {
            for side in 0..2 {
                let len = if side == 0 {
                    case.policies[i].ingress.len()
                } else {
                    case.policies[i].egress.len()
                };
                for r in (0..len).rev() {
                    let mut c = case.clone();
                    let rules = if side == 0 {
                        &mut c.policies[i].ingress
                    } else {
                        &mut c.policies[i].egress
                    };
                    rules.remove(r);
                    if differs(dp, &c) {
                        case = c;
                        progress = true;
                    }
                }
            }
        }
    }
    case
}

#[test]
fn kernel_pipeline_agrees_with_the_reference_on_random_policies_and_packets() {
    if !privileged("kernel_pipeline_agrees_with_the_reference_on_random_policies_and_packets") {
        return;
    }
    // `lo` is the host endpoint, `other0` an interface forwarded traffic
    // leaves or arrives by.
    let ns = filter_tests::router_netns("fwdiff", WORKER, WORKER6);
    let pin_dir = Path::new("/sys/fs/bpf").join(unique("fwdf"));
    let pins = pin_dir.clone();
    let result = ns.run(move || std::panic::catch_unwind(|| run_differential(&pins)));
    let _ = std::fs::remove_dir_all(&pin_dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn run_differential(pin_dir: &Path) {
    let other_if = nix::net::if_::if_nametoindex("other0").expect("other0");
    let mut dp = Dataplane::load(pin_dir).expect("load");
    let node: BTreeSet<IpAddr> = [WORKER, WORKER6]
        .iter()
        .map(|a| a.parse().expect("address"))
        .collect();
    dp.set_host_addresses(&node).expect("node addresses");
    let seed = std::env::var("FILTER_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x005e_ed0f_d1ff_u64);
    let mut rng = Rng(seed);
    let (mut checked, mut seen) = (0, BTreeSet::new());
    for case_no in 0..250 {
        let case = random_case(&mut rng);
        let (store, compiled) =
            compile_case(&case).unwrap_or_else(|e| panic!("{e}\n{}", case.text()));
        let ifaces: Interfaces = [("lo".to_string(), HEP_IF)].into();
        dp.publish(&compiled, &ifaces).expect("publish");
        for _ in 0..42 {
            let probe = random_probe(&mut rng);
            let k = kernel(&mut dp, &probe, other_if);
            let r = reference_verdict(&store, &probe);
            if k != r {
                let small = shrink(&mut dp, case.clone(), &probe, other_if);
                let (store, _) = compile_case(&small).expect("compiles");
                let why = Reference::new(&store).explain(
                    &store.host_endpoints[0],
                    probe.dir,
                    &probe.packet,
                    &Failsafe::from_store(&store, "diff"),
                );
                panic!(
                    "kernel says {k:?}, reference says {r:?} (seed {seed:#x}, case {case_no})\n\
                     packet: {probe:#?}\nminimal policy:\n{}\nreference stages: {:#?}",
                    small.text(),
                    why.stages
                );
            }
            seen.insert((
                probe.packet.src.is_ipv6(),
                probe.dir == Direction::Ingress,
                probe.forwarded,
                probe.established,
                k == Verdict::Allow,
            ));
            checked += 1;
        }
    }
    assert!(checked >= 10_000, "{checked} pairs");
    // Every combination of family, direction, forwarded, established and
    // verdict occurred, except established flows being denied (conntrack
    // accepts them unless an untracked deny or …): require the rest.
    for v6 in [false, true] {
        for ingress in [false, true] {
            for forwarded in [false, true] {
                for allowed in [false, true] {
                    assert!(
                        seen.contains(&(v6, ingress, forwarded, false, allowed)),
                        "no new {} {} {} packet was {}",
                        if v6 { "IPv6" } else { "IPv4" },
                        if ingress { "ingress" } else { "egress" },
                        if forwarded { "forwarded" } else { "host" },
                        if allowed { "allowed" } else { "denied" },
                    );
                }
                assert!(seen.contains(&(v6, ingress, forwarded, true, true)));
            }
        }
    }
}
