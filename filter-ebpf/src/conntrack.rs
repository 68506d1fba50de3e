//! Connection tracking: which packets belong to flows policy already
//! allowed (docs/semantics.md 3.4).
//!
//! In: a parsed packet and the time. Out: whether the flow is known
//! (established, a reply, or an ICMP error about it), and the entry kept
//! current. Entries are created only by the programs that allowed a new
//! flow, so an untracked allow leaves none, as Calico's NOTRACK does. The
//! table is an LRU hash keyed by the normalized 5-tuple (filter-common
//! `CtKey`); why our own table rather than the kernel's conntrack is in
//! docs/conntrack.md.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::bpf_ktime_get_coarse_ns,
    macros::map,
    maps::{Array, HashMap, LruHashMap},
};
use filter_common::{ct, proto, CtKey, CtValue};

use crate::parse::{
    Family, Packet, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
};

/// New and not yet assured flows: when full, the least recently used one
/// makes room (its next packet is judged again by policy).
#[map(name = "FW_CT2")]
static FW_CT2: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(ct::DEFAULT_SIZE, 0);

/// Assured flows (`ct::ASSURED`), moved here from `FW_CT2`: a plain hash,
/// so no flood of new flows evicts them; only expiry (the agent's sweeper)
/// removes them. Allocated as used.
#[map(name = "FW_CTA1")]
static FW_CTA1: HashMap<CtKey, CtValue> = HashMap::pinned(ct::DEFAULT_SIZE, BPF_F_NO_PREALLOC);

/// The presence filter: per slot of `CtKey::seen_slot`, the epoch a flow
/// with that slot was last inserted or seen live by the sweeper. A slot
/// no valid epoch marks has no flow in either table, so the lookup of a
/// flow conntrack does not know costs one cache line, not two bucket
/// walks (`filter_common::ct::may_have_flow` says when it is valid).
/// Eight slots to an entry (`CT_SEEN_WORDS`), each written with a byte
/// store, by these programs and by the agent through its mapping of the
/// map (`BPF_F_MMAPABLE`): no writer rewrites another's slot.
#[map(name = "FW_CTSEEN2")]
static FW_CTSEEN2: Array<u64> = Array::pinned(filter_common::CT_SEEN_WORDS, BPF_F_MMAPABLE);

const BPF_F_MMAPABLE: u32 = aya_ebpf::bindings::BPF_F_MMAPABLE;

/// The byte of presence-filter slot `slot` (`CtKey::seen_slot`).
#[inline(always)]
fn seen_byte(slot: u32) -> Option<*mut u8> {
    let word = FW_CTSEEN2.get_ptr_mut(slot / 8)?;
    // Within the entry: `slot % 8` is below its eight bytes.
    Some(word.cast::<u8>().wrapping_add((slot % 8) as usize))
}

/// The filter's control word: current epoch and whether it is enabled.
#[map(name = "FW_CTEPOCH2")]
static FW_CTEPOCH2: Array<u32> = Array::pinned(1, 0);

#[inline(always)]
fn epoch_control() -> u32 {
    FW_CTEPOCH2.get(0).copied().unwrap_or(0)
}

/// The entry of `key` and whether it is in the assured table, which is
/// looked at first (most packets belong to long-lived flows).
#[inline(always)]
fn lookup(key: &CtKey) -> Option<(*mut CtValue, bool)> {
    // SAFETY: a byte of a live array entry, read at once.
    let mark = seen_byte(key.seen_slot()).map_or(1, |b| unsafe { *b });
    if !ct::may_have_flow(mark, epoch_control()) {
        return None;
    }
    if let Some(v) = FW_CTA1.get_ptr_mut(key) {
        return Some((v, true));
    }
    FW_CT2.get_ptr_mut(key).map(|v| (v, false))
}

use filter_common::tcp_flags::{ACK as TCP_ACK, FIN as TCP_FIN, RST as TCP_RST, SYN as TCP_SYN};

/// What conntrack knows about a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// No live entry, or the opener's packets of a flow not yet answered:
    /// policy judges it as a new flow.
    New,
    /// The flow is established, or this is the answer to its opener.
    Established,
    /// An ICMP error about a known flow.
    Related,
}

/// Where a lookup happens: replies to `FORWARD_PENDING` entries count only
/// once the kernel has routed them (TC egress).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Look without recording (XDP, and TC redoing XDP's stages): the TC
    /// programs see the packet next and record it.
    Peek,
    TcIngress,
    TcEgress,
}

/// A flow key and which side of it the packet came from.
struct Flow {
    key: CtKey,
    /// The packet's source is side A.
    from_a: bool,
}

#[inline(always)]
fn flow(family: Family, proto: u8, src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16) -> Flow {
    let mut f = Flow {
        key: CtKey::new(family.code(), proto),
        from_a: false,
    };
    f.from_a = f.key.fill(src, dst, sport, dport);
    f
}

/// The flow of the packet itself.
#[inline(always)]
fn packet_flow(pkt: &Packet) -> Flow {
    let (sport, dport) = match pkt.proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => (pkt.sport, pkt.dport),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => (pkt.echo_id, pkt.echo_id),
        _ => (0, 0),
    };
    flow(pkt.family, pkt.proto, &pkt.src, &pkt.dst, sport, dport)
}

/// Whether the side the flow's side-A-ness `from_a` names has sent on the
/// flow: its opener always, the other side once it answered.
#[inline(always)]
fn has_sent(v: &CtValue, from_a: bool) -> bool {
    from_a == (v.flags & ct::OPENED_BY_A != 0) || v.flags & ct::SEEN_REPLY != 0
}

/// ICMP echo request (IPv4 8, IPv6 128): `dport` holds `type << 8 | code`.
#[inline(always)]
fn is_echo_request(pkt: &Packet) -> bool {
    let ty = (pkt.dport >> 8) as u8;
    (pkt.proto == IPPROTO_ICMP && ty == 8) || (pkt.proto == IPPROTO_ICMPV6 && ty == 128)
}

/// An ICMP error about a flow: related only when it goes back to the
/// sender of the packet it quotes (the error's destination is the quoted
/// source), and that sender has sent on the flow. An error quoting a flow
/// "in the other direction", or a packet the flow never sent, is a packet
/// of its own for policy to judge (netfilter relates errors to the reply
/// direction the same way).
#[inline(always)]
fn related(pkt: &Packet) -> Known {
    let i = &pkt.inner;
    if i.src != pkt.dst {
        return Known::New;
    }
    let f = flow(pkt.family, i.proto, &i.src, &i.dst, i.sport, i.dport);
    let Some((v, _)) = lookup(&f.key) else {
        return Known::New;
    };
    // SAFETY: from a successful lookup, alive for the program's run (RCU);
    // plain integers, so a racing update leaves either version.
    let v = unsafe { &*v };
    if live(v, f.key.proto, now()) && has_sent(v, f.from_a) {
        Known::Related
    } else {
        Known::New
    }
}

/// Whether a RST from side `from_a` is plausible for the flow: its
/// sequence number lies within `ct::RST_WINDOW` of the end of what that
/// side has sent, or (side unknown so far) it acknowledges exactly what
/// the other side has sent, as a RST answering a segment does.
#[inline(always)]
fn rst_plausible(v: &CtValue, from_a: bool, pkt: &Packet) -> bool {
    let (mine, mine_known, theirs, theirs_known) = if from_a {
        (
            v.end_a,
            v.flags & ct::END_A != 0,
            v.end_b,
            v.flags & ct::END_B != 0,
        )
    } else {
        (
            v.end_b,
            v.flags & ct::END_B != 0,
            v.end_a,
            v.flags & ct::END_A != 0,
        )
    };
    if mine_known {
        let d = pkt.tcp_seq.wrapping_sub(mine) as i32;
        return d.unsigned_abs() <= ct::RST_WINDOW;
    }
    theirs_known && pkt.tcp_flags & TCP_ACK != 0 && pkt.tcp_ack == theirs
}

/// Looks the packet up and, except for a [`Hook::Peek`], records it:
/// refreshes the entry, marks the flow answered, follows TCP's FIN and
/// (plausible) RST. A called function, not inlined: its key and flow live
/// in their own stack frame.
#[inline(never)]
pub fn track(pkt: &Packet, hook: Hook) -> Known {
    if crate::skipped(filter_common::bench_skip::CONNTRACK) {
        return Known::New;
    }
    if pkt.inner.present {
        return related(pkt);
    }
    let f = packet_flow(pkt);
    let Some((v, assured)) = lookup(&f.key) else {
        return Known::New;
    };
    // Only a hit needs the time.
    let now = now();
    // SAFETY: the pointer comes from a successful lookup; the kernel keeps
    // the element alive for the rest of the program (RCU), and every field
    // is a plain integer, so racing writers at worst lose an update.
    let v = unsafe { &mut *v };
    if !live(v, f.key.proto, now) {
        return Known::New;
    }
    let from_opener = f.from_a == (v.flags & ct::OPENED_BY_A != 0);
    // An echo flow's opener sends requests, the other side replies: a
    // request from the answering side (say, with the identifier of the
    // node's own ping) is a new flow, not part of this one. (A ping of
    // one's own address has one side only: nothing to tell apart.)
    if proto::is_icmp(pkt.proto)
        && is_echo_request(pkt) != from_opener
        && f.key.addr_a != f.key.addr_b
    {
        return Known::New;
    }
    let flags = pkt.tcp_flags;
    // A fresh SYN on a closed flow opens a new one: judge it.
    if pkt.proto == IPPROTO_TCP
        && flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && v.flags & (ct::RST | ct::FIN_A | ct::FIN_B) != 0
    {
        return Known::New;
    }
    let answered = v.flags & ct::SEEN_REPLY != 0;
    let known = if !from_opener {
        if v.flags & ct::FORWARD_PENDING != 0 && hook != Hook::TcEgress {
            return Known::New;
        }
        Known::Established
    } else if answered {
        Known::Established
    } else {
        Known::New
    };
    if hook == Hook::Peek {
        return known;
    }
    let mut nf = v.flags;
    if !from_opener {
        nf = (nf | ct::SEEN_REPLY) & !ct::FORWARD_PENDING;
    }
    if pkt.proto == IPPROTO_TCP {
        if flags & TCP_RST != 0 {
            if rst_plausible(v, f.from_a, pkt) {
                nf |= ct::RST;
            }
        } else {
            record_end(v, &mut nf, f.from_a, pkt.tcp_end);
        }
        if flags & TCP_FIN != 0 {
            nf |= if f.from_a { ct::FIN_A } else { ct::FIN_B };
        }
    }
    v.flags = nf;
    v.last_seen = now;
    if !assured && qualifies_as_assured(pkt, v, from_opener, now) {
        assure(&f.key, v);
    }
    known
}

/// netfilter's rule for "assured": TCP once the opener acknowledges the
/// answer (the handshake completed), other protocols once both sides sent
/// and the flow is [`ct::ASSURED_AFTER`] old; ICMP echo flows never.
#[inline(always)]
fn qualifies_as_assured(pkt: &Packet, v: &CtValue, from_opener: bool, now: u64) -> bool {
    if v.flags & ct::SEEN_REPLY == 0 || v.flags & ct::FORWARD_PENDING != 0 {
        return false;
    }
    match pkt.proto {
        IPPROTO_TCP => {
            from_opener
                && pkt.tcp_flags & (TCP_ACK | TCP_SYN | TCP_RST) == TCP_ACK
                && v.flags & (ct::RST | ct::FIN_A | ct::FIN_B) == 0
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => false,
        _ => ct::opened_units(now).wrapping_sub(v.opened) >= ct::ASSURED_AFTER,
    }
}

/// Moves the entry `v` of `key` into the assured table. When that table is
/// full the flow stays where it is (counted): new flows may then evict it,
/// and its packets are judged again by policy.
#[inline(never)]
fn assure(key: &CtKey, v: &CtValue) {
    let mut copy = *v;
    copy.flags |= ct::ASSURED;
    if FW_CTA1.insert(key, &copy, BPF_NOEXIST as u64).is_ok() {
        let _ = FW_CT2.remove(key);
    } else {
        crate::counters::count_reason(filter_common::reason::EVENT_ASSURED_TABLE_FULL);
    }
}

/// Moves side `from_a`'s end forward to `end` (never back: segments
/// arrive out of order).
#[inline(always)]
fn record_end(v: &mut CtValue, nf: &mut u32, from_a: bool, end: u32) {
    let (slot, bit) = if from_a {
        (&mut v.end_a, ct::END_A)
    } else {
        (&mut v.end_b, ct::END_B)
    };
    if *nf & bit == 0 || (end.wrapping_sub(*slot) as i32) > 0 {
        *slot = end;
        *nf |= bit;
    }
}

/// The clock conntrack and the fragment table keep time by:
/// CLOCK_MONOTONIC_COARSE, the monotonic clock as of the last tick. Their
/// timeouts are seconds, so a tick's lag (the agent reads CLOCK_MONOTONIC)
/// does not matter, and reading it costs a load where the precise clock
/// asks the clocksource on every packet of a known flow.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn live(v: &CtValue, proto: u8, now: u64) -> bool {
    v.live(proto, now)
}

/// Records a flow policy has just allowed, opened by this packet's
/// source. `pending`: recorded at TC ingress for a forwarded flow not yet
/// judged (see `ct::FORWARD_PENDING`). A RST or an ICMP error opens nothing.
#[inline(never)]
pub fn open(pkt: &Packet, pending: bool) {
    if pkt.inner.present
        || pkt.fragment
        || (pkt.proto == IPPROTO_TCP && pkt.tcp_flags & TCP_RST != 0)
    {
        return;
    }
    // Only a request opens an echo flow (see `track`).
    if proto::is_icmp(pkt.proto) && !is_echo_request(pkt) {
        return;
    }
    let f = packet_flow(pkt);
    let mut flags = if f.from_a { ct::OPENED_BY_A } else { 0 };
    if pending {
        flags |= ct::FORWARD_PENDING;
    }
    let now = now();
    let mut value = CtValue {
        last_seen: now,
        flags,
        end_a: 0,
        end_b: 0,
        opened: ct::opened_units(now),
    };
    if pkt.proto == IPPROTO_TCP {
        record_end(&mut value, &mut flags, f.from_a, pkt.tcp_end);
        value.flags = flags;
    }
    // A new flow replaces whatever an old one of the same tuple left in
    // the assured table (closed or expired, or `track` would have known it).
    let _ = FW_CTA1.remove(&f.key);
    // Failing to insert (not expected of an LRU map, which evicts to make
    // room) leaves the flow untracked: its next packets are judged again,
    // which is safe, and worth a diagnostic.
    if let Err(e) = FW_CT2.insert(&f.key, &value, 0) {
        crate::diag::conntrack_insert_failed(e);
    }
    // After the insert (`ct::insert_mark`).
    if let Some(epoch) = ct::insert_mark(epoch_control()) {
        if let Some(seen) = seen_byte(f.key.seen_slot()) {
            // SAFETY: an array element, alive while the program runs; a
            // byte store, so a racing store leaves one of two epochs, both
            // valid for the next lookups.
            unsafe { *seen = epoch };
        }
    }
}
