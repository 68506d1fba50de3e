//! The kernel's table lookup, in user space, over a [`Compiled`] value.
//!
//! It reads the tables exactly as `filter-ebpf/src/classify.rs` does: one
//! longest-prefix match per field, the AND of the class bitmaps and the
//! endpoint mask, the first rule set, and Log/Pass rules continuing at their
//! `next`. Tests compare it with the reference evaluator; the kernel tests
//! compare the kernel with it.

use std::net::IpAddr;

use filter_common::{action, MAX_HOPS};

use super::{prefix::Prefix, Compiled, PortEntry, Table};

/// The packet fields the classifier reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol.
    pub proto: u8,
    /// Source port; `None` without an L4 header with ports.
    pub sport: Option<u16>,
    /// Destination port or ICMP `type << 8 | code`; `None` without.
    pub dport: Option<u16>,
}

/// What a table says about a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The deciding rule (Allow or Deny), if any.
    pub decided: Option<usize>,
    /// Log rules met on the way, in order.
    pub logged: Vec<usize>,
}

fn lpm(entries: &[(Prefix, u32)], key: Prefix) -> Option<u32> {
    entries
        .iter()
        .filter(|(p, _)| p.contains(key))
        .max_by_key(|(p, _)| p.len)
        .map(|(_, c)| *c)
}

fn port_class(entries: &[PortEntry], proto: u8, port: Option<u16>) -> Option<u32> {
    entries
        .iter()
        .filter(|e| match e.proto {
            None => true,
            Some(p) => {
                p == proto
                    && e.has_ports == Some(port.is_some())
                    && port.is_none_or(|v| {
                        Prefix::new(u128::from(e.port), 16, e.port_len).contains(Prefix::new(
                            u128::from(v),
                            16,
                            16,
                        ))
                    })
            }
        })
        .max_by_key(|e| (e.proto.is_some(), e.port_len))
        .map(|e| e.class)
}

fn addr_key(ip: IpAddr) -> Prefix {
    match ip {
        IpAddr::V4(a) => Prefix::new(u128::from(u32::from(a)), 32, 32),
        IpAddr::V6(a) => Prefix::new(u128::from(a), 128, 128),
    }
}

/// Runs `table` for a packet on interface `iface`. `None`: no endpoint
/// entry (nothing of this table concerns the interface).
pub fn lookup(c: &Compiled, t: &Table, iface: &str, f: Fields) -> Option<Outcome> {
    let mask = t.masks.get(iface)?;
    let (src, dst) = match f.src {
        IpAddr::V4(_) => (&t.src_v4, &t.dst_v4),
        IpAddr::V6(_) => (&t.src_v6, &t.dst_v6),
    };
    let class = |id: Option<u32>| &c.classes[id.expect("every table has root entries") as usize];
    let maps = [
        mask,
        class(lpm(src, addr_key(f.src))),
        class(lpm(dst, addr_key(f.dst))),
        class(port_class(&t.dports, f.proto, f.dport)),
        class(port_class(&t.sports, f.proto, f.sport)),
    ];
    let mut hits = mask.clone();
    for m in &maps[1..] {
        hits.intersect_with(m);
    }
    let mut out = Outcome {
        decided: None,
        logged: Vec::new(),
    };
    let mut start = 0usize;
    for _ in 0..MAX_HOPS {
        let Some(r) = hits.first_from(start) else {
            return Some(out);
        };
        let info = t.rules[r];
        match info.action {
            action::ALLOW | action::DENY => {
                out.decided = Some(r);
                return Some(out);
            }
            action::LOG => out.logged.push(r),
            _ => {}
        }
        start = info.next as usize;
    }
    Some(out)
}
