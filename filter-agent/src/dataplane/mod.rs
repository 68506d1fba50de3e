//! Compiled tables → kernel: load, pin, attach, and sync maps atomically.
//!
//! In: [`Compiled`] values. Out: the XDP and TC programs attached to every
//! bound interface and the classifier maps holding the live generation.
//! Invariant: a packet sees exactly one generation. A new policy is written
//! into the inactive generation of every table, made live by one write to
//! `FW_GEN1`, and only then is the old generation cleared.
//!
//! This is the only module that imports aya. By concern:
//! `publish` (generations), `attach` (XDP and TC links), `pins` (the pin
//! directory, adoption, restoring pins), `counters`, `testrun`
//! (`BPF_PROG_TEST_RUN`), `conntrack` (the agent's side of the tables),
//! `live` (the pinned programs of a running agent), `classes` (class
//! storage layout), `events` (Log records), `diag` (the programs' own
//! diagnostics).

mod attach;
mod batch;
mod classes;
pub mod conntrack;
mod counters;
mod diag;
pub use diag::KernelLogLevel;
mod events;
mod hosts4;
pub use events::{ring_bytes, Rate};
pub mod live;
mod patch;
mod pins;
mod publish;
mod room;
mod testrun;

use attach::Attachment;
pub use counters::PinnedCounters;
use pins::{
    ensure_bpffs, has_link_pins, open_map_pin, remove_pins, remove_retired_map_pins,
    remove_staging_pins, staging_pin, unstage_pins,
};
pub use publish::{class_storage, first_slots, preflight, room_for, PublishTimes};
pub use room::{host_map_entries, Room};
pub use testrun::TcRun;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
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
    endpoint_slot, failsafe_port_bit, field, names, summary_table, table_bit, table_id, AddrV4Key,
    AddrV6Key, EndpointKey, EndpointSlot, EndpointValue, FailsafeKey, HostKey, PortKey,
    RuleCounter, RuleMeta, SvcKey, TableHints, FAILSAFE_ADDR_OFFSET_BITS, FAILSAFE_PORT_BITS,
    GENERATIONS, MAX_PORT_ENTRIES, MAX_RULES, PORT_KEY_ANY_PROTO_BITS, PORT_KEY_FLAG_BITS,
    RULE_SLOTS_PER_GEN, TABLES_PER_GEN, TABLE_PREFIX_BITS,
};

use crate::compile::{prefix::Prefix, services::Frontend, Compiled, PortEntry, Table};

/// The kernel object, built by `cargo xtask build-ebpf` and embedded so the
/// agent binary runs alone.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/filter-ebpf.o"));

/// Default bpffs directory for pins.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/filter-agent";

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

/// The loaded programs and maps.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    attached: BTreeMap<String, Attachment>,
    live: u32,
    /// Names of the maps pinned under `pin_dir` (see [`Dataplane::restore_pins`]).
    pinned_maps: Vec<String>,
    /// Entries of each address table, both generations together
    /// ([`Options::prefix_capacity`], or an adopted table's size).
    prefix_capacity: u32,
    /// What each generation may hold of the maps sized to the policy
    /// ([`Room`]).
    room: Room,
    /// The object and options it was loaded from: a policy that outgrows
    /// the sized maps gets new programs with larger ones.
    object: &'static [u8],
    options: Options,
    /// What the live generation holds, if this dataplane wrote it.
    live_contents: Option<patch::Contents>,
    /// What the inactive generation holds (the policy before the live
    /// one), if this dataplane wrote it: the next publish patches it.
    /// Unknown after a load (an adopted one holds what it holds) and after
    /// a write that failed half-way: then it is cleared first.
    inactive: Option<patch::Contents>,
    /// The rule counters of the generation last retired, being zeroed in
    /// the background (see [`Dataplane::publish`]).
    zeroing: Option<publish::Zeroing>,
    last_publish: PublishTimes,
    /// Whether its sized maps are still at their staging pins: the
    /// programs on the links a previous agent pinned read the pinned ones
    /// (of an earlier layout, or of another size: a resize at the first
    /// publish), which stay in place until [`Dataplane::apply`] moves
    /// the links to this dataplane's programs.
    staged: bool,
}

/// Interface name → index, resolved by the caller in the agent's namespace.
pub type Interfaces = BTreeMap<String, u32>;

/// Settings fixed when the maps are created.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Entries of the conntrack table. An adopted table keeps the size it
    /// was created with.
    pub conntrack_size: u32,
    /// Bytes of the Log record ring buffer (a power of two, at least a
    /// page; see [`ring_bytes`]). An adopted ring keeps its size.
    pub log_ring_bytes: u32,
    /// The kernel programs' diagnostics (aya-log), off by default.
    pub kernel_log: KernelLogLevel,
    /// Parts of `fw_xdp` and `fw_tc_in` switched off
    /// (`filter_common::bench_skip`): for `cargo xtask bench`'s component
    /// profile only; 0 enforces policy.
    pub bench_skip: u32,
    /// Entries of each address trie (IPv4/IPv6 source/destination), and
    /// the most each host-address hash may be sized to. The live policy
    /// and the one being written share them, so a policy may use half.
    /// The tries allocate nothing until used. Adopted tries keep their
    /// size.
    pub prefix_capacity: u32,
    /// The least room of the sized maps ([`Room::MIN`] by default, within
    /// `prefix_capacity`), and theirs at load; a publish sizes them to its
    /// policy, never below this ([`Room`]). Adopted ones keep their size
    /// until then. `Room::MAX` sizes them once for all.
    pub room: Room,
    /// The room new sized maps are created with, if more than `room`:
    /// the room of the policy a first start is about to publish
    /// ([`room_for`]), so that it loads its programs once. Not a floor.
    pub start_room: Option<Room>,
}

/// The address tries [`Options::prefix_capacity`] sizes.
const ADDRESS_TRIES: [&str; 4] = [
    names::MAP_SRC_V4,
    names::MAP_DST_V4,
    names::MAP_SRC_V6,
    names::MAP_DST_V6,
];

impl Default for Options {
    fn default() -> Self {
        Options {
            conntrack_size: filter_common::ct::DEFAULT_SIZE,
            log_ring_bytes: filter_common::events::DEFAULT_RING_BYTES,
            kernel_log: KernelLogLevel::Off,
            bench_skip: 0,
            prefix_capacity: filter_common::MAX_TRIE_ENTRIES,
            room: Room::MIN,
            start_room: None,
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
        Self::load_object(pin_dir, options, OBJECT)
    }

    /// [`Dataplane::load_with`] another build of the kernel object (`cargo
    /// xtask bench` compares the embedded one with a baseline build). The
    /// object must define every map and program of `filter_common::names`.
    pub fn load_object(
        pin_dir: &Path,
        options: &Options,
        object: &'static [u8],
    ) -> Result<Dataplane, Error> {
        if object.is_empty() {
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
        Self::load_pinned(pin_dir, options, object).inspect_err(|_| {
            if !adopting {
                let _ = remove_pins(pin_dir);
            }
        })
    }

    fn load_pinned(
        pin_dir: &Path,
        options: &Options,
        object: &'static [u8],
    ) -> Result<Dataplane, Error> {
        // Pins of class arrays a resize left half-way: nothing uses them.
        remove_staging_pins(pin_dir)?;
        // Programs whose sized maps are of an earlier layout (an upgrade
        // that bumped one's version) read a generation word this agent
        // must not flip under them: as a resize does, this one gets its
        // own word and sized maps, and takes the links over once its first
        // policy is written.
        let running = pin_dir.join(names::MAP_GENERATION);
        let staged = running.exists() && SIZED_MAPS.iter().any(|name| !pin_dir.join(name).exists());
        let fresh = staged.then(|| new_room(options, options.prefix_capacity));
        if staged {
            tracing::info!("the running programs' sized maps are of an earlier layout: new ones, taking the links over at the first publish");
        }
        let (mut ebpf, loaded) = load_ebpf(pin_dir, options, object, fresh)?;
        pin_programs(&mut ebpf, pin_dir)?;
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
            prefix_capacity: loaded.prefix_capacity,
            room: loaded.room,
            object,
            options: *options,
            live_contents: None,
            inactive: None,
            zeroing: None,
            last_publish: PublishTimes {
                enforced: Instant::now(),
                to_enforce: Duration::ZERO,
                changed: 0,
            },
            staged,
        };
        if staged {
            // The running programs' live generation: this publish writes
            // the other half of the tables they share.
            let word = aya::maps::Map::Array(open_map_pin(pin_dir, names::MAP_GENERATION)?);
            let live = Array::<_, u32>::try_from(word)
                .and_then(|a| a.get(&0, 0))
                .map_err(map_error(names::MAP_GENERATION, "read the running word"))?;
            dp.set_generation(live)?;
        }
        dp.live = dp.generation()?;
        dp.start_presence_filter()?;
        // Last, so an agent that fails to load leaves a previous one's
        // pins as they were.
        remove_retired_map_pins(pin_dir, &dp.ebpf)?;
        Ok(dp)
    }

    /// What each generation may hold of the sized maps now.
    pub fn room(&self) -> Room {
        self.room
    }

    /// The most the sized maps may hold: the kernel tables' limits, and
    /// half the address capacity in each host hash.
    fn most_room(&self) -> Room {
        most_room(self.prefix_capacity)
    }

    /// The least room the sized maps keep ([`Options::room`]).
    fn least_room(&self) -> Room {
        least_room(&self.options, self.prefix_capacity)
    }

    /// Entries of each address table, both generations together (see
    /// [`Options::prefix_capacity`]).
    pub fn prefix_capacity(&self) -> u32 {
        self.prefix_capacity
    }

    /// Makes `compiled` the enforced policy: tables first (atomically), then
    /// attachments follow the bound interfaces. `ifaces` maps the bound
    /// interfaces that exist now to their index; bound interfaces missing
    /// from it are skipped (and retried by the caller when they appear).
    pub fn apply(&mut self, compiled: &Compiled, ifaces: &Interfaces) -> Result<u32, Error> {
        let generation = self.publish(compiled, ifaces)?;
        let attached = self.sync_attachments(compiled, ifaces);
        if std::mem::take(&mut self.staged) {
            // This dataplane's programs may be on links now: its maps'
            // pins are the ones a later agent must adopt.
            match unstage_pins(&self.pin_dir) {
                Ok(()) => {
                    for name in SIZED_MAPS {
                        if !self.pinned_maps.iter().any(|n| n == name) {
                            self.pinned_maps.push(name.to_owned());
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "pinning the sized maps in place")
                }
            }
        }
        attached?;
        Ok(generation)
    }

    fn generation(&mut self) -> Result<u32, Error> {
        let gen: Array<&mut MapData, u32> = self.map(names::MAP_GENERATION)?;
        gen.get(&0, 0)
            .map_err(map_error(names::MAP_GENERATION, "get"))
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
}

/// The sizes a loaded object's maps were created with.
struct Loaded {
    prefix_capacity: u32,
    room: Room,
}

/// [`Dataplane::most_room`] for tries of `prefix_capacity`.
fn most_room(prefix_capacity: u32) -> Room {
    Room {
        hosts: [prefix_capacity / GENERATIONS; 4],
        ..Room::MAX
    }
}

/// The least room of sized maps loaded with `options` beside tries of
/// `prefix_capacity` ([`Options::room`], within [`most_room`]).
fn least_room(options: &Options, prefix_capacity: u32) -> Room {
    options.room.within(most_room(prefix_capacity))
}

/// The room new sized maps are created with: [`Options::start_room`]
/// where it is more than the least.
fn new_room(options: &Options, prefix_capacity: u32) -> Room {
    let least = least_room(options, prefix_capacity);
    (options.start_room.unwrap_or(least))
        .at_least(least)
        .within(most_room(prefix_capacity))
}

/// Loads `object`, its programs and its loggers. Its maps are the ones
/// pinned under `pin_dir` where there are (adopted: conntrack, events,
/// counters, the classifier's tables), new and pinned there where not. With
/// `fresh`, the sized maps and the generation word are new whatever is
/// pinned, the maps of that room, pinned at their staging pins
/// ([`staging_pin`]): for programs that replace the running ones only once
/// a policy is written into them ([`Dataplane::publish`]).
fn load_ebpf(
    pin_dir: &Path,
    options: &Options,
    object: &'static [u8],
    fresh: Option<Room>,
) -> Result<(Ebpf, Loaded), Error> {
    let conntrack = kept_size(pin_dir, names::MAP_CONNTRACK, options.conntrack_size);
    let log_ring = kept_size(pin_dir, names::MAP_EVENTS, options.log_ring_bytes);
    let mut loader = EbpfLoader::new();
    let mut prefix_capacity = options.prefix_capacity;
    for name in ADDRESS_TRIES {
        let size = kept_size(pin_dir, name, options.prefix_capacity);
        prefix_capacity = prefix_capacity.min(size);
        loader.map_max_entries(name, size);
    }
    let room = match fresh {
        Some(room) => {
            for name in SIZED_MAPS {
                loader.map_pin_path(name, staging_pin(pin_dir, name));
            }
            room
        }
        // Adopted maps keep their size, silently: the next publish sizes
        // them to its policy.
        None => {
            let asked = new_room(options, prefix_capacity);
            let kept = |name: &str, asked: u32| {
                pinned_size(&pin_dir.join(name)).map_or(asked, |n| n / GENERATIONS)
            };
            let kept_hosts = |i: usize| {
                pinned_size(&pin_dir.join(room::HOST_MAPS[i]))
                    .map_or(asked.hosts[i], |n| room::hosts_of_map(i, n))
            };
            Room {
                heads: kept(names::MAP_CLASS, asked.heads),
                words: kept(names::MAP_CLASS_WORDS, asked.words),
                hosts: std::array::from_fn(kept_hosts),
                ports: std::array::from_fn(|i| kept(room::PORT_MAPS[i], asked.ports[i])),
            }
        }
    };
    for (i, name) in room::HOST_MAPS.into_iter().enumerate() {
        loader.map_max_entries(name, room::host_map_entries(i, room.hosts[i]));
    }
    for (name, entries) in room::PORT_MAPS.into_iter().zip(room.ports) {
        loader.map_max_entries(name, entries * GENERATIONS);
    }
    // The IPv4 host tables' bucket masks, which the programs cannot ask
    // their maps for.
    let masks = [0, 1].map(|i| room::host_map_entries(i, room.hosts[i]) - 1);
    for (global, mask) in filter_common::hosts4::MASK_GLOBALS.into_iter().zip(&masks) {
        loader.override_global(global, mask, true);
    }
    let mut ebpf = loader
        .default_map_pin_directory(pin_dir)
        .map_max_entries(names::MAP_CLASS, room.heads * GENERATIONS)
        .map_max_entries(names::MAP_CLASS_WORDS, room.words * GENERATIONS)
        .map_max_entries(names::MAP_CONNTRACK, conntrack)
        .map_max_entries(names::MAP_CONNTRACK_ASSURED, conntrack)
        .map_max_entries(names::MAP_EVENTS, log_ring)
        .override_global(aya_log::LEVEL, &options.kernel_log.global(), true)
        .override_global(filter_common::bench_skip::GLOBAL, &options.bench_skip, true)
        .load(object)
        .map_err(|e| Error::Load {
            what: "kernel object".into(),
            source: Box::new(e),
        })?;
    // The one vocabulary: every name the agent uses is in the object.
    for name in names::MAPS {
        if ebpf.map(name).is_none() {
            return Err(Error::Load {
                what: "kernel object".into(),
                source: format!("map {name} (filter_common::names) missing from the object").into(),
            });
        }
    }
    if let Some(name) = names::PROGRAMS
        .into_iter()
        .find(|n| ebpf.program(n).is_none())
    {
        return Err(Error::Load {
            what: "kernel object".into(),
            source: format!("program {name} (filter_common::names) missing from the object").into(),
        });
    }
    for name in ATTACHED_PROGRAMS {
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
    }
    load_loggers(&mut ebpf)?;
    Ok((
        ebpf,
        Loaded {
            prefix_capacity,
            room,
        },
    ))
}

/// The programs attached to interfaces (all three on a host endpoint,
/// [`attach::Role`]), each pinned beside its links.
const ATTACHED_PROGRAMS: [&str; 3] = [
    names::PROG_XDP,
    names::PROG_TC_INGRESS,
    names::PROG_TC_EGRESS,
];

/// The maps a policy's size picks the size of ([`Room`]), and the
/// generation word that says which half of them is live ([`load_ebpf`]'s
/// `fresh`).
const SIZED_MAPS: [&str; 9] = [
    names::MAP_CLASS,
    names::MAP_CLASS_WORDS,
    names::MAP_SRC_V4_EXACT,
    names::MAP_DST_V4_EXACT,
    names::MAP_SRC_V6_EXACT,
    names::MAP_DST_V6_EXACT,
    names::MAP_PORT_EXACT,
    names::MAP_SPORT_EXACT,
    names::MAP_GENERATION,
];

/// Pins the attached programs under `pin_dir` (where `live` and bpftool
/// find them), in place of a previous agent's: its programs stay alive
/// while links hold them.
fn pin_programs(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<(), Error> {
    for name in ATTACHED_PROGRAMS {
        let pin = pin_dir.join(name);
        if pin.exists() {
            std::fs::remove_file(&pin).map_err(|source| Error::Fs {
                op: "unpin old",
                path: pin.clone(),
                source,
            })?;
        }
        let prog = ebpf.program_mut(name).ok_or_else(|| Error::Load {
            what: name.into(),
            source: format!("program {name} missing from the object").into(),
        })?;
        prog.pin(&pin).map_err(|e| Error::Load {
            what: format!("pin {name}"),
            source: Box::new(e),
        })?;
    }
    Ok(())
}

/// The size to create map `name` with: `asked`, unless a previous agent
/// pinned it with another size, which an adopted map keeps (resizing means
/// a new, empty map: conntrack would forget its flows). aya refuses to
/// reuse a pin of another size, so the pin's size is what is asked for.
fn kept_size(pin_dir: &Path, name: &str, asked: u32) -> u32 {
    let pin = pin_dir.join(name);
    let Some(size) = pinned_size(&pin) else {
        return asked;
    };
    if size != asked {
        tracing::warn!(
            map = name,
            size,
            asked,
            "an adopted map keeps its size; remove its pin ({}) to resize it",
            pin.display()
        );
    }
    size
}

/// `max_entries` of the map pinned at `pin` (for a ring buffer, bytes), if
/// one is.
fn pinned_size(pin: &Path) -> Option<u32> {
    let info = MapData::from_pin(pin).ok()?.info().ok()?;
    Some(info.max_entries())
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

/// Loads the logger programs and puts them where the pipeline tail-calls
/// them (`FW_TAILX1`, `FW_TAILT1`, pinned: an adopting agent replaces
/// them with its own).
fn load_loggers(ebpf: &mut Ebpf) -> Result<(), Error> {
    let load = |name: &str, e: aya::programs::ProgramError| Error::Load {
        what: name.into(),
        source: Box::new(e),
    };
    let clone = |name: &str, fd: &aya::programs::ProgramFd| {
        fd.try_clone().map_err(|e| Error::Load {
            what: name.into(),
            source: Box::new(e),
        })
    };
    let mut fds = Vec::new();
    for (name, index) in [
        (names::PROG_XDP_LOG, names::MAP_TAIL_XDP),
        (names::PROG_TC_LOG, names::MAP_TAIL_TC),
    ] {
        let fd = match ebpf.program_mut(name) {
            Some(aya::programs::Program::Xdp(p)) => {
                p.load().map_err(|e| load(name, e))?;
                clone(name, p.fd().map_err(|e| load(name, e))?)?
            }
            Some(aya::programs::Program::SchedClassifier(p)) => {
                p.load().map_err(|e| load(name, e))?;
                clone(name, p.fd().map_err(|e| load(name, e))?)?
            }
            _ => {
                return Err(Error::Load {
                    what: name.into(),
                    source: "logger program missing from the object".into(),
                })
            }
        };
        fds.push((index, fd));
    }
    for (map_name, fd) in &fds {
        let map = ebpf.map_mut(map_name).ok_or_else(|| Error::Load {
            what: (*map_name).into(),
            source: "map missing from the object".into(),
        })?;
        let mut tail: aya::maps::ProgramArray<&mut MapData> =
            aya::maps::ProgramArray::try_from(map).map_err(map_error(map_name, "open"))?;
        tail.set(filter_common::events::LOGGER, fd, 0)
            .map_err(map_error(map_name, "set"))?;
    }
    Ok(())
}
