//! Forwarded or host-bound: is a packet for this node?
//!
//! In: a parsed packet at TC ingress (its destination before DNAT) and the
//! interface it arrived on. Out: whether the normal ingress stage judges it
//! here (host-bound) or the forward stage judges it at TC egress
//! (docs/design.md). The kernel's FIB decides, as it will for the packet a
//! moment later: a local, broadcast (the subnets' directed broadcasts
//! included), multicast or anycast destination is delivered to the node,
//! and so is everything when forwarding is off on the interface. Asking
//! the FIB leaves no window: an address added a moment ago is local at
//! once. The agent's list of node addresses (`FW_HOST1`) is the fallback
//! when the FIB cannot answer. Service frontends kube-proxy rewrites
//! (`FW_SVC2`, NodePorts on node addresses among them) are forwarded: they
//! meet the forward stage after DNAT.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LOOKUP_SKIP_NEIGH,
    },
    helpers::bpf_fib_lookup,
    macros::map,
    maps::HashMap,
};
use filter_common::{HostKey, SvcKey, MAX_FRONTENDS, MAX_HOST_ADDRS};

use crate::parse::{Family, Packet};

#[map(name = "FW_HOST1")]
static FW_HOST1: HashMap<HostKey, u32> = HashMap::pinned(MAX_HOST_ADDRS, 0);

/// Allocated as entries come: a node has a few hundred frontends, not
/// 65,536 (preallocated, 6 MiB whatever the cluster), and only the agent
/// writes it, never a packet.
#[map(name = "FW_SVC2")]
static FW_SVC2: HashMap<SvcKey, u32> =
    HashMap::pinned(MAX_FRONTENDS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Whether `pkt`, which arrived on `ifindex`, is addressed to the node
/// itself, and not to a Service frontend on one of its addresses.
/// `skb`: the program's `__sk_buff`, which the FIB helper needs.
#[inline(never)]
pub fn is_host_bound(skb: *mut core::ffi::c_void, ifindex: u32, pkt: &Packet) -> bool {
    let family = pkt.family.code();
    let multicast = match pkt.family {
        Family::V4 => pkt.dst[0] & 0xf0 == 0xe0 || pkt.dst[..4] == [255, 255, 255, 255],
        Family::V6 => pkt.dst[0] == 0xff,
    };
    if multicast {
        return true;
    }
    let local = match fib_delivers_locally(skb, ifindex, pkt) {
        Some(local) => local,
        None => {
            let key = HostKey {
                family,
                // A literal: `[0; 3]` becomes a `memset` call (see
                // `parse::v4_in_16`).
                pad: [0, 0, 0],
                addr: pkt.dst,
            };
            // SAFETY: only presence is read, never the value.
            unsafe { FW_HOST1.get(&key) }.is_some()
        }
    };
    if !local {
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
    unsafe { FW_SVC2.get(&svc) }.is_none()
}

/// The FIB's answer for `pkt` arriving on `ifindex`: `Some(true)` when the
/// kernel will not forward it (a local, broadcast, multicast or anycast
/// route, or forwarding off on the interface), `Some(false)` when it will
/// route it on, `None` when the FIB could not be asked (an unknown
/// interface, as in test runs, or an older kernel).
#[inline(always)]
fn fib_delivers_locally(skb: *mut core::ffi::c_void, ifindex: u32, pkt: &Packet) -> Option<bool> {
    let mut params = core::mem::MaybeUninit::<FibParams>::uninit();
    let p = zeroed(&mut params);
    p.ifindex = ifindex;
    p.l4_protocol = pkt.proto;
    p.sport = pkt.sport.to_be();
    p.dport = pkt.dport.to_be();
    match pkt.family {
        Family::V4 => {
            p.family = AF_INET;
            // Network order in memory, as the helper expects.
            p.__bindgen_anon_3.ipv4_src =
                u32::from_ne_bytes([pkt.src[0], pkt.src[1], pkt.src[2], pkt.src[3]]);
            p.__bindgen_anon_4.ipv4_dst =
                u32::from_ne_bytes([pkt.dst[0], pkt.dst[1], pkt.dst[2], pkt.dst[3]]);
        }
        Family::V6 => {
            p.family = AF_INET6;
            p.__bindgen_anon_3.ipv6_src = words(&pkt.src);
            p.__bindgen_anon_4.ipv6_dst = words(&pkt.dst);
        }
    }
    // SAFETY: `skb` is the program's context and `p` a valid, writable
    // bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            skb,
            p,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if rc < 0 {
        return None;
    }
    Some(rc == BPF_FIB_LKUP_RET_NOT_FWDED as i64 || rc == BPF_FIB_LKUP_RET_FWD_DISABLED as i64)
}

/// An all-zero bpf_fib_lookup in `p`, written a word at a time:
/// `mem::zeroed` becomes a call to aya-ebpf's byte-by-byte `memset`, 60
/// iterations per packet (see `parse::v4_in_16`); volatile stores are not
/// merged back into one.
#[inline(always)]
fn zeroed(p: &mut core::mem::MaybeUninit<FibParams>) -> &mut FibParams {
    const WORDS: usize = core::mem::size_of::<FibParams>() / 4;
    const _: () = assert!(core::mem::size_of::<FibParams>().is_multiple_of(4));
    let words = p.as_mut_ptr().cast::<u32>();
    for i in 0..WORDS {
        // SAFETY: word `i` lies inside `p` (`WORDS` words), which is
        // 4-aligned (its fields are u32 and smaller).
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: every byte is written, and all-zero is a valid
    // bpf_fib_lookup (plain integers and unions of them).
    unsafe { p.assume_init_mut() }
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}
