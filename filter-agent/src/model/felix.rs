//! FelixConfiguration fields, checked as Calico checks them.
//!
//! This dataplane honours three fields (the failsafe lists and `logPrefix`,
//! typed in [`super::FelixConfigurationSpec`]); Felix has a hundred and
//! fifty more. A resource Calico would refuse must not load here either,
//! so each field is listed with the check Calico applies to its value:
//! the Go type it decodes into (a boolean, an integer, a duration string),
//! the CRD schema's pattern or enumeration, and the v3 validator's field
//! and struct rules. A field not in the list is refused, as calicoctl
//! refuses unknown fields.

use std::{collections::BTreeMap, net::IpAddr};

use serde_json::Value;

use super::parse_net;

/// What a field's value must be.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Bool,
    /// A JSON integer within bounds (Go `*int`, `*uint32`, validator gte/lte).
    Int(i64, i64),
    /// metav1.Duration with the CRD pattern `^([0-9]+(\.[0-9]+)?(ms|s|m|h))*$`.
    Duration,
    /// A string; empty or one of these in any case (`^(?i)(A|B)?$`).
    AnyCase(&'static [&'static str]),
    /// A string, exactly one of these (validator `oneof`, CRD enum).
    OneOf(&'static [&'static str]),
    /// Any string.
    Text,
    /// A Go (RE2) regular expression.
    Regexp,
    /// `key=value,key=value` (validator `keyValueList`).
    KeyValueList,
    /// `^[a-zA-Z0-9:._+-]{1,64}$`.
    PrometheusHost,
    /// `^[a-zA-Z0-9:._+-]{1,15}$`, alone or as each item of a list.
    IfaceFilter,
    IfaceFilters,
    /// `*` or `^[a-zA-Z0-9_.-]{1,15}$`.
    Interface,
    /// A list of CIDRs or addresses.
    Cidrs,
    /// The same, IPv4 only (externalNodesList).
    Ipv4Cidrs,
    /// An address of that family.
    Ipv4,
    Ipv6,
    /// A numorstring port: a number or `first:last`.
    Port,
    /// Node port ranges: up to 7 numeric ports or ranges.
    NodePorts,
    /// A DNS label short enough to follow `openstack-region-`.
    Region,
    /// `[{name, timeout}]`.
    HealthTimeouts,
    /// `[{min, max}]` designating at most 65,535 tables, or one `{min, max}`.
    RouteTableRanges,
    RouteTableRange,
    /// Interface name → pcap filter.
    BpfLogFilters,
    /// `N/second|minute|hour|day`, N in 1..9999.
    RateLimit,
    /// Typed and checked by the spec itself (failsafe lists, logPrefix).
    Typed,
    /// A field of newer Calico releases whose rule is not modelled: any value.
    Unchecked,
}

use Kind::*;

const LOG_LEVELS: &[&str] = &["Debug", "Info", "Warning", "Error", "Fatal"];
const ENABLED: &[&str] = &["Enabled", "Disabled"];
const ACCEPT_RETURN: &[&str] = &["Accept", "Return"];
const DROP_REJECT: &[&str] = &["Drop", "Reject"];

/// Every field of Calico's FelixConfigurationSpec and its check.
const FIELDS: &[(&str, Kind)] = &[
    ("allowIPIPPacketsFromWorkloads", Bool),
    ("allowVXLANPacketsFromWorkloads", Bool),
    ("awsSrcDstCheck", OneOf(&["DoNothing", "Enable", "Disable"])),
    ("bpfAttachType", Unchecked),
    ("bpfCTLBLogFilter", Text),
    (
        "bpfConnectTimeLoadBalancing",
        OneOf(&["TCP", "Enabled", "Disabled"]),
    ),
    ("bpfConnectTimeLoadBalancingEnabled", Bool),
    ("bpfConntrackLogLevel", Unchecked),
    ("bpfConntrackMode", Unchecked),
    ("bpfConntrackTimeouts", Unchecked),
    ("bpfDSROptoutCIDRs", Cidrs),
    ("bpfDataIfacePattern", Regexp),
    ("bpfDisableGROForIfaces", Regexp),
    ("bpfDisableUnprivileged", Bool),
    ("bpfEnabled", Bool),
    ("bpfEnforceRPF", AnyCase(&["Disabled", "Strict", "Loose"])),
    ("bpfExcludeCIDRsFromNAT", Cidrs),
    ("bpfExportBufferSizeMB", Unchecked),
    ("bpfExtToServiceConnmark", Int(0, 4_294_967_295)),
    ("bpfExternalServiceMode", AnyCase(&["Tunnel", "DSR"])),
    ("bpfForceTrackPacketsFromIfaces", IfaceFilters),
    ("bpfHostConntrackBypass", Bool),
    ("bpfHostNetworkedNATWithoutCTLB", OneOf(ENABLED)),
    ("bpfJITHardening", Unchecked),
    ("bpfKubeProxyEndpointSlicesEnabled", Bool),
    ("bpfKubeProxyIptablesCleanupEnabled", Bool),
    ("bpfKubeProxyMinSyncPeriod", Duration),
    ("bpfL3IfacePattern", Regexp),
    ("bpfLogFilters", BpfLogFilters),
    ("bpfLogLevel", AnyCase(&["Off", "Info", "Debug"])),
    ("bpfMapSizeConntrack", Int(i64::MIN, i64::MAX)),
    ("bpfMapSizeIPSets", Int(i64::MIN, i64::MAX)),
    ("bpfMapSizeIfState", Int(i64::MIN, i64::MAX)),
    ("bpfMapSizeNATAffinity", Int(i64::MIN, i64::MAX)),
    ("bpfMapSizeNATBackend", Int(i64::MIN, i64::MAX)),
    ("bpfMapSizeNATFrontend", Int(i64::MIN, i64::MAX)),
    ("bpfMapSizePerCpuConntrack", Unchecked),
    ("bpfMapSizeRoute", Int(i64::MIN, i64::MAX)),
    ("bpfPSNATPorts", Port),
    ("bpfPolicyDebugEnabled", Bool),
    ("bpfProfiling", OneOf(ENABLED)),
    ("bpfRedirectToPeer", Text),
    ("chainInsertMode", AnyCase(&["insert", "append"])),
    ("dataplaneDriver", Text),
    ("dataplaneWatchdogTimeout", Duration),
    ("debugDisableLogDropping", Bool),
    ("debugHost", Text),
    ("debugMemoryProfilePath", Text),
    ("debugPort", Int(0, 65_535)),
    ("debugSimulateCalcGraphHangAfter", Duration),
    ("debugSimulateDataplaneApplyDelay", Duration),
    ("debugSimulateDataplaneHangAfter", Duration),
    (
        "defaultEndpointToHostAction",
        AnyCase(&["Drop", "Accept", "Return"]),
    ),
    ("deviceRouteProtocol", Int(i64::MIN, i64::MAX)),
    ("deviceRouteSourceAddress", Ipv4),
    ("deviceRouteSourceAddressIPv6", Ipv6),
    ("disableConntrackInvalidCheck", Bool),
    ("endpointReportingDelay", Duration),
    ("endpointReportingEnabled", Bool),
    ("endpointStatusPathPrefix", Text),
    ("externalNodesList", Ipv4Cidrs),
    ("failsafeInboundHostPorts", Typed),
    ("failsafeOutboundHostPorts", Typed),
    ("featureDetectOverride", KeyValueList),
    ("featureGates", KeyValueList),
    ("floatingIPs", OneOf(ENABLED)),
    ("flowLogsFlushInterval", Duration),
    ("genericXDPEnabled", Bool),
    ("goGCThreshold", Int(-1, i64::MAX)),
    ("goMaxProcs", Int(-1, i64::MAX)),
    ("goMemoryLimitMB", Int(-1, i64::MAX)),
    ("healthEnabled", Bool),
    ("healthHost", Text),
    ("healthPort", Int(i64::MIN, i64::MAX)),
    ("healthTimeoutOverrides", HealthTimeouts),
    ("interfaceExclude", Text),
    ("interfacePrefix", Text),
    ("interfaceRefreshInterval", Duration),
    ("ipForwarding", OneOf(ENABLED)),
    ("ipipEnabled", Bool),
    ("ipipMTU", Int(i64::MIN, i64::MAX)),
    ("ipsetsRefreshInterval", Duration),
    ("iptablesBackend", AnyCase(&["Auto", "Legacy", "NFT"])),
    ("iptablesFilterAllowAction", AnyCase(ACCEPT_RETURN)),
    ("iptablesFilterDenyAction", AnyCase(DROP_REJECT)),
    ("iptablesLockFilePath", Text),
    ("iptablesLockProbeInterval", Duration),
    ("iptablesLockTimeout", Duration),
    ("iptablesMangleAllowAction", AnyCase(ACCEPT_RETURN)),
    ("iptablesMarkMask", Int(0, u32::MAX as i64)),
    ("iptablesNATOutgoingInterfaceFilter", IfaceFilter),
    ("iptablesPostWriteCheckInterval", Duration),
    ("iptablesRefreshInterval", Duration),
    ("ipv6Support", Bool),
    ("kubeNodePortRanges", NodePorts),
    ("logActionRateLimit", RateLimit),
    ("logActionRateLimitBurst", Int(0, 9_999)),
    ("logDebugFilenameRegex", Regexp),
    ("logFilePath", Text),
    ("logPrefix", Typed),
    ("logSeverityFile", AnyCase(LOG_LEVELS)),
    ("logSeverityScreen", AnyCase(LOG_LEVELS)),
    ("logSeveritySys", AnyCase(LOG_LEVELS)),
    ("maxIpsetSize", Int(i64::MIN, i64::MAX)),
    ("metadataAddr", Text),
    ("metadataPort", Int(i64::MIN, i64::MAX)),
    ("mtuIfacePattern", Regexp),
    ("natOutgoingAddress", Ipv4),
    ("natPortRange", Port),
    ("netlinkTimeout", Duration),
    ("nftablesFilterAllowAction", AnyCase(ACCEPT_RETURN)),
    ("nftablesFilterDenyAction", AnyCase(DROP_REJECT)),
    ("nftablesMangleAllowAction", AnyCase(ACCEPT_RETURN)),
    ("nftablesMarkMask", Int(0, u32::MAX as i64)),
    ("nftablesMode", Unchecked),
    ("nftablesRefreshInterval", Duration),
    ("openstackRegion", Region),
    ("policySyncPathPrefix", Text),
    ("programClusterRoutes", Unchecked),
    ("prometheusGoMetricsEnabled", Bool),
    ("prometheusMetricsEnabled", Bool),
    ("prometheusMetricsHost", PrometheusHost),
    ("prometheusMetricsPort", Int(i64::MIN, i64::MAX)),
    ("prometheusProcessMetricsEnabled", Bool),
    ("prometheusWireGuardMetricsEnabled", Bool),
    ("removeExternalRoutes", Bool),
    ("reportingInterval", Duration),
    ("reportingTTL", Duration),
    ("requireMTUFile", Unchecked),
    ("routeRefreshInterval", Duration),
    ("routeSource", AnyCase(&["WorkloadIPs", "CalicoIPAM"])),
    ("routeSyncDisabled", Bool),
    ("routeTableRange", RouteTableRange),
    ("routeTableRanges", RouteTableRanges),
    (
        "serviceLoopPrevention",
        OneOf(&["Drop", "Reject", "Disabled"]),
    ),
    ("sidecarAccelerationEnabled", Bool),
    ("usageReportingEnabled", Bool),
    ("usageReportingInitialDelay", Duration),
    ("usageReportingInterval", Duration),
    ("useInternalDataplaneDriver", Bool),
    ("vxlanEnabled", Bool),
    ("vxlanMTU", Int(i64::MIN, i64::MAX)),
    ("vxlanMTUV6", Int(i64::MIN, i64::MAX)),
    ("vxlanPort", Int(i64::MIN, i64::MAX)),
    ("vxlanVNI", Int(i64::MIN, i64::MAX)),
    ("windowsManageFirewallRules", OneOf(ENABLED)),
    ("wireguardEnabled", Bool),
    ("wireguardEnabledV6", Bool),
    ("wireguardHostEncryptionEnabled", Bool),
    ("wireguardInterfaceName", Interface),
    ("wireguardInterfaceNameV6", Interface),
    ("wireguardKeepAlive", Duration),
    ("wireguardListeningPort", Int(1, 65_535)),
    ("wireguardListeningPortV6", Int(1, 65_535)),
    ("wireguardMTU", Int(i64::MIN, i64::MAX)),
    ("wireguardMTUV6", Int(i64::MIN, i64::MAX)),
    ("wireguardRoutingRulePriority", Int(1, 32_765)),
    ("wireguardThreadingEnabled", Bool),
    ("workloadSourceSpoofing", OneOf(&["Disabled", "Any"])),
    ("xdpEnabled", Bool),
    ("xdpRefreshInterval", Duration),
];

/// Checks every field of a FelixConfiguration spec; `report(field, why)`
/// is called for each refusal (`field` relative to the resource).
pub fn check(spec: &BTreeMap<String, Value>, mut report: impl FnMut(&str, String)) {
    for (name, value) in spec {
        let field = format!("spec.{name}");
        match FIELDS.binary_search_by(|(f, _)| f.cmp(&name.as_str())) {
            Ok(i) => {
                if let Err(why) = value_ok(FIELDS[i].1, value) {
                    report(&field, why);
                }
            }
            Err(_) => report(
                &field,
                format!("unknown field `{name}` of a FelixConfiguration"),
            ),
        }
    }
}

fn value_ok(kind: Kind, v: &Value) -> Result<(), String> {
    let text = || {
        v.as_str()
            .ok_or_else(|| format!("expected a string, found {v}"))
    };
    let list = || {
        v.as_array()
            .ok_or_else(|| format!("expected a list, found {v}"))
    };
    match kind {
        Typed | Unchecked => Ok(()),
        Bool => v
            .as_bool()
            .map(|_| ())
            .ok_or_else(|| format!("expected true or false, found {v}")),
        Int(min, max) => match v.as_i64() {
            Some(n) if (min..=max).contains(&n) => Ok(()),
            Some(n) => Err(format!("{n} is out of range {min}..={max}")),
            None => Err(format!("expected an integer, found {v}")),
        },
        Duration => {
            let s = text()?;
            is_duration(s)
                .then_some(())
                .ok_or_else(|| format!("invalid duration {s:?}: e.g. 90s, 1m30s, 500ms"))
        }
        AnyCase(choices) => {
            let s = text()?;
            (s.is_empty() || choices.iter().any(|c| c.eq_ignore_ascii_case(s)))
                .then_some(())
                .ok_or_else(|| format!("invalid value {s:?}: one of {}", choices.join(", ")))
        }
        OneOf(choices) => {
            let s = text()?;
            choices
                .contains(&s)
                .then_some(())
                .ok_or_else(|| format!("invalid value {s:?}: one of {}", choices.join(", ")))
        }
        Text => text().map(|_| ()),
        Regexp => {
            let s = text()?;
            regex_syntax::Parser::new()
                .parse(s)
                .map(|_| ())
                .map_err(|e| format!("invalid regular expression {s:?}: {e}"))
        }
        KeyValueList => {
            let s = text()?;
            let ok = s.split(',').filter(|i| !i.is_empty()).all(|item| {
                item.trim_start().split_once('=').is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_alphanumeric() || c == '_')
                })
            });
            ok.then_some(())
                .ok_or_else(|| format!("invalid list {s:?}: key=value,key=value"))
        }
        PrometheusHost => chars_ok(text()?, 64, ":._+-"),
        IfaceFilter => chars_ok(text()?, 15, ":._+-"),
        IfaceFilters => list()?.iter().try_for_each(|i| value_ok(IfaceFilter, i)),
        Interface => {
            let s = text()?;
            if s == "*" {
                Ok(())
            } else {
                chars_ok(s, 15, "_.-")
            }
        }
        Cidrs | Ipv4Cidrs => list()?.iter().try_for_each(|item| {
            let s = item
                .as_str()
                .ok_or_else(|| format!("expected a CIDR, found {item}"))?;
            let net = parse_net(s)?;
            if matches!(kind, Ipv4Cidrs) && !net.is_ipv4() {
                return Err(format!("{s:?} is an IPv6 CIDR; this list takes IPv4"));
            }
            Ok(())
        }),
        Ipv4 | Ipv6 => {
            let s = text()?;
            match s.parse::<IpAddr>() {
                Ok(a) if a.is_ipv4() == matches!(kind, Ipv4) => Ok(()),
                _ => Err(format!(
                    "{s:?} is not a valid {} address",
                    if matches!(kind, Ipv4) { "IPv4" } else { "IPv6" }
                )),
            }
        }
        Port => port(v, false),
        NodePorts => {
            let items = list()?;
            if items.len() > 7 {
                return Err(format!("at most 7 ranges, found {}", items.len()));
            }
            items.iter().try_for_each(|p| port(p, true))
        }
        Region => {
            let s = text()?;
            const MAX: usize = 63 - "openstack-region-".len();
            if s.len() > MAX {
                Err(format!("{s:?} is too long (at most {MAX} characters)"))
            } else if !s.is_empty() && !super::validate::is_label(s) {
                Err(format!("{s:?} must be a valid DNS label"))
            } else {
                Ok(())
            }
        }
        HealthTimeouts => list()?.iter().try_for_each(|o| {
            let name = o.get("name").and_then(Value::as_str).unwrap_or_default();
            let timeout = o.get("timeout").and_then(Value::as_str);
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_ -".contains(c))
            {
                return Err(format!(
                    "override name {name:?} invalid: letters, digits, '_', ' ' and '-'"
                ));
            }
            match timeout {
                Some(t) if is_duration(t) => Ok(()),
                _ => Err(format!("override {name:?} needs a timeout such as 30s")),
            }
        }),
        RouteTableRange => range_pair(v).map(|_| ()),
        RouteTableRanges => {
            let mut tables = 0i64;
            for r in list()? {
                let (min, max) = range_pair(r)?;
                tables += max - min + 1;
            }
            (tables <= 0xffff)
                .then_some(())
                .ok_or_else(|| format!("targets {tables} tables, at most 65535"))
        }
        BpfLogFilters => {
            let map = v
                .as_object()
                .ok_or_else(|| format!("expected a map, found {v}"))?;
            map.iter().try_for_each(|(k, f)| {
                chars_ok(k, 15, "_.-")?;
                f.as_str()
                    .map(|_| ())
                    .ok_or_else(|| format!("filter of {k:?} must be a string"))
            })
        }
        RateLimit => {
            let s = text()?;
            let ok = s.split_once('/').is_some_and(|(n, unit)| {
                n.len() <= 4
                    && !n.starts_with('0')
                    && n.parse::<u16>().is_ok_and(|n| n >= 1)
                    && matches!(unit, "second" | "minute" | "hour" | "day")
            });
            ok.then_some(()).ok_or_else(|| {
                format!("invalid rate {s:?}: N/second, N/minute, N/hour or N/day, N in 1..9999")
            })
        }
    }
}

/// `^[a-zA-Z0-9<extra>]{1,max}$`.
fn chars_ok(s: &str, max: usize, extra: &str) -> Result<(), String> {
    let ok = (1..=max).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(c));
    ok.then_some(())
        .ok_or_else(|| format!("invalid value {s:?}: 1 to {max} of letters, digits and {extra:?}"))
}

/// The CRD pattern of durations: `^([0-9]+(\.[0-9]+)?(ms|s|m|h))*$`.
fn is_duration(s: &str) -> bool {
    let mut rest = s;
    while !rest.is_empty() {
        let digits = |r: &str| r.len() - r.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let n = digits(rest);
        if n == 0 {
            return false;
        }
        rest = &rest[n..];
        if let Some(frac) = rest.strip_prefix('.') {
            let n = digits(frac);
            if n == 0 {
                return false;
            }
            rest = &frac[n..];
        }
        rest = match ["ms", "s", "m", "h"]
            .iter()
            .find_map(|u| rest.strip_prefix(u))
        {
            Some(r) => r,
            None => return false,
        };
    }
    true
}

/// A numorstring port: 1..65535 or `first:last`; a name unless `numeric`.
fn port(v: &Value, numeric: bool) -> Result<(), String> {
    let in_range = |n: i64| (1..=65_535).contains(&n);
    match v {
        Value::Number(n) => match n.as_i64() {
            Some(n) if in_range(n) => Ok(()),
            _ => Err(format!("port {n} invalid: 1 to 65535")),
        },
        Value::String(s) => match s.split_once(':') {
            Some((a, b)) => match (a.parse::<i64>(), b.parse::<i64>()) {
                (Ok(a), Ok(b)) if in_range(a) && in_range(b) && a <= b => Ok(()),
                _ => Err(format!("port range {s:?} invalid")),
            },
            None if s.parse::<i64>().is_ok_and(in_range) => Ok(()),
            None if numeric => Err(format!(
                "{s:?}: node port ranges should not contain named ports"
            )),
            None if !s.is_empty() => Ok(()),
            None => Err("empty port".into()),
        },
        other => Err(format!("expected a port, found {other}")),
    }
}

/// `{min, max}` of route tables: integers, min ≤ max.
fn range_pair(v: &Value) -> Result<(i64, i64), String> {
    let get = |k: &str| v.get(k).and_then(Value::as_i64);
    match (get("min"), get("max")) {
        (Some(min), Some(max)) if min <= max => Ok((min, max)),
        _ => Err(format!("expected {{min, max}} with min <= max, found {v}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(yaml: &str) -> Vec<String> {
        let map: BTreeMap<String, Value> = serde_saphyr::from_str(yaml).expect("yaml");
        let mut out = Vec::new();
        check(&map, |f, why| out.push(format!("{f}: {why}")));
        out
    }

    #[test]
    fn the_field_list_is_sorted_for_lookup() {
        assert!(FIELDS.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn values_calico_accepts_load() {
        let ok = "logSeverityScreen: info\nreportingInterval: 0s\niptablesRefreshInterval: 1m30.5s\n\
                  bpfLogLevel: ''\nipipEnabled: true\ndebugPort: 0\nprometheusMetricsHost: '::1'\n\
                  kubeNodePortRanges: [30000:32767, 8080]\nexternalNodesList: [10.0.0.0/8, 192.0.2.1]\n\
                  featureDetectOverride: 'SNATFullyRandom=true,MASQFullyRandom=false,'\n\
                  healthTimeoutOverrides: [{name: InternalDataplaneMainLoop, timeout: 30s}]\n\
                  routeTableRanges: [{min: 1, max: 250}]\nwireguardInterfaceName: wireguard.cali\n\
                  bpfLogFilters: {all: 'tcp port 80'}\nmtuIfacePattern: '^((en|wl|ww|sl|ib)[Popsx].*|(eth|wlan|wwan).*)'\n\
                  iptablesMarkMask: 0xff000000\nlogActionRateLimit: 5/minute\nopenstackRegion: region-one\n";
        assert_eq!(refused(ok), Vec::<String>::new());
    }

    #[test]
    fn values_calico_refuses_are_refused_by_field() {
        for (yaml, field) in [
            ("logSeverityScreen: Verbose", "spec.logSeverityScreen"),
            ("reportingInterval: 30", "spec.reportingInterval"),
            ("reportingInterval: 30sec", "spec.reportingInterval"),
            ("ipipEnabled: 'yes'", "spec.ipipEnabled"),
            ("wireguardListeningPort: 0", "spec.wireguardListeningPort"),
            (
                "wireguardRoutingRulePriority: 32766",
                "spec.wireguardRoutingRulePriority",
            ),
            ("goGCThreshold: -2", "spec.goGCThreshold"),
            ("prometheusMetricsHost: 'a b'", "spec.prometheusMetricsHost"),
            ("kubeNodePortRanges: [http]", "spec.kubeNodePortRanges"),
            ("kubeNodePortRanges: ['2:1']", "spec.kubeNodePortRanges"),
            (
                "externalNodesList: ['2001:db8::/32']",
                "spec.externalNodesList",
            ),
            ("bpfDSROptoutCIDRs: [10.0.0.0/33]", "spec.bpfDSROptoutCIDRs"),
            (
                "natOutgoingAddress: '2001:db8::1'",
                "spec.natOutgoingAddress",
            ),
            (
                "deviceRouteSourceAddressIPv6: 192.0.2.1",
                "spec.deviceRouteSourceAddressIPv6",
            ),
            (
                "featureDetectOverride: 'a-b=true'",
                "spec.featureDetectOverride",
            ),
            (
                "logDebugFilenameRegex: '(unclosed'",
                "spec.logDebugFilenameRegex",
            ),
            (
                "wireguardInterfaceName: 'much-too-long-name0'",
                "spec.wireguardInterfaceName",
            ),
            ("serviceLoopPrevention: drop", "spec.serviceLoopPrevention"),
            (
                "routeTableRanges: [{min: 1, max: 70000}]",
                "spec.routeTableRanges",
            ),
            ("openstackRegion: Region_One", "spec.openstackRegion"),
            ("logActionRateLimit: 0/second", "spec.logActionRateLimit"),
            (
                "healthTimeoutOverrides: [{name: x}]",
                "spec.healthTimeoutOverrides",
            ),
            (
                "healthTimeoutOverrides: [{name: 'a/b', timeout: 1s}]",
                "spec.healthTimeoutOverrides",
            ),
            ("noSuchField: 1", "spec.noSuchField"),
        ] {
            let errors = refused(yaml);
            assert_eq!(errors.len(), 1, "{yaml}: {errors:?}");
            assert!(
                errors[0].starts_with(&format!("{field}: ")),
                "{yaml}: {errors:?}"
            );
        }
    }
}
