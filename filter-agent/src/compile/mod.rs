//! Store → classifier tables: pure functions, no I/O, no kernel.
//!
//! In: a validated [`Store`], this node's name and its interfaces. Out: a
//! [`Compiled`] value: the interfaces to attach to, and for every stage and
//! direction the ordered rule list and the trie contents of filter-common's
//! layout, with every distinct bitmap stored once as a class.
//!
//! Rule order in a table is the evaluation order of docs/semantics.md 3.3:
//! tiers by order (unset last) then name; in a tier, the policies that have a
//! rule list for the stage and direction, by order (unset last) then name,
//! each rule in turn; after a tier of the normal and forward stages whose end
//! action is Deny, a match-all Deny; after the last tier of the normal stage,
//! each endpoint's profiles and a final Deny. Which of these rules concern an
//! endpoint is its mask: a tier's end rule is in the mask of the endpoints
//! some policy of the tier applies to, so a tier with no applying policy is
//! skipped entirely (3.3 step 1).
//!
//! Rule selectors, network sets and named ports become address sets here;
//! a named port couples address and port, so such a rule is split into
//! adjacent parts that share its action (a Log part continues past its
//! siblings, so a packet is logged once per rule).

pub mod bits;
pub mod emulate;
pub mod failsafe;
pub mod prefix;
pub mod services;

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use filter_common::{action, direction, stage};
use ipnetwork::IpNetwork;

use crate::{
    model::{
        self, defaults, Action, EntityRule, GlobalNetworkPolicySpec, HostEndpointSpec, PolicyType,
        Port, ProfileSpec, Resource, Rule, Store, TierAction,
    },
    selector::Selector,
};
use bits::RuleSet;
use prefix::{FieldMatch, Prefix};

/// Why a store cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A policy uses something this dataplane cannot enforce exactly; it is
    /// refused rather than enforced differently from Calico.
    #[error("{origin}: {field}: {message}")]
    Unsupported {
        /// Where the policy is.
        origin: model::Origin,
        /// The field at fault.
        field: String,
        /// What is not supported.
        message: String,
    },
}

/// A host endpoint bound to one of this node's interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundEndpoint {
    /// Interface name.
    pub iface: String,
    /// HostEndpoint resource name.
    pub hep: String,
}

/// Who wrote a rule of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Rule `rule` of a policy's rule list.
    Policy {
        /// Tier name.
        tier: String,
        /// Policy name.
        policy: String,
        /// Index in the policy's ingress or egress list.
        rule: usize,
    },
    /// A tier's end action (Deny) when none of its policies decided.
    TierEnd {
        /// Tier name.
        tier: String,
    },
    /// Rule `rule` of a profile.
    Profile {
        /// Profile name.
        profile: String,
        /// Index in its rule list.
        rule: usize,
    },
    /// The normal stage's final drop: no profile allowed (3.3 step 5).
    NoProfileAllowed,
}

/// A rule as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleInfo {
    /// One of `filter_common::action`.
    pub action: u32,
    /// Where Log and Pass go on (see `RuleMeta::next`).
    pub next: u32,
    /// Index into [`Compiled::owners`].
    pub owner: u32,
}

/// A port-trie entry: protocol (`None`: any), the has-ports flag (`None`:
/// either) and a port prefix under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortEntry {
    /// IP protocol, or any.
    pub proto: Option<u8>,
    /// Has-ports flag, or either (only with `proto: None`).
    pub has_ports: Option<bool>,
    /// Port value (meaningful bits: `port_len`).
    pub port: u16,
    /// Port prefix length, 0-16.
    pub port_len: u8,
    /// Class number.
    pub class: u32,
}

/// The contents of one stage × direction table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// `filter_common::stage` value.
    pub stage: u32,
    /// `filter_common::direction` value.
    pub direction: u32,
    /// Rules in evaluation order; index = rule number.
    pub rules: Vec<RuleInfo>,
    /// IPv4 source prefixes → class.
    pub src_v4: Vec<(Prefix, u32)>,
    /// IPv4 destination prefixes → class.
    pub dst_v4: Vec<(Prefix, u32)>,
    /// IPv6 source prefixes → class.
    pub src_v6: Vec<(Prefix, u32)>,
    /// IPv6 destination prefixes → class.
    pub dst_v6: Vec<(Prefix, u32)>,
    /// Protocol / destination port (or ICMP type and code) entries.
    pub dports: Vec<PortEntry>,
    /// Protocol / source port entries.
    pub sports: Vec<PortEntry>,
    /// Interface name → rules that concern its endpoint. Absent: nothing of
    /// this stage and direction applies.
    pub masks: BTreeMap<String, RuleSet>,
}

/// Everything one generation of the dataplane needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// Endpoints of this node, one per interface.
    pub endpoints: Vec<BoundEndpoint>,
    /// Class number → rule set; class 0 is the empty set.
    pub classes: Vec<RuleSet>,
    /// Rule owners, shared by all tables.
    pub owners: Vec<Owner>,
    /// One table per stage and direction, at `stage * 2 + direction`.
    pub tables: Vec<Table>,
    /// Failsafe ports.
    pub failsafe: Vec<failsafe::Failsafe>,
    /// Service frontends on this node.
    pub frontends: Vec<services::Frontend>,
}

impl Compiled {
    /// The table of `stage` and `direction`.
    pub fn table(&self, stage: u32, direction: u32) -> &Table {
        &self.tables[(stage * 2 + direction) as usize]
    }
}

/// What the compiler needs to know about the node.
#[derive(Debug, Clone, Default)]
pub struct Node {
    /// Node name (HostEndpoint `spec.node`).
    pub name: String,
    /// Interface name → its addresses, for HEPs bound by `expectedIPs`.
    pub interfaces: BTreeMap<String, Vec<IpAddr>>,
}

/// Picks this node's host endpoints and the interface each governs
/// (docs/semantics.md 1.3): an exact `interfaceName`, else the interface
/// holding one of `expectedIPs`; on a clash the name that sorts first wins.
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
    for h in heps {
        let iface = match h.spec.interface_name.as_str() {
            "*" => {
                tracing::warn!(hep = %h.meta.name, "interfaceName \"*\" is not supported yet; endpoint ignored");
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
    bound.into_iter().collect()
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
    let scoped = |s: &Option<String>| match s.as_deref().map(str::trim) {
        None | Some("") => true,
        Some(text) => match Selector::parse(text) {
            Ok(sel) if sel == Selector::parse("all()").expect("constant") => false,
            Ok(sel) => sel.matches(&BTreeMap::new()),
            Err(_) => false,
        },
    };
    let selected = match spec.selector.as_deref() {
        None => true,
        Some(text) => Selector::parse(text).is_ok_and(|s| s.matches(labels)),
    };
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
pub fn policy_rules(spec: &GlobalNetworkPolicySpec, direction: u32) -> Option<&[Rule]> {
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

fn order_cmp(a: Option<f64>, b: Option<f64>) -> Ordering {
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

/// Compiles `store` for `node`.
pub fn compile(store: &Store, node: &Node) -> Result<Compiled, Error> {
    let bound = bind_endpoints(store, node);
    let labels: Vec<BTreeMap<String, String>> = bound
        .iter()
        .map(|(_, h)| endpoint_labels(store, h))
        .collect();
    let mut policies: Vec<&Resource<GlobalNetworkPolicySpec>> =
        store.global_policies.iter().collect();
    policies.sort_by(|a, b| policy_order(a, b));
    let tiers = tiers(store);
    let resolver = Resolver::new(store);

    let mut owners = Vec::new();
    let mut interner = Interner::default();
    let mut tables = Vec::new();
    for stage in filter_common::Stage::ALL.map(|s| s as u32) {
        for (direction, direction_name) in
            filter_common::Direction::ALL.map(|d| (d as u32, d.name()))
        {
            let mut b = TableBuilder::default();
            for tier in &tiers {
                let members: Vec<_> = policies
                    .iter()
                    .filter(|p| {
                        policy_tier(&p.spec) == tier.name && policy_stages(&p.spec).contains(&stage)
                    })
                    .filter_map(|p| policy_rules(&p.spec, direction).map(|r| (*p, r)))
                    .collect();
                let mut tier_eps = BTreeSet::new();
                let mut pass_rules = Vec::new();
                for (p, rules) in members {
                    let eps: BTreeSet<usize> = (0..bound.len())
                        .filter(|&e| applies_to_host_endpoint(&p.spec, &labels[e]))
                        .filter(|&e| {
                            stage != stage::UNTRACKED || bound[e].1.spec.interface_name != "*"
                        })
                        .collect();
                    if eps.is_empty() {
                        continue;
                    }
                    tier_eps.extend(&eps);
                    for (i, r) in rules.iter().enumerate() {
                        let owner = push_owner(
                            &mut owners,
                            Owner::Policy {
                                tier: tier.name.clone(),
                                policy: p.meta.name.clone(),
                                rule: i,
                            },
                        );
                        let field = format!("spec.{direction_name}[{i}]");
                        let parts = resolver
                            .rule(r)
                            .map_err(|m| unsupported(&p.origin, &p.meta.name, &field, &m))?;
                        let range = b.push(r.action, owner, parts, &eps);
                        if r.action == Action::Pass {
                            pass_rules.push(range);
                        }
                    }
                }
                if tier_eps.is_empty() {
                    continue;
                }
                let end_deny = matches!(stage, stage::NORMAL | stage::FORWARD)
                    && tier.default_action == TierAction::Deny;
                if end_deny {
                    let owner = push_owner(
                        &mut owners,
                        Owner::TierEnd {
                            tier: tier.name.clone(),
                        },
                    );
                    b.push(Action::Deny, owner, vec![RuleMatch::all()], &tier_eps);
                }
                let after = b.rules.len() as u32;
                for range in pass_rules {
                    b.set_next(range, after);
                }
            }
            if stage == stage::NORMAL {
                push_profiles(store, &resolver, &bound, direction, &mut b, &mut owners)?;
            }
            tables.push(b.build(stage, direction, &bound, &mut interner));
        }
    }
    Ok(Compiled {
        endpoints: bound
            .iter()
            .map(|(iface, h)| BoundEndpoint {
                iface: iface.clone(),
                hep: h.meta.name.clone(),
            })
            .collect(),
        classes: interner.classes,
        owners,
        tables,
        failsafe: failsafe::entries(store, &node.name),
        frontends: services::frontends(
            store,
            &node.interfaces.values().flatten().copied().collect(),
        ),
    })
}

fn push_owner(owners: &mut Vec<Owner>, o: Owner) -> u32 {
    owners.push(o);
    (owners.len() - 1) as u32
}

/// Every rule of every policy and profile this dataplane cannot enforce
/// exactly, whether or not it applies on some node: `compile` refuses such
/// a rule when it meets it; `check` refuses it up front, with the same
/// message.
pub fn unsupported_rules(store: &Store) -> Vec<Error> {
    let resolver = Resolver::new(store);
    let mut errors = Vec::new();
    let mut scan = |origin: &model::Origin, name: &str, lists: [(&str, &[Rule]); 2]| {
        for (list, rules) in lists {
            for (i, r) in rules.iter().enumerate() {
                if let Err(m) = resolver.rule(r) {
                    errors.push(unsupported(origin, name, &format!("spec.{list}[{i}]"), &m));
                }
            }
        }
    };
    for p in &store.global_policies {
        scan(
            &p.origin,
            &p.meta.name,
            [("ingress", &p.spec.ingress), ("egress", &p.spec.egress)],
        );
    }
    for p in &store.profiles {
        scan(
            &p.origin,
            &p.meta.name,
            [("ingress", &p.spec.ingress), ("egress", &p.spec.egress)],
        );
    }
    errors
}

fn unsupported(origin: &model::Origin, name: &str, field: &str, message: &str) -> Error {
    Error::Unsupported {
        origin: origin.clone(),
        field: field.to_owned(),
        message: format!("{name:?}: {message}"),
    }
}

/// Profiles of each endpoint, in its list order, then the final drop (3.3
/// step 5). Endpoints with the same list share one block of rules.
fn push_profiles(
    store: &Store,
    resolver: &Resolver<'_>,
    bound: &[(String, &Resource<HostEndpointSpec>)],
    direction: u32,
    b: &mut TableBuilder,
    owners: &mut Vec<Owner>,
) -> Result<(), Error> {
    let mut by_list: BTreeMap<&[String], BTreeSet<usize>> = BTreeMap::new();
    for (e, (_, h)) in bound.iter().enumerate() {
        by_list.entry(&h.spec.profiles).or_default().insert(e);
    }
    let allow_all = ProfileSpec {
        ingress: vec![Rule {
            action: Action::Allow,
            ..Default::default()
        }],
        egress: vec![Rule {
            action: Action::Allow,
            ..Default::default()
        }],
        ..Default::default()
    };
    for (list, eps) in by_list {
        for name in list {
            let (spec, origin) = match store.profiles.iter().find(|p| &p.meta.name == name) {
                Some(p) => (&p.spec, Some(&p.origin)),
                None if name == defaults::ALLOW_PROFILE => (&allow_all, None),
                // A profile that does not exist contributes no rules.
                None => continue,
            };
            let rules = if direction == direction::INGRESS {
                &spec.ingress
            } else {
                &spec.egress
            };
            let mut passes = Vec::new();
            for (i, r) in rules.iter().enumerate() {
                let owner = push_owner(
                    owners,
                    Owner::Profile {
                        profile: name.clone(),
                        rule: i,
                    },
                );
                let parts = resolver.rule(r).map_err(|m| {
                    let origin = origin.cloned().unwrap_or(model::Origin {
                        file: "<built-in>".into(),
                        line: 0,
                    });
                    unsupported(&origin, name, &format!("spec.rules[{i}]"), &m)
                })?;
                let range = b.push(r.action, owner, parts, &eps);
                if r.action == Action::Pass {
                    passes.push(range);
                }
            }
            // Pass in a profile goes on with the next profile.
            let after = b.rules.len() as u32;
            for range in passes {
                b.set_next(range, after);
            }
        }
    }
    if !bound.is_empty() {
        let owner = push_owner(owners, Owner::NoProfileAllowed);
        let all: BTreeSet<usize> = (0..bound.len()).collect();
        b.push(Action::Deny, owner, vec![RuleMatch::all()], &all);
    }
    Ok(())
}

fn action_code(a: Action) -> u32 {
    match a {
        Action::Allow => action::ALLOW,
        Action::Deny => action::DENY,
        Action::Log => action::LOG,
        Action::Pass => action::PASS,
    }
}

/// One rule part's constraints, per field, as prefix lists.
#[derive(Debug, Clone, Default)]
pub(crate) struct RuleMatch {
    /// Families the part takes part in (2.4, and empty address sets).
    v4: bool,
    v6: bool,
    src4: FieldMatch,
    dst4: FieldMatch,
    src6: FieldMatch,
    dst6: FieldMatch,
    protocol: Option<u8>,
    not_protocol: Option<u8>,
    /// Destination port (or ICMP type/code) constraint; `None`: none.
    dport: Option<FieldMatch>,
    /// Source port constraint.
    sport: Option<FieldMatch>,
}

impl RuleMatch {
    fn all() -> RuleMatch {
        RuleMatch {
            v4: true,
            v6: true,
            ..Default::default()
        }
    }
}

/// Turns rule selectors, network sets and named ports into address sets.
struct Resolver<'a> {
    store: &'a Store,
}

/// A positive address constraint: `None` = none; `Some(empty)` = nothing
/// can match.
type AddrSet = Option<Vec<IpNetwork>>;

impl<'a> Resolver<'a> {
    fn new(store: &'a Store) -> Self {
        Resolver { store }
    }

    /// Addresses of the known resources a rule's selector picks, within the
    /// scope its `namespaceSelector` sets (2.5). Host endpoints count by
    /// their expectedIPs only.
    fn selected(&self, e: &EntityRule, sel: &Selector) -> Vec<IpNetwork> {
        let mut out = Vec::new();
        let global = match e.namespace_selector.as_deref().map(str::trim) {
            None | Some("") => true,
            Some("global()") => true,
            Some(_) => false,
        };
        let namespaced = match e.namespace_selector.as_deref().map(str::trim) {
            None | Some("") => Some(None),
            Some("global()") => None,
            Some(ns) => Some(Selector::parse(ns).ok()),
        };
        if global {
            for h in &self.store.host_endpoints {
                if sel.matches(&endpoint_labels(self.store, h)) {
                    out.extend(
                        h.spec
                            .expected_ips
                            .iter()
                            .filter_map(|ip| ip.parse::<IpAddr>().ok())
                            .map(IpNetwork::from),
                    );
                }
            }
            for s in &self.store.global_network_sets {
                if sel.matches(&s.meta.labels) {
                    out.extend(s.spec.nets.iter().filter_map(|n| lenient_net(n)));
                }
            }
        }
        if let Some(ns_sel) = namespaced {
            for s in &self.store.network_sets {
                let ns = s.meta.namespace.clone().unwrap_or_else(|| "default".into());
                let ns_labels: BTreeMap<String, String> =
                    [("projectcalico.org/name".to_string(), ns)].into();
                if ns_sel.as_ref().is_none_or(|n| n.matches(&ns_labels))
                    && sel.matches(&s.meta.labels)
                {
                    out.extend(s.spec.nets.iter().filter_map(|n| lenient_net(n)));
                }
            }
        }
        out
    }

    /// The entity's positive and negative address constraints.
    fn addresses(&self, e: &EntityRule) -> (AddrSet, Vec<IpNetwork>) {
        let all = Selector::parse("all()").expect("constant");
        let mut pos: AddrSet = (!e.nets.is_empty()).then(|| e.nets.iter().map(|c| c.0).collect());
        let mut neg: Vec<IpNetwork> = e.not_nets.iter().map(|c| c.0).collect();
        let scoped = e
            .namespace_selector
            .as_deref()
            .is_some_and(|s| !s.trim().is_empty());
        if let Some(sel) = e.selector.as_deref().and_then(|s| Selector::parse(s).ok()) {
            pos = Some(intersect(pos, self.selected(e, &sel)));
        } else if scoped {
            // A namespaceSelector alone (or with notSelector) limits the
            // peer to the scoped resources.
            pos = Some(intersect(pos, self.selected(e, &all)));
        }
        if let Some(sel) = e
            .not_selector
            .as_deref()
            .and_then(|s| Selector::parse(s).ok())
        {
            neg.extend(self.selected(e, &sel));
        }
        if e.service_accounts.is_some() || e.services.is_some() {
            // Pods only: no host endpoint or network set ever matches.
            pos = Some(Vec::new());
        }
        (pos, neg)
    }

    /// `(address, port)` pairs a named port stands for, for `protocol`,
    /// limited by the entity's selector (2.5 "Named ports").
    fn named_port(&self, e: &EntityRule, name: &str, protocol: Option<u8>) -> Vec<(IpAddr, u16)> {
        let sel = e.selector.as_deref().and_then(|s| Selector::parse(s).ok());
        let mut out = Vec::new();
        for h in &self.store.host_endpoints {
            if sel
                .as_ref()
                .is_some_and(|s| !s.matches(&endpoint_labels(self.store, h)))
            {
                continue;
            }
            for p in h
                .spec
                .ports
                .iter()
                .filter(|p| p.name == name && protocol.is_none_or(|x| x == p.protocol.0))
            {
                for ip in h
                    .spec
                    .expected_ips
                    .iter()
                    .filter_map(|ip| ip.parse::<IpAddr>().ok())
                {
                    out.push((ip, p.port));
                }
            }
        }
        out
    }

    /// The parts of `r`: one, or several when named ports couple addresses
    /// and ports. An empty list: the rule can match nothing.
    fn rule(&self, r: &Rule) -> Result<Vec<RuleMatch>, String> {
        let named = |ports: &[Port]| ports.iter().any(|p| matches!(p, Port::Named(_)));
        if named(&r.destination.not_ports) || named(&r.source.not_ports) {
            return Err("named ports in notPorts are not supported".into());
        }
        if named(&r.source.ports) {
            return Err("named source ports are not supported".into());
        }
        if r.not_icmp.is_some()
            && !r
                .protocol
                .is_some_and(|p| filter_common::proto::is_icmp(p.0))
        {
            return Err("notICMP without protocol ICMP or ICMPv6 is not supported".into());
        }
        let protocol = r.protocol.map(|p| p.0);
        let (src_pos, src_neg) = self.addresses(&r.source);
        let (dst_pos, dst_neg) = self.addresses(&r.destination);
        let numeric = |ports: &[Port]| -> Vec<Prefix> {
            ports
                .iter()
                .flat_map(|p| match p {
                    Port::Range { first, last } => {
                        prefix::range_to_prefixes(u32::from(*first), u32::from(*last), 16)
                    }
                    Port::Named(_) => Vec::new(),
                })
                .collect()
        };
        let icmp = |f: &Option<model::IcmpFields>| -> Vec<Prefix> {
            match f {
                Some(model::IcmpFields {
                    icmp_type: Some(t),
                    code: None,
                }) => vec![Prefix::new(u128::from(*t) << 8, 16, 8)],
                Some(model::IcmpFields {
                    icmp_type: Some(t),
                    code: Some(c),
                }) => {
                    vec![Prefix::new((u128::from(*t) << 8) | u128::from(*c), 16, 16)]
                }
                _ => Vec::new(),
            }
        };
        let port_field = |pos: Vec<Prefix>, neg: Vec<Prefix>, constrained: bool| {
            constrained.then_some(FieldMatch { pos, neg })
        };
        let sport = port_field(
            numeric(&r.source.ports),
            numeric(&r.source.not_ports),
            !r.source.ports.is_empty() || !r.source.not_ports.is_empty(),
        );
        let dneg = [numeric(&r.destination.not_ports), icmp(&r.not_icmp)].concat();

        // Destination ports: the numeric part with the rule's destination,
        // and one part per port value of each named port, its addresses
        // joined to the destination constraint.
        let mut dst_parts: Vec<(AddrSet, Option<FieldMatch>)> = Vec::new();
        let dnumeric = [numeric(&r.destination.ports), icmp(&r.icmp)].concat();
        let has_named = named(&r.destination.ports);
        if !dnumeric.is_empty() || !has_named {
            let constrained = !dnumeric.is_empty() || !dneg.is_empty();
            dst_parts.push((
                dst_pos.clone(),
                port_field(dnumeric, dneg.clone(), constrained),
            ));
        }
        let mut by_port: BTreeMap<u16, Vec<IpNetwork>> = BTreeMap::new();
        for p in &r.destination.ports {
            if let Port::Named(n) = p {
                for (ip, port) in self.named_port(&r.destination, n, protocol) {
                    by_port.entry(port).or_default().push(IpNetwork::from(ip));
                }
            }
        }
        for (port, ips) in by_port {
            let pos = Some(intersect(dst_pos.clone(), ips));
            let ports = vec![Prefix::new(u128::from(port), 16, 16)];
            dst_parts.push((
                pos,
                Some(FieldMatch {
                    pos: ports,
                    neg: dneg.clone(),
                }),
            ));
        }

        let mut parts = Vec::new();
        for (dpos, dport) in dst_parts {
            let mut m = RuleMatch {
                protocol,
                not_protocol: r.not_protocol.map(|p| p.0),
                dport,
                sport: sport.clone(),
                ..Default::default()
            };
            // Felix FilterRuleToIPVersion: a nets/notNets list that was
            // non-empty but has no CIDR of a family drops the rule for that
            // family (2.4); an address set with nothing of a family matches
            // nothing of it.
            let lists = [
                &r.source.nets,
                &r.source.not_nets,
                &r.destination.nets,
                &r.destination.not_nets,
            ];
            for v4 in [true, false] {
                let family_lists_ok = lists
                    .iter()
                    .all(|l| l.is_empty() || l.iter().any(|c| c.0.is_ipv4() == v4));
                let version_ok = r.ip_version.is_none_or(|v| (v == 4) == v4);
                let proto_ok = !matches!((protocol, v4), (Some(1), false) | (Some(58), true));
                let src = field(&src_pos, &src_neg, v4);
                let dst = field(&dpos, &dst_neg, v4);
                let ok =
                    family_lists_ok && version_ok && proto_ok && src.is_some() && dst.is_some();
                let (src, dst) = (src.unwrap_or_default(), dst.unwrap_or_default());
                if v4 {
                    (m.v4, m.src4, m.dst4) = (ok, src, dst);
                } else {
                    (m.v6, m.src6, m.dst6) = (ok, src, dst);
                }
            }
            if m.v4 || m.v6 {
                parts.push(m);
            }
        }
        Ok(parts)
    }
}

/// A family's view of an address constraint; `None` when a positive
/// constraint has nothing of this family (the part cannot match).
fn field(pos: &AddrSet, neg: &[IpNetwork], v4: bool) -> Option<FieldMatch> {
    let to_prefix = |n: &IpNetwork| match n {
        IpNetwork::V4(n) => Prefix::new(u128::from(u32::from(n.network())), 32, n.prefix()),
        IpNetwork::V6(n) => Prefix::new(u128::from(n.network()), 128, n.prefix()),
    };
    let of_family = |l: &[IpNetwork]| {
        l.iter()
            .filter(|n| n.is_ipv4() == v4)
            .map(to_prefix)
            .collect::<Vec<_>>()
    };
    let pos = match pos {
        None => Vec::new(),
        Some(l) => {
            let p = of_family(l);
            if p.is_empty() {
                return None;
            }
            p
        }
    };
    Some(FieldMatch {
        pos,
        neg: of_family(neg),
    })
}

/// The addresses in both `a` (if constrained) and `b`.
fn intersect(a: AddrSet, b: Vec<IpNetwork>) -> Vec<IpNetwork> {
    let Some(a) = a else { return b };
    let mut out = Vec::new();
    for x in &a {
        for y in &b {
            if x.is_ipv4() != y.is_ipv4() {
                continue;
            }
            if x.prefix() <= y.prefix() && x.contains(y.network()) {
                out.push(*y);
            } else if y.prefix() < x.prefix() && y.contains(x.network()) {
                out.push(*x);
            }
        }
    }
    out
}

/// A network set entry: host bits may be set (1.4).
pub fn lenient_net(s: &str) -> Option<IpNetwork> {
    let n = model::parse_net(s).ok()?;
    IpNetwork::new(n.network(), n.prefix()).ok()
}

/// Rules of one table in order, with the endpoints each concerns.
#[derive(Default)]
struct TableBuilder {
    rules: Vec<RuleInfo>,
    matches: Vec<RuleMatch>,
    endpoints: Vec<BTreeSet<usize>>,
}

impl TableBuilder {
    /// Appends the parts of one rule; returns their index range.
    fn push(
        &mut self,
        a: Action,
        owner: u32,
        parts: Vec<RuleMatch>,
        eps: &BTreeSet<usize>,
    ) -> std::ops::Range<u32> {
        let start = self.rules.len() as u32;
        let end = start + parts.len() as u32;
        for m in parts {
            // A Log part goes on past its siblings: one record per rule.
            self.rules.push(RuleInfo {
                action: action_code(a),
                next: end,
                owner,
            });
            self.matches.push(m);
            self.endpoints.push(eps.clone());
        }
        start..end
    }

    fn set_next(&mut self, range: std::ops::Range<u32>, next: u32) {
        for r in range {
            self.rules[r as usize].next = next;
        }
    }

    fn build(
        self,
        stage: u32,
        direction: u32,
        bound: &[(String, &Resource<HostEndpointSpec>)],
        interner: &mut Interner,
    ) -> Table {
        let mut masks: BTreeMap<String, RuleSet> = BTreeMap::new();
        for (r, eps) in self.endpoints.iter().enumerate() {
            for &e in eps {
                masks.entry(bound[e].0.clone()).or_default().insert(r);
            }
        }
        let matches = &self.matches;
        let v4: RuleSet = matches
            .iter()
            .enumerate()
            .filter(|(_, m)| m.v4)
            .map(|(r, _)| r)
            .collect();
        let v6: RuleSet = matches
            .iter()
            .enumerate()
            .filter(|(_, m)| m.v6)
            .map(|(r, _)| r)
            .collect();
        let mut addr = |f: fn(&RuleMatch) -> &FieldMatch, active: &RuleSet| -> Vec<(Prefix, u32)> {
            let fm: Vec<FieldMatch> = matches.iter().map(|m| f(m).clone()).collect();
            prefix::classify(&fm, active, &mut |s| interner.class(s))
        };
        let src_v4 = addr(|m| &m.src4, &v4);
        let dst_v4 = addr(|m| &m.dst4, &v4);
        let src_v6 = addr(|m| &m.src6, &v6);
        let dst_v6 = addr(|m| &m.dst6, &v6);
        let dports = port_entries(matches, |m| &m.dport, interner);
        let sports = port_entries(matches, |m| &m.sport, interner);
        Table {
            stage,
            direction,
            rules: self.rules,
            src_v4,
            dst_v4,
            src_v6,
            dst_v6,
            dports,
            sports,
            masks,
        }
    }
}

/// The entries of a port trie for one port field.
fn port_entries(
    matches: &[RuleMatch],
    field: fn(&RuleMatch) -> &Option<FieldMatch>,
    interner: &mut Interner,
) -> Vec<PortEntry> {
    // Every protocol any rule names gets its own subtree.
    let protos: BTreeSet<u8> = matches
        .iter()
        .flat_map(|m| m.protocol.into_iter().chain(m.not_protocol))
        .collect();
    let proto_ok = |m: &RuleMatch, p: Option<u8>| {
        // `p == None` stands for a protocol no rule names.
        m.protocol.is_none_or(|want| Some(want) == p)
            && m.not_protocol.is_none_or(|not| Some(not) != p)
    };
    let rules_where = |ok: &dyn Fn(&RuleMatch) -> bool| -> RuleSet {
        matches
            .iter()
            .enumerate()
            .filter(|(_, m)| ok(m))
            .map(|(r, _)| r)
            .collect()
    };
    let mut out = Vec::new();
    let any = rules_where(&|m| proto_ok(m, None) && field(m).is_none());
    out.push(PortEntry {
        proto: None,
        has_ports: None,
        port: 0,
        port_len: 0,
        class: interner.class(any),
    });
    let fms: Vec<FieldMatch> = matches
        .iter()
        .map(|m| field(m).clone().unwrap_or_default())
        .collect();
    for &p in &protos {
        // No L4 ports known (non-first fragments, protocols without ports):
        // only rules with no port constraint can match.
        let no_ports = rules_where(&|m| proto_ok(m, Some(p)) && field(m).is_none());
        out.push(PortEntry {
            proto: Some(p),
            has_ports: Some(false),
            port: 0,
            port_len: 0,
            class: interner.class(no_ports),
        });
        let all = rules_where(&|m| proto_ok(m, Some(p)));
        for (prefix, class) in prefix::classify(&fms, &all, &mut |s| interner.class(s)) {
            out.push(PortEntry {
                proto: Some(p),
                has_ports: Some(true),
                port: prefix.value(16) as u16,
                port_len: prefix.len,
                class,
            });
        }
    }
    out
}

/// Interns rule sets: each distinct set gets one class number.
struct Interner {
    classes: Vec<RuleSet>,
    index: HashMap<RuleSet, u32>,
}

impl Default for Interner {
    fn default() -> Self {
        Interner {
            classes: vec![RuleSet::new()],
            index: HashMap::from([(RuleSet::new(), 0)]),
        }
    }
}

impl Interner {
    fn class(&mut self, set: RuleSet) -> u32 {
        if let Some(c) = self.index.get(&set) {
            return *c;
        }
        let next = self.classes.len() as u32;
        self.classes.push(set.clone());
        self.index.insert(set, next);
        next
    }
}

#[cfg(test)]
mod tests;
