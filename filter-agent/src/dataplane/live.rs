//! A crafted packet through the kernel programs, in the order a real one
//! meets them: for tests (on a [`Dataplane`] this process loaded) and for
//! `filter-agent explain --dataplane` (on the programs and maps a running
//! agent pinned, [`Live`]).

use std::{net::IpAddr, path::Path};

use aya::{
    maps::{HashMap, MapData},
    programs::{SchedClassifier, Xdp},
};
use aya_obj::programs::XdpAttachType;
use filter_common::{names, CtKey, CtValue};

use super::{
    conntrack::Flow,
    map_error,
    testrun::{run_tc, run_xdp},
    Dataplane, Error, TcRun,
};

const XDP_DROP: u32 = 1;
const TC_ACT_SHOT: i32 = 2;

/// The loopback's index: an interface without programs, for the far side
/// of a crafted forwarded packet.
pub const LOOPBACK: u32 = 1;

/// Something that can run the three programs under BPF_PROG_TEST_RUN.
pub trait Hooks {
    /// `fw_xdp` on `frame` arriving on `ifindex`; the XDP action.
    fn xdp(&mut self, frame: &[u8], ifindex: u32) -> Result<u32, Error>;
    /// `fw_tc_in` or `fw_tc_eg`; the TC action and the mark left.
    fn tc(&mut self, frame: &[u8], run: TcRun) -> Result<(i32, u32), Error>;
}

impl Hooks for Dataplane {
    fn xdp(&mut self, frame: &[u8], ifindex: u32) -> Result<u32, Error> {
        self.test_run_xdp(frame, ifindex)
    }
    fn tc(&mut self, frame: &[u8], run: TcRun) -> Result<(i32, u32), Error> {
        self.test_run_tc(frame, run)
    }
}

/// Where a crafted packet goes.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// Arrives on the endpoint (else leaves by it).
    pub ingress: bool,
    /// Routed through the node rather than to or from it.
    pub forwarded: bool,
    /// The endpoint's interface.
    pub ifindex: u32,
    /// The other interface of a forwarded packet (where it leaves, or came
    /// from); an interface without an endpoint.
    pub other_ifindex: u32,
}

/// What the kernel did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelVerdict {
    /// Passed every program it met.
    pub allowed: bool,
    /// The program that dropped it, or the last one it met.
    pub program: &'static str,
    /// That program's return code (XDP action or TC action).
    pub return_code: i64,
}

/// Runs the programs a packet meets (docs/design.md, "Kernel side"): ingress
/// `fw_xdp` then `fw_tc_in`, and for a forwarded packet `fw_tc_eg` of the
/// interface it leaves by, on `after_dnat` (the packet as kube-proxy
/// rewrote it) with the mark TC ingress left; egress `fw_tc_eg`.
pub fn judge(
    hooks: &mut impl Hooks,
    frame: &[u8],
    after_dnat: &[u8],
    route: Route,
) -> Result<KernelVerdict, Error> {
    let verdict = |program, allowed, return_code: i64| KernelVerdict {
        allowed,
        program,
        return_code,
    };
    if !route.ingress {
        let run = TcRun {
            ingress: false,
            ifindex: route.ifindex,
            ingress_ifindex: if route.forwarded {
                route.other_ifindex
            } else {
                0
            },
            mark: 0,
        };
        let (rc, _) = hooks.tc(frame, run)?;
        return Ok(verdict(names::PROG_TC_EGRESS, rc != TC_ACT_SHOT, rc.into()));
    }
    let action = hooks.xdp(frame, route.ifindex)?;
    if action == XDP_DROP {
        return Ok(verdict(names::PROG_XDP, false, action.into()));
    }
    let run = TcRun {
        ingress: true,
        ifindex: route.ifindex,
        ingress_ifindex: route.ifindex,
        mark: 0,
    };
    let (rc, mark) = hooks.tc(frame, run)?;
    if rc == TC_ACT_SHOT || !route.forwarded {
        return Ok(verdict(
            names::PROG_TC_INGRESS,
            rc != TC_ACT_SHOT,
            rc.into(),
        ));
    }
    let run = TcRun {
        ingress: false,
        ifindex: route.other_ifindex,
        ingress_ifindex: route.ifindex,
        mark,
    };
    let (rc, _) = hooks.tc(after_dnat, run)?;
    Ok(verdict(names::PROG_TC_EGRESS, rc != TC_ACT_SHOT, rc.into()))
}

/// The programs and conntrack table a running agent pinned.
pub struct Live {
    xdp: Xdp,
    tc_in: SchedClassifier,
    tc_eg: SchedClassifier,
    /// The conntrack tables: new flows, assured flows.
    ct: [HashMap<MapData, CtKey, CtValue>; 2],
    /// Conntrack's presence filter and its control word: an entry put in
    /// the tables is marked there too, or the programs would not look.
    seen: MapData,
    epoch: aya::maps::Array<MapData, u32>,
}

impl Hooks for Live {
    fn xdp(&mut self, frame: &[u8], ifindex: u32) -> Result<u32, Error> {
        run_xdp(&mut self.xdp, names::PROG_XDP, frame, ifindex, 1).map(|(a, _)| a)
    }
    fn tc(&mut self, frame: &[u8], run: TcRun) -> Result<(i32, u32), Error> {
        let (prog, name) = if run.ingress {
            (&mut self.tc_in, names::PROG_TC_INGRESS)
        } else {
            (&mut self.tc_eg, names::PROG_TC_EGRESS)
        };
        run_tc(prog, name, frame, run, 1).map(|(action, mark, _)| (action, mark))
    }
}

impl Live {
    /// Opens the pins under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Live, Error> {
        let load = |name: &str, e: aya::programs::ProgramError| Error::Load {
            what: format!(
                "pinned {name} in {} (is the agent running?)",
                pin_dir.display()
            ),
            source: Box::new(e),
        };
        let xdp = Xdp::from_pin(pin_dir.join(names::PROG_XDP), XdpAttachType::Interface)
            .map_err(|e| load(names::PROG_XDP, e))?;
        let tc_in = SchedClassifier::from_pin(pin_dir.join(names::PROG_TC_INGRESS))
            .map_err(|e| load(names::PROG_TC_INGRESS, e))?;
        let tc_eg = SchedClassifier::from_pin(pin_dir.join(names::PROG_TC_EGRESS))
            .map_err(|e| load(names::PROG_TC_EGRESS, e))?;
        let [new, assured] = super::conntrack::TABLES;
        let ct = [
            super::conntrack::open_pinned(pin_dir, new)?.0,
            super::conntrack::open_pinned(pin_dir, assured)?.0,
        ];
        let array = |name: &'static str| {
            Ok::<_, Error>(aya::maps::Map::Array(super::open_map_pin(pin_dir, name)?))
        };
        let seen = super::open_map_pin(pin_dir, names::MAP_CT_SEEN)?;
        let epoch = aya::maps::Array::try_from(array(names::MAP_CT_EPOCH)?)
            .map_err(map_error(names::MAP_CT_EPOCH, "open"))?;
        Ok(Live {
            xdp,
            tc_in,
            tc_eg,
            ct,
            seen,
            epoch,
        })
    }

    /// The conntrack entry of `flow` as it is now (in either table).
    pub fn flow_entry(&self, flow: &Flow) -> Option<CtValue> {
        let key = flow.key().0;
        self.ct.iter().find_map(|t| t.get(&key, 0).ok())
    }

    /// Puts the entry of `flow` back as it was (`None`: absent), so a
    /// crafted packet leaves no trace in the live tables.
    pub fn restore_flow(&mut self, flow: &Flow, was: Option<CtValue>) -> Result<(), Error> {
        let key = flow.key().0;
        for t in &mut self.ct {
            // Absent already is fine.
            let _ = t.remove(&key);
        }
        match was {
            Some(v) => self.insert(&key, &v, "restore"),
            None => Ok(()),
        }
    }

    /// Records `flow` as established (for `--established`).
    pub fn establish_flow(&mut self, flow: &Flow) -> Result<(), Error> {
        let (key, value) = super::conntrack::entry(flow, true);
        self.insert(&key, &value, "insert")
    }

    /// Inserts, then marks the presence filter (`ct::insert_mark`, as the
    /// programs and `Dataplane::open_flow` do).
    fn insert(&mut self, key: &CtKey, v: &CtValue, op: &'static str) -> Result<(), Error> {
        let name = super::conntrack::table_of(v);
        let i = usize::from(name != super::conntrack::TABLES[0]);
        self.ct[i].insert(key, v, 0).map_err(map_error(name, op))?;
        let control = self
            .epoch
            .get(&0, 0)
            .map_err(map_error(names::MAP_CT_EPOCH, "read"))?;
        if let Some(epoch) = filter_common::ct::insert_mark(control) {
            super::batch::store_bytes_in(
                &self.seen,
                names::MAP_CT_SEEN,
                &[key.seen_slot()],
                epoch,
            )?;
        }
        Ok(())
    }
}

/// Whether conntrack would accept a packet of `flow` sent by `flow.src`:
/// the flow is answered, or the packet is the answer.
pub fn known(flow: &Flow, entry: &CtValue) -> bool {
    let (key, src_is_a) = flow.key();
    let from_opener = src_is_a == (entry.flags & filter_common::ct::OPENED_BY_A != 0);
    let now = super::conntrack::monotonic_ns();
    !super::conntrack::expired(&key, entry, now)
        && (!from_opener || entry.flags & filter_common::ct::SEEN_REPLY != 0)
}

/// A frame for a crafted packet: Ethernet, IPv4 or IPv6, and a TCP, UDP
/// (also SCTP's ports) or ICMP header. Checksums are left zero: the
/// programs never check them.
pub fn frame(flow: &Flow, icmp: Option<(u8, u8)>, tcp_flags: u8) -> Vec<u8> {
    let mut l4 = match flow.proto {
        6 => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&flow.sport.to_be_bytes());
            h[2..4].copy_from_slice(&flow.dport.to_be_bytes());
            h[12] = 5 << 4;
            h[13] = tcp_flags;
            h
        }
        17 | 132 => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&flow.sport.to_be_bytes());
            h[2..4].copy_from_slice(&flow.dport.to_be_bytes());
            h[4..6].copy_from_slice(&8u16.to_be_bytes());
            h
        }
        1 | 58 => {
            let (t, c) = icmp.unwrap_or((if flow.proto == 1 { 8 } else { 128 }, 0));
            let mut h = vec![t, c, 0, 0, 0, 0, 0, 1];
            // Echo identifier: conntrack's "port".
            h[4..6].copy_from_slice(&flow.sport.to_be_bytes());
            h
        }
        _ => Vec::new(),
    };
    let mut out = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    match (flow.src, flow.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&[0x08, 0x00]);
            let total = (20 + l4.len()) as u16;
            let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, flow.proto, 0, 0];
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            out.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&[0x86, 0xdd]);
            let mut ip = vec![0x60, 0, 0, 0, 0, 0, flow.proto, 64];
            ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            out.extend_from_slice(&ip);
        }
        _ => {}
    }
    out.append(&mut l4);
    out
}
