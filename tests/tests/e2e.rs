//! End to end: the real agent in network namespaces, real TCP and UDP.

use std::{net::SocketAddr, path::Path, time::Duration};

use filter_tests::{agent_binary, demo, privileged, sh, tcp_probe, unique, Agent, Pair, TcpServer};

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn tutorial_lessons_hold_with_real_connections() {
    if !privileged("tutorial_lessons_hold_with_real_connections") {
        return;
    }
    let mut out = Vec::new();
    let reports = demo::run(&agent_binary(), &examples(), &unique("fwt"), &mut out)
        .unwrap_or_else(|e| panic!("{e}\n{}", String::from_utf8_lossy(&out)));
    let text = String::from_utf8_lossy(&out);
    assert_eq!(reports.len(), 6, "{text}");
    for r in &reports {
        for p in &r.probes {
            assert_eq!(p.observed, p.expected, "{}: {}\n{text}", r.title, p.what);
        }
    }
    // Lesson 5 shows the denied client's packets as the kernel's LOG line,
    // and only them.
    let lesson5 = &reports[4];
    assert!(lesson5.title.starts_with("Lesson 5"), "{text}");
    assert!(
        !lesson5.log_lines.is_empty(),
        "lesson 5 logged nothing: {text}"
    );
    for l in &lesson5.log_lines {
        assert!(
            l.starts_with("calico-packet: IN=eth1 OUT= MAC=")
                && l.contains("SRC=198.51.100.10 DST=203.0.113.80")
                && l.contains("PROTO=TCP")
                && l.contains("DPT=80"),
            "{l}\n{text}"
        );
    }
    assert!(
        reports[..4].iter().all(|r| r.log_lines.is_empty()),
        "{text}"
    );
    // Both outcomes occurred: the lessons really blocked and really reached.
    let all: Vec<_> = reports.iter().flat_map(|r| &r.probes).collect();
    assert!(all.iter().any(|p| p.observed == demo::Outcome::Blocked));
    assert!(all.iter().any(|p| p.observed == demo::Outcome::Reached));
}

fn pair() -> Pair {
    Pair::new("fwp")
}

/// Rewrites the policy to deny 7001 instead of 7000 and checks both ports.
fn move_the_deny_to_7001(agent: &mut Agent, file: &Path, p: &Pair) {
    let applied = agent.count("policy applied");
    std::fs::write(file, HEP_AND_DENY.replace("ports: [7000]", "ports: [7001]")).expect("write");
    agent
        .wait_for("policy applied", applied, Duration::from_secs(10))
        .expect("applied");
    let to = |port: u16| SocketAddr::from(([192, 0, 2, 1], port));
    let t = Duration::from_millis(1500);
    assert_eq!(
        tcp_probe(&p.client, to(7000), t).as_deref(),
        Ok("7000"),
        "7000 open after the change"
    );
    assert!(
        tcp_probe(&p.client, to(7001), t).is_err(),
        "7001 denied after the change"
    );
}

/// A host endpoint whose normal policy lets everything in (a bare one
/// denies all but failsafe), and a pre-DNAT deny of port 7000.
const HEP_AND_DENY: &str = "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: w, labels: {role: pub}}\nspec: {node: pair, interfaceName: eth1}\n---\n\
apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: allow-in}\nspec:\n  selector: role == 'pub'\n  types: [Ingress]\n  ingress:\n  - action: Allow\n---\n\
apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: deny-7000}\nspec:\n  preDNAT: true\n  applyOnForward: true\n  selector: role == 'pub'\n  ingress:\n  - action: Deny\n    protocol: TCP\n    destination: {ports: [7000]}\n";

#[test]
fn programs_and_tables_are_visible_to_bpftool_and_gone_after_sigterm() {
    if !privileged("programs_and_tables_are_visible_to_bpftool_and_gone_after_sigterm") {
        return;
    }
    let p = pair();
    let dir = demo::TempDir::new(&unique("fwbpftool"));
    std::fs::write(dir.0.join("policy.yaml"), HEP_AND_DENY).expect("write policy");
    let pins = Path::new("/sys/fs/bpf").join(unique("fwb"));
    let mut agent = Agent::start(&agent_binary(), &p.worker, &dir.0, "pair", &pins);
    agent
        .wait_for("policy applied", 0, Duration::from_secs(15))
        .expect("applied");

    let progs = sh("bpftool", &["prog", "show"]);
    let links = sh("bpftool", &["link", "show"]);
    let mut ids = Vec::new();
    for name in ["fw_xdp", "fw_tc_in", "fw_tc_eg"] {
        assert!(
            progs.contains(&format!("name {name} ")),
            "bpftool prog show lacks {name}:\n{progs}"
        );
        // This agent's copy (other tests run their own), by its pin.
        let pinned = sh(
            "bpftool",
            &["prog", "show", "pinned", &pins.join(name).to_string_lossy()],
        );
        let id = pinned.split(':').next().expect("id").trim().to_owned();
        assert!(pinned.contains(&format!("name {name} ")), "{pinned}");
        // XDP and TCX attachments are links to the program.
        assert!(
            links.contains(&format!("prog {id}")),
            "{name} (id {id}) is not attached:\n{links}"
        );
        ids.push(id);
    }
    let ports = sh(
        "bpftool",
        &[
            "map",
            "dump",
            "pinned",
            &pins.join("FW_PORT1").to_string_lossy(),
        ],
    );
    assert!(ports.contains("key:"), "FW_PORT1 is empty:\n{ports}");
    let gen = sh(
        "bpftool",
        &[
            "map",
            "dump",
            "pinned",
            &pins.join("FW_GEN1").to_string_lossy(),
        ],
    );
    assert!(
        gen.contains("value: 01 00 00 00"),
        "first policy lives in generation 1:\n{gen}"
    );

    let status = agent.stop();
    assert!(status.success(), "agent exit {status}");
    assert!(!pins.exists(), "pins left after SIGTERM");
    let links = sh("bpftool", &["link", "show"]);
    for id in ids {
        assert!(
            !links.contains(&format!("prog {id}\n")) && !links.contains(&format!("prog {id} ")),
            "program {id} still attached:\n{links}"
        );
    }
}

#[test]
fn a_bad_edit_keeps_the_last_good_policy_and_a_fix_applies() {
    if !privileged("a_bad_edit_keeps_the_last_good_policy_and_a_fix_applies") {
        return;
    }
    let p = pair();
    let _s7000 = TcpServer::start(&p.worker, "0.0.0.0:7000".parse().expect("addr"), "7000");
    let _s7001 = TcpServer::start(&p.worker, "0.0.0.0:7001".parse().expect("addr"), "7001");
    let dir = demo::TempDir::new(&unique("fwedit"));
    let file = dir.0.join("policy.yaml");
    std::fs::write(&file, HEP_AND_DENY).expect("write policy");
    let pins = Path::new("/sys/fs/bpf").join(unique("fwe"));
    let mut agent = Agent::start(&agent_binary(), &p.worker, &dir.0, "pair", &pins);
    agent
        .wait_for("policy applied", 0, Duration::from_secs(15))
        .expect("applied");
    let to = |port: u16| SocketAddr::from(([192, 0, 2, 1], port));
    let t = Duration::from_millis(1500);
    assert!(tcp_probe(&p.client, to(7000), t).is_err(), "7000 denied");
    assert_eq!(tcp_probe(&p.client, to(7001), t).as_deref(), Ok("7001"));

    // A typo: the agent names file, line and field, and keeps enforcing.
    std::fs::write(
        &file,
        HEP_AND_DENY.replace("ports: [7000]", "ports: [\"7001-7002\"]"),
    )
    .expect("write");
    agent
        .wait_for("policy rejected", 0, Duration::from_secs(10))
        .expect("rejected");
    let log = agent.log_text();
    assert!(
        log.contains("policy.yaml:25: spec.ingress[0].destination.ports[0]"),
        "{log}"
    );
    assert!(
        tcp_probe(&p.client, to(7000), t).is_err(),
        "last good policy still denies 7000"
    );
    // `status` says what is enforced and why the edit was refused.
    let status = cli_json("status", &pins);
    let error = status["last_error"]["message"].as_str().unwrap_or_default();
    assert!(error.contains("policy.yaml:25"), "{status}");
    assert!(status["last_apply"]["at"].as_f64().is_some(), "{status}");
    let eth1 = status["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .find(|i| i["name"] == "eth1")
        .unwrap_or_else(|| panic!("{status}"));
    assert_eq!(eth1["endpoint"], "w", "{status}");
    assert!(
        status["rules"]["used"].as_u64().expect("rules") > 0,
        "{status}"
    );

    // The fix moves the deny to 7001, and clears the refusal.
    move_the_deny_to_7001(&mut agent, &file, &p);
    assert!(cli_json("status", &pins)["last_error"].is_null());
    assert!(agent.stop().success());
}

/// `filter-agent stats --output json` on the agent pinned at `pins`.
fn stats_json(pins: &Path) -> serde_json::Value {
    cli_json("stats", pins)
}

/// `filter-agent <command> --output json` on the agent pinned at `pins`.
fn cli_json(command: &str, pins: &Path) -> serde_json::Value {
    let out = std::process::Command::new(agent_binary())
        .args([command, "--output", "json", "--pin-dir"])
        .arg(pins)
        .output()
        .expect("run stats");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stats JSON")
}

#[test]
fn stats_count_the_packets_each_rule_decided() {
    if !privileged("stats_count_the_packets_each_rule_decided") {
        return;
    }
    let p = pair();
    let _s7001 = TcpServer::start(&p.worker, "0.0.0.0:7001".parse().expect("addr"), "7001");
    let dir = demo::TempDir::new(&unique("fwstats"));
    std::fs::write(dir.0.join("policy.yaml"), HEP_AND_DENY).expect("write policy");
    let pins = Path::new("/sys/fs/bpf").join(unique("fws"));
    let mut agent = Agent::start(&agent_binary(), &p.worker, &dir.0, "pair", &pins);
    agent
        .wait_for("policy applied", 0, Duration::from_secs(15))
        .expect("applied");
    let to = |port: u16| SocketAddr::from(([192, 0, 2, 1], port));
    assert!(
        tcp_probe(&p.client, to(7000), Duration::from_millis(1500)).is_err(),
        "7000 denied"
    );
    assert_eq!(
        tcp_probe(&p.client, to(7001), Duration::from_millis(1500)).as_deref(),
        Ok("7001")
    );

    let json = stats_json(&pins);
    let deny = json["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| r["policy"] == "deny-7000" && r["stage"] == "pre-dnat" && r["rule"] == 0)
        .unwrap_or_else(|| panic!("no deny-7000 rule in {json}"));
    // The SYN and its retransmissions, each dropped at XDP.
    assert!(deny["packets"].as_u64().expect("packets") >= 1, "{json}");
    assert!(deny["bytes"].as_u64().expect("bytes") >= 54, "{json}");
    assert_eq!(deny["action"], "deny");
    assert!(
        json["reasons"]["drop_rule"].as_u64().expect("drop_rule") >= 1,
        "{json}"
    );
    // Port 7001 went through with no pre-DNAT verdict.
    assert!(
        json["reasons"]["pass_no_verdict"]
            .as_u64()
            .expect("pass_no_verdict")
            >= 1,
        "{json}"
    );

    // The allowed connection is tracked (and its packets after the SYN
    // were accepted by conntrack).
    assert!(
        json["conntrack"]["entries"].as_u64().expect("entries") >= 1,
        "{json}"
    );
    assert_eq!(
        json["conntrack"]["capacity"],
        filter_common::ct::DEFAULT_SIZE
    );
    assert!(
        json["reasons"]["allow_conntrack"]
            .as_u64()
            .expect("allow_conntrack")
            >= 1,
        "{json}"
    );
    let state = Path::new("/run/filter-agent").join(pins.file_name().expect("name"));
    assert!(state.join("rules.json").exists());
    assert!(agent.stop().success());
    assert!(!state.exists(), "state left after SIGTERM");
}

#[test]
fn a_crashed_agent_leaves_the_node_enforced_and_the_next_one_adopts_it() {
    if !privileged("a_crashed_agent_leaves_the_node_enforced_and_the_next_one_adopts_it") {
        return;
    }
    let p = pair();
    let _s7000 = TcpServer::start(&p.worker, "0.0.0.0:7000".parse().expect("addr"), "7000");
    let _s7001 = TcpServer::start(&p.worker, "0.0.0.0:7001".parse().expect("addr"), "7001");
    let dir = demo::TempDir::new(&unique("fwrestart"));
    std::fs::write(dir.0.join("policy.yaml"), HEP_AND_DENY).expect("write policy");
    let pins = Path::new("/sys/fs/bpf").join(unique("fwr"));
    let _cleanup = filter_tests::PinsGuard(pins.clone());
    let to = |port: u16| SocketAddr::from(([192, 0, 2, 1], port));
    let t = Duration::from_millis(1500);
    let enforced = |what: &str| {
        assert!(
            tcp_probe(&p.client, to(7000), t).is_err(),
            "{what}: 7000 must stay denied"
        );
        assert_eq!(
            tcp_probe(&p.client, to(7001), t).as_deref(),
            Ok("7001"),
            "{what}: 7001 must stay open"
        );
    };

    // No --detach-on-exit: the agent an operator runs.
    let mut first = Agent::start_with(&agent_binary(), &p.worker, &dir.0, "pair", &pins, &[]);
    first
        .wait_for("policy applied", 0, Duration::from_secs(15))
        .expect("applied");
    enforced("first agent");
    first.crash();
    let link_pins = std::fs::read_dir(&pins)
        .expect("pins")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains('@'))
        .count();
    assert_eq!(
        link_pins, 3,
        "fw_xdp, fw_tc_in and fw_tc_eg links stay pinned"
    );
    enforced("no agent running");

    let mut second = Agent::start(&agent_binary(), &p.worker, &dir.0, "pair", &pins);
    second
        .wait_for("policy applied", 0, Duration::from_secs(15))
        .expect("applied");
    let log = second.log_text();
    assert!(log.contains("adopting the pinned maps and links"), "{log}");
    assert!(log.contains("xdp_mode=\"adopted\""), "{log}");
    enforced("second agent");
    // A policy change still takes effect through the adopted links.
    move_the_deny_to_7001(&mut second, &dir.0.join("policy.yaml"), &p);
    assert!(second.stop().success());
    assert!(!pins.exists(), "--detach-on-exit removes the pins");
}

#[test]
fn explain_dataplane_runs_the_live_programs_beside_the_reference() {
    if !privileged("explain_dataplane_runs_the_live_programs_beside_the_reference") {
        return;
    }
    let p = pair();
    let dir = demo::TempDir::new(&unique("fwexp"));
    std::fs::write(dir.0.join("policy.yaml"), HEP_AND_DENY).expect("write policy");
    let pins = Path::new("/sys/fs/bpf").join(unique("fwx"));
    let mut agent = Agent::start(&agent_binary(), &p.worker, &dir.0, "pair", &pins);
    agent
        .wait_for("policy applied", 0, Duration::from_secs(15))
        .expect("applied");
    let explain = |extra: &[&str]| -> (serde_json::Value, i32) {
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--net={}", p.worker.path().display()))
            .arg(agent_binary())
            .args(["explain", "--dataplane", "--output", "json", "--pin-dir"])
            .arg(&pins)
            .arg("--policy-dir")
            .arg(&dir.0)
            .args(["--endpoint", "w", "--proto", "tcp"])
            .args(extra);
        let out = cmd.output().expect("run explain");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{e}: {text}\n{}", String::from_utf8_lossy(&out.stderr)));
        (json, out.status.code().unwrap_or(-1))
    };
    let inbound = |port: &str| {
        explain(&[
            "--direction",
            "ingress",
            "--src",
            "192.0.2.10",
            "--dst",
            "192.0.2.1",
            "--dport",
            port,
        ])
    };
    let (j, code) = inbound("7000");
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["verdict"], "deny", "{j}");
    assert_eq!(j["kernel"]["verdict"], "deny", "{j}");
    assert_eq!(j["kernel"]["program"], "fw_xdp", "{j}");
    assert_eq!(j["kernel"]["return_code"], 1, "XDP_DROP: {j}");

    let (j, code) = inbound("7001");
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["verdict"], "allow", "{j}");
    assert_eq!(
        j["kernel"],
        serde_json::json!({"verdict": "allow", "program": "fw_tc_in", "return_code": 0})
    );
    // Egress has no policy: default deny at TC egress, unless established.
    let outbound = |extra: &[&str]| {
        let mut args = vec![
            "--direction",
            "egress",
            "--src",
            "192.0.2.1",
            "--dst",
            "192.0.2.10",
            "--dport",
            "7200",
        ];
        args.extend_from_slice(extra);
        explain(&args)
    };
    let (j, _) = outbound(&[]);
    assert_eq!(j["verdict"], "deny", "{j}");
    assert_eq!(j["kernel"]["program"], "fw_tc_eg", "{j}");
    assert_eq!(j["kernel"]["return_code"], 2, "TC_ACT_SHOT: {j}");
    let (j, _) = outbound(&["--established"]);
    assert_eq!(j["verdict"], "allow", "{j}");
    assert_eq!(j["kernel"]["verdict"], "allow", "{j}");
    // The crafted established flow left no entry behind.
    let (j, _) = outbound(&[]);
    assert_eq!(j["kernel"]["verdict"], "deny", "{j}");
    assert!(agent.stop().success());
}

/// VLAN and bond devices have no native XDP in their drivers; this
/// machine kind's kernel has neither module, so a macvlan (no native XDP
/// either) stands in: the agent falls back to generic XDP, says so in
/// `stats`, and the endpoint is enforced at XDP all the same.
#[test]
fn a_device_without_native_xdp_gets_generic_xdp_and_is_enforced() {
    if !privileged("a_device_without_native_xdp_gets_generic_xdp_and_is_enforced") {
        return;
    }
    let p = pair();
    // The worker's address moves to a macvlan on top of eth1; eth1 stops
    // answering ARP so frames for 192.0.2.1 carry the macvlan's MAC.
    p.worker.ip(&[
        "link", "add", "link", "eth1", "name", "mv0", "type", "macvlan", "mode", "bridge",
    ]);
    p.worker.ip(&["addr", "del", "192.0.2.1/24", "dev", "eth1"]);
    p.worker.ip(&["addr", "add", "192.0.2.1/24", "dev", "mv0"]);
    p.worker.ip(&["link", "set", "eth1", "arp", "off"]);
    p.worker.ip(&["link", "set", "mv0", "up"]);
    let _s7000 = TcpServer::start(&p.worker, "0.0.0.0:7000".parse().expect("addr"), "7000");
    let _s7001 = TcpServer::start(&p.worker, "0.0.0.0:7001".parse().expect("addr"), "7001");
    let to = |port: u16| SocketAddr::from(([192, 0, 2, 1], port));
    let t = Duration::from_millis(1500);
    assert_eq!(
        tcp_probe(&p.client, to(7000), t).as_deref(),
        Ok("7000"),
        "7000 reachable through the macvlan before enforcement"
    );
    let dir = demo::TempDir::new(&unique("fwgeneric"));
    std::fs::write(
        dir.0.join("policy.yaml"),
        HEP_AND_DENY.replace("interfaceName: eth1", "interfaceName: mv0"),
    )
    .expect("write policy");
    let pins = Path::new("/sys/fs/bpf").join(unique("fwg"));
    let mut agent = Agent::start(&agent_binary(), &p.worker, &dir.0, "pair", &pins);
    agent
        .wait_for("policy applied", 0, Duration::from_secs(15))
        .expect("applied");
    assert!(tcp_probe(&p.client, to(7000), t).is_err(), "7000 denied");
    assert_eq!(tcp_probe(&p.client, to(7001), t).as_deref(), Ok("7001"));

    let json = stats_json(&pins);
    let mv0 = json["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .find(|i| i["name"] == "mv0")
        .unwrap_or_else(|| panic!("no mv0 in {json}"));
    assert_eq!(mv0["xdp_mode"], "generic", "{json}");
    let deny = json["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| r["policy"] == "deny-7000" && r["stage"] == "pre-dnat")
        .unwrap_or_else(|| panic!("no deny-7000 rule in {json}"));
    assert!(
        deny["packets"].as_u64().expect("packets") >= 1,
        "the SYN was dropped by the pre-DNAT rule at XDP: {json}"
    );
    assert!(
        agent
            .log_text()
            .contains("native XDP unavailable, using generic mode"),
        "{}",
        agent.log_text()
    );
    assert!(agent.stop().success());
}

/// GET `path` on `addr` from inside `ns`: the response body.
fn http_get(ns: &filter_tests::Netns, addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    ns.run(move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .expect("connect to the agent's metrics");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(request.as_bytes()).expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("response");
        let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_owned()
    })
}

#[test]
fn metrics_parse_and_agree_with_stats() {
    if !privileged("metrics_parse_and_agree_with_stats") {
        return;
    }
    let p = pair();
    let _s7001 = TcpServer::start(&p.worker, "0.0.0.0:7001".parse().expect("addr"), "7001");
    let dir = demo::TempDir::new(&unique("fwmet"));
    std::fs::write(dir.0.join("policy.yaml"), HEP_AND_DENY).expect("write policy");
    let pins = Path::new("/sys/fs/bpf").join(unique("fwm"));
    let metrics: SocketAddr = "127.0.0.1:9902".parse().expect("addr");
    let mut agent = Agent::start_with(
        &agent_binary(),
        &p.worker,
        &dir.0,
        "pair",
        &pins,
        &["--detach-on-exit", "--metrics-addr", "127.0.0.1:9902"],
    );
    agent
        .wait_for("policy applied", 0, Duration::from_secs(15))
        .expect("applied");
    let to = |port: u16| SocketAddr::from(([192, 0, 2, 1], port));
    assert!(tcp_probe(&p.client, to(7000), Duration::from_millis(1500)).is_err());
    assert_eq!(
        tcp_probe(&p.client, to(7001), Duration::from_millis(1500)).as_deref(),
        Ok("7001")
    );
    let stats = stats_json(&pins);
    let body = http_get(&p.worker, metrics, "/metrics");
    let after = stats_json(&pins);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("not Prometheus text ({e}):\n{body}"));
    let value = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    // Every rule counter equals what `stats` reads (between a read before
    // and one after the scrape: packets may arrive meanwhile).
    let rules = stats["rules"].as_array().expect("rules");
    let later = after["rules"].as_array().expect("rules");
    assert!(!rules.is_empty());
    for (r, r2) in rules.iter().zip(later) {
        let labels = [
            ("tier", r["tier"].as_str().unwrap_or("")),
            ("policy", r["policy"].as_str().unwrap_or("")),
            ("stage", r["stage"].as_str().expect("stage")),
            ("direction", r["direction"].as_str().expect("direction")),
            ("action", r["action"].as_str().expect("action")),
        ];
        let rule = r["rule"]
            .as_u64()
            .map(|i| i.to_string())
            .unwrap_or_default();
        let mut labels = labels.to_vec();
        labels.push(("rule", &rule));
        let packets = value("filter_rule_packets_total", &labels)
            .unwrap_or_else(|| panic!("no metric for {r}:\n{body}"));
        let (low, high) = (
            r["packets"].as_f64().expect("packets"),
            r2["packets"].as_f64().expect("packets"),
        );
        assert!(
            low <= packets && packets <= high,
            "{r}: {packets} not in {low}..={high}"
        );
    }
    let deny = value(
        "filter_rule_packets_total",
        &[
            ("policy", "deny-7000"),
            ("stage", "pre-dnat"),
            ("action", "deny"),
        ],
    )
    .expect("deny-7000");
    assert!(deny >= 1.0, "{body}");
    assert_eq!(
        value("filter_policy_applies_total", &[]),
        Some(1.0),
        "{body}"
    );
    assert_eq!(value("filter_policy_apply_errors_total", &[]), Some(0.0));
    assert!(value("filter_packets_total", &[("reason", "drop_rule")]).expect("drop_rule") >= 1.0);
    assert_eq!(
        value("filter_xdp_mode", &[("interface", "eth1")]),
        Some(1.0),
        "{body}"
    );
    assert!(agent.stop().success());
}
