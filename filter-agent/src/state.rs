//! The agent's state beside its pins: `rules.json`, which rule each
//! counter slot of the live generation holds, and the interfaces with
//! programs. Counter slots are numbered per table and generation; only the
//! agent that compiled the policy knows what they hold, so it writes this
//! file after every apply (bpffs holds no regular files) and `stats` reads
//! it. The directory and the file are root's alone (crate::private).

use std::path::{Path, PathBuf};

use filter_common::action;
use serde::{Deserialize, Serialize};

use crate::compile::{Compiled, Owner};

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
    /// Classes of the live generation (capacity `CLASSES_PER_GEN`).
    #[serde(default)]
    pub classes: usize,
    /// The last policy applied: when, and how long reading, compiling and
    /// publishing took.
    #[serde(default)]
    pub last_apply: Option<Event>,
    /// The last refusal since then (the last good policy stayed).
    #[serde(default)]
    pub last_error: Option<Event>,
}

/// An apply or a refusal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// When (Unix time, seconds).
    pub at: f64,
    /// How long it took (seconds).
    pub took: f64,
    /// What was wrong, for a refusal.
    #[serde(default)]
    pub message: Option<String>,
}

impl Event {
    /// An event that ends now, `took` seconds after it began.
    pub fn now(took: f64, message: Option<String>) -> Event {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Event { at, took, message }
    }
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
    /// The host endpoint that governs it, if any.
    #[serde(default)]
    pub endpoint: Option<String>,
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
                    Some(tier.to_string()),
                    Some(policy.to_string()),
                    Some(*rule),
                ),
                Owner::TierEnd { tier } => {
                    ("tier-default-action", Some(tier.to_string()), None, None)
                }
                Owner::Profile { profile, rule } => {
                    ("profile", None, Some(profile.to_string()), Some(*rule))
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
            endpoint: compiled
                .endpoints
                .iter()
                .find(|e| &e.iface == name)
                .map(|e| e.hep.clone()),
        })
        .collect();
    StateFile {
        generation,
        rules,
        interfaces,
        classes: compiled.classes.len(),
        last_apply: None,
        last_error: None,
    }
}

/// Reads the `rules.json` of the agent whose state directory is `dir`.
pub fn read_state(dir: &Path) -> Result<StateFile, String> {
    let file = dir.join("rules.json");
    std::fs::read(&file)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| {
            format!(
                "{}: {e} (is the agent running with this --pin-dir/--state-dir?)",
                file.display()
            )
        })
}

/// Writes `rules.json` atomically (a reader never sees half of it).
pub fn write_state(dir: &Path, state: &StateFile) -> std::io::Result<()> {
    // Root's alone: it names every policy and rule of the node.
    crate::private::ensure_dir(dir).map_err(std::io::Error::other)?;
    crate::private::write_file(&dir.join("rules.json"), &serde_json::to_vec(state)?)
}
