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

/// Felix's `FailsafeInboundHostPorts` (protocol, destination port),
/// tcp:5473 included (the docs' table leaves it out).
pub const FAILSAFE_INBOUND: [(u8, u16); 9] = [
    (TCP, 22),
    (UDP, 68),
    (TCP, 179),
    (TCP, 2379),
    (TCP, 2380),
    (TCP, 5473),
    (TCP, 6443),
    (TCP, 6666),
    (TCP, 6667),
];

/// Felix's `FailsafeOutboundHostPorts`.
pub const FAILSAFE_OUTBOUND: [(u8, u16); 9] = [
    (UDP, 53),
    (UDP, 67),
    (TCP, 179),
    (TCP, 2379),
    (TCP, 2380),
    (TCP, 5473),
    (TCP, 6443),
    (TCP, 6666),
    (TCP, 6667),
];
