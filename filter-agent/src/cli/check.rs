//! `filter-agent check`: the complete pre-flight of a policy. Every file is
//! loaded and validated, then compiled for every node its host endpoints
//! name (and for a node without endpoints) and checked against the kernel
//! tables' capacity: whatever `run` would refuse, `check` refuses, with the
//! same message.

use std::{collections::BTreeSet, process::ExitCode};

use crate::{
    compile::{self, Node},
    dataplane,
    model::Store,
};

use super::CheckArgs;

/// Checks every path; exit 1 if any error.
pub fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let mut errors: Vec<String> = Vec::new();
    let mut counts = Counts::default();
    for path in &args.paths {
        let result = if path.is_dir() {
            Store::load_dir(path)
        } else {
            Store::load_files(std::slice::from_ref(path))
        };
        let store = match result {
            Ok(store) => store,
            Err(e) => {
                errors.extend(e.iter().map(|e| e.to_string()));
                continue;
            }
        };
        if !store.network_policies.is_empty() {
            eprintln!(
                "warning: {}: {} NetworkPolicy resource(s) select pods, never host endpoints: valid, but not enforced by this firewall",
                path.display(),
                store.network_policies.len()
            );
        }
        counts.add(&store);
        errors.extend(preflight(&store, path));
    }
    for e in &errors {
        println!("{e}");
    }
    if errors.is_empty() {
        eprintln!("ok: {}", counts.summary());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{} error(s)", errors.len());
        Ok(ExitCode::from(1))
    }
}

/// What `run` would refuse after loading: compile-time refusals (their
/// messages name file and line) and the kernel tables' capacity (named by
/// the `path` checked), for every node the store's endpoints name.
fn preflight(store: &Store, path: &std::path::Path) -> Vec<String> {
    let mut nodes: BTreeSet<String> = store
        .host_endpoints
        .iter()
        .map(|h| h.spec.node.clone())
        .collect();
    // Policies alone still compile (and may still not fit).
    nodes.insert(String::new());
    let mut errors: BTreeSet<String> = compile::unsupported_rules(store)
        .iter()
        .map(|e| e.to_string())
        .collect();
    for name in nodes {
        let node = Node {
            name,
            ..Default::default()
        };
        match compile::compile(store, &node) {
            Ok(compiled) => {
                if let Err(e) = dataplane::preflight(&compiled) {
                    errors.insert(format!("{}: {:#}", path.display(), anyhow::Error::from(e)));
                }
            }
            Err(e) => {
                errors.insert(e.to_string());
            }
        }
    }
    errors.into_iter().collect()
}

/// Resources loaded, by kind.
#[derive(Default)]
struct Counts {
    kinds: [(&'static str, usize); 9],
}

impl Counts {
    fn add(&mut self, s: &Store) {
        let n = [
            ("GlobalNetworkPolicy", s.global_policies.len()),
            ("NetworkPolicy", s.network_policies.len()),
            ("HostEndpoint", s.host_endpoints.len()),
            ("GlobalNetworkSet", s.global_network_sets.len()),
            ("NetworkSet", s.network_sets.len()),
            ("Tier", s.tiers.len()),
            ("Profile", s.profiles.len()),
            ("FelixConfiguration", s.felix_configs.len()),
            ("Service", s.services.len()),
        ];
        for (slot, (kind, count)) in self.kinds.iter_mut().zip(n) {
            *slot = (kind, slot.1 + count);
        }
    }

    /// "N resources valid (2 GlobalNetworkPolicy, 1 HostEndpoint, …)".
    fn summary(&self) -> String {
        let total: usize = self.kinds.iter().map(|(_, n)| n).sum();
        let parts: Vec<String> = self
            .kinds
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        format!("{total} resources valid ({})", parts.join(", "))
    }
}
