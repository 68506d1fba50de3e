//! `filter-agent stats`: per-rule packet and byte counters by policy and
//! rule, and per-reason packet counts, read from a running agent's pins.
//!
//! `stats` joins the running agent's `rules.json` (crate::state: which rule
//! each counter slot holds) with the pinned per-CPU maps. Counters count
//! from the moment their policy version went live.

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use clap::ValueEnum;
use filter_common::reason;

use crate::{
    dataplane::{self, PinnedCounters},
    state::{default_state_dir, SlotInfo, StateFile},
};

/// Text or JSON.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    /// A table.
    Text,
    /// One JSON object.
    Json,
}

/// Arguments of `stats`.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// The agent's bpffs pin directory.
    #[arg(long, default_value = dataplane::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// The agent's state directory [default: /run/filter-agent/<pin dir name>].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Prints the counters; exit 2 when the agent's pins or state are missing.
pub fn run(args: StatsArgs) -> anyhow::Result<ExitCode> {
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| default_state_dir(&args.pin_dir));
    let state: StateFile = match crate::state::read_state(&state_dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("filter-agent stats: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let counters = match PinnedCounters::open(&args.pin_dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("filter-agent stats: {:#}", anyhow::Error::from(e));
            return Ok(ExitCode::from(2));
        }
    };
    // Parts of one rule (named ports split a rule) count together: the key
    // is the slot's description without the slot; rows keep the first slot's
    // place.
    let mut totals: BTreeMap<SlotInfo, (u64, u64, u32)> = BTreeMap::new();
    for s in &state.rules {
        let c = counters.rule(s.slot)?;
        let e = totals
            .entry(SlotInfo {
                slot: 0,
                ..s.clone()
            })
            .or_insert((0, 0, s.slot));
        e.0 += c.packets;
        e.1 += c.bytes;
    }
    let mut rows: Vec<_> = totals.into_iter().collect();
    rows.sort_by_key(|(_, (_, _, slot))| *slot);
    let reasons = counters.reasons()?;
    let ct = crate::dataplane::conntrack::pinned_occupancy(&args.pin_dir)?;
    match args.output {
        Output::Json => {
            let rules: Vec<serde_json::Value> = rows
                .iter()
                .map(|(s, (packets, bytes, _))| {
                    serde_json::json!({"stage": s.stage, "direction": s.direction, "kind": s.kind, "action": s.action,
                        "tier": s.tier, "policy": s.policy, "rule": s.rule, "packets": packets, "bytes": bytes})
                })
                .collect();
            let reasons: serde_json::Map<String, serde_json::Value> = reason::NAMES
                .iter()
                .map(|(i, n)| (n.to_string(), serde_json::json!(reasons[*i as usize])))
                .collect();
            println!(
                "{}",
                serde_json::json!({"generation": state.generation, "rules": rules, "reasons": reasons,
                    "conntrack": {"entries": ct.entries, "assured": ct.assured, "capacity": ct.capacity},
                    "interfaces": state.interfaces.iter().map(|i| serde_json::json!({"name": i.name, "ifindex": i.ifindex, "xdp_mode": i.xdp_mode})).collect::<Vec<_>>()})
            );
        }
        Output::Text => {
            println!(
                "{:<9} {:<8} {:<6} {:>10} {:>12}  rule",
                "stage", "dir", "action", "packets", "bytes"
            );
            for (s, (packets, bytes, _)) in &rows {
                let (stage, direction, action) = (&s.stage, &s.direction, &s.action);
                let who = match (s.kind.as_str(), &s.tier, &s.policy, s.rule) {
                    ("policy", Some(t), Some(p), Some(r)) => {
                        format!("tier {t}, policy {p}, rule {r}")
                    }
                    ("profile", _, Some(p), Some(r)) => format!("profile {p}, rule {r}"),
                    ("tier-default-action", Some(t), _, _) => format!("tier {t}: default action"),
                    _ => "no profile allowed".into(),
                };
                println!("{stage:<9} {direction:<8} {action:<6} {packets:>10} {bytes:>12}  {who}");
            }
            let line: Vec<String> = reason::NAMES
                .iter()
                .map(|(i, n)| format!("{n}={}", reasons[*i as usize]))
                .collect();
            println!("packets by reason: {}", line.join(" "));
            println!(
                "conntrack: {} live entries ({} assured), {} per table",
                ct.entries, ct.assured, ct.capacity
            );
            for i in &state.interfaces {
                println!("interface {} ({}): XDP {}", i.name, i.ifindex, i.xdp_mode);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
