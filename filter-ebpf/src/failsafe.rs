//! Failsafe ports (docs/semantics.md 4): traffic to them skips policy so
//! an operator cannot lock themself out of SSH or the API server.
//!
//! In: a parsed packet and a direction. Out: whether it is failsafe. A
//! byte per port says which lists have the port at all; only then one LPM
//! lookup. Entries come from FelixConfiguration (Calico's defaults when
//! absent).

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, Array, LpmTrie},
};
use filter_common::{
    direction, failsafe_port_bit, FailsafeKey, FAILSAFE_ADDR_OFFSET_BITS, FAILSAFE_PORTS,
    MAX_FAILSAFE_ENTRIES,
};

use crate::parse::{Family, Packet};

#[map(name = "FW_FAILSAFE1")]
static FW_FAILSAFE1: LpmTrie<FailsafeKey, u32> = LpmTrie::pinned(MAX_FAILSAFE_ENTRIES, 0);

/// Per port, `failsafe_port_bit`s of the lists that have it.
#[map(name = "FW_FSPORT1")]
static FW_FSPORT1: Array<u8> = Array::pinned(FAILSAFE_PORTS, 0);

/// Whether `pkt` matches an inbound (`direction::INGRESS`: protocol,
/// destination port, source net) or outbound (destination port and
/// destination net) failsafe entry: the filter and mangle failsafe chains.
/// Only TCP and UDP have failsafe ports.
#[inline(always)]
pub fn is_failsafe(dir: u32, pkt: &Packet) -> bool {
    let peer = if dir == direction::INGRESS {
        &pkt.src
    } else {
        &pkt.dst
    };
    hit(dir, pkt, pkt.dport, peer)
}

/// What the raw-table failsafe chains, which run before the untracked
/// stage, match besides [`is_failsafe`]: the *source* port against the
/// other direction's list, so replies of failsafe flows (DNS answers from
/// udp:53, SSH replies from tcp:22) are not caught by untracked policy
/// (docs/semantics.md 4). Callers keep `is_failsafe`'s answer for the
/// later filter/mangle check instead of looking it up twice.
#[inline(always)]
pub fn is_reply_failsafe(dir: u32, pkt: &Packet) -> bool {
    let (other, peer) = if dir == direction::INGRESS {
        (direction::EGRESS, &pkt.src)
    } else {
        (direction::INGRESS, &pkt.dst)
    };
    hit(other, pkt, pkt.sport, peer)
}

/// An entry of `list` for the packet's protocol, `port` and a net holding
/// `peer`: the port's byte, then, if the list has the port, one trie
/// lookup.
#[inline(always)]
fn hit(list: u32, pkt: &Packet, port: u16, peer: &[u8; 16]) -> bool {
    if !pkt.has_ports || (pkt.proto != 6 && pkt.proto != 17) {
        return false;
    }
    let (family, addr_bits) = match pkt.family {
        Family::V4 => (4, 32),
        Family::V6 => (6, 128),
    };
    let bit = failsafe_port_bit(list as u8, pkt.proto, family);
    if FW_FSPORT1.get(u32::from(port)).is_none_or(|b| b & bit == 0) {
        return false;
    }
    let key = FailsafeKey {
        direction: list as u8,
        proto: pkt.proto,
        port: port.to_be_bytes(),
        family,
        // A literal, not `[0; 3]`: a repeat becomes a call to a byte-by-byte
        // `memset` (see `parse::v4_in_16`).
        pad: [0, 0, 0],
        addr: *peer,
    };
    FW_FAILSAFE1
        .get(&Key::new(FAILSAFE_ADDR_OFFSET_BITS + addr_bits, key))
        .is_some()
}
