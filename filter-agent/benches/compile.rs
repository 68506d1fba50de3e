//! Compile time and table sizes (`cargo xtask bench`): 1k and 10k rules
//! with 100k CIDRs, each size compiled several times, median reported.
//! Not a test: it prints numbers for docs/performance.md.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, time::Instant};

use filter_agent::{
    compile::{self, Node},
    model::{
        Action, Cidr, EntityRule, GlobalNetworkPolicySpec, HostEndpointSpec, Metadata, Origin,
        Port, Protocol, Resource, Rule, Store,
    },
    selector::Written,
};

fn resource<S>(name: &str, labels: &[(&str, &str)], spec: S) -> Resource<S> {
    Resource {
        meta: Metadata {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        },
        spec,
        origin: Origin {
            file: PathBuf::from("bench"),
            line: 1,
        },
        source: Default::default(),
    }
}

/// `rules` pre-DNAT rules in policies of 10, `cidrs` distinct source CIDRs
/// spread over them (a mix of /32 and /24), a port range per rule.
fn store(rules: usize, cidrs: usize) -> Store {
    let mut s = Store::default();
    s.host_endpoints.push(resource(
        "hep",
        &[("role", "pub")],
        HostEndpointSpec {
            node: "n1".into(),
            interface_name: "eth1".into(),
            ..Default::default()
        },
    ));
    let per_rule = cidrs.div_ceil(rules);
    let mut next = 0u32;
    for p in 0..rules / 10 {
        let mut spec = GlobalNetworkPolicySpec {
            pre_dnat: true,
            apply_on_forward: true,
            order: Some(p as f64),
            selector: Some(Written::new("role == 'pub'").expect("selector")),
            ..Default::default()
        };
        for r in 0..10 {
            let nets = (0..per_rule)
                .map(|i| {
                    next += 1;
                    // 10.0.0.0/8 and 100.64.0.0/10 as /32s, every 7th a /24.
                    let a = 0x0a00_0000u32 + next * 256;
                    let len = if i % 7 == 0 { 24 } else { 32 };
                    Cidr(
                        ipnetwork::IpNetwork::new(Ipv4Addr::from(a + (i as u32 % 200)).into(), len)
                            .map(|n| ipnetwork::IpNetwork::new(n.network(), len).expect("valid"))
                            .expect("valid"),
                    )
                })
                .collect();
            let first = 1000 + ((p * 10 + r) % 6000) as u16 * 10;
            spec.ingress.push(std::sync::Arc::new(Rule {
                action: if r % 3 == 0 {
                    Action::Allow
                } else {
                    Action::Deny
                },
                protocol: Some(Protocol(if r % 2 == 0 { 6 } else { 17 })),
                source: EntityRule {
                    nets,
                    ..Default::default()
                },
                destination: EntityRule {
                    ports: vec![Port::Range {
                        first,
                        last: first + 99,
                    }],
                    ..Default::default()
                },
                ..Default::default()
            }));
        }
        s.global_policies
            .push(resource(&format!("p{p}"), &[], spec));
    }
    s
}

fn main() {
    let node = Node {
        name: "n1".into(),
        interfaces: BTreeMap::new(),
    };
    println!("## Compiling policy to classifier tables\n");
    println!("| rules | CIDRs | compile (median of 5) | src trie entries | port trie entries | classes | class words | kernel words |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (rules, cidrs) in [(1_000, 100_000), (10_000, 100_000)] {
        let s = store(rules, cidrs);
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..5 {
            let t = Instant::now();
            let c = compile::compile(&s, &node).expect("compiles");
            times.push(t.elapsed());
            last = Some(c);
        }
        times.sort();
        let c = last.expect("ran");
        let t = c.table(
            filter_common::stage::PRE_DNAT,
            filter_common::direction::INGRESS,
        );
        let words: usize = c.classes.iter().map(|x| x.words().len()).sum();
        let stored = match filter_agent::dataplane::class_storage(&c) {
            Ok((_, stored)) => stored.to_string(),
            Err(e) => format!("does not fit: {e}"),
        };
        println!(
            "| {rules} | {cidrs} | {:.0} ms | {} | {} | {} | {words} | {stored} |",
            times[2].as_secs_f64() * 1e3,
            t.src_v4.len(),
            t.dports.len(),
            c.classes.len()
        );
    }
}
