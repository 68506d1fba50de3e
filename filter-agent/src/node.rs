//! This node: its name and its interfaces, read from the system.

use std::{collections::BTreeMap, net::IpAddr};

/// The node name: the flag, then `NODE_NAME`, then the hostname.
pub fn node_name(flag: Option<&str>) -> String {
    if let Some(n) = flag.filter(|n| !n.is_empty()) {
        return n.to_owned();
    }
    if let Ok(n) = std::env::var("NODE_NAME") {
        if !n.is_empty() {
            return n;
        }
    }
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Interfaces of the agent's network namespace: name → (index, addresses).
pub fn interfaces() -> BTreeMap<String, (u32, Vec<IpAddr>)> {
    let mut out: BTreeMap<String, (u32, Vec<IpAddr>)> = BTreeMap::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for a in addrs {
        let entry = out.entry(a.interface_name.clone()).or_insert_with(|| {
            let index = nix::net::if_::if_nametoindex(a.interface_name.as_str()).unwrap_or(0);
            (index, Vec::new())
        });
        let ip = a.address.as_ref().and_then(|s| {
            s.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        });
        if let Some(ip) = ip {
            entry.1.push(ip);
        }
    }
    out.retain(|_, (index, _)| *index != 0);
    // Sorted, so two reads of the same state compare equal.
    for (_, addrs) in out.values_mut() {
        addrs.sort();
        addrs.dedup();
    }
    out
}
