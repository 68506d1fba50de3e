//! Failsafe ports for the kernel (docs/semantics.md 4): FelixConfiguration
//! `default`, overridden field by field by `node.<node>`; Calico's defaults
//! (tcp:5473 included) where neither sets a list; `[]` disables one.

use ipnetwork::IpNetwork;

use crate::model::{ProtoPort, Store};

/// One failsafe entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failsafe {
    /// True: inbound (protocol, destination port, source net); false:
    /// outbound (protocol, destination port, destination net).
    pub inbound: bool,
    /// 6 or 17.
    pub proto: u8,
    /// Destination port.
    pub port: u16,
    /// Peer net, if limited.
    pub net: Option<IpNetwork>,
}

/// The failsafe entries in force for `node`.
pub fn entries(store: &Store, node: &str) -> Vec<Failsafe> {
    let defaults = |inbound: bool, list: &[(u8, u16)]| -> Vec<Failsafe> {
        list.iter()
            .map(|&(proto, port)| Failsafe {
                inbound,
                proto,
                port,
                net: None,
            })
            .collect()
    };
    let (mut inbound, mut outbound) = (
        defaults(true, &crate::model::defaults::FAILSAFE_INBOUND),
        defaults(false, &crate::model::defaults::FAILSAFE_OUTBOUND),
    );
    let node_config = format!("node.{node}");
    for name in [crate::model::defaults::FELIX_CONFIG, node_config.as_str()] {
        let Some(cfg) = store.felix_configs.iter().find(|c| c.meta.name == name) else {
            continue;
        };
        if let Some(l) = &cfg.spec.failsafe_inbound_host_ports {
            inbound = convert(true, l);
        }
        if let Some(l) = &cfg.spec.failsafe_outbound_host_ports {
            outbound = convert(false, l);
        }
    }
    inbound.extend(outbound);
    inbound
}

/// Felix's string parser takes TCP and UDP only; other entries are skipped
/// as Felix skips them.
fn convert(inbound: bool, list: &[ProtoPort]) -> Vec<Failsafe> {
    list.iter()
        .filter_map(|p| {
            let proto = match p.protocol.to_ascii_uppercase().as_str() {
                "TCP" => 6,
                "UDP" => 17,
                _ => return None,
            };
            let net = match &p.net {
                Some(n) => Some(crate::model::parse_net(n).ok()?),
                None => None,
            };
            Some(Failsafe {
                inbound,
                proto,
                port: p.port,
                net,
            })
        })
        .collect()
}
