//! Forwarded or host-bound: is a packet for this node?
//!
//! In: a parsed packet at TC ingress (its destination before DNAT). Out:
//! whether the normal ingress stage judges it here (host-bound) or the
//! forward stage judges it at TC egress (design.md). The agent keeps the
//! node's own addresses in `FW_HOST1` and the Service frontends kube-proxy
//! rewrites (NodePorts on node addresses among them) in `FW_SVC1`;
//! multicast and limited broadcast are delivered to the node too.

use aya_ebpf::{macros::map, maps::HashMap};
use filter_common::{HostKey, SvcKey, MAX_FRONTENDS, MAX_HOST_ADDRS};

use crate::parse::{Family, Packet};

#[map(name = "FW_HOST1")]
static FW_HOST1: HashMap<HostKey, u32> = HashMap::pinned(MAX_HOST_ADDRS, 0);

#[map(name = "FW_SVC1")]
static FW_SVC1: HashMap<SvcKey, u32> = HashMap::pinned(MAX_FRONTENDS, 0);

/// Whether `pkt` is addressed to the node itself, and not to a Service
/// frontend on one of its addresses (that one meets the forward stage after
/// DNAT).
#[inline(always)]
pub fn is_host_bound(pkt: &Packet) -> bool {
    let (family, multicast) = match pkt.family {
        Family::V4 => (
            4,
            pkt.dst[0] & 0xf0 == 0xe0 || pkt.dst[..4] == [255, 255, 255, 255],
        ),
        Family::V6 => (6, pkt.dst[0] == 0xff),
    };
    if multicast {
        return true;
    }
    let key = HostKey {
        family,
        pad: [0; 3],
        addr: pkt.dst,
    };
    // SAFETY: only presence is read, never the value.
    if unsafe { FW_HOST1.get(&key) }.is_none() {
        return false;
    }
    if !pkt.has_ports || pkt.fragment {
        return true;
    }
    let svc = SvcKey {
        family,
        proto: pkt.proto,
        port: pkt.dport.to_be_bytes(),
        addr: pkt.dst,
    };
    // SAFETY: as above.
    unsafe { FW_SVC1.get(&svc) }.is_none()
}
