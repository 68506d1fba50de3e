//! Log records: for each packet a `Log` rule matches (and, with
//! `--log-denied`, each one a rule drops), a fixed-size record with the
//! packet's first bytes goes into the `FW_EVENTS2` ring buffer for the
//! agent, which prints the kernel's LOG line for it.
//!
//! The classifier notes the Log rules a stage matched in a per-CPU scratch
//! entry (its search runs in a `bpf_loop` callback, without the packet).
//! As a program ends with records pending it stores its verdict there and
//! tail-calls a logger program (`fw_xdp_log`, `fw_tc_log`) that writes the
//! records and returns the verdict: the verifier checks the writing once,
//! in the logger, not on every path of the pipeline. A packet that matches
//! no Log rule costs nothing here: the classifier says whether it noted
//! any (as a number the pipeline ORs up, not a branch), and the frame
//! remembers it. If the tail call fails the records are lost, counted.
//!
//! Each rule has a token bucket (GCRA: one timestamp per rule, the time
//! its bucket is full again), so a flood writes at most the configured
//! rate and burst per rule; what the bucket leaves out and what the ring
//! has no room for are counted per rule. A reader that is slow or stopped
//! costs the dataplane nothing but lost records. Buckets are updated
//! without a lock: two CPUs logging the same rule at the same moment may
//! let one record more through.

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray, ProgramArray, RingBuf},
    EbpfContext,
};
use filter_common::events::{
    kind, verdict, Config, Counter, Record, CAPTURE, DEFAULT_RING_BYTES, MAX_NOTED, NO_RULE, SLOTS,
};

#[map(name = "FW_EVENTS2")]
static FW_EVENTS2: RingBuf = RingBuf::pinned(DEFAULT_RING_BYTES, 0);

#[map(name = "FW_LOGCFG1")]
static FW_LOGCFG1: Array<Config> = Array::pinned(1, 0);

#[map(name = "FW_LOGTB1")]
static FW_LOGTB1: Array<u64> = Array::pinned(SLOTS, 0);

#[map(name = "FW_LOGCTR1")]
static FW_LOGCTR1: PerCpuArray<Counter> = PerCpuArray::pinned(SLOTS, 0);

const CAPTURE_MASK: u32 = CAPTURE as u32 - 1;
const _: () = assert!(CAPTURE.is_power_of_two());

/// Records to write for the packet under way: the Log rules its stages
/// matched and, with `--log-denied`, the drop.
#[derive(Clone, Copy)]
pub struct Pending {
    /// Entries in use.
    n: u32,
    /// The verdict the logger returns.
    verdict: u32,
    /// Where the packet is.
    origin: Origin,
    entries: [Entry; MAX_NOTED],
}

#[derive(Clone, Copy)]
struct Entry {
    slot: u32,
    stage: u8,
    direction: u8,
    outcome: u8,
    kind: u8,
}

/// Scratch: per CPU, one packet at a time. Pinned, so that every loaded
/// object shares it: the logger in the tail-call slot may be another
/// object's than the program that filled it (an agent that takes over, or
/// that swaps its programs for ones with larger class arrays, puts its
/// loggers in the slots before its programs take over the links), and it
/// returns the verdict written here.
#[map(name = "FW_PENDING1")]
static FW_PENDING: PerCpuArray<Pending> = PerCpuArray::pinned(1, 0);

/// The XDP logger, at [`LOGGER`]; filled by the agent. A program array
/// holds programs of one type: XDP and TC have one each.
#[map(name = "FW_TAILX1")]
static FW_TAILX1: ProgramArray = ProgramArray::pinned(1, 0);

/// The TC logger, likewise.
#[map(name = "FW_TAILT1")]
static FW_TAILT1: ProgramArray = ProgramArray::pinned(1, 0);

use filter_common::events::LOGGER;

/// A program context and the program array of its logger.
pub trait Hook: EbpfContext {
    fn loggers() -> &'static ProgramArray;
}

impl Hook for aya_ebpf::programs::XdpContext {
    #[inline(always)]
    fn loggers() -> &'static ProgramArray {
        &FW_TAILX1
    }
}

impl Hook for aya_ebpf::programs::TcContext {
    #[inline(always)]
    fn loggers() -> &'static ProgramArray {
        &FW_TAILT1
    }
}

/// Where a packet is, for its records.
#[derive(Clone, Copy)]
pub struct Origin {
    /// `filter_common::events::hook`.
    pub hook: u8,
    pub in_ifindex: u32,
    pub out_ifindex: u32,
    /// The packet's length from the link-layer header.
    pub len: u32,
}

/// A logger's context: the packet's first bytes can be copied out of it
/// (`crate::parse` implements it: the raw access stays there).
pub trait Frame {
    /// Copies the packet's first `len` bytes (1..=CAPTURE) to `dst`.
    fn copy_to(&self, dst: *mut u8, len: u32) -> bool;
    /// The VLAN tag the kernel took out of the frame (protocol, TCI), or
    /// (0, 0).
    fn vlan(&self) -> (u16, u16);
}

#[inline(always)]
fn pending() -> Option<&'static mut Pending> {
    let p = FW_PENDING.get_ptr_mut(0)?;
    // SAFETY: a per-CPU array entry, valid and written only by this CPU
    // while the program runs (one packet at a time).
    Some(unsafe { &mut *p })
}

/// Called by the classifier (in its `bpf_loop` search, without the
/// packet) for each Log rule it meets. A Log rule decides nothing: its
/// record's verdict is `NONE`. A call of its own: inlined, its locals
/// would grow the search callback's frame, on the deepest call chain.
#[inline(never)]
pub fn note(slot: u32, scan_word: u32) {
    use crate::classify::{DIRECTION_SHIFT, STAGE_SHIFT};
    push(Entry {
        slot,
        stage: ((scan_word >> STAGE_SHIFT) & 0xff) as u8,
        direction: ((scan_word >> DIRECTION_SHIFT) & 0xff) as u8,
        outcome: verdict::NONE,
        kind: kind::LOG,
    });
}

/// Adds a record to the packet's pending ones; past [`MAX_NOTED`] it is
/// counted lost.
#[inline(always)]
fn push(e: Entry) {
    let Some(p) = pending() else {
        return;
    };
    let i = p.n as usize;
    if i < MAX_NOTED {
        p.entries[i] = e;
        p.n += 1;
    } else {
        count(e.slot, |c| c.lost += 1);
    }
}

/// With `--log-denied`: a record for the packet `slot` dropped. The
/// setting is read here, inlined: without it, as by default, a drop pays
/// no call.
#[inline(always)]
pub fn denied(pkt: &crate::parse::Packet, slot: u32, stage: u32, direction: u32) {
    if FW_LOGCFG1.get(0).is_some_and(|c| c.log_denied != 0) {
        push_denied(pkt, slot, stage, direction);
    }
}

/// [`denied`]'s record: a call of its own, to keep its locals out of the
/// program's frame.
#[inline(never)]
fn push_denied(pkt: &crate::parse::Packet, slot: u32, stage: u32, direction: u32) {
    pkt.add_log_pending(1);
    push(Entry {
        slot,
        stage: stage as u8,
        direction: direction as u8,
        outcome: verdict::DENY,
        kind: kind::DENIED,
    });
}

/// Ends a program with records pending: hands them and `verdict` to the
/// logger (which returns `verdict` itself); if the tail call fails (no
/// logger) the records are counted lost and `verdict` is returned.
#[inline(never)]
pub fn finish<C: Hook>(ctx: &C, hook_in: u64, out_len: u64, verdict: u32) -> u32 {
    // Packed in pairs: a BPF call takes five arguments at most.
    let (hook, in_ifindex) = ((hook_in >> 32) as u8, hook_in as u32);
    let (out_ifindex, len) = ((out_len >> 32) as u32, out_len as u32);
    let Some(p) = pending() else {
        return verdict;
    };
    p.verdict = verdict;
    // Field by field, straight into the scratch entry: an `Origin` built
    // first would take stack the classifier's call chain needs.
    p.origin.hook = hook;
    p.origin.in_ifindex = in_ifindex;
    p.origin.out_ifindex = out_ifindex;
    p.origin.len = len;
    // SAFETY: `ctx` is the program's own context; on success control does
    // not come back.
    unsafe { C::loggers().tail_call(ctx, LOGGER) };
    let n = p.n;
    p.n = 0;
    crate::diag::logger_missing(n);
    for i in 0..MAX_NOTED {
        if (i as u32) < n {
            count(p.entries[i].slot, |c| c.lost += 1);
        }
    }
    verdict
}

/// The logger's work: writes the records pending on this CPU for the
/// packet of `frame` and returns the verdict its program left.
#[inline(always)]
pub fn log_pending<F: Frame>(frame: &F) -> u32 {
    let Some(p) = pending() else {
        return 0;
    };
    let n = p.n;
    p.n = 0;
    for i in 0..MAX_NOTED {
        if (i as u32) < n {
            let e = p.entries[i];
            write(frame, &e, &p.origin);
        }
    }
    p.verdict
}

/// One record, if the rule's bucket and the ring have room.
#[inline(always)]
fn write<F: Frame>(frame: &F, e: &Entry, origin: &Origin) {
    let slot = if e.slot < NO_RULE { e.slot } else { NO_RULE };
    if !admit(slot) {
        count(slot, |c| c.limited += 1);
        return;
    }
    let Some(mut entry) = FW_EVENTS2.reserve::<Record>(0) else {
        count(slot, |c| c.lost += 1);
        return;
    };
    let mut len = origin.len;
    if len > CAPTURE as u32 {
        len = CAPTURE as u32;
    }
    let r = entry.as_mut_ptr();
    // SAFETY: `r` points at the reserved record, ours until submitted;
    // fields are written one by one (never read before written).
    let copied = unsafe {
        (*r).time_ns = now();
        (*r).in_ifindex = origin.in_ifindex;
        (*r).out_ifindex = origin.out_ifindex;
        (*r).slot = slot;
        (*r).packet_len = origin.len;
        (*r).hook = origin.hook;
        (*r).stage = e.stage;
        (*r).direction = e.direction;
        (*r).verdict = e.outcome;
        (*r).kind = e.kind;
        (*r)._pad = 0;
        let (proto, tci) = frame.vlan();
        (*r).vlan_proto = proto;
        (*r).vlan_tci = tci;
        (*r)._pad2 = 0;
        // The verifier needs 1..=CAPTURE in the register it checks, not
        // just on the branch that led here.
        len > 0 && frame.copy_to((*r).data.as_mut_ptr(), ((len - 1) & CAPTURE_MASK) + 1)
    };
    // SAFETY: as above.
    unsafe { (*r).captured = if copied { len as u16 } else { 0 } };
    entry.submit(0);
    count(slot, |c| c.emitted += 1);
}

/// The rule's token bucket (GCRA): admits a record if the time the bucket
/// is full again is no more than the burst ahead of now.
#[inline(always)]
fn admit(slot: u32) -> bool {
    let Some(cfg) = FW_LOGCFG1.get(0) else {
        return true;
    };
    if cfg.interval_ns == 0 {
        return true;
    }
    let Some(tat) = FW_LOGTB1.get_ptr_mut(slot) else {
        return false;
    };
    let now = now();
    // SAFETY: an entry of an array map; concurrent writers only make the
    // limit approximate (module comment).
    unsafe {
        let next = if *tat > now { *tat } else { now } + cfg.interval_ns;
        // `burst` records fit from an idle bucket, then one per interval.
        if next - now > cfg.burst_ns {
            return false;
        }
        *tat = next;
    }
    true
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}

#[inline(always)]
fn count(slot: u32, f: impl FnOnce(&mut Counter)) {
    if let Some(c) = FW_LOGCTR1.get_ptr_mut(slot) {
        // SAFETY: a per-CPU entry, written only by this CPU meanwhile.
        f(unsafe { &mut *c });
    }
}
