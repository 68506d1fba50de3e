//! Counters: packets per reason and per-rule packets and bytes, from the
//! agent's own maps or from the pins of a running agent.

use super::*;

/// Counters read from the pins of a running agent, from another process.
pub struct PinnedCounters {
    rules: PerCpuArray<MapData, RuleCounter>,
    stats: PerCpuArray<MapData, u64>,
    logs: PerCpuArray<MapData, filter_common::events::Counter>,
}

impl PinnedCounters {
    /// Opens the rule and reason counters pinned under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<PinnedCounters, Error> {
        let open = |name: &'static str| -> Result<aya::maps::Map, Error> {
            Ok(aya::maps::Map::PerCpuArray(open_map_pin(pin_dir, name)?))
        };
        let rules = PerCpuArray::try_from(open(names::MAP_RULE_COUNTERS)?)
            .map_err(map_error(names::MAP_RULE_COUNTERS, "open"))?;
        let stats = PerCpuArray::try_from(open(names::MAP_STATS)?)
            .map_err(map_error(names::MAP_STATS, "open"))?;
        let logs = PerCpuArray::try_from(open(names::MAP_LOG_COUNTERS)?)
            .map_err(map_error(names::MAP_LOG_COUNTERS, "open"))?;
        Ok(PinnedCounters { rules, stats, logs })
    }

    /// Packets and bytes of the rule in `slot`, summed over CPUs.
    pub fn rule(&self, slot: u32) -> Result<RuleCounter, Error> {
        let v = self
            .rules
            .get(&slot, 0)
            .map_err(map_error(names::MAP_RULE_COUNTERS, "get"))?;
        Ok(v.iter().fold(RuleCounter::default(), |a, c| RuleCounter {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        }))
    }

    /// Log records of the rule in `slot`: emitted, rate-limited, lost,
    /// summed over CPUs.
    pub fn log(&self, slot: u32) -> Result<filter_common::events::Counter, Error> {
        let v = self
            .logs
            .get(&slot, 0)
            .map_err(map_error(names::MAP_LOG_COUNTERS, "get"))?;
        Ok(v.iter()
            .fold(filter_common::events::Counter::default(), |a, c| {
                filter_common::events::Counter {
                    emitted: a.emitted + c.emitted,
                    limited: a.limited + c.limited,
                    lost: a.lost + c.lost,
                }
            }))
    }

    /// Packets per `filter_common::reason`, summed over CPUs.
    pub fn reasons(&self) -> Result<Vec<u64>, Error> {
        (0..filter_common::reason::COUNT)
            .map(|i| {
                self.stats
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .map_err(map_error(names::MAP_STATS, "get"))
            })
            .collect()
    }
}

impl Dataplane {
    /// Packets counted per `filter_common::reason`, summed over CPUs.
    pub fn reason_counts(&mut self) -> Result<Vec<u64>, Error> {
        let stats: PerCpuArray<&mut MapData, u64> = self.map(names::MAP_STATS)?;
        (0..filter_common::reason::COUNT)
            .map(|i| {
                stats
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .map_err(map_error(names::MAP_STATS, "get"))
            })
            .collect()
    }
}
