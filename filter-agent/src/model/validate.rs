//! Checks that span fields (calico-semantics.md 2.7), run after parsing.
//!
//! Single-value grammar (CIDRs, ports, protocols, actions, unknown fields) is
//! checked while deserializing, in `types`. Here: what needs several fields
//! at once, and `types` defaulting, which the Calico API layer applies before
//! storing a policy (1.1).

use super::{
    locate, Error, GlobalNetworkPolicySpec, HostEndpointSpec, Origin, PolicyType, Resource, Rule,
    Store,
};
use crate::selector::Selector;

/// Validates every resource of `store`, appending errors.
pub fn store(store: &Store, errors: &mut Vec<Error>) {
    for p in &store.global_policies {
        global_policy(p, errors);
    }
    for p in &store.network_policies {
        let mut report = reporter(p, errors);
        name(&p.meta.name, "NetworkPolicy", &mut report);
        if let Some(s) = &p.spec.selector {
            selector(s, "spec.selector", &mut report);
        }
        for (dir, rules) in [("ingress", &p.spec.ingress), ("egress", &p.spec.egress)] {
            for (i, r) in rules.iter().enumerate() {
                rule(r, &format!("spec.{dir}[{i}]"), dir, &mut report);
            }
        }
    }
    for h in &store.host_endpoints {
        host_endpoint(h, errors);
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
    /// Line where the resource's document starts, and its path in it.
    doc: &'a (usize, String),
    text: Option<String>,
    errors: &'a mut Vec<Error>,
}

fn reporter<'a, S>(r: &'a Resource<S>, errors: &'a mut Vec<Error>) -> Reporter<'a> {
    Reporter {
        origin: &r.origin,
        doc: &r.doc,
        text: None,
        errors,
    }
}

impl Reporter<'_> {
    fn error(&mut self, field: &str, message: impl Into<String>) {
        // Read the document again only when there is an error to place.
        if self.text.is_none() {
            self.text = Some(document_text(&self.origin.file, self.doc.0).unwrap_or_default());
        }
        let text = self.text.as_deref().unwrap_or_default();
        let line = self.doc.0 + locate::line_of(text, &super::join_path(&self.doc.1, field)) - 1;
        self.errors.push(Error {
            origin: Origin {
                file: self.origin.file.clone(),
                line,
            },
            field: field.to_owned(),
            message: message.into(),
        });
    }
}

/// The text of the document of `file` that starts at `line`.
fn document_text(file: &std::path::Path, line: usize) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    super::split_documents(&text)
        .into_iter()
        .find(|(l, _)| *l == line)
        .map(|(_, d)| d.to_owned())
}

fn name(name: &str, kind: &str, report: &mut Reporter<'_>) {
    // A DNS label, optionally with one `tier.` prefix (1.1).
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    let ok = match name.split_once('.') {
        Some((tier, rest)) => label(tier) && label(rest),
        None => label(name),
    };
    if name.len() > 253 || !ok {
        report.error(
            "metadata.name",
            format!(
                "invalid {kind} name {name:?}: use lower-case letters, digits and '-' \
                 (optionally prefixed by '<tier>.')"
            ),
        );
    }
}

fn selector(expr: &str, field: &str, report: &mut Reporter<'_>) {
    if let Err(e) = Selector::parse(expr) {
        report.error(field, format!("invalid selector {expr:?}: {e}"));
    }
}

fn global_policy(p: &Resource<GlobalNetworkPolicySpec>, errors: &mut Vec<Error>) {
    let mut report = reporter(p, errors);
    let s = &p.spec;
    name(&p.meta.name, "GlobalNetworkPolicy", &mut report);
    if let Some(sel) = &s.selector {
        selector(sel, "spec.selector", &mut report);
        if sel.contains("global()") {
            report.error(
                "spec.selector",
                "global() is allowed only in a rule's namespaceSelector",
            );
        }
    }
    if let Some(sel) = &s.namespace_selector {
        selector(sel, "spec.namespaceSelector", &mut report);
    }
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
    for (dir, rules) in [("ingress", &s.ingress), ("egress", &s.egress)] {
        for (i, r) in rules.iter().enumerate() {
            rule(r, &format!("spec.{dir}[{i}]"), dir, &mut report);
        }
    }
}

fn rule(r: &Rule, path: &str, direction: &str, report: &mut Reporter<'_>) {
    use std::net::IpAddr;
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
            None if numeric => report.error(
                &format!("{path}.{side}.ports"),
                "rules that specify ports must set protocol to TCP, UDP or SCTP",
            ),
            None if has_ports => report.error(
                &format!("{path}.{side}.ports"),
                "rules that specify named ports must set protocol (accepted without it only from Calico v3.32)",
            ),
            Some(p) if has_ports && !p.supports_ports() => report.error(
                &format!("{path}.protocol"),
                format!("protocol {p} does not support ports; only TCP, UDP and SCTP do"),
            ),
            _ => {}
        }
        for (field, sel) in [
            ("selector", &e.selector),
            ("notSelector", &e.not_selector),
            ("namespaceSelector", &e.namespace_selector),
        ] {
            if let Some(sel) = sel {
                selector(sel, &format!("{path}.{side}.{field}"), report);
            }
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
        report.error(path, "a rule may not mix IPv4 and IPv6 CIDRs");
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
    if r.icmp.is_some() && !matches!(r.protocol.map(|p| p.0), Some(1 | 58)) {
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
    if r.http.is_some() && (r.action != super::Action::Allow || direction != "ingress") {
        report.error(
            &format!("{path}.http"),
            "http matches are allowed only on Allow rules of ingress",
        );
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
