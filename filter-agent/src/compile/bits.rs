//! Sets of rules as bits: bit `r` is rule `r` of a table.
//!
//! [`RuleSet`] is dense and trimmed (no trailing zero words), so equal sets
//! are equal vectors whatever the table size, and interning them finds
//! every duplicate. The dataplane stores them sparse in the kernel's class
//! maps (`dataplane::classes`) and checks their capacity.

use std::{
    hash::{BuildHasher, BuildHasherDefault},
    sync::Arc,
};

/// An index by rule set. A rule set is a word per 64 rules, and a compile
/// and a publish intern one per trie entry and class: std's SipHash spent
/// a tenth of a 10,000-rule compile hashing them. foldhash's quality
/// hasher, seeded per process like std's, hashes long keys several times
/// faster; and each key carries its hash ([`Keyed`]), computed once, where
/// a growing map would hash every key again at each doubling (a twentieth
/// of a full reload's compile at 10,000 rules).
pub type SetIndex<V> = std::collections::HashMap<Keyed, V, BuildHasherDefault<Prehashed>>;

/// A rule set and its hash, the key of a [`SetIndex`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyed {
    hash: u64,
    /// The set.
    pub set: RuleSet,
}

impl std::hash::Hash for Keyed {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl From<RuleSet> for Keyed {
    fn from(set: RuleSet) -> Keyed {
        // One seed per process, as std's maps have.
        static SEED: std::sync::OnceLock<foldhash::quality::RandomState> =
            std::sync::OnceLock::new();
        let hash = SEED.get_or_init(Default::default).hash_one(&set);
        Keyed { hash, set }
    }
}

/// The hasher of a [`SetIndex`]: its keys come hashed.
#[derive(Default)]
pub struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is meant; fold anything else in all the same.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A set of rule numbers.
///
/// The words are shared: a compile takes most classes over from the last
/// one (`compile::table::Reuse`) and the dataplane keeps them beside what
/// it wrote, so a clone is a reference count, and comparing a class with
/// the one it was cloned from is comparing two pointers (`Arc`'s `Eq`
/// looks at the pointers first). Changing a shared set copies it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleSet {
    words: Arc<Vec<u64>>,
}

/// Hashes the non-zero words and where they are: a set of a few rules in
/// a big table (most of a policy's classes: a deny list's sources, one
/// rule's ports) costs its few words, not the table's width.
impl std::hash::Hash for RuleSet {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_usize(self.words.len());
        for (i, &w) in self.words.iter().enumerate() {
            if w != 0 {
                state.write_usize(i);
                state.write_u64(w);
            }
        }
    }
}

impl RuleSet {
    /// This set as a [`SetIndex`] key.
    pub fn keyed(&self) -> Keyed {
        Keyed::from(self.clone())
    }

    /// No rule.
    pub fn new() -> RuleSet {
        RuleSet::default()
    }

    /// The 64-bit words, rule 0 in the lowest bit of word 0.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The words to change, copied first if shared.
    fn words_mut(&mut self) -> &mut Vec<u64> {
        Arc::make_mut(&mut self.words)
    }

    /// Adds rule `r`.
    pub fn insert(&mut self, r: usize) {
        let w = r / 64;
        let words = self.words_mut();
        if words.len() <= w {
            words.resize(w + 1, 0);
        }
        words[w] |= 1 << (r % 64);
    }

    /// Whether rule `r` is in the set.
    pub fn contains(&self, r: usize) -> bool {
        self.words
            .get(r / 64)
            .is_some_and(|w| w & (1 << (r % 64)) != 0)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// `self |= other`.
    pub fn union_with(&mut self, other: &RuleSet) {
        let words = self.words_mut();
        if words.len() < other.words.len() {
            words.resize(other.words.len(), 0);
        }
        words
            .iter_mut()
            .zip(other.words.iter())
            .for_each(|(x, y)| *x |= y);
    }

    /// `self &= other`.
    pub fn intersect_with(&mut self, other: &RuleSet) {
        let words = self.words_mut();
        words.truncate(other.words.len());
        words
            .iter_mut()
            .zip(other.words.iter())
            .for_each(|(x, y)| *x &= y);
        self.trim();
    }

    /// `self &= !other`.
    pub fn subtract(&mut self, other: &RuleSet) {
        self.words_mut()
            .iter_mut()
            .zip(other.words.iter())
            .for_each(|(x, y)| *x &= !y);
        self.trim();
    }

    fn trim(&mut self) {
        if self.words.last() == Some(&0) {
            let words = self.words_mut();
            while words.last() == Some(&0) {
                words.pop();
            }
        }
    }

    /// The lowest rule at or after `start`, as the kernel's verdict loop
    /// finds it.
    pub fn first_from(&self, start: usize) -> Option<usize> {
        (start / 64..self.words.len()).find_map(|w| {
            let mut x = self.words[w];
            if w == start / 64 {
                x &= u64::MAX << (start % 64);
            }
            (x != 0).then(|| w * 64 + x.trailing_zeros() as usize)
        })
    }
}

impl FromIterator<usize> for RuleSet {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        let mut s = RuleSet::new();
        for r in iter {
            s.insert(r);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::RuleSet;

    #[test]
    fn sets_stay_trimmed_so_equal_sets_are_equal() {
        let mut a: RuleSet = [1, 200].into_iter().collect();
        a.subtract(&[200].into_iter().collect());
        assert_eq!(a, [1].into_iter().collect());
        let mut b: RuleSet = [1, 5].into_iter().collect();
        b.intersect_with(&[5, 700].into_iter().collect());
        assert_eq!(b, [5].into_iter().collect());
        assert_eq!(b.first_from(0), Some(5));
        assert_eq!(b.first_from(6), None);
    }
}
