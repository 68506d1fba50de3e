//! `filter-agent status`: what the running agent enforces and how it is
//! doing, from its state directory and pins: interfaces with their
//! endpoint and XDP mode, the live generation, rules and classes against
//! capacity, conntrack occupancy, the last apply and the last refusal.

use std::process::ExitCode;

use filter_common::{CLASSES_PER_GEN, RULE_SLOTS_PER_GEN};

use super::stats::{Output, StatsArgs};
use crate::state::{default_state_dir, Event};

/// Prints the status; exit 2 when the agent's pins or state are missing.
pub fn run(args: StatsArgs) -> anyhow::Result<ExitCode> {
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| default_state_dir(&args.pin_dir));
    let state = match crate::state::read_state(&state_dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("filter-agent status: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let ct = match crate::dataplane::conntrack::pinned_occupancy(&args.pin_dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("filter-agent status: {:#}", anyhow::Error::from(e));
            return Ok(ExitCode::from(2));
        }
    };
    let policies: std::collections::BTreeSet<(&str, &str)> = state
        .rules
        .iter()
        .filter(|r| r.kind == "policy")
        .filter_map(|r| Some((r.tier.as_deref()?, r.policy.as_deref()?)))
        .collect();
    let event = |e: &Option<Event>| {
        e.as_ref()
            .map(|e| serde_json::json!({"at": e.at, "took_seconds": e.took, "message": e.message}))
    };
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "generation": state.generation,
                "interfaces": state.interfaces.iter().map(|i| serde_json::json!({
                    "name": i.name, "ifindex": i.ifindex, "endpoint": i.endpoint, "xdp_mode": i.xdp_mode,
                })).collect::<Vec<_>>(),
                "policies": policies.len(),
                "rules": {"used": state.rules.len(), "capacity": RULE_SLOTS_PER_GEN},
                "classes": {"used": state.classes, "capacity": CLASSES_PER_GEN},
                "conntrack": {"entries": ct.entries, "assured": ct.assured, "capacity": ct.capacity},
                "last_apply": event(&state.last_apply),
                "last_error": event(&state.last_error),
            })
        ),
        Output::Text => {
            println!("generation {} live", state.generation);
            for i in &state.interfaces {
                let endpoint = i.endpoint.as_deref().unwrap_or("no host endpoint");
                println!(
                    "interface {} ({}): {endpoint}, XDP {}",
                    i.name, i.ifindex, i.xdp_mode
                );
            }
            println!(
                "{} policies, {} of {RULE_SLOTS_PER_GEN} rule slots, {} of {CLASSES_PER_GEN} classes",
                policies.len(),
                state.rules.len(),
                state.classes
            );
            println!(
                "conntrack: {} live entries ({} assured), {} per table",
                ct.entries, ct.assured, ct.capacity
            );
            let ago = |at: f64| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                format!("{:.0} s ago", (now - at).max(0.0))
            };
            if let Some(e) = &state.last_apply {
                println!("last apply: {}, took {:.3} s", ago(e.at), e.took);
            }
            match &state.last_error {
                Some(e) => println!(
                    "last refusal: {}: {} (the last good policy stays enforced)",
                    ago(e.at),
                    e.message.as_deref().unwrap_or("?")
                ),
                None => println!("no refusal since the last apply"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
