//! Frame → [`Packet`]: the one place that touches raw packet bytes (and
//! the XDP metadata area in front of them).
//!
//! In: the `[data, data_end)` window of an XDP or TC context. Out: a plain
//! copy of the fields the classifier needs, or a reason: pass the frame
//! untouched (not IP: ARP, LLDP, …) or drop it (an IP packet policy cannot
//! be judged on). Every read goes through [`ptr_at`], whose bounds check
//! is what the verifier sees.
//!
//! The parser fails closed (docs/threat-model.md): what the kernel's stack
//! would deliver is either parsed to the fields rules read or dropped.
//! VLAN tags are walked as far as [`MAX_VLAN_TAGS`] (the kernel strips any
//! number of priority tags), IPv6 extension headers as far as
//! [`MAX_IPV6_EXT_HEADERS`] (the kernel walks any number); a longer chain,
//! a truncated header or a first fragment without the L4 fields is
//! dropped. Non-first fragments are reported as such; the caller lets
//! them follow their first fragment's verdict (`fragments`).

use core::mem;

use aya_ebpf::{macros::map, maps::PerCpuArray};
use filter_common::{reason, tcp_flags, XdpMeta, XDP_META_MAGIC};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    vlan::VlanHdr,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

pub use filter_common::proto::{
    ICMP as IPPROTO_ICMP, ICMPV6 as IPPROTO_ICMPV6, SCTP as IPPROTO_SCTP, TCP as IPPROTO_TCP,
    UDP as IPPROTO_UDP,
};
// IPv6 extension headers: only the parser needs them.
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

/// VLAN tags walked (in the frame plus the one a TC program finds in the
/// skb's metadata). The kernel strips tag after tag while they carry VID 0
/// and delivers what is inside, so a frame with more tags than this is
/// dropped rather than passed as "not IP".
pub const MAX_VLAN_TAGS: usize = 8;

/// IPv6 extension headers walked to reach the upper layer (the kernel
/// walks any number); a longer chain is dropped. A bound the verifier can
/// see.
const MAX_IPV6_EXT_HEADERS: usize = 8;

/// IPv4 flags: more fragments.
const IPV4_MF: u16 = 0x2000;
/// IPv4 fragment offset (8-byte units).
const IPV4_OFFSET: u16 = 0x1fff;

/// Address family of a [`Packet`].
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family as map keys carry it (`filter_common::family`).
    #[inline(always)]
    pub fn code(self) -> u8 {
        match self {
            Family::V4 => filter_common::family::V4,
            Family::V6 => filter_common::family::V6,
        }
    }
}

/// Per-CPU scratch for the parsed packet, one slot per program kind.
///
/// The verifier checks everything after the parser once per distinct path
/// through it (VLAN tags × family × extension headers × L4 kind × ICMP
/// error…), unless those paths leave identical states. Handing the later
/// stages a pointer into this map, with the stack copy dead, makes them
/// identical: without it the pipeline exceeds the verifier's 1M-instruction
/// budget (and its 512-byte stack).
#[map]
static SCRATCH: PerCpuArray<Packet> = PerCpuArray::with_max_entries(3, 0);

/// Scratch slot of each program kind (BPF programs do not nest on a CPU,
/// but XDP and TC of one packet run back to back; separate slots keep that
/// obvious).
pub mod slot {
    pub const XDP: u32 = 0;
    pub const TC_INGRESS: u32 = 1;
    pub const TC_EGRESS: u32 = 2;
}

/// Parses the frame in `[start, end)` into scratch slot `slot`.
/// `stripped_tags`: VLAN tags the kernel already moved out of the frame
/// into the skb's metadata (TC), so XDP and TC walk the same tags.
#[inline(always)]
pub fn parse_into(
    slot: u32,
    start: usize,
    end: usize,
    stripped_tags: usize,
) -> Result<&'static Packet, NotParsed> {
    let out = SCRATCH.get_ptr_mut(slot).ok_or(reason::PASS_TABLE_ERROR)?;
    // SAFETY: a per-CPU array element, valid for the program's run and
    // used only by this CPU; programs do not nest on one CPU. Parsing
    // straight into it keeps the packet off the 512-byte stack.
    let pkt = unsafe { &mut *out };
    pkt.slot = slot;
    if !cfg!(feature = "bench-no-log") {
        *pkt.log_pending.0.get_mut() = 0;
    }
    parse(start, end, stripped_tags, pkt)?;
    Ok(pkt)
}

/// The packet [`parse_into`] left in scratch slot `slot`: how a global
/// BPF function, which takes scalars only, gets at it.
#[inline(always)]
pub fn scratch(slot: u32) -> Option<&'static Packet> {
    // SAFETY: as in `parse_into`; read only.
    SCRATCH.get_ptr(slot).map(|p| unsafe { &*p })
}

/// The fields of one packet the classifier reads. Plain data: once parsed,
/// nothing downstream touches the frame again.
///
/// Laid out by hand, aligned to 8 with the addresses first: LLVM's BPF
/// backend writes a field it only knows as byte-aligned one byte at a
/// time, and zeroing an address that way became a call to a byte-by-byte
/// `memset` loop on every packet.
#[repr(C, align(8))]
pub struct Packet {
    /// Source address; IPv4 uses the first four bytes.
    pub src: [u8; 16],
    /// Destination address; IPv4 uses the first four bytes.
    pub dst: [u8; 16],
    /// ICMP errors: the header of the packet that caused it, so conntrack
    /// can find the flow the error is related to.
    pub inner: Inner,
    /// The scratch slot the packet is in ([`scratch`]).
    pub slot: u32,
    /// IPv4 identification or IPv6 fragment identification, when
    /// `fragment` or `first_fragment`.
    pub frag_id: u32,
    /// TCP sequence and acknowledgement numbers; else 0.
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    /// TCP: the sequence number after this segment (payload, SYN and FIN
    /// each count), what the other side will acknowledge; else 0.
    pub tcp_end: u32,
    /// Non-zero once a stage left Log records to write (`crate::events`):
    /// kept here, in the per-CPU scratch, not on the stack, whose 512
    /// bytes the deepest call chain needs.
    pub log_pending: PendingCell,
    /// Source port (host order); 0 for ICMP.
    pub sport: u16,
    /// Destination port (host order); ICMP: `type << 8 | code`.
    pub dport: u16,
    /// ICMP echo request or reply: the identifier, which conntrack uses as
    /// both ports; else 0.
    pub echo_id: u16,
    pub family: Family,
    /// IPv4 protocol or IPv6 upper-layer header.
    pub proto: u8,
    /// True when `sport`/`dport` are meaningful (see `PortKey::has_ports`).
    pub has_ports: bool,
    /// A non-first fragment (no L4 header).
    pub fragment: bool,
    /// The first fragment of a fragmented datagram (offset 0, more to come).
    pub first_fragment: bool,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10); else 0.
    pub tcp_flags: u8,
}

/// A flag the pipeline sets through `&Packet`.
pub struct PendingCell(core::cell::UnsafeCell<u32>);

// SAFETY: a `Packet` lives in a per-CPU scratch entry that one program
// uses at a time (programs do not nest on one CPU); nothing else reads
// or writes the flag meanwhile.
unsafe impl Sync for PendingCell {}

/// The embedded header of an ICMP error (RFC 792, RFC 4443): the packet
/// the error answers, as the erring side sent it.
/// Addresses first and aligned, as in [`Packet`].
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Inner {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// True when the packet is an ICMP error whose embedded header parsed.
    pub present: bool,
}

impl Packet {
    /// Adds 1 (Log records to write) or 0: arithmetic, not a branch, so
    /// the verifier's paths after a stage stay one. Relaxed plain loads
    /// and stores: only this CPU touches its scratch.
    #[inline(always)]
    pub fn add_log_pending(&self, n: u32) {
        let p = self.log_pending.0.get();
        // SAFETY: see `PendingCell`.
        unsafe { *p |= n };
    }

    /// Whether a stage left Log records to write.
    #[inline(always)]
    pub fn log_pending(&self) -> bool {
        // SAFETY: see `PendingCell`.
        unsafe { *self.log_pending.0.get() != 0 }
    }

    /// Clears what the previous packet of this scratch slot left, except
    /// the addresses, which the caller always writes.
    #[inline(always)]
    fn reset(&mut self, family: Family, proto: u8) {
        self.family = family;
        self.proto = proto;
        self.has_ports = false;
        self.sport = 0;
        self.dport = 0;
        self.fragment = false;
        self.first_fragment = false;
        self.tcp_flags = 0;
        self.echo_id = 0;
        self.inner.present = false;
        // Adjacent zeros, which LLVM would merge into a call to a
        // byte-by-byte `memset` (see `v4_in_16`); volatile stores are kept
        // one by one.
        // SAFETY: plain integer fields of `self`.
        unsafe {
            core::ptr::write_volatile(&mut self.frag_id, 0);
            core::ptr::write_volatile(&mut self.tcp_seq, 0);
            core::ptr::write_volatile(&mut self.tcp_ack, 0);
            core::ptr::write_volatile(&mut self.tcp_end, 0);
        }
    }
}

/// Why a frame was not parsed; a `filter_common::reason` value:
/// `reason::is_drop` tells whether the caller drops it.
pub type NotParsed = u32;

/// Returns a pointer to a `T` at `offset` from `start`, or `None` when the
/// frame is too short.
///
/// This is the bounds check every `// SAFETY:` comment below relies on: the
/// returned pointer and `size_of::<T>()` bytes after it lie inside
/// `[start, end)`.
#[inline(always)]
fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Option<*const T> {
    let len = mem::size_of::<T>();
    if start + offset + len > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Reads a `T` (which must be valid for any bit pattern) at `offset`.
#[inline(always)]
fn read<T: Copy>(start: usize, end: usize, offset: usize) -> Result<T, NotParsed> {
    // A header the frame does not hold: the packet cannot be judged, and
    // the kernel must not be left to decide what it makes of it.
    let p = ptr_at::<T>(start, end, offset).ok_or(reason::DROP_MALFORMED)?;
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `p` are inside
    // the frame; the header types are byte arrays and integers, valid for
    // any bit pattern; `read_unaligned` because frames have no alignment.
    Ok(unsafe { p.read_unaligned() })
}

/// Parses the frame in `[start, end)` into `pkt`.
#[inline(always)]
fn parse(
    start: usize,
    end: usize,
    stripped_tags: usize,
    pkt: &mut Packet,
) -> Result<(), NotParsed> {
    let eth: EthHdr = read(start, end, 0)?;
    let mut ether_type = u16::from_be(eth.ether_type);
    let mut offset = EthHdr::LEN;
    let mut tags = stripped_tags;
    // 802.1ad and 802.1Q tags, in any order, as the kernel strips them.
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan: VlanHdr = read(start, end, offset)?;
        ether_type = u16::from_be(vlan.ether_type);
        offset += VlanHdr::LEN;
        tags += 1;
    }
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD || tags > MAX_VLAN_TAGS {
        return Err(reason::DROP_MALFORMED);
    }
    match ether_type {
        ETH_P_IP => parse_ipv4(start, end, offset, pkt),
        ETH_P_IPV6 => parse_ipv6(start, end, offset, pkt),
        _ => Err(reason::PASS_NOT_IP),
    }
}

/// An IPv4 address as a 16-byte address field holds it: its four bytes,
/// then zeros. Built as one 128-bit value because zeroing the field and
/// copying the bytes in is merged by LLVM into a call to a byte-by-byte
/// `memset` (bpf-linker leaves memset to a library function: aya-ebpf's
/// loop), on every packet.
#[inline(always)]
fn v4_in_16(a: [u8; 4]) -> [u8; 16] {
    u128::from(u32::from_le_bytes(a)).to_le_bytes()
}

#[inline(always)]
fn parse_ipv4(start: usize, end: usize, offset: usize, pkt: &mut Packet) -> Result<(), NotParsed> {
    let ip: Ipv4Hdr = read(start, end, offset)?;
    let ihl = (ip.vihl & 0x0f) as usize;
    if ip.vihl >> 4 != 4 || ihl < 5 {
        // ip_rcv drops these too; nothing to judge.
        return Err(reason::DROP_MALFORMED);
    }
    pkt.reset(Family::V4, ip.proto);
    pkt.src = v4_in_16(ip.src_addr);
    pkt.dst = v4_in_16(ip.dst_addr);
    let frags = u16::from_be_bytes(ip.frags);
    let frag_offset = frags & IPV4_OFFSET;
    pkt.frag_id = u16::from_be_bytes(ip.id) as u32;
    if frag_offset != 0 {
        // RFC 3128: a TCP fragment at offset 8 can only serve to rewrite
        // the flags of the header the first fragment showed.
        if frag_offset == 1 && ip.proto == IPPROTO_TCP {
            return Err(reason::DROP_MALFORMED);
        }
        // Non-first fragment: no L4 header; it follows its first fragment.
        pkt.fragment = true;
        return Ok(());
    }
    pkt.first_fragment = frags & IPV4_MF != 0;
    // ihl is 5..=15, so the L4 offset is bounded: the verifier can follow it.
    // A first fragment too short for the L4 fields fails the reads there
    // and is dropped (RFC 1858's tiny-fragment rule).
    let l4 = offset + ihl * 4;
    let ip_end = offset + u16::from_be_bytes(ip.tot_len) as usize;
    parse_l4(start, end, l4, ip_end, pkt)
}

#[inline(always)]
fn parse_ipv6(start: usize, end: usize, offset: usize, pkt: &mut Packet) -> Result<(), NotParsed> {
    let ip: Ipv6Hdr = read(start, end, offset)?;
    pkt.reset(Family::V6, ip.next_hdr);
    pkt.src = ip.src_addr;
    pkt.dst = ip.dst_addr;
    let mut l4 = offset + Ipv6Hdr::LEN;
    let mut next = ip.next_hdr;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                // next header, then length in 8-octet units not counting the first.
                let hdr: [u8; 2] = read(start, end, l4)?;
                next = hdr[0];
                l4 += (hdr[1] as usize + 1) * 8;
            }
            IPPROTO_AH => {
                // RFC 4302: length in 4-octet units, minus 2.
                let hdr: [u8; 2] = read(start, end, l4)?;
                next = hdr[0];
                l4 += (hdr[1] as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                // next header, reserved, offset (13 bits) + flags, identification.
                let hdr: [u8; 8] = read(start, end, l4)?;
                next = hdr[0];
                l4 += 8;
                pkt.frag_id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                let frag_offset = u16::from_be_bytes([hdr[2], hdr[3]]) >> 3;
                if frag_offset != 0 {
                    pkt.proto = next;
                    pkt.fragment = true;
                    return Ok(());
                }
                // RFC 8200 4.5 / RFC 7112: the first fragment holds the
                // whole chain through the upper-layer header, or is dropped
                // (the reads below fail).
                pkt.first_fragment = hdr[3] & 1 != 0;
            }
            _ => break,
        }
    }
    if matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT
    ) {
        // Longer than the walk: the kernel would find an upper layer we
        // did not see.
        return Err(reason::DROP_MALFORMED);
    }
    pkt.proto = next;
    let ip_end = offset + Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize;
    parse_l4(start, end, l4, ip_end, pkt)
}

/// `ip_end`: where the IP packet ends by its own length field (the frame
/// may be longer: Ethernet padding).
#[inline(always)]
fn parse_l4(
    start: usize,
    end: usize,
    l4: usize,
    ip_end: usize,
    pkt: &mut Packet,
) -> Result<(), NotParsed> {
    match pkt.proto {
        IPPROTO_TCP => {
            // Ports, sequence, acknowledgement, data offset, flags.
            let h: [u8; 14] = read(start, end, l4)?;
            pkt.sport = u16::from_be_bytes([h[0], h[1]]);
            pkt.dport = u16::from_be_bytes([h[2], h[3]]);
            pkt.has_ports = true;
            pkt.tcp_seq = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            pkt.tcp_ack = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
            pkt.tcp_flags = h[13];
            let header = (h[12] >> 4) as usize * 4;
            let payload = ip_end.saturating_sub(l4 + header) as u32;
            // SYN and FIN each take one sequence number.
            let syn_fin = u32::from(pkt.tcp_flags & tcp_flags::FIN != 0)
                + u32::from(pkt.tcp_flags & tcp_flags::SYN != 0);
            pkt.tcp_end = pkt.tcp_seq.wrapping_add(payload).wrapping_add(syn_fin);
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            // Both start with source and destination port.
            let ports: [u8; 4] = read(start, end, l4)?;
            pkt.sport = u16::from_be_bytes([ports[0], ports[1]]);
            pkt.dport = u16::from_be_bytes([ports[2], ports[3]]);
            pkt.has_ports = true;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            // type, code, checksum, then identifier for echoes.
            let icmp: [u8; 6] = read(start, end, l4)?;
            pkt.dport = u16::from_be_bytes([icmp[0], icmp[1]]);
            pkt.has_ports = true;
            let v6 = pkt.proto == IPPROTO_ICMPV6;
            match (v6, icmp[0]) {
                // Echo request and reply.
                (false, 0 | 8) | (true, 128 | 129) => {
                    pkt.echo_id = u16::from_be_bytes([icmp[4], icmp[5]]);
                }
                // Destination unreachable, time exceeded, parameter problem
                // (and IPv6's packet too big): 8 bytes of ICMP header, then
                // the offending packet's header.
                (false, 3 | 11 | 12) => inner_ipv4(start, end, l4 + 8, &mut pkt.inner),
                (true, 1..=4) => inner_ipv6(start, end, l4 + 8, &mut pkt.inner),
                _ => {}
            }
        }
        _ => {}
    }
    Ok(())
}

/// The embedded IPv4 header and first L4 bytes of an ICMP error. A short or
/// odd embedded packet leaves `present` false: the error then meets policy
/// as a packet of its own.
#[inline(always)]
fn inner_ipv4(start: usize, end: usize, offset: usize, inner: &mut Inner) {
    let Ok(ip) = read::<Ipv4Hdr>(start, end, offset) else {
        return;
    };
    let ihl = (ip.vihl & 0x0f) as usize;
    if ip.vihl >> 4 != 4 || ihl < 5 {
        return;
    }
    inner.proto = ip.proto;
    inner.src = v4_in_16(ip.src_addr);
    inner.dst = v4_in_16(ip.dst_addr);
    inner.present = inner_ports(start, end, offset + ihl * 4, inner);
}

/// Like [`inner_ipv4`]; the embedded IPv6 packet's extension headers are
/// not walked (errors about such packets meet policy on their own).
#[inline(always)]
fn inner_ipv6(start: usize, end: usize, offset: usize, inner: &mut Inner) {
    let Ok(ip) = read::<Ipv6Hdr>(start, end, offset) else {
        return;
    };
    inner.proto = ip.next_hdr;
    inner.src = ip.src_addr;
    inner.dst = ip.dst_addr;
    inner.present = inner_ports(start, end, offset + Ipv6Hdr::LEN, inner);
}

/// Ports of the embedded packet (the echo identifier, for an echo): the
/// conntrack key of the flow it belongs to.
#[inline(always)]
fn inner_ports(start: usize, end: usize, l4: usize, inner: &mut Inner) -> bool {
    let Ok(b) = read::<[u8; 6]>(start, end, l4) else {
        return false;
    };
    match inner.proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            inner.sport = u16::from_be_bytes([b[0], b[1]]);
            inner.dport = u16::from_be_bytes([b[2], b[3]]);
            true
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let id = u16::from_be_bytes([b[4], b[5]]);
            inner.sport = id;
            inner.dport = id;
            true
        }
        _ => false,
    }
}

/// Reads the [`XdpMeta`] XDP left in front of the packet, if the area in
/// `[meta, data)` starts with one of this layout. TC calls it with the
/// skb's `data_meta` and `data`.
#[inline(always)]
pub fn xdp_meta(meta: usize, data: usize) -> Option<XdpMeta> {
    // Only a bounds check here: an extra `meta + 8 == data` test lets LLVM
    // fold the two into an equality the verifier cannot use as a bound.
    let m: XdpMeta = read(meta, data, 0).ok()?;
    (m.magic == XDP_META_MAGIC).then_some(m)
}

/// Writes `m` into the metadata area of an XDP frame, growing it first.
/// Returns false when the driver has no room for metadata (TC then runs
/// the host-policy stages itself).
#[inline(always)]
pub fn set_xdp_meta(ctx: &aya_ebpf::programs::XdpContext, m: XdpMeta) -> bool {
    let size = mem::size_of::<XdpMeta>() as i32;
    // SAFETY: plain helper call on the context the program was given.
    if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_meta(ctx.ctx, -size) } != 0 {
        return false;
    }
    // After the helper the verifier forgets earlier bounds: re-read the
    // pointers and check again.
    let (meta, data) = (ctx.metadata(), ctx.data());
    let Some(p) = ptr_at::<XdpMeta>(meta, data, 0) else {
        return false;
    };
    // SAFETY: `ptr_at` checked the XdpMeta fits before `data`.
    unsafe { (p as *mut XdpMeta).write_unaligned(m) };
    true
}

/// The `__sk_buff` fields the TC programs read.
pub struct Skb {
    /// Frame length, linear and paged parts.
    pub len: u32,
    pub mark: u32,
    /// The interface the program runs on.
    pub ifindex: u32,
    /// The interface the packet arrived on; 0 for locally generated ones.
    pub ingress_ifindex: u32,
    /// The XDP verdict, at TC ingress when XDP ran and left one.
    pub meta: Option<XdpMeta>,
}

/// Headers the parser may read: Ethernet, VLAN tags, IPv6 with its
/// extension headers, ICMP and an ICMP error's embedded header and ports.
/// Headers beyond it cannot be read and the packet is dropped.
const HEADROOM: u32 = 512;

/// Reads the skb fields and makes the headers linear, so `parse` sees them
/// between `data` and `data_end` (a TC program sees only the linear part).
/// Returns the fields and the parsed packet.
#[inline(always)]
pub fn skb(
    ctx: &aya_ebpf::programs::TcContext,
    slot: u32,
) -> (Skb, Result<&'static Packet, NotParsed>) {
    use aya_ebpf::EbpfContext;
    let raw = ctx.as_ptr() as *const aya_ebpf::bindings::__sk_buff;
    // SAFETY: `raw` is the live __sk_buff the kernel passed in; these are
    // context field reads the verifier rewrites into skb accesses.
    let (len, mark, ifindex, ingress_ifindex, meta, data, vlan_present) = unsafe {
        (
            (*raw).len,
            (*raw).mark,
            (*raw).ifindex,
            (*raw).ingress_ifindex,
            (*raw).data_meta as usize,
            (*raw).data as usize,
            (*raw).vlan_present,
        )
    };
    let fields = Skb {
        len,
        mark,
        ifindex,
        ingress_ifindex,
        meta: xdp_meta(meta, data),
    };
    let want = if len < HEADROOM { len } else { HEADROOM };
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        // Failure leaves the skb as it was; the parser then reports what
        // it could not read.
        let _ = ctx.pull_data(want);
    }
    // The kernel moved the outer VLAN tag (if any) into the skb before TC.
    let stripped = (vlan_present != 0) as usize;
    (
        fields,
        parse_into(slot, ctx.data(), ctx.data_end(), stripped),
    )
}

/// [`crate::events::Frame`] for an XDP frame: the bytes from the Ethernet
/// header on, as the driver handed them over.
pub struct XdpFrame<'a>(pub &'a aya_ebpf::programs::XdpContext);

impl crate::events::Frame for XdpFrame<'_> {
    #[inline(always)]
    fn copy_to(&self, dst: *mut u8, len: u32) -> bool {
        // SAFETY: `dst` has room for `len` bytes (the caller's record) and
        // the helper checks `len` against the frame.
        unsafe { aya_ebpf::helpers::bpf_xdp_load_bytes(self.0.ctx, 0, dst as *mut _, len) == 0 }
    }

    /// XDP sees no tag outside the frame: a NIC (or veth) that strips the
    /// tag before XDP keeps it in metadata only a device-bound program can
    /// read (`bpf_xdp_metadata_rx_vlan_tag`).
    #[inline(always)]
    fn vlan(&self) -> (u16, u16) {
        (0, 0)
    }
}

/// [`crate::events::Frame`] for an skb at TC: the bytes from the Ethernet
/// header on (an outer VLAN tag the kernel moved into the skb is not in
/// them: [`crate::events::Frame::vlan`] reads it).
pub struct TcFrame<'a>(pub &'a aya_ebpf::programs::TcContext);

impl crate::events::Frame for TcFrame<'_> {
    #[inline(always)]
    fn copy_to(&self, dst: *mut u8, len: u32) -> bool {
        use aya_ebpf::EbpfContext;
        // SAFETY: as for XdpFrame.
        unsafe {
            aya_ebpf::helpers::bpf_skb_load_bytes(
                self.0.as_ptr() as *const _,
                0,
                dst as *mut _,
                len,
            ) == 0
        }
    }

    #[inline(always)]
    fn vlan(&self) -> (u16, u16) {
        use aya_ebpf::EbpfContext;
        let raw = self.0.as_ptr() as *const aya_ebpf::bindings::__sk_buff;
        // SAFETY: context field reads of the live __sk_buff, rewritten by
        // the verifier; `vlan_proto` is the skb's big-endian field.
        let (present, proto, tci) =
            unsafe { ((*raw).vlan_present, (*raw).vlan_proto, (*raw).vlan_tci) };
        if present == 0 {
            return (0, 0);
        }
        (u16::from_be(proto as u16), tci as u16)
    }
}
