//! Service frontends: the (address, protocol, port) triples kube-proxy
//! rewrites, so traffic to them is forwarded, not host-bound (docs/design.md,
//! "Kernel side"; issue: NodePort on every node address,
//! LoadBalancer ingress IPs, external IPs).

use std::{collections::BTreeSet, net::IpAddr};

use crate::model::Store;

/// One frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Frontend {
    /// Address the client uses.
    pub addr: IpAddr,
    /// 6, 17 or 132.
    pub proto: u8,
    /// Port the client uses.
    pub port: u16,
}

/// Every frontend of the store's Services on a node with addresses
/// `node_addrs`. ClusterIPs are not frontends of the host: they never
/// arrive on a host endpoint addressed to the node.
pub fn frontends(store: &Store, node_addrs: &BTreeSet<IpAddr>) -> Vec<Frontend> {
    let mut out = BTreeSet::new();
    for svc in &store.services {
        let kind = svc.spec.kind.as_deref().unwrap_or("ClusterIP");
        let lbs: Vec<IpAddr> = svc
            .status
            .load_balancer
            .ingress
            .iter()
            .filter_map(|i| i.ip.as_deref()?.parse().ok())
            .collect();
        let externals: Vec<IpAddr> = svc
            .spec
            .external_ips
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        for p in &svc.spec.ports {
            let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                "UDP" => 17,
                "SCTP" => 132,
                _ => 6,
            };
            if let (Some(node_port), "NodePort" | "LoadBalancer") = (p.node_port, kind) {
                for &addr in node_addrs {
                    out.insert(Frontend {
                        addr,
                        proto,
                        port: node_port,
                    });
                }
            }
            let extra = if kind == "LoadBalancer" {
                &lbs[..]
            } else {
                &[]
            };
            for &addr in extra.iter().chain(&externals) {
                out.insert(Frontend {
                    addr,
                    proto,
                    port: p.port,
                });
            }
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn node_ports_on_every_node_address_plus_lb_and_external_ips() {
        let yaml = [
            "apiVersion: v1",
            "kind: Service",
            "metadata: {name: web, namespace: default}",
            "spec:",
            "  type: LoadBalancer",
            "  clusterIP: 10.96.0.10",
            "  externalIPs: [198.51.100.99]",
            "  selector: {app: web}",
            "  ports:",
            "  - {port: 80, targetPort: 8080, nodePort: 30080}",
            "  - {protocol: UDP, port: 53, nodePort: 30053}",
            "status:",
            "  loadBalancer:",
            "    ingress: [{ip: 203.0.113.80}, {hostname: lb.example}]",
            "---",
            "apiVersion: v1",
            "kind: Service",
            "metadata: {name: internal}",
            "spec: {ports: [{port: 443}]}",
        ]
        .join("\n");
        let mut store = Store::default();
        let mut errors = Vec::new();
        store.add_text(Path::new("svc.yaml"), &yaml, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let node: BTreeSet<IpAddr> = ["192.0.2.1", "2001:db8::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let f = frontends(&store, &node);
        let has = |a: &str, proto, port| {
            f.contains(&Frontend {
                addr: a.parse().unwrap(),
                proto,
                port,
            })
        };
        assert!(has("192.0.2.1", 6, 30080) && has("2001:db8::1", 6, 30080));
        assert!(has("192.0.2.1", 17, 30053));
        assert!(has("203.0.113.80", 6, 80) && has("198.51.100.99", 17, 53));
        assert_eq!(f.len(), 8, "{f:#?}");
    }
}
