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
//!
//! By concern: `order` (endpoint binding, which policies apply, the order
//! of tiers and policies), `resolve` (a rule's fields as prefix lists and
//! address sets), `table` (rules in order, classes, endpoint masks); this
//! module drives them, stage by stage.

pub mod bits;
pub mod emulate;
pub mod failsafe;
mod order;
pub mod prefix;
mod resolve;
pub mod services;
mod table;

pub use order::{
    applies_to_host_endpoint, bind_endpoints, endpoint_labels, policy_order, policy_rules,
    policy_stages, policy_tier, tiers, TierInfo,
};
pub use resolve::lenient_net;
use resolve::Resolver;
pub(crate) use resolve::RuleMatch;
pub use table::Reuse;
use table::{Interner, TableBuilder};

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use filter_common::{action, direction, stage};
use ipnetwork::IpNetwork;

use crate::{
    model::{
        self, defaults, Action, EntityRule, GlobalNetworkPolicySpec, HostEndpointSpec, PolicyType,
        Port, ProfileSpec, Resource, Rule, Store, TierAction,
    },
    selector::{Selector, Written},
};
use bits::RuleSet;
use prefix::{FieldMatch, Prefix};

/// Why a store cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A policy uses something this dataplane cannot enforce exactly; it is
    /// refused rather than enforced differently from Calico.
    #[error("{origin}: {field}: {policy:?}: {what}")]
    Unsupported {
        /// Where the policy is.
        origin: model::Origin,
        /// The field at fault.
        field: String,
        /// The policy or profile.
        policy: String,
        /// What is not supported.
        what: Unsupported,
    },
}

/// Rule forms the classifier tables cannot express exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    /// `notPorts` with a named port.
    #[error("named ports in notPorts are not supported")]
    NamedNotPorts,
    /// `source.ports` with a named port.
    #[error("named source ports are not supported")]
    NamedSourcePorts,
    /// `notICMP` on a rule whose protocol is not ICMP or ICMPv6.
    #[error("notICMP without protocol ICMP or ICMPv6 is not supported")]
    NotIcmpWithoutIcmp,
}

/// A host endpoint bound to one of this node's interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundEndpoint {
    /// Interface name.
    pub iface: String,
    /// HostEndpoint resource name.
    pub hep: String,
}

/// Who wrote a rule of a table. The names are shared by all the rules of
/// a tier or policy (cloned per rule, they were a tenth of a one-rule
/// recompile of 10,000 rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Rule `rule` of a policy's rule list.
    Policy {
        /// Tier name.
        tier: Arc<str>,
        /// Policy name.
        policy: Arc<str>,
        /// Index in the policy's ingress or egress list.
        rule: usize,
    },
    /// A tier's end action (Deny) when none of its policies decided.
    TierEnd {
        /// Tier name.
        tier: Arc<str>,
    },
    /// Rule `rule` of a profile.
    Profile {
        /// Profile name.
        profile: Arc<str>,
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
    pub src_v4: std::sync::Arc<Vec<(Prefix, u32)>>,
    /// IPv4 destination prefixes → class.
    pub dst_v4: std::sync::Arc<Vec<(Prefix, u32)>>,
    /// IPv6 source prefixes → class.
    pub src_v6: std::sync::Arc<Vec<(Prefix, u32)>>,
    /// IPv6 destination prefixes → class.
    pub dst_v6: std::sync::Arc<Vec<(Prefix, u32)>>,
    /// Protocol / destination port (or ICMP type and code) entries.
    pub dports: std::sync::Arc<Vec<PortEntry>>,
    /// Protocol / source port entries.
    pub sports: std::sync::Arc<Vec<PortEntry>>,
    /// Interface name → rules that concern its endpoint. Absent: nothing of
    /// this stage and direction applies.
    pub masks: BTreeMap<String, RuleSet>,
    /// The rules in every class of every field: whatever a packet's
    /// addresses and ports, the classifier's search finds them among its
    /// rules. A field without entries gives a packet no class (the program
    /// reports the table broken), so then none.
    pub everywhere: RuleSet,
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

/// Compiles `store` for `node`.
pub fn compile(store: &Store, node: &Node) -> Result<Compiled, Error> {
    compile_reusing(store, node, &mut Reuse::default()).0
}

/// [`compile`], taking over from the last compile in `reuse` every field
/// (one table's addresses or ports of one kind) whose inputs did not
/// change; `reuse` is left holding this compile's. The result is exactly
/// `compile`'s. Returns it and how many fields were taken over.
pub fn compile_reusing(
    store: &Store,
    node: &Node,
    reuse: &mut Reuse,
) -> (Result<Compiled, Error>, usize) {
    reuse.start();
    let compiled = compile_with(store, node, reuse);
    // A failed compile leaves what it classified: exact for its inputs
    // all the same.
    let reused = reuse.finish();
    (compiled, reused)
}

fn compile_with(store: &Store, node: &Node, reuse: &mut Reuse) -> Result<Compiled, Error> {
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
    let applied = policies
        .iter()
        .filter(|p| labels.iter().any(|l| applies_to_host_endpoint(&p.spec, l)));
    reuse.resolve_ahead(
        applied.flat_map(|p| p.spec.ingress.iter().chain(&p.spec.egress).map(|r| &**r)),
        &resolver,
    );

    let mut owners = Vec::new();
    let mut interner = Interner::default();
    let mut tables = Vec::new();
    for stage in filter_common::Stage::ALL.map(|s| s as u32) {
        for (direction, direction_name) in
            filter_common::Direction::ALL.map(|d| (d as u32, d.name()))
        {
            let mut b = TableBuilder::default();
            // A rule is one part or more: room for one each at least.
            b.reserve(
                policies
                    .iter()
                    .filter(|p| policy_stages(&p.spec).contains(&stage))
                    .filter_map(|p| policy_rules(&p.spec, direction))
                    .map(|rules| rules.len())
                    .sum(),
            );
            for tier in &tiers {
                let tier_name: Arc<str> = tier.name.as_str().into();
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
                    let policy: Arc<str> = p.meta.name.as_str().into();
                    for (i, r) in rules.iter().enumerate() {
                        let owner = push_owner(
                            &mut owners,
                            Owner::Policy {
                                tier: tier_name.clone(),
                                policy: policy.clone(),
                                rule: i,
                            },
                        );
                        let parts = reuse.parts(r, &resolver).map_err(|m| {
                            let field = format!("spec.{direction_name}[{i}]");
                            unsupported(&p.origin, &p.meta.name, &field, &m)
                        })?;
                        let range = b.push(r.action, owner, &parts, &eps);
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
                            tier: tier_name.clone(),
                        },
                    );
                    b.push(
                        Action::Deny,
                        owner,
                        &[std::sync::Arc::new(RuleMatch::all())],
                        &tier_eps,
                    );
                }
                let after = b.rules.len() as u32;
                for range in pass_rules {
                    b.set_next(range, after);
                }
            }
            if stage == stage::NORMAL {
                push_profiles(store, &resolver, &bound, direction, &mut b, &mut owners)?;
            }
            tables.push(b.build(stage, direction, &bound, &mut interner, reuse));
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
    let mut scan =
        |origin: &model::Origin, name: &str, lists: [(&str, &[std::sync::Arc<Rule>]); 2]| {
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

fn unsupported(origin: &model::Origin, name: &str, field: &str, what: &Unsupported) -> Error {
    Error::Unsupported {
        origin: origin.clone(),
        field: field.to_owned(),
        policy: name.to_owned(),
        what: *what,
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
        ingress: vec![std::sync::Arc::new(Rule {
            action: Action::Allow,
            ..Default::default()
        })],
        egress: vec![std::sync::Arc::new(Rule {
            action: Action::Allow,
            ..Default::default()
        })],
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
            let profile: Arc<str> = name.as_str().into();
            for (i, r) in rules.iter().enumerate() {
                let owner = push_owner(
                    owners,
                    Owner::Profile {
                        profile: profile.clone(),
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
                let parts: Vec<_> = parts.into_iter().map(std::sync::Arc::new).collect();
                let range = b.push(r.action, owner, &parts, &eps);
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
        b.push(
            Action::Deny,
            owner,
            &[std::sync::Arc::new(RuleMatch::all())],
            &all,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
