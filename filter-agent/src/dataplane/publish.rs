//! Publishing a compiled policy: the plan of one generation (classes,
//! words, endpoint classes, rule slots) checked against the kernel tables'
//! capacity, patched into the inactive generation (`patch`), made live by
//! one write to `FW_GEN1`; the node addresses and Service frontends
//! beside it.

use std::sync::Arc;

use super::patch::Contents;
use super::*;
use crate::compile::bits::RuleSet;

/// How long a packet that read the old generation may still be running
/// when the agent starts rewriting it (the next publish, at least this long
/// after the flip). BPF programs run in an RCU read-side section of a few
/// microseconds; this is generous.
pub(super) const GRACE: Duration = Duration::from_millis(20);

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
    let plan = Plan::new(compiled, &Interfaces::new(), 0, Room::MAX, None)?;
    let layout = &plan.base.layout;
    Ok((layout.heads.len(), layout.words.len()))
}

/// What a generation of `compiled`, laid out as `plan`, needs of the
/// sized maps.
fn need(compiled: &Compiled, plan: &Plan) -> Room {
    let (heads, words) = plan.classes();
    Room {
        heads,
        words,
        hosts: address_counts(compiled).map(|(hosts, _)| hosts as u32),
        ports: single_port_counts(compiled).map(|n| n as u32),
    }
}

/// The room the sized maps of a dataplane loaded with `options` would be
/// given by its first publish of `compiled` on `ifaces`: for
/// [`Options::start_room`], so that a first start whose policy outgrows
/// the least room loads its programs once, at the policy's size.
pub fn room_for(
    compiled: &Compiled,
    ifaces: &Interfaces,
    options: &Options,
) -> Result<Room, Error> {
    let plan = Plan::new(compiled, ifaces, 0, Room::MAX, None)?;
    let capacity = options.prefix_capacity;
    Ok(Room::fitting(
        need(compiled, &plan),
        super::least_room(options, capacity),
        super::most_room(capacity),
    ))
}

/// Everything `publish` would refuse about `compiled` before writing a
/// map, as if every interface it binds existed: the capacity of the rule
/// tables and of the class storage. `filter-agent check` runs it, so it
/// refuses what `run` would, with the same message.
pub fn preflight(compiled: &Compiled) -> Result<(), Error> {
    check_capacity(compiled)?;
    let names: BTreeSet<&String> = compiled
        .tables
        .iter()
        .flat_map(|t| t.masks.keys())
        .collect();
    let ifaces: Interfaces = names
        .into_iter()
        .enumerate()
        .map(|(i, name)| (name.clone(), i as u32 + 1))
        .collect();
    Plan::new(compiled, &ifaces, 0, Room::MAX, None).map(|_| ())
}

/// The compiler's classes as one generation stores them: compiler class
/// `c` is the generation's class `c`. A publish whose classes are those
/// the generation holds (a change of actions, orders or ports that split
/// no class) keeps this, shared, and writes none of it.
pub(super) struct ClassBase {
    /// The compiler's classes it was laid out from.
    sets: Vec<RuleSet>,
    /// The generation's first word, which the heads' offsets include.
    pub(super) word_base: u32,
    pub(super) layout: classes::Layout,
}

/// Where one generation's contents go, worked out before anything is
/// written.
pub(super) struct Plan {
    /// The compiler's classes.
    pub(super) base: Arc<ClassBase>,
    /// The endpoint masks that are no compiler class, numbered after them.
    pub(super) masks_layout: classes::Layout,
    /// The generation's first class.
    class_base: u32,
    /// Per table id: (interface index, class of its mask, its
    /// [`EndpointValue::decided`]).
    pub(super) masks: BTreeMap<u32, Vec<(u32, u32, u32)>>,
    /// Rule slot of each table's first rule, in `Compiled::tables` order.
    pub(super) first_slots: Vec<u32>,
}

/// [`EndpointValue::decided`] of the endpoint whose rules in `t` are
/// `mask`: 1 + its first rule when that rule allows or denies and every
/// packet matches it (`Table::everywhere`), else 0.
fn decided(t: &Table, mask: &RuleSet) -> u32 {
    let Some(r) = mask.first_from(0) else {
        return 0;
    };
    let verdict = t.rules.get(r).is_some_and(|rule| {
        rule.action == filter_common::action::ALLOW || rule.action == filter_common::action::DENY
    });
    if verdict && t.everywhere.contains(r) {
        r as u32 + 1
    } else {
        0
    }
}

impl Plan {
    /// The plan of `compiled` in `generation` of class arrays of `room`,
    /// taking the class layout over from `held` (what the generation
    /// holds) where it has the same classes. It may need more room than
    /// `room` ([`Plan::classes`]), never more than [`Room::MAX`]; only
    /// its class parts count.
    pub(super) fn new(
        compiled: &Compiled,
        ifaces: &Interfaces,
        generation: u32,
        room: Room,
        held: Option<&Contents>,
    ) -> Result<Plan, Error> {
        let word_base = generation * room.words;
        let class_base = generation * room.heads;
        // Comparing the sets costs a pointer each where the compile took
        // them over (`compile::bits::RuleSet`).
        let held = held
            .and_then(|h| h.class_base())
            .filter(|b| b.word_base == word_base && b.sets == compiled.classes);
        let base = match held {
            Some(base) => base.clone(),
            None => {
                // The compiler's classes are distinct sets: pushed without
                // a lookup.
                let mut layout = classes::Layout::new();
                for c in &compiled.classes {
                    layout.push(c, word_base).map_err(Error::Capacity)?;
                }
                Arc::new(ClassBase {
                    sets: compiled.classes.clone(),
                    word_base,
                    layout,
                })
            }
        };
        let mut masks_layout = classes::Layout::after(&base.layout);
        // An endpoint mask (a few per table) is found among the compiler's
        // classes by a scan, which mostly compares lengths, or interned.
        let mut mask_class = |mask: &RuleSet| -> Result<u32, Error> {
            match compiled.classes.iter().position(|c| c == mask) {
                Some(c) => Ok(c as u32),
                None => masks_layout
                    .intern(mask, word_base)
                    .map_err(Error::Capacity),
            }
        };
        let mut masks = BTreeMap::new();
        for t in &compiled.tables {
            let mut eps = Vec::new();
            for (iface, mask) in &t.masks {
                // Bound interfaces that do not exist yet are skipped (and
                // written when they appear).
                let Some(&ifindex) = ifaces.get(iface) else {
                    continue;
                };
                let class = mask_class(mask)?;
                let decided = decided(t, mask);
                eps.push((ifindex, class_base + class, decided));
            }
            masks.insert(table_id(generation, t.stage, t.direction), eps);
        }
        Ok(Plan {
            base,
            masks_layout,
            class_base,
            masks,
            first_slots: first_slots(compiled, generation),
        })
    }

    /// The classes and words the generation needs, endpoint masks
    /// included.
    pub(super) fn classes(&self) -> (u32, u32) {
        self.masks_layout.end()
    }

    /// The kernel's number for compiler class `c`.
    pub(super) fn class(&self, c: u32) -> u32 {
        self.class_base + c
    }
}

/// The rule counters of a retired generation, zeroed on a thread of their
/// own ([`batch::zero_per_cpu_after`]).
pub(super) struct Zeroing {
    generation: u32,
    /// The slots zeroed, sorted.
    slots: Vec<u32>,
    done: std::thread::JoinHandle<Result<(), Error>>,
}

/// How the last publish went: the policy is enforced from the moment the
/// live generation flips.
#[derive(Debug, Clone, Copy)]
pub struct PublishTimes {
    /// When the new generation went live.
    pub enforced: Instant,
    /// From the start of the publish to the flip: patching the inactive
    /// generation.
    pub to_enforce: Duration,
    /// Classifier entries written or removed (the rule counters' reset
    /// aside): the size of the change, or of the whole policy where the
    /// inactive generation was not known.
    pub changed: usize,
}

/// Whether every table fits the kernel's tables: at most `MAX_RULES` rules
/// per stage and direction, `RULE_SLOTS_PER_GEN` in all. The compiler has
/// no such limit.
pub(super) fn check_capacity(compiled: &Compiled) -> Result<(), Error> {
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

/// The lookups table `t` spares the kernel (`TableHints`): per field, the
/// catch-all's class when the trie holds nothing else (host addresses go
/// to the exact hash, asked first), and which address fields have host
/// addresses at all.
pub(super) fn hints(t: &Table, plan: &Plan) -> TableHints {
    let mut h = TableHints::default();
    let addresses = [
        (field::SRC4, &t.src_v4, 32),
        (field::DST4, &t.dst_v4, 32),
        (field::SRC6, &t.src_v6, 128),
        (field::DST6, &t.dst_v6, 128),
    ];
    for (f, entries, full) in addresses {
        if entries.iter().any(|(p, _)| p.len == full) {
            h.exact |= 1 << f;
        }
        let mut prefixes = entries.iter().filter(|(p, _)| p.len != full);
        if let (Some((p, class)), None) = (prefixes.next(), prefixes.next()) {
            if p.len == 0 {
                h.fallback[f] = plan.class(*class) + 1;
            }
        }
    }
    for (f, entries) in [(field::DPORT, &t.dports), (field::SPORT, &t.sports)] {
        if entries.iter().any(is_single_port) {
            h.exact |= 1 << f;
        }
        let mut ranges = entries.iter().filter(|e| !is_single_port(e));
        if let (Some(only), None) = (ranges.next(), ranges.next()) {
            if only.proto.is_none() {
                h.fallback[f] = plan.class(only.class) + 1;
            }
        }
    }
    h
}

/// A port entry for one protocol and one port: it goes into the exact
/// hash (its key is a full [`PortKey`], as the kernel's lookup key is).
pub(super) fn is_single_port(e: &PortEntry) -> bool {
    e.proto.is_some() && e.has_ports != Some(false) && e.port_len == 16
}

/// Whether every address table has room for `compiled` beside the live
/// policy: half of `capacity` each ([`super::Options::prefix_capacity`]).
/// Host addresses (in the exact hash) and other prefixes (in the trie)
/// count apart. Likewise single ports, in half of `MAX_PORT_ENTRIES`.
pub(super) fn check_prefixes(compiled: &Compiled, capacity: u32) -> Result<(), Error> {
    let half = (capacity / GENERATIONS) as usize;
    for (what, n) in ["destination", "source"]
        .into_iter()
        .zip(single_port_counts(compiled))
    {
        let half = (MAX_PORT_ENTRIES / GENERATIONS) as usize;
        if n > half {
            return Err(Error::Capacity(format!(
                "the policy has {n} single {what} ports (per protocol) over all tables; the kernel tables hold {half} per policy"
            )));
        }
    }
    let what = [
        "IPv4 source",
        "IPv4 destination",
        "IPv6 source",
        "IPv6 destination",
    ];
    for (what, (hosts, nets)) in what.into_iter().zip(address_counts(compiled)) {
        for (n, kind) in [(hosts, "host addresses"), (nets, "other prefixes")] {
            if n > half {
                return Err(Error::Capacity(format!(
                    "the policy has {n} {what} {kind} over all tables; the kernel tables hold {half} per policy (--max-prefixes {capacity}: half for the live policy, half for the next)"
                )));
            }
        }
    }
    Ok(())
}

/// Per address field (IPv4 source, IPv4 destination, IPv6 source, IPv6
/// destination: [`super::room::HOST_MAPS`]' order), the host addresses
/// (for the exact hash) and the other prefixes (for the trie) of
/// `compiled`, over all tables.
pub(super) fn address_counts(compiled: &Compiled) -> [(usize, usize); 4] {
    type Field = fn(&Table) -> &Vec<(Prefix, u32)>;
    let fields: [(Field, u8); 4] = [
        (|t| &t.src_v4, 32),
        (|t| &t.dst_v4, 32),
        (|t| &t.src_v6, 128),
        (|t| &t.dst_v6, 128),
    ];
    fields.map(|(entries, full)| {
        let (mut hosts, mut nets) = (0, 0);
        for t in &compiled.tables {
            let e = entries(t);
            let h = e.iter().filter(|(p, _)| p.len == full).count();
            hosts += h;
            nets += e.len() - h;
        }
        (hosts, nets)
    })
}

/// The single ports (per protocol: [`is_single_port`], for the exact
/// hash) of `compiled`'s destination and source port fields
/// ([`super::room::PORT_MAPS`]' order), over all tables.
pub(super) fn single_port_counts(compiled: &Compiled) -> [usize; 2] {
    type Ports = fn(&Table) -> &Vec<PortEntry>;
    let fields: [Ports; 2] = [|t| &t.dports, |t| &t.sports];
    fields.map(|entries| {
        compiled
            .tables
            .iter()
            .map(|t| entries(t).iter().filter(|e| is_single_port(e)).count())
            .sum()
    })
}

pub(super) fn port_key(table: [u8; 4], e: &PortEntry) -> Key<PortKey> {
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

/// The list a failsafe entry is in, as keys and port bits name it.
fn failsafe_direction(f: &crate::compile::failsafe::Failsafe) -> u8 {
    let direction = if f.inbound {
        filter_common::direction::INGRESS
    } else {
        filter_common::direction::EGRESS
    };
    direction as u8
}

/// The `FW_FSPORT1` bits of a failsafe entry's port: its list, protocol
/// and family, both families without a net.
pub(super) fn failsafe_bits(f: &crate::compile::failsafe::Failsafe) -> u8 {
    let bit = |family| failsafe_port_bit(failsafe_direction(f), f.proto, family);
    match f.net {
        None => bit(4) | bit(6),
        Some(ipnetwork::IpNetwork::V4(_)) => bit(4),
        Some(ipnetwork::IpNetwork::V6(_)) => bit(6),
    }
}

/// The trie keys of a failsafe entry: without a net, one key fixing
/// direction, protocol and port; with one, the net under its family.
pub(super) fn failsafe_keys(f: &crate::compile::failsafe::Failsafe) -> Vec<Key<FailsafeKey>> {
    let mut key = FailsafeKey {
        direction: failsafe_direction(f),
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

impl Dataplane {
    /// Writes `compiled` into the inactive generation and makes it live;
    /// attaches nothing. Returns the live generation. The inactive
    /// generation is patched from what it holds (`dataplane/patch.rs`):
    /// only the entries that differ are written.
    ///
    /// A policy that does not fit the maps sized to the policy ([`Room`]),
    /// or needs less than an eighth of them, is written into new programs
    /// with maps of its size, which then take the links over
    /// ([`Dataplane::resize`]).
    pub fn publish(&mut self, compiled: &Compiled, ifaces: &Interfaces) -> Result<u32, Error> {
        let started = Instant::now();
        let next = (self.live + 1) % GENERATIONS;
        check_capacity(compiled)?;
        check_prefixes(compiled, self.prefix_capacity)?;
        // Everything that can exceed a capacity is laid out before the
        // first write, so a policy that does not fit changes nothing.
        let plan = Plan::new(compiled, ifaces, next, self.room, self.inactive.as_ref())?;
        let need = need(compiled, &plan);
        match self.room.refit(need, self.least_room(), self.most_room()) {
            Some(room) => self.resize(room, compiled, ifaces),
            None => self.write(compiled, plan, started),
        }
    }

    /// Writes `compiled`, laid out as `plan`, into the inactive generation
    /// and makes it live.
    fn write(&mut self, compiled: &Compiled, plan: Plan, started: Instant) -> Result<u32, Error> {
        let next = (self.live + 1) % GENERATIONS;
        let want = Contents::new(next, compiled, &plan, self.inactive.as_ref());
        // The inactive generation was live until the last flip: a packet
        // that read it then may still be running.
        if let Some(left) = GRACE.checked_sub(self.last_publish.enforced.elapsed()) {
            std::thread::sleep(left);
        }
        // What it holds, if this dataplane wrote it; taken, so a write
        // failing half-way leaves it unknown, and cleared before its next
        // use.
        let have = match self.inactive.take() {
            Some(have) => have,
            None => {
                self.clear_generation(next)?;
                Contents::default()
            }
        };
        self.write_failsafe(&compiled.failsafe)?;
        self.write_frontends(&compiled.frontends)?;
        let changed = self.patch(&have, &want)?;
        let zeroed = self.zeroed(next);
        let slots: Vec<u32> = want
            .slots()
            .into_iter()
            .filter(|s| zeroed.binary_search(s).is_err())
            .collect();
        self.zero_counters(&slots)?;
        self.set_generation(next)?;
        let enforced = Instant::now();
        let retired = self.live;
        self.live = next;
        // The generation that was live keeps its policy: the next publish
        // patches it. Its counters are zeroed meanwhile, once no packet
        // can still be counting into them, so that a publish into it
        // zeroes none of them on the way to its flip (with 10,000 rules
        // that took longer than writing a one-rule change).
        self.inactive = self.live_contents.replace(want);
        if let Some(held) = &self.inactive {
            let slots = held.slots();
            self.zeroing = batch::zero_per_cpu_after(
                &self.ebpf,
                names::MAP_RULE_COUNTERS,
                slots.clone(),
                GRACE,
            )
            .map(|done| Zeroing {
                generation: retired,
                slots,
                done,
            });
        }
        self.last_publish = PublishTimes {
            enforced,
            to_enforce: enforced - started,
            changed,
        };
        Ok(next)
    }

    /// Publishes `compiled` through new programs whose sized maps have
    /// `room`: a map cannot grow, and the programs hold theirs.
    ///
    /// The new object shares every other map with the running programs
    /// (conntrack, events, counters, the tries, the rule and endpoint
    /// tables: the pins), and has a generation word of its own, set to the
    /// live generation. The policy goes into the inactive generation, as
    /// any publish's does: into the shared tables' half the running
    /// programs do not read and into the new maps; the new word flips.
    /// Then each link is updated to the new programs, one atomic swap a
    /// hook: a packet meets the old programs with the old policy or the new
    /// ones with the new. The running programs never see the flip (their
    /// word is their own), and their maps go with them. A swap that fails
    /// puts the links back.
    fn resize(
        &mut self,
        room: Room,
        compiled: &Compiled,
        ifaces: &Interfaces,
    ) -> Result<u32, Error> {
        let started = Instant::now();
        tracing::info!(
            from = ?self.room,
            to = ?room,
            "sizing the classifier's maps to the policy: loading programs with new maps"
        );
        remove_staging_pins(&self.pin_dir)?;
        let (ebpf, loaded) = load_ebpf(&self.pin_dir, &self.options, self.object, Some(room))
            .inspect_err(|_| {
                let _ = remove_staging_pins(&self.pin_dir);
            })?;
        let mut new = Dataplane {
            ebpf,
            pin_dir: self.pin_dir.clone(),
            attached: BTreeMap::new(),
            live: self.live,
            pinned_maps: self.pinned_maps.clone(),
            prefix_capacity: loaded.prefix_capacity,
            room: loaded.room,
            object: self.object,
            options: self.options,
            live_contents: None,
            inactive: None,
            // The retired generation's counters: the publish waits for
            // them.
            zeroing: self.zeroing.take(),
            last_publish: self.last_publish,
            staged: false,
        };
        // From here the shared tables' inactive half is being rewritten:
        // what this dataplane knew of it no longer holds.
        self.inactive = None;
        let written = new.set_generation(self.live).and_then(|()| {
            let plan = Plan::new(compiled, ifaces, (self.live + 1) % GENERATIONS, room, None)?;
            new.write(compiled, plan, started)
        });
        let generation = match written {
            Ok(g) => g,
            Err(e) => {
                drop(new);
                let _ = remove_staging_pins(&self.pin_dir);
                return Err(e);
            }
        };
        // The links, one interface at a time; the pins name them.
        let mut moved: Vec<(String, u32, attach::Role)> = Vec::new();
        for (iface, a) in &self.attached {
            if let Err(e) = new.attach(iface, a.ifindex, a.role) {
                for (iface, ifindex, role) in &moved {
                    if let Err(back) = self.attach(iface, *ifindex, *role) {
                        tracing::error!(iface, error = %format!("{:#}", anyhow::Error::from(back)), "putting the running programs back on the links");
                    }
                }
                drop(new);
                let _ = remove_staging_pins(&self.pin_dir);
                return Err(e);
            }
            if let Some(b) = new.attached.get_mut(iface) {
                b.xdp_mode = a.xdp_mode;
            }
            moved.push((iface.clone(), a.ifindex, a.role));
        }
        // The policy is enforced from the last swap, not from the flip
        // (no packet met the new programs before): the next publish's
        // grace, for packets still in the old programs, runs from here.
        let enforced = Instant::now();
        new.last_publish.enforced = enforced;
        new.last_publish.to_enforce = enforced - started;
        // The new programs enforce: their pins and their maps' take the
        // places of the old ones (a rename replaces a pin in one step).
        // Past the swap nothing is undone: a pin left behind costs a later
        // agent's adoption a full write, not enforcement.
        // Links a previous agent pinned that this dataplane has not taken
        // yet (its first publish, before `apply` attaches): their programs
        // read the pinned maps and word until they move, so the pins move
        // after them ([`Dataplane::apply`]), or an agent that died between
        // would leave the next one pins that disagree with the links.
        let unmoved = self.attached.is_empty() && has_link_pins(&self.pin_dir);
        new.staged = unmoved;
        let pinned = pin_programs(&mut new.ebpf, &self.pin_dir).and_then(|()| {
            if unmoved {
                Ok(())
            } else {
                unstage_pins(&self.pin_dir)
            }
        });
        if let Err(e) = pinned {
            tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "pinning the new programs and class arrays");
        }
        tracing::info!(room = ?room, bytes = room.bytes(), "classifier maps sized to the policy");
        if self.options.kernel_log != KernelLogLevel::Off {
            tracing::warn!("the new programs' diagnostics are read from the next start on");
        }
        // The old programs and their maps go once nothing holds them.
        *self = new;
        Ok(generation)
    }

    /// When and how fast the last [`Dataplane::publish`] went.
    pub fn last_publish(&self) -> PublishTimes {
        self.last_publish
    }

    /// Makes `entries` the failsafe set: new entries first, then the stale
    /// ones removed, so a port that stays failsafe never stops being one.
    /// The port filter in front of the trie (`FW_FSPORT1`) gains the new
    /// ports' bits before the trie changes and loses the stale ones' after:
    /// a bit without an entry costs a trie lookup, an entry without its
    /// bit would be a failsafe port no longer honoured.
    pub(super) fn write_failsafe(
        &mut self,
        entries: &[crate::compile::failsafe::Failsafe],
    ) -> Result<(), Error> {
        let mut bits: BTreeMap<u16, u8> = BTreeMap::new();
        for f in entries {
            *bits.entry(f.port).or_default() |= failsafe_bits(f);
        }
        let mut ports: Array<&mut MapData, u8> = self.map(names::MAP_FAILSAFE_PORTS)?;
        for (&port, &b) in &bits {
            let now = ports.get(&u32::from(port), 0).unwrap_or(0);
            ports
                .set(u32::from(port), &(now | b), 0)
                .map_err(map_error(
                    names::MAP_FAILSAFE_PORTS,
                    format!("set port {port}"),
                ))?;
        }
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
        for k in &stale {
            trie.remove(k)
                .map_err(map_error(names::MAP_FAILSAFE, "remove"))?;
        }
        let mut ports: Array<&mut MapData, u8> = self.map(names::MAP_FAILSAFE_PORTS)?;
        let stale_ports: BTreeSet<u16> = stale
            .iter()
            .map(|k| u16::from_be_bytes(k.data().port))
            .collect();
        for port in stale_ports {
            let b = bits.get(&port).copied().unwrap_or(0);
            ports.set(u32::from(port), &b, 0).map_err(map_error(
                names::MAP_FAILSAFE_PORTS,
                format!("set port {port}"),
            ))?;
        }
        Ok(())
    }

    /// The rule slots of `generation` whose counters are zero already
    /// (sorted): those the background zeroing of its retirement covered,
    /// once it is done. A zeroing that failed covered none.
    fn zeroed(&mut self, generation: u32) -> Vec<u32> {
        let Some(z) = self.zeroing.take() else {
            return Vec::new();
        };
        match z.done.join() {
            Ok(Ok(())) if z.generation == generation => z.slots,
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{:#}", anyhow::Error::from(e)), "zeroing a retired generation's rule counters failed: zeroing them now");
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// Zeroes the counters of rule `slots`: a slot counts for the rule
    /// the live generation puts there, from when it went live.
    pub(super) fn zero_counters(&mut self, slots: &[u32]) -> Result<(), Error> {
        batch::zero_per_cpu(&self.ebpf, names::MAP_RULE_COUNTERS, slots)
    }

    /// Removes every trie and endpoint entry of `generation`.
    pub(super) fn clear_generation(&mut self, generation: u32) -> Result<(), Error> {
        let tables = generation * TABLES_PER_GEN..(generation + 1) * TABLES_PER_GEN;
        let in_gen = |t: [u8; 4]| tables.contains(&u32::from_be_bytes(t));
        self.clear_trie::<AddrV4Key>(names::MAP_SRC_V4, |k| in_gen(k.table))?;
        self.clear_trie::<AddrV4Key>(names::MAP_DST_V4, |k| in_gen(k.table))?;
        self.clear_trie::<AddrV6Key>(names::MAP_SRC_V6, |k| in_gen(k.table))?;
        self.clear_trie::<AddrV6Key>(names::MAP_DST_V6, |k| in_gen(k.table))?;
        for name in [names::MAP_SRC_V4_EXACT, names::MAP_DST_V4_EXACT] {
            self.hosts4(name)?.clear(|t| tables.contains(&t));
        }
        self.clear_exact::<AddrV6Key>(names::MAP_SRC_V6_EXACT, |k| in_gen(k.table))?;
        self.clear_exact::<AddrV6Key>(names::MAP_DST_V6_EXACT, |k| in_gen(k.table))?;
        self.clear_trie::<PortKey>(names::MAP_PORT, |k| in_gen(k.table))?;
        self.clear_trie::<PortKey>(names::MAP_SPORT, |k| in_gen(k.table))?;
        self.clear_exact::<PortKey>(names::MAP_PORT_EXACT, |k| in_gen(k.table))?;
        self.clear_exact::<PortKey>(names::MAP_SPORT_EXACT, |k| in_gen(k.table))?;
        let mut table_hints: Array<&mut MapData, TableHints> = self.map(names::MAP_TABLE_HINTS)?;
        for t in tables.clone() {
            table_hints
                .set(t, &TableHints::default(), 0)
                .map_err(map_error(
                    names::MAP_TABLE_HINTS,
                    format!("clear table {t}"),
                ))?;
        }
        let mut eps: HashMap<&mut MapData, EndpointKey, EndpointValue> =
            self.map(names::MAP_ENDPOINT)?;
        let stale: Vec<EndpointKey> = eps
            .keys()
            .filter_map(Result::ok)
            .filter(|k| tables.contains(&k.table) || k.table == summary_table(generation))
            .collect();
        for k in &stale {
            eps.remove(k)
                .map_err(map_error(names::MAP_ENDPOINT, "remove"))?;
        }
        let slots: Vec<u32> = stale.iter().filter_map(endpoint_slot).collect();
        let empty = vec![EndpointSlot::default(); slots.len()];
        batch::update(&self.ebpf, names::MAP_ENDPOINT_SLOTS, &slots, &empty)?;
        Ok(())
    }

    pub(super) fn clear_trie<K: aya::Pod>(
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

    /// Removes the entries of an exact hash whose key `stale` picks, in
    /// batches (an LPM trie has no batch delete: [`Dataplane::clear_trie`]).
    pub(super) fn clear_exact<K: aya::Pod + Sync>(
        &mut self,
        name: &'static str,
        stale: impl Fn(&K) -> bool,
    ) -> Result<(), Error> {
        let map: HashMap<&mut MapData, Key<K>, u32> = self.map(name)?;
        let keys: Vec<Key<K>> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| stale(&k.data()))
            .collect();
        batch::delete(&self.ebpf, name, &keys)
    }

    /// IPv4 host table `name`, mapped for writing.
    pub(super) fn hosts4(&self, name: &'static str) -> Result<super::hosts4::Hosts4, Error> {
        match self.ebpf.map(name) {
            Some(aya::maps::Map::Array(data)) => super::hosts4::Hosts4::open(data, name),
            _ => Err(map_error(name, "find")(aya::maps::MapError::InvalidName {
                name: name.into(),
            })),
        }
    }

    pub(super) fn set_generation(&mut self, generation: u32) -> Result<(), Error> {
        let mut gen: Array<&mut MapData, u32> = self.map(names::MAP_GENERATION)?;
        gen.set(0, &generation, 0)
            .map_err(map_error(names::MAP_GENERATION, "flip"))
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
    pub(super) fn write_frontends(&mut self, frontends: &[Frontend]) -> Result<(), Error> {
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
    pub(super) fn sync_set<K: aya::Pod + PartialEq>(
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
}

#[cfg(test)]
mod tests {
    //! The pure parts of publishing: keys, the capacity check and the plan.

    use super::*;
    use crate::{compile::Node, model::Store};
    use filter_common::{action, direction, stage};

    #[test]
    fn port_keys_fix_as_many_bits_as_the_entry_says() {
        let table = 3u32.to_be_bytes();
        let entry = |proto, has_ports, port, port_len| PortEntry {
            proto,
            has_ports,
            port,
            port_len,
            class: 0,
        };
        let any = port_key(table, &entry(None, None, 0, 0));
        assert_eq!(any.prefix_len(), PORT_KEY_ANY_PROTO_BITS);
        let portless = port_key(table, &entry(Some(6), Some(false), 0, 0));
        assert_eq!(portless.prefix_len(), PORT_KEY_FLAG_BITS);
        assert_eq!(portless.data().has_ports, 0);
        // 8080/16: the whole port; 30000:32767 starts with a /15 or so.
        let exact = port_key(table, &entry(Some(6), Some(true), 8080, 16));
        assert_eq!(exact.prefix_len(), PORT_KEY_FLAG_BITS + 16);
        assert_eq!(exact.data().port, 8080u16.to_be_bytes());
        assert_eq!(exact.data().has_ports, 1);
        assert_eq!(exact.data().table, table);
    }

    #[test]
    fn failsafe_keys_fix_direction_protocol_port_and_net() {
        use crate::compile::failsafe::Failsafe;
        let ssh = Failsafe {
            inbound: true,
            proto: 6,
            port: 22,
            net: None,
        };
        let keys = failsafe_keys(&ssh);
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].prefix_len(), FAILSAFE_PORT_BITS);
        let k = keys[0].data();
        assert_eq!((k.direction, k.proto, k.port), (0, 6, 22u16.to_be_bytes()));
        let dns = Failsafe {
            inbound: false,
            proto: 17,
            port: 53,
            net: Some("10.0.0.0/8".parse().expect("net")),
        };
        let keys = failsafe_keys(&dns);
        assert_eq!(keys[0].prefix_len(), FAILSAFE_ADDR_OFFSET_BITS + 8);
        assert_eq!(keys[0].data().family, 4);
        assert_eq!(keys[0].data().direction, 1);
        assert_eq!(keys[0].data().addr[..4], [10, 0, 0, 0]);
    }

    fn compiled(rules: usize) -> Compiled {
        let rules: String = (0..rules)
            .map(|i| {
                format!(
                    "  - action: Allow\n    protocol: TCP\n    destination: {{ports: [{}]}}\n",
                    1 + i % 60_000
                )
            })
            .collect();
        compiled_with(&format!(
            "---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  selector: role == 'pub'\n  types: [Ingress]\n  ingress:\n{rules}"
        ))
    }

    /// `policies` (each document after a `---`) for the host endpoint of
    /// interface eth1 on node n1, compiled.
    fn compiled_with(policies: &str) -> Compiled {
        let yaml = format!(
            "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {{name: w, labels: {{role: pub}}}}\nspec: {{node: n1, interfaceName: eth1}}\n{policies}"
        );
        let mut store = Store::default();
        let mut errors = Vec::new();
        store.add_text(Path::new("t.yaml"), &yaml, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let node = Node {
            name: "n1".into(),
            ..Default::default()
        };
        crate::compile::compile(&store, &node).expect("compiles")
    }

    /// The action of the rule the endpoint's normal ingress entry says
    /// decides every packet, if it says one does.
    fn decided_ingress(policies: &str) -> Option<u32> {
        let c = compiled_with(policies);
        let ifaces: Interfaces = [("eth1".to_string(), 7)].into();
        let plan = Plan::new(&c, &ifaces, 0, Room::MAX, None).expect("fits");
        let t = c
            .tables
            .iter()
            .find(|t| t.stage == stage::NORMAL && t.direction == direction::INGRESS)
            .expect("a normal ingress table");
        let id = table_id(0, stage::NORMAL, direction::INGRESS);
        let &(_, _, decided) = plan.masks[&id].iter().find(|e| e.0 == 7)?;
        let rule = decided.checked_sub(1)?;
        Some(t.rules[rule as usize].action)
    }

    #[test]
    fn an_endpoint_whose_first_rule_matches_every_packet_is_decided_by_its_entry() {
        let gnp = |rules: &str| {
            format!("---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  selector: role == 'pub'\n  ingress:\n{rules}")
        };
        // No policy: the default deny, whatever the packet.
        assert_eq!(decided_ingress(""), Some(action::DENY));
        assert_eq!(
            decided_ingress(&gnp("  - action: Allow\n")),
            Some(action::ALLOW)
        );
        // A first rule that matches some packets only, or decides nothing,
        // leaves the search to the program.
        for first in [
            "  - action: Allow\n    protocol: TCP\n",
            "  - action: Allow\n    source: {nets: [0.0.0.0/0]}\n",
            "  - action: Allow\n    destination: {ports: [80]}\n    protocol: UDP\n",
            "  - action: Log\n",
            "  - action: Pass\n",
        ] {
            let rules = format!("{first}  - action: Deny\n");
            assert_eq!(decided_ingress(&gnp(&rules)), None, "{first}");
        }
        // Every IPv4 and every IPv6 source: every packet.
        let any = "  - action: Deny\n    source: {nets: [0.0.0.0/0, ::/0]}\n  - action: Allow\n";
        assert_eq!(decided_ingress(&gnp(any)), Some(action::DENY));
    }

    #[test]
    fn the_capacity_check_names_the_limit_a_table_exceeds() {
        assert!(check_capacity(&compiled(100)).is_ok());
        let err = check_capacity(&compiled(MAX_RULES as usize + 1)).expect_err("too many");
        assert!(
            err.to_string().contains(&format!(
                "the kernel tables hold {MAX_RULES} per stage and direction"
            )),
            "{err}"
        );
    }

    #[test]
    fn a_plan_places_each_generation_in_its_own_ranges() {
        let c = compiled(200);
        let ifaces: Interfaces = [("eth1".to_string(), 7)].into();
        for generation in 0..GENERATIONS {
            let plan = Plan::new(&c, &ifaces, generation, Room::MAX, None).expect("fits");
            let per_gen = Room::MAX.heads;
            let base = generation * per_gen;
            for i in 0..c.classes.len() as u32 {
                let k = plan.class(i);
                assert!((base..base + per_gen).contains(&k), "{k}");
            }
            // The bound interface got its endpoint class in every table
            // that has rules for it.
            assert!(plan
                .masks
                .values()
                .any(|eps| eps.iter().any(|&(i, _, _)| i == 7)));
            assert_eq!(plan.first_slots.len(), c.tables.len());
            assert!(plan
                .first_slots
                .iter()
                .all(|&s| s >= generation * RULE_SLOTS_PER_GEN));
        }
    }

    #[test]
    fn a_plan_takes_the_class_layout_over_where_the_classes_are_the_same() {
        let ifaces: Interfaces = [("eth1".to_string(), 7)].into();
        let c = compiled(200);
        let first = Plan::new(&c, &ifaces, 1, Room::MAX, None).expect("fits");
        let held = Contents::new(1, &c, &first, None);
        // A clone shares its sets, as a compile that took them over does.
        let again = Plan::new(&c.clone(), &ifaces, 1, Room::MAX, Some(&held)).expect("fits");
        assert!(Arc::ptr_eq(&first.base, &again.base));
        // The other generation's words are elsewhere.
        let other = Plan::new(&c, &ifaces, 0, Room::MAX, Some(&held)).expect("fits");
        assert!(!Arc::ptr_eq(&first.base, &other.base));
        // Other classes are laid out anew, each compiler class in its place.
        let d = compiled(201);
        assert_ne!(c.classes, d.classes);
        let anew = Plan::new(&d, &ifaces, 1, Room::MAX, Some(&held)).expect("fits");
        assert!(!Arc::ptr_eq(&first.base, &anew.base));
        assert_eq!(anew.base.layout.heads.len(), d.classes.len());
    }

    #[test]
    fn hints_spare_exactly_the_lookups_a_table_does_not_need() {
        let ifaces: Interfaces = [("eth1".to_string(), 7)].into();
        let normal_ingress = |c: &Compiled| {
            c.tables
                .iter()
                .find(|t| {
                    t.stage == filter_common::stage::NORMAL
                        && t.direction == filter_common::direction::INGRESS
                })
                .expect("a normal ingress table")
                .clone()
        };
        // Single TCP ports, no nets: the port hash, nothing else.
        let c = compiled(200);
        let plan = Plan::new(&c, &ifaces, 1, Room::MAX, None).expect("fits");
        let t = normal_ingress(&c);
        let h = hints(&t, &plan);
        assert_eq!(h.exact, 1 << field::DPORT, "{h:?}");
        let root = |entries: &[(Prefix, u32)]| {
            let (p, class) = entries[0];
            assert_eq!((entries.len(), p.len), (1, 0), "{entries:?}");
            plan.class(class) + 1
        };
        assert_eq!(h.fallback[field::SRC4], root(&t.src_v4));
        assert_eq!(h.fallback[field::DST6], root(&t.dst_v6));
        let any = |entries: &[PortEntry]| {
            assert!(entries.iter().all(|e| e.proto.is_some() || e.port_len == 0));
            let any: Vec<&PortEntry> = entries.iter().filter(|e| e.proto.is_none()).collect();
            plan.class(any[0].class) + 1
        };
        assert_eq!(h.fallback[field::SPORT], any(&t.sports));
        // The TCP port entries other than single ports (the protocol's
        // packets without ports, say) leave the trie to ask.
        let ranges = t.dports.iter().filter(|e| !is_single_port(e)).count();
        assert_eq!(h.fallback[field::DPORT] != 0, ranges == 1, "{:?}", t.dports);

        // A host address and a /24: the hash first, then the trie.
        let yaml = "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: w, labels: {role: pub}}\nspec: {node: n1, interfaceName: eth1}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  selector: role == 'pub'\n  types: [Ingress]\n  ingress:\n  - action: Allow\n    protocol: TCP\n    source: {nets: [192.0.2.1/32, 198.51.100.0/24]}\n    destination: {ports: ['8000:8080']}\n";
        let mut store = Store::default();
        let mut errors = Vec::new();
        store.add_text(Path::new("t.yaml"), yaml, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let node = Node {
            name: "n1".into(),
            ..Default::default()
        };
        let c = crate::compile::compile(&store, &node).expect("compiles");
        let plan = Plan::new(&c, &ifaces, 0, Room::MAX, None).expect("fits");
        let h = hints(&normal_ingress(&c), &plan);
        // (8000:8080 ends in the single port 8080.)
        assert_eq!(h.exact, 1 << field::SRC4 | 1 << field::DPORT, "{h:?}");
        assert_eq!(h.fallback[field::SRC4], 0, "the /24 is in the trie");
        assert_eq!(h.fallback[field::DPORT], 0, "a range is in the trie");
        assert_ne!(h.fallback[field::DST4], 0, "no destination nets");
    }

    #[test]
    fn failsafe_port_bits_name_list_protocol_and_family() {
        use crate::compile::failsafe::Failsafe;
        let entry = |inbound, proto, net: Option<&str>| Failsafe {
            inbound,
            proto,
            port: 22,
            net: net.map(|n| n.parse().expect("net")),
        };
        let all: Vec<u8> = [
            entry(true, 6, Some("10.0.0.0/8")),
            entry(true, 6, Some("2001:db8::/32")),
            entry(true, 17, Some("10.0.0.0/8")),
            entry(false, 6, Some("10.0.0.0/8")),
        ]
        .iter()
        .map(failsafe_bits)
        .collect();
        for (i, a) in all.iter().enumerate() {
            assert_eq!(a.count_ones(), 1);
            assert!(all[i + 1..].iter().all(|b| a & b == 0), "{all:?}");
        }
        assert_eq!(failsafe_bits(&entry(true, 6, None)), all[0] | all[1]);
    }
}
