//! Test hosts in network namespaces, real traffic between them, and the
//! agent as a child process.
//!
//! Everything created here is owned by a guard that removes it on drop, also
//! when a test panics: [`Netns`] deletes its namespace (and with it every
//! veth inside), [`Agent`] stops its process and removes its pins, servers
//! stop their threads. Traffic only ever goes to addresses these namespaces
//! hold.

pub mod demo;
pub mod flood;
pub mod kubeapi;
pub mod plot;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Whether the caller may run privileged tests. Without root: under
/// `cargo xtask test` (which sets `FILTER_REQUIRE_PRIVILEGED=1`) this panics,
/// so a privileged test can never pass by not running; elsewhere it prints a
/// loud SKIPPED line and returns false.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("FILTER_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test} needs root and FILTER_REQUIRE_PRIVILEGED=1: refusing to skip it");
    }
    eprintln!("SKIPPED {test}: needs root (network namespaces, BPF); run `sudo cargo xtask test`");
    false
}

/// Runs a command, panicking with its output when it fails.
/// Makes the tables pinned under `pin_dir` inconsistent, as corruption
/// would: the live generation (`FW_GEN1`) set past the last, with bpftool.
/// Every stage then finds its tables broken and decides nothing.
pub fn break_generation(pin_dir: &Path) {
    let map = pin_dir.join(filter_common::names::MAP_GENERATION);
    let map = map.to_str().expect("utf-8 pin path");
    sh(
        "bpftool",
        &[
            "map", "update", "pinned", map, "key", "0", "0", "0", "0", "value", "9", "0", "0", "0",
        ],
    );
}

pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("start {program}: {e}"));
    if !out.status.success() {
        panic!(
            "{program} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// A name unique to this process and call: `<prefix><pid>x<n>`, short enough
/// for namespace and pin directory names.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes the pin directories a killed benchmark run left (its guards
/// never ran): `/sys/fs/bpf/PREFIX…PID` whose trailing PID is a process
/// that is gone.
pub fn remove_stale_pins(prefix: &str) {
    for e in std::fs::read_dir("/sys/fs/bpf")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) {
            continue;
        }
        let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        let Ok(pid) = name[name.len() - digits..].parse::<u32>() else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `name` with its loopback up.
    pub fn new(name: &str) -> Netns {
        // A namespace left by an interrupted run of the same name goes first.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        sh("ip", &["netns", "add", name]);
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the namespace file, for `setns` and `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Runs `f` on a thread that lives in this namespace: sockets it opens
    /// belong to the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("namespace thread panicked")
    }

    /// Like [`Netns::run`], without waiting.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &Path) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys the veths inside it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A namespace whose FIB is a router's: `v4` and `v6` are the node's own
/// addresses (on `lo`), everything else is routed out by `other0` (one end
/// of a veth pair inside it), forwarding on. TC ingress asks the FIB
/// whether a packet is for the node, so tests that run the TC programs on
/// crafted packets do it in here, not in whatever namespace runs the tests.
pub fn router_netns(prefix: &str, v4: &str, v6: &str) -> Netns {
    let ns = Netns::new(&unique(prefix));
    ns.ip(&[
        "link", "add", "other0", "type", "veth", "peer", "name", "other1",
    ]);
    for link in ["other0", "other1"] {
        ns.ip(&["link", "set", link, "up"]);
    }
    ns.ip(&["addr", "add", &format!("{v4}/32"), "dev", "lo"]);
    ns.ip(&["addr", "add", &format!("{v6}/128"), "dev", "lo"]);
    ns.ip(&["route", "add", "default", "dev", "other0"]);
    ns.ip(&["-6", "route", "add", "default", "dev", "other0"]);
    sh(
        "ip",
        &[
            "netns",
            "exec",
            ns.name(),
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ],
    );
    ns
}

/// Joins `a` and `b` with a veth pair named `a_if` / `b_if` (names are per
/// namespace, so they can repeat across tests) and brings both ends up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    sh(
        "ip",
        &[
            "link",
            "add",
            a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ],
    );
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// A small deterministic generator (xorshift*): random tests replay from
/// their seed.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// One of `xs`.
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[(self.next_u64() % xs.len() as u64) as usize]
    }

    /// True with probability 1/`n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.next_u64().is_multiple_of(n)
    }
}

/// A worker with one host endpoint (`eth1`: 192.0.2.1, 2001:db8::1) and a
/// client (`eth0`: 192.0.2.10, 2001:db8::10) on one veth pair.
pub struct Pair {
    pub client: Netns,
    pub worker: Netns,
}

impl Pair {
    /// The worker's address on the host endpoint.
    pub const WORKER_V4: [u8; 4] = [192, 0, 2, 1];
    /// The client's address.
    pub const CLIENT_V4: [u8; 4] = [192, 0, 2, 10];
    /// The worker's IPv6 address.
    pub const WORKER_V6: &str = "2001:db8::1";
    /// The client's IPv6 address.
    pub const CLIENT_V6: &str = "2001:db8::10";

    /// Creates both namespaces, named from `prefix`.
    pub fn new(prefix: &str) -> Pair {
        let client = Netns::new(&unique(&format!("{prefix}c")));
        let worker = Netns::new(&unique(&format!("{prefix}w")));
        veth(&client, "eth0", &worker, "eth1");
        client.ip(&["addr", "add", "192.0.2.10/24", "dev", "eth0"]);
        worker.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth1"]);
        // nodad: usable at once, no duplicate-address wait.
        client.ip(&["addr", "add", "2001:db8::10/64", "dev", "eth0", "nodad"]);
        worker.ip(&["addr", "add", "2001:db8::1/64", "dev", "eth1", "nodad"]);
        Pair { client, worker }
    }

    /// The worker's IPv4 address and `port`.
    pub fn worker(port: u16) -> SocketAddr {
        SocketAddr::from((Self::WORKER_V4, port))
    }

    /// The client's IPv4 address and `port`.
    pub fn client(port: u16) -> SocketAddr {
        SocketAddr::from((Self::CLIENT_V4, port))
    }
}

impl Pair {
    /// A "pod" namespace behind the worker (`pod0` ↔ its `eth0`,
    /// 10.244.0.5) and kube-proxy's NodePort simulated by one nftables DNAT
    /// rule in the worker: 192.0.2.1:30080 → 10.244.0.5:80.
    pub fn node_port_to_pod(&self, name: &str) -> Netns {
        let pod = Netns::new(&unique(name));
        veth(&self.worker, "pod0", &pod, "eth0");
        self.worker
            .ip(&["addr", "add", "10.244.0.1/24", "dev", "pod0"]);
        pod.ip(&["addr", "add", "10.244.0.5/24", "dev", "eth0"]);
        pod.ip(&["route", "add", "default", "via", "10.244.0.1"]);
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", self.worker.name()];
            all.extend_from_slice(args);
            sh("ip", &all);
        };
        exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        exec(&[
            "nft",
            "add table ip kube; \
             add chain ip kube pre { type nat hook prerouting priority -100; }; \
             add rule ip kube pre tcp dport 30080 dnat to 10.244.0.5:80",
        ]);
        pod
    }
}

/// A thread serving in a namespace until dropped: what every server below
/// is.
struct Background {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Background {
    /// Runs `serve(stop, ready)` on a thread in `ns` and waits until it
    /// signals `ready` (its socket is bound).
    fn start(
        ns: &Netns,
        serve: impl FnOnce(Arc<AtomicBool>, std::sync::mpsc::Sender<()>) + Send + 'static,
    ) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let handle = ns.spawn(move || serve(flag, ready_tx));
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("server started");
        Background {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Binds a TCP listener at `addr`, says it is ready, and hands every
/// connection to `on_conn` until `stop`.
fn serve_tcp(
    addr: SocketAddr,
    stop: &AtomicBool,
    ready: std::sync::mpsc::Sender<()>,
    mut on_conn: impl FnMut(TcpStream),
) {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    ready.send(()).expect("test alive");
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                on_conn(s);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A TCP server in a namespace that greets every connection with `name`,
/// stopped on drop.
pub struct TcpServer {
    _running: Background,
}

impl TcpServer {
    /// Listens on `addr` inside `ns` (the address must exist there).
    pub fn start(ns: &Netns, addr: SocketAddr, name: &str) -> TcpServer {
        let greeting = format!("{name}\n");
        let _running = Background::start(ns, move |stop, ready| {
            serve_tcp(addr, &stop, ready, |mut s| {
                let _ = s.write_all(greeting.as_bytes());
            })
        });
        TcpServer { _running }
    }
}

/// A UDP server in a namespace that answers every datagram with `name`.
pub struct UdpServer {
    _running: Background,
}

impl UdpServer {
    /// Binds `addr` inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr, name: &str) -> UdpServer {
        let reply = name.as_bytes().to_vec();
        let _running = Background::start(ns, move |stop, ready| {
            let sock =
                std::net::UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
            sock.set_read_timeout(Some(Duration::from_millis(20)))
                .expect("timeout");
            ready.send(()).expect("test alive");
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&reply, peer);
                }
            }
        });
        UdpServer { _running }
    }
}

/// A TCP server that echoes every line back on every connection, keeping
/// connections open: the other end of [`Conn`].
pub struct EchoServer {
    _running: Background,
}

impl EchoServer {
    /// Listens on `addr` inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr) -> EchoServer {
        let _running = Background::start(ns, move |stop, ready| {
            serve_tcp(addr, &stop.clone(), ready, |s| {
                let stop = stop.clone();
                std::thread::spawn(move || echo(s, &stop));
            })
        });
        EchoServer { _running }
    }
}

fn echo(s: TcpStream, stop: &AtomicBool) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if w.write_all(line.as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// A TCP connection opened from a namespace that stays open, to show that
/// an established flow keeps working (or not) across policy changes.
pub struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    /// Connects from `ns` to an [`EchoServer`] at `addr`. The socket
    /// belongs to `ns` for its whole life, whichever thread uses it.
    pub fn open(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<Conn, String> {
        let stream =
            ns.run(move || TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string()))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        Ok(Conn { stream, reader })
    }

    /// Sends `msg` and waits for it to come back.
    pub fn echo(&mut self, msg: &str) -> Result<(), String> {
        self.stream
            .write_all(format!("{msg}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if line.trim_end() == msg {
            Ok(())
        } else {
            Err(format!("sent {msg:?}, got {line:?}"))
        }
    }
}

/// Switches the kernel's connection tracking on in `ns`, as kube-proxy's
/// or Calico's own rules do on a real node: an nftables rule that reads
/// conntrack state makes the kernel track every flow of the namespace.
pub fn kernel_conntrack_on(ns: &Netns) {
    let nft = |args: &[&str]| {
        let mut all = vec!["netns", "exec", ns.name(), "nft"];
        all.extend_from_slice(args);
        sh("ip", &all);
    };
    nft(&["add", "table", "inet", "fwtest_ct"]);
    for (chain, hook) in [("pre", "prerouting"), ("out", "output")] {
        nft(&[
            "add",
            "chain",
            "inet",
            "fwtest_ct",
            chain,
            &format!("{{ type filter hook {hook} priority 0; }}"),
        ]);
        nft(&[
            "add",
            "rule",
            "inet",
            "fwtest_ct",
            chain,
            "ct",
            "state",
            "established",
            "counter",
        ]);
    }
}

/// Pings `addr` once from `ns`; true when the echo reply came back.
pub fn ping(ns: &Netns, addr: std::net::IpAddr) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns.name(), "ping", "-c", "1", "-W", "1"])
        .arg(addr.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Connects from `ns` to `addr` and reads the greeting; `Err` says why
/// (timeout: the SYN or its answer was dropped).
pub fn tcp_probe(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
        Ok(buf.trim().to_owned())
    })
}

/// Sends one datagram from `ns` to `addr` and waits for the answer.
pub fn udp_probe(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    ns.run(move || {
        let bind: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .expect("constant");
        let s = std::net::UdpSocket::bind(bind).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.send_to(b"ping", addr).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 512];
        let (n, _) = s.recv_from(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// The agent binary: `FILTER_AGENT_BIN`, else the workspace's debug or
/// release build.
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FILTER_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for profile in ["debug", "release"] {
        let p = root.join("target").join(profile).join("filter-agent");
        if p.exists() {
            return p;
        }
    }
    panic!("no filter-agent binary: run `cargo xtask build` (or set FILTER_AGENT_BIN)");
}

/// `filter-agent run` inside a namespace, its log captured; stopped (and
/// its pins removed) on drop.
pub struct Agent {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Standard output: the LOG lines of Log records.
    out: Arc<Mutex<Vec<String>>>,
    pin_dir: PathBuf,
    reader: Option<JoinHandle<()>>,
    /// Set by [`Agent::crash`]: the pins are the point.
    keep_pins: bool,
}

impl Agent {
    /// Starts the agent in `ns` on `policy_dir` as node `node`, with
    /// `--detach-on-exit` so a stopped agent leaves nothing behind.
    pub fn start(
        binary: &Path,
        ns: &Netns,
        policy_dir: &Path,
        node: &str,
        pin_dir: &Path,
    ) -> Agent {
        Self::start_with(binary, ns, policy_dir, node, pin_dir, &["--detach-on-exit"])
    }

    /// Like [`Agent::start`], with other extra arguments.
    pub fn start_with(
        binary: &Path,
        ns: &Netns,
        policy_dir: &Path,
        node: &str,
        pin_dir: &Path,
        extra: &[&str],
    ) -> Agent {
        let mut args = vec!["--policy-dir", policy_dir.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        Self::start_args(binary, ns, node, pin_dir, &args)
    }

    /// `filter-agent run` in `ns` as node `node` pinning at `pin_dir`,
    /// with `args` naming its policy sources and anything else.
    pub fn start_args(
        binary: &Path,
        ns: &Netns,
        node: &str,
        pin_dir: &Path,
        args: &[&str],
    ) -> Agent {
        // `ip netns exec` remounts /sys and would hide bpffs: enter the
        // network namespace only.
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .arg(binary)
            .args(["run", "--interface-poll", "1", "--node", node])
            .arg("--pin-dir")
            .arg(pin_dir)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().expect("piped");
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log lock").push(line);
            }
        });
        let out = Arc::new(Mutex::new(Vec::new()));
        let out_sink = out.clone();
        let stdout = child.stdout.take().expect("piped");
        // Read as it comes: a full pipe would stall the agent's reader.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                out_sink.lock().expect("out lock").push(line);
            }
        });
        Agent {
            child,
            log,
            out,
            pin_dir: pin_dir.to_owned(),
            reader: Some(reader),
            keep_pins: false,
        }
    }

    /// Where the agent pins its programs, maps and links.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Kills the agent with SIGKILL, as a crash would, and leaves its pins
    /// (and so its attached programs) for the next agent.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.keep_pins = true;
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lines logged so far containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until `needle` has been logged more than `seen` times.
    pub fn wait_for(&mut self, needle: &str, seen: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.count(needle) > seen {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "agent exited ({status}) before logging {needle:?}:\n{}",
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "agent did not log {needle:?} within {timeout:?}:\n{}",
            self.log_text()
        ))
    }

    /// Lines the agent printed on standard output so far (LOG lines).
    pub fn output(&self) -> Vec<String> {
        self.out.lock().expect("out lock").clone()
    }

    /// [`Agent::output`] once a line of it contains `needle`, or when
    /// `timeout` has passed (the caller's assertions then say what is
    /// missing).
    pub fn output_once(&self, needle: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.output();
            if out.iter().any(|l| l.contains(needle)) || Instant::now() > deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate().expect("agent stops")
    }

    /// Sends SIGTERM as a rolling update does and leaves the pins (an
    /// agent started without `--detach-on-exit` keeps its programs
    /// attached for the next one); returns the exit status.
    pub fn stop_keeping_pins(mut self) -> std::process::ExitStatus {
        self.keep_pins = true;
        self.terminate().expect("agent stops")
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(s)) = self.child.try_wait() {
            return Some(s);
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.terminate();
        // Pins of an agent that had to be killed.
        if !self.keep_pins {
            remove_agent_state(&self.pin_dir);
        }
    }
}

/// Removes an agent's pins (unpinning the last reference to a link
/// detaches it) and its state directory.
fn remove_agent_state(pin_dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(pin_dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(pin_dir);
    if let Some(name) = pin_dir.file_name() {
        let _ = std::fs::remove_dir_all(Path::new("/run/filter-agent").join(name));
    }
}

/// For tests that kill an agent on purpose ([`Agent::crash`] keeps its
/// pins for the next agent): removes the pins and the agent's state when
/// the test ends, also when it fails before another agent took over.
pub struct PinsGuard(pub PathBuf);

impl Drop for PinsGuard {
    fn drop(&mut self) {
        remove_agent_state(&self.0);
    }
}

/// A raw link-layer socket on one interface of a namespace: sends crafted
/// frames (what no socket API would send: tiny fragments, stacked tags)
/// and reads the frames that come back.
pub struct RawLink {
    fd: std::os::fd::OwnedFd,
    ifindex: i32,
}

impl RawLink {
    /// Opens an `AF_PACKET` socket on `ifname` inside `ns`.
    pub fn open(ns: &Netns, ifname: &str) -> RawLink {
        let ifname = ifname.to_owned();
        ns.run(move || {
            use std::os::fd::FromRawFd;
            let name = std::ffi::CString::new(ifname.clone()).expect("interface name");
            // SAFETY: plain libc calls with valid arguments; the returned
            // descriptor is checked and owned from here on.
            unsafe {
                let ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
                assert!(ifindex > 0, "no interface {ifname}");
                let proto = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32);
                assert!(
                    fd >= 0,
                    "AF_PACKET socket: {}",
                    std::io::Error::last_os_error()
                );
                let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = ifindex;
                let rc = libc::bind(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
                RawLink { fd, ifindex }
            }
        })
    }

    /// Sends one frame as it is.
    pub fn send(&self, frame: &[u8]) {
        use std::os::fd::AsRawFd;
        // SAFETY: `frame` is a valid buffer of its length; the address is a
        // zeroed sockaddr_ll with the family and interface set.
        let rc = unsafe {
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = self.ifindex;
            sll.sll_halen = 6;
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            rc,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Whether a frame for which `want` holds arrives within `timeout`
    /// (outgoing frames of this end are seen too; `want` tells them apart).
    pub fn wait_for(&self, timeout: Duration, want: impl Fn(&[u8]) -> bool) -> bool {
        self.capture(timeout, want).is_some()
    }

    /// The first frame for which `want` holds, within `timeout`.
    pub fn capture(&self, timeout: Duration, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; then a read into a buffer of its size.
            let n = unsafe {
                if libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) <= 0 {
                    continue;
                }
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n > 0 && want(&buf[..n as usize]) {
                return Some(buf[..n as usize].to_vec());
            }
        }
    }
}

/// The MAC address of `ifname` in `ns`.
pub fn mac(ns: &Netns, ifname: &str) -> [u8; 6] {
    let out = ns.ip(&["-o", "link", "show", ifname]);
    let text = out
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no MAC address in {out:?}"));
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(part, 16).expect("hex MAC byte");
    }
    mac
}

/// Splits an IPv4 frame (Ethernet + IPv4 without options + payload) into
/// fragments of the payload bytes `[cut[i], cut[i+1])` (multiples of 8
/// but the last), each with a correct header checksum: what a sender, or
/// an attacker, puts on the wire.
pub fn ipv4_fragments(frame: &[u8], cuts: &[usize], id: u16) -> Vec<Vec<u8>> {
    const IP: usize = 14;
    let payload = &frame[IP + 20..];
    let mut bounds = cuts.to_vec();
    bounds.insert(0, 0);
    bounds.push(payload.len());
    bounds
        .windows(2)
        .map(|w| {
            let (from, to) = (w[0], w[1]);
            let mut v = frame[..IP + 20].to_vec();
            v.extend_from_slice(&payload[from..to]);
            let total = (20 + to - from) as u16;
            v[IP + 2..IP + 4].copy_from_slice(&total.to_be_bytes());
            v[IP + 4..IP + 6].copy_from_slice(&id.to_be_bytes());
            let more = if to < payload.len() { 0x2000 } else { 0 };
            let flags = (from / 8) as u16 | more;
            v[IP + 6..IP + 8].copy_from_slice(&flags.to_be_bytes());
            v[IP + 10..IP + 12].copy_from_slice(&[0, 0]);
            let sum = internet_checksum(&v[IP..IP + 20]);
            v[IP + 10..IP + 12].copy_from_slice(&sum.to_be_bytes());
            v
        })
        .collect()
}

/// The RFC 1071 checksum of `data`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv6 `frame` with `n` destination-options headers (8
/// bytes each) between the fixed header and the upper layer; the upper
/// layer's checksum stays valid (it does not cover extension headers).
pub fn ipv6_with_dest_options(frame: &[u8], n: usize) -> Vec<u8> {
    const IP6: usize = 14;
    let mut v = frame.to_vec();
    let upper = v[IP6 + 6];
    let mut chain = Vec::new();
    for i in 0..n {
        let next = if i + 1 == n { upper } else { 60 };
        // next header, length 0 (8 bytes), PadN option of 4 bytes.
        chain.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    v.splice(IP6 + 40..IP6 + 40, chain);
    if n > 0 {
        v[IP6 + 6] = 60;
    }
    let plen = u16::from_be_bytes([v[IP6 + 4], v[IP6 + 5]]) + 8 * n as u16;
    v[IP6 + 4..IP6 + 6].copy_from_slice(&plen.to_be_bytes());
    v
}

/// `frame` with `n` priority tags (802.1Q, VID 0) after the MAC addresses:
/// the kernel strips every one of them and delivers what is inside.
pub fn with_priority_tags(frame: &[u8], n: usize) -> Vec<u8> {
    let mut v = frame[..12].to_vec();
    for _ in 0..n {
        v.extend_from_slice(&[0x81, 0x00, 0x00, 0x00]);
    }
    v.extend_from_slice(&frame[12..]);
    v
}
