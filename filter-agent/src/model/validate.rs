//! Checks that span fields (docs/semantics.md 2.7), run after parsing.
//!
//! Single-value grammar (CIDRs, ports, protocols, actions, unknown fields) is
//! checked while deserializing, in `types`. Here: what needs several fields
//! at once, and `types` defaulting, which the Calico API layer applies before
//! storing a policy (1.1).

use super::{
    Error, GlobalNetworkPolicySpec, HostEndpointSpec, Origin, PolicyType, Resource, Rule, Store,
};

/// Validates every resource of `store`, appending errors.
pub fn store(store: &Store, errors: &mut Vec<Error>) {
    // Names, labels and annotations of every kind.
    macro_rules! meta_of {
        ($list:expr, $kind:expr) => {
            for r in &$list {
                let mut report = reporter(r, errors);
                name(&r.meta.name, $kind, &mut report);
                metadata(&r.meta, &mut report);
            }
        };
    }
    meta_of!(store.global_policies, "GlobalNetworkPolicy");
    meta_of!(store.network_policies, "NetworkPolicy");
    meta_of!(store.host_endpoints, "HostEndpoint");
    meta_of!(store.global_network_sets, "GlobalNetworkSet");
    meta_of!(store.network_sets, "NetworkSet");
    meta_of!(store.tiers, "Tier");
    meta_of!(store.profiles, "Profile");
    meta_of!(store.felix_configs, "FelixConfiguration");
    for p in &store.global_policies {
        global_policy(p, errors);
    }
    for p in &store.network_policies {
        let mut report = reporter(p, errors);
        performance_hints(&p.spec.performance_hints, &mut report);
        rule_lists(&p.spec.ingress, &p.spec.egress, false, &mut report);
    }
    for h in &store.host_endpoints {
        host_endpoint(h, errors);
    }
    for p in &store.profiles {
        let mut report = reporter(p, errors);
        rule_lists(&p.spec.ingress, &p.spec.egress, true, &mut report);
    }
    for (kind, sets) in [
        ("GlobalNetworkSet", &store.global_network_sets),
        ("NetworkSet", &store.network_sets),
    ] {
        for g in sets {
            let mut report = reporter(g, errors);
            for (i, n) in g.spec.nets.iter().enumerate() {
                if crate::compile::lenient_net(n).is_none() {
                    report.error(
                        &format!("spec.nets[{i}]"),
                        format!("invalid CIDR {n:?} in a {kind}: an address or address/prefix"),
                    );
                }
            }
        }
    }
    // FelixConfiguration: every field as Calico checks it; the failsafe
    // entries' protocol TCP, UDP or SCTP.
    for c in &store.felix_configs {
        let mut report = reporter(c, errors);
        super::felix::check(&c.spec.other, |field, why| report.error(field, why));
        if let Some(prefix) = &c.spec.log_prefix {
            if !prefix
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "%: /_-".contains(ch))
            {
                report.error(
                    "spec.logPrefix",
                    format!("invalid logPrefix {prefix:?}: letters, digits and '%', ':', ' ', '/', '_', '-' only"),
                );
            }
        }
        for (field, list) in [
            (
                "spec.failsafeInboundHostPorts",
                &c.spec.failsafe_inbound_host_ports,
            ),
            (
                "spec.failsafeOutboundHostPorts",
                &c.spec.failsafe_outbound_host_ports,
            ),
        ] {
            for (i, e) in list.iter().flatten().enumerate() {
                if !matches!(e.protocol.as_str(), "TCP" | "UDP" | "SCTP") {
                    report.error(
                        &format!("{field}[{i}].protocol"),
                        format!("invalid protocol {:?}: TCP, UDP or SCTP", e.protocol),
                    );
                }
                if let Some(n) = &e.net {
                    if super::parse_net(n).is_err() {
                        report.error(&format!("{field}[{i}].net"), format!("invalid CIDR {n:?}"));
                    }
                }
            }
        }
    }
    // The namespace label maps a real namespace into Calico's v1 data
    // model; a network set of either kind may not carry it.
    for (sets, kind) in [
        (&store.global_network_sets, "GlobalNetworkSet"),
        (&store.network_sets, "NetworkSet"),
    ] {
        for s in sets {
            if s.meta.labels.contains_key("projectcalico.org/namespace") {
                reporter(s, errors).error(
                    "metadata.labels",
                    format!("a {kind} may not carry the label projectcalico.org/namespace"),
                );
            }
        }
    }
    for t in &store.tiers {
        let mut report = reporter(t, errors);
        // The reserved tiers keep their order and action (Calico's CRD
        // rules for the well-known tiers).
        for (reserved, order, action) in [
            (
                super::defaults::TIER,
                super::defaults::TIER_ORDER,
                super::TierAction::Deny,
            ),
            ("kube-admin", 1_000.0, super::TierAction::Pass),
            ("kube-baseline", 10_000_000.0, super::TierAction::Pass),
        ] {
            if t.meta.name != reserved {
                continue;
            }
            if t.spec.order.is_some_and(|o| o != order) {
                report.error(
                    "spec.order",
                    format!("the {reserved} tier must have order {order}"),
                );
            }
            if t.spec.default_action.is_some_and(|a| a != action) {
                report.error(
                    "spec.defaultAction",
                    format!("the {reserved} tier must have defaultAction {action:?}"),
                );
            }
        }
        if t.meta.name == super::defaults::TIER
            && t.spec.default_action == Some(super::TierAction::Pass)
        {
            report.error(
                "spec.defaultAction",
                "the default tier must keep defaultAction Deny",
            );
        }
    }
    // A policy's tier must exist (the default tier always does).
    for p in &store.global_policies {
        if let Some(tier) = p
            .spec
            .tier
            .as_deref()
            .filter(|t| *t != super::defaults::TIER)
        {
            if !store.tiers.iter().any(|t| t.meta.name == tier) {
                reporter(p, errors).error(
                    "spec.tier",
                    format!("tier {tier:?} does not exist (no Tier resource of that name)"),
                );
            }
        }
    }
}

/// The directions a policy governs after API defaulting: explicit `types`,
/// else ingress, plus egress when it has egress rules (1.1).
pub fn effective_types(spec: &GlobalNetworkPolicySpec) -> Vec<PolicyType> {
    if !spec.types.is_empty() {
        return spec.types.clone();
    }
    let mut t = Vec::new();
    if !spec.ingress.is_empty() || spec.egress.is_empty() {
        t.push(PolicyType::Ingress);
    }
    if !spec.egress.is_empty() {
        t.push(PolicyType::Egress);
    }
    t
}

/// Collects errors of one resource; `field` is a path inside the resource.
struct Reporter<'a> {
    origin: &'a Origin,
    source: &'a super::Source,
    errors: &'a mut Vec<Error>,
}

fn reporter<'a, S>(r: &'a Resource<S>, errors: &'a mut Vec<Error>) -> Reporter<'a> {
    Reporter {
        origin: &r.origin,
        source: &r.source,
        errors,
    }
}

impl Reporter<'_> {
    fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(Error {
            origin: Origin {
                file: self.origin.file.clone(),
                line: self.source.line_of(field).unwrap_or(self.origin.line),
            },
            field: field.to_owned(),
            message: message.into(),
        });
    }
}

/// A DNS-1123 label as Calico's validator writes it
/// (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`): no length bound of its own; the
/// whole name is bounded instead.
pub(super) fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain: labels joined by dots.
fn is_subdomain(s: &str) -> bool {
    s.split('.').all(is_label)
}

/// `metadata.name` by kind, as Calico's validator checks it: at most 253
/// characters (a Tier's at most 63); a GlobalNetworkPolicy's a label with
/// an optional `<tier>.` label before it; a NetworkPolicy's likewise, or
/// `knp.default.`/`ossg.default.` and a subdomain; a Tier's a label; every
/// other kind's a subdomain.
fn name(name: &str, kind: &str, report: &mut Reporter<'_>) {
    if has_placeholder(name) {
        // A sample's `<worker-node-name>-worker-private`: for the operator
        // to fill in, as the samples say.
        return;
    }
    let max = if kind == "Tier" { 63 } else { 253 };
    let two_labels = |n: &str| match n.split_once('.') {
        Some((a, b)) => is_label(a) && is_label(b),
        None => is_label(n),
    };
    let (ok, form) = match kind {
        "GlobalNetworkPolicy" => (
            two_labels(name),
            "a DNS label, optionally prefixed by '<tier>.'",
        ),
        "NetworkPolicy" => (
            two_labels(name)
                || ["knp.default.", "ossg.default."]
                    .iter()
                    .any(|p| name.strip_prefix(p).is_some_and(is_subdomain)),
            "a DNS label, optionally prefixed by '<tier>.'",
        ),
        "Tier" => (is_label(name), "a DNS label without dots"),
        _ => (
            is_subdomain(name),
            "lower-case letters, digits, '-' and '.'",
        ),
    };
    if name.len() > max {
        report.error(
            "metadata.name",
            format!(
                "invalid {kind} name: {} characters, at most {max}",
                name.len()
            ),
        );
    } else if !ok {
        report.error(
            "metadata.name",
            format!("invalid {kind} name {name:?}: use {form}"),
        );
    }
}

/// Kubernetes' qualified name (label and annotation keys): an optional
/// DNS-subdomain prefix of at most 253 characters and `/`, then a name of
/// 1-63 characters of `[A-Za-z0-9-_.]` starting and ending alphanumeric.
fn qualified_name(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > 253 || !is_subdomain(p) {
            return Err(format!(
                "invalid key {key:?}: the prefix must be a DNS subdomain of at most 253 characters"
            ));
        }
    }
    if name.is_empty() || name.len() > 63 || !label_value_chars(name) {
        return Err(format!(
            "invalid key {key:?}: the name must be 1-63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`.
fn label_value_chars(s: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && edge(s.chars().next())
        && edge(s.chars().last())
}

/// `metadata.labels` and `metadata.annotations` as Kubernetes (and so
/// Calico) validate them.
fn metadata(meta: &super::Metadata, report: &mut Reporter<'_>) {
    for (k, v) in &meta.labels {
        if let Err(e) = qualified_name(k) {
            report.error("metadata.labels", format!("label {e}"));
        }
        if v.len() > 63 || !(v.is_empty() || label_value_chars(v)) {
            report.error(
                "metadata.labels",
                format!("label {k:?}: invalid value {v:?}: at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"),
            );
        }
    }
    annotations(&meta.annotations, "metadata.annotations", report);
}

/// Annotations of a resource or a rule: keys are qualified names once
/// lowercased (as Calico checks them), at most 256 KiB in all.
fn annotations(
    map: &std::collections::BTreeMap<String, String>,
    field: &str,
    report: &mut Reporter<'_>,
) {
    let mut size = 0;
    for (k, v) in map {
        if let Err(e) = qualified_name(&k.to_lowercase()) {
            report.error(field, format!("annotation {e}"));
        }
        size += k.len() + v.len();
    }
    if size > 256 * 1024 {
        report.error(
            field,
            format!("annotations take {size} bytes, at most 262144"),
        );
    }
}

fn global_policy(p: &Resource<GlobalNetworkPolicySpec>, errors: &mut Vec<Error>) {
    let mut report = reporter(p, errors);
    let s = &p.spec;
    for (field, sel) in [
        ("spec.selector", &s.selector),
        ("spec.namespaceSelector", &s.namespace_selector),
        ("spec.serviceAccountSelector", &s.service_account_selector),
    ] {
        // Calico looks for the text, wherever it is in the expression.
        if let Some(sel) = sel {
            if sel.text().contains("global()") {
                report.error(
                    field,
                    "global() is allowed only in a rule's namespaceSelector",
                );
            }
        }
    }
    performance_hints(&s.performance_hints, &mut report);
    let mut seen = Vec::new();
    for t in &s.types {
        if seen.contains(t) {
            report.error("spec.types", format!("{t:?} is listed twice"));
        }
        seen.push(*t);
    }
    let types = effective_types(s);
    if s.pre_dnat && s.do_not_track {
        report.error("spec.preDNAT", "preDNAT and doNotTrack cannot both be true");
    }
    if s.pre_dnat && (!s.egress.is_empty() || types.contains(&PolicyType::Egress)) {
        report.error(
            "spec.preDNAT",
            "a preDNAT policy may have ingress rules only (no egress rules, no Egress in types)",
        );
    }
    if (s.pre_dnat || s.do_not_track) && !s.apply_on_forward {
        let flag = if s.pre_dnat { "preDNAT" } else { "doNotTrack" };
        report.error(
            "spec.applyOnForward",
            format!("{flag} policies must set applyOnForward: true"),
        );
    }
    rule_lists(&s.ingress, &s.egress, true, &mut report);
}

/// Each rule of a resource's `ingress` and `egress` lists.
fn rule_lists(
    ingress: &[std::sync::Arc<Rule>],
    egress: &[std::sync::Arc<Rule>],
    global: bool,
    report: &mut Reporter<'_>,
) {
    for (list, rules) in [("ingress", ingress), ("egress", egress)] {
        for (index, r) in rules.iter().enumerate() {
            rule(r, RulePath { list, index }, global, report);
        }
    }
}

/// Where a rule is, as an error names it (`spec.ingress[3]`): made into
/// text only for an error (formatting it for each of 10,000 rules was a
/// fifth of validating them).
#[derive(Clone, Copy)]
struct RulePath<'a> {
    list: &'a str,
    index: usize,
}

impl std::fmt::Display for RulePath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "spec.{}[{}]", self.list, self.index)
    }
}

fn rule(r: &Rule, path: RulePath<'_>, global: bool, report: &mut Reporter<'_>) {
    // The list a rule is in is its direction.
    let direction = path.list;
    use std::net::IpAddr;
    if let Some(m) = &r.metadata {
        annotations(
            &m.annotations,
            &format!("{path}.metadata.annotations"),
            report,
        );
    }
    if let Some(v) = r.ip_version {
        if v != 4 && v != 6 {
            report.error(
                &format!("{path}.ipVersion"),
                format!("invalid ipVersion {v}: must be 4 or 6"),
            );
        }
    }
    for (side, e) in [("source", &r.source), ("destination", &r.destination)] {
        let has_ports = !e.ports.is_empty() || !e.not_ports.is_empty();
        let numeric = e
            .ports
            .iter()
            .chain(&e.not_ports)
            .any(|p| matches!(p, super::Port::Range { .. }));
        match r.protocol {
            // Named ports alone need no protocol (Calico v3.32 on): each
            // matches with the protocol its endpoint declares.
            None if numeric => report.error(
                &format!("{path}.{side}.ports"),
                "rules with numeric port or port range must set protocol to TCP, UDP or SCTP",
            ),
            Some(p) if has_ports && !p.supports_ports() => report.error(
                &format!("{path}.protocol"),
                format!("protocol {p} does not support ports; only TCP, UDP and SCTP do"),
            ),
            _ => {}
        }
        for (i, n) in e.not_nets.iter().enumerate() {
            if n.0.prefix() == 0 {
                report.error(
                    &format!("{path}.{side}.notNets[{i}]"),
                    "a negated catch-all CIDR matches nothing; remove the rule instead",
                );
            }
        }
    }
    // One family per rule, agreeing with ipVersion (2.4).
    let nets = [
        &r.source.nets,
        &r.source.not_nets,
        &r.destination.nets,
        &r.destination.not_nets,
    ];
    let v4 = nets
        .iter()
        .any(|l| l.iter().any(|n| matches!(n.0.ip(), IpAddr::V4(_))));
    let v6 = nets
        .iter()
        .any(|l| l.iter().any(|n| matches!(n.0.ip(), IpAddr::V6(_))));
    if v4 && v6 {
        report.error(&path.to_string(), "a rule may not mix IPv4 and IPv6 CIDRs");
    }
    if (r.ip_version == Some(4) && v6) || (r.ip_version == Some(6) && v4) {
        report.error(
            &format!("{path}.ipVersion"),
            "CIDRs of the other IP family than ipVersion",
        );
    }
    for (field, icmp) in [("icmp", &r.icmp), ("notICMP", &r.not_icmp)] {
        let Some(icmp) = icmp else { continue };
        if icmp.code.is_some() && icmp.icmp_type.is_none() {
            report.error(&format!("{path}.{field}.code"), "ICMP code needs a type");
        }
        if icmp.icmp_type == Some(255) {
            report.error(&format!("{path}.{field}.type"), "ICMP type must be 0-254");
        }
    }
    if r.icmp.is_some()
        && !r
            .protocol
            .is_some_and(|p| filter_common::proto::is_icmp(p.0))
    {
        report.error(
            &format!("{path}.icmp"),
            "icmp needs protocol ICMP or ICMPv6",
        );
    }
    match (r.protocol.map(|p| p.0), r.ip_version) {
        (Some(1), Some(6)) => report.error(
            &format!("{path}.protocol"),
            "ICMP with ipVersion 6; use ICMPv6",
        ),
        (Some(58), Some(4)) => report.error(
            &format!("{path}.protocol"),
            "ICMPv6 with ipVersion 4; use ICMP",
        ),
        _ => {}
    }
    if r.http.is_some()
        && (r.action != super::Action::Allow
            || direction != "ingress"
            || r.protocol.is_some_and(|p| p.0 != 6))
    {
        report.error(
            &format!("{path}.http"),
            "http matches are allowed only on Allow rules of ingress, with protocol TCP or unset",
        );
    }
    if let Some(http) = &r.http {
        http_match(http, &format!("{path}.http"), report);
    }
    for (side, e) in [("source", &r.source), ("destination", &r.destination)] {
        if e.selector
            .as_ref()
            .is_some_and(|s| s.text().contains("global("))
        {
            report.error(
                &format!("{path}.{side}.selector"),
                "global() can only be used in an EntityRule namespaceSelector",
            );
        }
        if let Some(ns) = &e.namespace_selector {
            if ns.text().contains("global()") && ns.text().trim() != "global()" {
                report.error(
                    &format!("{path}.{side}.namespaceSelector"),
                    "global() must be the whole namespaceSelector",
                );
            }
        }
        let Some(services) = &e.services else {
            continue;
        };
        let field = format!("{path}.{side}.services");
        if services
            .get("name")
            .and_then(|v| v.as_str())
            .is_none_or(str::is_empty)
        {
            report.error(&field, "must specify a service name");
        }
        let others = e.selector.is_some()
            || e.not_selector.is_some()
            || e.namespace_selector.is_some()
            || !e.nets.is_empty()
            || !e.not_nets.is_empty()
            || e.service_accounts.is_some();
        if others {
            report.error(&field, "services cannot be combined with selector, notSelector, namespaceSelector, nets, notNets or serviceAccounts");
        }
        match (side, direction) {
            ("destination", "ingress") => report.error(
                &field,
                "destination services are allowed only in egress rules",
            ),
            ("source", "egress") => {
                report.error(&field, "source services are allowed only in ingress rules")
            }
            _ => {}
        }
        if side == "destination" && (!e.ports.is_empty() || !e.not_ports.is_empty()) {
            report.error(
                &field,
                "ports may be set with services only for source services on ingress",
            );
        }
        if global
            && services
                .get("namespace")
                .and_then(|v| v.as_str())
                .is_none_or(str::is_empty)
        {
            report.error(&field, "a GlobalNetworkPolicy must give services.namespace");
        }
    }
}

/// `spec.performanceHints`: each `AssumeNeededOnEveryNode`, none twice.
fn performance_hints(hints: &[String], report: &mut Reporter<'_>) {
    for (i, h) in hints.iter().enumerate() {
        if h != "AssumeNeededOnEveryNode" {
            report.error(
                &format!("spec.performanceHints[{i}]"),
                format!("invalid performance hint {h:?}: AssumeNeededOnEveryNode"),
            );
        } else if hints[..i].contains(h) {
            report.error(
                &format!("spec.performanceHints[{i}]"),
                format!("{h} is listed twice"),
            );
        }
    }
}

/// An `http` match (ignored by this dataplane, validated as Calico does):
/// at most 20 methods, none twice; at most 20 paths, each with exactly one
/// of `exact` and `prefix`, starting with `/` and free of `?`, `#` and
/// blanks (RFC 3986).
fn http_match(http: &serde_json::Value, field: &str, report: &mut Reporter<'_>) {
    let list = |key: &str| -> Vec<serde_json::Value> {
        http.get(key)
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default()
    };
    let methods = list("methods");
    let names: Vec<&str> = methods.iter().filter_map(|m| m.as_str()).collect();
    if names.len() != methods.len() {
        report.error(&format!("{field}.methods"), "methods are strings");
    }
    let mut seen = std::collections::BTreeSet::new();
    if names.iter().any(|m| !seen.insert(*m)) || methods.len() > 20 {
        report.error(
            &format!("{field}.methods"),
            "invalid methods: at most 20, none twice",
        );
    }
    let paths = list("paths");
    if paths.len() > 20 {
        report.error(&format!("{field}.paths"), "at most 20 paths");
    }
    for (i, p) in paths.iter().enumerate() {
        let at = format!("{field}.paths[{i}]");
        let get = |k: &str| p.get(k).and_then(|v| v.as_str()).filter(|v| !v.is_empty());
        let v = match (get("exact"), get("prefix")) {
            (Some(_), Some(_)) => {
                report.error(&at, "invalid path match: both exact and prefix are set");
                continue;
            }
            (None, None) => {
                report.error(&at, "invalid path match: set exact or prefix");
                continue;
            }
            (Some(v), None) | (None, Some(v)) => v,
        };
        if !v.starts_with('/') || v.contains(['?', ' ', '#']) {
            report.error(
                &at,
                format!(
                    "invalid path {v:?}: must start with '/' and not contain '?', '#' or blanks"
                ),
            );
        }
    }
}

fn host_endpoint(h: &Resource<HostEndpointSpec>, errors: &mut Vec<Error>) {
    let mut report = reporter(h, errors);
    let s = &h.spec;
    if s.node.is_empty() {
        report.error("spec.node", "a HostEndpoint needs spec.node");
    }
    let iface_ok = s.interface_name == "*"
        || (1..=15).contains(&s.interface_name.len())
            && s.interface_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if s.interface_name.is_empty() {
        if s.expected_ips.is_empty() {
            report.error(
                "spec.interfaceName",
                "a HostEndpoint needs interfaceName or expectedIPs",
            );
        }
    } else if !iface_ok {
        report.error(
            "spec.interfaceName",
            format!(
                "invalid interface name {:?}: '*' or 1-15 of [a-zA-Z0-9_.-]",
                s.interface_name
            ),
        );
    }
    for (i, ip) in s.expected_ips.iter().enumerate() {
        if ip.parse::<std::net::IpAddr>().is_err() && !looks_like_template(ip) {
            report.error(
                &format!("spec.expectedIPs[{i}]"),
                format!("invalid IP address {ip:?}"),
            );
        }
    }
    for (i, p) in s.ports.iter().enumerate() {
        if let Err(e) = super::validate_port_name(&p.name) {
            report.error(&format!("spec.ports[{i}].name"), e);
        }
        if !p.protocol.supports_ports() {
            report.error(
                &format!("spec.ports[{i}].protocol"),
                "named ports must be TCP, UDP or SCTP",
            );
        }
        if p.port == 0 {
            report.error(&format!("spec.ports[{i}].port"), "ports are 1-65535");
        }
    }
}

/// Sample files ship placeholders such as `<worker-node-private-ip>` for the
/// operator to fill in; they are not addresses, but not malformed either.
fn looks_like_template(s: &str) -> bool {
    s.starts_with('<') && s.ends_with('>')
}

/// Whether `s` holds a `<placeholder>` somewhere (sample resource names).
fn has_placeholder(s: &str) -> bool {
    s.find('<')
        .is_some_and(|open| s[open..].find('>').is_some_and(|close| close > 1))
}

#[cfg(test)]
mod tests {
    //! One test per rule of docs/semantics.md 2.7 (and the grammar
    //! checks made while parsing), each asserting the field named.

    use std::path::Path;

    use crate::model::Store;

    /// Errors of a document, as `field: message` lines.
    fn errors(yaml: &str) -> Vec<String> {
        let mut store = Store::default();
        let mut errors = Vec::new();
        store.add_text(Path::new("v.yaml"), yaml, &mut errors);
        if errors.is_empty() {
            super::store(&store, &mut errors);
        }
        errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect()
    }

    fn gnp(spec: &str) -> String {
        format!("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: p\nspec:\n{spec}")
    }

    fn rule(r: &str) -> String {
        gnp(&format!("  ingress:\n  - {r}\n"))
    }

    #[track_caller]
    fn rejects(yaml: &str, field: &str, message: &str) {
        let e = errors(yaml);
        assert!(
            e.iter()
                .any(|l| l.starts_with(field) && l.contains(message)),
            "want {field}: ..{message}.. in {e:?}\n{yaml}"
        );
    }

    #[track_caller]
    fn accepts(yaml: &str) {
        let e = errors(yaml);
        assert!(e.is_empty(), "{e:?}\n{yaml}");
    }

    fn with_meta(kind: &str, meta: &str, spec: &str) -> String {
        format!("apiVersion: projectcalico.org/v3\nkind: {kind}\nmetadata:\n{meta}spec:\n{spec}")
    }

    #[test]
    fn names_follow_calicos_regexes_and_lengths() {
        // A 253-character name and a 64-character label after a tier are
        // fine (Calico bounds the whole name, not its labels).
        let long = "a".repeat(253);
        accepts(&with_meta(
            "GlobalNetworkPolicy",
            &format!("  name: {long}\n"),
            "  selector: all()\n",
        ));
        let tiered = format!("t.{}", "b".repeat(64));
        accepts(&format!(
            "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: t}}\nspec: {{order: 10}}\n---\n{}",
            with_meta("GlobalNetworkPolicy", &format!("  name: {tiered}\n"), "  tier: t\n  selector: all()\n")
        ));
        rejects(
            &with_meta(
                "GlobalNetworkPolicy",
                &format!("  name: {}\n", "a".repeat(254)),
                "  selector: all()\n",
            ),
            "metadata.name",
            "at most 253",
        );
        rejects(
            &with_meta(
                "HostEndpoint",
                "  name: Worker_1\n",
                "  node: n\n  interfaceName: eth0\n",
            ),
            "metadata.name",
            "invalid HostEndpoint name",
        );
        accepts(&with_meta(
            "HostEndpoint",
            "  name: worker-1.public\n",
            "  node: n\n  interfaceName: eth0\n",
        ));
        rejects(
            &with_meta(
                "Tier",
                &format!("  name: {}\n", "t".repeat(64)),
                "  order: 5\n",
            ),
            "metadata.name",
            "at most 63",
        );
        rejects(
            &with_meta(
                "GlobalNetworkSet",
                "  name: a..b\n",
                "  nets: [10.0.0.0/8]\n",
            ),
            "metadata.name",
            "invalid GlobalNetworkSet name",
        );
    }

    #[test]
    fn label_and_annotation_keys_and_values_are_kubernetes_ones() {
        let hep = |labels: &str| {
            with_meta(
                "HostEndpoint",
                &format!("  name: h\n{labels}"),
                "  node: n\n  interfaceName: eth0\n",
            )
        };
        accepts(&hep(
            "  labels: {ibm.role: worker_public, projectcalico.org/name: x, a: ''}\n",
        ));
        rejects(
            &hep("  labels: {'-bad': x}\n"),
            "metadata.labels",
            "invalid key",
        );
        rejects(
            &hep("  labels: {'Bad.Prefix/x': y}\n"),
            "metadata.labels",
            "prefix",
        );
        rejects(
            &hep(&format!("  labels: {{k: {}}}\n", "v".repeat(64))),
            "metadata.labels",
            "invalid value",
        );
        rejects(
            &hep("  labels: {k: 'a b'}\n"),
            "metadata.labels",
            "invalid value",
        );
        rejects(
            &hep("  annotations: {'no spaces': x}\n"),
            "metadata.annotations",
            "invalid key",
        );
        // Calico lowercases annotation keys before checking them.
        accepts(&hep("  annotations: {'Example.COM/Owner': x}\n"));
        // A rule's annotations are checked as a resource's.
        accepts(&gnp(
            "  ingress:\n  - action: Allow\n    metadata:\n      annotations: {team: net}\n",
        ));
        rejects(
            &gnp("  ingress:\n  - action: Allow\n    metadata:\n      annotations: {'a b': x}\n"),
            "spec.ingress[0].metadata.annotations",
            "invalid key",
        );
    }

    #[test]
    fn reserved_tiers_keep_their_order_and_action() {
        let tier = |name: &str, spec: &str| with_meta("Tier", &format!("  name: {name}\n"), spec);
        accepts(&tier(
            "default",
            "  order: 1000000\n  defaultAction: Deny\n",
        ));
        rejects(&tier("default", "  order: 5\n"), "spec.order", "1000000");
        rejects(
            &tier("kube-admin", "  order: 1000\n  defaultAction: Deny\n"),
            "spec.defaultAction",
            "Pass",
        );
        rejects(
            &tier("kube-baseline", "  order: 5\n  defaultAction: Pass\n"),
            "spec.order",
            "10000000",
        );
    }

    #[test]
    fn network_set_nets_must_parse() {
        accepts(&with_meta(
            "GlobalNetworkSet",
            "  name: s\n",
            "  nets: [10.0.0.1/8, 192.0.2.1, '2001:db8::/32']\n",
        ));
        rejects(
            &with_meta(
                "GlobalNetworkSet",
                "  name: s\n",
                "  nets: [10.0.0.0/8, not-a-cidr]\n",
            ),
            "spec.nets[1]",
            "invalid CIDR",
        );
        rejects(
            &with_meta(
                "NetworkSet",
                "  name: s\n  namespace: n\n",
                "  nets: [10.0.0.0/33]\n",
            ),
            "spec.nets[0]",
            "invalid CIDR",
        );
    }

    #[test]
    fn felix_failsafe_entries_name_tcp_udp_or_sctp() {
        let felix = |list: &str| {
            with_meta(
                "FelixConfiguration",
                "  name: default\n",
                &format!("  failsafeInboundHostPorts: {list}\n"),
            )
        };
        accepts(&felix("[{protocol: TCP, port: 22}, {protocol: SCTP, port: 9}, {protocol: UDP, port: 68, net: 10.0.0.0/8}]"));
        rejects(
            &felix("[{protocol: tcp, port: 22}]"),
            "spec.failsafeInboundHostPorts[0].protocol",
            "TCP, UDP or SCTP",
        );
        rejects(
            &felix("[{protocol: ICMP, port: 22}]"),
            "spec.failsafeInboundHostPorts[0].protocol",
            "invalid protocol",
        );
        rejects(
            &felix("[{protocol: TCP, port: 22, net: 10.0.0.0/33}]"),
            "spec.failsafeInboundHostPorts[0].net",
            "invalid CIDR",
        );
    }

    #[test]
    fn performance_hints_and_log_prefixes_are_calicos() {
        accepts(&gnp("  performanceHints: [AssumeNeededOnEveryNode]\n"));
        rejects(
            &gnp("  performanceHints: [Fast]\n"),
            "spec.performanceHints[0]",
            "invalid performance hint",
        );
        rejects(
            &gnp("  performanceHints: [AssumeNeededOnEveryNode, AssumeNeededOnEveryNode]\n"),
            "spec.performanceHints[1]",
            "listed twice",
        );
        let felix = |p: &str| {
            with_meta(
                "FelixConfiguration",
                "  name: default\n",
                &format!("  logPrefix: '{p}'\n"),
            )
        };
        accepts(&felix("calico-packet %t/%n: x_y"));
        rejects(&felix("bad;prefix"), "spec.logPrefix", "invalid logPrefix");
    }

    #[test]
    fn named_ports_alone_need_no_protocol() {
        accepts(&rule(
            "action: Allow\n    destination: {ports: [http, https]}",
        ));
        rejects(
            &rule("action: Allow\n    destination: {ports: [http, 80]}"),
            "spec.ingress[0].destination.ports",
            "numeric port",
        );
    }

    #[test]
    fn entity_rules_refuse_global_in_selector_and_nameless_services() {
        rejects(
            &rule("action: Allow\n    source: {selector: global()}"),
            "spec.ingress[0].source.selector",
            "global() can only be used",
        );
        rejects(
            &rule("action: Allow\n    source: {services: {namespace: n}}"),
            "spec.ingress[0].source.services",
            "must specify a service name",
        );
    }

    #[test]
    fn http_matches_are_validated_as_calico_does() {
        accepts(&rule(
            "action: Allow\n    http: {methods: [GET, PUT], paths: [{exact: /a}, {prefix: /b}]}",
        ));
        rejects(
            &rule("action: Allow\n    http: {methods: [GET, GET]}"),
            "spec.ingress[0].http.methods",
            "none twice",
        );
        rejects(
            &rule("action: Allow\n    http: {paths: [{exact: /a, prefix: /b}]}"),
            "spec.ingress[0].http.paths[0]",
            "both exact and prefix",
        );
        rejects(
            &rule("action: Allow\n    http: {paths: [{exact: 'no-slash'}]}"),
            "spec.ingress[0].http.paths[0]",
            "must start with '/'",
        );
        rejects(
            &rule("action: Allow\n    http: {paths: [{prefix: '/a?b'}]}"),
            "spec.ingress[0].http.paths[0]",
            "must start with '/'",
        );
        rejects(
            &rule("action: Allow\n    http: {paths: [{}]}"),
            "spec.ingress[0].http.paths[0]",
            "set exact or prefix",
        );
    }

    #[test]
    fn pre_dnat_and_do_not_track_are_exclusive() {
        rejects(
            &gnp("  preDNAT: true\n  doNotTrack: true\n  applyOnForward: true\n"),
            "spec.preDNAT",
            "cannot both",
        );
    }

    #[test]
    fn pre_dnat_has_no_egress() {
        rejects(
            &gnp("  preDNAT: true\n  applyOnForward: true\n  egress:\n  - action: Allow\n"),
            "spec.preDNAT",
            "ingress rules only",
        );
        rejects(
            &gnp("  preDNAT: true\n  applyOnForward: true\n  types: [Egress]\n"),
            "spec.preDNAT",
            "ingress rules only",
        );
    }

    #[test]
    fn pre_dnat_and_do_not_track_need_apply_on_forward() {
        rejects(
            &gnp("  preDNAT: true\n"),
            "spec.applyOnForward",
            "preDNAT policies must set",
        );
        rejects(
            &gnp("  doNotTrack: true\n"),
            "spec.applyOnForward",
            "doNotTrack policies must set",
        );
        accepts(&gnp("  doNotTrack: true\n  applyOnForward: true\n"));
    }

    #[test]
    fn global_is_only_for_rule_namespace_selectors() {
        rejects(&gnp("  selector: global()\n"), "spec.selector", "global()");
        rejects(
            &gnp("  namespaceSelector: global()\n"),
            "spec.namespaceSelector",
            "global()",
        );
        accepts(&rule(
            "action: Allow\n    source: {namespaceSelector: global(), selector: \"a == 'b'\"}",
        ));
        rejects(
            &rule("action: Allow\n    source: {namespaceSelector: \"global() && a == 'b'\"}"),
            "spec.ingress[0].source.namespaceSelector",
            "whole",
        );
    }

    #[test]
    fn types_are_unique_ingress_or_egress() {
        rejects(
            &gnp("  types: [Ingress, Ingress]\n"),
            "spec.types",
            "listed twice",
        );
        rejects(
            &gnp("  types: [ingress]\n"),
            "spec.types[0]",
            "unknown variant",
        );
    }

    #[test]
    fn types_default_from_the_rules() {
        use super::effective_types;
        use crate::model::PolicyType::*;
        let spec = |y: &str| -> crate::model::GlobalNetworkPolicySpec {
            serde_saphyr::from_str(y).expect("spec")
        };
        assert_eq!(effective_types(&spec("{}")), vec![Ingress]);
        assert_eq!(
            effective_types(&spec("egress: [{action: Allow}]")),
            vec![Egress]
        );
        assert_eq!(
            effective_types(&spec(
                "ingress: [{action: Allow}]\negress: [{action: Allow}]"
            )),
            vec![Ingress, Egress]
        );
        assert_eq!(effective_types(&spec("types: [Egress]")), vec![Egress]);
    }

    #[test]
    fn ports_only_with_tcp_udp_sctp_and_numeric_ports_need_a_protocol() {
        rejects(
            &rule("action: Allow\n    protocol: ICMP\n    destination: {ports: [80]}"),
            "spec.ingress[0].protocol",
            "does not support ports",
        );
        rejects(
            &rule("action: Allow\n    protocol: UDPLite\n    destination: {ports: [80]}"),
            "spec.ingress[0].protocol",
            "does not support ports",
        );
        rejects(
            &rule("action: Allow\n    destination: {ports: [80]}"),
            "spec.ingress[0].destination.ports",
            "must set protocol",
        );
        rejects(
            &rule("action: Allow\n    source: {notPorts: [80]}"),
            "spec.ingress[0].source.ports",
            "must set protocol",
        );
        accepts(&rule(
            "action: Allow\n    protocol: SCTP\n    destination: {ports: [80]}",
        ));
    }

    #[test]
    fn protocol_names_are_case_sensitive_and_numbers_1_to_255() {
        rejects(
            &rule("action: Allow\n    protocol: tcp"),
            "spec.ingress[0].protocol",
            "case-sensitive",
        );
        rejects(
            &rule("action: Allow\n    protocol: 0"),
            "spec.ingress[0].protocol",
            "1-255",
        );
        rejects(
            &rule("action: Allow\n    protocol: 256"),
            "spec.ingress[0].protocol",
            "1-255",
        );
        accepts(&rule("action: Allow\n    protocol: \"6\""));
        accepts(&rule("action: Allow\n    protocol: 47"));
    }

    #[test]
    fn icmp_fields_need_icmp_and_a_type_for_a_code() {
        rejects(
            &rule("action: Allow\n    protocol: TCP\n    icmp: {type: 8}"),
            "spec.ingress[0].icmp",
            "needs protocol ICMP",
        );
        rejects(
            &rule("action: Allow\n    protocol: ICMP\n    icmp: {code: 0}"),
            "spec.ingress[0].icmp.code",
            "needs a type",
        );
        rejects(
            &rule("action: Allow\n    protocol: ICMP\n    icmp: {type: 255}"),
            "spec.ingress[0].icmp.type",
            "0-254",
        );
        rejects(
            &rule("action: Allow\n    protocol: ICMP\n    icmp: {type: 3, code: 256}"),
            "spec.ingress[0].icmp.code",
            "",
        );
        rejects(
            &rule("action: Allow\n    protocol: ICMP\n    ipVersion: 6"),
            "spec.ingress[0].protocol",
            "use ICMPv6",
        );
        rejects(
            &rule("action: Allow\n    protocol: ICMPv6\n    ipVersion: 4"),
            "spec.ingress[0].protocol",
            "use ICMP",
        );
    }

    #[test]
    fn one_family_per_rule_agreeing_with_ip_version_and_strict_cidrs() {
        rejects(&rule("action: Allow\n    source: {nets: [10.0.0.0/8]}\n    destination: {nets: [\"fd00::/8\"]}"), "spec.ingress[0]", "mix IPv4 and IPv6");
        rejects(
            &rule("action: Allow\n    ipVersion: 6\n    source: {nets: [10.0.0.0/8]}"),
            "spec.ingress[0].ipVersion",
            "other IP family",
        );
        rejects(
            &rule("action: Allow\n    source: {nets: [10.0.0.1/8]}"),
            "spec.ingress[0].source.nets[0]",
            "host bits",
        );
        rejects(
            &rule("action: Allow\n    source: {notNets: [0.0.0.0/0]}"),
            "spec.ingress[0].source.notNets[0]",
            "catch-all",
        );
        accepts(&rule("action: Allow\n    source: {nets: [10.0.0.1]}"));
    }

    #[test]
    fn selectors_must_parse() {
        rejects(
            &gnp("  selector: \"a = 'b'\"\n"),
            "spec.selector",
            "position",
        );
        rejects(
            &rule("action: Allow\n    source: {selector: \"has(a\"}"),
            "spec.ingress[0].source.selector",
            "position",
        );
    }

    #[test]
    fn actions_and_ip_versions_are_enumerated() {
        rejects(
            &rule("action: allow"),
            "spec.ingress[0].action",
            "unknown variant",
        );
        rejects(
            &gnp("  ingress:\n  - protocol: TCP\n"),
            "spec.ingress[0]",
            "missing field `action`",
        );
        rejects(
            &rule("action: Allow\n    ipVersion: 5"),
            "spec.ingress[0].ipVersion",
            "4 or 6",
        );
    }

    #[test]
    fn http_only_on_allow_ingress_tcp() {
        rejects(
            &rule("action: Deny\n    http: {methods: [GET]}"),
            "spec.ingress[0].http",
            "only on Allow",
        );
        rejects(
            &rule("action: Allow\n    protocol: UDP\n    http: {methods: [GET]}"),
            "spec.ingress[0].http",
            "TCP",
        );
        rejects(
            &gnp("  egress:\n  - action: Allow\n    http: {methods: [GET]}\n"),
            "spec.egress[0].http",
            "ingress",
        );
        accepts(&rule("action: Allow\n    http: {methods: [GET]}"));
    }

    #[test]
    fn services_are_exclusive_and_directional() {
        rejects(&rule("action: Allow\n    source: {services: {name: s, namespace: n}, nets: [10.0.0.0/8]}"), "spec.ingress[0].source.services", "cannot be combined");
        rejects(
            &rule("action: Allow\n    destination: {services: {name: s, namespace: n}}"),
            "spec.ingress[0].destination.services",
            "only in egress",
        );
        rejects(
            &gnp("  egress:\n  - action: Allow\n    source: {services: {name: s, namespace: n}}\n"),
            "spec.egress[0].source.services",
            "only in ingress",
        );
        rejects(
            &rule("action: Allow\n    source: {services: {name: s}}"),
            "spec.ingress[0].source.services",
            "services.namespace",
        );
        accepts(&rule(
            "action: Allow\n    source: {services: {name: s, namespace: n}}",
        ));
    }

    #[test]
    fn policy_names_are_dns_labels_with_an_optional_tier() {
        let named = |n: &str| {
            format!("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: {n}\nspec: {{}}\n")
        };
        rejects(
            &named("Allow-All"),
            "metadata.name",
            "invalid GlobalNetworkPolicy name",
        );
        rejects(&named("allow_all"), "metadata.name", "invalid");
        rejects(&named(&"a".repeat(254)), "metadata.name", "invalid");
        accepts(&named("security.allow-all"));
    }

    #[test]
    fn unknown_fields_are_errors() {
        rejects(&gnp("  ingres: []\n"), "spec", "unknown field `ingres`");
        rejects(
            &rule("action: Allow\n    destination: {port: [80]}"),
            "spec.ingress[0].destination",
            "unknown field `port`",
        );
    }

    #[test]
    fn port_values_and_ranges() {
        rejects(
            &rule("action: Allow\n    protocol: TCP\n    destination: {ports: [0]}"),
            "spec.ingress[0].destination.ports[0]",
            "1-65535",
        );
        rejects(
            &rule("action: Allow\n    protocol: TCP\n    destination: {ports: [\"9000:8000\"]}"),
            "spec.ingress[0].destination.ports[0]",
            "above the last",
        );
        rejects(
            &rule("action: Allow\n    protocol: TCP\n    destination: {ports: [70000]}"),
            "spec.ingress[0].destination.ports[0]",
            "1-65535",
        );
        rejects(
            &rule("action: Allow\n    protocol: TCP\n    destination: {ports: [\"80-90\"]}"),
            "spec.ingress[0].destination.ports[0]",
            "port name",
        );
        accepts(&rule("action: Allow\n    protocol: TCP\n    destination: {ports: [\"http-alt\", 30000:32767]}"));
    }

    #[test]
    fn host_endpoints_need_a_node_and_an_interface_or_addresses() {
        let hep = |spec: &str| {
            format!("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata:\n  name: h\nspec:\n{spec}")
        };
        rejects(
            &hep("  interfaceName: eth0\n"),
            "spec.node",
            "needs spec.node",
        );
        rejects(
            &hep("  node: n\n"),
            "spec.interfaceName",
            "interfaceName or expectedIPs",
        );
        rejects(
            &hep("  node: n\n  interfaceName: this-name-is-too-long\n"),
            "spec.interfaceName",
            "1-15",
        );
        rejects(
            &hep("  node: n\n  expectedIPs: [10.0.0.0/8]\n"),
            "spec.expectedIPs[0]",
            "invalid IP address",
        );
        rejects(&hep("  node: n\n  interfaceName: eth0\n  ports: [{name: HTTP, protocol: TCP, port: 80}]\n"), "spec.ports[0].name", "port name");
        rejects(&hep("  node: n\n  interfaceName: eth0\n  ports: [{name: dns, protocol: ICMP, port: 53}]\n"), "spec.ports[0].protocol", "TCP, UDP or SCTP");
        accepts(&hep("  node: n\n  interfaceName: \"*\"\n  ports: [{name: dns, protocol: UDP, port: 53}, {name: dns, protocol: TCP, port: 53}]\n"));
    }

    #[test]
    fn tiers_must_exist_and_the_default_tier_keeps_deny() {
        rejects(&gnp("  tier: security\n"), "spec.tier", "does not exist");
        let tier = "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata:\n  name: default\nspec:\n  defaultAction: Pass\n";
        rejects(tier, "spec.defaultAction", "must keep");
    }

    #[test]
    fn network_sets_may_not_claim_a_namespace() {
        rejects(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata:\n  name: s\n  labels: {projectcalico.org/namespace: x}\nspec:\n  nets: [10.0.0.1/8]\n",
            "metadata.labels",
            "may not carry",
        );
        rejects(
            "apiVersion: projectcalico.org/v3\nkind: NetworkSet\nmetadata:\n  name: s\n  namespace: n\n  labels: {projectcalico.org/namespace: x}\nspec:\n  nets: [10.0.0.0/8]\n",
            "metadata.labels",
            "a NetworkSet may not carry",
        );
    }
}
