//! `cargo xtask bench` (part 2, needs root): per-packet cost of `fw_xdp`
//! and `fw_tc_in` under BPF_PROG_TEST_RUN beside programs that only return
//! XDP_PASS and TC_ACT_OK, in one run (medians of five alternating runs),
//! for a grid of rules × CIDRs. A 64-byte TCP SYN whose deciding rule is
//! the last one.
//!
//! With `--baseline OBJECT` (xtask passes the build without the Log record
//! path, feature `bench-no-log`), that object's `fw_xdp` runs too, with
//! the same policy, alternating with the others: what the Log path costs a
//! packet that logs nothing, measured side by side.
//!
//! `--profile` runs only the component profile (where each program's time
//! goes), for comparing two builds of the programs.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use filter_agent::{
    compile::{self, Node},
    dataplane::{conntrack::Flow, Dataplane, Interfaces, Options, PublishTimes, Room, TcRun},
    model::Store,
};

const REPEAT: u32 = 1_000_000;
/// CIDRs of the profile's and `--spin`'s policies.
const CIDRS: usize = 100_000;

/// The per-packet grid: (rules, CIDRs). 65,536 rules are past a table's
/// capacity; the row says so.
const GRID: [(usize, usize); 9] = [
    (0, 0),
    (1, 100_000),
    (100, 100_000),
    (1_000, 100_000),
    (10_000, 100_000),
    (65_536, 100_000),
    (1, 1_000_000),
    (1_000, 1_000_000),
    (10_000, 1_000_000),
];

/// Address table entries for the benchmark: a million host addresses per
/// policy, twice (the live policy and the next).
const PREFIX_CAPACITY: u32 = 1 << 21;

/// The host endpoint every benchmark policy applies to.
const HEP: &str = "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: hep, labels: {role: pub}}\nspec: {node: bench, interfaceName: lo}\n";
/// The pre-DNAT policy the benchmark rules are appended to.
const POLICY_HEAD: &str = "---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: bench}\nspec:\n  preDNAT: true\n  applyOnForward: true\n  selector: role == 'pub'\n  ingress:\n";

/// `rules` pre-DNAT Deny rules for TCP, each with its own destination port
/// and its share of `cidrs` /32 sources; the benchmark packet matches only
/// the last one.
fn policy(rules: usize, cidrs: usize) -> String {
    let mut y = String::from(HEP);
    if rules == 0 {
        return y;
    }
    let per_rule = cidrs / rules;
    y += POLICY_HEAD;
    let mut n: u32 = 0;
    for r in 0..rules {
        let nets: Vec<String> = (0..per_rule)
            .map(|_| {
                n += 1;
                let a = 0x0a00_0000u32 + n;
                format!(
                    "{}.{}.{}.{}",
                    a >> 24,
                    (a >> 16) & 255,
                    (a >> 8) & 255,
                    a & 255
                )
            })
            .collect();
        y += &format!("  - action: Deny\n    protocol: TCP\n    source: {{nets: [{}]}}\n    destination: {{ports: [{}]}}\n", nets.join(", "), port(r));
    }
    y
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("fw-bench needs root (BPF_PROG_TEST_RUN)");
        std::process::exit(2);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, rules] = args.as_slice() {
        if let Some(established) = match flag.as_str() {
            "--spin" => Some(false),
            "--spin-established" => Some(true),
            _ => None,
        } {
            let rules: usize = rules.parse().expect("--spin RULES: a number of rules");
            return spin(rules, established);
        }
    }
    if args == ["--profile"] {
        // The profile alone: what a change to the programs moved, without
        // the grid's minutes.
        let pins = Unpin::new();
        return profile(&pins.0);
    }
    let (mut baseline, mut plots) = (None, None);
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        match (flag.as_str(), rest.next()) {
            ("--baseline", Some(path)) => {
                baseline = Some(std::fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e}")));
            }
            ("--plots", Some(dir)) => plots = Some(std::path::PathBuf::from(dir)),
            _ => {
                eprintln!(
                    "usage: fw-bench [--baseline KERNEL_OBJECT] [--plots DIR] | --profile | --spin RULES"
                );
                std::process::exit(2);
            }
        }
    }
    let pins = Unpin::new();
    let pin_dir = pins.0.clone();
    // The sized maps at their largest from the start: the grid's publish
    // column times writing a policy, not loading programs with maps of
    // its size (`Room`).
    let options = Options {
        prefix_capacity: PREFIX_CAPACITY,
        room: Room::MAX,
        ..Options::default()
    };
    let mut dp =
        Dataplane::load_with(&pin_dir.join("a"), &options).expect("load the kernel object");
    let mut base = baseline.map(|object| {
        // Loaded once, kept for the run (a dataplane keeps its object to
        // load it again with other class arrays).
        let object: &'static [u8] = Box::leak(object.into_boxed_slice());
        Dataplane::load_object(&pin_dir.join("b"), &options, object)
            .expect("load the baseline object")
    });
    let d = &mut Pair {
        dp: &mut dp,
        base: base.as_mut(),
    };
    println!("\n## Per-packet cost under BPF_PROG_TEST_RUN\n");
    println!("A 64-byte TCP SYN decided by the last rule; medians of {RUNS} alternating runs of {REPEAT} packets.\n");
    println!("| rules | CIDRs | fw_xdp ns/packet | without the Log path | ratio | XDP_PASS ns/packet | fw_xdp ÷ XDP_PASS | fw_tc_in ns/packet | TC pass ns/packet | fw_tc_in ÷ TC pass | verdict | publish: ms to enforce / entries written |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|");
    let mut grid = Vec::new();
    for (rules, cidrs) in GRID {
        let publish = match publish(d, &policy(rules, cidrs)) {
            Ok(took) => took,
            Err(refused) => {
                println!("| {rules} | {cidrs} | refused: {refused} | | | | | | | | | |");
                continue;
            }
        };
        let frame = last_rule_syn(rules, cidrs);
        let measured = measure(d, &frame);
        row(&rules.to_string(), cidrs, measured, Some(publish));
        grid.push((rules, cidrs, measured));
        if [(1_000, 100_000), (10_000, 1_000_000)].contains(&(rules, cidrs)) {
            // The same packet on a flow conntrack knows: the pre-DNAT stage
            // is skipped after one table lookup.
            let flow = flow_of(rules, cidrs);
            d.each(|dp| dp.open_flow(&flow, true, true).expect("record the flow"));
            let measured = measure(d, &frame);
            d.each(|dp| dp.forget_flow(&flow).expect("forget the flow"));
            row(&format!("{rules}, established flow"), cidrs, measured, None);
        }
    }
    worst_case(d);
    if let Some(dir) = plots {
        plot_grid(&dir.join("per-packet.svg"), &grid);
    }
    let _ = dp.shutdown();
    if let Some(b) = base {
        let _ = b.shutdown();
    }
    profile(&pin_dir);
}

/// The destination port of benchmark rule `r` (they repeat past 64,000
/// rules; the rules still differ by their sources).
fn port(r: usize) -> u16 {
    (1000 + r % 64_000) as u16
}

/// The flow of the benchmark's packet for `rules` rules sharing `cidrs`
/// (see [`last_rule_syn`]).
fn flow_of(rules: usize, cidrs: usize) -> Flow {
    Flow {
        src: std::net::Ipv4Addr::from(last_source(rules, cidrs)).into(),
        dst: std::net::Ipv4Addr::new(192, 0, 2, 1).into(),
        proto: 6,
        sport: 40000,
        dport: port(rules - 1),
    }
}

/// `--spin RULES`: runs `fw_xdp` on the benchmark's packet for `rules`
/// rules for about ten seconds and nothing else, for a profiler to watch
/// (`perf record -a -g -- fw-bench --spin 1000`; the JIT's symbols name
/// the program's functions, the kernel's name the map lookups), or with
/// `--spin-established RULES` on a flow conntrack knows: the packet
/// the grid's established-flow rows time.
fn spin(rules: usize, established: bool) {
    let pins = Unpin::new();
    let pin_dir = pins.0.clone();
    let mut dp = Dataplane::load(&pin_dir.join("a")).expect("load the kernel object");
    let d = &mut Pair {
        dp: &mut dp,
        base: None,
    };
    publish(d, &policy(rules, CIDRS)).expect("publish");
    if established {
        dp.open_flow(&flow_of(rules, CIDRS), true, true)
            .expect("record the flow");
    }
    let frame = last_rule_syn(rules, CIDRS);
    let started = Instant::now();
    let mut packets = 0u64;
    let mut busy = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(10) {
        busy += dp.time_xdp(&frame, 1, REPEAT, false).expect("run fw_xdp").1 * REPEAT;
        packets += u64::from(REPEAT);
    }
    println!(
        "{packets} packets, {} ns/packet",
        busy.as_nanos() / u128::from(packets)
    );
    let _ = dp.shutdown();
}

/// The benchmark's packet for `rules` rules sharing `cidrs`: from the last
/// CIDR of the last rule, to the last rule's port (10.0.0.1 to port 999
/// for none).
fn last_rule_syn(rules: usize, cidrs: usize) -> Vec<u8> {
    let dport = rules.checked_sub(1).map_or(999, port);
    syn(last_source(rules, cidrs).to_be_bytes(), dport)
}

/// The last CIDR of the last of `rules` rules sharing `cidrs` (10.0.0.1
/// for none).
fn last_source(rules: usize, cidrs: usize) -> u32 {
    let last = cidrs
        .checked_div(rules)
        .map_or(1, |per| (per * rules) as u32);
    0x0a00_0000u32 + last
}

/// Where `fw_xdp`'s and `fw_tc_in`'s time goes: the object loaded once
/// per row with one part switched off (`filter_common::bench_skip`,
/// read-only data the verifier folds), all with the same policy, timed
/// alternating with each other and the pass programs; medians of five.
/// `fw_tc_in` runs as without XDP's metadata, so it runs XDP's stages
/// too. For a new flow decided by the last of 1,000 rules (100,000
/// CIDRs), the same packet on a flow conntrack knows, and a packet of an
/// endpoint without policy (which TC's normal stage denies: Calico's
/// default for a host endpoint).
fn profile(pin_dir: &Path) {
    use filter_common::bench_skip as skip;
    // (part, mask, whether fw_xdp has the part).
    let parts = [
        ("whole pipeline", 0, true),
        ("without the failsafe lookups", skip::FAILSAFE, true),
        ("without the untracked stage", skip::UNTRACKED, true),
        ("without the conntrack lookups", skip::CONNTRACK, true),
        ("without the pre-DNAT stage", skip::PRE_DNAT, true),
        (
            "without the classifier's scan (lookups kept)",
            skip::SCAN,
            true,
        ),
        (
            "without the table hints (every field looked up)",
            skip::HINTS,
            true,
        ),
        (
            "without the FIB lookup (TC: host-bound taken as known)",
            skip::HOST_BOUND,
            false,
        ),
        ("without the normal stage (TC)", skip::NORMAL, false),
        (
            "parse and metadata only",
            skip::FAILSAFE
                | skip::UNTRACKED
                | skip::CONNTRACK
                | skip::PRE_DNAT
                | skip::HOST_BOUND
                | skip::NORMAL,
            true,
        ),
    ];
    let mut dps: Vec<Dataplane> = parts
        .iter()
        .enumerate()
        .map(|(i, &(_, mask, _))| {
            let options = Options {
                bench_skip: mask,
                room: Room::MAX,
                ..Options::default()
            };
            Dataplane::load_with(&pin_dir.join(format!("p{i}")), &options).expect("load")
        })
        .collect();
    const RULES: usize = 1000;
    // (packet, policy, frame, whether conntrack knows its flow).
    let cases = [
        (
            "new flow, rule 1,000 of 1,000 decides",
            policy(RULES, CIDRS),
            last_rule_syn(RULES, CIDRS),
            false,
        ),
        (
            "established flow, 1,000 rules",
            policy(RULES, CIDRS),
            last_rule_syn(RULES, CIDRS),
            true,
        ),
        (
            "endpoint without policy",
            policy(0, 0),
            last_rule_syn(0, 0),
            false,
        ),
    ];
    let run = TcRun {
        ingress: true,
        ifindex: 1,
        ingress_ifindex: 1,
        mark: 0,
    };
    println!("\n### Where the time goes: one part switched off at a time\n");
    println!("`fw_tc_in` as in the grid: without XDP's metadata, so it runs XDP's stages too. A part a program does not have is marked -.\n");
    println!("| packet | part switched off | fw_xdp ns/packet | saved ns | XDP_PASS ns/packet | fw_tc_in ns/packet | saved ns | TC pass ns/packet |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let flow = flow_of(RULES, CIDRS);
    for (what, text, frame, established) in &cases {
        let compiled = compiled(text);
        let ifaces: Interfaces = [("lo".to_string(), 1)].into();
        for dp in &mut dps {
            dp.publish(&compiled, &ifaces).expect("publish");
            if *established {
                dp.open_flow(&flow, true, true).expect("record the flow");
            } else {
                dp.forget_flow(&flow).expect("forget the flow");
            }
        }
        let mut xdp = vec![Vec::new(); dps.len()];
        let mut tc = vec![Vec::new(); dps.len()];
        let (mut pass, mut tc_pass) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            for (i, dp) in dps.iter_mut().enumerate() {
                if parts[i].2 {
                    xdp[i].push(dp.time_xdp(frame, 1, REPEAT, false).expect("run").1);
                }
                tc[i].push(dp.time_tc(frame, run, REPEAT, false).expect("run").1);
            }
            pass.push(dps[0].time_xdp(frame, 1, REPEAT, true).expect("pass").1);
            tc_pass.push(dps[0].time_tc(frame, run, REPEAT, true).expect("pass").1);
        }
        let ns = |v: Vec<Duration>| median(v).map(|d| d.as_nanos() as i64);
        let xdp: Vec<Option<i64>> = xdp.into_iter().map(ns).collect();
        let tc: Vec<Option<i64>> = tc.into_iter().map(ns).collect();
        let (pass, tc_pass) = (
            ns(pass).unwrap_or_default(),
            ns(tc_pass).unwrap_or_default(),
        );
        // The time and what switching the part off saved against the
        // whole pipeline (row 0).
        let cells = |times: &[Option<i64>], i: usize| match (times[i], times[0]) {
            (Some(t), _) if i == 0 => (t.to_string(), String::new()),
            (Some(t), Some(whole)) => (t.to_string(), (whole - t).to_string()),
            _ => ("-".into(), "-".into()),
        };
        for (i, (part, _, _)) in parts.iter().enumerate() {
            let (x, x_saved) = cells(&xdp, i);
            let (t, t_saved) = cells(&tc, i);
            println!(
                "| {what} | {part} | {x} | {x_saved} | {pass} | {t} | {t_saved} | {tc_pass} |"
            );
        }
    }
    for dp in dps {
        let _ = dp.shutdown();
    }
}

/// The dataplane under test and, with `--baseline`, the baseline build
/// with the same policy.
struct Pair<'a> {
    dp: &'a mut Dataplane,
    base: Option<&'a mut Dataplane>,
}

impl Pair<'_> {
    fn each(&mut self, mut f: impl FnMut(&mut Dataplane)) {
        f(self.dp);
        if let Some(b) = self.base.as_deref_mut() {
            f(b);
        }
    }
}

/// The classifier's worst case: 10,000 rules where every bitmap word has
/// rules for the packet's source and rules for its port, but never both,
/// so the scan cannot skip a word; only the last rule matches.
fn worst_case(d: &mut Pair<'_>) {
    const RULES: usize = 10_000;
    let mut y = format!("{HEP}{POLICY_HEAD}");
    for r in 0..RULES {
        let (net, port) = match (r == RULES - 1, r % 2) {
            (true, _) => ("10.0.0.1", 80),
            (false, 0) => ("10.0.0.1", 81),
            (false, _) => ("10.0.0.2", 80),
        };
        y += &format!("  - action: Deny\n    protocol: TCP\n    source: {{nets: [{net}/32]}}\n    destination: {{ports: [{port}]}}\n");
    }
    let publish = publish(d, &y).expect("publish");
    let frame = syn([10, 0, 0, 1], 80);
    row(
        &format!("{RULES}, worst case (no word skipped)"),
        0,
        measure(d, &frame),
        Some(publish),
    );
}

/// Compiles `text` and makes it the live policy on `lo`: how long the
/// dataplane under test took to enforce it and how many entries it wrote
/// (the baseline gets it too, untimed), or why the dataplane refused it (a
/// capacity).
fn publish(d: &mut Pair<'_>, text: &str) -> Result<PublishTimes, String> {
    let compiled = compiled(text);
    let ifaces: Interfaces = [("lo".to_string(), 1)].into();
    d.dp.publish(&compiled, &ifaces)
        .map_err(|e| e.to_string())?;
    let times = d.dp.last_publish();
    if let Some(b) = d.base.as_deref_mut() {
        b.publish(&compiled, &ifaces).expect("publish the baseline");
    }
    Ok(times)
}

/// One table row: what [`measure`] gave, and the publish times if any.
fn row(label: &str, cidrs: usize, m: Measured, publish: Option<PublishTimes>) {
    let publish = publish.map_or(String::new(), |p| {
        format!("{} / {}", p.to_enforce.as_millis(), p.changed)
    });
    let (base, ratio) = match m.base {
        Some(b) => (
            b.as_nanos().to_string(),
            format!("{:.2}", m.fw.as_secs_f64() / b.as_secs_f64()),
        ),
        None => ("-".into(), "-".into()),
    };
    let times = |a: Duration, b: Duration| format!("{:.1}", a.as_secs_f64() / b.as_secs_f64());
    // TC runs the host's normal stage too: an endpoint without policy
    // passes XDP and meets Calico's default deny there.
    let verdicts = match (verdict(m.ret), tc_verdict(m.tc_ret)) {
        (x, t) if x == t => x.to_string(),
        (x, t) => format!("{x} (TC: {t})"),
    };
    println!(
        "| {label} | {cidrs} | {} | {base} | {ratio} | {} | {} | {} | {} | {} | {} | {publish} |",
        m.fw.as_nanos(),
        m.pass.as_nanos(),
        times(m.fw, m.pass),
        m.tc.as_nanos(),
        m.tc_pass.as_nanos(),
        times(m.tc, m.tc_pass),
        verdicts
    );
}

/// The grid as lines over the number of rules: `fw_xdp` and `fw_tc_in`
/// per CIDR count, and the pass programs.
fn plot_grid(path: &Path, grid: &[(usize, usize, Measured)]) {
    let mut series = filter_tests::plot::Series::default();
    let mut add =
        |name: &str, x: usize, ns: Duration| series.add(name, x as f64, ns.as_nanos() as f64);
    for &(rules, cidrs, m) in grid.iter().filter(|g| g.0 > 0) {
        add(&format!("fw_xdp, {}k CIDRs", cidrs / 1000), rules, m.fw);
        add(&format!("fw_tc_in, {}k CIDRs", cidrs / 1000), rules, m.tc);
        if cidrs == 100_000 {
            add("XDP_PASS", rules, m.pass);
            add("TC pass", rules, m.tc_pass);
        }
    }
    filter_tests::plot::lines(
        path,
        "Per-packet cost, new flow decided by the last rule (BPF_PROG_TEST_RUN)",
        "rules",
        "ns per packet",
        &series.0,
    );
}

/// Medians of one row.
#[derive(Clone, Copy)]
struct Measured {
    /// `fw_xdp`'s return code.
    ret: u32,
    fw: Duration,
    /// The baseline's `fw_xdp`, with `--baseline`.
    base: Option<Duration>,
    pass: Duration,
    /// `fw_tc_in`'s action, as if XDP had left no metadata (it runs
    /// XDP's stages itself), its time and the TC pass program's.
    tc_ret: i32,
    tc: Duration,
    tc_pass: Duration,
}

fn compiled(text: &str) -> compile::Compiled {
    let mut store = Store::default();
    let mut errors = Vec::new();
    store.add_text(Path::new("bench.yaml"), text, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    compile::compile(
        &store,
        &Node {
            name: "bench".into(),
            interfaces: BTreeMap::new(),
        },
    )
    .expect("compiles")
}

/// Times `fw_xdp`, the baseline's `fw_xdp` and `fw_pass` on `frame`,
/// alternating, `RUNS` times each: the medians. One run of a row swings by
/// ±150 ns on this machine kind; the median of five is steadier, and
/// alternating spreads the machine's slower moments over all three.
fn measure(d: &mut Pair<'_>, frame: &[u8]) -> Measured {
    let mut ret = 0;
    let mut tc_ret = 0;
    let (mut fw, mut base, mut pass) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tc, mut tc_pass) = (Vec::new(), Vec::new());
    let run = TcRun {
        ingress: true,
        ifindex: 1,
        ingress_ifindex: 1,
        mark: 0,
    };
    for _ in 0..RUNS {
        let (r, t) =
            d.dp.time_tc(frame, run, REPEAT, false)
                .expect("run fw_tc_in");
        tc_ret = r;
        tc.push(t);
        let (_, p) =
            d.dp.time_tc(frame, run, REPEAT, true)
                .expect("run the TC pass");
        tc_pass.push(p);
        let (r, t) = d.dp.time_xdp(frame, 1, REPEAT, false).expect("run fw_xdp");
        if let Some(b) = d.base.as_deref_mut() {
            let (rb, tb) = b
                .time_xdp(frame, 1, REPEAT, false)
                .expect("run the baseline");
            assert_eq!(r, rb, "the baseline decides as the object under test");
            base.push(tb);
        }
        let (_, p) = d.dp.time_xdp(frame, 1, REPEAT, true).expect("run fw_pass");
        ret = r;
        fw.push(t);
        pass.push(p);
    }
    Measured {
        ret,
        fw: median(fw).unwrap_or_default(),
        base: median(base),
        pass: median(pass).unwrap_or_default(),
        tc_ret,
        tc: median(tc).unwrap_or_default(),
        tc_pass: median(tc_pass).unwrap_or_default(),
    }
}

/// Timed runs per measurement, alternating between the programs compared.
const RUNS: usize = 5;

/// The median of `runs` (`None` for none).
fn median(mut runs: Vec<Duration>) -> Option<Duration> {
    runs.sort();
    runs.get(runs.len() / 2).copied()
}

/// A 64-byte TCP SYN to 192.0.2.1.
fn syn(src: [u8; 4], dport: u16) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, [192, 0, 2, 1], 64)
        .tcp(40000, dport, 1, 1024)
        .syn()
        .write(&mut frame, &[0u8; 10])
        .expect("build");
    frame.resize(64, 0);
    frame
}

fn verdict(xdp_action: u32) -> &'static str {
    match xdp_action {
        1 => "drop",
        2 => "pass",
        _ => "other",
    }
}

fn tc_verdict(tc_action: i32) -> &'static str {
    match tc_action {
        0 => "pass",
        2 => "drop",
        _ => "other",
    }
}

/// The benchmark's pin directory, removed when dropped: also when a run
/// panics (a closed stdout, say).
struct Unpin(std::path::PathBuf);

impl Unpin {
    fn new() -> Unpin {
        filter_tests::remove_stale_pins("fwbench");
        Unpin(Path::new("/sys/fs/bpf").join(format!("fwbench{}", std::process::id())))
    }
}

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
