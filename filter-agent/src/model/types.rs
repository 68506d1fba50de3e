//! Calico v3 resources as serde types.
//!
//! Field names follow the Calico API (`projectcalico.org/v3`, and the CRD
//! form `crd.projectcalico.org/v1`, which has the same spec). Unknown fields
//! are rejected, as `calicoctl` rejects them. Values with a grammar of their
//! own (CIDRs, ports, protocols) are parsed while deserializing, so their
//! errors carry the YAML position.

use std::{collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use ipnetwork::IpNetwork;
use serde::{de, Deserialize, Deserializer};

use crate::selector::Written;

/// `metadata` of any resource.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// Resource name.
    #[serde(default)]
    pub name: String,
    /// Namespace of namespaced kinds.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Labels, matched by selectors.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations (kept, not interpreted).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Server-side bookkeeping that exported resources carry.
    #[serde(default)]
    pub resource_version: Option<String>,
    /// As above.
    #[serde(default)]
    pub uid: Option<String>,
    /// As above.
    #[serde(default)]
    pub creation_timestamp: Option<serde_json::Value>,
    /// As above.
    #[serde(default)]
    pub generation: Option<i64>,
    /// As above.
    #[serde(default)]
    pub managed_fields: Option<serde_json::Value>,
}

/// `spec` of a GlobalNetworkPolicy (docs/semantics.md 1.1).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GlobalNetworkPolicySpec {
    /// Tier name; `default` when unset.
    #[serde(default)]
    pub tier: Option<String>,
    /// Lower runs first; unset runs last.
    #[serde(default)]
    pub order: Option<f64>,
    /// Endpoints the policy applies to; empty means `all()`.
    #[serde(default)]
    pub selector: Option<Written>,
    /// ANDed into `selector` against namespace labels.
    #[serde(default)]
    pub namespace_selector: Option<Written>,
    /// ANDed into `selector` against service-account labels.
    #[serde(default)]
    pub service_account_selector: Option<Written>,
    /// Directions governed; defaulted from the rules when empty.
    #[serde(default)]
    pub types: Vec<PolicyType>,
    /// Ingress rules, in order. Shared (`Arc`): a reload takes each rule
    /// whose text did not change over from the last load as it is.
    #[serde(default)]
    pub ingress: Vec<Arc<Rule>>,
    /// Egress rules, in order.
    #[serde(default)]
    pub egress: Vec<Arc<Rule>>,
    /// Untracked policy.
    #[serde(default)]
    pub do_not_track: bool,
    /// Pre-DNAT policy.
    #[serde(default, rename = "preDNAT")]
    pub pre_dnat: bool,
    /// Also applies to forwarded traffic.
    #[serde(default)]
    pub apply_on_forward: bool,
    /// Hints only; never change enforcement.
    #[serde(default)]
    pub performance_hints: Vec<String>,
}

/// `spec` of a namespaced NetworkPolicy (1.2): it selects pods, never host
/// endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicySpec {
    /// Tier name.
    #[serde(default)]
    pub tier: Option<String>,
    /// Order within the tier.
    #[serde(default)]
    pub order: Option<f64>,
    /// Pods the policy applies to.
    #[serde(default)]
    pub selector: Option<Written>,
    /// Service accounts.
    #[serde(default)]
    pub service_account_selector: Option<Written>,
    /// Directions governed.
    #[serde(default)]
    pub types: Vec<PolicyType>,
    /// Ingress rules (shared, as a GlobalNetworkPolicy's).
    #[serde(default)]
    pub ingress: Vec<Arc<Rule>>,
    /// Egress rules.
    #[serde(default)]
    pub egress: Vec<Arc<Rule>>,
    /// Hints only.
    #[serde(default)]
    pub performance_hints: Vec<String>,
}

/// `spec.types` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum PolicyType {
    /// Governs ingress.
    Ingress,
    /// Governs egress.
    Egress,
}

/// One rule (docs/semantics.md 2).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// What a match does.
    pub action: Action,
    /// Limit to one IP family.
    #[serde(default)]
    pub ip_version: Option<u8>,
    /// IP protocol.
    #[serde(default)]
    pub protocol: Option<Protocol>,
    /// IP protocol that must not be.
    #[serde(default)]
    pub not_protocol: Option<Protocol>,
    /// ICMP type/code that must be.
    #[serde(default)]
    pub icmp: Option<IcmpFields>,
    /// ICMP type/code that must not be.
    #[serde(default, rename = "notICMP")]
    pub not_icmp: Option<IcmpFields>,
    /// Peer on the source side.
    #[serde(default)]
    pub source: EntityRule,
    /// Peer on the destination side.
    #[serde(default)]
    pub destination: EntityRule,
    /// Application-layer match (not enforceable at L3/L4).
    #[serde(default)]
    pub http: Option<serde_json::Value>,
    /// Annotations of the rule (kept, not interpreted).
    #[serde(default)]
    pub metadata: Option<RuleMetadata>,
    /// The parsed item the rule was typed from, where a reload of a policy
    /// file typed it: not part of what the rule says.
    #[serde(skip)]
    pub item: ItemId,
}

/// The parsed YAML item a rule was typed from. A reload shares the items
/// of a file that did not change (`model::reparse`), so the same item (one
/// `Arc`) is the same rule, and what the compiler made of it last time
/// holds (`compile::Reuse`). Held, so the item's address stays its own.
#[derive(Clone, Default)]
pub struct ItemId(Option<std::sync::Arc<crate::model::yaml::Node>>);

impl ItemId {
    pub(crate) fn of(item: &std::sync::Arc<crate::model::yaml::Node>) -> ItemId {
        ItemId(Some(item.clone()))
    }

    /// The item's address, if the rule came from one.
    pub fn key(&self) -> Option<usize> {
        self.0.as_ref().map(|n| std::sync::Arc::as_ptr(n) as usize)
    }
}

/// Not what the rule says: shown as nothing.
impl fmt::Debug for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("_")
    }
}

/// `metadata` of a rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleMetadata {
    /// Validated as a resource's annotations are.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// Rule actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Action {
    /// Accept.
    #[default]
    Allow,
    /// Drop.
    Deny,
    /// Record, then go on.
    Log,
    /// Leave the tier.
    Pass,
}

/// `icmp` / `notICMP`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcmpFields {
    /// ICMP type, 0-254.
    #[serde(default, rename = "type")]
    pub icmp_type: Option<u8>,
    /// ICMP code, 0-255; needs `type`.
    #[serde(default)]
    pub code: Option<u8>,
}

/// `source` / `destination` of a rule (2.5).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntityRule {
    /// The address is in one of these.
    #[serde(default)]
    pub nets: Vec<Cidr>,
    /// The address is in none of these.
    #[serde(default)]
    pub not_nets: Vec<Cidr>,
    /// The address belongs to a selected endpoint or network set.
    #[serde(default)]
    pub selector: Option<Written>,
    /// The address belongs to no selected endpoint or network set.
    #[serde(default)]
    pub not_selector: Option<Written>,
    /// Scopes `selector` to namespaces.
    #[serde(default)]
    pub namespace_selector: Option<Written>,
    /// The port is one of these.
    #[serde(default)]
    pub ports: Vec<Port>,
    /// The port is none of these.
    #[serde(default)]
    pub not_ports: Vec<Port>,
    /// Service-account match (pods only).
    #[serde(default)]
    pub service_accounts: Option<serde_json::Value>,
    /// Kubernetes service match (pods only).
    #[serde(default)]
    pub services: Option<serde_json::Value>,
}

impl EntityRule {
    /// True when the entity constrains nothing that an L3/L4 table holds
    /// other than nets and ports.
    pub fn has_identity_match(&self) -> bool {
        self.selector.is_some()
            || self.not_selector.is_some()
            || self.namespace_selector.is_some()
            || self.service_accounts.is_some()
            || self.services.is_some()
    }
}

/// An IP protocol: a Calico name or a number 1-255.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Protocol(pub u8);

impl Protocol {
    /// Whether port matches are allowed with this protocol (TCP, UDP, SCTP).
    pub fn supports_ports(self) -> bool {
        filter_common::proto::has_ports(self.0)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            1 => f.write_str("ICMP"),
            6 => f.write_str("TCP"),
            17 => f.write_str("UDP"),
            58 => f.write_str("ICMPv6"),
            132 => f.write_str("SCTP"),
            136 => f.write_str("UDPLite"),
            n => write!(f, "{n}"),
        }
    }
}

use filter_common::proto;

/// Protocol names as a command line takes them: in any case, as iptables
/// and tcpdump users type them (`tcp`, `Tcp`, `TCP`), or a number 1-255.
/// YAML keeps Calico's case-sensitive spelling (see the `Deserialize` impl).
impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let n = match s.to_ascii_lowercase().as_str() {
            "tcp" => proto::TCP,
            "udp" => proto::UDP,
            "icmp" => proto::ICMP,
            "icmpv6" => proto::ICMPV6,
            "sctp" => proto::SCTP,
            "udplite" => proto::UDPLITE,
            other => match other.parse::<u8>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(format!(
                        "invalid protocol {s:?}: expected tcp, udp, icmp, icmpv6, sctp, udplite \
                         (any case) or a number 1-255"
                    ))
                }
            },
        };
        Ok(Protocol(n))
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = IntOrString::deserialize(d)?;
        let n = match v {
            IntOrString::Int(n) => n,
            IntOrString::Str(s) => match s.as_str() {
                // Case-sensitive, as the v3 validator (docs/semantics.md 2.2).
                "TCP" => 6,
                "UDP" => 17,
                "ICMP" => 1,
                "ICMPv6" => 58,
                "SCTP" => 132,
                "UDPLite" => 136,
                other => other.parse::<i64>().map_err(|_| {
                    de::Error::custom(format!(
                        "invalid protocol {other:?}: expected TCP, UDP, ICMP, ICMPv6, SCTP, \
                         UDPLite or a number 1-255 (names are case-sensitive)"
                    ))
                })?,
            },
        };
        if !(1..=255).contains(&n) {
            return Err(de::Error::custom(format!(
                "invalid protocol {n}: numbers must be 1-255"
            )));
        }
        Ok(Protocol(n as u8))
    }
}

/// A port match entry: a number, an inclusive range, or a named port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Port {
    /// `first..=last`; a single port has `first == last`.
    Range {
        /// First port, 1-65535.
        first: u16,
        /// Last port, ≥ first.
        last: u16,
    },
    /// A name resolved through endpoints' `ports`.
    Named(String),
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fn number<E: de::Error>(n: i64) -> Result<u16, E> {
            if (1..=65535).contains(&n) {
                Ok(n as u16)
            } else {
                Err(E::custom(format!("invalid port {n}: ports are 1-65535")))
            }
        }
        match IntOrString::deserialize(d)? {
            IntOrString::Int(n) => {
                let p = number(n)?;
                Ok(Port::Range { first: p, last: p })
            }
            IntOrString::Str(s) => {
                // The range separator is ':' (numorstring/port.go); "80-90"
                // is a (bad) port name.
                if let Some((a, b)) = s.split_once(':') {
                    let parse = |x: &str| {
                        x.trim().parse::<i64>().map_err(|_| {
                            de::Error::custom(format!(
                                "invalid port range {s:?}: expected \"first:last\""
                            ))
                        })
                    };
                    let (first, last) = (number(parse(a)?)?, number(parse(b)?)?);
                    if first > last {
                        return Err(de::Error::custom(format!(
                            "invalid port range {s:?}: first port is above the last"
                        )));
                    }
                    return Ok(Port::Range { first, last });
                }
                if let Ok(n) = s.parse::<i64>() {
                    let p = number(n)?;
                    return Ok(Port::Range { first: p, last: p });
                }
                validate_port_name(&s).map_err(de::Error::custom)?;
                Ok(Port::Named(s))
            }
        }
    }
}

/// IANA service name rules for named ports (docs/semantics.md 1.3).
pub fn validate_port_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let has_letter = name.bytes().any(|b| b.is_ascii_lowercase());
    if name.is_empty() || name.len() > 15 || !ok_chars || !has_letter {
        return Err(format!(
            "invalid port {name:?}: expected a number, a range \"first:last\", or a port name \
             (1-15 lower-case letters, digits and '-', with at least one letter)"
        ));
    }
    Ok(())
}

/// A CIDR in a rule; a bare address means /32 or /128. Strictly masked: host
/// bits must be zero (docs/semantics.md 2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr(pub IpNetwork);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let net = parse_net(&s).map_err(de::Error::custom)?;
        if net.network() != net.ip() {
            return Err(de::Error::custom(format!(
                "invalid CIDR {s:?}: host bits are set (did you mean {}/{}?)",
                net.network(),
                net.prefix()
            )));
        }
        Ok(Cidr(net))
    }
}

/// Parses `a.b.c.d/n`, `x::y/n` or a bare address.
pub fn parse_net(s: &str) -> Result<IpNetwork, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNetwork::from(ip));
    }
    s.parse::<IpNetwork>()
        .map_err(|_| format!("invalid CIDR {s:?}: expected an address or address/prefix"))
}

/// `spec` of a HostEndpoint (1.3).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostEndpointSpec {
    /// Node the endpoint belongs to.
    #[serde(default)]
    pub node: String,
    /// Interface: a name, `*`, or empty (bind by `expected_ips`).
    #[serde(default)]
    pub interface_name: String,
    /// The endpoint's addresses as Calico knows them.
    #[serde(default, rename = "expectedIPs")]
    pub expected_ips: Vec<String>,
    /// Profiles, evaluated after all tiers.
    #[serde(default)]
    pub profiles: Vec<String>,
    /// Named ports.
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
}

/// A named port of a host endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointPort {
    /// IANA-style name.
    pub name: String,
    /// TCP, UDP or SCTP.
    pub protocol: Protocol,
    /// 1-65535.
    pub port: u16,
}

/// `spec` of a GlobalNetworkSet / NetworkSet (1.4).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSetSpec {
    /// CIDRs or addresses; host bits may be set.
    #[serde(default)]
    pub nets: Vec<String>,
}

/// YAML scalars that Calico reads as int-or-string.
#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(i64),
    Str(String),
}

/// `spec` of a Tier (docs/semantics.md 1.5).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierSpec {
    /// Lower runs first; unset runs last.
    #[serde(default)]
    pub order: Option<f64>,
    /// What a tier does when its policies applied but none decided.
    #[serde(default)]
    pub default_action: Option<TierAction>,
}

/// A tier's end action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TierAction {
    /// Drop (the default).
    Deny,
    /// Go on with the next tier.
    Pass,
}

/// `spec` of a Profile (1.5): rule lists applied after all tiers, and labels
/// its endpoints inherit.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProfileSpec {
    /// Ingress rules (shared, as a GlobalNetworkPolicy's).
    #[serde(default)]
    pub ingress: Vec<Arc<Rule>>,
    /// Egress rules.
    #[serde(default)]
    pub egress: Vec<Arc<Rule>>,
    /// Labels applied to endpoints that use the profile.
    #[serde(default)]
    pub labels_to_apply: BTreeMap<String, String>,
}

/// The FelixConfiguration fields this dataplane honours (4, 6). Felix has a
/// hundred and fifty more; they configure Felix's own dataplanes, are kept
/// in `other` and checked as Calico checks them (model/felix.rs).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FelixConfigurationSpec {
    /// Every other field, by its name.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
    /// Inbound failsafe ports; `[]` disables them.
    #[serde(default)]
    pub failsafe_inbound_host_ports: Option<Vec<ProtoPort>>,
    /// Outbound failsafe ports; `[]` disables them.
    #[serde(default)]
    pub failsafe_outbound_host_ports: Option<Vec<ProtoPort>>,
    /// Prefix of Log-action lines; Calico appends ": ".
    #[serde(default)]
    pub log_prefix: Option<String>,
}

/// A failsafe entry: protocol, port, and an optional CIDR.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtoPort {
    /// TCP or UDP (SCTP passes the API validator but not Felix).
    #[serde(default = "ProtoPort::default_protocol")]
    pub protocol: String,
    /// Destination port.
    pub port: u16,
    /// Inbound: source CIDR; outbound: destination CIDR.
    #[serde(default)]
    pub net: Option<String>,
}

impl ProtoPort {
    fn default_protocol() -> String {
        "TCP".into()
    }
}

/// A Kubernetes v1 Service, as far as the firewall cares: its frontends
/// (docs/design.md, "Forwarded or host-bound"). Read leniently: a Service has
/// many fields this firewall has no use for.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Name and namespace.
    #[serde(default)]
    pub metadata: ServiceMeta,
    /// The part that names frontends.
    #[serde(default)]
    pub spec: ServiceSpec,
    /// Load-balancer ingress addresses.
    #[serde(default)]
    pub status: ServiceStatus,
}

/// `metadata` of a Service.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ServiceMeta {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Namespace.
    #[serde(default)]
    pub namespace: Option<String>,
}

/// `spec` of a Service.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// ClusterIP, NodePort, LoadBalancer or ExternalName.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Addresses outside the cluster that route to the service.
    #[serde(default, rename = "externalIPs")]
    pub external_ips: Vec<String>,
}

/// One port of a Service.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// TCP (default), UDP or SCTP.
    #[serde(default)]
    pub protocol: Option<String>,
    /// The service port (frontend port on LoadBalancer and external IPs).
    pub port: u16,
    /// The port on every node address (NodePort and LoadBalancer types).
    #[serde(default)]
    pub node_port: Option<u16>,
}

/// `status` of a Service.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// `loadBalancer.ingress[].ip`.
    #[serde(default)]
    pub load_balancer: LoadBalancerStatus,
}

/// `status.loadBalancer` of a Service.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LoadBalancerStatus {
    /// Ingress points.
    #[serde(default)]
    pub ingress: Vec<LoadBalancerIngress>,
}

/// One load-balancer ingress point.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LoadBalancerIngress {
    /// Its address (hostname-only ingress points have none).
    #[serde(default)]
    pub ip: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::Protocol;

    #[test]
    fn the_command_line_takes_protocol_names_in_any_case() {
        for (name, n) in [
            ("tcp", 6),
            ("Tcp", 6),
            ("UDP", 17),
            ("icmpv6", 58),
            ("ICMPV6", 58),
            ("udplite", 136),
            ("47", 47),
        ] {
            assert_eq!(name.parse::<Protocol>(), Ok(Protocol(n)), "{name}");
        }
        for bad in ["0", "256", "gre", ""] {
            assert!(bad.parse::<Protocol>().is_err(), "{bad}");
        }
        // YAML stays case-sensitive, as Calico's validator.
        assert!(serde_saphyr::from_str::<Protocol>("tcp").is_err());
    }
}
