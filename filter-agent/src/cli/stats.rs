//! `filter-agent stats`: per-rule packet and byte counters by policy and
//! rule, and per-reason packet counts, read from a running agent's pins.
//!
//! Counter slots are numbered per table and generation; which rule a slot
//! holds is known only to the agent that compiled it, so after every apply
//! the agent writes `rules.json` into its state directory (bpffs holds no
//! regular files). `stats` joins that file with the pinned per-CPU maps.
//! Counters count from the moment their policy version went live.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::ValueEnum;
use filter_common::{action, reason};
use serde::{Deserialize, Serialize};

use crate::{
    compile::{Compiled, Owner},
    dataplane::{self, PinnedCounters},
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

/// The state directory of an agent pinned at `pin_dir`.
pub fn default_state_dir(pin_dir: &Path) -> PathBuf {
    let name = pin_dir.file_name().map_or_else(
        || "filter-agent".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    Path::new("/run/filter-agent").join(name)
}

/// One rule slot of the live generation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct SlotInfo {
    /// Counter slot.
    pub slot: u32,
    /// untracked, pre-dnat, normal, forward.
    pub stage: String,
    /// ingress or egress.
    pub direction: String,
    /// allow, deny, log, pass.
    pub action: String,
    /// policy, tier-default-action, profile, no-profile-allowed.
    pub kind: String,
    /// Tier, for policy rules and tier ends.
    pub tier: Option<String>,
    /// Policy or profile name.
    pub policy: Option<String>,
    /// Rule index in its policy or profile.
    pub rule: Option<usize>,
}

/// `rules.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateFile {
    /// The live generation.
    pub generation: u32,
    /// Every rule slot of it.
    pub rules: Vec<SlotInfo>,
    /// Interfaces with programs, and how XDP runs on each.
    #[serde(default)]
    pub interfaces: Vec<InterfaceInfo>,
}

/// One interface the agent attached programs to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InterfaceInfo {
    /// Name.
    pub name: String,
    /// Index.
    pub ifindex: u32,
    /// `native`, `generic`, `adopted` (attached by a previous agent), or
    /// `none` (not a host endpoint: TC egress only, for the forward stage).
    pub xdp_mode: String,
}

/// What `compiled`, live as `generation`, puts in each counter slot, and
/// the `attachments` (name, index, XDP mode).
pub fn state(
    compiled: &Compiled,
    generation: u32,
    attachments: &[(String, u32, &str)],
) -> StateFile {
    let mut rules = Vec::new();
    let first_slots = crate::dataplane::first_slots(compiled, generation);
    for (t, first_slot) in compiled.tables.iter().zip(first_slots) {
        let stage = filter_common::Stage::from_u32(t.stage).map_or("?", |s| s.name());
        let direction = filter_common::Direction::from_u32(t.direction).map_or("?", |d| d.name());
        for (i, r) in t.rules.iter().enumerate() {
            let (kind, tier, policy, rule) = match &compiled.owners[r.owner as usize] {
                Owner::Policy { tier, policy, rule } => (
                    "policy",
                    Some(tier.clone()),
                    Some(policy.clone()),
                    Some(*rule),
                ),
                Owner::TierEnd { tier } => ("tier-default-action", Some(tier.clone()), None, None),
                Owner::Profile { profile, rule } => {
                    ("profile", None, Some(profile.clone()), Some(*rule))
                }
                Owner::NoProfileAllowed => ("no-profile-allowed", None, None, None),
            };
            let action = match r.action {
                action::ALLOW => "allow",
                action::DENY => "deny",
                action::LOG => "log",
                _ => "pass",
            };
            rules.push(SlotInfo {
                slot: first_slot + i as u32,
                stage: stage.into(),
                direction: direction.into(),
                action: action.into(),
                kind: kind.into(),
                tier,
                policy,
                rule,
            });
        }
    }
    let interfaces = attachments
        .iter()
        .map(|(name, ifindex, mode)| InterfaceInfo {
            name: name.clone(),
            ifindex: *ifindex,
            xdp_mode: (*mode).to_owned(),
        })
        .collect();
    StateFile {
        generation,
        rules,
        interfaces,
    }
}

/// Writes `rules.json` atomically (a reader never sees half of it).
pub fn write_state(dir: &Path, state: &StateFile) -> std::io::Result<()> {
    // Root's alone: it names every policy and rule of the node.
    crate::private::ensure_dir(dir).map_err(std::io::Error::other)?;
    crate::private::write_file(&dir.join("rules.json"), &serde_json::to_vec(state)?)
}

/// Prints the counters; exit 2 when the agent's pins or state are missing.
pub fn run(args: StatsArgs) -> anyhow::Result<ExitCode> {
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| default_state_dir(&args.pin_dir));
    let file = state_dir.join("rules.json");
    let state: StateFile = match std::fs::read(&file)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("filter-agent stats: {}: {e} (is the agent running with this --pin-dir/--state-dir?)", file.display());
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
