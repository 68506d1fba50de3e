//! `explain` on the seed tutorial's policies gives the tutorial's outcomes.

use std::path::{Path, PathBuf};

use filter_agent::{
    cli::explain_json,
    model::Store,
    reference::{Direction, Failsafe, Packet, Reference},
};

fn examples(files: &[&str]) -> Store {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let paths: Vec<PathBuf> = files.iter().map(|f| root.join(f)).collect();
    Store::load_files(&paths).unwrap_or_else(|e| panic!("{e:?}"))
}

fn tcp(src: &str, dst: &str, dport: u16) -> Packet {
    Packet::tcp(src.parse().unwrap(), dst.parse().unwrap(), dport)
}

/// (verdict, pre-dnat policy) for a packet.
fn ask(store: &Store, p: Packet) -> (String, String) {
    let hep = &store.host_endpoints[0];
    let e = Reference::new(store).explain(
        hep,
        Direction::Ingress,
        &p,
        &Failsafe::from_store(store, &hep.spec.node),
    );
    let j = explain_json(&e);
    let pre = &j["stages"][1];
    assert_eq!(pre["stage"], "pre-dnat");
    (
        j["verdict"].as_str().unwrap().to_owned(),
        pre["policy"].as_str().unwrap_or("-").to_owned(),
    )
}

const BASE: [&str; 2] = ["demo/host-endpoint.yaml", "demo/default-host-policies.yaml"];
const CLIENT1: &str = "198.51.100.10";
const CLIENT2: &str = "198.51.100.20";
const WORKER: &str = "198.51.100.1";
const LB: &str = "203.0.113.80";

#[test]
fn lesson_2_node_ports_are_blocked_the_load_balancer_is_not() {
    let s = examples(&[BASE[0], BASE[1], "lessons/lesson2-deny-nodeports.yaml"]);
    assert_eq!(
        ask(&s, tcp(CLIENT1, WORKER, 31000)),
        ("deny".into(), "deny-nodeports".into())
    );
    assert_eq!(ask(&s, tcp(CLIENT2, LB, 80)).0, "allow");
}

#[test]
fn lesson_3_only_the_allow_listed_client_reaches_the_load_balancer() {
    let s = examples(&[
        BASE[0],
        BASE[1],
        "lessons/lesson2-deny-nodeports.yaml",
        "lessons/lesson3-deny-lb-port-80.yaml",
        "lessons/lesson3-whitelist.yaml",
    ]);
    assert_eq!(
        ask(&s, tcp(CLIENT1, LB, 80)),
        ("allow".into(), "whitelist".into())
    );
    assert_eq!(
        ask(&s, tcp(CLIENT2, LB, 80)),
        ("deny".into(), "deny-lb-port-80".into())
    );
}

#[test]
fn lesson_4_everyone_but_the_deny_listed_client_reaches_it() {
    let s = examples(&[
        BASE[0],
        BASE[1],
        "lessons/lesson2-deny-nodeports.yaml",
        "lessons/lesson4-blacklist.yaml",
    ]);
    assert_eq!(
        ask(&s, tcp(CLIENT1, LB, 80)),
        ("deny".into(), "blacklist".into())
    );
    assert_eq!(ask(&s, tcp(CLIENT2, LB, 80)).0, "allow");
    assert_eq!(ask(&s, tcp(CLIENT2, WORKER, 31000)).0, "deny");
}
