//! The agent's side of connection tracking: keys built as the kernel
//! builds them, seeding from the kernel's own conntrack at start, the
//! sweeper, and occupancy.
//!
//! Why our own table, and how it meets Calico's conntrack behaviour:
//! docs/conntrack.md.

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use filter_common::{ct, names, CtKey, CtValue};

use super::{map_error, Dataplane, Error};

/// A flow as its opener sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// The opener's address.
    pub src: IpAddr,
    /// The answering side's address.
    pub dst: IpAddr,
    /// IP protocol.
    pub proto: u8,
    /// Opener's port (ICMP echo: the identifier; other protocols: 0).
    pub sport: u16,
    /// Answering side's port (ICMP echo: the identifier).
    pub dport: u16,
}

impl Flow {
    /// The table key, normalized as `filter-ebpf/src/conntrack.rs` does
    /// (lower address, then lower port, is side A), and whether the opener
    /// is side A.
    pub fn key(&self) -> (CtKey, bool) {
        let (family, src) = super::family_octets(self.src);
        let (_, dst) = super::family_octets(self.dst);
        CtKey::normalized(family, self.proto, &src, &dst, self.sport, self.dport)
    }
}

/// A flow of the kernel's conntrack table, in the form we seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelFlow {
    /// The original direction.
    pub flow: Flow,
    /// The original direction as the answering side sees it after NAT
    /// (the reply tuple reversed), when NAT changed it.
    pub translated: Option<Flow>,
    /// The other side has answered.
    pub answered: bool,
}

/// Parses `/proc/net/nf_conntrack` (one flow per line: family, protocol,
/// timeout, TCP state, the original tuple, flags, the reply tuple). Flows
/// that are closing, and lines it cannot read, are left out: a flow left
/// out is judged again as new, which is what the kernel would do for a
/// closing one.
pub fn parse_proc(text: &str) -> Vec<KernelFlow> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<KernelFlow> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let proto: u8 = words.get(3)?.parse().ok()?;
    if proto == 6 {
        // Field 5 is the TCP state.
        let state = *words.get(5)?;
        if !matches!(state, "ESTABLISHED" | "SYN_SENT" | "SYN_RECV") {
            return None;
        }
    }
    let field = |from: usize, name: &str| -> Option<(String, usize)> {
        words[from..].iter().enumerate().find_map(|(i, w)| {
            w.strip_prefix(name)
                .and_then(|v| v.strip_prefix('='))
                .map(|v| (v.to_owned(), from + i))
        })
    };
    let tuple = |from: usize| -> Option<(Flow, usize)> {
        let (src, i) = field(from, "src")?;
        let (dst, _) = field(i, "dst")?;
        let (sport, dport, end) = match proto {
            1 | 58 => {
                let (id, j) = field(i, "id")?;
                let id: u16 = id.parse().ok()?;
                (id, id, j)
            }
            6 | 17 | 132 => {
                let (sport, _) = field(i, "sport")?;
                let (dport, j) = field(i, "dport")?;
                (sport.parse().ok()?, dport.parse().ok()?, j)
            }
            _ => (0, 0, i + 1),
        };
        Some((
            Flow {
                src: src.parse().ok()?,
                dst: dst.parse().ok()?,
                proto,
                sport,
                dport,
            },
            end,
        ))
    };
    let (orig, end) = tuple(0)?;
    let (reply, _) = tuple(end + 1)?;
    let reversed = Flow {
        src: reply.dst,
        dst: reply.src,
        proto,
        sport: reply.dport,
        dport: reply.sport,
    };
    // ICMP echo errors of the kernel's own and echo requests: the id is
    // the same on both sides unless NAT changed it.
    Some(KernelFlow {
        flow: orig,
        translated: (reversed != orig).then_some(reversed),
        answered: !line.contains("[UNREPLIED]"),
    })
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of conntrack's entries (the
/// kernel writes them with `bpf_ktime_get_coarse_ns()`, the same clock up
/// to a tick behind).
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// What a sweep found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Live entries left in the table of new flows (`capacity` is its size).
    pub live: usize,
    /// Live entries left in the assured table.
    pub assured: usize,
    /// Expired entries removed.
    pub removed: usize,
    /// The table's size.
    pub capacity: u32,
    /// How long the sweep took.
    pub took: Duration,
}

/// Whether an entry has outlived its timeout at `now`.
pub(super) fn expired(key: &CtKey, v: &CtValue, now: u64) -> bool {
    !v.live(key.proto, now)
}

/// The two tables: new flows (LRU) and assured ones (hash).
pub(super) const TABLES: [&str; 2] = [names::MAP_CONNTRACK, names::MAP_CONNTRACK_ASSURED];

/// The table an entry belongs in.
pub(super) fn table_of(v: &CtValue) -> &'static str {
    if v.flags & ct::ASSURED != 0 {
        names::MAP_CONNTRACK_ASSURED
    } else {
        names::MAP_CONNTRACK
    }
}

/// The table entry the kernel writes when policy allows `flow` (opened by
/// `flow.src`), seen now; with `answered`, already established and (but
/// for ICMP, which is never assured) assured, as an existing connection
/// the kernel's conntrack reports is.
pub(super) fn entry(flow: &Flow, answered: bool) -> (CtKey, CtValue) {
    let (key, opener_is_a) = flow.key();
    let mut flags = if opener_is_a { ct::OPENED_BY_A } else { 0 };
    if answered {
        flags |= ct::SEEN_REPLY;
        if !filter_common::proto::is_icmp(flow.proto) {
            flags |= ct::ASSURED;
        }
    }
    // Sequence ends unknown: the first packet of each side sets them.
    let now = monotonic_ns();
    let value = CtValue {
        last_seen: now,
        flags,
        opened: ct::opened_units(now),
        ..CtValue::default()
    };
    (key, value)
}

impl Dataplane {
    /// Records `flow` as allowed (and, with `answered`, established), as
    /// the kernel does when policy allows a new flow. An entry already
    /// there is left alone unless `replace`.
    pub fn open_flow(&mut self, flow: &Flow, answered: bool, replace: bool) -> Result<(), Error> {
        let (key, value) = entry(flow, answered);
        const BPF_NOEXIST: u64 = 1;
        let name = table_of(&value);
        if replace {
            self.forget_flow(flow)?;
        } else if self.has_entry(&key)? {
            return Ok(());
        }
        let mut table: HashMap<&mut MapData, CtKey, CtValue> = self.map(name)?;
        let inserted = table.insert(&key, &value, if replace { 0 } else { BPF_NOEXIST });
        // After the insert, as the kernel does (see `sweep_conntrack`).
        self.mark_seen(&[key.seen_slot()], None)?;
        match inserted {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if !replace && e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            Err(e) => Err(map_error(name, "insert")(e)),
        }
    }

    /// Whether either table has an entry for `key`.
    fn has_entry(&mut self, key: &CtKey) -> Result<bool, Error> {
        for name in TABLES {
            let table: HashMap<&mut MapData, CtKey, CtValue> = self.map(name)?;
            if table.get(key, 0).is_ok() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Seeds the table with the kernel's conntrack flows of this network
    /// namespace, so connections that exist before the first enforcement
    /// (an SSH session on a non-failsafe port, kubelet's) survive it, as
    /// they do under Calico. Only answered flows are seeded: an unanswered
    /// one may be a connection attempt the kernel saw before our egress
    /// program dropped it. Returns how many flows were recorded.
    pub fn seed_conntrack(&mut self, flows: &[KernelFlow]) -> Result<usize, Error> {
        let mut n = 0;
        for f in flows.iter().filter(|f| f.answered) {
            self.open_flow(&f.flow, f.answered, false)?;
            if let Some(t) = &f.translated {
                self.open_flow(t, f.answered, false)?;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Seeds from `/proc/net/nf_conntrack` of this namespace. Without it
    /// (no `nf_conntrack` module, or procfs support compiled out) nothing
    /// is seeded, and the agent says so.
    pub fn seed_from_kernel(&mut self, proc_file: &Path) -> Result<Option<usize>, Error> {
        match std::fs::read_to_string(proc_file) {
            Ok(text) => self.seed_conntrack(&parse_proc(&text)).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Fs {
                op: "read",
                path: proc_file.to_owned(),
                source,
            }),
        }
    }

    /// Deletes expired entries (the kernel already ignores them; this
    /// makes room and keeps occupancy honest).
    pub fn sweep_conntrack(&mut self) -> Result<Sweep, Error> {
        let start = Instant::now();
        let now = monotonic_ns();
        let capacity = self.conntrack_capacity();
        let mut live = [0; 2];
        let mut removed = 0;
        let mut slots = Vec::new();
        for (i, name) in TABLES.into_iter().enumerate() {
            let mut table: HashMap<&mut MapData, CtKey, CtValue> = self.map(name)?;
            let mut stale = Vec::new();
            for entry in table.iter() {
                // An entry evicted or deleted while we walk is simply gone.
                let Ok((k, v)) = entry else { continue };
                if expired(&k, &v, now) {
                    stale.push(k);
                } else {
                    live[i] += 1;
                    slots.push(k.seen_slot());
                }
            }
            removed += stale.len();
            for k in stale {
                // Deleted by the kernel in the meantime: fine.
                let _ = table.remove(&k);
            }
        }
        self.next_epoch(&slots)?;
        Ok(Sweep {
            live: live[0],
            assured: live[1],
            removed,
            capacity,
            took: start.elapsed(),
        })
    }

    /// The presence filter's control word.
    fn epoch_control(&mut self) -> Result<u32, Error> {
        let control: aya::maps::Array<&mut MapData, u32> = self.map(names::MAP_CT_EPOCH)?;
        control
            .get(&0, 0)
            .map_err(map_error(names::MAP_CT_EPOCH, "read"))
    }

    fn set_epoch_control(&mut self, value: u32) -> Result<(), Error> {
        let mut control: aya::maps::Array<&mut MapData, u32> = self.map(names::MAP_CT_EPOCH)?;
        control
            .set(0, &value, 0)
            .map_err(map_error(names::MAP_CT_EPOCH, "write"))
    }

    /// Marks `slots` of the presence filter with `epoch`, or with an
    /// inserted entry's mark (`ct::insert_mark`: none before the first
    /// sweep).
    fn mark_seen(&mut self, slots: &[u32], epoch: Option<u8>) -> Result<(), Error> {
        let epoch = match epoch {
            Some(e) => e,
            None => match ct::insert_mark(self.epoch_control()?) {
                Some(e) => e,
                None => return Ok(()),
            },
        };
        if slots.is_empty() {
            return Ok(());
        }
        super::batch::store_bytes(&self.ebpf, names::MAP_CT_SEEN, slots, epoch)
    }

    /// Moves the presence filter to the next epoch after a walk that found
    /// the live entries of `slots`. The walk ran after the current epoch
    /// was set, so every entry it missed was inserted after it passed and
    /// is marked with the current epoch, which the next one keeps valid.
    /// The first sweep only starts epoch 1 (entries inserted before it
    /// carry no mark); the second walks, marks and enables the filter.
    fn next_epoch(&mut self, slots: &[u32]) -> Result<(), Error> {
        let epoch = self.epoch_control()? as u8;
        if epoch == 0 {
            return self.set_epoch_control(1);
        }
        let next = ct::next_epoch(epoch);
        self.mark_seen(slots, Some(next))?;
        self.set_epoch_control(u32::from(next) | ct::EPOCH_ENABLED)
    }

    /// Turns conntrack's presence filter on if it is not (new maps, or
    /// tables adopted from an agent without it): epoch 1 first, so the
    /// kernel marks what it inserts from now on; then a sweep, whose walk
    /// finds everything inserted before and enables the filter.
    pub(super) fn start_presence_filter(&mut self) -> Result<(), Error> {
        if self.epoch_control()? != 0 {
            return Ok(());
        }
        self.next_epoch(&[])?;
        self.sweep_conntrack().map(|_| ())
    }

    /// Entries the conntrack table holds at most.
    pub fn conntrack_capacity(&self) -> u32 {
        match self.ebpf.map(names::MAP_CONNTRACK) {
            Some(aya::maps::Map::LruHashMap(d)) => d.info().map_or(0, |i| i.max_entries()),
            _ => 0,
        }
    }

    /// Removes the entry of `flow` (either direction) from both tables.
    pub fn forget_flow(&mut self, flow: &Flow) -> Result<(), Error> {
        let (key, _) = flow.key();
        for name in TABLES {
            let mut table: HashMap<&mut MapData, CtKey, CtValue> = self.map(name)?;
            match table.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_error(name, "remove")(e)),
            }
        }
        Ok(())
    }
}

/// Opens the pinned conntrack table `name` (one of [`TABLES`]) of a running
/// agent, and its size.
pub(super) fn open_pinned(
    pin_dir: &Path,
    name: &'static str,
) -> Result<(HashMap<MapData, CtKey, CtValue>, u32), Error> {
    let data = super::open_map_pin(pin_dir, name)?;
    let capacity = data.info().map_or(0, |i| i.max_entries());
    let map = if name == names::MAP_CONNTRACK {
        aya::maps::Map::LruHashMap(data)
    } else {
        aya::maps::Map::HashMap(data)
    };
    let table = HashMap::try_from(map).map_err(map_error(name, "open"))?;
    Ok((table, capacity))
}

/// How full the conntrack tables of a running agent are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    /// Live entries, both tables.
    pub entries: usize,
    /// Of which assured (in the table nothing evicts).
    pub assured: usize,
    /// Size of each table (`--conntrack-size`).
    pub capacity: u32,
}

/// Live entries in the pinned tables of a running agent.
pub fn pinned_occupancy(pin_dir: &Path) -> Result<Occupancy, Error> {
    let now = monotonic_ns();
    let mut live = [0; 2];
    let mut capacity = 0;
    for (i, name) in TABLES.into_iter().enumerate() {
        let (table, size) = open_pinned(pin_dir, name)?;
        capacity = capacity.max(size);
        live[i] = table
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| !expired(k, v, now))
            .count();
    }
    Ok(Occupancy {
        entries: live[0] + live[1],
        assured: live[1],
        capacity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The presence filter's contract with the sweeper: a slot stays valid
    /// from its mark through the next flip, also while the sweeper has
    /// already marked it for the epoch after (its walk found the flow, the
    /// flip has not happened yet), and across the wrap from 255 to 1; a
    /// slot no one marks again ages out after two flips.
    #[test]
    fn a_presence_mark_is_valid_from_before_the_flip_until_two_flips_later() {
        let on = |epoch: u8| u32::from(epoch) | ct::EPOCH_ENABLED;
        for epoch in [1u8, 2, 100, 254, 255] {
            let next = ct::next_epoch(epoch);
            assert!(ct::may_have_flow(epoch, on(epoch)), "marked now");
            assert!(
                ct::may_have_flow(next, on(epoch)),
                "marked by the sweeper before its flip"
            );
            assert!(ct::may_have_flow(epoch, on(next)), "one flip later");
            assert!(
                !ct::may_have_flow(epoch, on(ct::next_epoch(next))),
                "two flips later"
            );
            assert!(!ct::may_have_flow(0, on(epoch)), "never marked");
            assert_eq!(ct::insert_mark(on(epoch)), Some(epoch), "inserted now");
        }
        assert_eq!(ct::insert_mark(0), None, "no epoch before the first sweep");
        assert_eq!(ct::insert_mark(1), Some(1), "epoch 1 marks before enabling");
        assert!(ct::may_have_flow(0, 7), "not enabled: every lookup happens");
    }

    const PROC: &str = "\
ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=40000 dport=22 src=10.0.0.2 dst=10.0.0.1 sport=22 dport=40000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 118 TIME_WAIT src=10.0.0.1 dst=10.0.0.2 sport=40001 dport=22 src=10.0.0.2 dst=10.0.0.1 sport=22 dport=40001 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 28 src=10.0.0.1 dst=10.0.0.9 sport=5353 dport=53 [UNREPLIED] src=10.0.0.9 dst=10.0.0.1 sport=53 dport=5353 mark=0 zone=0 use=2
ipv4     2 tcp      6 86399 ESTABLISHED src=192.0.2.7 dst=10.0.0.2 sport=51000 dport=30080 src=10.244.0.5 dst=192.0.2.7 sport=80 dport=51000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 icmp     1 29 src=10.0.0.1 dst=10.0.0.2 type=8 code=0 id=77 src=10.0.0.2 dst=10.0.0.1 type=0 code=0 id=77 mark=0 zone=0 use=2
ipv6     10 tcp      6 300 ESTABLISHED src=fd00::1 dst=fd00::2 sport=40000 dport=8080 src=fd00::2 dst=fd00::1 sport=8080 dport=40000 [ASSURED] mark=0 zone=0 use=2
garbage line
";

    #[test]
    fn proc_lines_become_flows_with_nat_and_reply_state() {
        let flows = parse_proc(PROC);
        assert_eq!(flows.len(), 5, "{flows:#?}");
        assert_eq!(flows[0].flow.dport, 22);
        assert!(flows[0].answered && flows[0].translated.is_none());
        assert!(!flows[1].answered, "UNREPLIED");
        // DNAT: the pod side sees 192.0.2.7 -> 10.244.0.5:80.
        let t = flows[2].translated.expect("NAT flow");
        assert_eq!(
            (t.src, t.dst, t.sport, t.dport),
            (
                "192.0.2.7".parse().unwrap(),
                "10.244.0.5".parse().unwrap(),
                51000,
                80
            )
        );
        assert_eq!((flows[3].flow.proto, flows[3].flow.sport), (1, 77));
        assert_eq!(flows[4].flow.src, "fd00::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn both_directions_share_one_key() {
        let f = Flow {
            src: "10.0.0.9".parse().unwrap(),
            dst: "10.0.0.1".parse().unwrap(),
            proto: 6,
            sport: 40000,
            dport: 22,
        };
        let r = Flow {
            src: f.dst,
            dst: f.src,
            proto: 6,
            sport: 22,
            dport: 40000,
        };
        let (kf, a) = f.key();
        let (kr, b) = r.key();
        assert_eq!(kf, kr);
        assert_ne!(a, b);
        assert!(!a, "10.0.0.9 is the higher address, so side B");
    }
}
