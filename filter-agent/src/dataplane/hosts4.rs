//! Writing the IPv4 host tables (`filter_common::hosts4`): open-addressed
//! buckets in an array map, written through a shared mapping of it.
//!
//! In: a table's entries to remove and to write, or a generation to clear.
//! Out: the slots stored one aligned 8-byte store at a time, and each
//! bucket's reach word kept the farthest any entry homed there lies. The
//! agent is the only writer; packets read the live generation's slots,
//! which a write never touches (it writes the other generation's), so no
//! reader sees a half-written entry it could match.

use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::{MapData, MapError};
use filter_common::hosts4::{self, BUCKET_SLOTS, PROBE_BUCKETS};

use super::{batch::Mapping, map_error, Error};

/// Words a bucket takes: the reach word and the slots.
const WORDS: usize = BUCKET_SLOTS + 1;

/// An open table, mapped.
pub(super) struct Hosts4 {
    words: Words,
    name: &'static str,
    /// Buckets − 1.
    mask: u32,
}

impl Hosts4 {
    pub(super) fn open(map: &MapData, name: &'static str) -> Result<Hosts4, Error> {
        let buckets = map.info().map_err(map_error(name, "info"))?.max_entries();
        if !buckets.is_power_of_two() || buckets < hosts4::MIN_BUCKETS {
            return Err(map_error(name, "open")(MapError::InvalidValueSize {
                size: buckets as usize,
                expected: hosts4::MIN_BUCKETS as usize,
            }));
        }
        Ok(Hosts4 {
            words: Words::Mapped(Mapping::new(map, name)?),
            name,
            mask: buckets - 1,
        })
    }

    fn words(&self) -> &[AtomicU64] {
        match &self.words {
            Words::Mapped(m) => m.atomics(),
            #[cfg(test)]
            Words::Owned(v) => v,
        }
    }

    /// Word `w` of bucket `b` (taken modulo the buckets).
    fn word(&self, b: u32, w: usize) -> &AtomicU64 {
        &self.words()[(b & self.mask) as usize * WORDS + w]
    }

    /// Where `key`'s slot is: its distance from the home bucket and its
    /// word there.
    fn find(&self, key: u64) -> Option<(u32, usize)> {
        let home = hosts4::home(key, self.mask);
        let reach = self.word(home, 0).load(Ordering::Relaxed);
        (0..PROBE_BUCKETS)
            .take_while(|&d| u64::from(d) <= reach)
            .find_map(|d| {
                (1..WORDS)
                    .find(|&w| {
                        let slot = self.word(home + d, w).load(Ordering::Relaxed);
                        hosts4::class_if(slot, key).is_some()
                    })
                    .map(|w| (d, w))
            })
    }

    /// Writes `class` for `table` and `addr`: over its slot if it has one,
    /// else into the first empty slot within reach of its home bucket,
    /// the home bucket's reach word raised first where needed.
    pub(super) fn insert(&self, table: u32, addr: [u8; 4], class: u32) -> Result<(), Error> {
        let key = hosts4::key(table, addr);
        let home = hosts4::home(key, self.mask);
        let slot = hosts4::slot(table, addr, class);
        if let Some((d, w)) = self.find(key) {
            self.word(home + d, w).store(slot, Ordering::Release);
            return Ok(());
        }
        let free = (0..PROBE_BUCKETS).find_map(|d| {
            (1..WORDS)
                .find(|&w| self.word(home + d, w).load(Ordering::Relaxed) == 0)
                .map(|w| (d, w))
        });
        let Some((d, w)) = free else {
            return Err(map_error(
                self.name,
                format!("insert {}", std::net::Ipv4Addr::from(addr)),
            )(MapError::OutOfBounds {
                index: home,
                max_entries: self.mask + 1,
            }));
        };
        let reach = self.word(home, 0);
        if reach.load(Ordering::Relaxed) < u64::from(d) {
            reach.store(u64::from(d), Ordering::Release);
        }
        self.word(home + d, w).store(slot, Ordering::Release);
        Ok(())
    }

    /// Empties the slot of `table` and `addr`, if it has one; returns
    /// whether it had.
    pub(super) fn remove(&self, table: u32, addr: [u8; 4]) -> bool {
        let key = hosts4::key(table, addr);
        let Some((d, w)) = self.find(key) else {
            return false;
        };
        let home = hosts4::home(key, self.mask);
        self.word(home + d, w).store(0, Ordering::Release);
        self.shrink_reach(home);
        true
    }

    /// Lowers bucket `home`'s reach word to the farthest entry still homed
    /// there.
    fn shrink_reach(&self, home: u32) {
        let farthest = (0..PROBE_BUCKETS)
            .filter(|&d| {
                (1..WORDS).any(|w| {
                    let slot = self.word(home + d, w).load(Ordering::Relaxed);
                    slot != 0 && hosts4::home(slot_key(slot), self.mask) == home & self.mask
                })
            })
            .max()
            .unwrap_or(0);
        let reach = self.word(home, 0);
        if reach.load(Ordering::Relaxed) != u64::from(farthest) {
            reach.store(u64::from(farthest), Ordering::Release);
        }
    }

    /// Empties every slot whose table `stale` picks, and lowers the reach
    /// words after.
    pub(super) fn clear(&self, stale: impl Fn(u32) -> bool) {
        let buckets = self.mask + 1;
        let mut emptied = false;
        for b in 0..buckets {
            for w in 1..WORDS {
                let word = self.word(b, w);
                let slot = word.load(Ordering::Relaxed);
                if slot != 0 && stale(hosts4::table_of(slot)) {
                    word.store(0, Ordering::Release);
                    emptied = true;
                }
            }
        }
        if emptied {
            for b in 0..buckets {
                if self.word(b, 0).load(Ordering::Relaxed) != 0 {
                    self.shrink_reach(b);
                }
            }
        }
    }

    /// The full slots, as (table, address, class).
    #[cfg(test)]
    fn entries(&self) -> Vec<(u32, [u8; 4], u32)> {
        (0..=self.mask)
            .flat_map(|b| (1..WORDS).map(move |w| (b, w)))
            .map(|(b, w)| self.word(b, w).load(Ordering::Relaxed))
            .filter(|&slot| slot != 0)
            .map(|slot| {
                let addr = ((slot >> 32) as u32).to_be_bytes();
                let key = slot_key(slot);
                let class = hosts4::class_if(slot, key).unwrap_or(u32::MAX);
                (hosts4::table_of(slot), addr, class)
            })
            .collect()
    }
}

/// Where a table's words are.
enum Words {
    /// The map's, shared with the programs.
    Mapped(Mapping),
    /// The tests' own.
    #[cfg(test)]
    Owned(Vec<AtomicU64>),
}

/// The key part of a full slot.
fn slot_key(slot: u64) -> u64 {
    hosts4::key(hosts4::table_of(slot), ((slot >> 32) as u32).to_be_bytes())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn table(buckets: u32) -> Hosts4 {
        Hosts4 {
            words: Words::Owned(
                (0..buckets as usize * WORDS)
                    .map(|_| AtomicU64::new(0))
                    .collect(),
            ),
            name: "test",
            mask: buckets - 1,
        }
    }

    /// What the programs' lookup (`hosts4::lookup`) finds in `t`.
    fn lookup(t: &Hosts4, table: u32, addr: [u8; 4]) -> Option<u32> {
        let buckets: Vec<hosts4::Bucket> = t
            .words()
            .chunks(WORDS)
            .map(|b| std::array::from_fn(|w| b[w].load(Ordering::Relaxed)))
            .collect();
        hosts4::lookup(
            |b| buckets.get(b as usize),
            t.mask,
            hosts4::key(table, addr),
        )
    }

    proptest! {
        /// Inserts, overwrites, removes and generation clears, against a
        /// map: the programs' lookup finds every entry the map holds and
        /// nothing else, at up to the load the agent sizes for.
        #[test]
        fn the_programs_find_exactly_what_was_written(
            ops in proptest::collection::vec((0u8..4, 0u32..16, 0u32..3000, 0u32..(1 << 17)), 1..1200),
        ) {
            let t = table(hosts4::buckets(1000));
            let mut model: HashMap<(u32, [u8; 4]), u32> = HashMap::new();
            for (op, tab, host, class) in ops {
                // Runs of addresses, as lists have them.
                let addr = (0x0a00_0000u32 + host).to_be_bytes();
                match op {
                    0 | 1 if model.len() < 1000 || model.contains_key(&(tab, addr)) => {
                        t.insert(tab, addr, class).expect("room");
                        model.insert((tab, addr), class);
                    }
                    2 => {
                        prop_assert_eq!(t.remove(tab, addr), model.remove(&(tab, addr)).is_some());
                    }
                    3 if class % 50 == 0 => {
                        let gen = tab / 8;
                        t.clear(|table| table / 8 == gen);
                        model.retain(|(table, _), _| table / 8 != gen);
                    }
                    _ => {}
                }
            }
            for (&(tab, addr), &class) in &model {
                prop_assert_eq!(lookup(&t, tab, addr), Some(class));
            }
            let mut held = t.entries();
            held.sort();
            let mut want: Vec<_> = model.iter().map(|(&(t, a), &c)| (t, a, c)).collect();
            want.sort();
            prop_assert_eq!(held, want);
            prop_assert_eq!(lookup(&t, 15, [192, 0, 2, 1]), None);
        }
    }

    #[test]
    fn a_full_reach_is_refused_with_the_address() {
        let t = table(hosts4::MIN_BUCKETS);
        let all = hosts4::MIN_BUCKETS as usize * BUCKET_SLOTS;
        for host in 0..all as u32 {
            t.insert(0, host.to_be_bytes(), 1).expect("room");
        }
        let e = t.insert(0, [192, 0, 2, 1], 1).expect_err("full");
        assert!(format!("{e:#}").contains("192.0.2.1"), "{e:#}");
        for host in 0..all as u32 {
            assert_eq!(lookup(&t, 0, host.to_be_bytes()), Some(1));
        }
    }
}
