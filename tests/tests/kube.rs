//! The Kubernetes source end to end: the real agent in a network
//! namespace takes its policy from an in-process API server (list and
//! watch, tests/src/kubeapi.rs) on 127.0.0.1 inside the same namespace,
//! and real TCP from a client namespace shows what is enforced.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use filter_tests::{
    agent_binary, demo, kubeapi, kubeapi::KubeApi, privileged, tcp_probe, unique, Agent, Netns,
    Pair, TcpServer,
};
use serde_json::{json, Value};

const T: Duration = Duration::from_millis(1500);
const NODE: &str = "pair";
const API_PORT: u16 = 6443;
const PROBES: &str = "127.0.0.1:9901";

fn hep() -> Value {
    json!({"metadata": {"name": "w", "labels": {"role": "pub"}},
           "spec": {"node": NODE, "interfaceName": "eth1"}})
}

fn allow_in() -> Value {
    json!({"metadata": {"name": "allow-in"},
           "spec": {"selector": "role == 'pub'", "types": ["Ingress"], "ingress": [{"action": "Allow"}]}})
}

/// A pre-DNAT deny of `port`, stored as older Calico releases name it.
fn deny(port: u16) -> Value {
    json!({"metadata": {"name": "default.deny-port",
                        "annotations": {"projectcalico.org/metadata": "{\"creationTimestamp\":null}"}},
           "spec": {"preDNAT": true, "applyOnForward": true, "selector": "role == 'pub'",
                    "ingress": [{"action": "Deny", "protocol": "TCP", "destination": {"ports": [port]}}]}})
}

fn node() -> Value {
    json!({"metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
           "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}})
}

/// The agent on `p.worker` with `api` as its only source.
fn start_agent(p: &Pair, dir: &Path, api: &KubeApi, pins: &Path, extra: &[&str]) -> Agent {
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let mut args = vec![
        "--kubeconfig",
        kubeconfig.to_str().expect("utf-8"),
        "--detach-on-exit",
        "--debounce",
        "50",
        "--metrics-addr",
        PROBES,
    ];
    args.extend_from_slice(extra);
    Agent::start_args(&agent_binary(), &p.worker, NODE, pins, &args)
}

/// Waits for the next "policy applied"; returns how long it took.
fn applied(agent: &mut Agent, since: usize) -> Duration {
    let start = Instant::now();
    agent
        .wait_for("policy applied", since, Duration::from_secs(10))
        .expect("applied");
    start.elapsed()
}

fn open(p: &Pair, port: u16) -> bool {
    tcp_probe(&p.client, Pair::worker(port), T).as_deref() == Ok(&port.to_string())
}

/// GET `path` from the agent's probe endpoints in `ns`: status and body.
fn probe(ns: &Netns, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    ns.run(move || {
        let addr: SocketAddr = PROBES.parse().expect("addr");
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            return (0, String::new());
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(request.as_bytes());
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        (status, body)
    })
}

#[test]
fn policy_from_the_api_is_enforced_changed_deleted_and_kept_while_the_api_is_away() {
    if !privileged("policy_from_the_api_is_enforced_changed_deleted_and_kept_while_the_api_is_away")
    {
        return;
    }
    let p = Pair::new("fwk");
    let _s7000 = TcpServer::start(&p.worker, "0.0.0.0:7000".parse().expect("addr"), "7000");
    let _s7001 = TcpServer::start(&p.worker, "0.0.0.0:7001".parse().expect("addr"), "7001");
    let mut api = KubeApi::start_in(&p.worker, API_PORT);
    api.apply("HostEndpoint", hep());
    api.apply("GlobalNetworkPolicy", allow_in());
    api.apply("Node", node());
    let dir = demo::TempDir::new(&unique("fwkd"));
    let pins = Path::new("/sys/fs/bpf").join(unique("fwk"));
    let mut agent = start_agent(&p, &dir.0, &api, &pins, &[]);
    applied(&mut agent, 0);
    assert_eq!(probe(&p.worker, "/readyz").0, 200, "ready once applied");
    assert!(open(&p, 7000) && open(&p, 7001), "allow-in lets both in");

    // ADDED over the watch: enforced at XDP within a second.
    let n = agent.count("policy applied");
    api.apply("GlobalNetworkPolicy", deny(7000));
    let took = applied(&mut agent, n);
    assert!(took < Duration::from_secs(1), "applied after {took:?}");
    assert!(!open(&p, 7000), "the deny from the watch drops 7000");
    assert!(open(&p, 7001));

    // MODIFIED: the deny moves to 7001.
    let n = agent.count("policy applied");
    api.apply("GlobalNetworkPolicy", deny(7001));
    applied(&mut agent, n);
    assert!(open(&p, 7000) && !open(&p, 7001), "modified: 7001 denied");

    // DELETED: both open again.
    let n = agent.count("policy applied");
    assert!(api.delete("GlobalNetworkPolicy", None, "default.deny-port"));
    applied(&mut agent, n);
    assert!(open(&p, 7000) && open(&p, 7001), "deleted: both open");

    // Streams the server closes are watched again from where they were.
    let n = agent.count("policy applied");
    api.close_watches();
    std::thread::sleep(Duration::from_millis(300));
    api.apply("GlobalNetworkPolicy", deny(7000));
    applied(&mut agent, n);
    assert!(!open(&p, 7000), "a change after the streams closed arrives");

    // The API goes away: enforcement stays, the source is stale.
    api.stop();
    agent
        .wait_for("Kubernetes watch failed", 0, Duration::from_secs(10))
        .expect("the agent notices");
    assert!(
        !open(&p, 7000),
        "the last good policy stays while the API is away"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut health = probe(&p.worker, "/healthz");
    while !health.1.contains("unreachable since") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        health = probe(&p.worker, "/healthz");
    }
    assert_eq!(health.0, 200, "{health:?}");
    assert!(health.1.contains("unreachable since"), "{health:?}");
    let (_, metrics) = probe(&p.worker, "/metrics");
    let stale: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("filter_policy_source_stale_since_timestamp_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no staleness metric:\n{metrics}"));
    assert!(
        stale > 0.0,
        "the metrics say since when the API is away:\n{metrics}"
    );

    // Meanwhile the policy is deleted and the server forgets its history:
    // coming back, the agent must list again and see the deletion.
    assert!(api.delete("GlobalNetworkPolicy", None, "default.deny-port"));
    api.forget_history();
    let n = agent.count("policy applied");
    let lists = api.requests().len();
    api.start();
    applied(&mut agent, n);
    // Kinds are listed again one by one: the apply that carries the
    // policies' re-list may come after one for another kind.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !open(&p, 7000) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(open(&p, 7000), "the deletion made while away is enforced");
    let again = &api.requests()[lists..];
    assert!(
        again
            .iter()
            .any(|r| r.starts_with("LIST /apis/crd.projectcalico.org/v1/globalnetworkpolicies")),
        "re-listed after 410 Gone: {again:?}"
    );
    agent
        .wait_for("Kubernetes watch is back", 0, Duration::from_secs(10))
        .expect("watches back");
    assert!(agent.stop().success());
}

#[test]
fn a_bad_resource_from_the_api_is_left_out_and_named() {
    if !privileged("a_bad_resource_from_the_api_is_left_out_and_named") {
        return;
    }
    let p = Pair::new("fwkb");
    let _s7000 = TcpServer::start(&p.worker, "0.0.0.0:7000".parse().expect("addr"), "7000");
    let api = KubeApi::start_in(&p.worker, API_PORT);
    api.apply("HostEndpoint", hep());
    api.apply("GlobalNetworkPolicy", allow_in());
    // Numeric ports need a protocol: Calico refuses this policy.
    api.apply(
        "GlobalNetworkPolicy",
        json!({"metadata": {"name": "bad"},
               "spec": {"selector": "role == 'pub'", "order": 1,
                        "ingress": [{"action": "Deny", "destination": {"ports": [7000]}}]}}),
    );
    let dir = demo::TempDir::new(&unique("fwkbd"));
    let pins = Path::new("/sys/fs/bpf").join(unique("fwkb"));
    let mut agent = start_agent(&p, &dir.0, &api, &pins, &[]);
    applied(&mut agent, 0);
    let log = agent.log_text();
    assert!(
        log.contains("GlobalNetworkPolicy/bad: spec.ingress[0].destination.ports"),
        "{log}"
    );
    assert!(
        open(&p, 7000),
        "the rest is enforced without the bad policy"
    );
    assert!(agent.stop().success());
}

#[test]
fn a_service_from_the_api_sends_its_node_port_to_the_forward_stage() {
    if !privileged("a_service_from_the_api_sends_its_node_port_to_the_forward_stage") {
        return;
    }
    let p = Pair::new("fwks");
    let pod = p.node_port_to_pod("fwkpod");
    let _web = TcpServer::start(&pod, "0.0.0.0:80".parse().expect("addr"), "pod");
    let api = KubeApi::start_in(&p.worker, API_PORT);
    api.apply("HostEndpoint", hep());
    // The forward stage allows the pod's port; the policy's normal-stage
    // copy allows only that port to the host.
    api.apply(
        "GlobalNetworkPolicy",
        json!({"metadata": {"name": "forward-in"},
               "spec": {"selector": "role == 'pub'", "applyOnForward": true, "types": ["Ingress"],
                        "ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": [80]}}]}}),
    );
    let dir = demo::TempDir::new(&unique("fwksd"));
    let pins = Path::new("/sys/fs/bpf").join(unique("fwks"));
    let mut agent = start_agent(&p, &dir.0, &api, &pins, &[]);
    applied(&mut agent, 0);
    let node_port = Pair::worker(30080);
    assert!(
        tcp_probe(&p.client, node_port, T).is_err(),
        "without the Service, 30080 is host-bound and the normal stage allows only 80"
    );
    let n = agent.count("policy applied");
    api.apply(
        "Service",
        json!({"metadata": {"name": "web", "namespace": "default"},
               "spec": {"type": "NodePort", "selector": {"app": "web"},
                        "ports": [{"port": 80, "targetPort": 80, "nodePort": 30080, "protocol": "TCP"}]}}),
    );
    applied(&mut agent, n);
    assert_eq!(
        tcp_probe(&p.client, node_port, T).as_deref(),
        Ok("pod"),
        "the Service from the watch makes the NodePort forwarded: the forward stage allows 80"
    );
    assert!(agent.stop().success());
}

#[test]
fn all_interfaces_host_endpoint_from_the_node_covers_interfaces_that_appear() {
    if !privileged("all_interfaces_host_endpoint_from_the_node_covers_interfaces_that_appear") {
        return;
    }
    let p = Pair::new("fwka");
    let _s7000 = TcpServer::start(&p.worker, "0.0.0.0:7000".parse().expect("addr"), "7000");
    let api = KubeApi::start_in(&p.worker, API_PORT);
    api.apply("Node", node());
    // Calico's default for auto host endpoints plus a pre-DNAT deny for
    // every host endpoint of the node.
    api.apply(
        "GlobalNetworkPolicy",
        json!({"metadata": {"name": "deny-7000"},
               "spec": {"preDNAT": true, "applyOnForward": true,
                        "selector": "has(kubernetes.io/hostname)",
                        "ingress": [{"action": "Deny", "protocol": "TCP", "destination": {"ports": [7000]}}]}}),
    );
    let dir = demo::TempDir::new(&unique("fwkad"));
    let pins = Path::new("/sys/fs/bpf").join(unique("fwka"));
    let mut agent = start_agent(&p, &dir.0, &api, &pins, &["--auto-host-endpoints"]);
    applied(&mut agent, 0);
    assert!(
        agent.log_text().contains("eth1"),
        "the auto host endpoint governs eth1: {}",
        agent.log_text()
    );
    assert!(
        !open(&p, 7000),
        "the node's auto host endpoint carries the deny"
    );
    // An interface that appears is governed too: a second link to the
    // client, on another subnet.
    filter_tests::veth(&p.client, "eth9", &p.worker, "eth9");
    p.client
        .ip(&["addr", "add", "198.51.100.10/24", "dev", "eth9"]);
    p.worker
        .ip(&["addr", "add", "198.51.100.1/24", "dev", "eth9"]);
    let n = agent.count("policy applied");
    applied(&mut agent, n);
    let via_eth9 = SocketAddr::from(([198, 51, 100, 1], 7000));
    assert!(
        tcp_probe(&p.client, via_eth9, T).is_err(),
        "the new interface is enforced as well"
    );
    assert!(agent.stop().success());
}

#[test]
fn kubeconfig_problems_are_clear_errors() {
    if !privileged("kubeconfig_problems_are_clear_errors") {
        return;
    }
    let ns = Netns::new(&unique("fwkc"));
    let dir = demo::TempDir::new(&unique("fwkcd"));
    let pins = Path::new("/sys/fs/bpf").join(unique("fwkc"));
    let run = |kubeconfig: &Path| {
        std::process::Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .arg(agent_binary())
            .args(["run", "--node", "n", "--pin-dir"])
            .arg(&pins)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .output()
            .expect("run")
    };
    // A missing file: the agent stops before touching the kernel.
    let missing = dir.0.join("missing");
    let out = run(&missing);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("kubeconfig") && err.contains("missing"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // Not a kubeconfig.
    let garbage: PathBuf = dir.0.join("garbage");
    std::fs::write(&garbage, "{{{ not yaml").expect("write");
    let out = run(&garbage);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("garbage"), "{err}");

    // An unreachable server and refused credentials: the agent runs, says
    // why the watch fails, and enforces nothing it has not seen.
    let api = KubeApi::start_in(&ns, API_PORT);
    for (server, token, why) in [
        ("http://127.0.0.1:1", kubeapi::TOKEN, "Connection refused"),
        ("http://127.0.0.1:6443", "wrong-token", "401"),
    ] {
        let kubeconfig = dir.0.join("kc");
        kubeapi::write_kubeconfig(&kubeconfig, server, token);
        let mut agent = Agent::start_args(
            &agent_binary(),
            &ns,
            "n",
            &pins,
            &[
                "--kubeconfig",
                kubeconfig.to_str().expect("utf-8"),
                "--detach-on-exit",
            ],
        );
        agent
            .wait_for("Kubernetes watch failed", 0, Duration::from_secs(10))
            .expect("watch failure logged");
        let log = agent.log_text();
        assert!(log.contains(why), "{why}: {log}");
        assert!(!log.contains("panicked"), "{log}");
        assert_eq!(agent.count("policy applied"), 0, "{log}");
        assert!(agent.stop().success());
    }
    drop(api);
}

/// A rolling update, the old pod running this build's agent or, with
/// `FILTER_UPGRADE_FROM` set, the agent binary it names (an earlier
/// release: an upgrade across a bumped map layout).
#[test]
fn a_rolling_update_hands_over_without_a_gap() {
    if !privileged("a_rolling_update_hands_over_without_a_gap") {
        return;
    }
    let p = Pair::new("fwkr");
    let _s7000 = TcpServer::start(&p.worker, "0.0.0.0:7000".parse().expect("addr"), "7000");
    let _s7001 = TcpServer::start(&p.worker, "0.0.0.0:7001".parse().expect("addr"), "7001");
    let api = KubeApi::start_in(&p.worker, API_PORT);
    api.apply("HostEndpoint", hep());
    api.apply("GlobalNetworkPolicy", allow_in());
    api.apply("GlobalNetworkPolicy", deny(7000));
    let dir = demo::TempDir::new(&unique("fwkrd"));
    let pins = Path::new("/sys/fs/bpf").join(unique("fwkr"));
    let _cleanup = filter_tests::PinsGuard(pins.clone());
    let kubeconfig = dir.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let kc = kubeconfig.to_str().expect("utf-8");
    // The old pod: as the DaemonSet runs it, without --detach-on-exit.
    let from = std::env::var_os("FILTER_UPGRADE_FROM").map_or_else(agent_binary, PathBuf::from);
    let mut old = Agent::start_args(&from, &p.worker, NODE, &pins, &["--kubeconfig", kc]);
    applied(&mut old, 0);
    assert!(!open(&p, 7000) && open(&p, 7001));
    // SIGTERM: the old agent leaves; the node stays enforced meanwhile.
    assert!(old.stop_keeping_pins().success(), "SIGTERM answered");
    assert!(
        !open(&p, 7000),
        "enforced between the old pod and the new one"
    );
    assert!(open(&p, 7001));
    // The new pod adopts the pinned programs and follows the API.
    let mut new = Agent::start_args(
        &agent_binary(),
        &p.worker,
        NODE,
        &pins,
        &["--kubeconfig", kc, "--detach-on-exit"],
    );
    applied(&mut new, 0);
    assert!(!open(&p, 7000), "still denied after the handover");
    let n = new.count("policy applied");
    api.apply("GlobalNetworkPolicy", deny(7001));
    applied(&mut new, n);
    assert!(
        open(&p, 7000) && !open(&p, 7001),
        "the new agent follows the watch"
    );
    assert!(new.stop().success());
}

/// A pre-DNAT policy of 2,000 sources of a class each (10.i.j.0/24, not
/// the client's): more classes than the least room holds.
fn many_classes() -> Value {
    let rules: Vec<Value> = (0..2000u32)
        .map(|i| {
            let net = std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8));
            json!({"action": "Deny", "protocol": "TCP", "source": {"nets": [format!("{net}/24")]}})
        })
        .collect();
    json!({"metadata": {"name": "many"},
           "spec": {"preDNAT": true, "applyOnForward": true, "ingress": rules}})
}

/// A first start from the API whose first list outgrows the least room
/// waits for that list and sizes the maps to it before it loads the
/// programs: it loads them once, and enforces.
#[test]
fn a_first_start_sizes_its_maps_to_the_api_s_first_list() {
    if !privileged("a_first_start_sizes_its_maps_to_the_api_s_first_list") {
        return;
    }
    let p = Pair::new("fwkf");
    let _s7000 = TcpServer::start(&p.worker, "0.0.0.0:7000".parse().expect("addr"), "7000");
    let _s7001 = TcpServer::start(&p.worker, "0.0.0.0:7001".parse().expect("addr"), "7001");
    let api = KubeApi::start_in(&p.worker, API_PORT);
    api.apply("HostEndpoint", hep());
    api.apply("GlobalNetworkPolicy", allow_in());
    api.apply("GlobalNetworkPolicy", deny(7001));
    api.apply("GlobalNetworkPolicy", many_classes());
    api.apply("Node", node());
    let dir = demo::TempDir::new(&unique("fwkfd"));
    let pins = Path::new("/sys/fs/bpf").join(unique("fwkf"));
    let _cleanup = filter_tests::PinsGuard(pins.clone());
    let mut agent = start_agent(&p, &dir.0, &api, &pins, &[]);
    applied(&mut agent, 0);
    let log = agent.log_text();
    assert!(
        log.contains("classifier maps sized to the policy before loading the programs"),
        "{log}"
    );
    assert!(!log.contains("loading programs with new maps"), "{log}");
    assert!(
        open(&p, 7000) && !open(&p, 7001),
        "the API's policy is enforced"
    );
    assert!(agent.stop().success());
}
