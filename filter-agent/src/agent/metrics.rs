//! `/metrics`: what the agent and its kernel programs did, for Prometheus
//! (prometheus-client's text encoding). Names start with `filter_`.
//!
//! The agent's own events (applies, their errors and durations, the time
//! of the last good one, conntrack occupancy) are kept in [`Metrics`] as
//! they happen; the kernel's counters (per rule, per reason, Log records)
//! are read from the pinned maps at each scrape, as `filter-agent stats`
//! reads them, and named by the rules of the live generation.

use std::{
    path::Path,
    sync::{atomic::AtomicU64, Arc, Mutex},
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{dataplane, state::StateFile};

/// The agent's own metrics, shared with the scrape handler. Clones share
/// them.
#[derive(Clone)]
pub struct Metrics {
    applies: Counter,
    apply_errors: Counter,
    apply_seconds: Histogram,
    last_good_apply: Gauge<f64, AtomicU64>,
    conntrack_entries: Gauge,
    conntrack_capacity: Gauge,
    source_stale_since: Gauge<f64, AtomicU64>,
    /// The live generation's rules and interfaces.
    state: Arc<Mutex<Option<Arc<StateFile>>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            applies: Counter::default(),
            apply_errors: Counter::default(),
            // 1 ms to ~16 s.
            apply_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
            ),
            last_good_apply: Gauge::default(),
            conntrack_entries: Gauge::default(),
            conntrack_capacity: Gauge::default(),
            source_stale_since: Gauge::default(),
            state: Arc::default(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    tier: String,
    policy: String,
    rule: String,
    action: String,
    stage: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LogLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InterfaceLabels {
    interface: String,
    mode: String,
}

impl Metrics {
    /// A policy applied (or refused) after `seconds` of reading, compiling
    /// and publishing.
    pub fn applied(&self, ok: bool, seconds: f64, state: Option<Arc<StateFile>>) {
        self.applies.inc();
        self.apply_seconds.observe(seconds);
        if ok {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.last_good_apply.set(now);
            if let Some(s) = state {
                *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
            }
        } else {
            self.apply_errors.inc();
        }
    }

    /// Since when the Kubernetes API has been unreachable (Unix time), or
    /// 0 while it is not.
    pub fn source_stale(&self, since: Option<std::time::SystemTime>) {
        let t = since
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        self.source_stale_since.set(t);
    }

    /// Conntrack occupancy from the last sweep.
    pub fn conntrack(&self, entries: u64, capacity: u64) {
        self.conntrack_entries.set(entries as i64);
        self.conntrack_capacity.set(capacity as i64);
    }

    /// The text exposition, with the kernel's counters read from the pins
    /// under `pin_dir`.
    pub fn render(&self, pin_dir: &Path) -> Result<String, String> {
        let mut registry = Registry::with_prefix("filter");
        registry.register(
            "policy_applies",
            "Policy reloads applied or refused",
            self.applies.clone(),
        );
        registry.register(
            "policy_apply_errors",
            "Policy reloads refused (the last good policy stayed)",
            self.apply_errors.clone(),
        );
        registry.register(
            "policy_apply_duration_seconds",
            "Time to read, compile and publish a policy",
            self.apply_seconds.clone(),
        );
        registry.register(
            "policy_last_good_apply_timestamp_seconds",
            "When the policy in force was applied (Unix time)",
            self.last_good_apply.clone(),
        );
        registry.register(
            "policy_source_stale_since_timestamp_seconds",
            "Since when the Kubernetes API has been unreachable (0: it is not); the last good policy stays enforced meanwhile",
            self.source_stale_since.clone(),
        );
        registry.register(
            "conntrack_entries",
            "Live flows in the table of new flows at the last sweep",
            self.conntrack_entries.clone(),
        );
        registry.register(
            "conntrack_capacity",
            "Entries the table of new flows holds",
            self.conntrack_capacity.clone(),
        );
        let counters = dataplane::PinnedCounters::open(pin_dir).map_err(|e| e.to_string())?;
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let rule_packets = Family::<RuleLabels, Counter>::default();
        let rule_bytes = Family::<RuleLabels, Counter>::default();
        let log_records = Family::<LogLabels, Counter>::default();
        let xdp = Family::<InterfaceLabels, Gauge>::default();
        let slots_used = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        if let Some(state) = &state {
            slots_used.set(state.rules.len() as i64);
            for r in &state.rules {
                let c = counters.rule(r.slot).map_err(|e| e.to_string())?;
                let labels = RuleLabels {
                    tier: r.tier.clone().unwrap_or_default(),
                    policy: r.policy.clone().unwrap_or_default(),
                    rule: r.rule.map(|i| i.to_string()).unwrap_or_default(),
                    action: r.action.clone(),
                    stage: r.stage.clone(),
                    direction: r.direction.clone(),
                };
                rule_packets.get_or_create(&labels).inc_by(c.packets);
                rule_bytes.get_or_create(&labels).inc_by(c.bytes);
                if r.action == "log" {
                    let l = counters.log(r.slot).map_err(|e| e.to_string())?;
                    for (result, n) in [
                        ("emitted", l.emitted),
                        ("rate_limited", l.limited),
                        ("lost", l.lost),
                    ] {
                        log_records
                            .get_or_create(&LogLabels {
                                result: result.into(),
                            })
                            .inc_by(n);
                    }
                }
            }
            for i in &state.interfaces {
                xdp.get_or_create(&InterfaceLabels {
                    interface: i.name.clone(),
                    mode: i.xdp_mode.clone(),
                })
                .set(1);
            }
        }
        let reasons = Family::<ReasonLabels, Counter>::default();
        for (i, n) in counters
            .reasons()
            .map_err(|e| e.to_string())?
            .into_iter()
            .enumerate()
        {
            let Some(&(_, name)) = filter_common::reason::NAMES
                .iter()
                .find(|(code, _)| *code as usize == i)
            else {
                continue;
            };
            reasons
                .get_or_create(&ReasonLabels {
                    reason: name.into(),
                })
                .inc_by(n);
        }
        registry.register(
            "rule_packets",
            "Packets each rule decided (Log rules: packets they logged)",
            rule_packets,
        );
        registry.register("rule_bytes", "Bytes of those packets", rule_bytes);
        registry.register(
            "packets",
            "Packets by why the program returned what it did",
            reasons,
        );
        registry.register(
            "log_records",
            "Log records written, left out by the rate limit, or lost",
            log_records,
        );
        registry.register(
            "rule_slots_used",
            "Rule slots of the live generation in use",
            slots_used,
        );
        let capacity = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        capacity.set(i64::from(filter_common::RULE_SLOTS_PER_GEN));
        registry.register(
            "rule_slots_capacity",
            "Rule slots one generation holds",
            capacity,
        );
        registry.register(
            "xdp_mode",
            "Interfaces with programs, by how XDP runs on each (1 per interface)",
            xdp,
        );
        let mut text = String::new();
        encode(&mut text, &registry).map_err(|e| e.to_string())?;
        Ok(text)
    }
}
