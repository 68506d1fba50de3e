//! End to end, stateful: conntrack, default deny, untracked symmetry,
//! failsafe and IPv6 with the real agent and real TCP/UDP/ICMP between two
//! network namespaces (docs/semantics.md 3.4, 3.5, 3.8, 4).

use std::{net::SocketAddr, path::Path, time::Duration};

use filter_tests::{
    agent_binary, demo, kernel_conntrack_on, ping, privileged, tcp_probe, udp_probe, unique, Agent,
    Conn, EchoServer, Pair, TcpServer, UdpServer,
};

const T: Duration = Duration::from_millis(1500);

const HEP: &str = "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: w, labels: {role: pub}}\nspec: {node: pair, interfaceName: eth1}\n";

/// A global policy on the endpoint, `body` being the spec lines after the
/// selector (indented by two spaces).
fn gnp(name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  selector: role == 'pub'\n{body}"
    )
}

/// An agent on the pair's worker with `policy` (HEP included by caller).
struct Setup {
    _dir: demo::TempDir,
    file: std::path::PathBuf,
    agent: Agent,
}

fn start(p: &Pair, policy: &str) -> Setup {
    start_with(p, policy, &["--detach-on-exit"])
}

/// [`start`] with other agent arguments.
fn start_with(p: &Pair, policy: &str, args: &[&str]) -> Setup {
    let dir = demo::TempDir::new(&unique("fwst"));
    let file = dir.0.join("policy.yaml");
    std::fs::write(&file, policy).expect("write policy");
    let pins = Path::new("/sys/fs/bpf").join(unique("fwst"));
    let mut agent = Agent::start_with(&agent_binary(), &p.worker, &dir.0, "pair", &pins, args);
    agent
        .wait_for("policy applied", 0, Duration::from_secs(15))
        .expect("applied");
    Setup {
        _dir: dir,
        file,
        agent,
    }
}

impl Setup {
    /// Replaces the policy and waits until the agent applied it.
    fn change(&mut self, policy: &str) {
        let seen = self.agent.count("policy applied");
        std::fs::write(&self.file, policy).expect("write policy");
        self.agent
            .wait_for("policy applied", seen, Duration::from_secs(10))
            .expect("applied");
    }
}

/// An agent (with `args`) allowing all ingress, a connection to the echo
/// server on 7100 opened, then a policy denying TCP 7100 applied: the
/// connection still echoes (it is established).
fn connected_then_denied(p: &Pair, args: &[&str]) -> (Setup, Conn) {
    let allow = format!(
        "{HEP}{}",
        gnp(
            "allow-in",
            "  types: [Ingress]\n  ingress:\n  - action: Allow\n"
        )
    );
    let mut s = start_with(p, &allow, args);
    let mut conn = Conn::open(&p.client, Pair::worker(7100), T).expect("connect while allowed");
    conn.echo("before").expect("echo while allowed");
    let deny = format!(
        "{allow}{}",
        gnp(
            "deny-7100",
            "  order: 10\n  types: [Ingress]\n  ingress:\n  - action: Deny\n    protocol: TCP\n    destination: {ports: [7100]}\n"
        )
    );
    s.change(&deny);
    conn.echo("after the deny")
        .expect("the established connection survives the new deny");
    (s, conn)
}

#[test]
fn established_connections_survive_a_new_deny_and_new_ones_are_judged() {
    if !privileged("established_connections_survive_a_new_deny_and_new_ones_are_judged") {
        return;
    }
    let p = Pair::new("fwes");
    let _echo = EchoServer::start(&p.worker, "0.0.0.0:7100".parse().expect("addr"));
    let (s, _conn) = connected_then_denied(&p, &["--detach-on-exit"]);
    assert!(
        Conn::open(&p.client, Pair::worker(7100), T).is_err(),
        "a new connection to 7100 is denied"
    );
    assert!(s.agent.stop().success());
}

#[test]
fn a_connection_opened_before_the_agent_starts_survives_its_first_enforcement() {
    if !privileged("a_connection_opened_before_the_agent_starts_survives_its_first_enforcement") {
        return;
    }
    let p = Pair::new("fwpre");
    // On a real node kube-proxy's rules switch the kernel's conntrack on.
    kernel_conntrack_on(&p.worker);
    let _echo = EchoServer::start(&p.worker, "0.0.0.0:7100".parse().expect("addr"));
    let mut conn = Conn::open(&p.client, Pair::worker(7100), T).expect("connect, no agent");
    conn.echo("no agent yet").expect("echo");

    // A bare host endpoint: everything but failsafe is denied.
    let s = start(&p, HEP);
    assert!(
        s.agent.log_text().contains("conntrack seeded"),
        "{}",
        s.agent.log_text()
    );
    conn.echo("enforced now")
        .expect("the operator's session survives the first enforcement");
    assert!(
        Conn::open(&p.client, Pair::worker(7100), T).is_err(),
        "a new connection is denied by the default deny"
    );
    assert!(s.agent.stop().success());
}

#[test]
fn replies_to_the_workers_own_connections_pass_its_default_deny_endpoint() {
    if !privileged("replies_to_the_workers_own_connections_pass_its_default_deny_endpoint") {
        return;
    }
    let p = Pair::new("fwrep");
    let _tcp = TcpServer::start(&p.client, Pair::client(7200), "client-tcp");
    let _udp = UdpServer::start(&p.client, Pair::client(7201), "client-udp");
    let _inbound = TcpServer::start(&p.worker, "0.0.0.0:7001".parse().expect("addr"), "7001");
    // Egress allowed, ingress has no policy: the default deny (3.5).
    let policy = format!(
        "{HEP}{}",
        gnp(
            "allow-out",
            "  types: [Egress]\n  egress:\n  - action: Allow\n"
        )
    );
    let s = start(&p, &policy);
    assert_eq!(
        tcp_probe(&p.worker, Pair::client(7200), T).as_deref(),
        Ok("client-tcp"),
        "TCP replies pass"
    );
    assert_eq!(
        udp_probe(&p.worker, Pair::client(7201), T).as_deref(),
        Ok("client-udp"),
        "UDP replies pass"
    );
    assert!(
        ping(&p.worker, Pair::client(0).ip()),
        "ICMP echo replies pass"
    );
    assert!(
        tcp_probe(&p.client, Pair::worker(7001), T).is_err(),
        "new inbound connections meet the default deny"
    );
    assert!(
        !ping(&p.client, Pair::worker(0).ip()),
        "inbound ping denied"
    );
    assert!(s.agent.stop().success());
}

#[test]
fn untracked_policy_needs_symmetric_rules() {
    if !privileged("untracked_policy_needs_symmetric_rules") {
        return;
    }
    let p = Pair::new("fwun");
    let _srv = TcpServer::start(&p.worker, "0.0.0.0:7300".parse().expect("addr"), "7300");
    let untracked_in = gnp(
        "untracked-in",
        "  doNotTrack: true\n  applyOnForward: true\n  types: [Ingress]\n  ingress:\n  - action: Allow\n    protocol: TCP\n    destination: {ports: [7300]}\n",
    );
    // Only the ingress half: the SYN is allowed untracked, so its SYN-ACK has
    // no conntrack entry and meets the endpoint's default deny.
    let one_way = format!("{HEP}{untracked_in}");
    let mut s = start(&p, &one_way);
    assert!(
        tcp_probe(&p.client, Pair::worker(7300), T).is_err(),
        "the reply of a one-way untracked allow is dropped"
    );
    let symmetric = format!(
        "{one_way}{}",
        gnp(
            "untracked-out",
            "  doNotTrack: true\n  applyOnForward: true\n  types: [Egress]\n  egress:\n  - action: Allow\n    protocol: TCP\n    source: {ports: [7300]}\n"
        )
    );
    s.change(&symmetric);
    assert_eq!(
        tcp_probe(&p.client, Pair::worker(7300), T).as_deref(),
        Ok("7300"),
        "with the egress half the connection works"
    );
    assert!(s.agent.stop().success());
}

#[test]
fn ssh_failsafe_stays_reachable_under_deny_all() {
    if !privileged("ssh_failsafe_stays_reachable_under_deny_all") {
        return;
    }
    let p = Pair::new("fwfs");
    let _ssh = TcpServer::start(&p.worker, "0.0.0.0:22".parse().expect("addr"), "ssh");
    let _other = TcpServer::start(&p.worker, "0.0.0.0:7001".parse().expect("addr"), "7001");
    // Deny everything in every stage and direction.
    let deny_all = |name: &str, extra: &str, egress: bool| {
        let mut body = format!("{extra}  ingress:\n  - action: Deny\n");
        if egress {
            body.push_str("  egress:\n  - action: Deny\n  types: [Ingress, Egress]\n");
        } else {
            body.push_str("  types: [Ingress]\n");
        }
        gnp(name, &body)
    };
    let policy = format!(
        "{HEP}{}{}{}",
        deny_all(
            "deny-untracked",
            "  doNotTrack: true\n  applyOnForward: true\n",
            true
        ),
        deny_all(
            "deny-pre-dnat",
            "  preDNAT: true\n  applyOnForward: true\n",
            false
        ),
        deny_all("deny-normal", "", true),
    );
    let s = start(&p, &policy);
    assert_eq!(
        tcp_probe(&p.client, Pair::worker(22), T).as_deref(),
        Ok("ssh"),
        "SSH is failsafe"
    );
    assert!(
        tcp_probe(&p.client, Pair::worker(7001), T).is_err(),
        "everything else is denied"
    );
    assert!(s.agent.stop().success());
}

#[test]
fn ipv6_is_enforced_like_ipv4() {
    if !privileged("ipv6_is_enforced_like_ipv4") {
        return;
    }
    let p = Pair::new("fwv6");
    let _a = TcpServer::start(&p.worker, "[::]:7000".parse().expect("addr"), "7000");
    let _b = TcpServer::start(&p.worker, "[::]:7001".parse().expect("addr"), "7001");
    let policy = format!(
        "{HEP}{}{}",
        gnp(
            "allow-v6-7001",
            "  types: [Ingress, Egress]\n  ingress:\n  - action: Allow\n    protocol: TCP\n    source: {nets: ['2001:db8::/64']}\n    destination: {ports: [7001]}\n  - action: Allow\n    protocol: ICMPv6\n  egress:\n  - action: Allow\n    protocol: ICMPv6\n"
        ),
        gnp(
            "deny-v6-7000",
            "  preDNAT: true\n  applyOnForward: true\n  ingress:\n  - action: Deny\n    protocol: TCP\n    source: {nets: ['2001:db8::10/128']}\n    destination: {ports: [7000]}\n"
        ),
    );
    let s = start(&p, &policy);
    let worker = |port: u16| SocketAddr::new(Pair::WORKER_V6.parse().expect("v6"), port);
    assert_eq!(
        tcp_probe(&p.client, worker(7001), T).as_deref(),
        Ok("7001"),
        "allowed over IPv6 (reply via conntrack)"
    );
    assert!(
        tcp_probe(&p.client, worker(7000), T).is_err(),
        "pre-DNAT deny over IPv6"
    );
    assert!(
        ping(&p.client, Pair::WORKER_V6.parse().expect("v6")),
        "ICMPv6 allowed (neighbour discovery too)"
    );
    // IPv4 meets the default deny: no IPv4 rule allows 7001.
    assert!(tcp_probe(&p.client, Pair::worker(7001), T).is_err());
    assert!(s.agent.stop().success());
}

#[test]
fn node_port_traffic_meets_the_forward_stage_after_dnat() {
    if !privileged("node_port_traffic_meets_the_forward_stage_after_dnat") {
        return;
    }
    let p = Pair::new("fwnp");
    // A "pod" behind the worker, and kube-proxy simulated by one nftables
    // DNAT rule: 192.0.2.1:30080 -> 10.244.0.5:80.
    let pod = p.node_port_to_pod("fwnpod");
    let _web = TcpServer::start(&pod, "0.0.0.0:80".parse().expect("addr"), "pod");
    let _host = TcpServer::start(&p.worker, "0.0.0.0:7001".parse().expect("addr"), "7001");
    let service = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: NodePort\n  selector: {app: web}\n  ports:\n  - {port: 80, targetPort: 80, nodePort: 30080}\n";
    let forward = |rule: &str| {
        format!(
            "{HEP}{service}{}",
            gnp(
                "forward-in",
                &format!("  applyOnForward: true\n  types: [Ingress]\n  ingress:\n{rule}")
            )
        )
    };
    // The forward stage sees the pod's port, 80: allowing 80 lets the
    // NodePort through.
    let mut s = start(
        &p,
        &forward("  - action: Allow\n    protocol: TCP\n    destination: {ports: [80]}\n"),
    );
    let node_port = Pair::worker(30080);
    assert_eq!(
        tcp_probe(&p.client, node_port, T).as_deref(),
        Ok("pod"),
        "NodePort reached through the forward stage (replies un-NATed)"
    );
    assert!(
        tcp_probe(&p.client, Pair::worker(7001), T).is_err(),
        "host-bound 7001: the policy's normal-stage copy allows only 80"
    );
    // Denying 80 in the forward stage blocks the NodePort.
    s.change(&forward(
        "  - action: Deny\n    protocol: TCP\n    destination: {ports: [80]}\n  - action: Allow\n",
    ));
    assert!(
        tcp_probe(&p.client, node_port, T).is_err(),
        "the forward stage denies the DNATed packet"
    );
    // A rule on the NodePort itself never matches after DNAT: the tier's
    // default deny drops it.
    s.change(&forward(
        "  - action: Allow\n    protocol: TCP\n    destination: {ports: [30080]}\n",
    ));
    assert!(
        tcp_probe(&p.client, node_port, T).is_err(),
        "forward rules see the post-DNAT port"
    );
    assert!(s.agent.stop().success());
}

/// Sends UDP probes from the client to `port` on the worker until `stop`;
/// returns (probes, probes whose outcome was not `answered`).
fn udp_sender(
    p: &Pair,
    port: u16,
    answered: bool,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u32, u32)> {
    p.client.spawn(move || {
        let (mut probes, mut wrong) = (0, 0);
        // A reply on a veth takes well under a millisecond.
        let wait = Duration::from_millis(if answered { 500 } else { 100 });
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            // A new socket: a new flow, judged by policy every time.
            let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.set_read_timeout(Some(wait)).expect("timeout");
            s.send_to(b"ping", Pair::worker(port)).expect("send");
            let mut buf = [0u8; 64];
            if s.recv_from(&mut buf).is_ok() != answered {
                wrong += 1;
            }
            probes += 1;
        }
        (probes, wrong)
    })
}

#[test]
fn sigkill_and_restart_under_traffic_never_open_or_close_the_node() {
    if !privileged("sigkill_and_restart_under_traffic_never_open_or_close_the_node") {
        return;
    }
    use std::sync::{atomic::AtomicBool, Arc};
    let p = Pair::new("fwkill");
    let _open = UdpServer::start(&p.worker, "0.0.0.0:7001".parse().expect("addr"), "7001");
    let _closed = UdpServer::start(&p.worker, "0.0.0.0:7000".parse().expect("addr"), "7000");
    let policy = format!(
        "{HEP}{}{}",
        gnp("allow-in", "  types: [Ingress]\n  ingress:\n  - action: Allow\n"),
        gnp(
            "deny-7000",
            "  preDNAT: true\n  applyOnForward: true\n  ingress:\n  - action: Deny\n    protocol: UDP\n    destination: {ports: [7000]}\n"
        )
    );
    let dir = demo::TempDir::new(&unique("fwkill"));
    std::fs::write(dir.0.join("policy.yaml"), &policy).expect("write policy");
    let pins = Path::new("/sys/fs/bpf").join(unique("fwkl"));
    let _cleanup = filter_tests::PinsGuard(pins.clone());
    // The agent an operator runs: no --detach-on-exit.
    let mut first = Agent::start_with(&agent_binary(), &p.worker, &dir.0, "pair", &pins, &[]);
    first
        .wait_for("policy applied", 0, Duration::from_secs(15))
        .expect("applied");
    let stop = Arc::new(AtomicBool::new(false));
    let allowed = udp_sender(&p, 7001, true, stop.clone());
    let denied = udp_sender(&p, 7000, false, stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    first.crash();
    std::thread::sleep(Duration::from_secs(1));
    let mut second = Agent::start(&agent_binary(), &p.worker, &dir.0, "pair", &pins);
    second
        .wait_for("policy applied", 0, Duration::from_secs(15))
        .expect("adopted and applied");
    assert!(
        second.log_text().contains("adopted"),
        "{}",
        second.log_text()
    );
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (a_probes, a_wrong) = allowed.join().expect("sender");
    let (d_probes, d_wrong) = denied.join().expect("sender");
    assert!(
        a_probes >= 100 && d_probes >= 20,
        "{a_probes} / {d_probes} probes"
    );
    assert_eq!(a_wrong, 0, "{a_wrong} of {a_probes} allowed probes dropped");
    assert_eq!(
        d_wrong, 0,
        "{d_wrong} of {d_probes} denied probes slipped through"
    );
    assert!(second.stop().success());
}

/// The conntrack flood of the hardening issue, for real: an established
/// connection to a port policy has since revoked survives 3,000 new
/// answered UDP flows through a 256-entry table (it is assured; the flood's
/// two-packet flows are not, and evict only each other).
#[test]
fn an_assured_connection_survives_a_flood_of_new_flows() {
    if !privileged("an_assured_connection_survives_a_flood_of_new_flows") {
        return;
    }
    let p = Pair::new("fwfl");
    let _echo = EchoServer::start(&p.worker, "0.0.0.0:7100".parse().expect("addr"));
    let _udp = UdpServer::start(&p.worker, Pair::worker(7300), "u");
    let (s, mut conn) = connected_then_denied(&p, &["--detach-on-exit", "--conntrack-size", "256"]);
    let answered = p.client.run(|| {
        let target = Pair::worker(7300);
        (0..3000)
            .filter(|_| {
                let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
                sock.set_read_timeout(Some(Duration::from_millis(300)))
                    .expect("timeout");
                sock.send_to(b"flood", target).expect("send");
                let mut buf = [0u8; 16];
                sock.recv_from(&mut buf).is_ok()
            })
            .count()
    });
    assert!(
        answered > 2900,
        "the flood's flows were answered: {answered}"
    );
    conn.echo("after the flood")
        .expect("the assured connection survives the flood");
    assert!(s.agent.stop().success());
}

/// A policy that outgrows the class arrays is enforced by new programs
/// with arrays of its size, which take the links over: the agent says so,
/// the new policy's verdicts hold on real connections, and a connection
/// opened before goes on (conntrack is shared by both programs).
#[test]
fn a_policy_that_outgrows_the_class_arrays_moves_to_new_programs_keeping_connections() {
    if !privileged(
        "a_policy_that_outgrows_the_class_arrays_moves_to_new_programs_keeping_connections",
    ) {
        return;
    }
    let p = Pair::new("fwgrow");
    let _echo = EchoServer::start(&p.worker, "0.0.0.0:7100".parse().expect("addr"));
    let _s7000 = TcpServer::start(&p.worker, "0.0.0.0:7000".parse().expect("addr"), "7000");
    let _s7001 = TcpServer::start(&p.worker, "0.0.0.0:7001".parse().expect("addr"), "7001");
    let (allow, deny, many) = (allow_in(), deny_port, many_classes());
    let mut s = start(&p, &format!("{HEP}{allow}{}", deny(7000)));
    let open = |port: u16| tcp_probe(&p.client, Pair::worker(port), T).is_ok();
    assert!(!open(7000) && open(7001), "the small policy");
    let mut conn = Conn::open(&p.client, Pair::worker(7100), T).expect("connect");
    conn.echo("before").expect("echo before");

    s.change(&format!("{HEP}{allow}{}{many}", deny(7001)));
    let log = s.agent.log_text();
    assert!(log.contains("classifier maps sized to the policy"), "{log}");
    assert!(open(7000) && !open(7001), "the big policy");
    conn.echo("after").expect("the connection goes on");
    let links = std::fs::read_dir(s.agent.pin_dir())
        .expect("pins")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains('@'))
        .count();
    assert_eq!(links, 3, "the same three links");
    assert!(s.agent.stop().success());
}

/// A policy allowing every ingress packet (the normal stage).
fn allow_in() -> String {
    gnp(
        "allow-in",
        "  types: [Ingress]\n  ingress:\n  - action: Allow\n",
    )
}

/// A pre-DNAT policy denying TCP to `port`.
fn deny_port(port: u16) -> String {
    gnp(
        "deny",
        &format!("  preDNAT: true\n  applyOnForward: true\n  ingress:\n  - action: Deny\n    protocol: TCP\n    destination: {{ports: [{port}]}}\n"),
    )
}

/// A pre-DNAT policy of 2,000 sources of a class each (10.i.j.0/24, not
/// the client's): more classes than the least room holds.
fn many_classes() -> String {
    let mut many = String::from("  preDNAT: true\n  applyOnForward: true\n  ingress:\n");
    for i in 0..2000u32 {
        let net = std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8));
        many += &format!("  - {{action: Deny, protocol: TCP, source: {{nets: [{net}/24]}}}}\n");
    }
    gnp("many", &many)
}

/// A first start whose policy outgrows the least room sizes the maps
/// before it loads the programs: it loads them once, and enforces.
#[test]
fn a_first_start_loads_its_programs_once_at_its_policy_s_size() {
    if !privileged("a_first_start_loads_its_programs_once_at_its_policy_s_size") {
        return;
    }
    let p = Pair::new("fwfirst");
    let _s7000 = TcpServer::start(&p.worker, "0.0.0.0:7000".parse().expect("addr"), "7000");
    let _s7001 = TcpServer::start(&p.worker, "0.0.0.0:7001".parse().expect("addr"), "7001");
    let s = start(
        &p,
        &format!("{HEP}{}{}{}", allow_in(), deny_port(7001), many_classes()),
    );
    let log = s.agent.log_text();
    assert!(
        log.contains("classifier maps sized to the policy before loading the programs"),
        "{log}"
    );
    assert!(!log.contains("loading programs with new maps"), "{log}");
    let open = |port: u16| tcp_probe(&p.client, Pair::worker(port), T).is_ok();
    assert!(open(7000) && !open(7001), "the policy is enforced");
    assert!(s.agent.stop().success());
}
