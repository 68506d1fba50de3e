//! The resolver: a rule's match fields as prefix lists per field, with rule
//! selectors, network sets and named ports turned into address sets
//! (docs/semantics.md 2.4, 2.5).

use super::*;

/// One rule part's constraints, per field, as prefix lists.
#[derive(Debug, Clone, Default)]
pub(crate) struct RuleMatch {
    /// Families the part takes part in (2.4, and empty address sets).
    pub(super) v4: bool,
    pub(super) v6: bool,
    pub(super) src4: FieldMatch,
    pub(super) dst4: FieldMatch,
    pub(super) src6: FieldMatch,
    pub(super) dst6: FieldMatch,
    pub(super) protocol: Option<u8>,
    pub(super) not_protocol: Option<u8>,
    /// Destination port (or ICMP type/code) constraint; `None`: none.
    pub(super) dport: Option<FieldMatch>,
    /// Source port constraint.
    pub(super) sport: Option<FieldMatch>,
}

impl RuleMatch {
    pub(super) fn all() -> RuleMatch {
        RuleMatch {
            v4: true,
            v6: true,
            ..Default::default()
        }
    }
}

/// Turns rule selectors, network sets and named ports into address sets.
pub(super) struct Resolver<'a> {
    store: &'a Store,
}

/// A positive address constraint: `None` = none; `Some(empty)` = nothing
/// can match.
pub(super) type AddrSet = Option<Vec<IpNetwork>>;

impl<'a> Resolver<'a> {
    pub(super) fn new(store: &'a Store) -> Self {
        Resolver { store }
    }

    /// Addresses of the known resources a rule's selector picks, within the
    /// scope its `namespaceSelector` sets (2.5). Host endpoints count by
    /// their expectedIPs only.
    pub(super) fn selected(&self, e: &EntityRule, sel: &Selector) -> Vec<IpNetwork> {
        let mut out = Vec::new();
        let ns = e.namespace_selector.as_ref().filter(|n| !n.is_blank());
        let global = ns.is_none_or(|n| n.selector().is_global());
        // None: no network set is in scope; Some(None): all are.
        let namespaced = match ns {
            None => Some(None),
            Some(n) if n.selector().is_global() => None,
            Some(n) => Some(Some(n.selector())),
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
                let ns = s.meta.namespace.as_deref().unwrap_or("default");
                let ns_labels = self.store.namespace_labels(ns);
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
    pub(super) fn addresses(&self, e: &EntityRule) -> (AddrSet, Vec<IpNetwork>) {
        let mut pos: AddrSet = (!e.nets.is_empty()).then(|| e.nets.iter().map(|c| c.0).collect());
        let mut neg: Vec<IpNetwork> = e.not_nets.iter().map(|c| c.0).collect();
        let scoped = e.namespace_selector.as_ref().is_some_and(|s| !s.is_blank());
        if let Some(sel) = &e.selector {
            pos = Some(intersect(pos, self.selected(e, sel.selector())));
        } else if scoped {
            // A namespaceSelector alone (or with notSelector) limits the
            // peer to the scoped resources.
            let all = Selector::parse("all()").expect("constant");
            pos = Some(intersect(pos, self.selected(e, &all)));
        }
        if let Some(sel) = &e.not_selector {
            neg.extend(self.selected(e, sel.selector()));
        }
        if e.service_accounts.is_some() || e.services.is_some() {
            // Pods only: no host endpoint or network set ever matches.
            pos = Some(Vec::new());
        }
        (pos, neg)
    }

    /// `(address, port)` pairs a named port stands for, for `protocol`,
    /// limited by the entity's selector (2.5 "Named ports").
    pub(super) fn named_port(
        &self,
        e: &EntityRule,
        name: &str,
        protocol: Option<u8>,
    ) -> Vec<(IpAddr, u8, u16)> {
        let sel = e.selector.as_ref();
        let mut out = Vec::new();
        for h in &self.store.host_endpoints {
            if sel.is_some_and(|s| !s.matches(&endpoint_labels(self.store, h))) {
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
                    out.push((ip, p.protocol.0, p.port));
                }
            }
        }
        out
    }

    /// Whether [`Resolver::rule`] of `r` depends on nothing but `r`: no
    /// selector, namespace selector or named port, which other resources
    /// answer.
    pub(super) fn stands_alone(r: &Rule) -> bool {
        let alone = |e: &model::EntityRule| {
            e.selector.is_none()
                && e.not_selector.is_none()
                && e.namespace_selector.as_ref().is_none_or(|s| s.is_blank())
                && !e.ports.iter().any(|p| matches!(p, Port::Named(_)))
        };
        alone(&r.source) && alone(&r.destination)
    }

    /// The parts of `r`: one, or several when named ports couple addresses
    /// and ports. An empty list: the rule can match nothing.
    pub(super) fn rule(&self, r: &Rule) -> Result<Vec<RuleMatch>, Unsupported> {
        let named = |ports: &[Port]| ports.iter().any(|p| matches!(p, Port::Named(_)));
        if named(&r.destination.not_ports) || named(&r.source.not_ports) {
            return Err(Unsupported::NamedNotPorts);
        }
        if named(&r.source.ports) {
            return Err(Unsupported::NamedSourcePorts);
        }
        if r.not_icmp.is_some()
            && !r
                .protocol
                .is_some_and(|p| filter_common::proto::is_icmp(p.0))
        {
            return Err(Unsupported::NotIcmpWithoutIcmp);
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
        // A named port's part matches the protocol the endpoint declares for
        // it: without a rule protocol (accepted since Calico v3.32) a TCP
        // named port must not match UDP to the same port.
        let mut dst_parts: Vec<(AddrSet, Option<FieldMatch>, Option<u8>)> = Vec::new();
        let dnumeric = [numeric(&r.destination.ports), icmp(&r.icmp)].concat();
        let has_named = named(&r.destination.ports);
        if !dnumeric.is_empty() || !has_named {
            let constrained = !dnumeric.is_empty() || !dneg.is_empty();
            dst_parts.push((
                dst_pos.clone(),
                port_field(dnumeric, dneg.clone(), constrained),
                protocol,
            ));
        }
        let mut by_port: BTreeMap<(u8, u16), Vec<IpNetwork>> = BTreeMap::new();
        for p in &r.destination.ports {
            if let Port::Named(n) = p {
                for (ip, proto, port) in self.named_port(&r.destination, n, protocol) {
                    by_port
                        .entry((proto, port))
                        .or_default()
                        .push(IpNetwork::from(ip));
                }
            }
        }
        for ((proto, port), ips) in by_port {
            let pos = Some(intersect(dst_pos.clone(), ips));
            let ports = vec![Prefix::new(u128::from(port), 16, 16)];
            dst_parts.push((
                pos,
                Some(FieldMatch {
                    pos: ports,
                    neg: dneg.clone(),
                }),
                Some(proto),
            ));
        }

        let mut parts = Vec::with_capacity(dst_parts.len());
        for (dpos, dport, protocol) in dst_parts {
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
pub(super) fn field(pos: &AddrSet, neg: &[IpNetwork], v4: bool) -> Option<FieldMatch> {
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
pub(super) fn intersect(a: AddrSet, b: Vec<IpNetwork>) -> Vec<IpNetwork> {
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
