//! One generation's contents as a value, and patching one into another.
//!
//! In: a compiled policy and its [`Plan`]. Out: [`Contents`], every entry
//! the generation's classifier maps hold, keyed as the kernel keys them.
//! The dataplane keeps the contents of both generations it wrote; the
//! next policy goes into the inactive one as a patch from what it holds
//! (the policy before the live one), so a one-rule change writes a few
//! entries, not the whole policy. A generation this dataplane did not
//! write (adopted, or a write that failed half-way) is cleared first and
//! patched from empty, which is a full write.

use std::{hash::Hash, sync::Arc};

use filter_common::ClassHead;

use super::publish::{hints, is_single_port, port_key, ClassBase, Plan};
use super::*;

/// One map's entries: (prefix length, key) → class number. A generation
/// holds one per trie and CIDR (hundreds of thousands), built and compared
/// on every publish: foldhash, as for rule sets (`compile::bits`).
type Entries<K> = std::collections::HashMap<(u32, K), u32, foldhash::quality::RandomState>;

/// Index in [`Contents`]' address and port arrays: the source field's
/// trie, the destination's, then their exact hashes in the same order.
const TRIE: usize = 0;
const EXACT: usize = 2;

/// The address and port maps, in [`Contents`]' order.
const V4_MAPS: [&str; 4] = [
    names::MAP_SRC_V4,
    names::MAP_DST_V4,
    names::MAP_SRC_V4_EXACT,
    names::MAP_DST_V4_EXACT,
];
const V6_MAPS: [&str; 4] = [
    names::MAP_SRC_V6,
    names::MAP_DST_V6,
    names::MAP_SRC_V6_EXACT,
    names::MAP_DST_V6_EXACT,
];
const PORT_MAPS: [&str; 4] = [
    names::MAP_PORT,
    names::MAP_SPORT,
    names::MAP_PORT_EXACT,
    names::MAP_SPORT_EXACT,
];

/// Everything one generation holds in the classifier maps.
#[derive(Default)]
pub(super) struct Contents {
    /// The compiler's classes: their heads from the generation's first
    /// class (`FW_CLASS2`), their non-zero words from its first word
    /// (`FW_WORD1`).
    base: Option<Arc<ClassBase>>,
    /// The endpoint masks' heads and words, after the base's.
    mask_heads: Vec<ClassHead>,
    mask_words: Vec<u64>,
    /// Rule slot → what the rule there does (`FW_RULE3`).
    /// The tables take consecutive slots from the generation's first
    /// (`publish::first_slots`): a vector from `first_slot` on.
    rules: Vec<RuleMeta>,
    first_slot: u32,
    /// The generation's first class head and first class word: where its
    /// half of the class arrays starts ([`Plan`]).
    first_class: u32,
    first_word: u32,
    /// Table id → its hints (`FW_TABLE1`), for every table of the
    /// generation.
    hints: BTreeMap<u32, TableHints>,
    /// Table id → its address and port entries.
    tables: BTreeMap<u32, Arc<TableEntries>>,
    /// Endpoint masks and the per-interface summary (`FW_EP2`).
    endpoints:
        std::collections::HashMap<EndpointKey, EndpointValue, foldhash::quality::RandomState>,
}

/// One table's address and port entries, and the compiled fields they
/// were made from: a table whose fields and class numbers did not change
/// since the generation was last written keeps its entries (shared, not
/// rebuilt or compared entry by entry).
#[derive(Default)]
pub(super) struct TableEntries {
    fields: Fields,
    /// The lookups the table spares the kernel (`publish::hints`).
    hints: TableHints,
    v4: [Entries<AddrV4Key>; 4],
    v6: [Entries<AddrV6Key>; 4],
    ports: [Entries<PortKey>; 4],
}

/// A compiled table's fields, as entries are made from them: shared with
/// the compile, which hands a field it took over on unchanged as the same
/// allocation, so comparing it is comparing two pointers (`Arc`'s `Eq`).
#[derive(Default, PartialEq)]
struct Fields {
    src_v4: Arc<Vec<(Prefix, u32)>>,
    dst_v4: Arc<Vec<(Prefix, u32)>>,
    src_v6: Arc<Vec<(Prefix, u32)>>,
    dst_v6: Arc<Vec<(Prefix, u32)>>,
    dports: Arc<Vec<PortEntry>>,
    sports: Arc<Vec<PortEntry>>,
}

impl Fields {
    fn of(t: &Table) -> Fields {
        Fields {
            src_v4: t.src_v4.clone(),
            dst_v4: t.dst_v4.clone(),
            src_v6: t.src_v6.clone(),
            dst_v6: t.dst_v6.clone(),
            dports: t.dports.clone(),
            sports: t.sports.clone(),
        }
    }

    /// Whether `t` has these fields (compared in place).
    fn are(&self, t: &Table) -> bool {
        self.src_v4 == t.src_v4
            && self.dst_v4 == t.dst_v4
            && self.src_v6 == t.src_v6
            && self.dst_v6 == t.dst_v6
            && self.dports == t.dports
            && self.sports == t.sports
    }
}

impl TableEntries {
    /// The entries of table `t` (kernel id `table`), classes numbered by
    /// `plan`.
    fn new(table: u32, t: &Table, plan: &Plan) -> TableEntries {
        let mut c = TableEntries {
            fields: Fields::of(t),
            hints: hints(t, plan),
            ..TableEntries::default()
        };
        let tb = table.to_be_bytes();
        let bits = |p: &Prefix| TABLE_PREFIX_BITS + u32::from(p.len);
        for (field, entries) in [(0, &t.src_v4), (1, &t.dst_v4)] {
            for (p, class) in entries.iter() {
                let key = AddrV4Key {
                    table: tb,
                    addr: (p.value(32) as u32).to_be_bytes(),
                };
                let map = field + if p.len == 32 { EXACT } else { TRIE };
                c.v4[map].insert((bits(p), key), plan.class(*class));
            }
        }
        for (field, entries) in [(0, &t.src_v6), (1, &t.dst_v6)] {
            for (p, class) in entries.iter() {
                let key = AddrV6Key {
                    table: tb,
                    addr: p.value(128).to_be_bytes(),
                };
                let map = field + if p.len == 128 { EXACT } else { TRIE };
                c.v6[map].insert((bits(p), key), plan.class(*class));
            }
        }
        for (field, entries) in [(0, &t.dports), (1, &t.sports)] {
            for e in entries.iter() {
                let key = port_key(tb, e);
                let map = field + if is_single_port(e) { EXACT } else { TRIE };
                c.ports[map].insert((key.prefix_len(), key.data()), plan.class(e.class));
            }
        }
        c
    }
}

impl Contents {
    /// What `compiled`, laid out by `plan`, puts into `generation`; the
    /// entries of tables `have` (what the generation holds) already holds
    /// are taken from it.
    pub(super) fn new(
        generation: u32,
        compiled: &Compiled,
        plan: &Plan,
        have: Option<&Contents>,
    ) -> Contents {
        let mut c = Contents {
            first_slot: generation * RULE_SLOTS_PER_GEN,
            first_class: plan.class(0),
            first_word: plan.base.word_base,
            base: Some(plan.base.clone()),
            mask_heads: plan.masks_layout.heads.clone(),
            mask_words: plan.masks_layout.words.clone(),
            ..Contents::default()
        };
        let tables = generation * TABLES_PER_GEN..(generation + 1) * TABLES_PER_GEN;
        c.hints = tables.map(|t| (t, TableHints::default())).collect();
        // A table's entries name compiler class `c` as the generation's
        // class `c` whatever the classes hold: entries made from the same
        // fields are the same entries.
        let mut summary: BTreeMap<u32, u32> = BTreeMap::new();
        for (t, &first_slot) in compiled.tables.iter().zip(&plan.first_slots) {
            let table = table_id(generation, t.stage, t.direction);
            for (i, r) in t.rules.iter().enumerate() {
                let meta = RuleMeta {
                    action: r.action,
                    policy: r.owner,
                    rule: i as u32,
                    next: r.next,
                };
                debug_assert_eq!(c.first_slot + c.rules.len() as u32, first_slot + i as u32);
                c.rules.push(meta);
            }
            let entries = match have.and_then(|h| h.tables.get(&table)) {
                Some(held) if held.fields.are(t) => held.clone(),
                _ => Arc::new(TableEntries::new(table, t, plan)),
            };
            c.hints.insert(table, entries.hints);
            c.tables.insert(table, entries);
            for &(ifindex, class, decided) in &plan.masks[&table] {
                let key = EndpointKey { ifindex, table };
                let value = EndpointValue {
                    class,
                    first_slot,
                    decided,
                };
                c.endpoints.insert(key, value);
                // Which of the generation's tables have rules for it.
                *summary.entry(ifindex).or_default() |= table_bit(t.stage, t.direction);
            }
        }
        for (ifindex, tables) in summary {
            let key = EndpointKey {
                ifindex,
                table: summary_table(generation),
            };
            let value = EndpointValue {
                class: tables,
                first_slot: 0,
                decided: 0,
            };
            c.endpoints.insert(key, value);
        }
        c
    }

    /// The compiler's classes as laid out in the generation, if known.
    pub(super) fn class_base(&self) -> Option<&Arc<ClassBase>> {
        self.base.as_ref()
    }

    /// The class heads and the class words before which `want` holds
    /// what this holds: the compiler's classes where both share them (a
    /// publish that took the layout over), else none.
    fn same_classes(&self, want: &Contents) -> (u32, u32) {
        match (&self.base, &want.base) {
            (Some(h), Some(w)) if Arc::ptr_eq(h, w) => w.layout.end(),
            _ => (0, 0),
        }
    }

    /// The class heads from the generation's first: the compiler's
    /// classes', then the endpoint masks'.
    fn class_heads(&self) -> impl Iterator<Item = ClassHead> + '_ {
        let base = self.base.iter().flat_map(|b| &b.layout.heads);
        base.chain(&self.mask_heads).copied()
    }

    /// The class words from the generation's first, in the same order.
    fn class_words(&self) -> impl Iterator<Item = u64> + '_ {
        let base = self.base.iter().flat_map(|b| &b.layout.words);
        base.chain(&self.mask_words).copied()
    }

    /// The rule slots it fills.
    pub(super) fn slots(&self) -> Vec<u32> {
        (self.first_slot..self.first_slot + self.rules.len() as u32).collect()
    }

    /// Each table's entries in `want` that differ from this one's, as
    /// (held, wanted) pairs; a table held and wanted alike is left out.
    fn changed_tables<'a>(
        &'a self,
        want: &'a Contents,
    ) -> Vec<(&'a TableEntries, &'a TableEntries)> {
        static NONE: std::sync::LazyLock<TableEntries> =
            std::sync::LazyLock::new(TableEntries::default);
        let ids: BTreeSet<u32> = self
            .tables
            .keys()
            .chain(want.tables.keys())
            .copied()
            .collect();
        ids.into_iter()
            .filter_map(|id| match (self.tables.get(&id), want.tables.get(&id)) {
                (Some(h), Some(w)) if Arc::ptr_eq(h, w) => None,
                (h, w) => Some((h.map_or(&*NONE, |h| &**h), w.map_or(&*NONE, |w| &**w))),
            })
            .collect()
    }
}

/// Indices (from `base`) and values of `want` that `have` does not hold,
/// both read from the same index on. Entries past `want`'s end stay:
/// nothing of `want` points at them.
fn changed<T: PartialEq>(
    (mut have, want): (impl Iterator<Item = T>, impl Iterator<Item = T>),
    base: u32,
) -> (Vec<u32>, Vec<T>) {
    want.enumerate()
        .filter(|(_, w)| have.next().as_ref() != Some(w))
        .map(|(i, w)| (base + i as u32, w))
        .unzip()
}

impl Dataplane {
    /// Turns a generation from `have` into `want` (what [`Contents::new`]
    /// made for it, which knows where its halves start), writing only
    /// what differs; returns how many entries it wrote or removed. Stale
    /// entries go first, so no table holds more than the larger of the two.
    pub(super) fn patch(&mut self, have: &Contents, want: &Contents) -> Result<usize, Error> {
        let mut n = 0;
        let (same_heads, same_words) = have.same_classes(want);
        let (h, w) = (same_heads as usize, same_words as usize);
        let words = (have.class_words().skip(w), want.class_words().skip(w));
        let (at, words) = changed(words, want.first_word + same_words);
        batch::update(&self.ebpf, names::MAP_CLASS_WORDS, &at, &words)?;
        n += at.len();
        let heads = (have.class_heads().skip(h), want.class_heads().skip(h));
        let (at, heads) = changed(heads, want.first_class + same_heads);
        batch::update(&self.ebpf, names::MAP_CLASS, &at, &heads)?;
        n += at.len();
        // (What a generation held is from its own first slot on, or empty.)
        debug_assert!(have.rules.is_empty() || have.first_slot == want.first_slot);
        let rules = (have.rules.iter().copied(), want.rules.iter().copied());
        let (slots, metas) = changed(rules, want.first_slot);
        batch::update(&self.ebpf, names::MAP_RULE, &slots, &metas)?;
        n += slots.len();
        let tables = have.changed_tables(want);
        for i in 0..4 {
            let pairs: Vec<_> = tables.iter().map(|(h, w)| (&h.v4[i], &w.v4[i])).collect();
            n += if i < EXACT {
                self.patch_entries(V4_MAPS[i], true, &pairs)?
            } else {
                self.patch_hosts4(V4_MAPS[i], &pairs)?
            };
            let pairs: Vec<_> = tables.iter().map(|(h, w)| (&h.v6[i], &w.v6[i])).collect();
            n += self.patch_entries(V6_MAPS[i], i < EXACT, &pairs)?;
            let pairs: Vec<_> = tables
                .iter()
                .map(|(h, w)| (&h.ports[i], &w.ports[i]))
                .collect();
            n += self.patch_entries(PORT_MAPS[i], i < EXACT, &pairs)?;
        }
        let mut table_hints: Array<&mut MapData, TableHints> = self.map(names::MAP_TABLE_HINTS)?;
        for (&table, h) in &want.hints {
            if have.hints.get(&table) != Some(h) {
                table_hints.set(table, h, 0).map_err(map_error(
                    names::MAP_TABLE_HINTS,
                    format!("set table {table}"),
                ))?;
                n += 1;
            }
        }
        let mut eps: HashMap<&mut MapData, EndpointKey, EndpointValue> =
            self.map(names::MAP_ENDPOINT)?;
        // The array's copies of the same entries (`endpoint_slot`): the
        // removed ones emptied, the changed ones written, in one batch.
        let (mut slots, mut values) = (Vec::new(), Vec::new());
        for key in have
            .endpoints
            .keys()
            .filter(|k| !want.endpoints.contains_key(k))
        {
            match eps.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => n += 1,
                Err(e) => return Err(map_error(names::MAP_ENDPOINT, "remove")(e)),
            }
            if let Some(i) = endpoint_slot(key) {
                slots.push(i);
                values.push(EndpointSlot::default());
            }
        }
        for (key, value) in &want.endpoints {
            if have.endpoints.get(key) != Some(value) {
                eps.insert(key, value, 0).map_err(map_error(
                    names::MAP_ENDPOINT,
                    format!("insert {}", key.ifindex),
                ))?;
                n += 1;
                if let Some(i) = endpoint_slot(key) {
                    slots.push(i);
                    values.push(EndpointSlot::holding(value));
                }
            }
        }
        batch::update(&self.ebpf, names::MAP_ENDPOINT_SLOTS, &slots, &values)?;
        Ok(n)
    }

    /// Patches one IPv4 host table (`hosts4`) from each changed table's
    /// held entries to its wanted ones: stale slots emptied first.
    fn patch_hosts4(
        &mut self,
        name: &'static str,
        tables: &[(&Entries<AddrV4Key>, &Entries<AddrV4Key>)],
    ) -> Result<usize, Error> {
        let t = self.hosts4(name)?;
        let mut n = 0;
        for (have, want) in tables {
            for (_, k) in have.keys().filter(|k| !want.contains_key(k)) {
                t.remove(u32::from_be_bytes(k.table), k.addr);
                n += 1;
            }
        }
        for (have, want) in tables {
            for ((_, k), class) in want.iter().filter(|&(k, c)| have.get(k) != Some(c)) {
                t.insert(u32::from_be_bytes(k.table), k.addr, *class)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Patches one address or port map (an LPM trie, or the exact hash
    /// beside it, keyed alike) from each changed table's held entries to
    /// its wanted ones.
    fn patch_entries<K: aya::Pod + Eq + Hash + Sync>(
        &mut self,
        name: &'static str,
        trie: bool,
        tables: &[(&Entries<K>, &Entries<K>)],
    ) -> Result<usize, Error> {
        let key = |&(len, data): &(u32, K)| Key::new(len, data);
        let stale: Vec<Key<K>> = tables
            .iter()
            .flat_map(|(have, want)| have.keys().filter(|k| !want.contains_key(k)))
            .map(key)
            .collect();
        let (keys, classes): (Vec<Key<K>>, Vec<u32>) = tables
            .iter()
            .flat_map(|(have, want)| want.iter().filter(|&(k, class)| have.get(k) != Some(class)))
            .map(|(k, class)| (key(k), *class))
            .unzip();
        if trie {
            let mut t: LpmTrie<&mut MapData, K, u32> = self.map(name)?;
            for k in &stale {
                t.remove(k).map_err(map_error(name, "remove"))?;
            }
            for (k, class) in keys.iter().zip(&classes) {
                t.insert(k, class, 0).map_err(map_error(name, "insert"))?;
            }
        } else {
            batch::delete(&self.ebpf, name, &stale)?;
            batch::update(&self.ebpf, name, &keys, &classes)?;
        }
        Ok(stale.len() + keys.len())
    }
}
