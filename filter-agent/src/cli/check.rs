//! `filter-agent check`: validate files, print every error.

use std::process::ExitCode;

use crate::model::Store;

use super::CheckArgs;

/// Validates every path; exit 1 if any error.
pub fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let mut all_errors = Vec::new();
    let mut loaded = 0;
    for path in &args.paths {
        let result = if path.is_dir() {
            Store::load_dir(path)
        } else {
            Store::load_files(std::slice::from_ref(path))
        };
        match result {
            Ok(store) => {
                if !store.network_policies.is_empty() {
                    eprintln!(
                        "warning: {}: {} NetworkPolicy resource(s) select pods, never host endpoints: valid, but not enforced by this firewall",
                        path.display(),
                        store.network_policies.len()
                    );
                }
                loaded += store.global_policies.len()
                    + store.network_policies.len()
                    + store.host_endpoints.len()
                    + store.global_network_sets.len()
            }
            Err(errors) => all_errors.extend(errors),
        }
    }
    for e in &all_errors {
        println!("{e}");
    }
    if all_errors.is_empty() {
        eprintln!("ok: {loaded} resources valid");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{} error(s)", all_errors.len());
        Ok(ExitCode::from(1))
    }
}
