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
