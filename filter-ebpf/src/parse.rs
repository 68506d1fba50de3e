//! Frame → [`Packet`]: the one place that touches raw packet bytes.
//!
//! In: the `[data, data_end)` window of an XDP or TC context. Out: a plain
//! copy of the fields the classifier needs, or a reason to pass the frame
//! untouched. Every read goes through [`ptr_at`], whose bounds check is what
//! the verifier sees. Handles Ethernet with up to two VLAN tags (802.1Q and
//! 802.1ad), IPv4 with options and fragments, IPv6 with the common extension
//! headers and fragments, TCP, UDP, SCTP, ICMP and ICMPv6. Anything else is
//! reported as not understood, so the caller passes it to the kernel.

use core::mem;

use filter_common::reason;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    vlan::VlanHdr,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_SCTP: u8 = 132;

/// IPv6 extension headers walked before giving up and treating the next
/// header as the upper layer. A bound the verifier can see.
const MAX_IPV6_EXT_HEADERS: usize = 4;

/// Address family of a [`Packet`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// The fields of one packet the classifier reads. Plain data: once parsed,
/// nothing downstream touches the frame again.
#[derive(Clone, Copy)]
pub struct Packet {
    pub family: Family,
    /// IPv4 protocol or IPv6 upper-layer header.
    pub proto: u8,
    /// True when `sport`/`dport` are meaningful (see `PortKey::has_ports`).
    pub has_ports: bool,
    /// Source address; IPv4 uses the first four bytes.
    pub src: [u8; 16],
    /// Destination address; IPv4 uses the first four bytes.
    pub dst: [u8; 16],
    /// Source port (host order); 0 for ICMP.
    pub sport: u16,
    /// Destination port (host order); ICMP: `type << 8 | code`.
    pub dport: u16,
}

/// Why a frame was not parsed; a `filter_common::reason` value.
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
    let p = ptr_at::<T>(start, end, offset).ok_or(reason::PASS_TRUNCATED)?;
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `p` are inside
    // the frame; the header types are byte arrays and integers, valid for
    // any bit pattern; `read_unaligned` because frames have no alignment.
    Ok(unsafe { p.read_unaligned() })
}

/// Parses the frame in `[start, end)`.
#[inline(always)]
pub fn parse(start: usize, end: usize) -> Result<Packet, NotParsed> {
    let eth: EthHdr = read(start, end, 0)?;
    let mut ether_type = u16::from_be(eth.ether_type);
    let mut offset = EthHdr::LEN;
    // Up to two tags: an 802.1ad outer tag and an 802.1Q inner one (QinQ).
    for _ in 0..2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan: VlanHdr = read(start, end, offset)?;
        ether_type = u16::from_be(vlan.ether_type);
        offset += VlanHdr::LEN;
    }
    match ether_type {
        ETH_P_IP => parse_ipv4(start, end, offset),
        ETH_P_IPV6 => parse_ipv6(start, end, offset),
        _ => Err(reason::PASS_NOT_IP),
    }
}

#[inline(always)]
fn parse_ipv4(start: usize, end: usize, offset: usize) -> Result<Packet, NotParsed> {
    let ip: Ipv4Hdr = read(start, end, offset)?;
    let ihl = (ip.vihl & 0x0f) as usize;
    if ip.vihl >> 4 != 4 || ihl < 5 {
        // Not a header the kernel would accept either; let it drop it.
        return Err(reason::PASS_TRUNCATED);
    }
    let mut pkt = Packet {
        family: Family::V4,
        proto: ip.proto,
        has_ports: false,
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
    };
    pkt.src[..4].copy_from_slice(&ip.src_addr);
    pkt.dst[..4].copy_from_slice(&ip.dst_addr);
    let frag_offset = u16::from_be_bytes(ip.frags) & 0x1fff;
    if frag_offset != 0 {
        // Non-first fragment: no L4 header, so no ports to match.
        return Ok(pkt);
    }
    // ihl is 5..=15, so the L4 offset is bounded: the verifier can follow it.
    let l4 = offset + ihl * 4;
    parse_l4(start, end, l4, &mut pkt)?;
    Ok(pkt)
}

#[inline(always)]
fn parse_ipv6(start: usize, end: usize, offset: usize) -> Result<Packet, NotParsed> {
    let ip: Ipv6Hdr = read(start, end, offset)?;
    let mut pkt = Packet {
        family: Family::V6,
        proto: ip.next_hdr,
        has_ports: false,
        src: ip.src_addr,
        dst: ip.dst_addr,
        sport: 0,
        dport: 0,
    };
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
            IPPROTO_FRAGMENT => {
                // next header, reserved, offset (13 bits) + flags.
                let hdr: [u8; 4] = read(start, end, l4)?;
                next = hdr[0];
                l4 += 8;
                let frag_offset = u16::from_be_bytes([hdr[2], hdr[3]]) >> 3;
                if frag_offset != 0 {
                    pkt.proto = next;
                    return Ok(pkt);
                }
            }
            _ => break,
        }
    }
    pkt.proto = next;
    parse_l4(start, end, l4, &mut pkt)?;
    Ok(pkt)
}

#[inline(always)]
fn parse_l4(start: usize, end: usize, l4: usize, pkt: &mut Packet) -> Result<(), NotParsed> {
    match pkt.proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            // All three start with source and destination port.
            let ports: [u8; 4] = read(start, end, l4)?;
            pkt.sport = u16::from_be_bytes([ports[0], ports[1]]);
            pkt.dport = u16::from_be_bytes([ports[2], ports[3]]);
            pkt.has_ports = true;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let type_code: [u8; 2] = read(start, end, l4)?;
            pkt.dport = u16::from_be_bytes(type_code);
            pkt.has_ports = true;
        }
        _ => {}
    }
    Ok(())
}
