//! The seed tutorial (IBM Cloud, "Using Calico network policies to block
//! traffic") replayed with real connections.
//!
//! Topology: a switch namespace with a bridge joins two clients and a worker.
//! The worker's `eth1` is the host endpoint `ibm.role: worker_public`; it
//! holds the node address 198.51.100.1 and the load balancer address
//! 203.0.113.80. A TCP and a UDP server answer on node port 31000, a TCP
//! server on 203.0.113.80:80. The agent runs in the worker namespace on a
//! policy directory the demo edits lesson by lesson, as an operator applies
//! and deletes policies with calicoctl.

use std::{
    fmt::Write as _,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::{tcp_probe, udp_probe, veth, Agent, Netns, TcpServer, UdpServer};

/// Node name of the worker, as the HostEndpoint example names it.
pub const NODE: &str = "demo-worker";
const WORKER: &str = "198.51.100.1";
const LB: &str = "203.0.113.80";
const CLIENT1: &str = "198.51.100.10";
const CLIENT2: &str = "198.51.100.20";
const NODE_PORT: u16 = 31000;
/// How long a probe waits: a dropped SYN is retransmitted after 1 s, so a
/// connection that is not blocked answers well within this.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Pid of the running agent, for the Ctrl-C handler.
pub static AGENT_PID: AtomicU32 = AtomicU32::new(0);

/// What a probe should see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The server answered.
    Reached,
    /// No answer within the timeout.
    Blocked,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Reached => "reached",
            Outcome::Blocked => "BLOCKED",
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Client {
    One,
    Two,
}

#[derive(Debug, Clone, Copy)]
enum Target {
    NodePortTcp,
    NodePortUdp,
    LoadBalancer,
}

struct Probe(Client, Target, Outcome);

struct Step {
    title: &'static str,
    add: &'static [&'static str],
    remove: &'static [&'static str],
    /// The agent must reject the change and keep the last good policy.
    rejected: bool,
    probes: &'static [Probe],
}

use Client::*;
use Outcome::*;
use Target::*;

const STEPS: &[Step] = &[
    Step {
        title: "Lesson 1: the app is exposed on the node port and the load balancer",
        add: &["demo/host-endpoint.yaml", "demo/default-host-policies.yaml"],
        remove: &[],
        rejected: false,
        probes: &[
            Probe(One, NodePortTcp, Reached),
            Probe(One, NodePortUdp, Reached),
            Probe(One, LoadBalancer, Reached),
            Probe(Two, LoadBalancer, Reached),
        ],
    },
    Step {
        title:
            "Lesson 2: block all incoming traffic to all node ports (deny-nodeports, order 1100)",
        add: &["lessons/lesson2-deny-nodeports.yaml"],
        remove: &[],
        rejected: false,
        probes: &[
            Probe(One, NodePortTcp, Blocked),
            Probe(Two, NodePortTcp, Blocked),
            Probe(One, NodePortUdp, Blocked),
            Probe(One, LoadBalancer, Reached),
            Probe(Two, LoadBalancer, Reached),
        ],
    },
    Step {
        title: "Lesson 3: deny the load balancer (order 800), allow-list client 1 (order 500)",
        add: &[
            "lessons/lesson3-deny-lb-port-80.yaml",
            "lessons/lesson3-whitelist.yaml",
        ],
        remove: &[],
        rejected: false,
        probes: &[
            Probe(One, LoadBalancer, Reached),
            Probe(Two, LoadBalancer, Blocked),
            Probe(One, NodePortTcp, Blocked),
        ],
    },
    Step {
        title: "Lesson 4: delete the allow-list; deny-list client 1 (blacklist, order 500)",
        add: &["lessons/lesson4-blacklist.yaml"],
        remove: &[
            "lessons/lesson3-deny-lb-port-80.yaml",
            "lessons/lesson3-whitelist.yaml",
        ],
        rejected: false,
        probes: &[
            Probe(One, LoadBalancer, Blocked),
            Probe(Two, LoadBalancer, Reached),
            Probe(Two, NodePortTcp, Blocked),
        ],
    },
    Step {
        title: "Lesson 5: log the denied client's packets (log-denied-packets, order 300)",
        add: &["lessons/lesson5-log-denied-packets.yaml"],
        remove: &[],
        rejected: false,
        probes: &[
            Probe(One, LoadBalancer, Blocked),
            Probe(Two, LoadBalancer, Reached),
        ],
    },
    Step {
        title: "A broken policy file is rejected; the last good policy stays enforced",
        add: &["lessons/broken-policy.yaml"],
        remove: &[],
        rejected: true,
        probes: &[
            Probe(One, LoadBalancer, Blocked),
            Probe(Two, LoadBalancer, Reached),
        ],
    },
];

/// One probe's result.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// Human description (`client-1 198.51.100.10 -> ...`).
    pub what: String,
    /// Expected outcome.
    pub expected: Outcome,
    /// Observed outcome.
    pub observed: Outcome,
}

/// One step's result.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Step title.
    pub title: String,
    /// Probes in order.
    pub probes: Vec<ProbeReport>,
    /// The agent's LOG lines printed during the step (Log rules).
    pub log_lines: Vec<String>,
}

impl StepReport {
    /// Whether every probe saw what it expected.
    pub fn ok(&self) -> bool {
        self.probes.iter().all(|p| p.expected == p.observed)
    }
}

/// The demo's hosts; dropping it removes them.
pub struct Topology {
    /// Client 1.
    pub client1: Netns,
    /// Client 2.
    pub client2: Netns,
    /// The worker node.
    pub worker: Netns,
    _switch: Netns,
}

impl Topology {
    /// Builds the namespaces, links and addresses, names prefixed by `prefix`.
    pub fn build(prefix: &str) -> Topology {
        let switch = Netns::new(&format!("{prefix}-sw"));
        let client1 = Netns::new(&format!("{prefix}-c1"));
        let client2 = Netns::new(&format!("{prefix}-c2"));
        let worker = Netns::new(&format!("{prefix}-w"));
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        for (ns, inside, port, addr) in [
            (&client1, "eth0", "p-c1", CLIENT1),
            (&client2, "eth0", "p-c2", CLIENT2),
            (&worker, "eth1", "p-w", WORKER),
        ] {
            veth(ns, inside, &switch, port);
            switch.ip(&["link", "set", port, "master", "br0"]);
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", inside]);
        }
        worker.ip(&["addr", "add", &format!("{LB}/32"), "dev", "eth1"]);
        for c in [&client1, &client2] {
            c.ip(&["route", "add", &format!("{LB}/32"), "via", WORKER]);
        }
        Topology {
            client1,
            client2,
            worker,
            _switch: switch,
        }
    }
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `/tmp/<name>`, emptied first.
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs every step, writing a readable report to `out`; returns the
/// reports. `prefix` names the namespaces and pin directory, so a test and
/// a demo never collide.
pub fn run(
    agent_bin: &Path,
    examples: &Path,
    prefix: &str,
    out: &mut dyn Write,
) -> Result<Vec<StepReport>, String> {
    let topo = Topology::build(prefix);
    let policy_dir = TempDir::new(&format!("{prefix}-policies"));
    let pin_dir = PathBuf::from("/sys/fs/bpf").join(prefix);
    let node_port = |ip: &str| SocketAddr::new(ip.parse().expect("constant"), NODE_PORT);
    let lb: SocketAddr = format!("{LB}:80").parse().expect("constant");
    let _tcp_np = TcpServer::start(
        &topo.worker,
        node_port("0.0.0.0"),
        "webserver via node port",
    );
    let _udp_np = UdpServer::start(
        &topo.worker,
        node_port("0.0.0.0"),
        "webserver via node port (udp)",
    );
    let _tcp_lb = TcpServer::start(&topo.worker, lb, "webserver via load balancer");

    let mut agent = Agent::start(agent_bin, &topo.worker, &policy_dir.0, NODE, &pin_dir);
    AGENT_PID.store(agent.pid(), Ordering::Relaxed);
    let _ = writeln!(
        out,
        "worker {WORKER} (+ load balancer {LB}) on eth1, clients {CLIENT1} and {CLIENT2}"
    );
    let _ = writeln!(
        out,
        "filter-agent pid {} in namespace {}, pins in {}\n",
        agent.pid(),
        topo.worker.name(),
        pin_dir.display()
    );
    agent.wait_for("policy applied", 0, Duration::from_secs(15))?;

    let mut reports = Vec::new();
    for step in STEPS {
        let _ = writeln!(out, "== {}", step.title);
        let (applied, rejected) = (
            agent.count("policy applied"),
            agent.count("policy rejected"),
        );
        for f in step.remove {
            let name = Path::new(f).file_name().expect("file name");
            std::fs::remove_file(policy_dir.0.join(name))
                .map_err(|e| format!("remove {f}: {e}"))?;
            let _ = writeln!(out, "   calicoctl delete  -f {f}");
        }
        for f in step.add {
            let name = Path::new(f).file_name().expect("file name");
            std::fs::copy(examples.join(f), policy_dir.0.join(name))
                .map_err(|e| format!("copy {f}: {e}"))?;
            let _ = writeln!(out, "   calicoctl apply   -f examples/{f}");
        }
        if step.rejected {
            agent.wait_for("policy rejected", rejected, Duration::from_secs(10))?;
            let log = agent.log_text();
            let reason = log
                .lines()
                .rev()
                .find(|l| l.contains("invalid policy"))
                .unwrap_or("");
            let reason = reason.split("error=").nth(1).unwrap_or(reason);
            let _ = writeln!(out, "   agent: rejected: {reason}");
        } else {
            agent.wait_for("policy applied", applied, Duration::from_secs(10))?;
        }
        let printed = agent.output().len();
        let mut report = StepReport {
            title: step.title.to_owned(),
            probes: Vec::new(),
            log_lines: Vec::new(),
        };
        for Probe(client, target, expected) in step.probes {
            let (ns, name, ip) = match client {
                One => (&topo.client1, "client-1", CLIENT1),
                Two => (&topo.client2, "client-2", CLIENT2),
            };
            let (what, result) = match target {
                NodePortTcp => (
                    "node port tcp",
                    tcp_probe(ns, node_port(WORKER), PROBE_TIMEOUT),
                ),
                NodePortUdp => (
                    "node port udp",
                    udp_probe(ns, node_port(WORKER), PROBE_TIMEOUT),
                ),
                LoadBalancer => ("load balancer", tcp_probe(ns, lb, PROBE_TIMEOUT)),
            };
            let dest = match target {
                NodePortTcp | NodePortUdp => format!("{WORKER}:{NODE_PORT}"),
                LoadBalancer => lb.to_string(),
            };
            let observed = if result.is_ok() { Reached } else { Blocked };
            let mut line = format!("   {name} {ip:<14} -> {what:<14} {dest:<20} {observed:<8}");
            let _ = write!(
                line,
                " (expected {expected}) {}",
                if observed == *expected {
                    "ok"
                } else {
                    "MISMATCH"
                }
            );
            let _ = writeln!(out, "{line}");
            report.probes.push(ProbeReport {
                what: format!("{name} -> {what} {dest}"),
                expected: *expected,
                observed,
            });
        }
        // The Log rules' lines, as an operator following the agent's
        // output (or syslog, with iptables) sees them.
        std::thread::sleep(Duration::from_millis(200));
        report.log_lines = agent.output().split_off(printed);
        for l in &report.log_lines {
            let _ = writeln!(out, "   agent: {l}");
        }
        let _ = writeln!(out);
        reports.push(report);
    }
    let status = agent.stop();
    AGENT_PID.store(0, Ordering::Relaxed);
    if !status.success() {
        return Err(format!("agent exited with {status}"));
    }
    if pin_dir.exists() {
        return Err(format!("agent left pins in {}", pin_dir.display()));
    }
    Ok(reports)
}

/// Removes whatever a demo run with `prefix` may have left: used by the
/// Ctrl-C handler, where the guards' destructors do not get to run.
pub fn emergency_cleanup(prefix: &str) {
    let pid = AGENT_PID.load(Ordering::Relaxed);
    if pid != 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for role in ["sw", "c1", "c2", "w"] {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &format!("{prefix}-{role}")])
            .status();
    }
    let pins = PathBuf::from("/sys/fs/bpf").join(prefix);
    if let Ok(entries) = std::fs::read_dir(&pins) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(&pins);
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("{prefix}-policies")));
}
