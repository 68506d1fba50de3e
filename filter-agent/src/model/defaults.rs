//! Calico's defaults (docs/semantics.md 1.1, 1.3, 1.5, 4): the values a
//! resource gets when it does not say. The compiler and the reference
//! evaluator both read them here, so the two cannot disagree about them.
//! (Policy `types` defaulting is `validate::effective_types`.)

use filter_common::proto::{TCP, UDP};

/// The tier of a policy that names none.
pub const TIER: &str = "default";

/// Order of the `default` tier when no Tier resource defines it.
pub const TIER_ORDER: f64 = 1_000_000.0;

/// The built-in profile that allows everything in and out (auto host
/// endpoints use it); no Profile resource defines it.
pub const ALLOW_PROFILE: &str = "projectcalico-default-allow";

/// The FelixConfiguration that holds the cluster-wide settings; `node.<name>`
/// overrides it field by field.
pub const FELIX_CONFIG: &str = "default";

/// The control-plane ports both of Felix's failsafe lists hold (BGP, etcd,
/// Typha, the API server, kube-proxy's).
const CONTROL_PLANE: [(u8, u16); 7] = [
    (TCP, 179),
    (TCP, 2379),
    (TCP, 2380),
    (TCP, 5473),
    (TCP, 6443),
    (TCP, 6666),
    (TCP, 6667),
];

/// `first`, then [`CONTROL_PLANE`].
const fn with_control_plane(first: [(u8, u16); 2]) -> [(u8, u16); 9] {
    let mut out = [
        first[0],
        first[1],
        (0, 0),
        (0, 0),
        (0, 0),
        (0, 0),
        (0, 0),
        (0, 0),
        (0, 0),
    ];
    let mut i = 0;
    while i < CONTROL_PLANE.len() {
        out[i + 2] = CONTROL_PLANE[i];
        i += 1;
    }
    out
}

/// Felix's `FailsafeInboundHostPorts` (protocol, destination port):
/// SSH and DHCP client, then the control plane (tcp:5473 included; the
/// docs' table leaves it out).
pub const FAILSAFE_INBOUND: [(u8, u16); 9] = with_control_plane([(TCP, 22), (UDP, 68)]);

/// Felix's `FailsafeOutboundHostPorts`: DNS and DHCP server, then the
/// control plane.
pub const FAILSAFE_OUTBOUND: [(u8, u16); 9] = with_control_plane([(UDP, 53), (UDP, 67)]);

/// A FelixConfiguration setting for `node`: its `node.<name>` resource
/// wins over `default`, as Felix merges them.
pub fn felix_setting<T>(
    store: &super::Store,
    node: &str,
    get: impl Fn(&super::FelixConfigurationSpec) -> Option<T>,
) -> Option<T> {
    let node_config = format!("node.{node}");
    [node_config.as_str(), FELIX_CONFIG]
        .iter()
        .find_map(|name| {
            store
                .felix_configs
                .iter()
                .find(|c| c.meta.name == *name)
                .and_then(|c| get(&c.spec))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failsafe_lists_are_felixs() {
        let text = |l: &[(u8, u16)]| -> Vec<String> {
            l.iter()
                .map(|&(p, port)| format!("{}:{port}", if p == TCP { "tcp" } else { "udp" }))
                .collect()
        };
        assert_eq!(
            text(&FAILSAFE_INBOUND).join(", "),
            "tcp:22, udp:68, tcp:179, tcp:2379, tcp:2380, tcp:5473, tcp:6443, tcp:6666, tcp:6667"
        );
        assert_eq!(
            text(&FAILSAFE_OUTBOUND).join(", "),
            "udp:53, udp:67, tcp:179, tcp:2379, tcp:2380, tcp:5473, tcp:6443, tcp:6666, tcp:6667"
        );
    }
}
