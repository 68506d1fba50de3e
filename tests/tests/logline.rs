//! The LOG line, with the kernel as the oracle: crafted frames go from the
//! client to the worker, where an nftables `log` rule in the prerouting
//! hook has the kernel print its own line (to /dev/kmsg, with
//! `net.netfilter.nf_log_all_netns=1`, restored afterwards) and an
//! AF_PACKET socket captures the same frame for
//! `filter_agent::events::logline`. The two lines must be equal.

use std::{
    io::{BufRead, BufReader, Seek},
    os::unix::fs::OpenOptionsExt,
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use filter_agent::events::logline::{line, Context};
use filter_tests::{internet_checksum, mac, privileged, sh, unique, Pair, RawLink};

const T: Duration = Duration::from_secs(3);

/// Both tests turn `nf_log_all_netns` on and restore it as they end: one
/// at a time, or the first to end would turn it off under the other.
static NF_LOG_ALL_NETNS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Sets a sysctl for the test's duration.
struct Sysctl {
    key: &'static str,
    old: String,
}

impl Sysctl {
    fn set(key: &'static str, value: &str) -> Sysctl {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let old = std::fs::read_to_string(&path)
            .expect("read sysctl")
            .trim()
            .to_owned();
        std::fs::write(&path, value).expect("write sysctl");
        Sysctl { key, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let path = format!("/proc/sys/{}", self.key.replace('.', "/"));
        let _ = std::fs::write(path, &self.old);
    }
}

/// An IPv4 frame from the client to the worker with the header fields the
/// LOG line shows, and a valid header checksum (else the kernel drops it
/// before any hook).
#[allow(clippy::too_many_arguments)]
fn ipv4(
    macs: ([u8; 6], [u8; 6]),
    tos: u8,
    id: u16,
    frag: u16,
    proto: u8,
    options: &[u8],
    payload: &[u8],
    tot_len: Option<u16>,
) -> Vec<u8> {
    let ihl = 5 + options.len() / 4;
    let len = tot_len.unwrap_or((ihl * 4 + payload.len()) as u16);
    let mut h = vec![0x40 | ihl as u8, tos];
    h.extend(len.to_be_bytes());
    h.extend(id.to_be_bytes());
    h.extend(frag.to_be_bytes());
    h.extend([64, proto, 0, 0]);
    h.extend(Pair::CLIENT_V4);
    h.extend(Pair::WORKER_V4);
    h.extend(options);
    let sum = internet_checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut f = Vec::new();
    f.extend(macs.1);
    f.extend(macs.0);
    f.extend([0x08, 0x00]);
    f.extend(h);
    f.extend(payload);
    f
}

fn tcp_header(sport: u16, dport: u16, flags: u8, reserved: u8) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend(sport.to_be_bytes());
    t.extend(dport.to_be_bytes());
    t.extend(1000u32.to_be_bytes());
    t.extend(0u32.to_be_bytes());
    t.extend([0x50 | (reserved & 0x0f), flags]);
    t.extend(29200u16.to_be_bytes());
    t.extend([0, 0, 0, 7]);
    t
}

#[test]
fn the_log_line_is_the_kernels_own() {
    if !privileged("the_log_line_is_the_kernels_own") {
        return;
    }
    let p = Pair::new("fwl");
    let prefix = format!("{}: ", unique("fwlog"));
    // Every packet (neighbour discovery aside).
    let _logging = kernel_logs(&p, "", &prefix);
    let client = RawLink::open(&p.client, "eth0");
    let worker = RawLink::open(&p.worker, "eth1");
    let macs = (mac(&p.client, "eth0"), mac(&p.worker, "eth1"));
    let mut kmsg = kmsg_from_now();

    let mut udp_inner = Vec::new();
    udp_inner.extend(
        ipv4(
            macs,
            0,
            1,
            0,
            17,
            &[],
            &[0x9c, 0x40, 0, 53, 0, 13, 0, 0],
            None,
        )[14..]
            .to_vec(),
    );
    let six = |b: etherparse::PacketBuilderStep<etherparse::Ethernet2Header>| {
        b.ipv6(
            "2001:db8::10"
                .parse::<std::net::Ipv6Addr>()
                .expect("v6")
                .octets(),
            "2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .expect("v6")
                .octets(),
            64,
        )
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "TCP SYN, DF",
            ipv4(
                macs,
                0,
                7238,
                0x4000,
                6,
                &[],
                &tcp_header(54321, 7000, 0x02, 0),
                None,
            ),
        ),
        (
            "TCP with every flag, reserved bits and DSCP",
            ipv4(
                macs,
                0xb8,
                9,
                0,
                6,
                &[],
                &tcp_header(1, 2, 0xff, 0x0f),
                None,
            ),
        ),
        (
            "UDP",
            ipv4(
                macs,
                0,
                10,
                0,
                17,
                &[],
                &[
                    0x30, 0x39, 0x1f, 0x90, 0, 13, 0, 0, b'h', b'e', b'l', b'l', b'o',
                ],
                None,
            ),
        ),
        (
            "UDPLite",
            ipv4(
                macs,
                0,
                11,
                0,
                136,
                &[],
                &[0x30, 0x39, 0x1f, 0x90, 0, 8, 0, 0],
                None,
            ),
        ),
        (
            "SCTP",
            ipv4(
                macs,
                0,
                12,
                0,
                132,
                &[],
                &[0x30, 0x39, 0x1f, 0x90, 0, 0, 0, 0, 0, 0, 0, 0],
                None,
            ),
        ),
        (
            "ICMP echo request",
            ipv4(
                macs,
                0,
                13,
                0,
                1,
                &[],
                &[8, 0, 0, 0, 0x12, 0x34, 0, 1],
                None,
            ),
        ),
        ("ICMP port unreachable with the inner packet", {
            let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
            icmp.extend(&udp_inner);
            ipv4(macs, 0, 14, 0, 1, &[], &icmp, None)
        }),
        ("ICMP fragmentation needed, MTU", {
            let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0xdc];
            icmp.extend(&udp_inner);
            ipv4(macs, 0, 15, 0, 1, &[], &icmp, None)
        }),
        (
            "ICMP echo too short: INCOMPLETE",
            ipv4(macs, 0, 16, 0, 1, &[], &[8, 0, 0, 0], None),
        ),
        (
            "IPv4 options and DF",
            ipv4(
                macs,
                0,
                17,
                0x4000,
                6,
                &[1, 1, 1, 0],
                &tcp_header(5, 6, 0x02, 0),
                None,
            ),
        ),
        (
            "first fragment, MF",
            ipv4(
                macs,
                0,
                18,
                0x2000,
                17,
                &[],
                &[0x30, 0x39, 0x1f, 0x90, 0, 40, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
                None,
            ),
        ),
        (
            "later fragment",
            ipv4(
                macs,
                0,
                18,
                0x0002,
                17,
                &[],
                &[9, 10, 11, 12, 13, 14, 15, 16],
                None,
            ),
        ),
        (
            "the evil bit (CE)",
            ipv4(
                macs,
                0,
                19,
                0x8000,
                17,
                &[],
                &[0, 1, 0, 2, 0, 8, 0, 0],
                None,
            ),
        ),
        (
            "another protocol",
            ipv4(macs, 0, 20, 0, 47, &[], &[0, 0, 0x08, 0x00], None),
        ),
        ("IPv6 TCP SYN", {
            let mut v = Vec::new();
            six(PacketBuilder::ethernet2(macs.0, macs.1))
                .tcp(40000, 7000, 1, 64800)
                .syn()
                .write(&mut v, &[])
                .expect("build");
            v
        }),
        ("IPv6 UDP", {
            let mut v = Vec::new();
            six(PacketBuilder::ethernet2(macs.0, macs.1))
                .udp(40001, 53)
                .write(&mut v, b"query")
                .expect("build");
            v
        }),
        ("ICMPv6 echo request", {
            let mut v = Vec::new();
            six(PacketBuilder::ethernet2(macs.0, macs.1))
                .icmpv6_echo_request(0x4242, 3)
                .write(&mut v, b"ping")
                .expect("build");
            v
        }),
    ];
    let mut mismatches = Vec::new();
    for (what, frame) in &cases {
        let sent_at = Instant::now();
        client.send(frame);
        let Some(seen) = worker.capture(T, |f| {
            f == frame.as_slice() || f.starts_with(&frame[..frame.len().min(60)])
        }) else {
            panic!("{what}: the worker never saw the frame");
        };
        let kernel = next_line(&mut kmsg, &prefix, sent_at)
            .unwrap_or_else(|| panic!("{what}: no kernel line"));
        let ip_len = ip_length(&seen);
        let ours = line(
            &Context {
                prefix: &prefix,
                in_if: "eth1",
                out_if: "",
            },
            &seen,
            ip_len,
        );
        if ours.trim_end() != kernel.trim_end() {
            mismatches.push(format!("{what}:\n  kernel: {kernel}\n  ours:   {ours}"));
        }
    }

    // VLAN-tagged frames. The kernel's stack takes the tags out before
    // any hook and prints the MAC header without them; a tag that leads to
    // a VLAN sub-interface makes the line say `IN=` that interface, which
    // the agent finds from the record's tags (`reader::interface`). This
    // kernel is built without 802.1Q devices (CONFIG_VLAN_8021Q), so it
    // delivers, and logs, only priority-tagged frames (VLAN ID 0, the
    // 802.1p priority in the tag) on the parent: those are compared here.
    // (A raw socket sees the frame with its tag taken out too, so the line
    // is made from the frame as sent.)
    let eth1 = p
        .worker
        .run(|| nix::net::if_::if_nametoindex("eth1").expect("eth1 index"));
    let tagged = |tags: &[[u8; 4]]| {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(macs.0, macs.1)
            .ipv4(Pair::CLIENT_V4, Pair::WORKER_V4, 64)
            .tcp(40000, 7000, 1, 64240)
            .syn()
            .write(&mut v, &[])
            .expect("build");
        for tag in tags.iter().rev() {
            v.splice(12..12, tag.iter().copied());
        }
        v
    };
    let vlan_cases = [
        (
            "802.1Q priority tag (priority 5, VLAN 0)",
            tagged(&[[0x81, 0, 0xa0, 0]]),
        ),
        (
            "802.1ad and 802.1Q priority tags",
            tagged(&[[0x88, 0xa8, 0x20, 0], [0x81, 0, 0xe0, 0]]),
        ),
    ];
    for (what, frame) in vlan_cases {
        let sent_at = Instant::now();
        client.send(&frame);
        let kernel = next_line(&mut kmsg, &prefix, sent_at)
            .unwrap_or_else(|| panic!("{what}: no kernel line"));
        let ids = filter_agent::events::logline::vlan_ids(&frame);
        assert!(!ids.is_empty(), "{what}: tags read");
        let in_if = p
            .worker
            .run(move || filter_agent::events::reader::interface(eth1, &ids));
        let ours = line(
            &Context {
                prefix: &prefix,
                in_if: &in_if,
                out_if: "",
            },
            &frame,
            filter_agent::events::logline::ip_length(&frame, frame.len()),
        );
        if ours.trim_end() != kernel.trim_end() {
            mismatches.push(format!("{what}:\n  kernel: {kernel}\n  ours:   {ours}"));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

/// The IP packet's length as the kernel sees it at prerouting (the frame
/// trimmed to the IP header's length).
fn ip_length(frame: &[u8]) -> usize {
    let l3 = &frame[14..];
    match frame[12..14] {
        [0x08, 0x00] => usize::from(u16::from_be_bytes([l3[2], l3[3]])).min(l3.len()),
        _ => (usize::from(u16::from_be_bytes([l3[4], l3[5]])) + 40).min(l3.len()),
    }
}

/// Has the kernel log, with `prefix`, the packets the worker's eth1 (and
/// its VLAN sub-interfaces) receives that `filter` (nftables) selects, at prerouting (what XDP and
/// TC ingress see): with `nf_log_all_netns` on for as long as the returned
/// guard lives, one test at a time.
fn kernel_logs(p: &Pair, filter: &str, prefix: &str) -> KernelLogs {
    let one_at_a_time = NF_LOG_ALL_NETNS.lock().unwrap_or_else(|e| e.into_inner());
    let all_netns = Sysctl::set("net.netfilter.nf_log_all_netns", "1");
    sh(
        "ip",
        &[
            "netns",
            "exec",
            p.worker.name(),
            "nft",
            &format!(
                "add table inet t; add chain inet t pre {{ type filter hook prerouting priority -500; }}; \
                 add rule inet t pre icmpv6 type {{ 133, 134, 135, 136, 143 }} accept; \
                 add rule inet t pre iifname \"eth1*\" {filter} log prefix \"{prefix}\""
            ),
        ],
    );
    KernelLogs {
        _all_netns: all_netns,
        _one_at_a_time: one_at_a_time,
    }
}

/// The sysctl and the lock that makes it one test's at a time. Fields drop
/// in declaration order: the sysctl is restored before the lock is let go,
/// else the next test would read our "1" as the value to restore and we
/// would then turn logging off under it.
struct KernelLogs {
    _all_netns: Sysctl,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

/// The kernel log from now on, read without blocking (a read at the end
/// says so instead of waiting).
fn kmsg_from_now() -> BufReader<std::fs::File> {
    let mut kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .expect("open /dev/kmsg");
    kmsg.seek(std::io::SeekFrom::End(0)).expect("seek kmsg");
    BufReader::new(kmsg)
}

/// The next kernel log line with `prefix`, read from /dev/kmsg.
fn next_line(kmsg: &mut BufReader<std::fs::File>, prefix: &str, since: Instant) -> Option<String> {
    let deadline = since + T;
    let mut text = String::new();
    while Instant::now() < deadline {
        text.clear();
        match kmsg.read_line(&mut text) {
            Ok(0) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            // A record overwritten before we read it: go on with the next.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => return None,
        }
        if let Some((_, msg)) = text.split_once(';') {
            if let Some(at) = msg.find(prefix) {
                return Some(msg[at..].trim_end_matches('\n').to_owned());
            }
        }
    }
    None
}

/// The running agent's lines for Log rules, beside the kernel's own for the
/// same packets: a pre-DNAT Log rule (written at XDP) and a normal-stage
/// one (at TC ingress), each logging the first packet of a flow only (the
/// rest is conntrack's). Both let the packets on to the kernel's stack, so
/// its nftables log rule sees them too.
#[test]
fn the_agent_prints_the_kernels_line_for_log_rules() {
    if !privileged("the_agent_prints_the_kernels_line_for_log_rules") {
        return;
    }
    use filter_tests::{agent_binary, demo, tcp_probe, Agent, TcpServer};
    let p = Pair::new("fwla");
    let _s7000 = TcpServer::start(&p.worker, "0.0.0.0:7000".parse().expect("addr"), "7000");
    let _s7001 = TcpServer::start(&p.worker, "0.0.0.0:7001".parse().expect("addr"), "7001");
    // The kernel logs every TCP packet to 7000 and 7001 with Calico's
    // prefix.
    let _logging = kernel_logs(&p, "tcp dport { 7000, 7001 }", "calico-packet: ");
    let policy = "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: w, labels: {role: pub}}\nspec: {node: pair, interfaceName: eth1}\n---\n\
apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: log-7000}\nspec:\n  preDNAT: true\n  applyOnForward: true\n  selector: role == 'pub'\n  ingress:\n  - action: Log\n    protocol: TCP\n    destination: {ports: [7000]}\n---\n\
apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: log-7001}\nspec:\n  selector: role == 'pub'\n  types: [Ingress]\n  ingress:\n  - action: Log\n    protocol: TCP\n    destination: {ports: [7001]}\n  - action: Allow\n";
    let dir = demo::TempDir::new(&unique("fwlad"));
    std::fs::write(dir.0.join("p.yaml"), policy).expect("write policy");
    let pins = std::path::Path::new("/sys/fs/bpf").join(unique("fwla"));
    // Syslog: a datagram socket standing in for /dev/log.
    let syslog_path = dir.0.join("log.sock");
    let syslog = std::os::unix::net::UnixDatagram::bind(&syslog_path).expect("bind syslog");
    syslog
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut agent = Agent::start_with(
        &agent_binary(),
        &p.worker,
        &dir.0,
        "pair",
        &pins,
        &[
            "--detach-on-exit",
            "--syslog",
            "--syslog-socket",
            syslog_path.to_str().expect("utf-8"),
            "--kernel-log-level",
            "error",
        ],
    );
    agent
        .wait_for("policy applied", 0, Duration::from_secs(15))
        .expect("applied");
    let mut kmsg = kmsg_from_now();

    // 7000: logged at XDP (pre-DNAT).
    let since = Instant::now();
    assert_eq!(
        tcp_probe(&p.client, Pair::worker(7000), Duration::from_millis(1500)).as_deref(),
        Ok("7000")
    );
    let kernel_7000 = next_line(&mut kmsg, "calico-packet: ", since).expect("kernel line for 7000");
    // 7001: logged in the normal stage for the first packet of the flow
    // only; the rest of the connection is conntrack's.
    let since = Instant::now();
    assert_eq!(
        tcp_probe(&p.client, Pair::worker(7001), Duration::from_millis(1500)).as_deref(),
        Ok("7001")
    );
    let mut kernel_7001 = Vec::new();
    while let Some(l) = next_line(&mut kmsg, "calico-packet: ", since) {
        if l.contains("DPT=7001") {
            kernel_7001.push(l);
        }
        if kernel_7001.len() >= 3 {
            break;
        }
    }
    let ours = agent.output_once("DPT=7001", Duration::from_secs(5));
    let first = |port: &str, lines: &[String]| {
        lines
            .iter()
            .find(|l| l.contains(port))
            .map(|l| l.trim_end().to_owned())
    };
    assert_eq!(
        first("DPT=7000", &ours),
        Some(kernel_7000.trim_end().to_owned()),
        "the pre-DNAT Log rule's line (XDP); ours: {ours:?}"
    );
    assert_eq!(
        first("DPT=7001", &ours),
        kernel_7001.first().map(|l| l.trim_end().to_owned()),
        "the normal-stage Log rule's line (TC ingress); ours: {ours:?}"
    );
    for port in ["DPT=7000", "DPT=7001"] {
        assert_eq!(
            ours.iter().filter(|l| l.contains(port)).count(),
            1,
            "one record per new flow ({port}; the kernel saw {} packets to 7001): {ours:?}",
            kernel_7001.len()
        );
    }
    // The same lines went to syslog, at facility kern, level notice.
    let mut buf = [0u8; 1024];
    let n = syslog.recv(&mut buf).expect("a syslog datagram");
    let sent = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(
        Some(sent.as_str()),
        first("DPT=7000", &ours)
            .map(|l| format!("<5>{l}"))
            .as_deref(),
        "syslog"
    );

    // `filter-agent logs` has the same records as JSON, named.
    let logs = |extra: &[&str]| -> Vec<serde_json::Value> {
        let out = std::process::Command::new(agent_binary())
            .args(["logs", "--output", "json", "--pin-dir"])
            .arg(&pins)
            .args(extra)
            .output()
            .expect("run logs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON record"))
            .collect()
    };
    let records = logs(&[]);
    let r7000 = records
        .iter()
        .find(|r| r["DPT"] == "7000")
        .unwrap_or_else(|| panic!("{records:?}"));
    assert_eq!(r7000["policy"], "log-7000", "{r7000}");
    assert_eq!(r7000["tier"], "default", "{r7000}");
    assert_eq!(r7000["rule"], 0, "{r7000}");
    assert_eq!(r7000["stage"], "pre-dnat", "{r7000}");
    assert_eq!(r7000["direction"], "ingress", "{r7000}");
    assert_eq!(r7000["verdict"], "log", "{r7000}");
    assert_eq!(r7000["hook"], "xdp", "{r7000}");
    assert_eq!(r7000["SRC"], "192.0.2.10", "{r7000}");
    assert_eq!(r7000["line"].as_str(), first("DPT=7000", &ours).as_deref());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let at = r7000["time"].as_f64().expect("time");
    assert!((now - at).abs() < 60.0, "record time {at} vs now {now}");
    let only = logs(&["--policy", "log-7001"]);
    assert!(
        !only.is_empty()
            && only
                .iter()
                .all(|r| r["policy"] == "log-7001" && r["stage"] == "normal"),
        "{only:?}"
    );
    // Following: a new flow's record arrives while `logs --follow` runs.
    let mut follow = std::process::Command::new(agent_binary())
        .args(["logs", "--follow", "--pin-dir"])
        .arg(&pins)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("logs --follow");
    let stdout = follow.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let before = ours.iter().filter(|l| l.contains("DPT=7001")).count();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        tcp_probe(&p.client, Pair::worker(7001), Duration::from_millis(1500)).as_deref(),
        Ok("7001")
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut followed = 0;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.contains("DPT=7001") => followed += 1,
            _ => {}
        }
        if followed > before {
            break;
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(followed > before, "the new flow's record was followed");

    // VLAN-tagged frames (priority tags: this kernel has no 802.1Q
    // devices, see `the_log_line_is_the_kernels_own`). At XDP the tag is in
    // the frame the record keeps; at TC the kernel has moved it into the
    // skb, and the record carries it. Either way the line is the kernel's.
    let raw = RawLink::open(&p.client, "eth0");
    let macs = (mac(&p.client, "eth0"), mac(&p.worker, "eth1"));
    for (port, sport, hook) in [(7000u16, 40700u16, "XDP"), (7001, 40701, "TC ingress")] {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(macs.0, macs.1)
            .ipv4(Pair::CLIENT_V4, Pair::WORKER_V4, 64)
            .tcp(sport, port, 1, 64240)
            .syn()
            .write(&mut frame, &[])
            .expect("build");
        frame.splice(12..12, [0x81, 0x00, 0xa0, 0x00]);
        let since = Instant::now();
        raw.send(&frame);
        let needle = format!("SPT={sport} ");
        let kernel = std::iter::from_fn(|| next_line(&mut kmsg, "calico-packet: ", since))
            .find(|l| l.contains(&needle))
            .unwrap_or_else(|| panic!("{hook}: no kernel line for the tagged SYN"));
        let ours = agent
            .output_once(&needle, Duration::from_secs(5))
            .into_iter()
            .find(|l| l.contains(&needle));
        assert_eq!(
            ours.as_deref().map(str::trim_end),
            Some(kernel.trim_end()),
            "{hook}: a priority-tagged SYN to {port}"
        );
    }
    // The JSON says which tags the packet had: the TC record's tag came
    // from the skb, not the frame.
    let records = logs(&[]);
    for (sport, hook) in [("40700", "xdp"), ("40701", "tc-ingress")] {
        let r = records
            .iter()
            .find(|r| r["SPT"] == sport)
            .unwrap_or_else(|| panic!("no record from port {sport}: {records:?}"));
        assert_eq!(r["hook"], hook, "{r}");
        assert_eq!(r["vlan"], serde_json::json!([0]), "{r}");
    }
    assert!(
        records
            .iter()
            .all(|r| r["SPT"] == "40700" || r["SPT"] == "40701" || r.get("vlan").is_none()),
        "only tagged packets name tags: {records:?}"
    );

    // A stopped reader (SIGSTOP) costs the dataplane nothing: new flows
    // keep being logged into the ring (or counted lost) and let through.
    let pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    for _ in 0..20 {
        assert_eq!(
            tcp_probe(&p.client, Pair::worker(7001), Duration::from_millis(1500)).as_deref(),
            Ok("7001"),
            "verdicts unchanged while the reader is stopped"
        );
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");

    // `--kernel-log-level error`: the programs' own diagnostics reach the
    // agent's log. Tables made inconsistent behind its back are reported
    // by the classifier.
    filter_tests::break_generation(&pins);
    assert_eq!(
        tcp_probe(&p.client, Pair::worker(7001), Duration::from_millis(1500)).as_deref(),
        Ok("7001"),
        "unjudged packets pass"
    );
    agent
        .wait_for("classifier tables inconsistent", 0, Duration::from_secs(5))
        .expect("the kernel's diagnostic in the agent's log");
    assert!(agent.stop().success());
}
