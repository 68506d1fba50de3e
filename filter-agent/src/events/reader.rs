//! The reader of Log records: drains the kernel's ring buffer as records
//! arrive (tokio, woken by the ring's epoll readiness; it never blocks the
//! programs: a slow or stopped reader only makes the kernel count records
//! lost) and prints each as the kernel's LOG line on standard output, where
//! `kubectl logs` shows it.

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use aya::maps::{MapData, RingBuf};
use filter_common::events::{hook, kind, Record};
use tokio::sync::watch;

use super::logline::{self, Context};
use crate::state::{SlotInfo, StateFile};

/// Calico's default `LogPrefix` (FelixConfiguration `logPrefix`).
pub const DEFAULT_PREFIX: &str = "calico-packet";

/// The prefix of drops logged with `--log-denied`: Calico has no such
/// records, so they are told apart from Log rules' lines.
pub const DENIED_PREFIX: &str = "calico-drop";

/// The kernel's LOG target takes at most 29 prefix characters.
const MAX_PREFIX: usize = 29;

/// What the reader needs to name a record: the rules of the live
/// generation and the one before (a record may be read after a flip), and
/// the prefix template. The rule indexes are the ones the agent wrote to
/// `rules.json`, shared rather than copied (10,000 rules a reload).
#[derive(Debug, Default)]
pub struct Names {
    live: Option<Arc<StateFile>>,
    previous: Option<Arc<StateFile>>,
    prefix: String,
}

/// [`Names`] shared between the agent's loop and the reader.
pub type SharedNames = Arc<Mutex<Names>>;

impl Names {
    /// After an apply: the new generation's rules and the prefix template
    /// (FelixConfiguration `logPrefix`, else [`DEFAULT_PREFIX`]).
    pub fn update(&mut self, state: &Arc<StateFile>, prefix: Option<&str>) {
        self.previous = self.live.replace(state.clone());
        self.prefix = prefix.unwrap_or(DEFAULT_PREFIX).to_owned();
    }

    fn slot(&self, slot: u32) -> Option<&SlotInfo> {
        find_slot(self.live.as_deref(), slot).or_else(|| find_slot(self.previous.as_deref(), slot))
    }
}

/// Rule slot `slot` of a generation's rule index, listed in slot order
/// (`state::state`).
fn find_slot(state: Option<&StateFile>, slot: u32) -> Option<&SlotInfo> {
    let rules = &state?.rules;
    let i = rules.binary_search_by_key(&slot, |r| r.slot).ok()?;
    Some(&rules[i])
}

/// The prefix of a record's line: `template` with Calico's expansions
/// (`%t` tier, `%k` kind, `%n` name, `%p` namespace/name), then `: `, at
/// most 29 characters as the kernel's LOG target keeps.
pub fn prefix(template: &str, rule: Option<&SlotInfo>) -> String {
    let tier = rule.and_then(|r| r.tier.as_deref()).unwrap_or("");
    let name = rule.and_then(|r| r.policy.as_deref()).unwrap_or("");
    let kind = match rule.map(|r| r.kind.as_str()) {
        Some("policy" | "tier-default-action") => "gnp",
        Some("profile") => "pro",
        _ => "",
    };
    let mut out = String::new();
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push_str(tier),
            Some('k') => out.push_str(kind),
            // Host endpoints meet global policies and profiles only: no
            // namespace to put in front of the name.
            Some('n' | 'p') => out.push_str(name),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out.push_str(": ");
    out.chars().take(MAX_PREFIX).collect()
}

/// The LOG line of one record and the rest of what `filter-agent logs`
/// says about it (time, stage, direction, verdict, tier, policy, rule, the
/// VLAN IDs of a tagged packet), or
/// `None` if the bytes are not a record.
pub fn entry_of(
    bytes: &[u8],
    names: &Names,
) -> Option<(String, serde_json::Map<String, serde_json::Value>)> {
    let rec = decode(bytes)?;
    let rule = names.slot(rec.slot);
    let vlan = vlan_ids(&rec);
    let line = line_of(&rec, &vlan, rule, names);
    let name = |n: Option<&'static str>| serde_json::json!(n.unwrap_or("?"));
    let mut extra = serde_json::Map::new();
    extra.insert("time".into(), serde_json::json!(wall_clock(rec.time_ns)));
    extra.insert(
        "stage".into(),
        name(filter_common::Stage::from_u32(rec.stage.into()).map(|s| s.name())),
    );
    extra.insert(
        "direction".into(),
        name(filter_common::Direction::from_u32(rec.direction.into()).map(|d| d.name())),
    );
    let verdict = match (rec.kind, rec.verdict) {
        (kind::DENIED, _) => "deny",
        _ => "log",
    };
    extra.insert("verdict".into(), serde_json::json!(verdict));
    extra.insert(
        "hook".into(),
        name(
            filter_common::events::hook::NAMES
                .get(usize::from(rec.hook))
                .copied(),
        ),
    );
    extra.insert(
        "tier".into(),
        serde_json::json!(rule.and_then(|r| r.tier.clone())),
    );
    extra.insert(
        "policy".into(),
        serde_json::json!(rule.and_then(|r| r.policy.clone())),
    );
    extra.insert("rule".into(), serde_json::json!(rule.and_then(|r| r.rule)));
    if !vlan.is_empty() {
        extra.insert("vlan".into(), serde_json::json!(vlan));
    }
    Some((line, extra))
}

/// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) as Unix time in seconds.
fn wall_clock(ktime_ns: u64) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9);
    now - (mono - ktime_ns as f64 / 1e9)
}

/// The record in `bytes`, or `None` if they are not one.
fn decode(bytes: &[u8]) -> Option<Record> {
    if bytes.len() < std::mem::size_of::<Record>() {
        return None;
    }
    // SAFETY: `Record` is plain integers (repr(C), no padding), any bit
    // pattern is one, and the length was checked.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const Record) })
}

/// The LOG line of `rec` (whose packet has the VLAN tags `tags`, outer
/// first), written by `rule`.
fn line_of(rec: &Record, tags: &[u16], rule: Option<&SlotInfo>, names: &Names) -> String {
    let template = if rec.kind == kind::DENIED {
        DENIED_PREFIX
    } else {
        names.prefix.as_str()
    };
    let frame = frame_of(rec);
    let ip_len = logline::ip_length(frame, rec.packet_len as usize);
    // The VLAN tags belong to the interface the hook runs on: the one a
    // packet came in by, or at TC egress the one it leaves by.
    let (in_tags, out_tags): (&[u16], &[u16]) = if rec.hook == hook::TC_EGRESS {
        (&[], tags)
    } else {
        (tags, &[])
    };
    logline::line(
        &Context {
            prefix: &prefix(template, rule),
            in_if: &interface(rec.in_ifindex, in_tags),
            out_if: &interface(rec.out_ifindex, out_tags),
        },
        frame,
        ip_len,
    )
}

/// The packet's first bytes in `rec`.
fn frame_of(rec: &Record) -> &[u8] {
    &rec.data[..usize::from(rec.captured).min(rec.data.len())]
}

/// The VLAN IDs of the packet's tags, outer first: the one the kernel took
/// out of the frame before TC (the record has it), then any in the frame.
fn vlan_ids(rec: &Record) -> Vec<u16> {
    let mut ids = Vec::new();
    if rec.vlan_proto != 0 {
        ids.push(rec.vlan_tci & 0x0fff);
    }
    ids.extend(logline::vlan_ids(frame_of(rec)));
    ids
}

/// The name the kernel's stack gives a packet on interface `ifindex` with
/// VLAN tags `vlan_ids` (outer first): the VLAN sub-interface of each tag
/// in turn (`eth1` with tag 100 is `eth1.100`, whatever its name), as far
/// as one exists. Empty for 0; the index if the interface is gone.
pub fn interface(ifindex: u32, vlan_ids: &[u16]) -> String {
    if ifindex == 0 {
        return String::new();
    }
    let Ok(name) = nix::net::if_::if_indextoname(ifindex) else {
        return ifindex.to_string();
    };
    let mut name = name.to_string_lossy().into_owned();
    if vlan_ids.is_empty() {
        return name;
    }
    // The 8021q module lists its devices (it is loaded whenever one
    // exists); a tag without a device leaves the packet on its parent,
    // where the kernel drops it unless the ID is 0 (a priority tag).
    let config = std::fs::read_to_string("/proc/net/vlan/config").unwrap_or_default();
    for &id in vlan_ids {
        match vlan_child(&config, &name, id) {
            Some(child) => name = child,
            None => break,
        }
    }
    name
}

/// In `/proc/net/vlan/config` (`name | id | parent` per device, after two
/// header lines), the VLAN device of `parent` with `id`. (The file does not
/// say 802.1Q or 802.1ad: two devices of one parent with the same ID and
/// different protocols cannot be told apart here.)
fn vlan_child(config: &str, parent: &str, id: u16) -> Option<String> {
    config.lines().skip(2).find_map(|line| {
        let mut cols = line.split('|').map(str::trim);
        let (name, vid, dev) = (cols.next()?, cols.next()?, cols.next()?);
        (dev == parent && vid.parse() == Ok(id)).then(|| name.to_owned())
    })
}

/// Reads records until `stop` turns true, printing a line for each.
pub async fn run(
    ring: RingBuf<MapData>,
    names: SharedNames,
    hub: Arc<super::stream::Hub>,
    syslog: Option<std::path::PathBuf>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // A datagram per line, as syslog(3) sends them; the socket is
    // non-blocking: a stalled syslog daemon loses lines, not the reader.
    let syslog = match syslog {
        Some(path) => {
            let s = std::os::unix::net::UnixDatagram::unbound()?;
            s.set_nonblocking(true)?;
            Some((s, path))
        }
        None => None,
    };
    super::drain_until_stopped(ring, stop, |ring| {
        let mut out = std::io::stdout().lock();
        while let Some(item) = ring.next() {
            let names = names.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((line, extra)) = entry_of(&item, &names) {
                let line = line.trim_end();
                // A closed standard output ends nothing else.
                let _ = writeln!(out, "{line}");
                if let Some((s, path)) = &syslog {
                    // Facility kern (0), level notice (5).
                    let _ = s.send_to(format!("<5>{line}").as_bytes(), path);
                }
                hub.publish(&super::stream::record(line, extra));
            }
        }
        let _ = out.flush();
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(tier: &str, policy: &str) -> SlotInfo {
        SlotInfo {
            slot: 7,
            stage: "normal".into(),
            direction: "ingress".into(),
            action: "log".into(),
            kind: "policy".into(),
            tier: Some(tier.into()),
            policy: Some(policy.into()),
            rule: Some(0),
        }
    }

    #[test]
    fn vlan_devices_are_found_by_parent_and_id() {
        let config = "VLAN Dev name\t | VLAN ID\n\
                      Name-Type: VLAN_NAME_TYPE_RAW_PLUS_VID_NO_PAD\n\
                      eth1.100       | 100  | eth1\n\
                      outer          | 10  | eth1\n\
                      outer.20       | 20  | outer\n";
        assert_eq!(vlan_child(config, "eth1", 100).as_deref(), Some("eth1.100"));
        assert_eq!(vlan_child(config, "eth1", 10).as_deref(), Some("outer"));
        assert_eq!(vlan_child(config, "outer", 20).as_deref(), Some("outer.20"));
        assert_eq!(vlan_child(config, "eth0", 100), None);
        assert_eq!(vlan_child(config, "eth1", 20), None);
        assert_eq!(vlan_child("", "eth1", 100), None);
    }

    #[test]
    fn prefixes_expand_and_stop_at_29_characters() {
        let r = rule("security", "deny-lb");
        assert_eq!(prefix("calico-packet", Some(&r)), "calico-packet: ");
        assert_eq!(prefix("%t/%k/%n", Some(&r)), "security/gnp/deny-lb: ");
        assert_eq!(prefix("100%", None), "100%: ");
        let long = prefix(
            "calico-packet %t %n",
            Some(&rule("a-long-tier", "a-long-policy")),
        );
        assert_eq!(long.chars().count(), 29);
        assert!(long.starts_with("calico-packet a-long-tier a-"), "{long}");
    }
}
