//! `cargo xtask bench`, part 3 (needs root): real traffic through a veth
//! pair, this filter beside the kernel's other filters; update latency;
//! agent and map memory.
//!
//! Everything runs between two namespaces this program makes
//! (`filter_tests::flood`): a UDP flood of 60-byte frames from many
//! source addresses, the receiver's NAPI thread on its own CPU. Each
//! filter gets the same deny list of the flood's sources. The tables are
//! Markdown on standard output; with `--plots DIR` the figures are written
//! there as SVG.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use filter_agent::dataplane::{Dataplane, Options};
use filter_tests::{
    agent_binary,
    flood::{self, netns_exec, Link, Rate},
    plot, Agent, Netns,
};

/// Deny-list sizes.
const LISTS: [usize; 4] = [10, 1_000, 10_000, 1_000_000];
/// The flood cycles through at most this many of a list's sources, spread
/// over the whole list.
const FLOOD_SOURCES: usize = 65_536;
/// How long one measurement floods; each row is the median of three.
const MEASURE: Duration = Duration::from_secs(2);
const RUNS: usize = 3;
/// The agent's node name in every policy here.
const NODE: &str = "bench";
/// Debounce the agent runs with here: a policy file is applied this long
/// after its last change.
const DEBOUNCE_MS: &str = "10";
/// Address-table capacity for the agent's million-source list: a million
/// host addresses in the live policy and as many in the next. Smaller
/// lists run with the default, which holds this many host addresses per
/// address field.
const MAX_PREFIXES: &str = "2097152";
const DEFAULT_HOSTS_PER_FIELD: usize = 131_072;

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("fw-traffic needs root (namespaces, XDP, netfilter)");
        std::process::exit(2);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut plots, mut only) = (None, None);
    let (mut updates_only, mut memory_only, mut reload_only) = (false, false, false);
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        match flag.as_str() {
            "--updates" => updates_only = true,
            "--memory" => memory_only = true,
            "--full-reload" => reload_only = true,
            "--plots" | "--only" if rest.len() > 0 => {
                let value = rest.next().cloned().unwrap_or_default();
                if flag == "--plots" {
                    plots = Some(PathBuf::from(value));
                } else {
                    only = Some(value);
                }
            }
            _ => {
                eprintln!(
                    "usage: fw-traffic [--plots DIR] [--only 'FILTER LIST' | --updates | --full-reload | --memory]"
                );
                std::process::exit(2);
            }
        }
    }
    for tool in [
        "ethtool",
        "iptables-legacy-restore",
        "ipset",
        "nft",
        "xdp-filter",
        "bpftool",
    ] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            eprintln!("fw-traffic needs {tool} (cargo xtask bench installs it)");
            std::process::exit(2);
        }
    }
    // A killed run's namespaces go when `Link::new` makes them again.
    filter_tests::remove_stale_pins("fw-traffic-");
    let link = Link::new();
    if let Some(row) = only {
        // Traffic rows alone, flooding longer: for a profiler
        // (`perf record -C 1 -g` watches the receiver's CPU).
        traffic(&link, Some(&row));
        return;
    }
    if updates_only {
        // The update latency table alone.
        updates(&link);
        return;
    }
    if memory_only {
        memory(&link);
        return;
    }
    if reload_only {
        // The update table's last row alone: to compare builds, runs of
        // each alternating.
        print_update(&full_reload(&link, &Probe::start(&link)));
        return;
    }
    let traffic = traffic(&link, None);
    let updates = updates(&link);
    memory(&link);
    if let Some(dir) = plots {
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        plot_traffic(&dir.join("traffic.svg"), &traffic);
        plot_updates(&dir.join("updates.svg"), &updates);
    }
}

/// One row of the traffic table: a filter, a list size, what it measured
/// or why it was not run.
struct Row {
    filter: &'static str,
    list: Option<usize>,
    result: Result<Measured, String>,
}

#[derive(Clone, Copy)]
struct Measured {
    rate: Rate,
    /// Frames that got past the filter to the IP stack, per second.
    to_stack_pps: f64,
}

/// The real-traffic table; with `only`, the rows whose filter and list
/// (`this filter 10000`) contain it, each run flooding for 20 s.
fn traffic(link: &Link, only: Option<&str>) -> Vec<Row> {
    println!("## Real traffic: a 64-byte UDP flood through a veth pair\n");
    println!("Sender: `filter_tests::flood`, `sendmmsg` on a packet socket, one CPU. Receiver: the veth's NAPI thread on the other CPU. Median of {RUNS} runs of {} s each.\n", MEASURE.as_secs());
    println!("The sender is slower than the receiver with a cheap filter, so the receiver's rate there is the sender's. What separates the filters is the receiver's CPU time per packet; its capacity is one second divided by that, and the ratio to the bare XDP_DROP compares capacities. \"Reached the IP stack\" counts what the filter let through to `ip_rcv` (netfilter's hooks are in there: their drops count).\n");
    println!("This filter is the agent with its defaults (the million-source list needs `--max-prefixes {MAX_PREFIXES}`), the list as one pre-DNAT Deny rule of a GlobalNetworkPolicy on the receiver's HostEndpoint; the 1,000-rule policy puts 999 rules that match nothing of the flood before it.\n");
    println!("| filter | deny list | sender, Mpps | receiver took, Mpps | receiver CPU, ns/packet | receiver capacity, Mpps | capacity ÷ bare XDP_DROP | reached the IP stack, pps |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    let mut ceiling = None;
    let mut run =
        |filter: &'static str, list: Option<usize>, setup: &dyn Fn() -> Result<Guard, String>| {
            let name = format!("{filter} {}", list.map_or(String::new(), |l| l.to_string()));
            if only.is_some_and(|o| !name.contains(o)) {
                return;
            }
            let time = if only.is_some() {
                Duration::from_secs(20)
            } else {
                MEASURE
            };
            let frames = flood::frames(flood_sources(list.unwrap_or(FLOOD_SOURCES)));
            let result = setup().map(|guard| {
                let m = measure(link, &frames, time);
                drop(guard);
                m
            });
            if filter == XDP_DROP {
                ceiling = result.as_ref().ok().map(|m| m.rate.cpu_ns_per_packet);
            }
            print_row(filter, list, &result, ceiling);
            rows.push(Row {
                filter,
                list,
                result,
            });
        };
    run("no filter (the stack discards: no socket)", None, &|| {
        Ok(Box::new(()))
    });
    run(XDP_DROP, None, &|| xdp_drop(link));
    for list in LISTS {
        run(THIS, Some(list), &|| this_filter(link, list, 0, &[]));
    }
    run(THIS_1000, Some(10_000), &|| {
        this_filter(link, 10_000, 999, &[])
    });
    // What the conntrack lookup a deny-listed packet still needs costs:
    // its tables' bucket arrays (16 bytes per entry of capacity) leave
    // the cache as the table grows.
    run(THIS_SMALL_CT, Some(10_000), &|| {
        this_filter(link, 10_000, 0, &["--conntrack-size", "16384"])
    });
    for list in LISTS {
        run(
            "iptables raw, one rule per source (legacy)",
            Some(list),
            &|| iptables_linear(link, list),
        );
    }
    for list in LISTS {
        run("iptables raw + ipset hash:ip", Some(list), &|| {
            ipset(link, list)
        });
    }
    for list in LISTS {
        run("nftables set, prerouting raw", Some(list), &|| {
            nft(link, list)
        });
    }
    for list in LISTS {
        run("xdp-filter (xdp-tools)", Some(list), &|| {
            xdp_filter(link, list)
        });
    }
    println!();
    rows
}

const XDP_DROP: &str = "bare XDP_DROP (the ceiling)";
const THIS: &str = "this filter";
const THIS_1000: &str = "this filter, 1,000-rule policy (the list in the last rule)";
const THIS_SMALL_CT: &str = "this filter, conntrack of 16,384 entries (default 262,144)";

fn print_row(
    filter: &str,
    list: Option<usize>,
    result: &Result<Measured, String>,
    ceiling: Option<f64>,
) {
    let list = list.map_or("-".into(), thousands);
    match result {
        Ok(m) => println!(
            "| {filter} | {list} | {:.2} | {:.2} | {:.0} | {:.2} | {} | {:.0} |",
            m.rate.offered_pps / 1e6,
            m.rate.delivered_pps / 1e6,
            m.rate.cpu_ns_per_packet,
            1e3 / m.rate.cpu_ns_per_packet,
            ceiling.map_or("-".into(), |c| format!(
                "{:.0} %",
                100.0 * c / m.rate.cpu_ns_per_packet
            )),
            m.to_stack_pps,
        ),
        Err(why) => println!("| {filter} | {list} | {why} | | | | | |"),
    }
}

/// The median run (by the rate the receiver took) of [`RUNS`], each
/// flooding for `time`.
fn measure(link: &Link, frames: &[Vec<u8>], time: Duration) -> Measured {
    let mut runs: Vec<Measured> = (0..RUNS)
        .map(|_| {
            let before = ip_in_receives(&link.rx);
            let started = Instant::now();
            let rate = link.measure(frames, time);
            let to_stack = ip_in_receives(&link.rx) - before;
            Measured {
                rate,
                to_stack_pps: to_stack as f64 / started.elapsed().as_secs_f64(),
            }
        })
        .collect();
    runs.sort_by(|a, b| a.rate.delivered_pps.total_cmp(&b.rate.delivered_pps));
    runs[RUNS / 2]
}

/// IPv4 packets the namespace's stack received (`Ip: InReceives`).
fn ip_in_receives(ns: &Netns) -> u64 {
    let snmp = netns_exec(ns, &["cat", "/proc/net/snmp"]);
    let mut lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "InReceives")
        .and_then(|(_, v)| v.parse().ok())
        .expect("Ip: InReceives in /proc/net/snmp")
}

/// The flood's sources for a deny list of `list`: at most
/// [`FLOOD_SOURCES`] of them, evenly spread over the list.
fn flood_sources(list: usize) -> impl Iterator<Item = std::net::Ipv4Addr> {
    let n = list.min(FLOOD_SOURCES);
    let step = list / n;
    (0..n).map(move |i| flood::source((i * step) as u32))
}

/// The list's addresses.
fn list_sources(list: usize) -> impl Iterator<Item = std::net::Ipv4Addr> {
    (0..list as u32).map(flood::source)
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// What a measurement holds while it runs; dropping it undoes the setup.
type Guard = Box<dyn std::any::Any>;

/// Commands run (in order, errors ignored) on drop.
struct Undo(Vec<Vec<String>>);
impl Drop for Undo {
    fn drop(&mut self) {
        for cmd in &self.0 {
            let _ = Command::new(&cmd[0])
                .args(&cmd[1..])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn nsenter(ns: &Netns, args: &[&str]) -> Vec<String> {
    let mut v = vec![
        "nsenter".to_string(),
        format!("--net={}", ns.path().display()),
    ];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// `fw_drop` attached to the receiver, from a dataplane loaded for it
/// alone.
fn xdp_drop(link: &Link) -> Result<Guard, String> {
    struct Loaded(Option<Dataplane>, PathBuf);
    impl Drop for Loaded {
        fn drop(&mut self) {
            if let Some(dp) = self.0.take() {
                let _ = dp.shutdown();
            }
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let pins = PathBuf::from(format!("/sys/fs/bpf/fw-traffic-{}", std::process::id()));
    let (dp, pins) = link.rx.run(move || {
        let mut dp = Dataplane::load_with(&pins, &Options::default()).map_err(|e| e.to_string())?;
        let ifindex = nix::net::if_::if_nametoindex(flood::RX_IF).map_err(|e| e.to_string())?;
        dp.attach_drop(ifindex).map_err(|e| e.to_string())?;
        Ok::<_, String>((dp, pins))
    })?;
    Ok(Box::new(Loaded(Some(dp), pins)))
}

/// The agent on a policy that denies `list` sources (after `before` rules
/// that match nothing of the flood), waited on until its XDP program is on
/// the receiver.
fn this_filter(link: &Link, list: usize, before: usize, extra: &[&str]) -> Result<Guard, String> {
    let dir = PolicyDir::new("traffic");
    dir.write(&deny_list_policy(list, before));
    // The agent's default address capacity where the list fits it (as an
    // operator would run it); its hash tables' size is part of the cost.
    let capacity = (list > DEFAULT_HOSTS_PER_FIELD).then_some(MAX_PREFIXES);
    let agent = start_agent(link, &dir, capacity, extra)?;
    Ok(Box::new((agent, dir)))
}

/// A policy directory under the system's temporary directory, removed on
/// drop.
struct PolicyDir(PathBuf);

impl PolicyDir {
    fn new(what: &str) -> PolicyDir {
        let dir = std::env::temp_dir().join(format!("fw-traffic-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        PolicyDir(dir)
    }

    /// Replaces the policy file in one rename, as an editor's save or a
    /// ConfigMap update would.
    fn write(&self, text: &str) {
        let tmp = self.0.join(".policy.yaml.tmp");
        std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
        std::fs::rename(&tmp, self.0.join("policy.yaml")).expect("rename the policy file");
    }
}

impl Drop for PolicyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent's pin directory here.
fn agent_pins() -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/fw-traffic-agent-{}",
        std::process::id()
    ))
}

/// Starts the agent on `dir` in the receiver's namespace and waits until it
/// has applied the policy and attached to the receiver. With
/// `max_prefixes`, its address tables hold that many; `extra` are more
/// arguments.
fn start_agent(
    link: &Link,
    dir: &PolicyDir,
    max_prefixes: Option<&str>,
    extra: &[&str],
) -> Result<Agent, String> {
    let mut args = vec![
        "--detach-on-exit",
        "--debounce",
        DEBOUNCE_MS,
        // A million sources are a 24 MB file.
        "--max-file-size",
        "67108864",
        "--parse-timeout",
        "120",
    ];
    if let Some(n) = max_prefixes {
        args.extend(["--max-prefixes", n]);
    }
    args.extend_from_slice(extra);
    let mut agent = Agent::start_with(
        &agent_binary(),
        &link.rx,
        &dir.0,
        NODE,
        &agent_pins(),
        &args,
    );
    agent
        .wait_for("policy applied", 0, Duration::from_secs(180))
        .map_err(|e| e.lines().next().unwrap_or_default().to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !link
        .rx
        .ip(&["link", "show", flood::RX_IF])
        .contains("prog/xdp")
    {
        if Instant::now() > deadline {
            return Err(format!("the agent did not attach to {}", flood::RX_IF));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(agent)
}

/// The receiver as a host endpoint of node [`NODE`].
fn host_endpoint() -> String {
    format!("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {{name: rx, labels: {{role: bench}}}}\nspec: {{node: {NODE}, interfaceName: {}}}\n", flood::RX_IF)
}

/// A pre-DNAT policy: `before` rules that deny UDP from elsewhere to other
/// ports, then one that denies the list's sources.
fn deny_list_policy(list: usize, before: usize) -> String {
    let mut y = host_endpoint();
    y += "---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: deny-list}\nspec:\n  preDNAT: true\n  applyOnForward: true\n  selector: role == 'bench'\n  ingress:\n";
    for r in 0..before {
        let _ = writeln!(
            y,
            "  - action: Deny\n    protocol: UDP\n    source: {{nets: [203.0.113.{}/32]}}\n    destination: {{ports: [{}]}}",
            r % 256,
            20_000 + r
        );
    }
    y += "  - action: Deny\n    source:\n      nets:\n";
    for a in list_sources(list) {
        let _ = writeln!(y, "      - {a}/32");
    }
    y
}

/// iptables (legacy: the linear rule walk) in the raw table's PREROUTING,
/// one rule per source.
fn iptables_linear(link: &Link, list: usize) -> Result<Guard, String> {
    if list > 10_000 {
        return Err("not run: a linear chain of a million rules (see the 10,000 row)".into());
    }
    let mut rules = String::from("*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for a in list_sources(list) {
        let _ = writeln!(rules, "-A PREROUTING -s {a}/32 -j DROP");
    }
    rules += "COMMIT\n";
    let undo = Undo(vec![nsenter(
        &link.rx,
        &["iptables-legacy", "-t", "raw", "-F"],
    )]);
    run_in(&link.rx.path(), &["iptables-legacy-restore"], &rules)?;
    Ok(Box::new(undo))
}

/// An ipset `hash:ip` and one iptables (legacy) raw rule that matches it.
fn ipset(link: &Link, list: usize) -> Result<Guard, String> {
    let mut set = format!(
        "create fwb hash:ip family inet hashsize {} maxelem {}\n",
        list.next_power_of_two().max(1024),
        list.max(65_536)
    );
    for a in list_sources(list) {
        let _ = writeln!(set, "add fwb {a}");
    }
    let undo = Undo(vec![
        nsenter(&link.rx, &["iptables-legacy", "-t", "raw", "-F"]),
        nsenter(&link.rx, &["ipset", "destroy", "fwb"]),
    ]);
    run_in(&link.rx.path(), &["ipset", "restore"], &set)?;
    run_in(
        &link.rx.path(),
        &["iptables-legacy-restore"],
        "*raw\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -m set --match-set fwb src -j DROP\nCOMMIT\n",
    )?;
    Ok(Box::new(undo))
}

/// An nftables set and one rule at prerouting, raw priority.
fn nft(link: &Link, list: usize) -> Result<Guard, String> {
    let mut text = format!(
        "table ip fwb {{\n  set deny {{ type ipv4_addr; size {}; elements = {{\n",
        list.max(65_536)
    );
    let mut first = true;
    for a in list_sources(list) {
        if !first {
            text += ",\n";
        }
        first = false;
        let _ = write!(text, "    {a}");
    }
    text += "\n  }; }\n  chain pre { type filter hook prerouting priority raw; policy accept; ip saddr @deny drop; }\n}\n";
    let undo = Undo(vec![nsenter(
        &link.rx,
        &["nft", "delete", "table", "ip", "fwb"],
    )]);
    run_in(&link.rx.path(), &["nft", "-f", "-"], &text)?;
    Ok(Box::new(undo))
}

/// Where libxdp (xdp-filter's loader) pins its dispatchers.
const LIBXDP_PINS: &str = "/sys/fs/bpf/xdp";

/// xdp-filter (xdp-tools) in native mode, its IPv4 map filled with the
/// list through bpftool (one xdp-filter call per address would take
/// minutes).
fn xdp_filter(link: &Link, list: usize) -> Result<Guard, String> {
    const MAP: &str = "/sys/fs/bpf/xdp-filter/filter_ipv4";
    const CAPACITY: usize = 10_000;
    if list > CAPACITY {
        return Err(format!(
            "cannot: its IPv4 map holds {} entries",
            thousands(CAPACITY)
        ));
    }
    let mut undo = Undo(vec![nsenter(
        &link.rx,
        &["xdp-filter", "unload", flood::RX_IF],
    )]);
    // libxdp pins its dispatcher under bpffs's `xdp` and leaves the folder
    // when it unloads: removed again (when empty) if this load made it.
    if !Path::new(LIBXDP_PINS).exists() {
        undo.0.push(vec!["rmdir".into(), LIBXDP_PINS.into()]);
    }
    run_in(
        &link.rx.path(),
        &[
            "xdp-filter",
            "load",
            "-m",
            "native",
            "-f",
            "ipv4",
            flood::RX_IF,
        ],
        "",
    )?;
    let mut batch = String::new();
    for a in list_sources(list) {
        let [b0, b1, b2, b3] = a.octets();
        // The value's low bits say which fields to match: 1, the source.
        let _ = writeln!(
            batch,
            "map update pinned {MAP} key {b0} {b1} {b2} {b3} value 1 0 0 0 0 0 0 0"
        );
    }
    run_in(&link.rx.path(), &["bpftool", "batch", "file", "-"], &batch)?;
    Ok(Box::new(undo))
}

/// Update latency: policy sizes (rules, CIDRs spread over them).
const UPDATE_SIZES: [(usize, usize); 4] = [(1, 0), (100, 0), (10_000, 0), (10_000, 100_000)];
/// Changes timed per size and tool.
const CHANGES: usize = 100;
/// Full reloads timed: each rewrites the whole policy, so fewer.
const FULL_RELOADS: usize = 20;
/// Untimed changes before the timed ones: a node's agent has long made
/// its first writes of both generations (each a full write, its inactive
/// generation unknown at start) and settled its memory before an operator
/// changes a rule; the same for every tool.
const WARM_UP: usize = 5;
/// The probe's port on the receiver and its sending interval.
const PROBE_PORT: u16 = 7777;
const PROBE_EVERY: Duration = Duration::from_micros(100);

/// How a tool applies the probe rule's new action (`true`: the last rule
/// allows the probe) to a policy of `rules` rules.
trait Apply {
    fn name(&self) -> &'static str;
    /// The tool's input for the change: made before the clock starts, as
    /// an operator's file or rule set exists before it is applied. Asked
    /// again for each change.
    fn prepare(&mut self, allow: bool) -> String;
    /// Applies `input`; returns once the tool says it is applied.
    fn apply(&mut self, allow: bool, input: &str) -> Result<(), String>;
}

/// One row of the update table.
struct UpdateRow {
    tool: &'static str,
    rules: usize,
    cidrs: usize,
    /// Sorted latencies, or why none.
    result: Result<Vec<Duration>, String>,
}

/// From writing a one-rule change to the first probe packet the new rule
/// lets through, [`CHANGES`] times per tool and size.
fn updates(link: &Link) -> Vec<UpdateRow> {
    println!("## Update latency: one rule's action flipped\n");
    println!("A probe sends a UDP packet every {} µs; the last rule of the policy decides it. Each change turns that rule from Deny to Allow (and back, untimed): the time from the change (the policy file written and renamed into place, or the command started; the file's text or the rule set made beforehand) to the first probe that arrives, after {WARM_UP} untimed changes. This filter's agent runs with `--debounce {DEBOUNCE_MS}`; its time includes the debounce, the watcher, reading the file, parsing, typing and compiling what changed (the rest is taken over from the last load) and patching the inactive generation. {CHANGES} changes per row. The last row is a full reload: the change gives every other rule other sources and ports as it allows the probe, so nothing of the last load is taken over, and each change's are its own, so that neither generation holds them and every entry is written ({FULL_RELOADS} changes).\n", PROBE_EVERY.as_micros());
    println!("| tool | rules | CIDRs | median ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    let probe = Probe::start(link);
    let mut rows = Vec::new();
    for (rules, cidrs) in UPDATE_SIZES {
        let tools: Vec<Result<Box<dyn Apply>, String>> = vec![
            ThisFilter::start(link, rules, cidrs).map(|t| Box::new(t) as Box<dyn Apply>),
            if cidrs == 0 {
                Ok(Box::new(Netfilter::new(link, rules, false)) as Box<dyn Apply>)
            } else {
                Err("-".into())
            },
            if cidrs == 0 {
                Ok(Box::new(Netfilter::new(link, rules, true)) as Box<dyn Apply>)
            } else {
                Err("-".into())
            },
        ];
        for (tool, name) in
            tools
                .into_iter()
                .zip(["this filter", "iptables-restore (legacy)", "nft -f"])
        {
            let result = tool.and_then(|mut t| time_changes(&probe, t.as_mut(), CHANGES));
            let row = UpdateRow {
                tool: name,
                rules,
                cidrs,
                result,
            };
            print_update(&row);
            rows.push(row);
        }
    }
    let row = full_reload(link, &probe);
    print_update(&row);
    rows.push(row);
    println!();
    rows
}

/// The update table's last row: the change rewrites every rule (other
/// sources, other ports), so nothing of the last load can be taken over.
/// Says where the agent's time went, from its log.
fn full_reload(link: &Link, probe: &Probe) -> UpdateRow {
    let (rules, cidrs) = UPDATE_SIZES[UPDATE_SIZES.len() - 1];
    let result = ThisFilter::start(link, rules, cidrs).and_then(|mut t| {
        t.everything = true;
        let before = t.agent.count("policy applied");
        let took = time_changes(probe, &mut t, FULL_RELOADS)?;
        // The changes' publishes: their undoing writes what the inactive
        // generation already holds (the policy of two publishes ago), so
        // it changes next to nothing.
        let log = t.agent.log_text();
        let applied: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("policy applied"))
            .skip(before)
            .collect();
        let most = applied
            .iter()
            .filter_map(|l| field(l, "changed"))
            .fold(0.0, f64::max);
        let full: Vec<&str> = applied
            .into_iter()
            .filter(|l| field(l, "changed").is_some_and(|c| c >= most / 2.0))
            .collect();
        let medians: String = [
            "read_ms",
            "model_ms",
            "compile_ms",
            "written_ms",
            "enforced_after_ms",
        ]
        .iter()
        .map(|k| {
            format!(
                " {k} {:.1}",
                median(full.iter().filter_map(|l| field(l, k)).collect())
            )
        })
        .collect();
        eprintln!(
            "the agent's log, medians over {} full reloads:{medians}",
            full.len()
        );
        Ok(took)
    });
    UpdateRow {
        tool: "this filter, every rule changed",
        rules,
        cidrs,
        result,
    }
}

/// The number logged as `key=` in `line`.
fn field(line: &str, key: &str) -> Option<f64> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split([' ', ',']).next()?.parse().ok()
}

/// The median of `v` (NaN: empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn print_update(row: &UpdateRow) {
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
    let (rules, cidrs) = (thousands(row.rules), thousands(row.cidrs));
    match &row.result {
        Ok(l) => println!(
            "| {} | {rules} | {cidrs} | {} | {} | {} |",
            row.tool,
            ms(l[l.len() / 2]),
            ms(p99(l)),
            ms(l[l.len() - 1])
        ),
        Err(why) if why == "-" => {}
        Err(why) => println!("| {} | {rules} | {cidrs} | {why} | | |", row.tool),
    }
}

/// `changes` timed changes (Deny to Allow) after [`WARM_UP`] untimed
/// ones, each undone before the next.
fn time_changes(
    probe: &Probe,
    tool: &mut dyn Apply,
    changes: usize,
) -> Result<Vec<Duration>, String> {
    let deny = tool.prepare(false);
    tool.apply(false, &deny)?;
    probe.wait_silent(tool.name())?;
    // One change and its undoing; the change's time.
    let mut change = || -> Result<Duration, String> {
        let allow = tool.prepare(true);
        let t0 = Instant::now();
        tool.apply(true, &allow)?;
        let took = probe.first_after(t0, tool.name())? - t0;
        tool.apply(false, &deny)?;
        probe.wait_silent(tool.name())?;
        Ok(took)
    };
    for _ in 0..WARM_UP {
        change()?;
    }
    let mut took = (0..changes)
        .map(|_| change())
        .collect::<Result<Vec<_>, _>>()?;
    took.sort();
    Ok(took)
}

/// The probe: a sender in the sender's namespace and a receiving socket
/// in the receiver's, which records when the last probe arrived.
struct Probe {
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last arrival (0: none yet).
    last: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Probe {
    fn start(link: &Link) -> Probe {
        let epoch = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let to = SocketAddr::from((flood::RX_ADDR, PROBE_PORT));
        let socket = link
            .rx
            .run(move || UdpSocket::bind(to).expect("bind the probe's receiver"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let (seen, done) = (last.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !done.load(Ordering::Relaxed) {
                if socket.recv(&mut buf).is_ok() {
                    seen.store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
            }
        });
        let done = stop.clone();
        link.tx.spawn(move || {
            let socket = UdpSocket::bind("0.0.0.0:0").expect("bind the probe's sender");
            while !done.load(Ordering::Relaxed) {
                let _ = socket.send_to(b"probe", to);
                std::thread::sleep(PROBE_EVERY);
            }
        });
        Probe { epoch, last, stop }
    }

    /// When the first probe after `t0` arrived (within ten seconds).
    fn first_after(&self, t0: Instant, tool: &str) -> Result<Instant, String> {
        let since = (t0 - self.epoch).as_nanos() as u64;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let last = self.last.load(Ordering::Relaxed);
            if last > since {
                return Ok(self.epoch + Duration::from_nanos(last));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{tool}: no probe passed within 10 s of allowing it"
                ));
            }
            // The arrival time is the receiver's; waiting here must not
            // take a CPU from the tool being timed (there are two).
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Waits until no probe has arrived for 20 ms (the Deny is in force).
    fn wait_silent(&self, tool: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let last = self.epoch + Duration::from_nanos(self.last.load(Ordering::Relaxed));
            if last.elapsed() > Duration::from_millis(20) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{tool}: probes still pass 10 s after denying them"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The probe's sender, as rules name it.
const PROBE_SOURCE: &str = "198.51.100.1";

/// This filter: the agent watching a policy directory; a change is a new
/// file renamed into place, applied when the agent's probe packet passes.
struct ThisFilter {
    rules: usize,
    cidrs: usize,
    /// Whether the change rewrites every rule, not only the probe's.
    everything: bool,
    /// Full reloads prepared so far: each gives the rules sources and
    /// ports of its own, so that neither generation holds any of them
    /// (the inactive one holds the policy of two publishes ago) and the
    /// reload writes every entry.
    reloads: usize,
    dir: PolicyDir,
    agent: Agent,
}

impl ThisFilter {
    fn start(link: &Link, rules: usize, cidrs: usize) -> Result<ThisFilter, String> {
        let dir = PolicyDir::new("updates");
        dir.write(&probe_policy(rules, cidrs, false, None));
        let agent = start_agent(link, &dir, None, &[])?;
        Ok(ThisFilter {
            rules,
            cidrs,
            everything: false,
            reloads: 0,
            dir,
            agent,
        })
    }
}

impl Apply for ThisFilter {
    fn name(&self) -> &'static str {
        "this filter"
    }

    fn prepare(&mut self, allow: bool) -> String {
        let other = (self.everything && allow).then(|| {
            self.reloads += 1;
            self.reloads
        });
        probe_policy(self.rules, self.cidrs, allow, other)
    }

    fn apply(&mut self, allow: bool, input: &str) -> Result<(), String> {
        let applied = self.agent.count("policy applied");
        self.dir.write(input);
        if allow {
            // Timed by the probe, not by the log.
            return Ok(());
        }
        self.agent
            .wait_for("policy applied", applied, Duration::from_secs(30))
    }
}

/// `rules` rules in a normal (not pre-DNAT) policy on the receiver, the
/// last for the probe; `cidrs` sources spread over the others; `other`:
/// variant `v` (from 1) of the policy, whose every other rule has sources
/// and a port of its own (sources from 10.0.0.0 + `v` << 20: up to a
/// million a variant; a port shifted by `v`).
fn probe_policy(rules: usize, cidrs: usize, allow: bool, other: Option<usize>) -> String {
    let mut y = host_endpoint();
    y += "---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: probe}\nspec:\n  selector: role == 'bench'\n  egress:\n  - action: Allow\n  ingress:\n";
    let fillers = rules - 1;
    let per = cidrs.checked_div(fillers).unwrap_or(0);
    let v = other.unwrap_or(0);
    assert!(v < 240 && cidrs < 1 << 20, "variant {v} leaves 10.0.0.0/8");
    let (mut n, shift) = ((v as u32) << 20, v);
    for r in 0..fillers {
        let (src, port) = filler(r + shift);
        let nets = if per == 0 {
            vec![format!("{src}/32")]
        } else {
            hosts(&mut n, per)
        };
        let _ = writeln!(
            y,
            "  - action: Deny\n    protocol: UDP\n    source: {{nets: [{}]}}\n    destination: {{ports: [{port}]}}",
            nets.join(", "),
        );
    }
    let _ = writeln!(
        y,
        "  - action: {}\n    protocol: UDP\n    source: {{nets: [{PROBE_SOURCE}/32]}}\n    destination: {{ports: [{PROBE_PORT}]}}",
        if allow { "Allow" } else { "Deny" }
    );
    y
}

/// A netfilter tool applying the same rules as the agent's policy, the
/// probe's last, by rewriting the whole chain: `iptables-restore` (legacy)
/// of the filter table's INPUT chain, as Calico's iptables dataplane
/// writes its chains, or `nft -f` flushing and refilling one table in one
/// transaction.
struct Netfilter {
    ns: PathBuf,
    rules: usize,
    nft: bool,
}

impl Netfilter {
    fn new(link: &Link, rules: usize, nft: bool) -> Netfilter {
        Netfilter {
            ns: link.rx.path(),
            rules,
            nft,
        }
    }
}

impl Apply for Netfilter {
    fn name(&self) -> &'static str {
        if self.nft {
            "nft -f"
        } else {
            "iptables-restore"
        }
    }

    fn prepare(&mut self, allow: bool) -> String {
        let mut t = String::from(if self.nft {
            "table ip fwbu\nflush table ip fwbu\ntable ip fwbu {\n  chain in {\n    type filter hook input priority filter; policy accept;\n"
        } else {
            "*filter\n:INPUT ACCEPT [0:0]\n"
        });
        for r in 0..self.rules - 1 {
            let (src, port) = filler(r);
            t += &self.rule(&src, port, false);
        }
        t += &self.rule(PROBE_SOURCE, PROBE_PORT, allow);
        t += if self.nft { "  }\n}\n" } else { "COMMIT\n" };
        t
    }

    fn apply(&mut self, _: bool, input: &str) -> Result<(), String> {
        if self.nft {
            run_in(&self.ns, &["nft", "-f", "-"], input)
        } else {
            run_in(&self.ns, &["iptables-legacy-restore"], input)
        }
    }
}

impl Netfilter {
    /// One rule: UDP from `src` to `port`, accepted or dropped.
    fn rule(&self, src: &str, port: u16, accept: bool) -> String {
        match (self.nft, accept) {
            (true, true) => format!("    ip saddr {src} udp dport {port} accept\n"),
            (true, false) => format!("    ip saddr {src} udp dport {port} drop\n"),
            (false, true) => format!("-A INPUT -p udp -s {src}/32 --dport {port} -j ACCEPT\n"),
            (false, false) => format!("-A INPUT -p udp -s {src}/32 --dport {port} -j DROP\n"),
        }
    }
}

impl Drop for Netfilter {
    fn drop(&mut self) {
        let undo: &[&str] = if self.nft {
            &["nft", "delete", "table", "ip", "fwbu"]
        } else {
            &["iptables-legacy", "-F", "INPUT"]
        };
        let _ = run_in(&self.ns, undo, "");
    }
}

/// The next `count` host addresses of 10.0.0.0/8 after number `n`, as
/// /32 CIDRs.
fn hosts(n: &mut u32, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| {
            *n += 1;
            format!("{}/32", std::net::Ipv4Addr::from(0x0a00_0000 + *n))
        })
        .collect()
}

/// Filler rule `r` of the update policies: UDP from this source to this
/// port, which the probe never matches.
fn filler(r: usize) -> (String, u16) {
    (
        format!("203.0.113.{}", r % 256),
        (20_000 + r % 40_000) as u16,
    )
}

/// Runs `args` in the network namespace at `ns` (`nsenter --net`, which
/// keeps bpffs, where `ip netns exec` would hide it) with `input` on
/// standard input.
fn run_in(ns: &Path, args: &[&str], input: &str) -> Result<(), String> {
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())
        .map_err(|e| format!("{}: {e}", args[0]))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Agent memory and kernel map memory per policy size.
fn memory(link: &Link) {
    println!("## Memory: the agent and its maps\n");
    println!("The agent's resident set (VmRSS) once it has applied the policy, and the kernel memory of the maps it pinned (bpftool's `bytes_memlock`, each map once): conntrack's (`FW_CT*`, sized by `--conntrack-size`, the same whatever the policy) and the rest (the classifier, counters, events). Policies of pre-DNAT rules with 100,000 /32 sources spread over them, none for 0 rules; the agent's defaults (`--max-prefixes` 262,144, as in every row above but the million-source one, which needs {MAX_PREFIXES}). The class arrays, the IPv4 host-address tables and the IPv6 host-address and port hashes are sized to the policy (twice what it needs, a power of two; docs/design.md, \"Maps sized to the policy\").\n");
    println!("| rules | CIDRs | agent RSS MiB | conntrack maps MiB | other maps MiB |");
    println!("|---:|---:|---:|---:|---:|");
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    for (rules, cidrs) in [(0, 0), (1_000, 100_000), (10_000, 100_000)] {
        let dir = PolicyDir::new("memory");
        dir.write(&memory_policy(rules, cidrs));
        let (rules, cidrs) = (thousands(rules), thousands(cidrs));
        match start_agent(link, &dir, None, &[]) {
            Ok(agent) => {
                let rss = rss_kib(agent.pid());
                let maps = map_bytes(&agent_pins());
                let conntrack: u64 = maps
                    .iter()
                    .filter(|(name, _)| name.starts_with("FW_CT"))
                    .map(|(_, b)| b)
                    .sum();
                let all: u64 = maps.iter().map(|(_, b)| b).sum();
                println!(
                    "| {rules} | {cidrs} | {:.0} | {:.0} | {:.0} |",
                    rss as f64 / 1024.0,
                    mib(conntrack),
                    mib(all - conntrack)
                );
            }
            Err(why) => println!("| {rules} | {cidrs} | {why} | | |"),
        }
    }
    println!();
}

/// `rules` pre-DNAT rules sharing `cidrs` sources (none without rules).
fn memory_policy(rules: usize, cidrs: usize) -> String {
    let mut y = host_endpoint();
    if rules == 0 {
        return y;
    }
    y += "---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: memory}\nspec:\n  preDNAT: true\n  applyOnForward: true\n  selector: role == 'bench'\n  ingress:\n";
    let per = cidrs / rules;
    let mut n = 0u32;
    for r in 0..rules {
        let nets = hosts(&mut n, per);
        let _ = writeln!(
            y,
            "  - action: Deny\n    protocol: TCP\n    source: {{nets: [{}]}}\n    destination: {{ports: [{}]}}",
            nets.join(", "),
            1000 + r % 64_000
        );
    }
    y
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The maps pinned under `dir`, each once: name and kernel memory.
fn map_bytes(dir: &Path) -> Vec<(String, u64)> {
    let mut seen = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            // Links and programs are pinned here too: bpftool refuses them.
            let Ok(out) = Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(&p)
                .stderr(Stdio::null())
                .output()
            else {
                continue;
            };
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                if let (Some(id), Some(name), Some(bytes)) = (
                    v["id"].as_u64(),
                    v["name"].as_str(),
                    v["bytes_memlock"].as_u64(),
                ) {
                    seen.insert(id, (name.to_string(), bytes));
                }
            }
        }
    }
    seen.into_values().collect()
}

fn plot_traffic(path: &Path, rows: &[Row]) {
    let mut series = plot::Series::default();
    // The lists' lines first; the variants of this filter are rows of the
    // table only.
    for r in rows
        .iter()
        .filter(|r| r.filter != THIS_1000 && r.filter != THIS_SMALL_CT)
    {
        if let (Some(list), Ok(m)) = (r.list, &r.result) {
            series.add(r.filter, list as f64, m.rate.cpu_ns_per_packet);
        }
    }
    // Then the filters without a list, flat across the axis.
    for r in rows {
        if let (None, Ok(m)) = (r.list, &r.result) {
            series.add(r.filter, 10.0, m.rate.cpu_ns_per_packet);
            series.add(r.filter, 1e6, m.rate.cpu_ns_per_packet);
        }
    }
    plot::lines(
        path,
        "Receiver CPU per packet of a deny-listed UDP flood",
        "deny list entries",
        "ns per packet",
        &series.0,
    );
}

fn plot_updates(path: &Path, rows: &[UpdateRow]) {
    let mut series = plot::Series::default();
    for r in rows.iter().filter(|r| r.cidrs == 0) {
        if let Ok(l) = &r.result {
            let ms = p99(l).as_secs_f64() * 1e3;
            series.add(&format!("{} (p99)", r.tool), r.rules as f64, ms);
        }
    }
    plot::lines(
        path,
        "Time from a one-rule change to its enforcement",
        "rules",
        "ms",
        &series.0,
    );
}

/// The 99th percentile of sorted `latencies` (nearest rank).
fn p99(latencies: &[Duration]) -> Duration {
    latencies[(latencies.len() * 99).div_ceil(100) - 1]
}
