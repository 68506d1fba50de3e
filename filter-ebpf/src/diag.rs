//! The programs' own diagnostics, for the agent's log through aya-log's
//! ring buffer: what should not happen (tables the classifier finds
//! inconsistent, a map update the kernel refused, a logger missing from
//! its program array) and what it cost.
//!
//! Off by default and off the packet's path: the agent sets
//! `AYA_LOG_LEVEL` (read-only data) when it loads the object. At level off
//! the verifier sees every message's branch is dead and removes it; on,
//! only a packet that has already met one of these errors gets here, and
//! each kind is written at most once a second per CPU, so tables broken
//! under a flood cost one message a second, not one a packet. Each
//! message is a call of its own, off the classifier's call chain (whose
//! stack is at the verifier's limit).
//!
//! aya-log 0.4 ignores the context argument of its macros; these functions
//! are called where no context is at hand, so they pass `()`.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::PerCpuArray};
use aya_log_ebpf::{error, warn};

/// Kinds of message, each with its own once-a-second limit.
const TABLES: u32 = 0;
const CONNTRACK: u32 = 1;
const FRAGMENTS: u32 = 2;
const LOGGER: u32 = 3;
const KINDS: u32 = 4;

/// Per kind: when this CPU last wrote it (ns). Not pinned: a new agent's
/// programs start with their own.
#[map]
static FW_DIAG: PerCpuArray<u64> = PerCpuArray::with_max_entries(KINDS, 0);

const INTERVAL_NS: u64 = 1_000_000_000;

/// Whether a message of `kind` may be written now (and if so, notes it).
#[inline(always)]
fn due(kind: u32) -> bool {
    let Some(last) = FW_DIAG.get_ptr_mut(kind) else {
        return false;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a per-CPU entry, written only by this CPU meanwhile.
    unsafe {
        if *last != 0 && now.wrapping_sub(*last) < INTERVAL_NS {
            return false;
        }
        *last = now;
    }
    true
}

/// The classifier found the tables of `stage` inconsistent (the live
/// generation, a class or a bitmap word out of range): the stage decided
/// nothing for the packet (counted under reason `table_error`).
///
/// A global BPF function (exported, C ABI): the verifier checks it once,
/// not again on each of the many paths through the stages that call it
/// (with the message on, `fw_tc_in` was past the verifier's budget
/// otherwise). The kernel wants a global function to return a scalar: 0.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn fw_diag_tables(stage: u32, direction: u32) -> i32 {
    if due(TABLES) {
        error!(
            (),
            "classifier tables inconsistent in stage {} direction {}: the stage decides nothing (reason table_error)",
            stage,
            direction
        );
    }
    0
}

/// The kernel refused a conntrack entry (an LRU table normally evicts to
/// make room): the flow stays untracked and its next packets are judged
/// again.
#[inline(never)]
pub fn conntrack_insert_failed(err: i32) {
    if due(CONNTRACK) {
        warn!(
            (),
            "conntrack entry not recorded (error {}): the flow's packets are judged again", err
        );
    }
}

/// The kernel refused a fragment table entry: the datagram's later
/// fragments are dropped.
#[inline(never)]
pub fn fragment_insert_failed(err: i32) {
    if due(FRAGMENTS) {
        warn!(
            (),
            "first fragment not recorded (error {}): its later fragments are dropped", err
        );
    }
}

/// The tail call to the Log record writer failed (its program array is
/// empty): `lost` records are lost (counted).
#[inline(never)]
pub fn logger_missing(lost: u32) {
    if due(LOGGER) {
        error!(
            (),
            "no Log record writer in its program array: {} records lost", lost
        );
    }
}
