//! A UDP flood through a veth pair, for `cargo xtask bench`'s real-traffic
//! tables: a sender pinned to one CPU and the receiver's packet processing
//! pinned to the other, so the receiver's filter is what is measured.
//!
//! The sender writes ready-made 60-byte frames (64 on a wire, with the FCS)
//! to an `AF_PACKET` socket with `sendmmsg`, past the qdisc. When the
//! receiver's ring is full, veth refuses the frame and the sender counts it
//! and goes on: the offered rate is what the sender tried, the delivered
//! rate what the receiver took.
//!
//! The receiving veth runs its NAPI poll in a kernel thread (threaded NAPI,
//! GRO on so the pair uses NAPI without XDP as well), pinned to the
//! receiver's CPU. That thread's CPU time is the receiver's whole cost per
//! packet: the driver's part, XDP, and for the netfilter peers the stack up
//! to their hook.

use std::{
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;

use crate::{sh, Netns};

/// The sender's interface (in the sender's namespace) and its MAC.
pub const TX_IF: &str = "fwbt0";
const TX_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
/// The receiver's interface and its MAC: frames are addressed to it, so the
/// stack takes them as its own (a peer that filters in the stack sees them).
pub const RX_IF: &str = "fwbr0";
const RX_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
/// The receiver's address (documentation range, RFC 5737).
pub const RX_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const TX_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The UDP port the flood goes to; nothing listens there.
pub const PORT: u16 = 9;

/// CPUs: the sender runs on one, the receiver's NAPI thread on the other.
const SENDER_CPU: usize = 0;
const RECEIVER_CPU: usize = 1;

/// Source address number `i` of a deny list: RFC 2544's benchmarking range
/// (198.18.0.0/15) first, then 10.0.0.0/8 for lists longer than that.
pub fn source(i: u32) -> Ipv4Addr {
    const BENCH: u32 = 1 << 17;
    if i < BENCH {
        Ipv4Addr::from(0xc612_0000 + i)
    } else {
        Ipv4Addr::from(0x0a00_0000 + (i - BENCH))
    }
}

/// 60-byte UDP frames to the receiver, one per source.
pub fn frames(sources: impl Iterator<Item = Ipv4Addr>) -> Vec<Vec<u8>> {
    sources
        .enumerate()
        .map(|(i, src)| {
            let b = PacketBuilder::ethernet2(TX_MAC, RX_MAC)
                .ipv4(src.octets(), RX_ADDR.octets(), 64)
                .udp(1024 + (i % 50_000) as u16, PORT);
            let payload = [0u8; 18];
            let mut f = Vec::with_capacity(b.size(payload.len()));
            b.write(&mut f, &payload).expect("write a frame");
            f
        })
        .collect()
}

/// The sender and receiver namespaces joined by a veth pair, the receiver's
/// NAPI in a thread; removed on drop (with everything in them).
pub struct Link {
    pub tx: Netns,
    pub rx: Netns,
}

impl Link {
    pub fn new() -> Link {
        let tx = Netns::new("fwb-tx");
        let rx = Netns::new("fwb-rx");
        sh(
            "ip",
            &[
                "link",
                "add",
                TX_IF,
                "netns",
                tx.name(),
                "address",
                &mac(TX_MAC),
                "type",
                "veth",
                "peer",
                "name",
                RX_IF,
                "netns",
                rx.name(),
                "address",
                &mac(RX_MAC),
            ],
        );
        tx.ip(&["addr", "add", &format!("{TX_ADDR}/24"), "dev", TX_IF]);
        rx.ip(&["addr", "add", &format!("{RX_ADDR}/24"), "dev", RX_IF]);
        // veth takes the NAPI path only for frames it could aggregate: with
        // TSO off on the sender (as attaching XDP to the receiver would
        // make it anyway) and GRO on at the receiver, every configuration
        // uses it.
        netns_exec(&tx, &["ethtool", "-K", TX_IF, "tso", "off"]);
        netns_exec(&rx, &["ethtool", "-K", RX_IF, "gro", "on"]);
        tx.ip(&["link", "set", TX_IF, "up"]);
        rx.ip(&["link", "set", RX_IF, "up"]);
        // Threaded NAPI needs the NAPI instance, which the link brings up.
        netns_exec(
            &rx,
            &[
                "sh",
                "-c",
                &format!("echo 1 > /sys/class/net/{RX_IF}/threaded"),
            ],
        );
        Link { tx, rx }
    }

    /// Floods `frames` (round robin) for `time` and measures.
    pub fn measure(&self, frames: &[Vec<u8>], time: Duration) -> Rate {
        let napi = napi_thread(RX_IF)
            .unwrap_or_else(|| panic!("no NAPI thread for {RX_IF}: is threaded NAPI on?"));
        pin(napi, RECEIVER_CPU);
        let stop = Arc::new(AtomicBool::new(false));
        let sender = Sender::start(&self.tx, frames.to_vec(), stop.clone());
        // Let the rings fill before the interval starts.
        std::thread::sleep(Duration::from_millis(300));
        let (d0, c0, s0) = (self.delivered(), cpu_ns(napi), sender.attempts());
        let t0 = Instant::now();
        std::thread::sleep(time);
        let (d1, c1, s1) = (self.delivered(), cpu_ns(napi), sender.attempts());
        let secs = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        sender.join();
        let delivered = d1 - d0;
        Rate {
            offered_pps: (s1 - s0) as f64 / secs,
            delivered_pps: delivered as f64 / secs,
            cpu_ns_per_packet: (c1 - c0) as f64 / delivered.max(1) as f64,
        }
    }

    /// Frames the receiver took off the wire: veth counts a frame as sent
    /// once it is in the receiver's ring.
    fn delivered(&self) -> u64 {
        let path = format!("/sys/class/net/{TX_IF}/statistics/tx_packets");
        netns_exec(&self.tx, &["cat", &path])
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }
}

impl Default for Link {
    fn default() -> Self {
        Self::new()
    }
}

/// What one measurement saw.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    /// Frames per second the sender tried.
    pub offered_pps: f64,
    /// Frames per second the receiver took (and its filter dropped).
    pub delivered_pps: f64,
    /// The receiver's CPU time per frame taken.
    pub cpu_ns_per_packet: f64,
}

/// `ip netns exec NS ARGS…`: for tools that need the namespace's own
/// /sys, not bpffs.
pub fn netns_exec(ns: &Netns, args: &[&str]) -> String {
    let mut all = vec!["netns", "exec", ns.name()];
    all.extend_from_slice(args);
    sh("ip", &all)
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The kernel thread that runs `ifname`'s NAPI poll (`napi/IF-ID`). veth
/// makes a new one whenever its NAPI is set up again (attaching or
/// detaching XDP), so this is looked up per measurement.
pub fn napi_thread(ifname: &str) -> Option<i32> {
    let prefix = format!("napi/{ifname}-");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        comm.starts_with(&prefix).then_some(pid)
    })
}

fn pin(pid: i32, cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).expect("a CPU number");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(pid), &set)
        .unwrap_or_else(|e| panic!("pin thread {pid} to CPU {cpu}: {e}"));
}

/// Time the thread has run, in ns (`/proc/PID/schedstat`'s first field).
fn cpu_ns(pid: i32) -> u64 {
    let path = format!("/proc/{pid}/schedstat");
    std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("read {path}"))
}

/// The sending thread: `sendmmsg` in batches on a packet socket bound to
/// [`TX_IF`], pinned to [`SENDER_CPU`].
struct Sender {
    attempts: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

/// Frames per `sendmmsg` call.
const BATCH: usize = 64;

impl Sender {
    fn start(ns: &Netns, frames: Vec<Vec<u8>>, stop: Arc<AtomicBool>) -> Sender {
        let attempts = Arc::new(AtomicU64::new(0));
        let counter = attempts.clone();
        let thread = ns.spawn(move || {
            pin(0, SENDER_CPU);
            let fd = packet_socket(TX_IF);
            let mut next = 0;
            let mut iov: Vec<libc::iovec> = Vec::with_capacity(BATCH);
            let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(BATCH);
            while !stop.load(Ordering::Relaxed) {
                iov.clear();
                for _ in 0..BATCH {
                    let f = &frames[next];
                    next = (next + 1) % frames.len();
                    iov.push(libc::iovec {
                        iov_base: f.as_ptr() as *mut _,
                        iov_len: f.len(),
                    });
                }
                msgs.clear();
                for v in iov.iter_mut() {
                    // SAFETY: mmsghdr is plain data; zero is a valid empty header.
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_iov = v;
                    m.msg_hdr.msg_iovlen = 1;
                    msgs.push(m);
                }
                // SAFETY: msgs and the iovecs and frames they point to
                // live until the call returns.
                let sent = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
                // A frame veth refused (its receiver's ring full) ends the
                // call with ENOBUFS; it was tried all the same, and the
                // next call goes on with the next frames.
                let tried = if sent < 0 { 1 } else { sent as u64 + 1 }.min(BATCH as u64);
                counter.fetch_add(tried, Ordering::Relaxed);
            }
            // SAFETY: fd is ours.
            unsafe { libc::close(fd) };
        });
        Sender { attempts, thread }
    }

    fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    fn join(self) {
        self.thread.join().expect("sender thread");
    }
}

/// An `AF_PACKET` socket bound to `ifname` that receives nothing
/// (protocol 0) and sends past the qdisc.
fn packet_socket(ifname: &str) -> i32 {
    // SAFETY: plain socket calls on values built here; failures are checked.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new(ifname).expect("interface name");
        let index = libc::if_nametoindex(name.as_ptr());
        assert!(index != 0, "no interface {ifname}");
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &one as *const _ as *const _,
            std::mem::size_of_val(&one) as u32,
        );
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        let rc = libc::bind(
            fd,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of_val(&addr) as u32,
        );
        assert!(
            rc == 0,
            "bind {ifname}: {}",
            std::io::Error::last_os_error()
        );
        fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    /// The flood's frames are what the receiver's stack takes as its own:
    /// 60 bytes, to its MAC and address, with a valid IPv4 checksum (a
    /// wrong one would be dropped by `ip_rcv` and flatter the stack).
    #[test]
    fn frames_are_valid_udp_to_the_receiver() {
        let sources = [source(0), source(131_071), source(131_072)];
        assert_eq!(
            sources,
            [
                Ipv4Addr::new(198, 18, 0, 0),
                Ipv4Addr::new(198, 19, 255, 255),
                Ipv4Addr::new(10, 0, 0, 0)
            ]
        );
        for (f, src) in frames(sources.into_iter()).iter().zip(sources) {
            assert_eq!(f.len(), 60);
            assert_eq!(f[..6], RX_MAC);
            let p = SlicedPacket::from_ethernet(f).expect("parses");
            let Some(NetSlice::Ipv4(ip)) = p.net else {
                panic!("not IPv4")
            };
            let h = ip.header().to_header();
            assert_eq!(h.header_checksum, h.calc_header_checksum());
            assert_eq!(
                (ip.header().source_addr(), ip.header().destination_addr()),
                (src, RX_ADDR)
            );
            let Some(TransportSlice::Udp(udp)) = p.transport else {
                panic!("not UDP")
            };
            assert_eq!(udp.destination_port(), PORT);
        }
    }
}
