//! No packet meets half a policy: a policy flipped 1,000 times between two
//! versions while another thread keeps sending packets through the live
//! programs; every verdict is one the first or the second version gives.
//! Each version comes in two layouts that judge the probes alike, so each
//! generation is patched from one layout to the other at every publish,
//! never rewritten with what it already holds.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use filter_agent::{
    compile::{self, Node},
    dataplane::{
        conntrack::Flow,
        live::{self, Live, Route},
        Dataplane, Interfaces,
    },
    model::Store,
};
use filter_tests::{privileged, unique};

const LO: u32 = 1;
const NODE: &str = "198.51.100.1";

/// Both versions deny 7002 and allow 7003; they disagree on 7000 and 7001,
/// and put their rules in different orders, so mixing one version's
/// bitmaps with the other's rules, or meeting a half-written or half-cleared
/// generation (no endpoint mask, no trie entry: the programs pass), gives a
/// verdict neither version gives.
///
/// With `other_layout`, the same verdicts for the probes from other tables
/// (rules the probes never match, before and among them, with a source
/// net), so publishing one layout over the other patches classes, rule
/// slots, trie entries and hints.
fn version(first: bool, other_layout: bool) -> String {
    let unmatched = if other_layout {
        "  - {action: Deny, protocol: UDP, destination: {ports: [9999]}}\n  - {action: Allow, protocol: TCP, source: {nets: [203.0.113.0/24, 203.0.113.7/32]}, destination: {ports: [7000, 7001]}}\n"
    } else {
        ""
    };
    let rules = if first {
        "  - {action: Allow, protocol: TCP, destination: {ports: [7000]}}\n  - {action: Deny, protocol: TCP, destination: {ports: [7001]}}\n  - {action: Allow, protocol: TCP, destination: {ports: [7003]}}\n"
    } else {
        "  - {action: Allow, protocol: TCP, destination: {ports: [7003]}}\n  - {action: Allow, protocol: TCP, destination: {ports: [7001]}}\n  - {action: Deny, protocol: TCP, destination: {ports: [7000]}}\n  - {action: Log, protocol: TCP}\n"
    };
    format!(
        "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {{name: hep, labels: {{role: pub}}}}\nspec: {{node: flip, interfaceName: lo}}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: v}}\nspec:\n  selector: role == 'pub'\n  types: [Ingress]\n  ingress:\n{unmatched}{rules}"
    )
}

fn compiled(text: &str) -> compile::Compiled {
    let mut store = Store::default();
    let mut errors = Vec::new();
    store.add_text(Path::new("flip.yaml"), text, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    let node = Node {
        name: "flip".into(),
        interfaces: BTreeMap::new(),
    };
    compile::compile(&store, &node).expect("compiles")
}

#[test]
fn a_policy_flipped_1000_times_never_shows_a_mix() {
    if !privileged("a_policy_flipped_1000_times_never_shows_a_mix") {
        return;
    }
    let pin_dir = Path::new("/sys/fs/bpf").join(unique("fwflip"));
    let mut dp = Dataplane::load(&pin_dir).expect("load");
    let cleanup = PinGuard(pin_dir.clone());
    let node: BTreeSet<IpAddr> = [NODE.parse().expect("address")].into();
    dp.set_host_addresses(&node).expect("node address");
    let ifaces: Interfaces = [("lo".to_string(), LO)].into();
    let a = compiled(&version(true, false));
    // In publishing order after `a`: generation 1 holds b and b', 0 a' and a.
    let cycle = [
        compiled(&version(false, false)),
        compiled(&version(true, true)),
        compiled(&version(false, true)),
        compiled(&version(true, false)),
    ];
    dp.publish(&a, &ifaces).expect("publish");

    // Expected verdicts per destination port: (first version, second).
    let expected: [(u16, bool, bool); 4] = [
        (7000, true, false),
        (7001, false, true),
        (7002, false, false),
        (7003, true, true),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let pins = pin_dir.clone();
    let sender = std::thread::spawn(move || {
        let mut kernel = Live::open(&pins).expect("open the pins");
        let mut sent = 0u64;
        let mut wrong = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            for (i, &(port, first, second)) in expected.iter().enumerate() {
                // A fresh source port: a new flow each time, judged by policy.
                let sport = 10_000 + (sent % 50_000) as u16;
                let flow = Flow {
                    src: "198.51.100.10".parse().expect("address"),
                    dst: NODE.parse().expect("address"),
                    proto: 6,
                    sport,
                    dport: port,
                };
                let frame = live::frame(&flow, None, 0x02);
                let route = Route {
                    ingress: true,
                    forwarded: false,
                    ifindex: LO,
                    other_ifindex: LO,
                };
                let v = live::judge(&mut kernel, &frame, &frame, route).expect("test run");
                kernel.restore_flow(&flow, None).expect("forget the flow");
                if v.allowed != first && v.allowed != second {
                    wrong.push((i, port, v));
                }
                sent += 1;
            }
        }
        (sent, wrong)
    });
    for c in cycle.iter().cycle().take(1000) {
        dp.publish(c, &ifaces).expect("publish");
    }
    stop.store(true, Ordering::Relaxed);
    let (sent, wrong) = sender.join().expect("sender");
    drop(dp);
    drop(cleanup);
    assert!(sent >= 10_000, "only {sent} packets during the flips");
    assert!(
        wrong.is_empty(),
        "{} of {sent} packets were judged by neither version, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// Removes the pins when dropped, also when the test fails.
struct PinGuard(std::path::PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
