//! Log records: the settings the kernel's loggers read (`FW_LOGCFG1`),
//! the ring buffer they write (`FW_EVENTS2`) and their per-rule counts.

use super::*;
use filter_common::events::{Config, Counter, SLOTS};

/// How many Log records a rule may write: one per `interval` on average
/// (`None`: no limit), `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Time per record.
    pub interval: Option<std::time::Duration>,
    /// Records a quiet rule may write at once.
    pub burst: u32,
}

impl Rate {
    /// `N/second`, `N/minute`, `N/hour` or `N/day` (Calico's
    /// `logActionRateLimit`), N from 1 to 9999, with `burst`.
    pub fn parse(text: &str, burst: u32) -> Result<Rate, String> {
        let bad =
            || format!("invalid rate {text:?}: N/second, N/minute, N/hour or N/day, N in 1..9999");
        let (n, unit) = text.split_once('/').ok_or_else(bad)?;
        let n: u32 = n.parse().map_err(|_| bad())?;
        if !(1..=9999).contains(&n) {
            return Err(bad());
        }
        let per = match unit {
            "second" => 1,
            "minute" => 60,
            "hour" => 3600,
            "day" => 86_400,
            _ => return Err(bad()),
        };
        Ok(Rate {
            interval: Some(std::time::Duration::from_secs(per) / n),
            burst,
        })
    }

    /// The kernel's form of the rate.
    pub fn config(self, log_denied: bool) -> Config {
        let interval_ns = self.interval.map_or(0, |d| d.as_nanos() as u64);
        Config {
            interval_ns,
            burst_ns: interval_ns * u64::from(self.burst.max(1)),
            log_denied: u32::from(log_denied),
            _pad: 0,
        }
    }
}

/// Parses a ring buffer size: bytes, or a number with `KiB`, `MiB` or
/// `GiB` (also `K`, `M`, `G`). The kernel wants a power of two, at least a
/// page; more than 1 GiB is refused (the ring is locked memory).
pub fn ring_bytes(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => {
            return Err(format!(
                "invalid size {text:?}: bytes, or N KiB, MiB or GiB"
            ))
        }
    };
    let n: u64 = n
        .parse()
        .map_err(|_| format!("invalid size {text:?}: bytes, or N KiB, MiB or GiB"))?;
    let bytes = n
        .checked_shl(shift)
        .filter(|b| b >> shift == n)
        .unwrap_or(u64::MAX);
    let page = 4096;
    if bytes < page || bytes > 1 << 30 || !bytes.is_power_of_two() {
        return Err(format!(
            "invalid size {text:?}: the ring buffer is a power of two from 4KiB to 1GiB"
        ));
    }
    Ok(bytes as u32)
}

impl Dataplane {
    /// Bytes of the Log record ring buffer as the kernel has it (an adopted
    /// ring keeps the size it was created with). Read from its pin, so it
    /// holds after [`Dataplane::take_events`] too.
    pub fn log_ring_bytes(&self) -> u32 {
        pinned_size(&self.pin_dir.join(names::MAP_EVENTS)).unwrap_or(0)
    }

    /// Sets the Log rate and whether drops are logged too.
    pub fn set_log_config(&mut self, rate: Rate, log_denied: bool) -> Result<(), Error> {
        let mut cfg: Array<&mut MapData, Config> = self.map(names::MAP_LOG_CONFIG)?;
        cfg.set(0, &rate.config(log_denied), 0)
            .map_err(map_error(names::MAP_LOG_CONFIG, "set"))
    }

    /// Takes the ring buffer of Log records out of the dataplane, for a
    /// reader task (it can be taken once).
    pub fn take_events(&mut self) -> Result<aya::maps::RingBuf<aya::maps::MapData>, Error> {
        let map = self
            .ebpf
            .take_map(names::MAP_EVENTS)
            .ok_or_else(|| Error::Load {
                what: names::MAP_EVENTS.into(),
                source: "the ring buffer was taken already".into(),
            })?;
        aya::maps::RingBuf::try_from(map).map_err(map_error(names::MAP_EVENTS, "open"))
    }

    /// Records written, rate-limited and lost for `slot` (a rule slot, or
    /// `filter_common::events::NO_RULE`), summed over CPUs.
    pub fn log_counts(&mut self, slot: u32) -> Result<Counter, Error> {
        let ctr: PerCpuArray<&mut MapData, Counter> = self.map(names::MAP_LOG_COUNTERS)?;
        if slot >= SLOTS {
            return Ok(Counter::default());
        }
        let v = ctr
            .get(&slot, 0)
            .map_err(map_error(names::MAP_LOG_COUNTERS, "get"))?;
        Ok(v.iter().fold(Counter::default(), |a, c| Counter {
            emitted: a.emitted + c.emitted,
            limited: a.limited + c.limited,
            lost: a.lost + c.lost,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_become_intervals_and_bursts() {
        let c = Rate::parse("10/second", 5).expect("rate").config(true);
        assert_eq!(c.interval_ns, 100_000_000);
        assert_eq!(c.burst_ns, 500_000_000);
        assert_eq!(c.log_denied, 1);
        let m = Rate::parse("5/minute", 1).expect("rate").config(false);
        assert_eq!(
            (m.interval_ns, m.burst_ns, m.log_denied),
            (12_000_000_000, 12_000_000_000, 0)
        );
        let off = Rate {
            interval: None,
            burst: 5,
        }
        .config(false);
        assert_eq!((off.interval_ns, off.burst_ns), (0, 0));
        for bad in ["0/second", "5/fortnight", "x/second", "10000/day", "5"] {
            assert!(Rate::parse(bad, 5).is_err(), "{bad}");
        }
    }

    #[test]
    fn ring_sizes_are_powers_of_two_pages() {
        for (text, bytes) in [
            ("4096", 4096),
            ("1MiB", 1 << 20),
            ("256K", 256 << 10),
            ("64 MiB", 64 << 20),
            ("1GiB", 1 << 30),
        ] {
            assert_eq!(ring_bytes(text), Ok(bytes), "{text}");
        }
        for bad in [
            "",
            "1000",
            "2048",
            "3MiB",
            "2GiB",
            "1TiB",
            "MiB",
            "-4096",
            "99999999999999999999G",
        ] {
            assert!(ring_bytes(bad).is_err(), "{bad}");
        }
    }
}
