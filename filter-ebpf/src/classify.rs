//! The classifier: a packet and a table → the first rule that matches.
//!
//! In: a parsed [`Packet`], the stage, direction and interface. Out: the
//! deciding rule's action and slot, or no verdict. One lookup per field
//! gives a class (an exact hash, else an LPM trie, or neither when the
//! table's hints, `TableHints`, know the field's class already); each
//! class names a bitmap of the rules that field allows; the first bit of
//! `endpoint & src & dst & dport & sport` is the rule that decides
//! (docs/design.md, "The classifier"). Classes are stored sparse, with a
//! summary of their non-zero words; the scan ANDs the summaries and visits
//! only the words where all five have rules. It starts at the highest of
//! the five classes' lowest rules (no rule below it can be in all five),
//! and where that rule is in all five and allows or denies, it decides
//! without the scan: the usual case of a rule that names one field's
//! values (a deny list) or several fields no earlier rule shares. The cost
//! does not depend on the number of CIDRs, and grows with rules only by
//! the summary words and the candidate words that turn out empty.
//!
//! Invariant kept by the agent: every table it publishes has a `/0` entry in
//! each address trie and an any-protocol entry in the port trie, so a lookup
//! that misses means an unpublished table, reported as
//! `reason::PASS_TABLE_ERROR`.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray},
};
use filter_common::{
    action, direction, endpoint_slot, field, hosts4, reason, stage, summary_table, table_bit,
    table_id, AddrV4Key, AddrV6Key, ClassHead, EndpointKey, EndpointSlot, EndpointValue, PortKey,
    RuleMeta, TableHints, GENERATIONS, MAX_CLASSES, MAX_CLASS_WORDS, MAX_ENDPOINT_ENTRIES,
    MAX_ENDPOINT_SLOTS, MAX_HOPS, MAX_PORT_ENTRIES, MAX_RULE_SLOTS, MAX_TABLES, MAX_TRIE_ENTRIES,
    PORT_KEY_FULL_BITS, SUMMARY_WORDS, TABLE_PREFIX_BITS, WORDS,
};

use crate::parse::{Family, Packet, IPPROTO_ICMP, IPPROTO_ICMPV6};

#[map(name = "FW_GEN1")]
static FW_GEN1: Array<u32> = Array::pinned(1, 0);

#[map(name = "FW_SRC4_1")]
static FW_SRC4_1: LpmTrie<AddrV4Key, u32> = LpmTrie::pinned(MAX_TRIE_ENTRIES, 0);

#[map(name = "FW_DST4_1")]
static FW_DST4_1: LpmTrie<AddrV4Key, u32> = LpmTrie::pinned(MAX_TRIE_ENTRIES, 0);

#[map(name = "FW_SRC6_1")]
static FW_SRC6_1: LpmTrie<AddrV6Key, u32> = LpmTrie::pinned(MAX_TRIE_ENTRIES, 0);

#[map(name = "FW_DST6_1")]
static FW_DST6_1: LpmTrie<AddrV6Key, u32> = LpmTrie::pinned(MAX_TRIE_ENTRIES, 0);

/// The IPv4 host addresses (/32s) of each address trie's tables, exact
/// (`filter_common::hosts4`): one bucket, a cache line, read instead of a
/// walk down a trie that would hold them all (a policy's CIDR lists are
/// mostly single addresses). An exact hit is the longest prefix there is;
/// a miss asks the trie, which holds the rest. Sized by the agent at load
/// (`max_entries`, and the mask globals below); this size is the largest.
#[map(name = "FW_SRC4H1")]
static FW_SRC4H1: Array<hosts4::Bucket> = Array::pinned(MAX_HOST4_BUCKETS, BPF_F_MMAPABLE);

#[map(name = "FW_DST4H1")]
static FW_DST4H1: Array<hosts4::Bucket> = Array::pinned(MAX_HOST4_BUCKETS, BPF_F_MMAPABLE);

/// Buckets − 1 of `FW_SRC4H1` and `FW_DST4H1` (`hosts4::MASK_GLOBALS`):
/// read-only data the loader sets with the maps' size.
#[unsafe(no_mangle)]
static FW_SRC4H_MASK: aya_ebpf::Global<u32> = aya_ebpf::Global::new(0);
#[unsafe(no_mangle)]
static FW_DST4H_MASK: aya_ebpf::Global<u32> = aya_ebpf::Global::new(0);

/// The largest IPv4 host tables: `MAX_TRIE_ENTRIES` entries of each
/// generation.
const MAX_HOST4_BUCKETS: u32 = hosts4::buckets(MAX_TRIE_ENTRIES * GENERATIONS);

const BPF_F_MMAPABLE: u32 = aya_ebpf::bindings::BPF_F_MMAPABLE;

/// The IPv6 host addresses (/128s), exact, in hashes keyed by the trie's
/// own key (prefix length included), so one key on the stack serves both
/// lookups.
///
/// Preallocated: a full reload deletes and inserts every host of a
/// generation, and with elements allocated as they came that took twice
/// as long (the kernel's allocator, its frees deferred to irq work). A
/// deleted element is reused at once, which a lookup tolerates (the
/// buckets' nulls markers restart a walk that strayed) and which reuses
/// only the inactive generation's entries, read by no packet after the
/// grace. Everything is allocated up front, so the agent sizes these to
/// the policy (it sets `max_entries` at load; this size is the largest).
#[map(name = "FW_SRC6X2")]
static FW_SRC6X2: HashMap<Key<AddrV6Key>, u32> = HashMap::pinned(MAX_TRIE_ENTRIES, 0);

#[map(name = "FW_DST6X2")]
static FW_DST6X2: HashMap<Key<AddrV6Key>, u32> = HashMap::pinned(MAX_TRIE_ENTRIES, 0);

const BPF_F_NO_PREALLOC: u32 = aya_ebpf::bindings::BPF_F_NO_PREALLOC;

/// Per table, the lookups it does not need (`TableHints`): written with the
/// table, before its generation goes live.
#[map(name = "FW_TABLE1")]
static FW_TABLE1: Array<TableHints> = Array::pinned(MAX_TABLES, 0);

/// The class of the value in `key` (field `f` of `table`): its exact
/// entry (`exact`: host addresses, single ports) if the table has any,
/// else the catch-all's class if the table has no other prefix, else the
/// trie's longest prefix.
#[inline(always)]
fn class_of<K>(
    exact: impl FnOnce() -> Option<u32>,
    trie: &LpmTrie<K, u32>,
    key: &Key<K>,
    table: u32,
    f: usize,
) -> u32 {
    if hints(table).is_none_or(|h| h.exact & (1 << f) != 0) {
        if let Some(class) = exact() {
            return class;
        }
    }
    field_class(trie, key, table, f)
}

/// The class of `key`'s entry in an exact hash, if it has one.
#[inline(always)]
fn exact_class<K>(map: &HashMap<Key<K>, u32>, key: &Key<K>) -> Option<u32> {
    // SAFETY: a plain integer in a live map entry, copied at once.
    map.get_ptr(key).map(|v| unsafe { *v })
}

/// The class of `addr`'s exact entry for `table` in a `hosts4` table of
/// `mask + 1` buckets, if it has one.
#[inline(always)]
fn host4_class(map: &Array<hosts4::Bucket>, mask: u32, table: u32, addr: [u8; 4]) -> Option<u32> {
    hosts4::lookup(|b| map.get(b), mask, hosts4::key(table, addr))
}

/// The class of field `f` from its trie, unless `table`'s hints know it;
/// [`NO_CLASS`] when the trie has no entry (a broken table).
#[inline(always)]
fn field_class<K>(trie: &LpmTrie<K, u32>, key: &Key<K>, table: u32, f: usize) -> u32 {
    match hints(table).map_or(0, |h| h.fallback[f]) {
        0 => trie.get(key).copied().unwrap_or(NO_CLASS),
        known => known - 1,
    }
}

/// A lookup that found no class. A number, not an `Option`: LLVM stores a
/// `None`'s undefined payload from whatever register it likes, which the
/// verifier refuses to read.
const NO_CLASS: u32 = u32::MAX;

/// `table`'s hints. Asked anew for each field: an array lookup is inlined
/// (no helper call), and a pointer kept across the lookups between would
/// take stack on the deepest call chain.
#[inline(always)]
fn hints(table: u32) -> Option<&'static TableHints> {
    if crate::skipped(filter_common::bench_skip::HINTS) {
        return None;
    }
    FW_TABLE1.get(table)
}

#[map(name = "FW_PORT1")]
static FW_PORT1: LpmTrie<PortKey, u32> = LpmTrie::pinned(MAX_TRIE_ENTRIES, 0);

/// The single ports (`PORT_KEY_FULL_BITS`) of the port tries' tables,
/// exact, as for addresses: most rules name ports one by one. Sized to the
/// policy by the agent, as the host-address hashes are.
#[map(name = "FW_PORTX1")]
static FW_PORTX1: HashMap<Key<PortKey>, u32> = HashMap::pinned(MAX_PORT_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "FW_SPORTX1")]
static FW_SPORTX1: HashMap<Key<PortKey>, u32> =
    HashMap::pinned(MAX_PORT_ENTRIES, BPF_F_NO_PREALLOC);

/// Class heads and their words: arrays, allocated whole, so the agent
/// sizes them to the policy at load (these sizes are the largest) and
/// places each generation's classes and words in them.
#[map(name = "FW_CLASS2")]
static FW_CLASS2: Array<ClassHead> = Array::pinned(MAX_CLASSES, 0);

#[map(name = "FW_WORD1")]
static FW_WORD1: Array<u64> = Array::pinned(MAX_CLASS_WORDS, 0);

#[map(name = "FW_EP3")]
static FW_EP3: HashMap<EndpointKey, EndpointValue> = HashMap::pinned(MAX_ENDPOINT_ENTRIES, 0);

/// `FW_EP3`'s entries of interfaces with small indexes, where an inlined
/// array lookup finds them (`filter_common::endpoint_slot`).
#[map(name = "FW_EPA1")]
static FW_EPA1: Array<EndpointSlot> = Array::pinned(MAX_ENDPOINT_SLOTS, 0);

/// The endpoint entry of `key`: from the array where the interface's index
/// is small, else from the hash.
#[inline(always)]
fn endpoint(key: &EndpointKey) -> Option<EndpointValue> {
    match endpoint_slot(key) {
        Some(i) => FW_EPA1.get(i).and_then(EndpointSlot::value),
        // SAFETY: values of FW_EP3 are only written by the agent into the
        // inactive generation, and copied out here at once.
        None => unsafe { FW_EP3.get(key) }.copied(),
    }
}

#[map(name = "FW_SPORT1")]
static FW_SPORT1: LpmTrie<PortKey, u32> = LpmTrie::pinned(MAX_TRIE_ENTRIES, 0);

#[map(name = "FW_RULE3")]
static FW_RULE3: Array<RuleMeta> = Array::pinned(MAX_RULE_SLOTS, 0);

/// The rule that decided a packet.
#[derive(Clone, Copy)]
pub struct Decision {
    /// One of `filter_common::action`.
    pub action: u32,
    /// Index into `FW_RULE3` / `FW_RULE_CTR2`.
    pub slot: u32,
}

/// Outcome of one stage: a decision, or a reason there is none.
pub type StageResult = Result<Decision, u32>;

/// Runs `stage` in `direction` for `pkt` arriving on or leaving by `ifindex`.
/// `Err` carries the `reason` when no rule decided. The number is 1 when a
/// Log rule matched on the way (`crate::events` has its slot), else 0: a
/// number, not a branch, so the paths after a stage stay one for the
/// verifier.
#[inline(always)]
pub fn classify(stage: u32, direction: u32, ifindex: u32, pkt: &Packet) -> (StageResult, u32) {
    let packed = fw_classify(stage, direction, ifindex, pkt.slot);
    let logged = (packed >> 63) as u32;
    let packed = packed & !LOGGED;
    let (tag, value) = ((packed >> 32) as u32, packed as u32);
    let result = match tag {
        action::ALLOW | action::DENY => Ok(Decision {
            action: tag,
            slot: value,
        }),
        _ => Err(value),
    };
    (result, logged)
}

/// Bit of `fw_classify`'s result: a Log rule matched.
const LOGGED: u64 = 1 << 63;

/// [`classify`] as one global BPF function: the verifier checks it once
/// per program, not again on each path into each stage that calls it (the
/// TC programs run several stages, each reached on many paths; checked
/// per call site, `fw_tc_in` is past the verifier's 1M-instruction
/// budget). A global function takes scalars only, so the packet is named
/// by its scratch slot. Its frame is also shared, not one per stage
/// inlined. Returns `action << 32 | slot` for a decision, else `reason`
/// (BPF functions return one register).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn fw_classify(stage: u32, direction: u32, ifindex: u32, packet: u32) -> u64 {
    match crate::parse::scratch(packet) {
        Some(pkt) => classify_inline(stage, direction, ifindex, pkt),
        None => reason::PASS_TABLE_ERROR as u64,
    }
}

/// The search, packed as [`fw_classify`] returns it (built in place: a
/// result assembled from parts takes stack on the deepest call chain).
#[inline(always)]
fn classify_inline(stage: u32, direction: u32, ifindex: u32, pkt: &Packet) -> u64 {
    let generation = match FW_GEN1.get(0) {
        Some(g) if *g < GENERATIONS => *g,
        _ => return reason::PASS_TABLE_ERROR as u64,
    };
    let table = table_id(generation, stage, direction);
    let ep = match endpoint(&EndpointKey { ifindex, table }) {
        Some(v) => v,
        None => return reason::PASS_NO_POLICY as u64,
    };
    // The endpoint's first rule matches every packet: the search would
    // find it whatever the fields hold.
    if let Some(rule) = ep.decided.checked_sub(1) {
        let slot = ep.first_slot + rule;
        return match FW_RULE3.get(slot).map(|m| m.action) {
            Some(a @ (action::ALLOW | action::DENY)) => ((a as u64) << 32) | slot as u64,
            _ => reason::PASS_TABLE_ERROR as u64,
        };
    }
    let table_be = table.to_be_bytes();
    let (src, dst) = match pkt.family {
        Family::V4 => {
            let mut s = [0u8; 4];
            s.copy_from_slice(&pkt.src[..4]);
            let mut d = [0u8; 4];
            d.copy_from_slice(&pkt.dst[..4]);
            let v4 = |addr| {
                Key::new(
                    TABLE_PREFIX_BITS + 32,
                    AddrV4Key {
                        table: table_be,
                        addr,
                    },
                )
            };
            (
                class_of(
                    || host4_class(&FW_SRC4H1, FW_SRC4H_MASK.load(), table, s),
                    &FW_SRC4_1,
                    &v4(s),
                    table,
                    field::SRC4,
                ),
                class_of(
                    || host4_class(&FW_DST4H1, FW_DST4H_MASK.load(), table, d),
                    &FW_DST4_1,
                    &v4(d),
                    table,
                    field::DST4,
                ),
            )
        }
        Family::V6 => {
            let v6 = |addr| {
                Key::new(
                    TABLE_PREFIX_BITS + 128,
                    AddrV6Key {
                        table: table_be,
                        addr,
                    },
                )
            };
            // Each key in a block of its own, so that its stack slot is free
            // before the next: two at once would take stack on the deepest
            // call chain (as temporaries in the call, they were not).
            let src = {
                let k = v6(pkt.src);
                class_of(
                    || exact_class(&FW_SRC6X2, &k),
                    &FW_SRC6_1,
                    &k,
                    table,
                    field::SRC6,
                )
            };
            let dst = {
                let k = v6(pkt.dst);
                class_of(
                    || exact_class(&FW_DST6X2, &k),
                    &FW_DST6_1,
                    &k,
                    table,
                    field::DST6,
                )
            };
            (src, dst)
        }
    };
    let port_key = |known: bool, port: u16| PortKey {
        table: table_be,
        proto: pkt.proto,
        has_ports: known as u8,
        port: if known { port.to_be_bytes() } else { [0; 2] },
    };
    // In blocks, as the IPv6 keys are.
    let dport = {
        let k = Key::new(PORT_KEY_FULL_BITS, port_key(pkt.has_ports, pkt.dport));
        class_of(
            || exact_class(&FW_PORTX1, &k),
            &FW_PORT1,
            &k,
            table,
            field::DPORT,
        )
    };
    // ICMP type and code ride in the destination port; there is no source
    // port, so its source key says "no ports" like a fragment's.
    let icmp = pkt.proto == IPPROTO_ICMP || pkt.proto == IPPROTO_ICMPV6;
    let sport = {
        let k = Key::new(
            PORT_KEY_FULL_BITS,
            port_key(pkt.has_ports && !icmp, pkt.sport),
        );
        class_of(
            || exact_class(&FW_SPORTX1, &k),
            &FW_SPORT1,
            &k,
            table,
            field::SPORT,
        )
    };
    if src == NO_CLASS || dst == NO_CLASS || dport == NO_CLASS || sport == NO_CLASS {
        return reason::PASS_TABLE_ERROR as u64;
    }
    if crate::skipped(filter_common::bench_skip::SCAN) {
        return reason::PASS_NO_VERDICT as u64;
    }
    let classes = [ep.class, src, dst, dport, sport];
    let (start, in_all) = match lower_bound(&classes) {
        Ok(found) => found,
        Err(why) => return why as u64,
    };
    // The first rule that can match is in all five classes: where it
    // allows or denies, it decides without the scan's callbacks (a deny
    // list's source, the last of many rules each with its own port). A Log
    // or Pass rule is left to the scan, which notes it and goes on.
    if in_all {
        let slot = ep.first_slot + start;
        match FW_RULE3.get(slot).map(|m| m.action) {
            Some(a @ (action::ALLOW | action::DENY)) => return ((a as u64) << 32) | slot as u64,
            Some(_) => {}
            None => return reason::PASS_TABLE_ERROR as u64,
        }
    }
    let mut scan = Scan {
        classes,
        first_slot: ep.first_slot,
        start,
        action: (stage << STAGE_SHIFT) | (direction << DIRECTION_SHIFT),
        slot: 0,
        reason: reason::PASS_TOO_MANY_HOPS,
    };
    // Each hop is one bpf_loop iteration: the verifier checks the callback
    // once instead of unrolling MAX_HOPS searches (a prototype measured
    // bpf_loop at ~3 ns an iteration, against ~1.5 for a plain loop).
    // SAFETY: `hop` has the callback signature bpf_loop expects, and the
    // context pointer is to `scan`, which lives on this stack frame for the
    // whole call.
    unsafe {
        aya_ebpf::helpers::bpf_loop(
            MAX_HOPS,
            hop as *mut core::ffi::c_void,
            &mut scan as *mut Scan as *mut core::ffi::c_void,
            0,
        );
    }
    // NOTED is bit 31 of the word, LOGGED bit 63 of the result.
    let flag = ((scan.action & NOTED) as u64) << 32;
    let decided = scan.action & ACTION_MASK;
    flag | match decided {
        action::ALLOW | action::DENY => ((decided as u64) << 32) | scan.slot as u64,
        _ => scan.reason as u64,
    }
}

/// The first rule a search of `classes` need look at: the highest of
/// their lowest rules (`ClassHead::first`), since no rule below a class's
/// lowest is in it, and so in all five; and whether that rule is in all
/// five. Heads that do not know their lowest rule say 0, and the search
/// starts at rule 0. A class whose lowest rule is that rule holds it: its
/// word is not read (a deny list's classes all start at its rule, so it
/// decides without a word read).
#[inline(always)]
fn lower_bound(classes: &[u32; 5]) -> Result<(u32, bool), u32> {
    let mut low = 0;
    for &class in classes {
        low = low.max(head(class)?.first.saturating_sub(1));
    }
    // A 64-bit index, compared and used in the same register (as in
    // `probe_inline`). Past the last summary word (a broken head) the
    // search finds nothing.
    let s = (low / (64 * 64)) as usize;
    if s >= SUMMARY_WORDS {
        return Ok((low, false));
    }
    let b = (low / 64) % 64;
    for &class in classes {
        let h = head(class)?;
        // `first` is 1 + the lowest rule, so 0 (not known) never matches.
        if h.first == low + 1 {
            continue;
        }
        let place = Place {
            summary: h.summary[s],
            offset: h.offset[s],
            dense: (h.dense >> s) & 1 != 0,
        };
        if place.summary & (1 << b) == 0 || word(&place, b)? & (1 << (low % 64)) == 0 {
            return Ok((low, false));
        }
    }
    Ok((low, true))
}

/// Whether `ifindex` is a host endpoint: every endpoint has a normal-stage
/// ingress mask (its profiles and the final drop at least).
#[inline(always)]
pub fn is_endpoint(ifindex: u32) -> bool {
    let tables = tables_of(ifindex);
    tables != TABLES_UNKNOWN && tables & table_bit(stage::NORMAL, direction::INGRESS) != 0
}

/// The tables of the live generation with rules for `ifindex`, as
/// `filter_common::table_bit`s (one lookup: the interface's summary
/// entry; a stage without rules decides nothing); [`TABLES_UNKNOWN`] when
/// the live generation cannot be read.
#[inline(always)]
pub fn tables_of(ifindex: u32) -> u32 {
    let generation = match FW_GEN1.get(0) {
        Some(g) if *g < GENERATIONS => *g,
        _ => return TABLES_UNKNOWN,
    };
    let key = EndpointKey {
        ifindex,
        table: summary_table(generation),
    };
    endpoint(&key).map_or(0, |v| v.class)
}

/// [`tables_of`] without a live generation: every table may have rules
/// (so every stage runs, and reports the broken tables). A number, not an
/// `Option`: see [`NO_CLASS`].
pub const TABLES_UNKNOWN: u32 = u32::MAX;

const STOP: i64 = 1;
const GO_ON: i64 = 0;

/// State of the verdict search across `bpf_loop` iterations.
struct Scan {
    /// The endpoint's class, then the source, destination, destination
    /// port and source port classes: a rule matches when it is in all five.
    classes: [u32; 5],
    /// Rule slot of rule 0 of the table.
    first_slot: u32,
    /// Next rule to look at.
    start: u32,
    /// Allow or Deny once decided, else 0 (under [`ACTION_MASK`]); above
    /// it the stage and direction for the notes of Log rules, and
    /// [`NOTED`] once one matched. One word: this frame is on the deepest
    /// call chain, whose frames together must fit in 512 bytes.
    action: u32,
    slot: u32,
    /// Why there is no verdict, when there is none. Starts as "too many
    /// hops": what is left when every hop met a Log or Pass rule.
    reason: u32,
}

/// `Scan::action`: the action itself.
const ACTION_MASK: u32 = 0xff;
/// `Scan::action`: where the stage is.
pub const STAGE_SHIFT: u32 = 8;
/// `Scan::action`: where the direction is.
pub const DIRECTION_SHIFT: u32 = 16;
/// `Scan::action`: a Log rule matched (noted in `crate::events`).
const NOTED: u32 = 1 << 31;
const _: () = assert!(LOGGED == (NOTED as u64) << 32);

/// One hop: the first matching rule at or after `start`. Allow and Deny
/// end the search; Log and Pass go on at the rule's `next`.
#[inline(never)]
extern "C" fn hop(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop hands back the pointer `classify` passed: a live,
    // exclusive `Scan` on its stack.
    let st = unsafe { &mut *(ctx as *mut Scan) };
    let mut find = Find {
        classes: st.classes,
        start: st.start,
        next_word: st.start / 64,
        rule: NOT_FOUND,
        error: 0,
    };
    // One iteration per candidate word, plus one per summary word skipped.
    // SAFETY: as for `hop`: `probe` is a bpf_loop callback and `find` lives
    // on this frame for the whole call.
    unsafe {
        aya_ebpf::helpers::bpf_loop(
            WORDS + SUMMARY_WORDS as u32,
            probe as *mut core::ffi::c_void,
            &mut find as *mut Find as *mut core::ffi::c_void,
            0,
        );
    }
    if find.error != 0 {
        st.reason = find.error;
        return STOP;
    }
    let rule = find.rule;
    if rule == NOT_FOUND {
        st.reason = reason::PASS_NO_VERDICT;
        return STOP;
    }
    let slot = st.first_slot + rule;
    let Some(meta) = FW_RULE3.get(slot) else {
        st.reason = reason::PASS_TABLE_ERROR;
        return STOP;
    };
    // Both read before any call: a map pointer kept across calls is
    // spilled, and this frame is on the deepest call chain.
    let (what, next) = (meta.action, meta.next);
    // The agent makes `next` point past the rule, so every hop moves on.
    if what != action::ALLOW && what != action::DENY && next <= rule {
        st.reason = reason::PASS_TABLE_ERROR;
        return STOP;
    }
    match what {
        action::ALLOW | action::DENY => {
            st.action = (st.action & !ACTION_MASK) | what;
            st.slot = slot;
            return STOP;
        }
        // Counted, and noted for a record as the program ends.
        action::LOG => {
            crate::counters::count_rule(slot, 0);
            crate::events::note(slot, st.action);
            st.action |= NOTED;
        }
        _ => {}
    }
    st.start = next;
    GO_ON
}

/// `Find::rule` when no rule at or after `start` matches.
const NOT_FOUND: u32 = u32::MAX;

/// State of the search for one matching rule.
struct Find {
    classes: [u32; 5],
    /// The first rule that may match.
    start: u32,
    /// The first bitmap word not yet looked at.
    next_word: u32,
    /// The matching rule, or `NOT_FOUND`.
    rule: u32,
    /// A `reason` when the tables are broken, else 0.
    error: u32,
}

/// The next candidates: the bitmap words from `next_word` on where all five
/// classes have rules (from their summaries, one summary word at a time),
/// ANDed; stops at the first rule found. A callback per few words, not a
/// loop over all of them: each path into the classifier verifies it
/// again, and a loop body the verifier walks 64 times per path is past its
/// budget.
#[inline(never)]
extern "C" fn probe(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop hands back the pointer `hop` passed: a live,
    // exclusive `Find` on its stack.
    let f = unsafe { &mut *(ctx as *mut Find) };
    match probe_inline(f) {
        Ok(Some(rule)) => {
            f.rule = rule;
            STOP
        }
        Ok(None) if f.next_word < WORDS => GO_ON,
        Ok(None) => STOP,
        Err(why) => {
            f.error = why;
            STOP
        }
    }
}

/// [`probe`]: the rule found, or `None` after moving `next_word` on.
#[inline(always)]
fn probe_inline(f: &mut Find) -> Result<Option<u32>, u32> {
    // A 64-bit index, compared and used in the same register: the verifier
    // loses the bound of a 32-bit one across its zero extension.
    let s = (f.next_word / 64) as usize;
    if s >= SUMMARY_WORDS {
        f.next_word = WORDS;
        return Ok(None);
    }
    // What the candidates' words need of each class's head, read once
    // here for all of them: the heads looked up again per word were half
    // the lookups of the worst case.
    let at = FW_AT.get_ptr_mut(0).ok_or(reason::PASS_TABLE_ERROR)?;
    // SAFETY: this CPU's entry, alive while the program runs; written and
    // read within this call, which no other program on this CPU
    // interrupts.
    let at = unsafe { &mut *at };
    let mut c = u64::MAX << (f.next_word % 64);
    for (i, class) in f.classes.into_iter().enumerate() {
        let h = head(class)?;
        c &= h.summary[s];
        at[i] = Place {
            summary: h.summary[s],
            offset: h.offset[s],
            dense: (h.dense >> s) & 1 != 0,
        };
    }
    // Up to `WORDS_PER_PROBE` candidates of this summary word per call:
    // the callback and the summaries' AND are paid once for them (the
    // worst case is a run of candidates whose AND is empty).
    for _ in 0..WORDS_PER_PROBE {
        if c == 0 {
            f.next_word = (s as u32 + 1) * 64;
            return Ok(None);
        }
        let b = lowest_bit(c);
        c &= c - 1;
        let w = s as u32 * 64 + b;
        f.next_word = w + 1;
        let mut hits = u64::MAX;
        for place in at.iter() {
            hits &= word(place, b)?;
        }
        if w == f.start / 64 {
            hits &= u64::MAX << (f.start % 64);
        }
        if hits != 0 {
            return Ok(Some(w * 64 + lowest_bit(hits)));
        }
    }
    Ok(None)
}

/// Where one class's words of the summary word a [`probe`] looks at are.
#[derive(Clone, Copy)]
struct Place {
    /// The class's summary word.
    summary: u64,
    /// Index in `FW_WORD1` of its first stored word.
    offset: u32,
    /// Stored dense (all 64 words) rather than only the non-zero ones.
    dense: bool,
}

/// Per CPU, the five classes' [`Place`]s for one [`probe`] call: on the
/// stack they took the deepest call chain (`fw_xdp`, `fw_classify`,
/// `hop`, `probe`) past the verifier's 512 bytes.
#[map]
static FW_AT: PerCpuArray<[Place; 5]> = PerCpuArray::with_max_entries(1, 0);

/// Candidate words one [`probe`] call may look at. The verifier walks the
/// unrolled body once per candidate and per path into the classifier:
/// more would cost it more than the callbacks they save.
const WORDS_PER_PROBE: usize = 4;

/// Bitmap word `64 * s + b` of a class whose summary word `s` has bit `b`
/// (every candidate word is in all five summaries), `place` being that
/// summary word's.
#[inline(always)]
fn word(place: &Place, b: u32) -> Result<u64, u32> {
    // A dense summary word stores all its 64 words (rank `b`); a sparse one
    // only the non-zero words, where the rank is the number of bits set
    // below. (A branch costs the verifier little here: this runs once per
    // `probe`, not in a loop it must walk word by word.)
    let rank = if place.dense {
        b
    } else {
        popcount(place.summary & ((1 << b) - 1))
    };
    FW_WORD1
        .get(place.offset + rank)
        .copied()
        .ok_or(reason::PASS_TABLE_ERROR)
}

#[inline(always)]
fn head(id: u32) -> Result<&'static ClassHead, u32> {
    // The array lookup checks the bound too; checking here first keeps a
    // corrupt trie value from reading a class of the other generation's
    // range by accident of wrap-around.
    if id >= MAX_CLASSES {
        return Err(reason::PASS_TABLE_ERROR);
    }
    FW_CLASS2.get(id).ok_or(reason::PASS_TABLE_ERROR)
}

/// Set bits of `x`. BPF has no population-count instruction; this is the
/// branch-free SWAR sum, so the verifier sees one path, not one per bit.
#[inline(always)]
fn popcount(x: u64) -> u32 {
    let x = x - ((x >> 1) & 0x5555_5555_5555_5555);
    let x = (x & 0x3333_3333_3333_3333) + ((x >> 2) & 0x3333_3333_3333_3333);
    let x = (x + (x >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (x.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}

/// Index of the lowest set bit of a non-zero word: the bits below it,
/// counted. Branch-free for the same reason as [`popcount`] (LLVM's own
/// count-trailing-zeros expansion wants a lookup table in .rodata).
#[inline(always)]
fn lowest_bit(x: u64) -> u32 {
    popcount(!x & x.wrapping_sub(1))
}
