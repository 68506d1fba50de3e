//! Random frames of the shapes attackers use (VLAN stacks, IPv4 options
//! and fragments, IPv6 extension chains, truncation), and an independent
//! model of what the kernel's stack would deliver from each: the oracle
//! of `random_frames_are_dropped_or_judged_on_what_the_kernel_delivers`.

use filter_tests::Rng;

/// What the kernel makes of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Not delivered on its own (malformed, or a non-first fragment that
    /// only reassembly with a judged first fragment could deliver).
    Nothing,
    /// A first fragment whose L4 fields the kernel would only learn from
    /// later fragments: a filter must drop it.
    Ambiguous,
    /// Delivered as this (protocol, destination port or ICMP type).
    Delivered { proto: u8, dport: u16 },
}

/// How the frame was built, for the liveness half of the property: a frame
/// within the parser's bounds and not a fragment must be judged, not
/// dropped as malformed.
pub struct Frame {
    pub bytes: Vec<u8>,
    pub within_bounds: bool,
}

const SRC4: [u8; 4] = [198, 51, 100, 20];
const DST4: [u8; 4] = [198, 51, 100, 1];
const SRC6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20,
];
const DST6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
];

fn below(rng: &mut Rng, n: u64) -> usize {
    (rng.next_u64() % n) as usize
}

/// An L4 header and payload: TCP (20 bytes, SYN), UDP or ICMP echo.
fn l4(rng: &mut Rng, proto: u8) -> Vec<u8> {
    let dport: u16 = *rng.pick(&[80, 8080, 30000, 31000, 32767, 32768]);
    let mut v = Vec::new();
    match proto {
        6 => {
            v.extend_from_slice(&40000u16.to_be_bytes());
            v.extend_from_slice(&dport.to_be_bytes());
            v.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 4, 0, 0, 0, 0, 0]);
        }
        17 => {
            v.extend_from_slice(&40000u16.to_be_bytes());
            v.extend_from_slice(&dport.to_be_bytes());
            v.extend_from_slice(&[0, 16, 0, 0]);
        }
        _ => {
            // Echo request or reply (ICMP 8/0, ICMPv6 128/129).
            let ty = match (proto, rng.one_in(2)) {
                (1, true) => 8,
                (1, false) => 0,
                (_, true) => 128,
                (_, false) => 129,
            };
            v.extend_from_slice(&[ty, 0, 0, 0, 0, 7, 0, 1]);
        }
    }
    let extra = below(rng, 24);
    v.extend(std::iter::repeat_n(0xab, extra));
    v
}

/// A random frame.
pub fn random(rng: &mut Rng) -> Frame {
    let mut bytes = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    let tags = if rng.one_in(2) { 0 } else { below(rng, 11) };
    for _ in 0..tags {
        let tpid: [u8; 2] = *rng.pick(&[[0x81, 0x00], [0x88, 0xa8]]);
        bytes.extend_from_slice(&tpid);
        bytes.extend_from_slice(&[0, 0]);
    }
    let v6 = rng.one_in(2);
    let mut within = tags <= 8;
    let mut fragment = false;
    if !v6 {
        bytes.extend_from_slice(&[0x08, 0x00]);
        let proto = *rng.pick(&[6u8, 17, 1]);
        let body = l4(rng, proto);
        let ihl = if rng.one_in(2) { 5 } else { 5 + below(rng, 11) };
        // A fragment: none, first (MF), or later (offset 1..=4).
        let (offset, more) = match below(rng, 4) {
            0 => (0u16, true),
            1 => (1 + below(rng, 4) as u16, rng.one_in(2)),
            _ => (0, false),
        };
        fragment = offset != 0 || more;
        // A first fragment carries a random share of the L4 bytes.
        let carried = if more && offset == 0 {
            8 * (1 + below(rng, body.len() as u64 / 8))
        } else {
            body.len()
        };
        let body = &body[..carried.min(body.len())];
        let total = (ihl * 4 + body.len()) as u16;
        let flags = offset | if more { 0x2000 } else { 0 };
        let mut ip = vec![0x40 | ihl as u8, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0x12, 0x34]);
        ip.extend_from_slice(&flags.to_be_bytes());
        ip.extend_from_slice(&[64, proto, 0, 0]);
        ip.extend_from_slice(&SRC4);
        ip.extend_from_slice(&DST4);
        ip.extend(std::iter::repeat_n(1u8, (ihl - 5) * 4)); // NOP options
        bytes.extend_from_slice(&ip);
        bytes.extend_from_slice(body);
    } else {
        bytes.extend_from_slice(&[0x86, 0xdd]);
        let proto = *rng.pick(&[6u8, 17, 58]);
        let body = l4(rng, proto);
        let exts = if rng.one_in(2) { 0 } else { below(rng, 11) };
        within &= exts <= 8;
        let frag = below(rng, 4); // 0: first fragment, 1: later, else none
        let mut chain: Vec<[u8; 8]> = (0..exts).map(|_| [60, 0, 1, 4, 0, 0, 0, 0]).collect();
        if frag < 2 {
            let offset: u16 = if frag == 0 {
                0
            } else {
                1 + below(rng, 4) as u16
            };
            let m = u16::from(frag == 0 || rng.one_in(2));
            let off = (offset << 3) | m;
            let [a, b] = off.to_be_bytes();
            chain.push([44, 0, a, b, 0, 0, 0x56, 0x78]);
            within &= exts < 8;
            fragment = true;
        }
        // Link the chain: each header names the next; the last the upper layer.
        let n = chain.len();
        let first_next = chain.first().map_or(proto, |h| h[0]);
        for i in 0..n {
            chain[i][0] = if i + 1 < n { chain[i + 1][0] } else { proto };
        }
        let first_fragment = frag == 0;
        let body = if first_fragment {
            let carried = 8 * (1 + below(rng, body.len() as u64 / 8));
            body[..carried.min(body.len())].to_vec()
        } else {
            body
        };
        let plen = (n * 8 + body.len()) as u16;
        bytes.extend_from_slice(&[0x60, 0, 0, 0]);
        bytes.extend_from_slice(&plen.to_be_bytes());
        bytes.extend_from_slice(&[first_next, 64]);
        bytes.extend_from_slice(&SRC6);
        bytes.extend_from_slice(&DST6);
        for h in &chain {
            bytes.extend_from_slice(h);
        }
        bytes.extend_from_slice(&body);
    }
    // Truncation, sometimes (never below an Ethernet header).
    if rng.one_in(5) {
        let cut = 14 + below(rng, (bytes.len() - 14) as u64);
        bytes.truncate(cut);
        within = false;
    }
    Frame {
        bytes,
        within_bounds: within && !fragment,
    }
}

/// Whether `f` is an IP frame cut inside its IP header: BPF_PROG_TEST_RUN
/// refuses to run a TC program on one (XDP still runs it).
pub fn cut_in_ip_header(f: &[u8]) -> bool {
    let mut off = 12;
    while matches!(f.get(off..off + 2), Some([0x81, 0x00] | [0x88, 0xa8])) {
        off += 4;
    }
    match f.get(off..off + 2) {
        Some([0x08, 0x00]) => f.len() < off + 2 + 20,
        Some([0x86, 0xdd]) => f.len() < off + 2 + 40,
        _ => false,
    }
}

/// What the kernel would deliver from `f`, read independently of the
/// parser under test (and with no bound on tags or headers).
pub fn kernel_view(f: &[u8]) -> View {
    let mut off = 12;
    let at = |i: usize, n: usize| f.get(i..i + n);
    loop {
        match at(off, 2) {
            Some([0x81, 0x00] | [0x88, 0xa8]) => off += 4,
            Some(_) => break,
            None => return View::Nothing,
        }
    }
    let Some(et) = at(off, 2) else {
        return View::Nothing;
    };
    let l3 = off + 2;
    match et {
        [0x08, 0x00] => ipv4(f, l3),
        [0x86, 0xdd] => ipv6(f, l3),
        _ => View::Nothing,
    }
}

fn ipv4(f: &[u8], l3: usize) -> View {
    let Some(h) = f.get(l3..l3 + 20) else {
        return View::Nothing;
    };
    let ihl = (h[0] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([h[2], h[3]]) as usize;
    if h[0] >> 4 != 4 || ihl < 20 || total < ihl || f.len() < l3 + total {
        return View::Nothing;
    }
    let flags = u16::from_be_bytes([h[6], h[7]]);
    if flags & 0x1fff != 0 {
        return View::Nothing;
    }
    let first = flags & 0x2000 != 0;
    upper(&f[l3 + ihl..l3 + total], h[9], first)
}

fn ipv6(f: &[u8], l3: usize) -> View {
    let Some(h) = f.get(l3..l3 + 40) else {
        return View::Nothing;
    };
    let plen = u16::from_be_bytes([h[4], h[5]]) as usize;
    if h[0] >> 4 != 6 || f.len() < l3 + 40 + plen {
        return View::Nothing;
    }
    let end = l3 + 40 + plen;
    let (mut next, mut off, mut first) = (h[6], l3 + 40, false);
    loop {
        match next {
            0 | 43 | 60 => {
                let Some(e) = f.get(off..off + 2).filter(|_| off + 2 <= end) else {
                    return View::Nothing;
                };
                next = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            44 => {
                let Some(e) = f.get(off..off + 8).filter(|_| off + 8 <= end) else {
                    return View::Nothing;
                };
                if u16::from_be_bytes([e[2], e[3]]) >> 3 != 0 {
                    return View::Nothing;
                }
                first |= e[3] & 1 != 0;
                next = e[0];
                off += 8;
            }
            _ => break,
        }
        if off > end {
            return View::Nothing;
        }
    }
    upper(&f[off..end], next, first)
}

/// The upper layer in `p` (the bytes this packet, or first fragment,
/// carries): its destination port or ICMP type, if the kernel would have
/// it.
fn upper(p: &[u8], proto: u8, first_fragment: bool) -> View {
    let need = if first_fragment {
        // A first fragment is completed by later ones, which cannot change
        // bytes it carries (the kernel discards overlaps): what policy
        // reads must be in it (TCP through the flags, the ports, ICMP type
        // and code), or what the kernel will deliver is unknown here.
        match proto {
            6 => 14,
            17 => 4,
            1 | 58 => 2,
            _ => 0,
        }
    } else {
        // The kernel drops a packet shorter than its L4 header.
        match proto {
            6 => 20,
            17 | 1 | 58 => 8,
            _ => 0,
        }
    };
    if p.len() < need {
        return if first_fragment {
            View::Ambiguous
        } else {
            View::Nothing
        };
    }
    let dport = match proto {
        6 | 17 => u16::from_be_bytes([p[2], p[3]]),
        _ => u16::from(p[0]) << 8 | u16::from(p[1]),
    };
    View::Delivered { proto, dport }
}
