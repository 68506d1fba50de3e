//! The real `fw_xdp` under BPF_PROG_TEST_RUN, on crafted frames.
//!
//! Each test loads the embedded kernel object, publishes a compiled policy
//! for the loopback interface (ifindex 1, which test runs may name without
//! attaching anything to it), runs the program on frames built byte by byte,
//! and asserts the XDP action and the reason counters.

use std::{collections::BTreeMap, path::Path};

use etherparse::{PacketBuilder, VlanId};
use filter_agent::{
    compile::{self, Node},
    dataplane::{Dataplane, Interfaces},
    model::Store,
};
use filter_common::reason;
use filter_tests::{
    ipv4_fragments, ipv6_with_dest_options, privileged, sh, unique, with_priority_tags, Rng,
};

#[path = "kernel/frames.rs"]
mod frames;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const LO: u32 = 1;

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];
const CLIENT: [u8; 4] = [198, 51, 100, 10];
const OTHER: [u8; 4] = [198, 51, 100, 20];
const WORKER: [u8; 4] = [198, 51, 100, 1];
const LB: [u8; 4] = [203, 0, 113, 80];
const CLIENT6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const WORKER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
];

/// The tutorial's policies bound to `lo`, plus an ICMP rule.
/// The host endpoint every policy here is for: the loopback.
const TEST_HEP: &str = "apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: test-hep, labels: {ibm.role: worker_public}}
spec: {node: kernel-test, interfaceName: lo}
---";

const POLICY: &str = r#"
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: test-hep, labels: {ibm.role: worker_public}}
spec: {node: kernel-test, interfaceName: lo}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-nodeports}
spec:
  applyOnForward: true
  preDNAT: true
  selector: ibm.role=='worker_public'
  order: 1100
  ingress:
  - action: Deny
    protocol: TCP
    destination: {ports: ["30000:32767"]}
  - action: Deny
    protocol: UDP
    destination: {ports: ["30000:32767"]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-lb-port-80}
spec:
  applyOnForward: true
  preDNAT: true
  selector: ibm.role=='worker_public'
  order: 800
  ingress:
  - action: Deny
    protocol: TCP
    destination: {nets: [203.0.113.80/32], ports: [80]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: whitelist}
spec:
  applyOnForward: true
  preDNAT: true
  selector: ibm.role=='worker_public'
  order: 500
  ingress:
  - action: Allow
    protocol: TCP
    source: {nets: [198.51.100.10/32]}
    destination: {nets: [203.0.113.80/32], ports: [80]}
  - action: Deny
    protocol: ICMP
    icmp: {type: 8}
"#;

/// Appended to [`POLICY`] where TC runs too: the normal stage allows
/// everything, so both hooks decide on the pre-DNAT rules alone.
const ALLOW_NORMAL: &str = "---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: allow-normal}
spec:
  selector: ibm.role=='worker_public'
  ingress:
  - action: Allow
";

/// `policy` compiled for the kernel tests' node.
fn kernel_test_policy(policy: &str) -> compile::Compiled {
    let mut store = Store::default();
    let mut errors = Vec::new();
    store.add_text(Path::new("kernel-test.yaml"), policy, &mut errors);
    let head: String = policy.chars().take(2000).collect();
    assert!(errors.is_empty(), "{errors:?}\n{head}");
    let node = Node {
        name: "kernel-test".into(),
        interfaces: BTreeMap::new(),
    };
    compile::compile(&store, &node).expect("compiles")
}

/// A loaded dataplane with [`POLICY`] published; unpinned on drop, also
/// when the test fails.
struct Loaded {
    dp: Option<Dataplane>,
    pin_dir: std::path::PathBuf,
    /// The policy [`Loaded::new`] published, and its generation.
    published: Option<(compile::Compiled, u32)>,
    /// The interface `lo` is published as and the programs run on.
    ifindex: u32,
}

impl Loaded {
    fn new(policy: &str) -> Loaded {
        Self::with_options(policy, &filter_agent::dataplane::Options::default())
    }

    fn with_options(policy: &str, options: &filter_agent::dataplane::Options) -> Loaded {
        Self::on(LO, policy, options)
    }

    /// [`Loaded::new`] with `lo`'s endpoint published as interface
    /// `ifindex` (which must exist here), the programs run on it.
    fn on(ifindex: u32, policy: &str, options: &filter_agent::dataplane::Options) -> Loaded {
        let pin_dir = Path::new("/sys/fs/bpf").join(unique("fwk"));
        let dp = Dataplane::load_with(&pin_dir, options).expect("load the kernel object");
        let mut k = Loaded::at(pin_dir, Some(dp));
        k.ifindex = ifindex;
        k.publish(policy);
        k
    }

    /// A guard over `pin_dir` (and `dp`, loaded there, if any), nothing
    /// published yet: dropping it unpins the directory.
    fn at(pin_dir: std::path::PathBuf, dp: Option<Dataplane>) -> Loaded {
        Loaded {
            dp,
            pin_dir,
            published: None,
            ifindex: LO,
        }
    }

    /// Makes `policy` the live one, as an agent's update would.
    fn publish(&mut self, policy: &str) {
        let compiled = kernel_test_policy(policy);
        let generation = self.try_publish(&compiled).expect("publish");
        self.published = Some((compiled, generation));
    }

    /// Publishes `compiled` on `lo`: the live generation, or the refusal.
    fn try_publish(
        &mut self,
        compiled: &compile::Compiled,
    ) -> Result<u32, filter_agent::dataplane::Error> {
        let ifaces: Interfaces = [("lo".to_string(), self.ifindex)].into();
        self.dp.as_mut().expect("loaded").publish(compiled, &ifaces)
    }

    fn run(&mut self, frame: &[u8]) -> u32 {
        self.dp
            .as_mut()
            .expect("loaded")
            .test_run_xdp(frame, self.ifindex)
            .expect("BPF_PROG_TEST_RUN")
    }

    /// Runs `fw_tc_in` (`ingress`, as if XDP had left no metadata) or
    /// `fw_tc_eg` (a packet the host sends) on `lo`; returns the TC action.
    fn tc(&mut self, frame: &[u8], ingress: bool) -> i32 {
        self.dp
            .as_mut()
            .expect("loaded")
            .test_run_tc(
                frame,
                filter_agent::dataplane::TcRun {
                    ingress,
                    ifindex: self.ifindex,
                    ingress_ifindex: if ingress { self.ifindex } else { 0 },
                    mark: 0,
                },
            )
            .expect("BPF_PROG_TEST_RUN tc")
            .0
    }

    /// Runs a frame through `fw_xdp` and, as if XDP had left no metadata,
    /// `fw_tc_in`; both must agree. Returns the XDP action.
    fn both(&mut self, frame: &[u8], what: &str) -> u32 {
        let xdp = self.run(frame);
        let tc = self.tc(frame, true);
        let tc_as_xdp = if tc == 2 { XDP_DROP } else { XDP_PASS };
        assert_eq!(xdp, tc_as_xdp, "{what}: XDP and TC disagree");
        xdp
    }

    /// The slot of the untracked-stage Log rule `rule` of `policy` in the
    /// policy [`Loaded::new`] published.
    fn log_slot(&self, policy: &str, rule: usize) -> u32 {
        let (compiled, generation) = self.published.as_ref().expect("published");
        filter_agent::state::state(compiled, *generation, &[])
            .rules
            .iter()
            .find(|r| {
                r.action == "log"
                    && r.stage == "untracked"
                    && r.policy.as_deref() == Some(policy)
                    && r.rule == Some(rule)
            })
            .unwrap_or_else(|| panic!("no Log slot of {policy} rule {rule}"))
            .slot
    }

    fn reasons(&mut self) -> Vec<u64> {
        self.dp
            .as_mut()
            .expect("loaded")
            .reason_counts()
            .expect("read FW_STATS2")
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Some(dp) = self.dp.take() {
            let _ = dp.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// A TCP segment of a connection from `sport` to `dport`: `"syn"`, `"synack"`
/// or, for anything else, a bare ACK.
fn tcp_segment(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: &str) -> Vec<u8> {
    let mut v = Vec::new();
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 100, 1024);
    match flags {
        "syn" => b.syn(),
        "synack" => b.syn().ack(101),
        _ => b.ack(101),
    }
    .write(&mut v, &[])
    .expect("build");
    v
}

fn tcp4(src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .tcp(40000, dport, 1, 1024)
        .syn();
    let mut v = Vec::new();
    b.write(&mut v, &[]).expect("build");
    v
}

fn udp4(src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .udp(40000, dport)
        .write(&mut v, b"ping")
        .expect("build");
    v
}

fn tcp6(dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(CLIENT6, WORKER6, 64)
        .tcp(40000, dport, 1, 1024)
        .syn()
        .write(&mut v, &[])
        .expect("build");
    v
}

/// Ethernet (14) + IPv4 (20) offsets of a frame built above.
const IP4: usize = 14;
const IP6: usize = 14;

#[test]
fn pre_dnat_lessons_decide_at_xdp() {
    if !privileged("pre_dnat_lessons_decide_at_xdp") {
        return;
    }
    let mut k = Loaded::new(POLICY);
    // Lesson 2: node ports, TCP and UDP, from anyone.
    assert_eq!(
        k.run(&tcp4(OTHER, WORKER, 31000)),
        XDP_DROP,
        "tcp node port"
    );
    assert_eq!(
        k.run(&tcp4(OTHER, WORKER, 30000)),
        XDP_DROP,
        "first node port"
    );
    assert_eq!(
        k.run(&tcp4(OTHER, WORKER, 32767)),
        XDP_DROP,
        "last node port"
    );
    assert_eq!(
        k.run(&tcp4(OTHER, WORKER, 29999)),
        XDP_PASS,
        "below the range"
    );
    assert_eq!(
        k.run(&tcp4(OTHER, WORKER, 32768)),
        XDP_PASS,
        "above the range"
    );
    assert_eq!(
        k.run(&udp4(OTHER, WORKER, 31000)),
        XDP_DROP,
        "udp node port"
    );
    // Lesson 3: allow-list (order 500) before the deny (order 800).
    assert_eq!(
        k.run(&tcp4(CLIENT, LB, 80)),
        XDP_PASS,
        "allow-listed client"
    );
    assert_eq!(k.run(&tcp4(OTHER, LB, 80)), XDP_DROP, "other client");
    assert_eq!(
        k.run(&tcp4(OTHER, WORKER, 80)),
        XDP_PASS,
        "port 80 of another address"
    );
    // IPv6: the node-port rules have no nets, so they hold for both families.
    assert_eq!(k.run(&tcp6(31000)), XDP_DROP, "ipv6 node port");
    assert_eq!(k.run(&tcp6(8080)), XDP_PASS, "ipv6 other port");
    let r = k.reasons();
    assert_eq!(r[reason::DROP_RULE as usize], 6, "{r:?}");
    assert_eq!(r[reason::ALLOW_RULE as usize], 1, "{r:?}");
    assert_eq!(r[reason::PASS_NO_VERDICT as usize], 4, "{r:?}");
}

/// An interface index past the endpoint array's
/// (`filter_common::ENDPOINT_ARRAY_IFINDEXES`).
const LARGE_IFINDEX: u32 = filter_common::ENDPOINT_ARRAY_IFINDEXES + 188;

/// An endpoint's entries are in an array for interfaces with small
/// indexes and in the endpoint hash alone for the rest: both are found,
/// at XDP and at TC, and a policy that moves the endpoint elsewhere,
/// patched over a generation that had it here, leaves neither with an
/// entry that still judges the interface.
#[test]
fn endpoints_are_judged_whatever_their_interface_index() {
    in_router_ns(
        "endpoints_are_judged_whatever_their_interface_index",
        || {
            let added = std::process::Command::new("ip")
                .args(["link", "add", "fwlarge", "index"])
                .arg(LARGE_IFINDEX.to_string())
                .args(["type", "veth", "peer", "name", "fwlarge-peer"])
                .status()
                .expect("run ip");
            assert!(added.success(), "ip link add fwlarge");
            for ifindex in [LO, LARGE_IFINDEX] {
                let policy = format!("{POLICY}{ALLOW_NORMAL}");
                let mut k = Loaded::on(ifindex, &policy, &Default::default());
                let what = format!("interface {ifindex}");
                assert_eq!(
                    k.both(&tcp4(OTHER, WORKER, 31000), &what),
                    XDP_DROP,
                    "{what}"
                );
                assert_eq!(k.both(&tcp4(CLIENT, LB, 80), &what), XDP_PASS, "{what}");
                assert_eq!(k.both(&tcp4(OTHER, LB, 80), &what), XDP_DROP, "{what}");
                // Both generations hold the policy, so the next publish
                // patches one that has the endpoint's entries to one
                // without them (a cleared generation has none to remove).
                k.publish(&policy);
                // The endpoint moves to an interface this node does not
                // have; the policies and their tables stay as they were,
                // so an entry left for this interface would still deny.
                k.publish(&policy.replace("interfaceName: lo", "interfaceName: eth9"));
                assert_eq!(
                    k.both(&tcp4(OTHER, WORKER, 31000), &what),
                    XDP_PASS,
                    "{what}"
                );
                k.publish(&policy);
                assert_eq!(k.both(&tcp4(OTHER, LB, 80), &what), XDP_DROP, "{what}");
            }
        },
    );
}

/// A deny list of `n` host sources from 10.0.0.0 + `base` on, as one
/// pre-DNAT rule on the test endpoint.
fn deny_list(base: u32, n: u32) -> String {
    let nets: Vec<String> = (base..base + n)
        .map(|i| format!("{}/32", std::net::Ipv4Addr::from(0x0a00_0000 + i)))
        .collect();
    format!(
        "{TEST_HEP}
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: deny-list}}
spec:
  preDNAT: true
  applyOnForward: true
  selector: ibm.role=='worker_public'
  ingress:
  - action: Deny
    source: {{nets: [{}]}}
",
        nets.join(", ")
    )
}

/// A list replaced whole: the generation written held the old list, so
/// the publish removes every old entry and writes every new one, each
/// in two halves on two threads past a size (the agent's batched writes).
/// Addresses of both halves of the new list are denied, of the old one
/// passed.
#[test]
fn a_long_deny_list_replaced_whole_is_enforced_whole() {
    if !privileged("a_long_deny_list_replaced_whole_is_enforced_whole") {
        return;
    }
    const N: u32 = 40_000;
    let source = |i: u32| (0x0a00_0000 + i).to_be_bytes();
    let old = deny_list(0, N);
    // Both generations hold the old list before the new one replaces it
    // in one of them.
    let mut k = Loaded::new(&old);
    k.publish(&old);
    for i in [0, N / 2 - 1, N / 2, N - 1] {
        assert_eq!(k.run(&tcp4(source(i), WORKER, 7000)), XDP_DROP, "old {i}");
    }
    k.publish(&deny_list(N, N));
    for i in [N, N + N / 4, N + N / 2, N + 3 * N / 4, 2 * N - 1] {
        assert_eq!(k.run(&tcp4(source(i), WORKER, 7000)), XDP_DROP, "new {i}");
    }
    for i in [0, N / 4, N / 2, 3 * N / 4, N - 1] {
        assert_eq!(k.run(&tcp4(source(i), WORKER, 7000)), XDP_PASS, "old {i}");
    }
}

#[test]
fn parser_reads_vlan_tags_options_and_extension_headers() {
    if !privileged("parser_reads_vlan_tags_options_and_extension_headers") {
        return;
    }
    let mut k = Loaded::new(POLICY);
    let mut single = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .single_vlan(VlanId::try_new(10).expect("vid"))
        .ipv4(OTHER, WORKER, 64)
        .tcp(40000, 31000, 1, 1024)
        .write(&mut single, &[])
        .expect("build");
    assert_eq!(k.run(&single), XDP_DROP, "802.1Q");
    let mut double = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .double_vlan(
            VlanId::try_new(100).expect("vid"),
            VlanId::try_new(10).expect("vid"),
        )
        .ipv4(OTHER, WORKER, 64)
        .tcp(40000, 31000, 1, 1024)
        .write(&mut double, &[])
        .expect("build");
    assert_eq!(k.run(&double), XDP_DROP, "QinQ");

    // IPv4 with 8 bytes of options (IHL 7): ports sit after the options.
    let mut opts = tcp4(OTHER, WORKER, 31000);
    opts.splice(IP4 + 20..IP4 + 20, [1u8, 1, 1, 1, 1, 1, 1, 0]);
    opts[IP4] = 0x47;
    let total = u16::from_be_bytes([opts[IP4 + 2], opts[IP4 + 3]]) + 8;
    opts[IP4 + 2..IP4 + 4].copy_from_slice(&total.to_be_bytes());
    assert_eq!(k.run(&opts), XDP_DROP, "IPv4 options");
    // The same options with an allowed port: the parser must not read the
    // options as ports.
    let mut opts_ok = opts.clone();
    opts_ok[IP4 + 28 + 2..IP4 + 28 + 4].copy_from_slice(&8080u16.to_be_bytes());
    opts_ok[IP4 + 20..IP4 + 28].copy_from_slice(&[0x75, 0x30, 0x75, 0x30, 1, 1, 1, 0]);
    assert_eq!(
        k.run(&opts_ok),
        XDP_PASS,
        "options that look like node ports"
    );

    // IPv6 with a hop-by-hop header (8 bytes) before TCP.
    let mut hbh = tcp6(31000);
    hbh.splice(IP6 + 40..IP6 + 40, [6u8, 0, 1, 4, 0, 0, 0, 0]);
    hbh[IP6 + 6] = 0; // next header: hop-by-hop
    let plen = u16::from_be_bytes([hbh[IP6 + 4], hbh[IP6 + 5]]) + 8;
    hbh[IP6 + 4..IP6 + 6].copy_from_slice(&plen.to_be_bytes());
    assert_eq!(k.run(&hbh), XDP_DROP, "IPv6 hop-by-hop");
}

#[test]
fn fragments_truncation_and_other_protocols_fail_closed_or_match_by_protocol() {
    if !privileged("fragments_truncation_and_other_protocols_fail_closed_or_match_by_protocol") {
        return;
    }
    let mut k = Loaded::new(POLICY);
    // First fragment (MF set, offset 0) has the ports: judged.
    let mut first = tcp4(OTHER, WORKER, 31000);
    first[IP4 + 6] = 0x20;
    assert_eq!(k.run(&first), XDP_DROP, "first fragment");
    // Its later fragment follows it: dropped.
    let mut later = tcp4(OTHER, WORKER, 31000);
    later[IP4 + 6..IP4 + 8].copy_from_slice(&[0x00, 0x10]);
    assert_eq!(k.run(&later), XDP_DROP, "fragment of a denied datagram");
    assert_eq!(k.reasons()[reason::DROP_FRAGMENT as usize], 1);

    let before = k.reasons()[reason::DROP_MALFORMED as usize];
    let full = tcp4(OTHER, WORKER, 8080);
    // (BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.)
    for cut in [IP4 + 10, IP4 + 20 + 2, IP4 + 20 + 13] {
        assert_eq!(k.run(&full[..cut]), XDP_DROP, "truncated at {cut}");
    }
    let mut tagged = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .single_vlan(VlanId::try_new(10).expect("vid"))
        .ipv4(OTHER, WORKER, 64)
        .tcp(40000, 8080, 1, 1024)
        .write(&mut tagged, &[])
        .expect("build");
    assert_eq!(
        k.run(&tagged[..16]),
        XDP_DROP,
        "truncated inside the VLAN tag"
    );
    let mut bad_ihl = full.clone();
    bad_ihl[IP4] = 0x43;
    assert_eq!(k.run(&bad_ihl), XDP_DROP, "IHL below 5");
    assert_eq!(k.reasons()[reason::DROP_MALFORMED as usize] - before, 5);

    // ARP is not IP: passed, counted as such.
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let not_ip = k.reasons()[reason::PASS_NOT_IP as usize];
    assert_eq!(k.run(&arp), XDP_PASS, "ARP");
    assert_eq!(k.reasons()[reason::PASS_NOT_IP as usize], not_ip + 1);

    // ICMP type/code ride in the port bits: echo request denied, reply not.
    let mut echo = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(OTHER, WORKER, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut echo, &[])
        .expect("build");
    assert_eq!(k.run(&echo), XDP_DROP, "echo request");
    let mut reply = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(OTHER, WORKER, 64)
        .icmpv4_echo_reply(1, 1)
        .write(&mut reply, &[])
        .expect("build");
    assert_eq!(k.run(&reply), XDP_PASS, "echo reply");
}

#[test]
fn interface_without_a_selected_endpoint_is_not_judged() {
    if !privileged("interface_without_a_selected_endpoint_is_not_judged") {
        return;
    }
    // The endpoint's label no longer matches any policy selector.
    let mut k =
        Loaded::new(&POLICY.replace("ibm.role: worker_public}", "ibm.role: worker_private}"));
    assert_eq!(k.run(&tcp4(OTHER, WORKER, 31000)), XDP_PASS);
    assert_eq!(
        k.reasons()[reason::PASS_NO_POLICY as usize],
        1,
        "{:?}",
        k.reasons()
    );
}

/// xorshift64*: deterministic, so a failure replays from the printed seed.
fn random_pre_dnat_rule(rng: &mut Rng) -> String {
    let action = rng.pick(&["Allow", "Deny", "Deny", "Log", "Pass"]);
    let (proto, ports) = *rng.pick(&[("TCP", true), ("UDP", true), ("ICMP", false), ("", false)]);
    let mut r = format!("  - action: {action}\n");
    if !proto.is_empty() {
        r += &format!("    protocol: {proto}\n");
    }
    let nets = [
        "198.51.100.0/24",
        "198.51.100.10/32",
        "203.0.113.80/32",
        "0.0.0.0/1",
        "128.0.0.0/1",
    ];
    let mut src = String::new();
    if rng.next_u64().is_multiple_of(2) {
        src += &format!("      nets: [{}]\n", rng.pick(&nets));
    }
    if rng.next_u64().is_multiple_of(5) {
        src += &format!("      notNets: [{}]\n", rng.pick(&nets));
    }
    if ports && rng.next_u64().is_multiple_of(4) {
        src += &format!(
            "      ports: [\"{}\"]\n",
            rng.pick(&["1:1023", "40000:40010", "1024:65535"])
        );
    }
    let mut dst = String::new();
    if rng.next_u64().is_multiple_of(2) {
        dst += &format!("      nets: [{}]\n", rng.pick(&nets));
    }
    if ports && !rng.next_u64().is_multiple_of(3) {
        dst += &format!(
            "      ports: [{}]\n",
            rng.pick(&["80", "\"30000:32767\"", "443", "\"1:1024\""])
        );
    }
    if ports && rng.next_u64().is_multiple_of(6) {
        dst += &format!("      notPorts: [{}]\n", rng.pick(&["80", "31000"]));
    }
    if !src.is_empty() {
        r += &format!("    source:\n{src}");
    }
    if !dst.is_empty() {
        r += &format!("    destination:\n{dst}");
    }
    if proto == "ICMP" {
        r += "    ipVersion: 4\n";
        if rng.next_u64().is_multiple_of(2) {
            r += &format!("    icmp: {{type: {}}}\n", rng.pick(&[0, 8]));
        }
    }
    r
}

fn random_pre_dnat_store(rng: &mut Rng) -> String {
    let mut t = String::from(
        "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: test-hep, labels: {role: pub}}\nspec: {node: kernel-test, interfaceName: lo}\n\
         ---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: first}\nspec: {order: 10}\n",
    );
    for p in 0..(1 + rng.next_u64() % 4) {
        let tier = rng.pick(&["default", "first"]);
        let name = if *tier == "default" {
            format!("p{p}")
        } else {
            format!("first.p{p}")
        };
        t += &format!(
            "---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: {tier}\n  preDNAT: true\n  applyOnForward: true\n  order: {}\n  selector: {}\n  ingress:\n",
            rng.next_u64() % 3,
            rng.pick(&["role == 'pub'", "all()", "role == 'other'"])
        );
        for _ in 0..(1 + rng.next_u64() % 5) {
            t += &random_pre_dnat_rule(rng);
        }
    }
    t
}

#[test]
fn kernel_and_emulated_tables_agree_on_random_pre_dnat_policies() {
    if !privileged("kernel_and_emulated_tables_agree_on_random_pre_dnat_policies") {
        return;
    }
    use filter_agent::compile::emulate::{self, Fields};
    let pin_dir = Path::new("/sys/fs/bpf").join(unique("fwd"));
    let dp = Dataplane::load(&pin_dir).expect("load");
    let mut guard = Loaded::at(pin_dir, Some(dp));
    let mut rng = Rng(0x00c0_ffee_1234_5678);
    let addrs: [[u8; 4]; 4] = [CLIENT, OTHER, LB, [192, 0, 2, 7]];
    let (mut checked, mut forgotten) = (0, 0);
    for case in 0..60 {
        let text = random_pre_dnat_store(&mut rng);
        let compiled = kernel_test_policy(&text);
        guard.try_publish(&compiled).expect("publish");
        let table = compiled.table(
            filter_common::stage::PRE_DNAT,
            filter_common::direction::INGRESS,
        );
        let mut packets = Vec::new();
        for _ in 0..50 {
            let (src, dst) = (*rng.pick(&addrs), *rng.pick(&addrs));
            let proto = *rng.pick(&[6u8, 17, 1]);
            let sport = *rng.pick(&[40005u16, 22, 5000]);
            let dport = *rng.pick(&[80u16, 443, 31000, 8080, 30000]);
            let mut frame = Vec::new();
            let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src, dst, 64);
            // ICMP type and code (echo request: 8, 0) ride in the port.
            let (l4_sport, l4_dport) = match proto {
                6 => {
                    b.tcp(sport, dport, 1, 1024)
                        .write(&mut frame, &[])
                        .expect("build");
                    (Some(sport), Some(dport))
                }
                17 => {
                    b.udp(sport, dport).write(&mut frame, &[]).expect("build");
                    (Some(sport), Some(dport))
                }
                _ => {
                    b.icmpv4_echo_request(1, 1)
                        .write(&mut frame, &[])
                        .expect("build");
                    (None, Some(0x0800))
                }
            };
            let fields = Fields {
                src: src.into(),
                dst: dst.into(),
                proto,
                sport: l4_sport,
                dport: l4_dport,
            };
            let want = match emulate::lookup(&compiled, table, "lo", fields).and_then(|o| o.decided)
            {
                Some(r) if table.rules[r].action == filter_common::action::DENY => XDP_DROP,
                _ => XDP_PASS,
            };
            packets.push((frame, fields, want));
        }
        for (frame, fields, want) in &packets {
            let got = guard.run(frame);
            assert_eq!(got, *want, "case {case}: packet {fields:?}\n{text}");
            checked += 1;
        }
        // Heads as an agent from before they named their lowest rule
        // wrote them (an upgrade's new programs may read such a
        // generation): the search starts at rule 0 and finds the same.
        if case % 2 == 0 && forget_lowest_rules(&guard.pin_dir) > 0 {
            for (frame, fields, want) in &packets {
                let got = guard.run(frame);
                assert_eq!(
                    got, *want,
                    "case {case}, heads without their lowest rule: packet {fields:?}\n{text}"
                );
                forgotten += 1;
            }
        }
    }
    assert_eq!(checked, 3000);
    assert!(
        forgotten >= 1000,
        "{forgotten} packets judged by heads without their lowest rule"
    );
}

/// Sets `ClassHead::first` to 0 (unknown) in every class head pinned
/// under `pin_dir`, as an agent from before it was written left them.
/// Returns the number of heads changed.
fn forget_lowest_rules(pin_dir: &Path) -> usize {
    use aya::maps::{Array, Map, MapData};
    let data = MapData::from_pin(pin_dir.join(filter_common::names::MAP_CLASS))
        .expect("the class heads' pin");
    let mut heads: Array<MapData, filter_common::ClassHead> =
        Array::try_from(Map::Array(data)).expect("an array map");
    let mut changed = 0;
    for i in 0..heads.len() {
        let mut head = heads.get(&i, 0).expect("read a class head");
        if head.first != 0 {
            head.first = 0;
            heads.set(i, &head, 0).expect("write a class head");
            changed += 1;
        }
    }
    changed
}

#[test]
fn failsafe_ports_skip_pre_dnat_policy() {
    if !privileged("failsafe_ports_skip_pre_dnat_policy") {
        return;
    }
    let deny_all = "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: test-hep, labels: {r: x}}\nspec: {node: kernel-test, interfaceName: lo}\n\
        ---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: deny-all}\nspec:\n  preDNAT: true\n  applyOnForward: true\n  ingress:\n  - action: Deny\n";
    let mut k = Loaded::new(deny_all);
    // Calico's default inbound failsafe ports: tcp:22, tcp:6443, udp:68, ...
    assert_eq!(k.run(&tcp4(OTHER, WORKER, 22)), XDP_PASS, "ssh");
    assert_eq!(k.run(&tcp4(OTHER, WORKER, 6443)), XDP_PASS, "API server");
    assert_eq!(k.run(&udp4(OTHER, WORKER, 68)), XDP_PASS, "dhcp client");
    assert_eq!(
        k.run(&udp4(OTHER, WORKER, 22)),
        XDP_DROP,
        "udp:22 is not failsafe"
    );
    assert_eq!(
        k.run(&tcp4(OTHER, WORKER, 53)),
        XDP_DROP,
        "outbound-only entries do not open inbound"
    );
    assert_eq!(k.run(&tcp4(OTHER, WORKER, 2222)), XDP_DROP);
    assert_eq!(k.reasons()[reason::PASS_FAILSAFE as usize], 3);
    drop(k);

    // A FelixConfiguration list replaces the defaults; a net limits the peer.
    let mut k = Loaded::new(&format!(
        "{deny_all}---\napiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {{name: default}}\nspec:\n  failsafeInboundHostPorts:\n  - {{protocol: TCP, port: 2222, net: 198.51.100.0/28}}\n"
    ));
    assert_eq!(
        k.run(&tcp4(CLIENT, WORKER, 2222)),
        XDP_PASS,
        "failsafe from the allowed net"
    );
    assert_eq!(
        k.run(&tcp4(OTHER, WORKER, 2222)),
        XDP_DROP,
        "198.51.100.20 is outside 198.51.100.0/28"
    );
    assert_eq!(
        k.run(&tcp4(CLIENT, WORKER, 22)),
        XDP_DROP,
        "the default list no longer applies"
    );

    // Updates on a running dataplane: the port filter in front of the
    // failsafe trie follows the list both ways.
    k.publish(deny_all);
    assert_eq!(k.run(&tcp4(OTHER, WORKER, 22)), XDP_PASS, "ssh again");
    assert_eq!(
        k.run(&tcp4(CLIENT, WORKER, 2222)),
        XDP_DROP,
        "2222 no longer failsafe"
    );
    k.publish(&format!(
        "{deny_all}---\napiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {{name: default}}\nspec:\n  failsafeInboundHostPorts:\n  - {{protocol: TCP, port: 22, net: 198.51.100.0/28}}\n"
    ));
    assert_eq!(
        k.run(&tcp4(CLIENT, WORKER, 22)),
        XDP_PASS,
        "ssh from the allowed net"
    );
    assert_eq!(
        k.run(&tcp4(OTHER, WORKER, 22)),
        XDP_DROP,
        "ssh from outside the net, once the entry for any net is gone"
    );
    assert_eq!(
        k.run(&tcp4(OTHER, WORKER, 6443)),
        XDP_DROP,
        "the API server's default entry is gone"
    );
}

/// A table of 15,000 rules, so deciding rules sit in every summary word of
/// the sparse class storage: for random packets the kernel's verdict and
/// the rule it counts (and the Log rules it passes) are the emulation's.
#[test]
fn kernel_finds_the_emulated_rule_anywhere_in_a_full_size_table() {
    if !privileged("kernel_finds_the_emulated_rule_anywhere_in_a_full_size_table") {
        return;
    }
    use filter_agent::{
        compile::emulate::{self, Fields},
        dataplane::{first_slots, PinnedCounters},
    };
    use filter_common::{action, direction, stage};
    const RULES: usize = 15_000;
    let mut rng = Rng(0x5eed_0000_0010_0000);
    // 128 sources × 64 ports: a rule matches one packet in 8,192, so the
    // first match falls anywhere in the table (or nowhere).
    let addr = |i: u64| [10, 9, (i / 256) as u8, (i % 256) as u8];
    let port = |i: u64| 20_000 + i as u16;
    let mut text = String::from(
        "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: test-hep, labels: {role: pub}}\nspec: {node: kernel-test, interfaceName: lo}\n\
         ---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: big}\nspec:\n  preDNAT: true\n  applyOnForward: true\n  selector: role == 'pub'\n  ingress:\n",
    );
    for _ in 0..RULES {
        let act = rng.pick(&["Allow", "Deny", "Allow", "Deny", "Log"]);
        let [a, b, c, d] = addr(rng.next_u64() % 128);
        // A few rules cover every source, so several rules often match.
        let net = if rng.one_in(300) {
            "10.9.0.0/25".to_string()
        } else {
            format!("{a}.{b}.{c}.{d}/32")
        };
        text += &format!(
            "  - action: {act}\n    protocol: TCP\n    source: {{nets: [{net}]}}\n    destination: {{ports: [{}]}}\n",
            port(rng.next_u64() % 64)
        );
    }
    let compiled = kernel_test_policy(&text);
    let pin_dir = Path::new("/sys/fs/bpf").join(unique("fwbig"));
    let dp = Dataplane::load(&pin_dir).expect("load");
    let mut k = Loaded::at(pin_dir, Some(dp));
    let ifaces: Interfaces = [("lo".to_string(), LO)].into();
    let generation =
        k.dp.as_mut()
            .expect("loaded")
            .publish(&compiled, &ifaces)
            .expect("a 15,000-rule table fits");
    let index = (stage::PRE_DNAT * 2 + direction::INGRESS) as usize;
    let first_slot = first_slots(&compiled, generation)[index];
    let table = compiled.table(stage::PRE_DNAT, direction::INGRESS);
    assert!(table.rules.len() >= RULES);
    let counters = PinnedCounters::open(&k.pin_dir).expect("open the counters");
    let mut expected: BTreeMap<usize, u64> = BTreeMap::new();
    let mut deepest = 0;
    for n in 0..2000 {
        let src = addr(rng.next_u64() % 130);
        let dport = port(rng.next_u64() % 64);
        let fields = Fields {
            src: src.into(),
            dst: WORKER.into(),
            proto: 6,
            sport: Some(40000),
            dport: Some(dport),
        };
        let out = emulate::lookup(&compiled, table, "lo", fields).expect("the endpoint has a mask");
        let want = match out.decided {
            Some(r) if table.rules[r].action == action::DENY => XDP_DROP,
            _ => XDP_PASS,
        };
        assert_eq!(
            k.run(&tcp4(src, WORKER, dport)),
            want,
            "packet {n}: {fields:?}"
        );
        for r in out.decided.iter().chain(&out.logged) {
            *expected.entry(*r).or_default() += 1;
            let got = counters.rule(first_slot + *r as u32).expect("read").packets;
            assert_eq!(got, expected[r], "packet {n}: counter of rule {r}");
        }
        deepest = deepest.max(out.decided.unwrap_or(0));
    }
    // The test means something only if deciding rules reach the last
    // summary word the table uses (rule 12,288 and up).
    assert!(deepest >= 12_288, "deepest deciding rule {deepest}");
}

/// A TCP SYN with 12 bytes of payload (32 L4 bytes) to `dport`, cut
/// after `cut` L4 bytes into two fragments of datagram `id`.
fn syn_fragments(dport: u16, cut: usize, id: u16) -> Vec<Vec<u8>> {
    let mut whole = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(OTHER, WORKER, 64)
        .tcp(40000, dport, 1, 1024)
        .syn()
        .write(&mut whole, &[7u8; 12])
        .expect("build");
    ipv4_fragments(&whole, &[cut], id)
}

/// The evasions of the hardening issue, as crafted frames through `fw_xdp`
/// and, without XDP metadata, `fw_tc_in`: each is dropped or judged on the
/// fields the kernel would deliver, never passed unjudged.
#[test]
fn evasions_are_dropped_or_judged_at_xdp_and_tc() {
    in_router_ns(
        "evasions_are_dropped_or_judged_at_xdp_and_tc",
        evasions_are_dropped_or_judged_at_xdp_and_tc_in_ns,
    );
}

fn evasions_are_dropped_or_judged_at_xdp_and_tc_in_ns() {
    let mut k = Loaded::new(&format!("{POLICY}{ALLOW_NORMAL}"));
    // Tiny first fragment: 8 bytes of TCP header, no flags byte (RFC 1858).
    assert_eq!(
        k.both(&syn_fragments(31000, 8, 7)[0], "tiny"),
        XDP_DROP,
        "tiny first fragment"
    );
    // The rest of that header at offset 8 (RFC 3128) and beyond.
    assert_eq!(
        k.both(&syn_fragments(31000, 8, 7)[1], "offset 1"),
        XDP_DROP,
        "TCP fragment at offset 8"
    );
    assert_eq!(
        k.both(&syn_fragments(31000, 16, 7)[1], "offset 2"),
        XDP_DROP,
        "fragment without its first"
    );
    // An allowed datagram in two fragments: the later one follows the first.
    assert_eq!(
        k.both(&syn_fragments(8080, 24, 9)[0], "allowed first"),
        XDP_PASS
    );
    assert_eq!(
        k.both(&syn_fragments(8080, 24, 9)[1], "allowed later"),
        XDP_PASS,
        "later fragment of an allowed datagram"
    );
    assert_eq!(
        k.both(&syn_fragments(8080, 24, 10)[1], "other id"),
        XDP_DROP,
        "a fragment of another datagram"
    );
    // A denied datagram's first fragment, then its later one.
    assert_eq!(
        k.both(&syn_fragments(31000, 24, 11)[0], "denied first"),
        XDP_DROP
    );
    assert_eq!(
        k.both(&syn_fragments(31000, 24, 11)[1], "denied later"),
        XDP_DROP
    );

    // Priority tags: judged through all of them, up to the parser's bound.
    for n in [1, 3, 4, 8] {
        let denied = with_priority_tags(&tcp4(OTHER, WORKER, 31000), n);
        assert_eq!(k.both(&denied, "tags"), XDP_DROP, "{n} tags, denied port");
        let allowed = with_priority_tags(&tcp4(OTHER, WORKER, 8080), n);
        assert_eq!(k.both(&allowed, "tags"), XDP_PASS, "{n} tags, allowed port");
    }
    let malformed = k.reasons()[reason::DROP_MALFORMED as usize];
    let deep = with_priority_tags(&tcp4(OTHER, WORKER, 8080), 9);
    assert_eq!(
        k.both(&deep, "9 tags"),
        XDP_DROP,
        "more tags than the bound"
    );
    assert_eq!(
        k.reasons()[reason::DROP_MALFORMED as usize],
        malformed + 2,
        "counted as malformed at XDP and TC"
    );

    // IPv6 extension chains: judged on the upper layer behind any number
    // the parser walks, dropped beyond it.
    for n in [1, 5, 8] {
        assert_eq!(
            k.both(&ipv6_with_dest_options(&tcp6(31000), n), "ext"),
            XDP_DROP,
            "{n} extension headers, denied port"
        );
        assert_eq!(
            k.both(&ipv6_with_dest_options(&tcp6(8080), n), "ext"),
            XDP_PASS,
            "{n} extension headers, allowed port"
        );
    }
    assert_eq!(
        k.both(&ipv6_with_dest_options(&tcp6(8080), 9), "9 ext"),
        XDP_DROP,
        "a chain longer than the walk"
    );
    // AH is walked like the others (length in 4-octet units).
    let mut ah = tcp6(31000);
    ah.splice(IP6 + 40..IP6 + 40, [6u8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    ah[IP6 + 6] = 51;
    let plen = u16::from_be_bytes([ah[IP6 + 4], ah[IP6 + 5]]) + 12;
    ah[IP6 + 4..IP6 + 6].copy_from_slice(&plen.to_be_bytes());
    assert_eq!(k.both(&ah, "ah"), XDP_DROP, "TCP behind AH");
    // An IPv6 first fragment that stops inside the TCP header (RFC 7112).
    let mut frag6 = tcp6(8080);
    frag6.truncate(IP6 + 40 + 8);
    frag6.splice(IP6 + 40..IP6 + 40, [6u8, 0, 0, 1, 0, 0, 0, 5]);
    frag6[IP6 + 6] = 44;
    frag6[IP6 + 4..IP6 + 6].copy_from_slice(&16u16.to_be_bytes());
    assert_eq!(
        k.both(&frag6, "frag6"),
        XDP_DROP,
        "IPv6 tiny first fragment"
    );
}

/// Conntrack forgeries of the hardening issue, under BPF_PROG_TEST_RUN:
/// an echo request carrying the identifier of the node's own ping, ICMP
/// errors quoting a flow in the wrong direction or a packet it never sent,
/// and a blind RST, against a policy that denies all ICMP before DNAT.
#[test]
fn conntrack_is_not_fooled_by_forged_echoes_errors_or_resets() {
    in_router_ns(
        "conntrack_is_not_fooled_by_forged_echoes_errors_or_resets",
        conntrack_is_not_fooled_by_forged_echoes_errors_or_resets_in_ns,
    );
}

fn conntrack_is_not_fooled_by_forged_echoes_errors_or_resets_in_ns() {
    use filter_agent::dataplane::{conntrack::Flow, live::Live};
    use filter_common::ct;
    use std::net::IpAddr;
    let policy = POLICY.replace("icmp: {type: 8}", "source: {}");
    let mut k = Loaded::new(&policy);
    let ip = |a: [u8; 4]| IpAddr::from(a);
    let flow = |src, dst, proto, sport, dport| Flow {
        src: ip(src),
        dst: ip(dst),
        proto,
        sport,
        dport,
    };
    let dp = k.dp.as_mut().expect("loaded");

    // The node pings OTHER with identifier 77 (its request went out).
    dp.open_flow(&flow(WORKER, OTHER, 1, 77, 77), false, true)
        .expect("record the ping");
    let echo = |request: bool| {
        let mut v = Vec::new();
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(OTHER, WORKER, 64);
        if request {
            b.icmpv4_echo_request(77, 1).write(&mut v, &[])
        } else {
            b.icmpv4_echo_reply(77, 1).write(&mut v, &[])
        }
        .expect("build");
        v
    };
    assert_eq!(
        k.run(&echo(false)),
        XDP_PASS,
        "the reply to the node's ping"
    );
    assert_eq!(
        k.run(&echo(true)),
        XDP_DROP,
        "an inbound request with the node's identifier is a new flow"
    );

    // The node's TCP connection WORKER:40000 -> OTHER:5000, not answered.
    let dp = k.dp.as_mut().expect("loaded");
    dp.open_flow(&flow(WORKER, OTHER, 6, 40000, 5000), false, true)
        .expect("record the connection");
    // A port unreachable sent to `to`, quoting a TCP header `inner_src` ->
    // `inner_dst` with ports `sport` -> `dport`.
    let unreachable =
        |to: [u8; 4], inner_src: [u8; 4], inner_dst: [u8; 4], sport: u16, dport: u16| {
            let mut quoted = Vec::new();
            PacketBuilder::ipv4(inner_src, inner_dst, 64)
                .tcp(sport, dport, 1, 1024)
                .syn()
                .write(&mut quoted, &[])
                .expect("quoted");
            let mut v = Vec::new();
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv4(OTHER, to, 64)
                .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::Port,
                ))
                .write(&mut v, &quoted[..28])
                .expect("build");
            v
        };
    assert_eq!(
        k.run(&unreachable(WORKER, WORKER, OTHER, 40000, 5000)),
        XDP_PASS,
        "an error about the node's own SYN is related"
    );
    assert_eq!(
        k.run(&unreachable(WORKER, OTHER, WORKER, 5000, 40000)),
        XDP_DROP,
        "an error quoting the flow in the other direction, which never sent"
    );
    assert_eq!(
        k.run(&unreachable(LB, WORKER, OTHER, 40000, 5000)),
        XDP_DROP,
        "an error about the flow sent to someone else"
    );

    // An established connection OTHER:41000 -> WORKER:8080; OTHER's side
    // has sent up to 1000 (learned from its next segment at TC ingress).
    let conn = flow(OTHER, WORKER, 6, 41000, 8080);
    let dp = k.dp.as_mut().expect("loaded");
    dp.open_flow(&conn, true, true).expect("record");
    let segment = |seq: u32, rst: bool| {
        let mut v = Vec::new();
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(OTHER, WORKER, 64)
            .tcp(41000, 8080, seq, 1024)
            .ack(5);
        if rst { b.rst() } else { b }
            .write(&mut v, &[])
            .expect("build");
        v
    };
    let tc_in = |k: &mut Loaded, frame: &[u8]| k.tc(frame, true);
    assert_eq!(tc_in(&mut k, &segment(1000, false)), 0, "established");
    let live = Live::open(&k.pin_dir).expect("open the pins");
    let entry = live.flow_entry(&conn).expect("entry");
    assert!(entry.flags & (ct::END_A | ct::END_B) != 0, "{entry:?}");
    assert_eq!(tc_in(&mut k, &segment(1000 + 50_000_000, true)), 0);
    let entry = live.flow_entry(&conn).expect("entry");
    assert_eq!(
        entry.flags & ct::RST,
        0,
        "a blind RST closed the flow: {entry:?}"
    );
    assert_eq!(tc_in(&mut k, &segment(1000, true)), 0);
    let entry = live.flow_entry(&conn).expect("entry");
    assert_ne!(
        entry.flags & ct::RST,
        0,
        "an in-window RST must close it: {entry:?}"
    );
}

/// A flood of new flows cannot evict an assured one (the handshake
/// completed): after 3,000 answered new flows through a 64-entry table, packets of
/// the assured TCP connection to a port pre-DNAT now denies still pass as
/// established, while an answered but unassured UDP flow was evicted and
/// its next packet is judged (and dropped) as new.
#[test]
fn a_flood_of_new_flows_does_not_evict_assured_ones() {
    in_router_ns(
        "a_flood_of_new_flows_does_not_evict_assured_ones",
        a_flood_of_new_flows_does_not_evict_assured_ones_in_ns,
    );
}

fn a_flood_of_new_flows_does_not_evict_assured_ones_in_ns() {
    use filter_agent::dataplane::{conntrack::Flow, live::Live, Options};
    use filter_common::ct;
    let policy = format!(
        "{POLICY}---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: allow-9000}}
spec:
  selector: ibm.role=='worker_public'
  ingress:
  - action: Allow
    protocol: TCP
    destination: {{ports: [9000]}}
"
    );
    let mut k = Loaded::with_options(
        &policy,
        &Options {
            conntrack_size: 64,
            ..Options::default()
        },
    );
    let live = Live::open(&k.pin_dir).expect("open the pins");
    let tcp = tcp_segment;
    let udp = |src, dst, sport, dport| {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut v, b"x")
            .expect("build");
        v
    };
    let flow = |proto, sport| Flow {
        src: OTHER.into(),
        dst: WORKER.into(),
        proto,
        sport,
        dport: 31000,
    };
    // Both flows were allowed before node ports were denied (recorded as
    // the programs record an allowed new flow), then answered.
    let dp = k.dp.as_mut().expect("loaded");
    dp.open_flow(&flow(6, 41000), false, true).expect("tcp");
    dp.open_flow(&flow(17, 42000), false, true).expect("udp");
    assert_eq!(k.tc(&tcp(WORKER, OTHER, 31000, 41000, "synack"), false), 0);
    assert_eq!(k.tc(&udp(WORKER, OTHER, 31000, 42000), false), 0);
    // The opener's ACK completes the handshake: assured.
    assert_eq!(k.tc(&tcp(OTHER, WORKER, 41000, 31000, "ack"), true), 0);
    let assured = live.flow_entry(&flow(6, 41000)).expect("tcp entry");
    assert_ne!(assured.flags & ct::ASSURED, 0, "{assured:?}");
    let udp_entry = live.flow_entry(&flow(17, 42000)).expect("udp entry");
    // Two packets: not assured, unless the flow has meanwhile grown old
    // enough for an answered UDP flow to be (a loaded host can stall a
    // test for the second that takes).
    let age = ct::opened_units(filter_agent::dataplane::conntrack::monotonic_ns())
        .wrapping_sub(udp_entry.opened);
    assert!(
        udp_entry.flags & ct::ASSURED == 0 || age >= ct::ASSURED_AFTER,
        "two packets, {age} units old: not assured: {udp_entry:?}"
    );
    assert_eq!(
        k.run(&udp(OTHER, WORKER, 42000, 31000)),
        XDP_PASS,
        "control"
    );

    // Two-packet flows, as in the attack: each answered, so each is
    // recently used, and the LRU's own ageing alone would evict the others.
    let flooder = [198, 51, 100, 99];
    for port in 0..3000u16 {
        let syn = tcp(flooder, WORKER, 10_000 + port, 9000, "syn");
        assert_eq!(k.tc(&syn, true), 0, "flood SYN {port} allowed");
        let answer = tcp(WORKER, flooder, 9000, 10_000 + port, "synack");
        assert_eq!(k.tc(&answer, false), 0, "flood answer {port}");
    }
    assert_eq!(
        k.run(&tcp(OTHER, WORKER, 41000, 31000, "ack")),
        XDP_PASS,
        "the assured connection survived the flood"
    );
    assert!(live.flow_entry(&flow(17, 42000)).is_none(), "evicted");
    assert_eq!(
        k.run(&udp(OTHER, WORKER, 42000, 31000)),
        XDP_DROP,
        "the evicted unassured flow is judged as new"
    );
}

/// Runs the privileged test `test`'s `body` in a namespace with a router's
/// FIB (WORKER's addresses local, the rest routed on): the TC programs ask
/// the FIB whether a packet is for the node.
fn in_router_ns(test: &str, body: fn()) {
    if !privileged(test) {
        return;
    }
    let ns = filter_tests::router_netns("fwkr", "198.51.100.1", "2001:db8::1");
    ns.run(body);
}

/// The property of the hardening issue: every random frame (VLAN stacks,
/// IPv4 options and fragments, IPv6 extension chains, truncations) is,
/// at XDP and at TC ingress, either dropped or judged on what the kernel's
/// stack would deliver from it (`frames::kernel_view`): never passed when
/// that is a denied port or cannot be known, and (liveness) never dropped
/// when it is well formed, within the parser's bounds and allowed.
#[test]
fn random_frames_are_dropped_or_judged_on_what_the_kernel_delivers() {
    in_router_ns(
        "random_frames_are_dropped_or_judged_on_what_the_kernel_delivers",
        random_frames_in_ns,
    );
}

fn random_frames_in_ns() {
    use frames::View;
    let mut k = Loaded::new(&format!("{POLICY}{ALLOW_NORMAL}"));
    // POLICY's pre-DNAT rules for a packet from 198.51.100.20 to the node.
    let denied = |proto: u8, dport: u16| match proto {
        6 | 17 => (30000..=32767).contains(&dport),
        1 => dport >> 8 == 8,
        _ => false,
    };
    let seed = std::env::var("FILTER_FRAMES_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00f4_a3e5_u64);
    let mut rng = Rng(seed);
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    for i in 0..6000 {
        let f = frames::random(&mut rng);
        let view = frames::kernel_view(&f.bytes);
        let xdp = k.run(&f.bytes) == XDP_PASS;
        let mut hooks = vec![("XDP", xdp)];
        if !frames::cut_in_ip_header(&f.bytes) {
            hooks.push(("TC", k.tc(&f.bytes, true) == 0));
        }
        for (hook, passed) in hooks {
            let what = || {
                format!(
                    "frame {i} (seed {seed:#x}) at {hook}: {view:?} {:02x?}",
                    f.bytes
                )
            };
            match view {
                View::Ambiguous => assert!(
                    !passed,
                    "passed a first fragment without the fields policy reads: {}",
                    what()
                ),
                View::Delivered { proto, dport } => {
                    if passed {
                        assert!(!denied(proto, dport), "passed a denied port: {}", what());
                    } else if f.within_bounds {
                        assert!(
                            denied(proto, dport),
                            "dropped an allowed, well-formed frame: {}",
                            what()
                        );
                    }
                }
                View::Nothing => {}
            }
        }
        let kind = match (view, xdp) {
            (View::Nothing, _) => "not delivered",
            (View::Ambiguous, _) => "ambiguous first fragment",
            (View::Delivered { .. }, true) => "delivered, passed",
            (View::Delivered { .. }, false) => "delivered, dropped",
        };
        *seen.entry(kind).or_default() += 1;
    }
    // The generator must reach every case, or the property proves little.
    for kind in [
        "not delivered",
        "ambiguous first fragment",
        "delivered, passed",
        "delivered, dropped",
    ] {
        assert!(
            seen.get(kind).copied().unwrap_or(0) >= 50,
            "{kind}: {seen:?}"
        );
    }
}

/// An untracked Log rule for TCP to port 7000 (every packet of it is
/// logged: no conntrack).
const LOG_UNTRACKED_7000: &str = r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: log-untracked}
spec:
  doNotTrack: true
  applyOnForward: true
  selector: ibm.role=='worker_public'
  ingress:
  - action: Log
    protocol: TCP
    destination: {ports: [7000]}
"#;

/// A flood of packets an untracked Log rule matches (every packet of it,
/// no conntrack): the rule's records stay within its rate and burst, and
/// every matched packet is counted once, as emitted, rate-limited or lost
/// (nothing drains the ring buffer here, so without a limit it fills).
#[test]
fn a_flood_of_logged_packets_is_rate_limited_and_every_packet_counted() {
    if !privileged("a_flood_of_logged_packets_is_rate_limited_and_every_packet_counted") {
        return;
    }
    use filter_agent::dataplane::Rate;
    let policy = format!("{TEST_HEP}{LOG_UNTRACKED_7000}");
    let mut l = Loaded::new(&policy);
    let slot = l.log_slot("log-untracked", 0);
    let dp = l.dp.as_mut().expect("loaded");
    let frame = tcp4(CLIENT, WORKER, 7000);
    const N: u32 = 100_000;

    // 10 a second, 5 at once.
    let rate = Rate::parse("10/second", 5).expect("rate");
    dp.set_log_config(rate, false).expect("set the rate");
    let (action, mean) = dp.time_xdp(&frame, LO, N, false).expect("test run");
    assert_eq!(action, XDP_PASS, "a Log rule decides nothing");
    let took = mean * N;
    let c = dp.log_counts(slot).expect("log counters");
    assert_eq!(c.emitted + c.limited + c.lost, u64::from(N), "{c:?}");
    let allowed = 5 + (took.as_secs_f64() * 10.0).ceil() as u64 + 1;
    assert!(
        c.emitted >= 5 && c.emitted <= allowed,
        "{c:?}: at most {allowed} in {took:?}"
    );

    // No limit: the ring buffer fills, the rest is lost, all counted.
    dp.set_log_config(
        Rate {
            interval: None,
            burst: 5,
        },
        false,
    )
    .expect("no limit");
    dp.time_xdp(&frame, LO, N, false).expect("test run");
    let after = dp.log_counts(slot).expect("log counters");
    let (emitted, lost) = (after.emitted - c.emitted, after.lost - c.lost);
    assert_eq!(emitted + lost, u64::from(N), "{after:?}");
    assert!(
        lost > 0 && emitted > 1000,
        "{after:?}: the ring held some, lost the rest"
    );
}

/// `--log-ring-size`: the ring buffer is created with the size asked for
/// (a full one loses records, counted), and an agent that adopts it keeps
/// its size whatever it asks (as it keeps the conntrack table's).
#[test]
fn the_log_ring_has_the_size_asked_for_and_an_adopted_one_keeps_it() {
    if !privileged("the_log_ring_has_the_size_asked_for_and_an_adopted_one_keeps_it") {
        return;
    }
    use filter_agent::dataplane::{ring_bytes, Options, Rate};
    let policy = format!("{TEST_HEP}{LOG_UNTRACKED_7000}");
    let small = ring_bytes("4KiB").expect("size");
    let mut l = Loaded::with_options(
        &policy,
        &Options {
            log_ring_bytes: small,
            ..Options::default()
        },
    );
    let slot = l.log_slot("log-untracked", 0);
    let dp = l.dp.as_mut().expect("loaded");
    assert_eq!(dp.log_ring_bytes(), 4096);
    let unlimited = Rate {
        interval: None,
        burst: 5,
    };
    dp.set_log_config(unlimited, false).expect("no limit");
    dp.time_xdp(&tcp4(CLIENT, WORKER, 7000), LO, 100, false)
        .expect("test run");
    let c = dp.log_counts(slot).expect("log counters");
    // A record takes its 296 bytes and the ring's 8-byte header: 13 fit
    // in 4096 bytes.
    let fit = 4096 / (std::mem::size_of::<filter_common::events::Record>() as u64 + 8);
    assert_eq!((c.emitted, c.lost), (fit, 100 - fit), "{c:?}");

    // Conntrack likewise (asked 64 entries now, created with the default).
    let asked = Options {
        conntrack_size: 64,
        ..Options::default()
    };
    let adopter = Dataplane::load_with(&l.pin_dir, &asked).expect("adopt");
    assert_eq!(
        adopter.log_ring_bytes(),
        4096,
        "the adopted ring keeps its size"
    );
    assert_eq!(
        adopter.conntrack_capacity(),
        filter_common::ct::DEFAULT_SIZE,
        "the adopted conntrack table keeps its size"
    );
}

/// Collects the kernel programs' diagnostics (aya-log) for a test.
#[derive(Clone, Default)]
struct Collect(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Collect {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let line = format!("{} {}", record.level(), record.args());
        self.0.lock().expect("lock").push(line);
    }
    fn flush(&self) {}
}

/// `--kernel-log-level`: off by default, where the verifier removes the
/// diagnostics from the programs (they translate to fewer instructions);
/// on, tables the classifier finds inconsistent are reported once (per
/// second and CPU) however many packets meet them, and every one of those
/// packets is still counted under `table_error`.
#[test]
fn kernel_diagnostics_are_off_by_default_and_report_inconsistent_tables_once() {
    if !privileged("kernel_diagnostics_are_off_by_default_and_report_inconsistent_tables_once") {
        return;
    }
    use filter_agent::dataplane::{KernelLogLevel, Options};
    use filter_common::names;
    let policy = format!("{POLICY}{ALLOW_NORMAL}");
    let mut seen = Vec::new();
    for level in [KernelLogLevel::Off, KernelLogLevel::Error] {
        let mut l = Loaded::with_options(
            &policy,
            &Options {
                kernel_log: level,
                ..Options::default()
            },
        );
        let pin = |name: &str| l.pin_dir.join(name).display().to_string();
        let show = filter_tests::sh(
            "bpftool",
            &["prog", "show", "pinned", &pin(names::PROG_XDP), "--json"],
        );
        let info: serde_json::Value = serde_json::from_str(&show).expect("bpftool json");
        let xlated = info["bytes_xlated"].as_u64().expect("bytes_xlated");
        filter_tests::break_generation(&l.pin_dir);
        let before = l.reasons()[reason::PASS_TABLE_ERROR as usize];
        let messages = Collect::default();
        let dp = l.dp.as_mut().expect("loaded");
        let mut logger = dp.take_kernel_log(messages.clone()).expect("aya-log ring");
        let (action, _) = dp
            .time_xdp(&tcp4(CLIENT, WORKER, 7000), LO, 1000, false)
            .expect("test run");
        assert_eq!(action, XDP_PASS, "{level:?}: unjudged packets pass");
        logger.flush();
        let after = l.reasons()[reason::PASS_TABLE_ERROR as usize];
        assert_eq!(after - before, 1000, "{level:?}: every packet counted");
        let got = messages.0.lock().expect("lock").clone();
        seen.push((level, xlated, got));
    }
    let (off, on) = (&seen[0], &seen[1]);
    assert!(off.2.is_empty(), "off, yet: {:?}", off.2);
    assert_eq!(on.2.len(), 1, "once a second per CPU: {:?}", on.2);
    assert!(
        on.2[0].starts_with("ERROR classifier tables inconsistent in stage 0 direction 0"),
        "{:?}",
        on.2
    );
    assert!(
        off.1 < on.1,
        "at level off the verifier removes the diagnostics: {} vs {} bytes",
        off.1,
        on.1
    );
}

/// A Log rule writes a record only where evaluation reaches it: not after a
/// rule that decided, not in a tier a Pass skipped; and every packet in the
/// untracked stage.
#[test]
fn log_rules_record_only_where_evaluation_reaches_them() {
    if !privileged("log_rules_record_only_where_evaluation_reaches_them") {
        return;
    }
    let policy = format!(
        "{TEST_HEP}{}",
        r#"
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: first}
spec: {order: 10}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: first.pass-7001}
spec:
  tier: first
  order: 1
  doNotTrack: true
  applyOnForward: true
  selector: ibm.role=='worker_public'
  ingress:
  - action: Pass
    protocol: TCP
    destination: {ports: [7001]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: first.log-skipped}
spec:
  tier: first
  order: 2
  doNotTrack: true
  applyOnForward: true
  selector: ibm.role=='worker_public'
  ingress:
  - action: Log
    protocol: TCP
    destination: {ports: [7001]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: allow-then-log}
spec:
  order: 1
  doNotTrack: true
  applyOnForward: true
  selector: ibm.role=='worker_public'
  ingress:
  - action: Allow
    protocol: TCP
    destination: {ports: [7000]}
  - action: Log
    protocol: TCP
    destination: {ports: [7000]}
  - action: Log
    protocol: TCP
    destination: {ports: [7002]}
"#
    );
    let mut l = Loaded::new(&policy);
    let (after_allow, skipped, reached) = (
        l.log_slot("allow-then-log", 1),
        l.log_slot("first.log-skipped", 0),
        l.log_slot("allow-then-log", 2),
    );
    let dp = l.dp.as_mut().expect("loaded");
    dp.set_log_config(
        filter_agent::dataplane::Rate {
            interval: None,
            burst: 1,
        },
        false,
    )
    .expect("no limit");
    for port in [7000, 7001, 7002] {
        for _ in 0..3 {
            dp.test_run_xdp(&tcp4(CLIENT, WORKER, port), LO)
                .expect("BPF_PROG_TEST_RUN");
        }
    }
    let mut emitted = |slot| dp.log_counts(slot).expect("log counters").emitted;
    assert_eq!(
        emitted(after_allow),
        0,
        "a Log rule after the deciding Allow"
    );
    assert_eq!(emitted(skipped), 0, "a Log rule in a tier a Pass left");
    assert_eq!(emitted(reached), 3, "one record per untracked packet");
}

/// `--max-prefixes`: a policy with more host addresses (or other prefixes)
/// in one field than half the address tables hold is refused before
/// anything is written, naming the count, the limit and the flag; the
/// live policy stays enforced. An adopter keeps the tables' size.
#[test]
fn a_policy_past_the_prefix_capacity_is_refused_and_the_live_one_stays() {
    if !privileged("a_policy_past_the_prefix_capacity_is_refused_and_the_live_one_stays") {
        return;
    }
    use filter_agent::dataplane::Options;
    let deny = |n: u8| {
        let nets: Vec<String> = (1..=n).map(|i| format!("192.0.2.{i}")).collect();
        format!(
            "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {{name: test-hep, labels: {{r: x}}}}\nspec: {{node: kernel-test, interfaceName: lo}}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: deny-list}}\nspec:\n  preDNAT: true\n  applyOnForward: true\n  ingress:\n  - action: Deny\n    source: {{nets: [{}]}}\n",
            nets.join(", ")
        )
    };
    let small = Options {
        prefix_capacity: 64,
        ..Options::default()
    };
    let mut k = Loaded::with_options(&deny(32), &small);
    assert_eq!(k.run(&tcp4([192, 0, 2, 32], WORKER, 80)), XDP_DROP);
    assert_eq!(k.run(&tcp4([192, 0, 2, 33], WORKER, 80)), XDP_PASS);
    let err = k
        .try_publish(&kernel_test_policy(&deny(33)))
        .expect_err("33 > 32");
    assert!(
        err.to_string().contains(
            "33 IPv4 source host addresses over all tables; the kernel tables hold 32 per policy (--max-prefixes 64"
        ),
        "{err}"
    );
    assert_eq!(
        k.run(&tcp4([192, 0, 2, 33], WORKER, 80)),
        XDP_PASS,
        "the live policy stays"
    );
    assert_eq!(k.run(&tcp4([192, 0, 2, 1], WORKER, 80)), XDP_DROP);
    let adopter = Dataplane::load_with(&k.pin_dir, &Options::default()).expect("adopt");
    assert_eq!(
        adopter.prefix_capacity(),
        64,
        "adopted tables keep their size"
    );
}

/// A rule's counter counts from when the generation that put the rule in
/// its slot went live: publishing zeroes the slots it writes, on every
/// CPU (in one batched write), so a slot reused two policies later starts
/// again at zero.
#[test]
fn a_rule_counter_starts_at_zero_each_time_its_slot_is_reused() {
    if !privileged("a_rule_counter_starts_at_zero_each_time_its_slot_is_reused") {
        return;
    }
    use filter_agent::dataplane::PinnedCounters;
    let policy = "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: test-hep, labels: {r: x}}\nspec: {node: kernel-test, interfaceName: lo}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: deny-one}\nspec:\n  preDNAT: true\n  applyOnForward: true\n  ingress:\n  - action: Deny\n    source: {nets: [192.0.2.7/32]}\n";
    let mut k = Loaded::new(policy);
    let slot = |k: &Loaded| {
        let (compiled, generation) = k.published.as_ref().expect("published");
        filter_agent::state::state(compiled, *generation, &[])
            .rules
            .iter()
            .find(|r| r.policy.as_deref() == Some("deny-one") && r.rule == Some(0))
            .expect("the deny rule")
            .slot
    };
    let first = slot(&k);
    let counters = PinnedCounters::open(&k.pin_dir).expect("open the counters");
    for _ in 0..5 {
        assert_eq!(k.run(&tcp4([192, 0, 2, 7], WORKER, 80)), XDP_DROP);
    }
    assert_eq!(counters.rule(first).expect("read").packets, 5);
    k.publish(policy);
    assert_ne!(slot(&k), first, "the other generation's slot");
    k.publish(policy);
    assert_eq!(slot(&k), first, "the first generation's slot again");
    assert_eq!(
        counters.rule(first).expect("read").packets,
        0,
        "zeroed when its generation was written"
    );
    for _ in 0..2 {
        assert_eq!(k.run(&tcp4([192, 0, 2, 7], WORKER, 80)), XDP_DROP);
    }
    assert_eq!(counters.rule(first).expect("read").packets, 2);
}

/// Conntrack's presence filter never hides a live flow: flows the kernel
/// opened in each epoch, between sweeps that flip it, all pass a pre-DNAT
/// Deny added after them as established, while a new flow is denied.
#[test]
fn the_conntrack_presence_filter_keeps_every_live_flow() {
    in_router_ns(
        "the_conntrack_presence_filter_keeps_every_live_flow",
        the_conntrack_presence_filter_keeps_every_live_flow_in_ns,
    );
}

fn the_conntrack_presence_filter_keeps_every_live_flow_in_ns() {
    let hep = format!(
        "{TEST_HEP}
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: allow-9000}}
spec:
  selector: ibm.role=='worker_public'
  ingress:
  - action: Allow
    protocol: TCP
    destination: {{ports: [9000]}}
  egress:
  - action: Allow
"
    );
    let deny = format!(
        "{hep}---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: deny-9000}}
spec:
  applyOnForward: true
  preDNAT: true
  selector: ibm.role=='worker_public'
  ingress:
  - action: Deny
    protocol: TCP
    destination: {{ports: [9000]}}
"
    );
    let mut k = Loaded::new(&hep);
    let tcp = tcp_segment;
    // A connection the programs open and the node answers.
    let open = |k: &mut Loaded, sport: u16| {
        assert_eq!(k.tc(&tcp(OTHER, WORKER, sport, 9000, "syn"), true), 0);
        assert_eq!(k.tc(&tcp(WORKER, OTHER, 9000, sport, "synack"), false), 0);
    };
    let sweep = |k: &mut Loaded| {
        k.dp.as_mut()
            .expect("loaded")
            .sweep_conntrack()
            .expect("sweep");
    };
    // Loading started the filter: epoch 2, enabled.
    open(&mut k, 40001); // marked 2
    sweep(&mut k); // walks, marks 3, flips
    open(&mut k, 40002); // marked 3
    sweep(&mut k); // marks 4
    open(&mut k, 40003); // marked 4
    sweep(&mut k); // marks 5
    open(&mut k, 40004); // marked 5
    sweep(&mut k); // marks 6
    open(&mut k, 40005); // marked 6: only the kernel's mark
    k.publish(&deny);
    for sport in 40001..=40005 {
        assert_eq!(
            k.run(&tcp(OTHER, WORKER, sport, 9000, "ack")),
            XDP_PASS,
            "flow from port {sport} is established"
        );
    }
    assert_eq!(
        k.run(&tcp(OTHER, WORKER, 40006, 9000, "syn")),
        XDP_DROP,
        "a new flow meets the Deny"
    );
}

/// A map an earlier agent pinned under a name whose layout version has
/// been bumped since (the presence filter's `FW_CTSEEN1`) is unpinned when
/// the dataplane loads, and the maps of this layout stay pinned: nothing
/// would read the old one, and its pin would keep its memory.
#[test]
fn pins_of_maps_of_an_earlier_layout_are_removed_at_load() {
    if !privileged("pins_of_maps_of_an_earlier_layout_are_removed_at_load") {
        return;
    }
    let pin_dir = Path::new("/sys/fs/bpf").join(unique("fwretired"));
    // Removed with the directory by `Loaded`'s drop, whatever happens.
    let mut k = Loaded::at(pin_dir.clone(), None);
    std::fs::create_dir_all(&pin_dir).expect("create the pin directory");
    let retired = pin_dir.join("FW_CTSEEN1");
    pin_array(&retired, "FW_CTSEEN1", 1);
    assert!(retired.exists());
    k.dp = Some(Dataplane::load(&pin_dir).expect("load"));
    assert!(!retired.exists(), "the retired map's pin is gone");
    for name in filter_common::names::MAPS {
        assert!(pin_dir.join(name).exists(), "{name} is pinned");
    }
}

/// A change is a patch: the generation it goes into holds the policy
/// before the live one, and only what differs is written. With 200 deny
/// rules over 2,000 sources loaded, turning the last rule from Deny to
/// Allow writes one entry (its rule's metadata) and the packet it decides
/// passes; turning it back writes one again. A list of other sources
/// replaces every address entry.
#[test]
fn a_one_rule_change_writes_only_the_entries_that_differ() {
    if !privileged("a_one_rule_change_writes_only_the_entries_that_differ") {
        return;
    }
    use std::fmt::Write as _;
    // 200 rules of 10 sources each in 10.<list>.0.0/16, then the last rule.
    let policy = |last: &str, list: u8| {
        let mut y = String::from("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: test-hep, labels: {r: x}}\nspec: {node: kernel-test, interfaceName: lo}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: list}\nspec:\n  preDNAT: true\n  applyOnForward: true\n  ingress:\n");
        for r in 0..200u32 {
            let nets: Vec<String> = (0..10).map(|i| format!("10.{list}.{r}.{i}/32")).collect();
            let _ = writeln!(
                y,
                "  - action: Deny\n    protocol: TCP\n    source: {{nets: [{}]}}\n    destination: {{ports: [{}]}}",
                nets.join(", "),
                1000 + r
            );
        }
        let _ = writeln!(
            y,
            "  - action: {last}\n    source: {{nets: [192.0.2.7/32]}}"
        );
        y
    };
    let changed = |k: &Loaded| k.dp.as_ref().expect("loaded").last_publish().changed;
    let probe = tcp4([192, 0, 2, 7], WORKER, 80);
    let listed = tcp4([10, 0, 5, 3], WORKER, 1005);
    // Generation 0, then 1: neither known yet, so both written whole.
    let mut k = Loaded::new(&policy("Deny", 0));
    k.publish(&policy("Deny", 1));
    assert!(
        changed(&k) > 2000,
        "a generation not known is written whole"
    );
    assert_eq!(k.run(&probe), XDP_DROP);
    // Generation 0 again, which holds the first policy.
    k.publish(&policy("Allow", 0));
    assert_eq!(changed(&k), 1, "only the last rule's metadata");
    assert_eq!(k.run(&probe), XDP_PASS, "the changed rule is enforced");
    assert_eq!(k.run(&listed), XDP_DROP, "the rest stays");
    // Generation 1 holds list 1: list 2 replaces its 2,000 sources.
    k.publish(&policy("Allow", 2));
    assert!(
        changed(&k) >= 4000,
        "{} entries: 2,000 stale sources out, 2,000 new in",
        changed(&k)
    );
    assert_eq!(k.run(&listed), XDP_PASS, "list 0 is gone");
    assert_eq!(k.run(&tcp4([10, 2, 5, 3], WORKER, 1005)), XDP_DROP);
    // Generation 0 holds list 0 with the last rule allowing.
    k.publish(&policy("Deny", 0));
    assert_eq!(changed(&k), 1);
    assert_eq!(k.run(&probe), XDP_DROP);
    assert_eq!(k.run(&listed), XDP_DROP);
}

/// Pins at `pin` a new array map named `name` of four entries of
/// `value_size` bytes, as another program (or an earlier agent) would
/// leave one.
fn pin_array(pin: &Path, name: &str, value_size: u32) {
    let made = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(pin)
        .args(["type", "array", "key", "4", "value"])
        .arg(value_size.to_string())
        .args(["entries", "4", "name", name])
        .status()
        .expect("run bpftool");
    assert!(made.success(), "bpftool map create {name}");
}

/// `max_entries` of the map pinned at `pin`, as bpftool reports it.
fn pinned_entries(pin: &Path) -> u64 {
    let out = sh(
        "bpftool",
        &["-j", "map", "show", "pinned", &pin.to_string_lossy()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("bpftool's JSON");
    v["max_entries"].as_u64().expect("max_entries")
}

/// A policy of `n` pre-DNAT rules, each denying TCP from a /24 of its own
/// (10.i.j.0/24: none of the probes'), so each source is a class of its
/// own; then a deny of port `denied`.
fn many_classes(n: u32, denied: u16) -> String {
    let mut text = format!(
        "{TEST_HEP}
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: many}}
spec:
  preDNAT: true
  applyOnForward: true
  selector: ibm.role=='worker_public'
  ingress:
"
    );
    for i in 0..n {
        let net = std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8));
        text += &format!("  - {{action: Deny, protocol: TCP, source: {{nets: [{net}/24]}}}}\n");
    }
    text += &format!("  - {{action: Deny, protocol: TCP, destination: {{ports: [{denied}]}}}}\n");
    text
}

/// The sized maps follow the policy: loaded at the least room, a small
/// policy keeps it; 2,000 classes grow the class arrays past their room;
/// a small policy after that keeps them (less than eight times too big);
/// 40,000 host sources grow the IPv4 source table and, as every move sizes
/// every map to its policy, take the class arrays back to the least; a
/// small policy keeps it (16 bytes an entry); 40,000 IPv6 sources grow
/// their hash and a small policy then shrinks it (more than eight times
/// too big);
/// 300 single ports grow the port hash. Each move loads new programs with
/// new maps, and each policy is enforced whole after it: the one before
/// denied 7000, the next 7001, a source of the big list is denied. The
/// pins name the maps in use; none is left at a staging pin, and one left
/// there by a resize that did not finish goes at the next load. An
/// adopter keeps the maps' size. Loaded with the largest room asked for
/// (as `fw-bench` is), a small policy keeps it.
#[test]
fn the_sized_maps_follow_the_policy_up_and_down() {
    if !privileged("the_sized_maps_follow_the_policy_up_and_down") {
        return;
    }
    use filter_agent::dataplane::{host_map_entries, Options, Room};
    let mut k = Loaded::new(&many_classes(0, 7000));
    let heads = |k: &Loaded| pinned_entries(&k.pin_dir.join(filter_common::names::MAP_CLASS));
    let words = |k: &Loaded| pinned_entries(&k.pin_dir.join(filter_common::names::MAP_CLASS_WORDS));
    let room = |k: &Loaded| k.dp.as_ref().expect("loaded").room();
    let hosts =
        |k: &Loaded| pinned_entries(&k.pin_dir.join(filter_common::names::MAP_SRC_V4_EXACT));
    assert_eq!(room(&k), Room::MIN);
    assert_eq!(heads(&k), 2 * u64::from(Room::MIN.heads));
    assert_eq!(words(&k), 2 * u64::from(Room::MIN.words));
    // (The IPv4 host table's entries are buckets of seven.)
    let buckets = |hosts: u32| u64::from(host_map_entries(0, hosts));
    assert_eq!(hosts(&k), buckets(Room::MIN.hosts[0]));
    assert_eq!(k.run(&tcp4([192, 0, 2, 9], WORKER, 7000)), XDP_DROP);
    assert_eq!(k.run(&tcp4([192, 0, 2, 9], WORKER, 7001)), XDP_PASS);

    k.publish(&many_classes(2000, 7001));
    let grown = room(&k);
    assert_eq!(
        grown.heads, 4096,
        "2,000 classes and more: twice, rounded up"
    );
    assert_eq!(heads(&k), 2 * u64::from(grown.heads));
    assert_eq!(words(&k), 2 * u64::from(grown.words));
    assert_eq!(k.run(&tcp4([192, 0, 2, 9], WORKER, 7000)), XDP_PASS);
    assert_eq!(k.run(&tcp4([192, 0, 2, 9], WORKER, 7001)), XDP_DROP);
    assert_eq!(
        k.run(&tcp4([10, 7, 207, 1], WORKER, 80)),
        XDP_DROP,
        "rule 1999's source"
    );
    assert_eq!(k.run(&tcp4([10, 7, 208, 1], WORKER, 80)), XDP_PASS);

    k.publish(&many_classes(0, 7000));
    assert_eq!(room(&k), grown, "not eight times too big: kept");
    assert_eq!(k.run(&tcp4([192, 0, 2, 9], WORKER, 7000)), XDP_DROP);
    assert_eq!(k.run(&tcp4([10, 7, 207, 1], WORKER, 80)), XDP_PASS);

    // 40,000 host sources: the IPv4 source table grows (to half of
    // --max-prefixes' default); a move sizes every map to the policy, so
    // the class arrays go back to the least.
    k.publish(&deny_list(0, 40_000));
    let listed = room(&k);
    assert_eq!(listed.hosts, [131_072, 1024, 1024, 1024]);
    assert_eq!(
        (listed.heads, listed.words),
        (Room::MIN.heads, Room::MIN.words)
    );
    assert_eq!(heads(&k), 2 * u64::from(Room::MIN.heads));
    assert_eq!(hosts(&k), buckets(131_072));
    let source = |i: u32| (0x0a00_0000 + i).to_be_bytes();
    assert_eq!(k.run(&tcp4(source(39_999), WORKER, 80)), XDP_DROP);
    assert_eq!(k.run(&tcp4(source(40_000), WORKER, 80)), XDP_PASS);
    assert_eq!(k.run(&tcp4([192, 0, 2, 9], WORKER, 7000)), XDP_PASS);

    // The IPv4 host table takes 16 bytes an entry (4 MiB here): not
    // eight times the least room, so kept.
    k.publish(&many_classes(0, 7000));
    assert_eq!(room(&k), listed, "not eight times too big: kept");
    assert_eq!(k.run(&tcp4(source(39_999), WORKER, 80)), XDP_PASS);
    assert_eq!(k.run(&tcp4([192, 0, 2, 9], WORKER, 7000)), XDP_DROP);

    // 40,000 IPv6 host sources, 104 bytes an entry in their hash: grown,
    // then shrunk by the small policy.
    let nets6: Vec<String> = std::iter::once(std::net::Ipv6Addr::from(CLIENT6))
        .chain((1..40_000u128).map(|i| std::net::Ipv6Addr::from((0x2001_0db8_0009u128 << 80) + i)))
        .map(|a| format!("{a}/128"))
        .collect();
    let list6 = deny_list(0, 0).replace("nets: []", &format!("nets: [{}]", nets6.join(", ")));
    k.publish(&list6);
    assert_eq!(room(&k).hosts[2], 131_072);
    assert_eq!(k.run(&tcp6(80)), XDP_DROP);
    k.publish(&many_classes(0, 7000));
    assert_eq!(room(&k), Room::MIN, "more than eight times too big: shrunk");
    assert_eq!(hosts(&k), buckets(Room::MIN.hosts[0]));
    assert_eq!(k.run(&tcp6(80)), XDP_PASS);
    assert_eq!(k.run(&tcp4([192, 0, 2, 9], WORKER, 7000)), XDP_DROP);

    // 300 single destination ports: the port hash grows.
    let ports: Vec<String> = (1..=300).map(|p| p.to_string()).collect();
    let policy = format!(
        "{TEST_HEP}\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: ports}}\nspec:\n  preDNAT: true\n  applyOnForward: true\n  selector: ibm.role=='worker_public'\n  ingress:\n  - action: Deny\n    protocol: TCP\n    destination: {{ports: [{}]}}\n",
        ports.join(", ")
    );
    k.publish(&policy);
    let ported = room(&k);
    assert_eq!(ported.ports, [1024, Room::MIN.ports[1]]);
    let port_pin = k.pin_dir.join(filter_common::names::MAP_PORT_EXACT);
    assert_eq!(pinned_entries(&port_pin), 2 * 1024);
    assert_eq!(k.run(&tcp4([192, 0, 2, 9], WORKER, 300)), XDP_DROP);
    assert_eq!(k.run(&tcp4([192, 0, 2, 9], WORKER, 301)), XDP_PASS);

    let staging = staging_pins(&k.pin_dir);
    assert!(staging.is_empty(), "{staging:?}");
    let left = k.pin_dir.join("new_FW_WORD1");
    pin_array(&left, "FW_WORD1", 8);
    let adopter = Dataplane::load_with(&k.pin_dir, &Options::default()).expect("adopt");
    assert_eq!(adopter.room(), ported, "adopted maps keep their size");
    assert!(!left.exists(), "a staging pin is gone at load");
    drop(adopter);
    drop(k);

    let largest = Options {
        room: Room::MAX,
        ..Options::default()
    };
    let k = Loaded::with_options(&many_classes(0, 7000), &largest);
    let most = Room {
        hosts: [filter_common::MAX_TRIE_ENTRIES / 2; 4],
        ..Room::MAX
    };
    assert_eq!(room(&k), most, "the least asked for is kept");
}

/// The value of the one-entry `u32` array pinned at `pin` (the generation
/// word), read by bpftool.
fn pinned_word(pin: &Path) -> u32 {
    let out = sh(
        "bpftool",
        &["-j", "map", "dump", "pinned", &pin.to_string_lossy()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("bpftool's JSON");
    let bytes: Vec<u8> = v[0]["value"]
        .as_array()
        .expect("value bytes")
        .iter()
        .map(|b| {
            let hex = b.as_str().expect("a hex byte");
            u8::from_str_radix(hex.trim_start_matches("0x"), 16).expect("hex")
        })
        .collect();
    u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"))
}

/// An upgrade whose object bumped a sized map's layout (its name's
/// version): the running programs read a generation word of their own, so
/// the new agent's first publish, into maps and a word of its own, leaves
/// them their policy until its programs take the links; then its pins are
/// in place, and the running programs' map of the earlier layout is
/// unpinned.
#[test]
fn an_upgrade_that_bumps_a_sized_map_flips_nothing_under_the_running_programs() {
    if !privileged("an_upgrade_that_bumps_a_sized_map_flips_nothing_under_the_running_programs") {
        return;
    }
    // Its programs are attached to the namespace's `lo`.
    let ns = filter_tests::Netns::new(&unique("fwkup"));
    ns.ip(&["link", "set", "lo", "up"]);
    ns.run(upgrade_that_bumps_a_sized_map);
}

/// A dataplane with [`many_classes`]`(0, 7000)` published whose IPv4
/// source hash is pinned under an earlier layout's name, and one loaded
/// beside it; and the running programs' generation.
fn staged_pair() -> (Loaded, Loaded, u32) {
    use filter_agent::dataplane::Options;
    use filter_common::names;
    let old = Loaded::new(&many_classes(0, 7000));
    let dir = old.pin_dir.clone();
    let running = pinned_word(&dir.join(names::MAP_GENERATION));
    // The running agent's object named its IPv4 source hash otherwise.
    let earlier = dir.join("FW_SRC4X1");
    std::fs::rename(dir.join(names::MAP_SRC_V4_EXACT), &earlier).expect("rename the pin");
    let dp = Dataplane::load_with(&dir, &Options::default()).expect("adopt");
    let new = Loaded::at(dir.clone(), Some(dp));
    assert!(
        !earlier.exists(),
        "the map of the earlier layout is unpinned"
    );
    assert!(dir.join(format!("new_{}", names::MAP_GENERATION)).exists());
    assert!(dir
        .join(format!("new_{}", names::MAP_SRC_V4_EXACT))
        .exists());
    (old, new, running)
}

/// The names of `dir`'s staging pins.
fn staging_pins(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("pins")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("new_"))
        .collect()
}

fn upgrade_that_bumps_a_sized_map() {
    use filter_agent::dataplane::{Options, Room};
    use filter_common::names;
    let (mut old, mut new, running) = staged_pair();
    let dir = old.pin_dir.clone();
    let source = [10, 0, 0, 1];
    new.publish(&deny_list(0, 3));
    assert_eq!(new.run(&tcp4(source, WORKER, 80)), XDP_DROP);
    assert_eq!(new.run(&tcp4([192, 0, 2, 9], WORKER, 7000)), XDP_PASS);
    assert_eq!(
        old.run(&tcp4([192, 0, 2, 9], WORKER, 7000)),
        XDP_DROP,
        "the running programs keep their policy"
    );
    assert_eq!(old.run(&tcp4(source, WORKER, 80)), XDP_PASS);
    assert_eq!(
        pinned_word(&dir.join(names::MAP_GENERATION)),
        running,
        "the running programs' word is not flipped"
    );

    // Taking the links (the namespace's `lo`) puts the new pins in place.
    let compiled = kernel_test_policy(&deny_list(0, 3));
    let ifaces: Interfaces = [("lo".to_string(), LO)].into();
    let dp = new.dp.as_mut().expect("loaded");
    let live = dp.apply(&compiled, &ifaces).expect("apply");
    assert!(staging_pins(&dir).is_empty(), "{:?}", staging_pins(&dir));
    assert_eq!(pinned_word(&dir.join(names::MAP_GENERATION)), live);
    let room = new.dp.as_ref().expect("loaded").room();
    let adopter = Dataplane::load_with(&dir, &Options::default()).expect("adopt again");
    assert_eq!(adopter.room(), room, "the next agent adopts the new maps");
    drop(adopter);
    drop(new);
    drop(old);

    // A first policy that outgrows the least room: the staged programs
    // give way to a resize's, which again leave the running ones theirs.
    // A previous agent's link is pinned (a stand-in: a map under a link's
    // name), so the pins move only once `apply` has moved the links.
    let (mut old, mut new, _) = staged_pair();
    let dir = new.pin_dir.clone();
    pin_array(&dir.join("fw_xdp@gone0@99"), "fake_link", 4);
    let big = many_classes(2000, 7001);
    new.publish(&big);
    assert_eq!(new.run(&tcp4([192, 0, 2, 9], WORKER, 7001)), XDP_DROP);
    assert_eq!(new.run(&tcp4([192, 0, 2, 9], WORKER, 7000)), XDP_PASS);
    assert_eq!(
        old.run(&tcp4([192, 0, 2, 9], WORKER, 7000)),
        XDP_DROP,
        "the running programs keep their policy through the resize"
    );
    assert_eq!(old.run(&tcp4([192, 0, 2, 9], WORKER, 7001)), XDP_PASS);
    let grown = new.dp.as_ref().expect("loaded").room();
    assert!(grown.heads > Room::MIN.heads);
    assert!(
        !staging_pins(&dir).is_empty(),
        "the pins wait for the links"
    );
    assert_eq!(
        pinned_entries(&dir.join(names::MAP_CLASS)),
        2 * u64::from(Room::MIN.heads)
    );
    let ifaces: Interfaces = [("lo".to_string(), LO)].into();
    let dp = new.dp.as_mut().expect("loaded");
    dp.apply(&kernel_test_policy(&big), &ifaces).expect("apply");
    assert!(staging_pins(&dir).is_empty(), "{:?}", staging_pins(&dir));
    assert_eq!(
        pinned_entries(&dir.join(names::MAP_CLASS)),
        2 * u64::from(grown.heads)
    );
    drop(new);
    drop(old);
}
