//! Calico's ordering and endpoint binding (docs/semantics.md 1.3, 3.1,
//! 3.3): which host endpoint governs which interface, which policies apply
//! to it and in which stages, and the order of tiers and policies.

use super::*;

/// Picks this node's host endpoints and the interface each governs
/// (docs/semantics.md 1.3): an exact `interfaceName`, else the interface
/// holding one of `expectedIPs`; on a clash the name that sorts first wins.
/// A `*` endpoint then governs every interface no specific endpoint
/// claims, as Felix does, except those Felix never treats as host
/// interfaces: the loopback, its `InterfaceExclude` default (`kube-ipvs0`,
/// kube-proxy's dummy) and workload interfaces (`cali*`).
pub fn bind_endpoints<'a>(
    store: &'a Store,
    node: &Node,
) -> Vec<(String, &'a Resource<HostEndpointSpec>)> {
    let mut heps: Vec<_> = store
        .host_endpoints
        .iter()
        .filter(|h| h.spec.node == node.name)
        .collect();
    heps.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
    let mut bound: BTreeMap<String, &Resource<HostEndpointSpec>> = BTreeMap::new();
    // The first `*` endpoint by name.
    let mut wildcard = None;
    for h in heps {
        let iface = match h.spec.interface_name.as_str() {
            "*" => {
                wildcard.get_or_insert(h);
                continue;
            }
            "" => node
                .interfaces
                .iter()
                .find(|(_, addrs)| {
                    h.spec
                        .expected_ips
                        .iter()
                        .any(|ip| ip.parse().is_ok_and(|ip: IpAddr| addrs.contains(&ip)))
                })
                .map(|(name, _)| name.clone()),
            name => Some(name.to_owned()),
        };
        if let Some(iface) = iface {
            bound.entry(iface).or_insert(h);
        }
    }
    if let Some(h) = wildcard {
        for name in node.interfaces.keys() {
            if is_host_interface(name) {
                bound.entry(name.clone()).or_insert(h);
            }
        }
    }
    bound.into_iter().collect()
}

/// Whether an all-interfaces (`*`) endpoint governs `name`.
pub fn is_host_interface(name: &str) -> bool {
    name != "lo" && name != "kube-ipvs0" && !name.starts_with("cali")
}

/// Labels a host endpoint shows selectors: its own, over those its
/// profiles apply (1.3: the HEP's own labels win on a clash).
pub fn endpoint_labels(
    store: &Store,
    hep: &Resource<HostEndpointSpec>,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    for name in &hep.spec.profiles {
        if let Some(p) = store.profiles.iter().find(|p| &p.meta.name == name) {
            labels.extend(p.spec.labels_to_apply.clone());
        }
    }
    labels.extend(hep.meta.labels.clone());
    labels
}

/// Whether a global policy's selectors pick a host endpoint with `labels`.
pub fn applies_to_host_endpoint(
    spec: &GlobalNetworkPolicySpec,
    labels: &BTreeMap<String, String>,
) -> bool {
    // A HEP has no namespace or service-account labels: `all()` there means
    // "has a namespace" and never matches, while a negative expression still
    // can (docs/semantics.md 1.1).
    let scoped = |s: &Option<Written>| match s {
        None => true,
        Some(w) if w.is_blank() => true,
        Some(w) => !w.selector().is_all() && w.matches(&BTreeMap::new()),
    };
    let selected = spec.selector.as_ref().is_none_or(|s| s.matches(labels));
    selected && scoped(&spec.namespace_selector) && scoped(&spec.service_account_selector)
}

/// The stages a global policy takes part in (3.1).
pub fn policy_stages(spec: &GlobalNetworkPolicySpec) -> Vec<u32> {
    if spec.do_not_track {
        vec![stage::UNTRACKED]
    } else if spec.pre_dnat {
        vec![stage::PRE_DNAT]
    } else if spec.apply_on_forward {
        vec![stage::NORMAL, stage::FORWARD]
    } else {
        vec![stage::NORMAL]
    }
}

/// The rules of `spec` for `direction` if the policy governs it.
pub fn policy_rules(
    spec: &GlobalNetworkPolicySpec,
    direction: u32,
) -> Option<&[std::sync::Arc<Rule>]> {
    let types = model::validate::effective_types(spec);
    match direction {
        direction::INGRESS if types.contains(&PolicyType::Ingress) => Some(&spec.ingress),
        direction::EGRESS if types.contains(&PolicyType::Egress) && !spec.pre_dnat => {
            Some(&spec.egress)
        }
        _ => None,
    }
}

/// A tier as evaluated: name, order and end action.
#[derive(Debug, Clone)]
pub struct TierInfo {
    /// Name.
    pub name: String,
    /// Order (unset: last).
    pub order: Option<f64>,
    /// End action in the normal and forward stages.
    pub default_action: TierAction,
}

/// All tiers in evaluation order, the implicit `default` included.
pub fn tiers(store: &Store) -> Vec<TierInfo> {
    let mut out: Vec<TierInfo> = store
        .tiers
        .iter()
        .map(|t| TierInfo {
            name: t.meta.name.clone(),
            order: t.spec.order,
            default_action: t.spec.default_action.unwrap_or(TierAction::Deny),
        })
        .collect();
    if !out.iter().any(|t| t.name == defaults::TIER) {
        out.push(TierInfo {
            name: defaults::TIER.into(),
            order: Some(defaults::TIER_ORDER),
            default_action: TierAction::Deny,
        });
    }
    out.sort_by(|a, b| order_cmp(a.order, b.order).then_with(|| a.name.cmp(&b.name)));
    out
}

/// The tier a policy belongs to.
pub fn policy_tier(spec: &GlobalNetworkPolicySpec) -> &str {
    spec.tier.as_deref().unwrap_or(defaults::TIER)
}

pub(super) fn order_cmp(a: Option<f64>, b: Option<f64>) -> Ordering {
    a.unwrap_or(f64::INFINITY)
        .total_cmp(&b.unwrap_or(f64::INFINITY))
}

/// Policy evaluation order within a tier: order (unset last), then name.
pub fn policy_order(
    a: &Resource<GlobalNetworkPolicySpec>,
    b: &Resource<GlobalNetworkPolicySpec>,
) -> Ordering {
    order_cmp(a.spec.order, b.spec.order).then_with(|| a.meta.name.cmp(&b.meta.name))
}
