//! Store → classifier tables: pure functions, no I/O, no kernel.
//!
//! In: a validated [`Store`], this node's name and its interfaces. Out: a
//! [`Compiled`] value: the interfaces to attach to, and for each enforced
//! stage and direction the ordered rule list and the trie contents of
//! filter-common's layout, with every distinct bitmap stored once as a class.
//!
//! Rule order within a table is the evaluation order of
//! calico-semantics.md 3.3: policies by `order` (unset last), then name,
//! then rule index. This issue enforces the pre-DNAT ingress stage; policies
//! of the other stages are loaded and validated, and reported as not yet
//! enforced.

pub mod bits;
pub mod prefix;

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use filter_common::{action, direction, stage, Bitmap, MAX_RULES, WORDS};

use crate::{
    model::{
        self, Action, GlobalNetworkPolicySpec, HostEndpointSpec, PolicyType, Port, Resource, Rule,
        Store,
    },
    selector::Selector,
};
use prefix::{FieldMatch, Prefix};

/// Why a store cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A policy uses something this dataplane does not enforce yet; it is
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
    /// More rules than a table holds.
    #[error("{stage} {direction}: {count} rules, more than the {max} a table holds")]
    TooManyRules {
        /// Stage name.
        stage: &'static str,
        /// Direction name.
        direction: &'static str,
        /// Rules compiled.
        count: usize,
        /// Table capacity.
        max: u32,
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

/// A rule as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleInfo {
    /// One of `filter_common::action`.
    pub action: u32,
    /// Index into [`Compiled::policies`].
    pub policy: u32,
    /// Index of the rule in its policy.
    pub rule: u32,
}

/// A port-trie entry: protocol (`None`: any), the has-ports flag (`None`:
/// either) and a destination port prefix under it.
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
    /// Protocol/port entries.
    pub ports: Vec<PortEntry>,
    /// Interface name → rules whose policies select its endpoint. Absent:
    /// no policy of this table applies.
    pub masks: BTreeMap<String, Bitmap>,
}

/// Everything one generation of the dataplane needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// Endpoints of this node, one per interface.
    pub endpoints: Vec<BoundEndpoint>,
    /// Class number → bitmap; class 0 is the empty bitmap.
    pub classes: Vec<Bitmap>,
    /// Policy names by number.
    pub policies: Vec<String>,
    /// Enforced tables.
    pub tables: Vec<Table>,
    /// Policies loaded but not enforced by this version, for one warning.
    pub not_enforced: Vec<String>,
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
/// (calico-semantics.md 1.3): an exact `interfaceName`, else the interface
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

/// Whether a global policy's selectors pick a host endpoint with `labels`.
fn applies_to_host_endpoint(
    spec: &GlobalNetworkPolicySpec,
    labels: &BTreeMap<String, String>,
) -> bool {
    // A HEP has no namespace or service-account labels: `all()` there means
    // "has a namespace" and never matches, while a negative expression still
    // can (calico-semantics.md 1.1).
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

fn policy_order(
    a: &Resource<GlobalNetworkPolicySpec>,
    b: &Resource<GlobalNetworkPolicySpec>,
) -> Ordering {
    let key = |p: &Resource<GlobalNetworkPolicySpec>| p.spec.order.unwrap_or(f64::INFINITY);
    key(a)
        .total_cmp(&key(b))
        .then_with(|| a.meta.name.cmp(&b.meta.name))
}

/// Compiles `store` for `node`.
pub fn compile(store: &Store, node: &Node) -> Result<Compiled, Error> {
    let bound = bind_endpoints(store, node);
    let mut policies: Vec<&Resource<GlobalNetworkPolicySpec>> =
        store.global_policies.iter().collect();
    policies.sort_by(|a, b| policy_order(a, b));

    let mut out = Compiled {
        endpoints: bound
            .iter()
            .map(|(iface, h)| BoundEndpoint {
                iface: iface.clone(),
                hep: h.meta.name.clone(),
            })
            .collect(),
        classes: vec![Bitmap::EMPTY],
        policies: policies.iter().map(|p| p.meta.name.clone()).collect(),
        tables: Vec::new(),
        not_enforced: Vec::new(),
    };
    let mut interner = Interner::default();

    // The pre-DNAT ingress table: every pre-DNAT policy's ingress rules.
    let mut rules = Vec::new();
    let mut matches = Vec::new();
    let mut masks: BTreeMap<String, Bitmap> = BTreeMap::new();
    for (policy_index, p) in policies.iter().enumerate() {
        if !p.spec.pre_dnat {
            out.not_enforced.push(p.meta.name.clone());
            continue;
        }
        if p.spec.tier.as_deref().is_some_and(|t| t != "default") {
            return Err(unsupported(
                p,
                "spec.tier",
                "tiers other than \"default\" are not enforced yet",
            ));
        }
        if !model::validate::effective_types(&p.spec).contains(&PolicyType::Ingress) {
            continue;
        }
        let first = rules.len();
        for (i, r) in p.spec.ingress.iter().enumerate() {
            let m = rule_match(p, i, r)?;
            rules.push(RuleInfo {
                action: action_code(r.action),
                policy: policy_index as u32,
                rule: i as u32,
            });
            matches.push(m);
        }
        for (iface, hep) in &bound {
            if applies_to_host_endpoint(&p.spec, &hep.meta.labels) {
                let mask = masks.entry(iface.clone()).or_insert(Bitmap::EMPTY);
                for r in first..rules.len() {
                    bits::set(mask, r);
                }
            }
        }
    }
    if rules.len() > MAX_RULES as usize {
        return Err(Error::TooManyRules {
            stage: "pre_dnat",
            direction: "ingress",
            count: rules.len(),
            max: MAX_RULES,
        });
    }
    out.tables.push(build_table(
        stage::PRE_DNAT,
        direction::INGRESS,
        rules,
        &matches,
        masks,
        &mut interner,
    ));
    out.classes = interner.classes;
    Ok(out)
}

fn action_code(a: Action) -> u32 {
    match a {
        Action::Allow => action::ALLOW,
        Action::Deny => action::DENY,
        Action::Log => action::LOG,
        Action::Pass => action::PASS,
    }
}

fn unsupported(p: &Resource<GlobalNetworkPolicySpec>, field: &str, message: &str) -> Error {
    Error::Unsupported {
        origin: p.origin.clone(),
        field: field.to_owned(),
        message: format!("policy {:?}: {message}", p.meta.name),
    }
}

/// One rule's constraints, per field, as prefix lists.
#[derive(Debug, Clone, Default)]
struct RuleMatch {
    /// Families the rule takes part in (2.4).
    v4: bool,
    v6: bool,
    src4: FieldMatch,
    dst4: FieldMatch,
    src6: FieldMatch,
    dst6: FieldMatch,
    protocol: Option<u8>,
    not_protocol: Option<u8>,
    /// Destination port (or ICMP type/code) constraint; `None`: none.
    port: Option<FieldMatch>,
}

fn rule_match(
    p: &Resource<GlobalNetworkPolicySpec>,
    i: usize,
    r: &Rule,
) -> Result<RuleMatch, Error> {
    let field = |f: &str| format!("spec.ingress[{i}].{f}");
    if r.action == Action::Log {
        return Err(unsupported(
            p,
            &field("action"),
            "the Log action is not enforced yet",
        ));
    }
    for (side, e) in [("source", &r.source), ("destination", &r.destination)] {
        if e.has_identity_match() {
            return Err(unsupported(
                p,
                &field(side),
                "selectors, service accounts and services in rules are not enforced yet",
            ));
        }
        if e.ports
            .iter()
            .chain(&e.not_ports)
            .any(|p| matches!(p, Port::Named(_)))
        {
            return Err(unsupported(
                p,
                &field(side),
                "named ports are not enforced yet",
            ));
        }
    }
    if !r.source.ports.is_empty() || !r.source.not_ports.is_empty() {
        return Err(unsupported(
            p,
            &field("source.ports"),
            "source ports are not enforced yet",
        ));
    }
    if r.http.is_some() {
        tracing::warn!(policy = %p.meta.name, rule = i, "http match ignored: an L3/L4 dataplane enforces the rest of the rule, as Felix's iptables dataplane does");
    }

    let mut m = RuleMatch {
        protocol: r.protocol.map(|p| p.0),
        not_protocol: r.not_protocol.map(|p| p.0),
        ..Default::default()
    };
    let nets = |l: &[model::Cidr], v4: bool| -> Vec<Prefix> {
        l.iter()
            .filter_map(|c| match (c.0.ip(), v4) {
                (IpAddr::V4(a), true) => {
                    Some(Prefix::new(u128::from(u32::from(a)), 32, c.0.prefix()))
                }
                (IpAddr::V6(a), false) => Some(Prefix::new(u128::from(a), 128, c.0.prefix())),
                _ => None,
            })
            .collect()
    };
    // Felix FilterRuleToIPVersion: a list that was non-empty but has no CIDR
    // of this family drops the whole rule for the family (2.4).
    let lists = [
        &r.source.nets,
        &r.source.not_nets,
        &r.destination.nets,
        &r.destination.not_nets,
    ];
    let family_ok = |v4: bool| {
        lists
            .iter()
            .all(|l| l.is_empty() || !nets(l, v4).is_empty())
    };
    m.v4 = r.ip_version != Some(6) && family_ok(true);
    m.v6 = r.ip_version != Some(4) && family_ok(false);
    let entity = |e: &model::EntityRule, v4: bool| FieldMatch {
        pos: nets(&e.nets, v4),
        neg: nets(&e.not_nets, v4),
    };
    m.src4 = entity(&r.source, true);
    m.dst4 = entity(&r.destination, true);
    m.src6 = entity(&r.source, false);
    m.dst6 = entity(&r.destination, false);

    let ranges = |ports: &[Port]| -> Vec<Prefix> {
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
    let pos = [ranges(&r.destination.ports), icmp(&r.icmp)].concat();
    let neg = [ranges(&r.destination.not_ports), icmp(&r.not_icmp)].concat();
    if !pos.is_empty() || !neg.is_empty() {
        m.port = Some(FieldMatch { pos, neg });
    }
    Ok(m)
}

/// Interns bitmaps: each distinct bitmap gets one class number.
struct Interner {
    classes: Vec<Bitmap>,
    index: HashMap<[u64; WORDS], u32>,
}

impl Default for Interner {
    fn default() -> Self {
        let mut index = HashMap::new();
        index.insert(Bitmap::EMPTY.words, 0);
        Interner {
            classes: vec![Bitmap::EMPTY],
            index,
        }
    }
}

impl Interner {
    fn class(&mut self, b: Bitmap) -> u32 {
        let next = self.classes.len() as u32;
        *self.index.entry(b.words).or_insert_with(|| {
            self.classes.push(b);
            next
        })
    }
}

fn build_table(
    stage: u32,
    direction: u32,
    rules: Vec<RuleInfo>,
    matches: &[RuleMatch],
    masks: BTreeMap<String, Bitmap>,
    interner: &mut Interner,
) -> Table {
    let (mut v4, mut v6) = (Bitmap::EMPTY, Bitmap::EMPTY);
    for (r, m) in matches.iter().enumerate() {
        if m.v4 {
            bits::set(&mut v4, r);
        }
        if m.v6 {
            bits::set(&mut v6, r);
        }
    }
    let mut addr = |field: fn(&RuleMatch) -> &FieldMatch, active: &Bitmap| -> Vec<(Prefix, u32)> {
        let fm: Vec<FieldMatch> = matches.iter().map(|m| field(m).clone()).collect();
        prefix::classify(&fm, active)
            .into_iter()
            .map(|(p, b)| (p, interner.class(b)))
            .collect()
    };
    let src_v4 = addr(|m| &m.src4, &v4);
    let dst_v4 = addr(|m| &m.dst4, &v4);
    let src_v6 = addr(|m| &m.src6, &v6);
    let dst_v6 = addr(|m| &m.dst6, &v6);

    // Protocols: every protocol any rule names gets its own subtree.
    let protos: BTreeSet<u8> = matches
        .iter()
        .flat_map(|m| m.protocol.into_iter().chain(m.not_protocol))
        .collect();
    let proto_ok = |m: &RuleMatch, p: Option<u8>| {
        // `p == None` is a protocol no rule names.
        m.protocol.is_none_or(|want| Some(want) == p)
            && m.not_protocol.is_none_or(|not| Some(not) != p)
    };
    let mut ports = Vec::new();
    let mut any = Bitmap::EMPTY;
    for (r, m) in matches.iter().enumerate() {
        if proto_ok(m, None) && m.port.is_none() {
            bits::set(&mut any, r);
        }
    }
    ports.push(PortEntry {
        proto: None,
        has_ports: None,
        port: 0,
        port_len: 0,
        class: interner.class(any),
    });
    for &p in &protos {
        // No L4 ports known (non-first fragments, other protocols): only
        // rules with no port constraint can match.
        let mut no_ports = Bitmap::EMPTY;
        let mut all = Bitmap::EMPTY;
        let mut fms = Vec::new();
        for (r, m) in matches.iter().enumerate() {
            let ok = proto_ok(m, Some(p));
            if ok {
                bits::set(&mut all, r);
                if m.port.is_none() {
                    bits::set(&mut no_ports, r);
                }
            }
            fms.push(m.port.clone().unwrap_or_default());
        }
        ports.push(PortEntry {
            proto: Some(p),
            has_ports: Some(false),
            port: 0,
            port_len: 0,
            class: interner.class(no_ports),
        });
        for (prefix, b) in prefix::classify(&fms, &all) {
            ports.push(PortEntry {
                proto: Some(p),
                has_ports: Some(true),
                port: prefix.value(16) as u16,
                port_len: prefix.len,
                class: interner.class(b),
            });
        }
    }
    Table {
        stage,
        direction,
        rules,
        src_v4,
        dst_v4,
        src_v6,
        dst_v6,
        ports,
        masks,
    }
}

#[cfg(test)]
mod tests;
