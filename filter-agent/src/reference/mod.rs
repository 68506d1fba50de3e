//! The semantics as a plain interpreter: the oracle of the tests and the
//! engine of `filter-agent explain`.
//!
//! In: a [`Store`], a host endpoint, a direction and a [`Packet`]. Out: what
//! each stage of docs/semantics.md 3.9 said and who decided. It reads the
//! resources directly, rule by rule, and on purpose shares nothing with
//! `compile` except the model and the selector: two independent readings of
//! the same document, compared on random input.

use std::{
    cmp::Ordering,
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use ipnetwork::IpNetwork;

use crate::{
    model::{
        defaults, Action, EntityRule, HostEndpointSpec, IcmpFields, PolicyType, Port, Resource,
        Rule, Store, TierAction,
    },
    selector::{Selector, Written},
};

// The one vocabulary: the stages and directions of filter-common, with
// their one table of names.
pub use filter_common::{Direction, Stage};

/// A packet as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// Source address.
    pub src: IpAddr,
    /// Destination address (before DNAT).
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Source port (TCP, UDP, SCTP); `None` for other protocols and
    /// non-first fragments.
    pub sport: Option<u16>,
    /// Destination port.
    pub dport: Option<u16>,
    /// ICMP type and code (ICMP, ICMPv6).
    pub icmp: Option<(u8, u8)>,
    /// Conntrack already knows the flow (ESTABLISHED or RELATED).
    pub established: bool,
    /// Routed through the node rather than to or from it.
    pub forwarded: bool,
    /// Where kube-proxy's DNAT sends it, if anywhere.
    pub dnat_to: Option<SocketAddr>,
}

impl Packet {
    /// A new TCP connection's first packet, from port 40000 (as a client's
    /// ephemeral port) to `dport`.
    pub fn tcp(src: IpAddr, dst: IpAddr, dport: u16) -> Packet {
        Packet {
            src,
            dst,
            proto: 6,
            sport: Some(40000),
            dport: Some(dport),
            icmp: None,
            established: false,
            forwarded: false,
            dnat_to: None,
        }
    }
}

/// Who decided, or logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// A policy rule.
    Policy {
        /// Tier.
        tier: String,
        /// Policy.
        policy: String,
        /// Rule index.
        rule: usize,
    },
    /// A tier's end action.
    TierEnd {
        /// Tier.
        tier: String,
    },
    /// A profile rule.
    Profile {
        /// Profile.
        profile: String,
        /// Rule index.
        rule: usize,
    },
    /// No profile allowed: the normal stage's final drop.
    NoProfileAllowed,
    /// A failsafe port.
    Failsafe,
    /// Conntrack: part of a known flow.
    Conntrack,
    /// Nothing of the stage applies (forward: allowed by default).
    Default,
}

/// A stage's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted.
    Allow,
    /// Dropped.
    Deny,
    /// No verdict: the next stage decides.
    Continue,
    /// The stage did not run for this packet.
    NotEvaluated,
}

/// What one stage did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageResult {
    /// Which stage.
    pub stage: Stage,
    /// Its verdict.
    pub verdict: Verdict,
    /// Who decided (Allow/Deny), or why it did not run.
    pub by: Option<Who>,
    /// Log rules that matched, in order.
    pub logged: Vec<Who>,
}

/// The whole pipeline's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// Final verdict: `Allow` or `Deny`.
    pub verdict: Verdict,
    /// Every stage, in pipeline order.
    pub stages: Vec<StageResult>,
}

/// Failsafe entries (4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailsafeEntry {
    /// 6 or 17.
    pub proto: u8,
    /// Port.
    pub port: u16,
    /// Inbound: source net; outbound: destination net.
    pub net: Option<IpNetwork>,
}

/// Inbound and outbound failsafe lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failsafe {
    /// FailsafeInboundHostPorts.
    pub inbound: Vec<FailsafeEntry>,
    /// FailsafeOutboundHostPorts.
    pub outbound: Vec<FailsafeEntry>,
}

impl Failsafe {
    /// Felix's defaults (4), tcp:5473 included.
    pub fn calico_defaults() -> Failsafe {
        let list = |l: &[(u8, u16)]| {
            l.iter()
                .map(|&(proto, port)| FailsafeEntry {
                    proto,
                    port,
                    net: None,
                })
                .collect()
        };
        Failsafe {
            inbound: list(&defaults::FAILSAFE_INBOUND),
            outbound: list(&defaults::FAILSAFE_OUTBOUND),
        }
    }

    /// From the store's FelixConfiguration: `default`, then `node.<node>`
    /// overriding field by field; Calico's defaults where neither sets one.
    pub fn from_store(store: &Store, node: &str) -> Failsafe {
        let mut f = Failsafe::calico_defaults();
        let node_cfg = format!("node.{node}");
        for name in [defaults::FELIX_CONFIG, node_cfg.as_str()] {
            let Some(cfg) = store.felix_configs.iter().find(|c| c.meta.name == name) else {
                continue;
            };
            let convert = |l: &[crate::model::ProtoPort]| {
                l.iter()
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
                        Some(FailsafeEntry {
                            proto,
                            port: p.port,
                            net,
                        })
                    })
                    .collect()
            };
            if let Some(l) = &cfg.spec.failsafe_inbound_host_ports {
                f.inbound = convert(l);
            }
            if let Some(l) = &cfg.spec.failsafe_outbound_host_ports {
                f.outbound = convert(l);
            }
        }
        f
    }

    fn hit(list: &[FailsafeEntry], proto: u8, port: Option<u16>, peer: IpAddr) -> bool {
        list.iter().any(|e| {
            e.proto == proto && Some(e.port) == port && e.net.is_none_or(|n| n.contains(peer))
        })
    }

    /// Filter/mangle inbound: protocol, destination port, source net.
    pub fn inbound(&self, p: &Packet) -> bool {
        Self::hit(&self.inbound, p.proto, p.dport, p.src)
    }

    /// Filter outbound: protocol, destination port, destination net.
    pub fn outbound(&self, p: &Packet) -> bool {
        Self::hit(&self.outbound, p.proto, p.dport, p.dst)
    }

    /// Raw inbound: also replies of outbound failsafe flows (by source port).
    pub fn raw_inbound(&self, p: &Packet) -> bool {
        self.inbound(p) || Self::hit(&self.outbound, p.proto, p.sport, p.src)
    }

    /// Raw outbound: also replies of inbound failsafe flows.
    pub fn raw_outbound(&self, p: &Packet) -> bool {
        self.outbound(p) || Self::hit(&self.inbound, p.proto, p.sport, p.dst)
    }
}

/// The resources an evaluation reads.
pub struct Reference<'a> {
    store: &'a Store,
}

impl<'a> Reference<'a> {
    /// Evaluates against `store`.
    pub fn new(store: &'a Store) -> Self {
        Reference { store }
    }

    /// Labels of a host endpoint: profile labels, overridden by its own.
    fn hep_labels(&self, h: &Resource<HostEndpointSpec>) -> BTreeMap<String, String> {
        let mut l = BTreeMap::new();
        for name in &h.spec.profiles {
            for p in self.store.profiles.iter().filter(|p| &p.meta.name == name) {
                l.extend(
                    p.spec
                        .labels_to_apply
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone())),
                );
            }
        }
        l.extend(h.meta.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        l
    }

    /// Whether a global policy applies to `h` in `dir` (3.1).
    fn applies(
        &self,
        spec: &crate::model::GlobalNetworkPolicySpec,
        h: &Resource<HostEndpointSpec>,
        dir: Direction,
    ) -> bool {
        let labels = self.hep_labels(h);
        let sel_ok = spec.selector.as_ref().is_none_or(|s| s.matches(&labels));
        // Namespace and service-account selectors see no labels on a HEP,
        // and all() there means "in some namespace" (1.1).
        let empty = BTreeMap::new();
        let side_ok = |s: &Option<Written>| match s {
            None => true,
            Some(w) if w.is_blank() => true,
            Some(w) if w.selector().is_all() => false,
            Some(w) => w.matches(&empty),
        };
        let types: Vec<PolicyType> = if spec.types.is_empty() {
            let mut t = Vec::new();
            if !spec.ingress.is_empty() || spec.egress.is_empty() {
                t.push(PolicyType::Ingress);
            }
            if !spec.egress.is_empty() {
                t.push(PolicyType::Egress);
            }
            t
        } else {
            spec.types.clone()
        };
        let want = if dir == Direction::Ingress {
            PolicyType::Ingress
        } else {
            PolicyType::Egress
        };
        sel_ok
            && side_ok(&spec.namespace_selector)
            && side_ok(&spec.service_account_selector)
            && types.contains(&want)
    }

    fn in_stage(spec: &crate::model::GlobalNetworkPolicySpec, s: Stage, dir: Direction) -> bool {
        match s {
            Stage::Untracked => spec.do_not_track,
            Stage::PreDnat => spec.pre_dnat && dir == Direction::Ingress,
            Stage::Normal => !spec.do_not_track && !spec.pre_dnat,
            Stage::Forward => !spec.do_not_track && !spec.pre_dnat && spec.apply_on_forward,
        }
    }

    /// One stage (3.3 steps 1-4): tiers → policies → rules. For the normal
    /// stage, profiles and the final drop follow (step 5).
    pub fn stage(
        &self,
        h: &Resource<HostEndpointSpec>,
        s: Stage,
        dir: Direction,
        p: &Packet,
    ) -> StageResult {
        let mut out = StageResult {
            stage: s,
            verdict: Verdict::Continue,
            by: None,
            logged: Vec::new(),
        };
        if s == Stage::Untracked && h.spec.interface_name == "*" {
            return out;
        }
        // Tiers in order; the implicit default tier if not declared.
        let mut tiers: Vec<(String, Option<f64>, TierAction)> = self
            .store
            .tiers
            .iter()
            .map(|t| {
                (
                    t.meta.name.clone(),
                    t.spec.order,
                    t.spec.default_action.unwrap_or(TierAction::Deny),
                )
            })
            .collect();
        if !tiers.iter().any(|t| t.0 == defaults::TIER) {
            tiers.push((
                defaults::TIER.into(),
                Some(defaults::TIER_ORDER),
                TierAction::Deny,
            ));
        }
        let ord = |a: Option<f64>, b: Option<f64>| {
            a.unwrap_or(f64::INFINITY)
                .total_cmp(&b.unwrap_or(f64::INFINITY))
        };
        tiers.sort_by(|a, b| ord(a.1, b.1).then_with(|| a.0.cmp(&b.0)));
        'tiers: for (tier, _, default_action) in &tiers {
            let mut pols: Vec<_> = self
                .store
                .global_policies
                .iter()
                .filter(|g| g.spec.tier.as_deref().unwrap_or(defaults::TIER) == tier)
                .filter(|g| Self::in_stage(&g.spec, s, dir) && self.applies(&g.spec, h, dir))
                .collect();
            if pols.is_empty() {
                continue;
            }
            pols.sort_by(|a, b| -> Ordering {
                ord(a.spec.order, b.spec.order).then_with(|| a.meta.name.cmp(&b.meta.name))
            });
            for g in pols {
                let rules = if dir == Direction::Ingress {
                    &g.spec.ingress
                } else {
                    &g.spec.egress
                };
                for (i, r) in rules.iter().enumerate() {
                    if !self.rule_matches(r, p) {
                        continue;
                    }
                    let who = Who::Policy {
                        tier: tier.clone(),
                        policy: g.meta.name.clone(),
                        rule: i,
                    };
                    match r.action {
                        Action::Log => out.logged.push(who),
                        Action::Pass => continue 'tiers,
                        Action::Allow | Action::Deny => {
                            out.verdict = if r.action == Action::Allow {
                                Verdict::Allow
                            } else {
                                Verdict::Deny
                            };
                            out.by = Some(who);
                            return out;
                        }
                    }
                }
            }
            if matches!(s, Stage::Normal | Stage::Forward) && *default_action == TierAction::Deny {
                out.verdict = Verdict::Deny;
                out.by = Some(Who::TierEnd { tier: tier.clone() });
                return out;
            }
        }
        if s == Stage::Normal {
            self.profiles(h, dir, p, &mut out);
        }
        out
    }

    fn profiles(
        &self,
        h: &Resource<HostEndpointSpec>,
        dir: Direction,
        p: &Packet,
        out: &mut StageResult,
    ) {
        for name in &h.spec.profiles {
            if name == defaults::ALLOW_PROFILE
                && !self.store.profiles.iter().any(|x| &x.meta.name == name)
            {
                out.verdict = Verdict::Allow;
                out.by = Some(Who::Profile {
                    profile: name.clone(),
                    rule: 0,
                });
                return;
            }
            let Some(prof) = self.store.profiles.iter().find(|x| &x.meta.name == name) else {
                continue;
            };
            let rules = if dir == Direction::Ingress {
                &prof.spec.ingress
            } else {
                &prof.spec.egress
            };
            for (i, r) in rules.iter().enumerate() {
                if !self.rule_matches(r, p) {
                    continue;
                }
                let who = Who::Profile {
                    profile: name.clone(),
                    rule: i,
                };
                match r.action {
                    Action::Log => out.logged.push(who),
                    // Pass leaves this profile for the next one.
                    Action::Pass => break,
                    Action::Allow | Action::Deny => {
                        out.verdict = if r.action == Action::Allow {
                            Verdict::Allow
                        } else {
                            Verdict::Deny
                        };
                        out.by = Some(who);
                        return;
                    }
                }
            }
        }
        out.verdict = Verdict::Deny;
        out.by = Some(Who::NoProfileAllowed);
    }

    /// Whether any applyOnForward policy applies to `h` in `dir`.
    fn forward_applies(&self, h: &Resource<HostEndpointSpec>, dir: Direction) -> bool {
        self.store
            .global_policies
            .iter()
            .any(|g| Self::in_stage(&g.spec, Stage::Forward, dir) && self.applies(&g.spec, h, dir))
    }

    /// The whole pipeline of 3.9 for `p` on `h`.
    pub fn explain(
        &self,
        h: &Resource<HostEndpointSpec>,
        dir: Direction,
        p: &Packet,
        fs: &Failsafe,
    ) -> Explanation {
        let mut stages = Vec::new();
        let skipped = |s: Stage, why: Option<Who>| StageResult {
            stage: s,
            verdict: Verdict::NotEvaluated,
            by: why,
            logged: Vec::new(),
        };
        let finish =
            |mut stages: Vec<StageResult>, verdict: Verdict, rest: &[Stage], why: Option<Who>| {
                stages.extend(rest.iter().map(|s| skipped(*s, why.clone())));
                Explanation { verdict, stages }
            };
        use Stage::*;
        let untracked_applies = h.spec.interface_name != "*";
        if dir == Direction::Egress && p.forwarded {
            // Forwarded egress: conntrack, then the forward stage.
            stages.push(skipped(Untracked, None));
            stages.push(skipped(PreDnat, None));
            stages.push(skipped(Normal, None));
            if p.established {
                return finish(stages, Verdict::Allow, &[Forward], Some(Who::Conntrack));
            }
            return self.forward(h, dir, p, stages);
        }
        // Untracked stage: every packet, unless failsafe (raw).
        let raw_failsafe = if dir == Direction::Ingress {
            fs.raw_inbound(p)
        } else {
            fs.raw_outbound(p)
        };
        if untracked_applies && !raw_failsafe {
            let u = self.stage(h, Untracked, dir, p);
            let v = u.verdict;
            stages.push(u);
            if v == Verdict::Allow || v == Verdict::Deny {
                return finish(stages, v, &[PreDnat, Normal, Forward], None);
            }
        } else {
            stages.push(skipped(Untracked, raw_failsafe.then_some(Who::Failsafe)));
        }
        if p.established {
            return finish(
                stages,
                Verdict::Allow,
                &[PreDnat, Normal, Forward],
                Some(Who::Conntrack),
            );
        }
        let mut p = *p;
        if dir == Direction::Ingress {
            if fs.inbound(&p) {
                // The mangle failsafe skips pre-DNAT policy (4).
                stages.push(skipped(PreDnat, Some(Who::Failsafe)));
            } else {
                let d = self.stage(h, PreDnat, dir, &p);
                let v = d.verdict;
                stages.push(d);
                if v == Verdict::Allow || v == Verdict::Deny {
                    return finish(stages, v, &[Normal, Forward], None);
                }
            }
            if let Some(to) = p.dnat_to {
                p.dst = to.ip();
                if p.dport.is_some() {
                    p.dport = Some(to.port());
                }
            }
        } else {
            stages.push(skipped(PreDnat, None));
        }
        if p.forwarded {
            stages.push(skipped(Normal, None));
            return self.forward(h, dir, &p, stages);
        }
        let failsafe = if dir == Direction::Ingress {
            fs.inbound(&p)
        } else {
            fs.outbound(&p)
        };
        if failsafe {
            return finish(
                stages,
                Verdict::Allow,
                &[Normal, Forward],
                Some(Who::Failsafe),
            );
        }
        let n = self.stage(h, Normal, dir, &p);
        let v = n.verdict;
        stages.push(n);
        stages.push(skipped(Forward, None));
        Explanation { verdict: v, stages }
    }

    fn forward(
        &self,
        h: &Resource<HostEndpointSpec>,
        dir: Direction,
        p: &Packet,
        mut stages: Vec<StageResult>,
    ) -> Explanation {
        if !self.forward_applies(h, dir) {
            stages.push(StageResult {
                stage: Stage::Forward,
                verdict: Verdict::Continue,
                by: Some(Who::Default),
                logged: Vec::new(),
            });
            return Explanation {
                verdict: Verdict::Allow,
                stages,
            };
        }
        let f = self.stage(h, Stage::Forward, dir, p);
        let verdict = if f.verdict == Verdict::Deny {
            Verdict::Deny
        } else {
            Verdict::Allow
        };
        stages.push(f);
        Explanation { verdict, stages }
    }

    /// Whether rule `r` matches `p` (2): every field present must hold.
    pub fn rule_matches(&self, r: &Rule, p: &Packet) -> bool {
        let v4 = p.src.is_ipv4();
        if r.ip_version.is_some_and(|v| (v == 4) != v4) {
            return false;
        }
        // A nets/notNets list with entries but none of this family drops the
        // rule for the family (2.4).
        for l in [
            &r.source.nets,
            &r.source.not_nets,
            &r.destination.nets,
            &r.destination.not_nets,
        ] {
            if !l.is_empty() && !l.iter().any(|c| c.0.is_ipv4() == v4) {
                return false;
            }
        }
        if r.protocol.is_some_and(|x| x.0 != p.proto)
            || r.not_protocol.is_some_and(|x| x.0 == p.proto)
        {
            return false;
        }
        // ICMP is protocol 1 on IPv4 only, ICMPv6 58 on IPv6 only: a rule
        // naming one is not rendered for the other family (2.4).
        if matches!(
            (r.protocol.map(|x| x.0), v4),
            (Some(1), false) | (Some(58), true)
        ) {
            return false;
        }
        let icmp_ok = |f: &IcmpFields| {
            p.icmp.is_some_and(|(t, c)| {
                f.icmp_type.is_none_or(|x| x == t) && f.code.is_none_or(|x| x == c)
            })
        };
        if r.icmp.as_ref().is_some_and(|f| !icmp_ok(f)) {
            return false;
        }
        if let Some(f) = &r.not_icmp {
            if p.icmp.is_none() || icmp_ok(f) {
                return false;
            }
        }
        self.entity_matches(&r.source, p.src, p.sport, p.proto)
            && self.entity_matches(&r.destination, p.dst, p.dport, p.proto)
    }

    fn entity_matches(&self, e: &EntityRule, ip: IpAddr, port: Option<u16>, proto: u8) -> bool {
        if !e.nets.is_empty() && !e.nets.iter().any(|n| n.0.contains(ip)) {
            return false;
        }
        if e.not_nets.iter().any(|n| n.0.contains(ip)) {
            return false;
        }
        if e.service_accounts.is_some() || e.services.is_some() {
            return false;
        }
        let scoped = e.namespace_selector.as_ref().is_some_and(|s| !s.is_blank());
        if let Some(sel) = &e.selector {
            if !self
                .known_addresses(e, sel.selector())
                .iter()
                .any(|n| n.contains(ip))
            {
                return false;
            }
        } else if scoped {
            let all = Selector::parse("all()").expect("constant");
            if !self.known_addresses(e, &all).iter().any(|n| n.contains(ip)) {
                return false;
            }
        }
        if let Some(sel) = &e.not_selector {
            if self
                .known_addresses(e, sel.selector())
                .iter()
                .any(|n| n.contains(ip))
            {
                return false;
            }
        }
        let in_ports = |ports: &[Port], port: u16| {
            ports.iter().any(|x| match x {
                Port::Range { first, last } => (*first..=*last).contains(&port),
                Port::Named(n) => self.named_port_hit(e, n, proto, ip, port),
            })
        };
        if !e.ports.is_empty() && !port.is_some_and(|v| in_ports(&e.ports, v)) {
            return false;
        }
        if !e.not_ports.is_empty() && port.is_none_or(|v| in_ports(&e.not_ports, v)) {
            return false;
        }
        true
    }

    /// Addresses of the known resources `sel` picks in the entity's scope:
    /// host endpoints (expectedIPs) and global network sets unless a
    /// namespace selector other than `global()` is set; network sets whose
    /// namespace it selects (2.5, 5.4).
    fn known_addresses(&self, e: &EntityRule, sel: &Selector) -> Vec<IpNetwork> {
        let ns_sel = e.namespace_selector.as_ref().filter(|s| !s.is_blank());
        let global = ns_sel.is_some_and(|s| s.selector().is_global());
        let mut out = Vec::new();
        if ns_sel.is_none() || global {
            for h in &self.store.host_endpoints {
                if sel.matches(&self.hep_labels(h)) {
                    out.extend(
                        h.spec
                            .expected_ips
                            .iter()
                            .filter_map(|s| s.parse::<IpAddr>().ok())
                            .map(IpNetwork::from),
                    );
                }
            }
            for s in &self.store.global_network_sets {
                if sel.matches(&s.meta.labels) {
                    out.extend(
                        s.spec
                            .nets
                            .iter()
                            .filter_map(|n| crate::model::parse_net(n).ok()),
                    );
                }
            }
        }
        if !global {
            for s in &self.store.network_sets {
                let ns = s.meta.namespace.as_deref().unwrap_or("default");
                let labels = self.store.namespace_labels(ns);
                let ns_ok = ns_sel.is_none_or(|n| n.matches(&labels));
                if ns_ok && sel.matches(&s.meta.labels) {
                    out.extend(
                        s.spec
                            .nets
                            .iter()
                            .filter_map(|n| crate::model::parse_net(n).ok()),
                    );
                }
            }
        }
        out
    }

    /// Whether `(ip, proto, port)` belongs to an endpoint that declares
    /// named port `name`, limited by the entity's selector.
    fn named_port_hit(&self, e: &EntityRule, name: &str, proto: u8, ip: IpAddr, port: u16) -> bool {
        let sel = e.selector.as_ref();
        self.store.host_endpoints.iter().any(|h| {
            sel.as_ref().is_none_or(|s| s.matches(&self.hep_labels(h)))
                && h.spec
                    .expected_ips
                    .iter()
                    .any(|x| x.parse::<IpAddr>().is_ok_and(|a| a == ip))
                && h.spec
                    .ports
                    .iter()
                    .any(|p| p.name == name && p.protocol.0 == proto && p.port == port)
        })
    }
}

#[cfg(test)]
mod tests;
