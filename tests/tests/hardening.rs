//! End to end, as an attacker on the wire would try it: crafted frames
//! from the client namespace (raw link-layer socket) at a worker whose
//! policy denies a port. Each case first shows that the worker's kernel
//! does deliver the frame without the firewall (so the test can fail),
//! then that with the agent running the denied port never answers.

use std::{path::Path, time::Duration};

use etherparse::PacketBuilder;
use filter_tests::{
    agent_binary, demo, ipv4_fragments, ipv6_with_dest_options, mac, privileged, unique,
    with_priority_tags, Agent, Pair, RawLink, TcpServer, UdpServer,
};

const T: Duration = Duration::from_millis(1500);

/// Pre-DNAT denies TCP 7200 and UDP 7300; everything else is allowed.
const POLICY: &str = "apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: w, labels: {role: pub}}
spec: {node: pair, interfaceName: eth1}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-ports}
spec:
  selector: role == 'pub'
  preDNAT: true
  applyOnForward: true
  order: 10
  ingress:
  - action: Deny
    protocol: TCP
    destination: {ports: [7200]}
  - action: Deny
    protocol: UDP
    destination: {ports: [7300]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: allow-rest}
spec:
  selector: role == 'pub'
  order: 100
  ingress:
  - action: Allow
  egress:
  - action: Allow
";

const CLIENT6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const WORKER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
];

/// The worker's servers, the client's raw socket and both MACs.
struct Wire {
    p: Pair,
    _tcp: Vec<TcpServer>,
    _udp: Vec<UdpServer>,
    raw: RawLink,
    client_mac: [u8; 6],
    worker_mac: [u8; 6],
}

impl Wire {
    fn new(prefix: &str) -> Wire {
        let p = Pair::new(prefix);
        let tcp = [7200, 7201]
            .map(|port| TcpServer::start(&p.worker, Pair::worker(port), "t"))
            .into();
        let udp = [7300, 7301]
            .into_iter()
            .flat_map(|port| {
                [
                    UdpServer::start(&p.worker, Pair::worker(port), "u"),
                    UdpServer::start(
                        &p.worker,
                        format!("[2001:db8::1]:{port}").parse().expect("addr"),
                        "u",
                    ),
                ]
            })
            .collect();
        let raw = RawLink::open(&p.client, "eth0");
        let client_mac = mac(&p.client, "eth0");
        let worker_mac = mac(&p.worker, "eth1");
        Wire {
            p,
            _tcp: tcp,
            _udp: udp,
            raw,
            client_mac,
            worker_mac,
        }
    }

    /// A TCP SYN from the client's port `sport` to the worker's `dport`,
    /// with `payload` (so it can be cut into fragments).
    fn syn(&self, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(self.client_mac, self.worker_mac)
            .ipv4(Pair::CLIENT_V4, Pair::WORKER_V4, 64)
            .tcp(sport, dport, 1000, 64240)
            .syn()
            .write(&mut v, payload)
            .expect("build");
        v
    }

    /// Whether the worker answers the client's `sport` with a SYN-ACK.
    fn syn_ack(&self, sport: u16) -> bool {
        self.raw.wait_for(T, |f| {
            f.len() >= 14 + 20 + 14
                && f[12..14] == [0x08, 0x00]
                && f[14 + 9] == 6
                && f[14 + 12..14 + 16] == Pair::WORKER_V4
                && u16::from_be_bytes([f[14 + 22], f[14 + 23]]) == sport
                && f[14 + 20 + 13] & 0x12 == 0x12
        })
    }

    /// Whether the worker's UDP server answers the client's `sport`.
    fn udp_answer(&self, sport: u16) -> bool {
        self.raw.wait_for(T, |f| {
            let (ethertype, l3) = (&f[12..14], 14);
            match ethertype {
                [0x08, 0x00] => {
                    f.len() >= l3 + 24
                        && f[l3 + 9] == 17
                        && u16::from_be_bytes([f[l3 + 22], f[l3 + 23]]) == sport
                }
                [0x86, 0xdd] => {
                    f.len() >= l3 + 44
                        && f[l3 + 6] == 17
                        && f[l3 + 8..l3 + 24] == WORKER6
                        && u16::from_be_bytes([f[l3 + 42], f[l3 + 43]]) == sport
                }
                _ => false,
            }
        })
    }

    fn udp4(&self, sport: u16, dport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(self.client_mac, self.worker_mac)
            .ipv4(Pair::CLIENT_V4, Pair::WORKER_V4, 64)
            .udp(sport, dport)
            .write(&mut v, b"knock")
            .expect("build");
        v
    }

    fn udp6(&self, sport: u16, dport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(self.client_mac, self.worker_mac)
            .ipv6(CLIENT6, WORKER6, 64)
            .udp(sport, dport)
            .write(&mut v, b"knock")
            .expect("build");
        v
    }

    /// Asserts that TCP `denied` ports do not answer and `allowed` ones do.
    fn assert_tcp(&self, denied: &[u16], allowed: &[u16], what: &str) {
        for &port in denied {
            assert!(
                filter_tests::tcp_probe(&self.p.client, Pair::worker(port), T).is_err(),
                "{what}: denied port {port} answered"
            );
        }
        for &port in allowed {
            assert!(
                filter_tests::tcp_probe(&self.p.client, Pair::worker(port), T).is_ok(),
                "{what}: allowed port {port} did not answer"
            );
        }
    }

    fn start_agent(&self, dir: &demo::TempDir) -> Agent {
        std::fs::write(dir.0.join("policy.yaml"), POLICY).expect("write policy");
        let pins = Path::new("/sys/fs/bpf").join(unique("fwhd"));
        let mut agent = Agent::start(&agent_binary(), &self.p.worker, &dir.0, "pair", &pins);
        agent
            .wait_for("policy applied", 0, Duration::from_secs(15))
            .expect("applied");
        agent
    }
}

/// The tiny-fragment SYN (RFC 1858): 8 bytes of TCP header in the first
/// fragment, the flags in the second. The kernel reassembles it into a SYN.
fn tiny_fragments(w: &Wire, sport: u16, dport: u16, id: u16) -> Vec<Vec<u8>> {
    ipv4_fragments(&w.syn(sport, dport, &[]), &[8], id)
}

#[test]
fn evasions_on_the_wire_do_not_reach_a_denied_port() {
    if !privileged("evasions_on_the_wire_do_not_reach_a_denied_port") {
        return;
    }
    let w = Wire::new("fwhd");
    // The ARP and neighbour entries the worker needs to answer at all.
    let _ = filter_tests::tcp_probe(&w.p.client, Pair::worker(7201), T);
    let send_all = |frames: &[Vec<u8>]| frames.iter().for_each(|f| w.raw.send(f));

    // Without the firewall every crafted frame reaches its server.
    send_all(&tiny_fragments(&w, 41000, 7200, 1));
    assert!(
        w.syn_ack(41000),
        "control: the kernel reassembles a tiny-fragment SYN"
    );
    w.raw.send(&with_priority_tags(&w.udp4(41001, 7300), 4));
    assert!(
        w.udp_answer(41001),
        "control: the kernel delivers behind 4 priority tags"
    );
    w.raw.send(&ipv6_with_dest_options(&w.udp6(41002, 7300), 5));
    assert!(
        w.udp_answer(41002),
        "control: the kernel walks 5 extension headers"
    );

    let dir = demo::TempDir::new(&unique("fwhd"));
    let _agent = w.start_agent(&dir);
    send_all(&tiny_fragments(&w, 42000, 7200, 2));
    assert!(
        !w.syn_ack(42000),
        "tiny-fragment SYN reached the denied port"
    );
    w.raw.send(&with_priority_tags(&w.udp4(42001, 7300), 4));
    assert!(
        !w.udp_answer(42001),
        "4 priority tags carried a datagram to the denied port"
    );
    w.raw.send(&ipv6_with_dest_options(&w.udp6(42002, 7300), 5));
    assert!(
        !w.udp_answer(42002),
        "5 extension headers carried a datagram to the denied port"
    );

    // What is legitimate still works: fragments with the whole header
    // first, tags and extension headers in front of an allowed port.
    send_all(&ipv4_fragments(&w.syn(43000, 7201, &[9u8; 16]), &[24], 3));
    assert!(w.syn_ack(43000), "a fragmented SYN to an allowed port");
    w.raw.send(&with_priority_tags(&w.udp4(43001, 7301), 4));
    assert!(
        w.udp_answer(43001),
        "4 priority tags in front of an allowed port"
    );
    w.raw.send(&ipv6_with_dest_options(&w.udp6(43002, 7301), 5));
    assert!(
        w.udp_answer(43002),
        "5 extension headers in front of an allowed port"
    );
}

/// A pin directory another user made beforehand (bpffs is world-writable
/// on many hosts) is refused, with the reason, before anything is pinned.
#[test]
fn a_pin_directory_owned_by_another_user_is_refused() {
    if !privileged("a_pin_directory_owned_by_another_user_is_refused") {
        return;
    }
    let ns = filter_tests::Netns::new(&unique("fwpo"));
    let dir = demo::TempDir::new(&unique("fwpo"));
    let pins = Path::new("/sys/fs/bpf").join(unique("fwpo"));
    let _guard = filter_tests::PinsGuard(pins.clone());
    std::fs::create_dir(&pins).expect("mkdir");
    nix::unistd::chown(&pins, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
    let out = run_briefly(&ns, &dir.0, &pins);
    assert!(
        !out.status.success(),
        "the agent ran on a foreign pin directory"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("owned by uid 65534"), "{err}");
    assert_eq!(
        std::fs::read_dir(&pins).expect("read").count(),
        0,
        "nothing pinned into it"
    );
    // World-writable, even if root's: refused too.
    nix::unistd::chown(&pins, Some(nix::unistd::Uid::from_raw(0)), None).expect("chown");
    std::fs::set_permissions(&pins, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
        .expect("chmod");
    let out = run_briefly(&ns, &dir.0, &pins);
    assert!(
        !out.status.success(),
        "the agent ran on a world-writable pin directory"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("writable by group or others"));
}

/// Runs the agent in `ns`; kills it after 10 s (it should have refused).
fn run_briefly(ns: &filter_tests::Netns, policy: &Path, pins: &Path) -> std::process::Output {
    let child = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg(agent_binary())
        .args(["run", "--node", "x", "--detach-on-exit", "--policy-dir"])
        .arg(policy)
        .arg("--pin-dir")
        .arg(pins)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start agent");
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(10));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    });
    let out = child.wait_with_output().expect("wait");
    drop(killer);
    out
}

/// Pins removed while the agent runs come back, and the agent says so;
/// its pin directory and state files are root's alone.
#[test]
fn removed_pins_are_restored_and_state_is_private() {
    if !privileged("removed_pins_are_restored_and_state_is_private") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let p = Pair::new("fwrp");
    let dir = demo::TempDir::new(&unique("fwrp"));
    std::fs::write(dir.0.join("policy.yaml"), POLICY).expect("write policy");
    let pins = Path::new("/sys/fs/bpf").join(unique("fwrp"));
    let mut agent = Agent::start(&agent_binary(), &p.worker, &dir.0, "pair", &pins);
    agent
        .wait_for("policy applied", 0, Duration::from_secs(15))
        .expect("applied");
    let mode = |path: &Path| std::fs::metadata(path).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&pins), 0o700, "pin directory");
    let state = Path::new("/run/filter-agent").join(pins.file_name().expect("name"));
    assert_eq!(mode(&state), 0o700, "state directory");
    assert_eq!(mode(&state.join("rules.json")), 0o600, "rules.json");

    let link = std::fs::read_dir(&pins)
        .expect("read pins")
        .map(|e| e.expect("entry").path())
        .find(|p| p.to_string_lossy().contains("fw_xdp@"))
        .expect("a pinned XDP link");
    let removed = [pins.join("FW_GEN1"), pins.join("fw_tc_in"), link];
    for pin in &removed {
        std::fs::remove_file(pin).expect("unpin");
    }
    agent
        .wait_for("re-pinned", 0, Duration::from_secs(5))
        .expect("the agent noticed");
    for pin in &removed {
        assert!(pin.exists(), "{} not restored", pin.display());
    }
    // The restored link still enforces: the denied port stays closed.
    let _srv = TcpServer::start(&p.worker, Pair::worker(7200), "t");
    assert!(filter_tests::tcp_probe(&p.client, Pair::worker(7200), T).is_err());
}

/// Hostile files in the policy directory (a FIFO, a symlink to /dev/zero,
/// YAML nested 100,000 deep) are refused by name while the last good
/// policy stays enforced for real traffic, and SIGTERM is answered.
#[test]
fn hostile_policy_files_are_refused_and_the_last_good_policy_stays() {
    if !privileged("hostile_policy_files_are_refused_and_the_last_good_policy_stays") {
        return;
    }
    let w = Wire::new("fwpf");
    let dir = demo::TempDir::new(&unique("fwpf"));
    let mut agent = w.start_agent(&dir);
    let enforced = |what: &str| w.assert_tcp(&[7200], &[7201], what);
    enforced("before");
    let mut rejected = 0;
    let mut refuse = |path: &Path, needle: &str, agent: &mut Agent| {
        agent
            .wait_for("policy rejected", rejected, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        rejected += 1;
        let log = agent.log_text();
        assert!(
            log.contains(&path.display().to_string()) && log.contains(needle),
            "{needle}: {log}"
        );
        std::fs::remove_file(path).expect("remove");
    };
    let fifo = dir.0.join("zz-fifo.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    refuse(&fifo, "not a regular file", &mut agent);
    enforced("after a FIFO");
    let zero = dir.0.join("zz-zero.yaml");
    std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
    refuse(&zero, "not a regular file inside", &mut agent);
    enforced("after a symlink to /dev/zero");
    let deep = dir.0.join("zz-deep.yaml");
    std::fs::write(&deep, format!("a: {}", "[".repeat(100_000))).expect("write");
    refuse(&deep, "nested deeper than", &mut agent);
    enforced("after deep nesting");
    assert!(agent.stop().success(), "SIGTERM answered");
}

/// What the kernel delivers locally is host-bound and meets the normal
/// stage: UDP to the subnet's directed broadcast, and to an address added
/// to the interface a moment ago (no poll between). The normal stage
/// denies UDP 7302; 7303 is allowed (the control: such packets do arrive).
#[test]
fn broadcasts_and_fresh_addresses_meet_the_normal_stage() {
    if !privileged("broadcasts_and_fresh_addresses_meet_the_normal_stage") {
        return;
    }
    let w = Wire::new("fwhb");
    let _servers: Vec<UdpServer> = [7302, 7303]
        .into_iter()
        .map(|port| {
            UdpServer::start(
                &w.p.worker,
                format!("0.0.0.0:{port}").parse().expect("addr"),
                "u",
            )
        })
        .collect();
    // The worker learns the client's MAC address.
    let _ = filter_tests::udp_probe(&w.p.client, Pair::worker(7303), T);
    let to = |dst: [u8; 4], mac: [u8; 6], sport: u16, dport: u16| {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(w.client_mac, mac)
            .ipv4(Pair::CLIENT_V4, dst, 64)
            .udp(sport, dport)
            .write(&mut v, b"knock")
            .expect("build");
        v
    };
    let broadcast = [192, 0, 2, 255];
    let all = [0xff; 6];
    w.raw.send(&to(broadcast, all, 44000, 7302));
    assert!(
        w.udp_answer(44000),
        "control: the kernel delivers a directed broadcast"
    );

    let dir = demo::TempDir::new(&unique("fwhb"));
    let deny_7302 = "---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-7302}
spec:
  selector: role == 'pub'
  order: 50
  ingress:
  - action: Deny
    protocol: UDP
    destination: {ports: [7302]}
";
    std::fs::write(dir.0.join("policy.yaml"), format!("{POLICY}{deny_7302}")).expect("write");
    let pins = Path::new("/sys/fs/bpf").join(unique("fwhb"));
    let mut agent = Agent::start(&agent_binary(), &w.p.worker, &dir.0, "pair", &pins);
    agent
        .wait_for("policy applied", 0, Duration::from_secs(15))
        .expect("applied");
    w.raw.send(&to(broadcast, all, 45000, 7303));
    assert!(w.udp_answer(45000), "a broadcast to an allowed port");
    w.raw.send(&to(broadcast, all, 45001, 7302));
    assert!(
        !w.udp_answer(45001),
        "a directed broadcast reached the denied port"
    );

    // An address added now is local at once: the frame follows within
    // milliseconds, long before the agent's next interface poll (1 s).
    w.p.worker
        .ip(&["addr", "add", "192.0.2.77/24", "dev", "eth1"]);
    let fresh = [192, 0, 2, 77];
    w.raw.send(&to(fresh, w.worker_mac, 45002, 7302));
    assert!(
        !w.udp_answer(45002),
        "a fresh address reached the denied port"
    );
    w.raw.send(&to(fresh, w.worker_mac, 45003, 7303));
    assert!(w.udp_answer(45003), "a fresh address, allowed port");
}

/// A policy file emptied while it is rewritten keeps its resources in
/// force (the host endpoint stays, the programs stay attached) until it has
/// resources again; a policy directory replaced by a new one is watched
/// anew.
#[test]
fn rewritten_files_and_replaced_directories_keep_enforcement() {
    if !privileged("rewritten_files_and_replaced_directories_keep_enforcement") {
        return;
    }
    let w = Wire::new("fwrw");
    let dir = demo::TempDir::new(&unique("fwrw"));
    let mut agent = w.start_agent(&dir);
    w.assert_tcp(&[7200], &[7201], "before");
    let file = dir.0.join("policy.yaml");

    // Truncated, as `>` or an editor's save does, then written again.
    std::fs::write(&file, "").expect("truncate");
    agent
        .wait_for("has no resources", 0, Duration::from_secs(10))
        .expect("the empty file is noticed");
    w.assert_tcp(&[7200], &[7201], "while the file is empty");
    let applied = agent.count("policy applied");
    std::fs::write(
        &file,
        POLICY.replace("ports: [7200]", "ports: [7200, 7201]"),
    )
    .expect("rewrite");
    agent
        .wait_for("policy applied", applied, Duration::from_secs(10))
        .expect("the new content applies");
    w.assert_tcp(&[7200, 7201], &[], "after the rewrite");

    // The directory replaced: moved away, created again with new content.
    let old = dir.0.with_extension("old");
    std::fs::rename(&dir.0, &old).expect("move the directory away");
    std::fs::create_dir(&dir.0).expect("create it again");
    std::fs::write(dir.0.join("policy.yaml"), POLICY).expect("write");
    let result = agent.wait_for("policy directory was replaced", 0, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&old);
    result.expect("the new directory is watched");
    agent
        .wait_for("policy applied", applied + 1, Duration::from_secs(10))
        .expect("the new directory's policy applies");
    w.assert_tcp(&[7200], &[7201], "the new directory's policy");
    let applied = agent.count("policy applied");
    std::fs::write(
        dir.0.join("policy.yaml"),
        POLICY.replace("ports: [7200]", "ports: [7201]"),
    )
    .expect("edit in the new directory");
    agent
        .wait_for("policy applied", applied, Duration::from_secs(10))
        .expect("the edit applies");
    w.assert_tcp(&[7201], &[7200], "an edit in the new directory");
}

/// A host endpoint bound by `expectedIPs` binds when its address appears,
/// also while the policy directory is refused: the agent compiles the
/// resources in force again for the interfaces of now, not the stale
/// compiled policy.
#[test]
fn an_address_appearing_binds_its_endpoint_while_the_source_is_refused() {
    if !privileged("an_address_appearing_binds_its_endpoint_while_the_source_is_refused") {
        return;
    }
    let w = Wire::new("fwip");
    let dir = demo::TempDir::new(&unique("fwip"));
    let by_ip = POLICY.replace(
        "spec: {node: pair, interfaceName: eth1}",
        "spec: {node: pair, expectedIPs: [192.0.2.50]}",
    );
    std::fs::write(dir.0.join("policy.yaml"), by_ip).expect("write");
    let pins = Path::new("/sys/fs/bpf").join(unique("fwip"));
    let mut agent = Agent::start(&agent_binary(), &w.p.worker, &dir.0, "pair", &pins);
    agent
        .wait_for("policy applied", 0, Duration::from_secs(15))
        .expect("applied");
    w.assert_tcp(&[], &[7200, 7201], "no interface holds 192.0.2.50 yet");
    std::fs::write(
        dir.0.join("zz-bad.yaml"),
        "kind: GlobalNetworkPolicy\nspec: [",
    )
    .expect("write");
    agent
        .wait_for("policy rejected", 0, Duration::from_secs(10))
        .expect("the bad file is refused");
    let applied = agent.count("policy applied");
    w.p.worker
        .ip(&["addr", "add", "192.0.2.50/24", "dev", "eth1"]);
    agent
        .wait_for("policy applied", applied, Duration::from_secs(10))
        .expect("the policy in force is compiled again for the new address");
    w.assert_tcp(&[7200], &[7201], "the endpoint is bound to eth1 now");
}

/// A policy refused from the start is reported once, not again at every
/// interface poll while nothing changes (the agent polls every second
/// here); it is compiled again when an interface appears.
#[test]
fn a_refused_policy_is_reported_once_while_nothing_changes() {
    if !privileged("a_refused_policy_is_reported_once_while_nothing_changes") {
        return;
    }
    let ns = filter_tests::Netns::new(&unique("fwonce"));
    let dir = demo::TempDir::new(&unique("fwonce"));
    std::fs::write(
        dir.0.join("policy.yaml"),
        "kind: GlobalNetworkPolicy\nspec: [",
    )
    .expect("write");
    let pins = Path::new("/sys/fs/bpf").join(unique("fwonce"));
    let mut agent = Agent::start(&agent_binary(), &ns, &dir.0, "once", &pins);
    agent
        .wait_for("policy rejected", 0, Duration::from_secs(10))
        .expect("refused");
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(agent.count("policy rejected"), 1, "{}", agent.log_text());
    ns.ip(&[
        "link", "add", "once0", "type", "veth", "peer", "name", "once1",
    ]);
    agent
        .wait_for("policy rejected", 1, Duration::from_secs(10))
        .expect("compiled again for the new interface");
}
