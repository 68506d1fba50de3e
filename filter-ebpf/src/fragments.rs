//! Fragments: a non-first fragment carries no L4 header, so no rule can
//! judge it on ports. It follows the verdict its first fragment got at the
//! same hook, or is dropped (as Cilium does).
//!
//! In: a parsed packet. A hook calls [`remember`] when it passes a first
//! fragment and [`first_passed`] for a later one. Out of order arrivals
//! (a later fragment before its first) are dropped; the sender's
//! retransmission recovers, as it does behind Cilium. An attacker cannot
//! use this to reach a denied port: the kernel reassembles only with a
//! first fragment, which policy judged, and discards overlapping fragments
//! (and we drop the TCP fragment at offset 8 that could rewrite flags).

use aya_ebpf::{macros::map, maps::LruHashMap};
use filter_common::{FragKey, FRAGMENT_TIMEOUT_NS, MAX_FRAGMENTS};

use crate::{conntrack::now, parse::Packet};

#[map(name = "FW_FRAG1")]
static FW_FRAG1: LruHashMap<FragKey, u64> = LruHashMap::pinned(MAX_FRAGMENTS, 0);

#[inline(always)]
fn key(hook: u32, pkt: &Packet) -> FragKey {
    FragKey {
        family: pkt.family.code(),
        hook: hook as u8 + 1,
        pad: [0; 2],
        id: pkt.frag_id,
        src: pkt.src,
        dst: pkt.dst,
    }
}

/// Records that `hook` (a `parse::slot`) passed `pkt`, if it is a first
/// fragment. The test is inlined: a call per passed packet to learn that
/// it is no fragment cost about 9 ns (`fw-bench`).
#[inline(always)]
pub fn remember(hook: u32, pkt: &Packet) {
    if pkt.first_fragment {
        record_first(hook, pkt);
    }
}

/// [`remember`] for a first fragment: a function of its own, whose key
/// lives in its own stack frame.
#[inline(never)]
fn record_first(hook: u32, pkt: &Packet) {
    // A full LRU evicts the oldest datagram: its later fragments are
    // dropped, which is safe. A refused insert drops this one's.
    if let Err(e) = FW_FRAG1.insert(&key(hook, pkt), &now(), 0) {
        crate::diag::fragment_insert_failed(e);
    }
}

/// Whether the first fragment of the datagram `pkt` (a non-first fragment)
/// belongs to was passed by `hook` within the reassembly timeout.
#[inline(never)]
pub fn first_passed(hook: u32, pkt: &Packet) -> bool {
    // SAFETY: the value is a plain integer; a racing update leaves either
    // version, both valid.
    match unsafe { FW_FRAG1.get(&key(hook, pkt)) } {
        Some(t) => now().wrapping_sub(*t) <= FRAGMENT_TIMEOUT_NS,
        None => false,
    }
}
