//! The pipeline of docs/semantics.md 3.9 on hand-made cases.

use std::path::Path;

use super::*;

fn store(text: &str) -> Store {
    let mut s = Store::default();
    let mut errors = Vec::new();
    s.add_text(Path::new("t.yaml"), text, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    s
}

const HEP: &str = "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: w, labels: {role: pub}}\nspec: {node: n1, interfaceName: eth1}\n";

fn tcp(src: &str, dst: &str, dport: u16) -> Packet {
    Packet::tcp(src.parse().unwrap(), dst.parse().unwrap(), dport)
}

fn explain(text: &str, dir: Direction, p: Packet) -> Explanation {
    let s = store(text);
    let r = Reference::new(&s);
    r.explain(
        &s.host_endpoints[0],
        dir,
        &p,
        &Failsafe::from_store(&s, "n1"),
    )
}

#[test]
fn bare_endpoint_denies_except_failsafe() {
    let e = explain(HEP, Direction::Ingress, tcp("192.0.2.9", "192.0.2.1", 8080));
    assert_eq!(e.verdict, Verdict::Deny);
    assert_eq!(e.stages[2].by, Some(Who::NoProfileAllowed));
    let e = explain(HEP, Direction::Ingress, tcp("192.0.2.9", "192.0.2.1", 22));
    assert_eq!(e.verdict, Verdict::Allow);
    assert_eq!(e.stages[2].by, Some(Who::Failsafe));
}

#[test]
fn established_flows_pass_normal_and_pre_dnat_but_not_untracked_deny() {
    let deny_untracked = format!(
        "{HEP}---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: u}}\nspec:\n  doNotTrack: true\n  applyOnForward: true\n  ingress:\n  - action: Deny\n    protocol: TCP\n    destination: {{ports: [8080]}}\n"
    );
    let mut p = tcp("192.0.2.9", "192.0.2.1", 8080);
    p.established = true;
    assert_eq!(
        explain(&deny_untracked, Direction::Ingress, p).verdict,
        Verdict::Deny
    );
    assert_eq!(explain(HEP, Direction::Ingress, p).verdict, Verdict::Allow);
}

#[test]
fn pre_dnat_allow_skips_normal_policy_and_sees_the_original_destination() {
    let text = format!(
        "{HEP}---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: allow-np}}\nspec:\n  preDNAT: true\n  applyOnForward: true\n  ingress:\n  - action: Allow\n    protocol: TCP\n    destination: {{ports: [31000]}}\n"
    );
    let mut p = tcp("192.0.2.9", "192.0.2.1", 31000);
    p.dnat_to = Some("10.0.0.5:8080".parse().unwrap());
    let e = explain(&text, Direction::Ingress, p);
    assert_eq!(e.verdict, Verdict::Allow);
    assert_eq!(e.stages[1].verdict, Verdict::Allow);
    assert_eq!(e.stages[2].verdict, Verdict::NotEvaluated);
}

#[test]
fn policy_with_no_matching_rule_denies_before_an_allow_all_profile() {
    let text = format!(
        "{}---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: only-80}}\nspec:\n  ingress:\n  - action: Allow\n    protocol: TCP\n    destination: {{ports: [80]}}\n",
        HEP.replace("interfaceName: eth1}", "interfaceName: eth1, profiles: [projectcalico-default-allow]}")
    );
    let e = explain(
        &text,
        Direction::Ingress,
        tcp("192.0.2.9", "192.0.2.1", 8080),
    );
    assert_eq!(e.verdict, Verdict::Deny);
    assert_eq!(
        e.stages[2].by,
        Some(Who::TierEnd {
            tier: "default".into()
        })
    );
    let e = explain(&text, Direction::Ingress, tcp("192.0.2.9", "192.0.2.1", 80));
    assert_eq!(e.verdict, Verdict::Allow);
}

#[test]
fn forwarded_traffic_is_allowed_unless_an_apply_on_forward_policy_applies() {
    let mut p = tcp("192.0.2.9", "10.0.0.5", 8080);
    p.forwarded = true;
    assert_eq!(explain(HEP, Direction::Ingress, p).verdict, Verdict::Allow);
    let text = format!(
        "{HEP}---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: fwd}}\nspec:\n  applyOnForward: true\n  ingress:\n  - action: Allow\n    protocol: UDP\n"
    );
    assert_eq!(
        explain(&text, Direction::Ingress, p).verdict,
        Verdict::Deny,
        "tier end drop"
    );
}

#[test]
fn untracked_allow_skips_everything_and_log_does_not_terminate() {
    let text = format!(
        "{HEP}---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: u}}\nspec:\n  doNotTrack: true\n  applyOnForward: true\n  ingress:\n  - action: Log\n  - action: Allow\n    protocol: TCP\n"
    );
    let e = explain(
        &text,
        Direction::Ingress,
        tcp("192.0.2.9", "192.0.2.1", 8080),
    );
    assert_eq!(e.verdict, Verdict::Allow);
    assert_eq!(
        e.stages[0].logged,
        vec![Who::Policy {
            tier: "default".into(),
            policy: "u".into(),
            rule: 0
        }]
    );
    assert_eq!(
        e.stages[0].by,
        Some(Who::Policy {
            tier: "default".into(),
            policy: "u".into(),
            rule: 1
        })
    );
}

#[test]
fn felix_configuration_replaces_the_failsafe_lists() {
    let text = format!(
        "{HEP}---\napiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {{name: default}}\nspec:\n  failsafeInboundHostPorts: [{{protocol: TCP, port: 2222}}]\n  logSeverityScreen: Info\n"
    );
    assert_eq!(
        explain(&text, Direction::Ingress, tcp("192.0.2.9", "192.0.2.1", 22)).verdict,
        Verdict::Deny
    );
    assert_eq!(
        explain(
            &text,
            Direction::Ingress,
            tcp("192.0.2.9", "192.0.2.1", 2222)
        )
        .verdict,
        Verdict::Allow
    );
}
