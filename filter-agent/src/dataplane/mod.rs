//! Compiled tables → kernel: load, pin, attach, and sync maps atomically.
//!
//! In: [`Compiled`] values. Out: the XDP and TC programs attached to every
//! bound interface and the classifier maps holding the live generation.
//! Invariant: a packet sees exactly one generation. A new policy is written
//! into the inactive generation of every table, made live by one write to
//! `FW_GEN1`, and only then is the old generation cleared.
//!
//! This is the only module that imports aya.

mod classes;
pub mod conntrack;
pub mod live;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData, PerCpuArray,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachType},
        xdp::XdpLink,
        SchedClassifier, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use filter_common::{
    names, table_id, AddrV4Key, AddrV6Key, ClassHead, EndpointKey, EndpointValue, FailsafeKey,
    HostKey, PortKey, RuleCounter, RuleMeta, SvcKey, CLASSES_PER_GEN, CLASS_WORDS_PER_GEN,
    FAILSAFE_ADDR_OFFSET_BITS, FAILSAFE_PORT_BITS, GENERATIONS, MAX_RULES, PORT_KEY_ANY_PROTO_BITS,
    PORT_KEY_FLAG_BITS, RULE_SLOTS_PER_GEN, TABLES_PER_GEN, TABLE_PREFIX_BITS,
};

use crate::compile::{prefix::Prefix, services::Frontend, Compiled, PortEntry, Table};

/// The kernel object, built by `cargo xtask build-ebpf` and embedded so the
/// agent binary runs alone.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/filter-ebpf.o"));

/// Default bpffs directory for pins.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/filter-agent";

/// How long a packet that read the old generation may still be running
/// when the agent starts clearing it. BPF programs run in an RCU read-side
/// section of a few microseconds; this is generous.
const GRACE: Duration = Duration::from_millis(20);

/// Dataplane failures, naming the interface or map involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binary was built without the kernel object.
    #[error(
        "this filter-agent was built without its kernel object; build it with `cargo xtask build`"
    )]
    NoObject,
    /// Loading the object or a program failed (verifier log included).
    #[error("loading {what}")]
    Load {
        /// Program or object.
        what: String,
        /// aya's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A map operation failed.
    #[error("map {map}: {op}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What was being done.
        op: String,
        /// aya's error.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// Attaching or detaching failed.
    #[error("{op} {program} on {iface}")]
    Attach {
        /// attach / detach.
        op: &'static str,
        /// Program name.
        program: &'static str,
        /// Interface name.
        iface: String,
        /// aya's error.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// The pin directory is not the agent's alone.
    #[error("pin directory")]
    NotPrivate(#[from] crate::private::NotPrivate),
    /// Filesystem work on bpffs failed.
    #[error("{op} {path}")]
    Fs {
        /// What was being done.
        op: &'static str,
        /// Path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The compiled policy does not fit the maps.
    #[error("{0}")]
    Capacity(String),
}

/// What an interface is to the firewall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A host endpoint: XDP, TC ingress and TC egress.
    Endpoint,
    /// Any other interface: TC egress, for forwarded traffic that came in
    /// by an endpoint.
    ForwardOnly,
}

impl Role {
    fn programs(self) -> &'static [&'static str] {
        match self {
            Role::Endpoint => &[
                names::PROG_XDP,
                names::PROG_TC_INGRESS,
                names::PROG_TC_EGRESS,
            ],
            Role::ForwardOnly => &[names::PROG_TC_EGRESS],
        }
    }
}

/// Programs attached to one interface, through links pinned on bpffs so
/// they outlive the agent.
#[derive(Debug)]
struct Attachment {
    ifindex: u32,
    role: Role,
    xdp_mode: &'static str,
    /// (link, its pin) for fw_xdp, fw_tc_in, fw_tc_eg.
    links: Vec<(FdLink, PathBuf)>,
}

/// Pin file of the link of `program` on interface `iface` (`ifindex`),
/// e.g. `fw_xdp@eth1@2`. bpffs refuses dots in names, so a VLAN's `eth0.100`
/// becomes `eth0_100`; the index keeps names unique, and is there because an
/// interface deleted and created again is a new attachment point.
fn link_pin(dir: &Path, iface: &str, ifindex: u32, program: &str) -> PathBuf {
    dir.join(format!("{program}@{}@{ifindex}", iface.replace('.', "_")))
}

/// The trie keys of a failsafe entry: without a net, one key fixing
/// direction, protocol and port; with one, the net under its family.
fn failsafe_keys(f: &crate::compile::failsafe::Failsafe) -> Vec<Key<FailsafeKey>> {
    let direction = if f.inbound {
        filter_common::direction::INGRESS
    } else {
        filter_common::direction::EGRESS
    } as u8;
    let mut key = FailsafeKey {
        direction,
        proto: f.proto,
        port: f.port.to_be_bytes(),
        family: 0,
        pad: [0; 3],
        addr: [0; 16],
    };
    match f.net {
        None => vec![Key::new(FAILSAFE_PORT_BITS, key)],
        Some(ipnetwork::IpNetwork::V4(n)) => {
            key.family = 4;
            key.addr[..4].copy_from_slice(&n.network().octets());
            vec![Key::new(
                FAILSAFE_ADDR_OFFSET_BITS + u32::from(n.prefix()),
                key,
            )]
        }
        Some(ipnetwork::IpNetwork::V6(n)) => {
            key.family = 6;
            key.addr = n.network().octets();
            vec![Key::new(
                FAILSAFE_ADDR_OFFSET_BITS + u32::from(n.prefix()),
                key,
            )]
        }
    }
}

/// Runs an XDP program `repeat` times on `frame` with BPF_PROG_TEST_RUN, as
/// if it arrived on `ifindex`. Returns the action and the mean time per run.
fn run_xdp(
    xdp: &mut Xdp,
    name: &str,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> Result<(u32, Duration), Error> {
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex }: the kernel requires data = 0 and
    // data_end = the frame's length.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let opts = TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat,
        ..Default::default()
    };
    xdp.test_run(opts)
        .map(|r| (r.return_value, r.duration))
        .map_err(|e| Error::Load {
            what: format!("test run of {name}"),
            source: Box::new(e),
        })
}

/// Runs a TC program once on `frame` with BPF_PROG_TEST_RUN as `run`
/// describes. Returns the TC action and the skb mark the program left.
fn run_tc(
    tc: &mut SchedClassifier,
    name: &str,
    frame: &[u8],
    run: TcRun,
) -> Result<(i32, u32), Error> {
    // struct __sk_buff up to `ifindex` (offset 40): len, pkt_type, mark
    // (8), queue_mapping, protocol, vlan_present, vlan_tci, vlan_proto,
    // priority, ingress_ifindex (36), ifindex (40). The kernel accepts a
    // prefix of the context and lets a test set these three.
    let mut ctx = [0u8; 44];
    ctx[8..12].copy_from_slice(&run.mark.to_ne_bytes());
    ctx[36..40].copy_from_slice(&run.ingress_ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&run.ifindex.to_ne_bytes());
    // The kernel hands back the whole context; a shorter buffer is ENOSPC.
    let mut ctx_out = [0u8; 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        ctx_out: Some(&mut ctx_out),
        repeat: 1,
        ..Default::default()
    };
    let r = tc.test_run(opts).map_err(|e| Error::Load {
        what: format!("test run of {name}"),
        source: Box::new(e),
    })?;
    let mark = u32::from_ne_bytes(ctx_out[8..12].try_into().expect("4 bytes"));
    Ok((r.return_value as i32, mark))
}

/// An address as (family, 16 bytes with IPv4 first), as the kernel keys it.
fn family_octets(ip: IpAddr) -> (u8, [u8; 16]) {
    match ip {
        IpAddr::V4(a) => {
            let mut o = [0; 16];
            o[..4].copy_from_slice(&a.octets());
            (filter_common::family::V4, o)
        }
        IpAddr::V6(a) => (filter_common::family::V6, a.octets()),
    }
}

/// Whether a pin in the pin directory is a link (see [`link_pin`]).
fn is_link_pin(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().contains('@'))
}

/// The loaded programs and maps.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    attached: BTreeMap<String, Attachment>,
    live: u32,
    /// Names of the maps pinned under `pin_dir` (see [`Dataplane::restore_pins`]).
    pinned_maps: Vec<String>,
}

/// A test run of a TC program (see [`Dataplane::test_run_tc`]).
#[derive(Debug, Clone, Copy)]
pub struct TcRun {
    /// `fw_tc_in` (else `fw_tc_eg`).
    pub ingress: bool,
    /// The interface the program runs on (must exist in this namespace).
    pub ifindex: u32,
    /// The interface a forwarded packet came in by; 0: sent by this host.
    pub ingress_ifindex: u32,
    /// The skb mark on entry.
    pub mark: u32,
}

/// Interface name → index, resolved by the caller in the agent's namespace.
pub type Interfaces = BTreeMap<String, u32>;

/// Settings fixed when the maps are created.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Entries of the conntrack table. An adopted table keeps the size it
    /// was created with.
    pub conntrack_size: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            conntrack_size: filter_common::ct::DEFAULT_SIZE,
        }
    }
}

impl Dataplane {
    /// [`Dataplane::load_with`] default [`Options`].
    pub fn load(pin_dir: &Path) -> Result<Dataplane, Error> {
        Self::load_with(pin_dir, &Options::default())
    }

    /// Loads the programs, pins them and their maps under `pin_dir`
    /// (mounting bpffs if needed), attaches nothing yet.
    pub fn load_with(pin_dir: &Path, options: &Options) -> Result<Dataplane, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NoObject);
        }
        ensure_bpffs(pin_dir)?;
        // Before anything is read from it (or removed from it on failure).
        crate::private::ensure_dir(pin_dir)?;
        let adopting = pin_dir.join(names::MAP_GENERATION).exists();
        if adopting {
            tracing::info!(dir = %pin_dir.display(), "adopting the pinned maps and links of a previous agent");
        }
        // A first load that fails half-way (the verifier, say) leaves no
        // pins; an adopting one never touches what enforces.
        Self::load_pinned(pin_dir, options).inspect_err(|_| {
            if !adopting {
                let _ = remove_pins(pin_dir);
            }
        })
    }

    fn load_pinned(pin_dir: &Path, options: &Options) -> Result<Dataplane, Error> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries(names::MAP_CONNTRACK, options.conntrack_size)
            .map_max_entries(names::MAP_CONNTRACK_ASSURED, options.conntrack_size)
            .load(OBJECT)
            .map_err(|e| Error::Load {
                what: "kernel object".into(),
                source: Box::new(e),
            })?;
        // The one vocabulary: every name the agent uses is in the object.
        for name in names::MAPS {
            if ebpf.map(name).is_none() {
                return Err(Error::Load {
                    what: "kernel object".into(),
                    source: format!("map {name} (filter_common::names) missing from the object")
                        .into(),
                });
            }
        }
        if let Some(name) = names::PROGRAMS
            .into_iter()
            .find(|n| ebpf.program(n).is_none())
        {
            return Err(Error::Load {
                what: "kernel object".into(),
                source: format!("program {name} (filter_common::names) missing from the object")
                    .into(),
            });
        }
        for name in [
            names::PROG_XDP,
            names::PROG_TC_INGRESS,
            names::PROG_TC_EGRESS,
        ] {
            let prog = ebpf.program_mut(name).ok_or_else(|| Error::Load {
                what: name.into(),
                source: format!("program {name} missing from the object").into(),
            })?;
            let load = |e: aya::programs::ProgramError| Error::Load {
                what: name.into(),
                source: Box::new(e),
            };
            match prog {
                aya::programs::Program::Xdp(p) => p.load().map_err(load)?,
                aya::programs::Program::SchedClassifier(p) => p.load().map_err(load)?,
                _ => {
                    return Err(Error::Load {
                        what: name.into(),
                        source: "unexpected program type".into(),
                    })
                }
            }
            // A previous agent's program stays alive while its links hold it;
            // its pin makes way for this one.
            let pin = pin_dir.join(name);
            if pin.exists() {
                std::fs::remove_file(&pin).map_err(|source| Error::Fs {
                    op: "unpin old",
                    path: pin.clone(),
                    source,
                })?;
            }
            prog.pin(&pin).map_err(|e| Error::Load {
                what: format!("pin {name}"),
                source: Box::new(e),
            })?;
        }
        // The maps the object pins by name: the ones whose pin exists now.
        let pinned_maps = ebpf
            .maps()
            .map(|(name, _)| name.to_owned())
            .filter(|name| pin_dir.join(name).exists())
            .collect();
        let mut dp = Dataplane {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            attached: BTreeMap::new(),
            live: 0,
            pinned_maps,
        };
        dp.live = dp.generation()?;
        Ok(dp)
    }

    /// Makes `compiled` the enforced policy: tables first (atomically), then
    /// attachments follow the bound interfaces. `ifaces` maps the bound
    /// interfaces that exist now to their index; bound interfaces missing
    /// from it are skipped (and retried by the caller when they appear).
    pub fn apply(&mut self, compiled: &Compiled, ifaces: &Interfaces) -> Result<u32, Error> {
        let generation = self.publish(compiled, ifaces)?;
        self.sync_attachments(compiled, ifaces)?;
        Ok(generation)
    }

    /// Writes `compiled` into the inactive generation, makes it live, and
    /// clears the old one; attaches nothing. Returns the live generation.
    pub fn publish(&mut self, compiled: &Compiled, ifaces: &Interfaces) -> Result<u32, Error> {
        let next = (self.live + 1) % GENERATIONS;
        check_capacity(compiled)?;
        // Everything that can exceed a capacity is laid out before the
        // first write, so a policy that does not fit changes nothing.
        let plan = Plan::new(compiled, ifaces, next)?;
        // The inactive generation may still hold entries if a previous
        // update failed half-way; start it clean.
        self.clear_generation(next)?;
        self.write_failsafe(&compiled.failsafe)?;
        self.write_frontends(&compiled.frontends)?;
        self.write_generation(next, compiled, &plan)?;
        self.set_generation(next)?;
        let old = self.live;
        self.live = next;
        std::thread::sleep(GRACE);
        self.clear_generation(old)?;
        Ok(next)
    }

    fn write_generation(
        &mut self,
        generation: u32,
        compiled: &Compiled,
        plan: &Plan,
    ) -> Result<(), Error> {
        {
            let mut words: Array<&mut MapData, u64> = self.map(names::MAP_CLASS_WORDS)?;
            let base = generation * CLASS_WORDS_PER_GEN;
            for (i, w) in plan.layout.words.iter().enumerate() {
                words
                    .set(base + i as u32, w, 0)
                    .map_err(map_error(names::MAP_CLASS_WORDS, format!("set word {i}")))?;
            }
        }
        {
            let mut heads: Array<&mut MapData, ClassHead> = self.map(names::MAP_CLASS)?;
            for (i, h) in plan.layout.heads.iter().enumerate() {
                heads
                    .set(plan.class_base + i as u32, h, 0)
                    .map_err(map_error(names::MAP_CLASS, format!("set class {i}")))?;
            }
        }
        for (t, first_slot) in compiled.tables.iter().zip(&plan.first_slots) {
            let table = table_id(generation, t.stage, t.direction);
            self.write_table(table, *first_slot, t, plan)?;
        }
        Ok(())
    }

    fn write_table(
        &mut self,
        table: u32,
        first_slot: u32,
        t: &Table,
        plan: &Plan,
    ) -> Result<(), Error> {
        self.zero_counters(first_slot, t.rules.len())?;
        let tb = table.to_be_bytes();
        {
            let mut rules: Array<&mut MapData, RuleMeta> = self.map(names::MAP_RULE)?;
            for (i, r) in t.rules.iter().enumerate() {
                let meta = RuleMeta {
                    action: r.action,
                    policy: r.owner,
                    rule: i as u32,
                    next: r.next,
                };
                rules
                    .set(first_slot + i as u32, &meta, 0)
                    .map_err(map_error(names::MAP_RULE, format!("set rule {i}")))?;
            }
        }
        let bits = |p: &Prefix| TABLE_PREFIX_BITS + u32::from(p.len);
        for (name, entries) in [
            (names::MAP_SRC_V4, &t.src_v4),
            (names::MAP_DST_V4, &t.dst_v4),
        ] {
            let addr = |p: &Prefix| (p.value(32) as u32).to_be_bytes();
            self.fill_trie(
                name,
                entries,
                |p| {
                    Key::new(
                        bits(p),
                        AddrV4Key {
                            table: tb,
                            addr: addr(p),
                        },
                    )
                },
                plan,
            )?;
        }
        for (name, entries) in [
            (names::MAP_SRC_V6, &t.src_v6),
            (names::MAP_DST_V6, &t.dst_v6),
        ] {
            let addr = |p: &Prefix| p.value(128).to_be_bytes();
            self.fill_trie(
                name,
                entries,
                |p| {
                    Key::new(
                        bits(p),
                        AddrV6Key {
                            table: tb,
                            addr: addr(p),
                        },
                    )
                },
                plan,
            )?;
        }
        for (name, entries) in [(names::MAP_PORT, &t.dports), (names::MAP_SPORT, &t.sports)] {
            let mut ports: LpmTrie<&mut MapData, PortKey, u32> = self.map(name)?;
            for e in entries {
                ports
                    .insert(&port_key(tb, e), &plan.class(e.class), 0)
                    .map_err(map_error(name, format!("insert {e:?}")))?;
            }
        }
        let mut eps: HashMap<&mut MapData, EndpointKey, EndpointValue> =
            self.map(names::MAP_ENDPOINT)?;
        for (ifindex, class) in &plan.masks[&table] {
            let value = EndpointValue {
                class: *class,
                first_slot,
            };
            eps.insert(
                &EndpointKey {
                    ifindex: *ifindex,
                    table,
                },
                &value,
                0,
            )
            .map_err(map_error(names::MAP_ENDPOINT, format!("insert {ifindex}")))?;
        }
        Ok(())
    }

    fn fill_trie<K: aya::Pod>(
        &mut self,
        name: &'static str,
        entries: &[(Prefix, u32)],
        key: impl Fn(&Prefix) -> Key<K>,
        plan: &Plan,
    ) -> Result<(), Error> {
        let mut trie: LpmTrie<&mut MapData, K, u32> = self.map(name)?;
        for (p, class) in entries {
            trie.insert(&key(p), &plan.class(*class), 0)
                .map_err(map_error(name, format!("insert {p:?}")))?;
        }
        Ok(())
    }

    /// Makes `entries` the failsafe set: new entries first, then the stale
    /// ones removed, so a port that stays failsafe never stops being one.
    fn write_failsafe(
        &mut self,
        entries: &[crate::compile::failsafe::Failsafe],
    ) -> Result<(), Error> {
        let keys: Vec<Key<FailsafeKey>> = entries.iter().flat_map(failsafe_keys).collect();
        let mut trie: LpmTrie<&mut MapData, FailsafeKey, u32> = self.map(names::MAP_FAILSAFE)?;
        for k in &keys {
            trie.insert(k, &1, 0)
                .map_err(map_error(names::MAP_FAILSAFE, "insert"))?;
        }
        let wanted: Vec<(u32, FailsafeKey)> =
            keys.iter().map(|k| (k.prefix_len(), k.data())).collect();
        let stale: Vec<Key<FailsafeKey>> = trie
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
            .collect();
        for k in stale {
            trie.remove(&k)
                .map_err(map_error(names::MAP_FAILSAFE, "remove"))?;
        }
        Ok(())
    }

    /// Zeroes the counters of a table's `rules` slots from `first_slot`: a
    /// slot counts for the rule the live generation puts there, from when
    /// it went live.
    fn zero_counters(&mut self, first_slot: u32, rules: usize) -> Result<(), Error> {
        let cpus = aya::util::nr_cpus().map_or(1, |n| n.get() as usize);
        let mut ctr: PerCpuArray<&mut MapData, RuleCounter> = self.map(names::MAP_RULE_COUNTERS)?;
        for i in 0..rules as u32 {
            // PerCpuValues is not Clone: one per slot.
            let zeros = aya::maps::PerCpuValues::try_from(vec![RuleCounter::default(); cpus])
                .map_err(|e| Error::Fs {
                    op: "size per-CPU values for",
                    path: names::MAP_RULE_COUNTERS.into(),
                    source: e,
                })?;
            ctr.set(first_slot + i, zeros, 0)
                .map_err(map_error(names::MAP_RULE_COUNTERS, "zero"))?;
        }
        Ok(())
    }

    /// Removes every trie and endpoint entry of `generation`.
    fn clear_generation(&mut self, generation: u32) -> Result<(), Error> {
        let tables = generation * TABLES_PER_GEN..(generation + 1) * TABLES_PER_GEN;
        let in_gen = |t: [u8; 4]| tables.contains(&u32::from_be_bytes(t));
        self.clear_trie::<AddrV4Key>(names::MAP_SRC_V4, |k| in_gen(k.table))?;
        self.clear_trie::<AddrV4Key>(names::MAP_DST_V4, |k| in_gen(k.table))?;
        self.clear_trie::<AddrV6Key>(names::MAP_SRC_V6, |k| in_gen(k.table))?;
        self.clear_trie::<AddrV6Key>(names::MAP_DST_V6, |k| in_gen(k.table))?;
        self.clear_trie::<PortKey>(names::MAP_PORT, |k| in_gen(k.table))?;
        self.clear_trie::<PortKey>(names::MAP_SPORT, |k| in_gen(k.table))?;
        let mut eps: HashMap<&mut MapData, EndpointKey, EndpointValue> =
            self.map(names::MAP_ENDPOINT)?;
        let stale: Vec<EndpointKey> = eps
            .keys()
            .filter_map(Result::ok)
            .filter(|k| tables.contains(&k.table))
            .collect();
        for k in stale {
            eps.remove(&k)
                .map_err(map_error(names::MAP_ENDPOINT, "remove"))?;
        }
        Ok(())
    }

    fn clear_trie<K: aya::Pod>(
        &mut self,
        name: &'static str,
        stale: impl Fn(&K) -> bool,
    ) -> Result<(), Error> {
        let mut trie: LpmTrie<&mut MapData, K, u32> = self.map(name)?;
        let keys: Vec<Key<K>> = trie
            .keys()
            .filter_map(Result::ok)
            .filter(|k| stale(&k.data()))
            .collect();
        for k in keys {
            trie.remove(&k).map_err(map_error(name, "remove"))?;
        }
        Ok(())
    }

    fn generation(&mut self) -> Result<u32, Error> {
        let gen: Array<&mut MapData, u32> = self.map(names::MAP_GENERATION)?;
        gen.get(&0, 0)
            .map_err(map_error(names::MAP_GENERATION, "get"))
    }

    fn set_generation(&mut self, generation: u32) -> Result<(), Error> {
        let mut gen: Array<&mut MapData, u32> = self.map(names::MAP_GENERATION)?;
        gen.set(0, &generation, 0)
            .map_err(map_error(names::MAP_GENERATION, "flip"))
    }

    fn map<'a, M>(&'a mut self, name: &'static str) -> Result<M, Error>
    where
        M: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(Error::Map {
            map: name,
            op: "find".into(),
            source: Box::new(aya::maps::MapError::InvalidName { name: name.into() }),
        })?;
        M::try_from(map).map_err(map_error(name, "open"))
    }

    /// Attaches to bound interfaces that lack programs (adopting links a
    /// previous agent pinned), detaches from interfaces no longer bound (or
    /// gone), and removes link pins nobody claims.
    fn sync_attachments(&mut self, compiled: &Compiled, ifaces: &Interfaces) -> Result<(), Error> {
        // Host endpoints get all three programs; every other interface
        // (loopback aside) TC egress only, for the forward stage of traffic
        // that came in by an endpoint (docs/design.md).
        let endpoints: BTreeSet<&str> = compiled
            .endpoints
            .iter()
            .map(|e| e.iface.as_str())
            .collect();
        let wanted: BTreeMap<&str, (u32, Role)> = ifaces
            .iter()
            .filter(|(name, _)| name.as_str() != "lo")
            .map(|(name, &i)| {
                let role = if endpoints.contains(name.as_str()) {
                    Role::Endpoint
                } else {
                    Role::ForwardOnly
                };
                (name.as_str(), (i, role))
            })
            .collect();
        let stale: Vec<String> = self
            .attached
            .iter()
            .filter(|(name, a)| wanted.get(name.as_str()) != Some(&(a.ifindex, a.role)))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.detach(&name)?;
        }
        for (name, (ifindex, role)) in wanted {
            if !self.attached.contains_key(name) {
                self.attach(name, ifindex, role)?;
            }
        }
        // Links of interfaces this policy no longer binds (or that went):
        // unpinning the last reference detaches them.
        let claimed: Vec<&PathBuf> = self
            .attached
            .values()
            .flat_map(|a| a.links.iter().map(|(_, p)| p))
            .collect();
        let entries = std::fs::read_dir(&self.pin_dir).map_err(|source| Error::Fs {
            op: "read",
            path: self.pin_dir.clone(),
            source,
        })?;
        for e in entries.flatten() {
            let path = e.path();
            if is_link_pin(&path) && !claimed.contains(&&path) {
                tracing::info!(pin = %path.display(), "detaching a link no endpoint claims");
                std::fs::remove_file(&path).map_err(|source| Error::Fs {
                    op: "unpin",
                    path: path.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Attaches the three programs to `iface`. A link pinned by a previous
    /// agent is kept and its program swapped for ours in one update, so
    /// enforcement never lapses (docs/design.md, "Pinning and restarts").
    fn attach(&mut self, iface: &str, ifindex: u32, role: Role) -> Result<(), Error> {
        let err =
            |program: &'static str, e: Box<dyn std::error::Error + Send + Sync>| Error::Load {
                what: format!("attach {program} on {iface}"),
                source: e,
            };
        let dir = self.pin_dir.clone();
        let mut links = Vec::new();
        let mut xdp_mode = if role == Role::Endpoint {
            "native"
        } else {
            "none"
        };
        for &program in role.programs() {
            let pin = link_pin(&dir, iface, ifindex, program);
            let fd = if pin.exists() {
                let old = FdLink::from(
                    PinnedLink::from_pin(&pin).map_err(|e| err(program, Box::new(e)))?,
                );
                if program == names::PROG_XDP {
                    xdp_mode = "adopted";
                }
                if program == names::PROG_XDP {
                    let xdp: &mut Xdp = self.program(program)?;
                    let link = XdpLink::try_from(old).map_err(|e| err(program, Box::new(e)))?;
                    let id = xdp
                        .attach_to_link(link)
                        .map_err(|e| err(program, Box::new(e)))?;
                    FdLink::try_from(xdp.take_link(id).map_err(|e| err(program, Box::new(e)))?)
                        .map_err(|e| err(program, Box::new(e)))?
                } else {
                    let tc: &mut SchedClassifier = self.program(program)?;
                    let link = SchedClassifierLink::try_from(old)
                        .map_err(|e| err(program, Box::new(e)))?;
                    let id = tc
                        .attach_to_link(link)
                        .map_err(|e| err(program, Box::new(e)))?;
                    FdLink::try_from(tc.take_link(id).map_err(|e| err(program, Box::new(e)))?)
                        .map_err(|e| err(program, Box::new(e)))?
                }
            } else {
                let fd = if program == names::PROG_XDP {
                    let xdp: &mut Xdp = self.program(program)?;
                    // Native where the driver has it, generic otherwise.
                    let id = match xdp.attach(
                        aya::programs::NetworkInterface::Index(ifindex),
                        XdpMode::Driver,
                    ) {
                        Ok(id) => id,
                        Err(native) => {
                            tracing::warn!(iface, cause = %native, "native XDP unavailable, using generic mode");
                            xdp_mode = "generic";
                            xdp.attach(
                                aya::programs::NetworkInterface::Index(ifindex),
                                XdpMode::Skb,
                            )
                            .map_err(|e| err(program, Box::new(e)))?
                        }
                    };
                    FdLink::try_from(xdp.take_link(id).map_err(|e| err(program, Box::new(e)))?)
                        .map_err(|e| err(program, Box::new(e)))?
                } else {
                    let tc: &mut SchedClassifier = self.program(program)?;
                    let kind = if program == names::PROG_TC_INGRESS {
                        TcAttachType::Ingress
                    } else {
                        TcAttachType::Egress
                    };
                    let id = tc
                        .attach(aya::programs::NetworkInterface::Index(ifindex), kind)
                        .map_err(|e| err(program, Box::new(e)))?;
                    FdLink::try_from(tc.take_link(id).map_err(|e| err(program, Box::new(e)))?)
                        .map_err(|e| err(program, Box::new(e)))?
                };
                FdLink::from(fd.pin(&pin).map_err(|e| err(program, Box::new(e)))?)
            };
            links.push((fd, pin));
        }
        tracing::info!(iface, ifindex, xdp_mode, programs = ?role.programs(), "programs attached");
        self.attached.insert(
            iface.to_owned(),
            Attachment {
                ifindex,
                role,
                xdp_mode,
                links,
            },
        );
        Ok(())
    }

    /// Detaches the programs from `iface`: unpinning a link and closing its
    /// last descriptor destroys it.
    fn detach(&mut self, iface: &str) -> Result<(), Error> {
        let Some(a) = self.attached.remove(iface) else {
            return Ok(());
        };
        for (fd, pin) in a.links {
            if let Err(e) = std::fs::remove_file(&pin) {
                // An interface that vanished may have taken its pins' meaning
                // with it; nothing else to undo.
                tracing::debug!(iface, pin = %pin.display(), error = %e, "unpin");
            }
            drop(fd);
        }
        tracing::info!(iface, "programs detached");
        Ok(())
    }

    fn program<'a, P>(&'a mut self, name: &'static str) -> Result<&'a mut P, Error>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        let prog = self.ebpf.program_mut(name).ok_or_else(|| Error::Load {
            what: name.into(),
            source: "program missing".into(),
        })?;
        <&mut P>::try_from(prog).map_err(|e| Error::Load {
            what: name.into(),
            source: Box::new(e),
        })
    }

    /// Makes `addrs` the node's own addresses: traffic to them is
    /// host-bound (normal stage at TC ingress), other traffic forwarded.
    /// New addresses go in before stale ones leave.
    pub fn set_host_addresses(&mut self, addrs: &BTreeSet<IpAddr>) -> Result<(), Error> {
        let wanted = addrs
            .iter()
            .map(|ip| {
                let (family, addr) = family_octets(*ip);
                HostKey {
                    family,
                    pad: [0; 3],
                    addr,
                }
            })
            .collect();
        self.sync_set(names::MAP_HOST, wanted)
    }

    /// Makes `frontends` the Service frontends: traffic to them is
    /// forwarded (judged after DNAT), not host-bound.
    fn write_frontends(&mut self, frontends: &[Frontend]) -> Result<(), Error> {
        let wanted = frontends
            .iter()
            .map(|f| {
                let (family, addr) = family_octets(f.addr);
                SvcKey {
                    family,
                    proto: f.proto,
                    port: f.port.to_be_bytes(),
                    addr,
                }
            })
            .collect();
        self.sync_set(names::MAP_SERVICES, wanted)
    }

    /// Makes the keys of hash map `name` exactly `wanted` (values 1): new
    /// keys go in before stale ones leave.
    fn sync_set<K: aya::Pod + PartialEq>(
        &mut self,
        name: &'static str,
        wanted: Vec<K>,
    ) -> Result<(), Error> {
        let mut map: HashMap<&mut MapData, K, u32> = self.map(name)?;
        for k in &wanted {
            map.insert(k, &1, 0).map_err(map_error(name, "insert"))?;
        }
        let stale: Vec<K> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for k in stale {
            map.remove(&k).map_err(map_error(name, "remove"))?;
        }
        Ok(())
    }

    /// Interfaces with programs attached, and their XDP mode (`adopted`
    /// when a previous agent attached them).
    pub fn attachments(&self) -> Vec<(String, u32, &'static str)> {
        self.attached
            .iter()
            .map(|(n, a)| (n.clone(), a.ifindex, a.xdp_mode))
            .collect()
    }

    /// Packets counted per `filter_common::reason`, summed over CPUs.
    pub fn reason_counts(&mut self) -> Result<Vec<u64>, Error> {
        let stats: PerCpuArray<&mut MapData, u64> = self.map(names::MAP_STATS)?;
        (0..filter_common::reason::COUNT)
            .map(|i| {
                stats
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .map_err(map_error(names::MAP_STATS, "get"))
            })
            .collect()
    }

    /// Runs `fw_xdp` once on `frame` with `BPF_PROG_TEST_RUN`, as if it
    /// arrived on `ifindex` (which must exist in this namespace; the
    /// loopback, 1, always does). Returns the XDP action.
    pub fn test_run_xdp(&mut self, frame: &[u8], ifindex: u32) -> Result<u32, Error> {
        self.time_xdp(frame, ifindex, 1, false)
            .map(|(action, _)| action)
    }

    /// Per-packet cost of `fw_xdp` (or, with `baseline`, of a program that
    /// only returns XDP_PASS) on `frame`, from BPF_PROG_TEST_RUN repeated
    /// `repeat` times: the kernel reports the mean per run.
    pub fn time_xdp(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
        baseline: bool,
    ) -> Result<(u32, Duration), Error> {
        let name = if baseline {
            names::PROG_PASS
        } else {
            names::PROG_XDP
        };
        let xdp: &mut Xdp = self.program(name)?;
        if baseline && xdp.fd().is_err() {
            xdp.load().map_err(|e| Error::Load {
                what: name.into(),
                source: Box::new(e),
            })?;
        }
        run_xdp(xdp, name, frame, ifindex, repeat)
    }

    /// Runs `fw_tc_in` or `fw_tc_eg` once on `frame` with
    /// `BPF_PROG_TEST_RUN` as `run` describes. Returns the TC action (0
    /// `TC_ACT_OK`, 2 `TC_ACT_SHOT`) and the skb mark the program left.
    pub fn test_run_tc(&mut self, frame: &[u8], run: TcRun) -> Result<(i32, u32), Error> {
        let name = if run.ingress {
            names::PROG_TC_INGRESS
        } else {
            names::PROG_TC_EGRESS
        };
        let tc: &mut SchedClassifier = self.program(name)?;
        run_tc(tc, name, frame, run)
    }

    /// Pins again whatever pin has disappeared from the pin directory (a
    /// user or a careless script removed it): without its pins the next
    /// agent could not adopt the enforcement, and a removed link pin would
    /// let the attachment go when this agent exits. Returns the pins
    /// restored.
    pub fn restore_pins(&mut self) -> Result<Vec<PathBuf>, Error> {
        crate::private::ensure_dir(&self.pin_dir)?;
        let pin_err = |what: String| {
            move |e: aya::pin::PinError| Error::Load {
                what,
                source: Box::new(e),
            }
        };
        let mut restored = Vec::new();
        for name in &self.pinned_maps {
            let path = self.pin_dir.join(name);
            if path.exists() {
                continue;
            }
            if let Some(map) = self.ebpf.map(name) {
                map.pin(&path)
                    .map_err(pin_err(format!("re-pin map {name}")))?;
                restored.push(path);
            }
        }
        for name in [
            names::PROG_XDP,
            names::PROG_TC_INGRESS,
            names::PROG_TC_EGRESS,
        ] {
            let path = self.pin_dir.join(name);
            if path.exists() {
                continue;
            }
            if let Some(prog) = self.ebpf.program_mut(name) {
                prog.pin(&path)
                    .map_err(pin_err(format!("re-pin program {name}")))?;
                restored.push(path);
            }
        }
        for a in self.attached.values_mut() {
            for i in 0..a.links.len() {
                if a.links[i].1.exists() {
                    continue;
                }
                // Pinning consumes the fd link; the pinned link it returns
                // holds the same attachment.
                let (link, path) = a.links.remove(i);
                let pinned = link
                    .pin(&path)
                    .map_err(pin_err(format!("re-pin link {}", path.display())))?;
                a.links.insert(i, (FdLink::from(pinned), path.clone()));
                restored.push(path);
            }
        }
        Ok(restored)
    }

    /// Detaches everything and removes the pins (`--detach-on-exit`).
    pub fn shutdown(mut self) -> Result<(), Error> {
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for n in names {
            self.detach(&n)?;
        }
        let dir = self.pin_dir.clone();
        drop(self);
        remove_pins(&dir)
    }

    /// Leaves programs attached and everything pinned: the node stays
    /// enforced, and the next agent adopts it all.
    pub fn leave(self) {
        tracing::info!(dir = %self.pin_dir.display(), "leaving programs attached and pinned for the next agent");
    }
}

/// Counters read from the pins of a running agent, from another process.
pub struct PinnedCounters {
    rules: PerCpuArray<MapData, RuleCounter>,
    stats: PerCpuArray<MapData, u64>,
}

impl PinnedCounters {
    /// Opens the rule and reason counters pinned under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<PinnedCounters, Error> {
        let open = |name: &'static str| -> Result<aya::maps::Map, Error> {
            let data = MapData::from_pin(pin_dir.join(name)).map_err(map_error(
                name,
                format!("open pin in {}", pin_dir.display()),
            ))?;
            Ok(aya::maps::Map::PerCpuArray(data))
        };
        let rules = PerCpuArray::try_from(open(names::MAP_RULE_COUNTERS)?)
            .map_err(map_error(names::MAP_RULE_COUNTERS, "open"))?;
        let stats = PerCpuArray::try_from(open(names::MAP_STATS)?)
            .map_err(map_error(names::MAP_STATS, "open"))?;
        Ok(PinnedCounters { rules, stats })
    }

    /// Packets and bytes of the rule in `slot`, summed over CPUs.
    pub fn rule(&self, slot: u32) -> Result<RuleCounter, Error> {
        let v = self
            .rules
            .get(&slot, 0)
            .map_err(map_error(names::MAP_RULE_COUNTERS, "get"))?;
        Ok(v.iter().fold(RuleCounter::default(), |a, c| RuleCounter {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        }))
    }

    /// Packets per `filter_common::reason`, summed over CPUs.
    pub fn reasons(&self) -> Result<Vec<u64>, Error> {
        (0..filter_common::reason::COUNT)
            .map(|i| {
                self.stats
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .map_err(map_error(names::MAP_STATS, "get"))
            })
            .collect()
    }
}

/// Rule slot of rule 0 of each of `compiled`'s tables (in their order)
/// when it is live as `generation`: the tables' rules take consecutive
/// slots from the generation's first.
pub fn first_slots(compiled: &Compiled, generation: u32) -> Vec<u32> {
    let mut next = generation * RULE_SLOTS_PER_GEN;
    compiled
        .tables
        .iter()
        .map(|t| {
            let first = next;
            next += t.rules.len() as u32;
            first
        })
        .collect()
}

/// The kernel's class storage `compiled` takes in one generation, its
/// endpoint masks aside: (classes, stored 64-bit words), or the capacity
/// it exceeds.
pub fn class_storage(compiled: &Compiled) -> Result<(usize, usize), Error> {
    let plan = Plan::new(compiled, &Interfaces::new(), 0)?;
    Ok((plan.layout.heads.len(), plan.layout.words.len()))
}

/// Everything `publish` would refuse about `compiled` before writing a
/// map, as if every interface it binds existed: the capacity of the rule
/// tables and of the class storage. `filter-agent check` runs it, so it
/// refuses what `run` would, with the same message.
pub fn preflight(compiled: &Compiled) -> Result<(), Error> {
    check_capacity(compiled)?;
    let ifaces: Interfaces = compiled
        .tables
        .iter()
        .flat_map(|t| t.masks.keys())
        .enumerate()
        .map(|(i, name)| (name.clone(), i as u32 + 1))
        .collect();
    Plan::new(compiled, &ifaces, 0).map(|_| ())
}

/// Where one generation's contents go, worked out before anything is
/// written.
struct Plan {
    layout: classes::Layout,
    /// Compiler class number → class number in the generation's range.
    classes: Vec<u32>,
    /// First class number of the generation.
    class_base: u32,
    /// Per table id: (interface index, class of its mask).
    masks: BTreeMap<u32, Vec<(u32, u32)>>,
    first_slots: Vec<u32>,
}

impl Plan {
    fn new(compiled: &Compiled, ifaces: &Interfaces, generation: u32) -> Result<Plan, Error> {
        let word_base = generation * CLASS_WORDS_PER_GEN;
        let class_base = generation * CLASSES_PER_GEN;
        let mut layout = classes::Layout::new();
        let mut classes = Vec::with_capacity(compiled.classes.len());
        for c in &compiled.classes {
            classes.push(class_base + layout.intern(c, word_base).map_err(Error::Capacity)?);
        }
        let mut masks = BTreeMap::new();
        for t in &compiled.tables {
            let mut eps = Vec::new();
            for (iface, mask) in &t.masks {
                // Bound interfaces that do not exist yet are skipped (and
                // written when they appear).
                let Some(&ifindex) = ifaces.get(iface) else {
                    continue;
                };
                let class = layout.intern(mask, word_base).map_err(Error::Capacity)?;
                eps.push((ifindex, class_base + class));
            }
            masks.insert(table_id(generation, t.stage, t.direction), eps);
        }
        Ok(Plan {
            layout,
            classes,
            class_base,
            masks,
            first_slots: first_slots(compiled, generation),
        })
    }

    /// The kernel's number for compiler class `c`.
    fn class(&self, c: u32) -> u32 {
        self.classes[c as usize]
    }
}

/// Whether every table fits the kernel's tables: at most `MAX_RULES` rules
/// per stage and direction, `RULE_SLOTS_PER_GEN` in all. The compiler has
/// no such limit.
fn check_capacity(compiled: &Compiled) -> Result<(), Error> {
    let total: usize = compiled.tables.iter().map(|t| t.rules.len()).sum();
    if total > RULE_SLOTS_PER_GEN as usize {
        return Err(Error::Capacity(format!(
            "the policy has {total} rules over all stages and directions; the kernel tables hold {RULE_SLOTS_PER_GEN}"
        )));
    }
    for t in &compiled.tables {
        if t.rules.len() > MAX_RULES as usize {
            let stage = filter_common::Stage::from_u32(t.stage).map_or("?", |s| s.name());
            let direction =
                filter_common::Direction::from_u32(t.direction).map_or("?", |d| d.name());
            return Err(Error::Capacity(format!(
                "the {stage} {direction} table has {} rules; the kernel tables hold {MAX_RULES} per stage and direction",
                t.rules.len()
            )));
        }
    }
    Ok(())
}

/// Wraps aya's map error with the map and what was being done.
fn map_error(
    map: &'static str,
    op: impl Into<String>,
) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map {
        map,
        op: op.into(),
        source: Box::new(source),
    }
}

fn port_key(table: [u8; 4], e: &PortEntry) -> Key<PortKey> {
    match (e.proto, e.has_ports) {
        (None, _) => Key::new(
            PORT_KEY_ANY_PROTO_BITS,
            PortKey {
                table,
                proto: 0,
                has_ports: 0,
                port: [0; 2],
            },
        ),
        (Some(proto), Some(false)) => Key::new(
            PORT_KEY_FLAG_BITS,
            PortKey {
                table,
                proto,
                has_ports: 0,
                port: [0; 2],
            },
        ),
        (Some(proto), _) => Key::new(
            PORT_KEY_FLAG_BITS + u32::from(e.port_len),
            PortKey {
                table,
                proto,
                has_ports: 1,
                port: e.port.to_be_bytes(),
            },
        ),
    }
}

/// Mounts bpffs on /sys/fs/bpf when the pin directory lives there and it is
/// not mounted (a fresh VM, or a container without the host's bpffs).
fn ensure_bpffs(pin_dir: &Path) -> Result<(), Error> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let root = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(root) {
        return Ok(());
    }
    let is_bpffs =
        nix::sys::statfs::statfs(root).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    if is_bpffs {
        return Ok(());
    }
    std::fs::create_dir_all(root).map_err(|source| Error::Fs {
        op: "create",
        path: root.to_owned(),
        source,
    })?;
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::Fs {
        op: "mount bpffs on",
        path: root.to_owned(),
        source: std::io::Error::from(e),
    })?;
    tracing::info!(path = %root.display(), "mounted bpffs");
    Ok(())
}

/// Unpins everything in `dir` (unlinking a bpffs entry is unpinning) and
/// removes the directory.
fn remove_pins(dir: &Path) -> Result<(), Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Fs {
                op: "read",
                path: dir.to_owned(),
                source,
            })
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        std::fs::remove_file(&path).map_err(|source| Error::Fs {
            op: "unpin",
            path: path.clone(),
            source,
        })?;
    }
    std::fs::remove_dir(dir).map_err(|source| Error::Fs {
        op: "remove",
        path: dir.to_owned(),
        source,
    })
}
