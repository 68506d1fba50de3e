//! Failsafe ports (calico-semantics.md 4): traffic to them skips policy so
//! an operator cannot lock themself out of SSH or the API server.
//!
//! In: a parsed packet and a direction. Out: whether it is failsafe. One
//! LPM lookup; entries come from FelixConfiguration (Calico's defaults when
//! absent).

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, LpmTrie},
};
use filter_common::{direction, FailsafeKey, FAILSAFE_ADDR_OFFSET_BITS, MAX_FAILSAFE_ENTRIES};

use crate::parse::{Family, Packet};

#[map(name = "FW_FAILSAFE1")]
static FW_FAILSAFE1: LpmTrie<FailsafeKey, u32> = LpmTrie::pinned(MAX_FAILSAFE_ENTRIES, 0);

/// Whether `pkt` matches an inbound (`direction::INGRESS`: protocol,
/// destination port, source net) or outbound (destination port and net)
/// failsafe entry. Only TCP and UDP have failsafe ports.
#[inline(always)]
pub fn is_failsafe(dir: u32, pkt: &Packet) -> bool {
    if !pkt.has_ports || (pkt.proto != 6 && pkt.proto != 17) {
        return false;
    }
    let peer = if dir == direction::INGRESS {
        pkt.src
    } else {
        pkt.dst
    };
    let (family, addr_bits) = match pkt.family {
        Family::V4 => (4, 32),
        Family::V6 => (6, 128),
    };
    let key = FailsafeKey {
        direction: dir as u8,
        proto: pkt.proto,
        port: pkt.dport.to_be_bytes(),
        family,
        pad: [0; 3],
        addr: peer,
    };
    FW_FAILSAFE1
        .get(&Key::new(FAILSAFE_ADDR_OFFSET_BITS + addr_bits, key))
        .is_some()
}
