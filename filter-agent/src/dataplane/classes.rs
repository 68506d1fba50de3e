//! Rule sets → the kernel's sparse class storage.
//!
//! In: the rule sets of one generation (the compiler's classes, then the
//! endpoint masks). Out: one [`ClassHead`] per set and the non-zero words
//! they point into, numbered from the generation's first class and word.
//! Invariant: word `w` of set `i` is `word(&heads[i], &words, w)`; the
//! kernel's verdict scan (`filter-ebpf/src/classify.rs`) reads them the
//! same way.

use filter_common::{ClassHead, CLASSES_PER_GEN, CLASS_WORDS_PER_GEN, SUMMARY_WORDS, WORDS};

use crate::compile::bits::{RuleSet, SetIndex};

/// Non-zero words from which a summary word's 64 words are stored dense.
const DENSE_FROM: u32 = 32;

/// What each generation may hold of the class arrays (`FW_CLASS2` heads,
/// `FW_WORD1` words): generation `g`'s classes and words start at `g`
/// times these. The arrays are sized to the policy (an array map is
/// allocated whole when it is created): twice what a generation needs,
/// rounded up to a power of two, between [`ClassRoom::MIN`] and the most
/// a generation can hold. A policy that outgrows them, or shrinks to an
/// eighth, gets new arrays ([`super::Dataplane::publish`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassRoom {
    /// Class heads per generation.
    pub heads: u32,
    /// Class words per generation.
    pub words: u32,
}

impl ClassRoom {
    /// The least: 112 KiB of heads and 256 KiB of words for both
    /// generations, room for a few hundred rules.
    pub const MIN: ClassRoom = ClassRoom {
        heads: 1 << 10,
        words: 1 << 14,
    };
    /// The most a generation can hold.
    pub const MAX: ClassRoom = ClassRoom {
        heads: CLASSES_PER_GEN,
        words: CLASS_WORDS_PER_GEN,
    };

    /// The room for a generation of `heads` classes and `words` words.
    pub fn fitting(heads: u32, words: u32) -> ClassRoom {
        let size = |need: u32, min: u32, max: u32| {
            need.saturating_mul(2)
                .checked_next_power_of_two()
                .unwrap_or(max)
                .clamp(min, max)
        };
        ClassRoom {
            heads: size(heads, Self::MIN.heads, Self::MAX.heads),
            words: size(words, Self::MIN.words, Self::MAX.words),
        }
    }

    /// The room to move to for a generation of `heads` classes and
    /// `words` words, if this one does not hold it or is more than eight
    /// times what it needs (in bytes).
    pub fn refit(self, heads: u32, words: u32) -> Option<ClassRoom> {
        let fit = ClassRoom::fitting(heads, words);
        let too_small = heads > self.heads || words > self.words;
        let too_big = self.bytes() > fit.bytes() * 8;
        (too_small || too_big).then_some(fit)
    }

    /// Bytes of both arrays, both generations.
    pub fn bytes(self) -> u64 {
        let per_gen = u64::from(self.heads) * std::mem::size_of::<ClassHead>() as u64
            + u64::from(self.words) * 8;
        per_gen * u64::from(filter_common::GENERATIONS)
    }

    /// The room of arrays of `heads` and `words` entries, both
    /// generations.
    pub fn of_arrays(heads: u32, words: u32) -> ClassRoom {
        ClassRoom {
            heads: heads / filter_common::GENERATIONS,
            words: words / filter_common::GENERATIONS,
        }
    }
}

/// Classes of one generation as the kernel stores them: all of them, or
/// those after another layout's ([`Layout::after`]).
#[derive(Debug, Default)]
pub struct Layout {
    /// Class number − [`Layout::start`]'s class → its head.
    pub heads: Vec<ClassHead>,
    /// Word index − [`Layout::start`]'s word → a non-zero word.
    pub words: Vec<u64>,
    /// Rule set → class number (relative to the generation), of the sets
    /// interned.
    index: SetIndex<u32>,
    /// The class and word, from the generation's first, this layout's
    /// first are.
    start: (u32, u32),
}

impl Layout {
    /// No class yet.
    pub fn new() -> Layout {
        Layout::default()
    }

    /// No class yet, numbering on from where `before` ends: the classes
    /// that change with each publish (endpoint masks) laid out after those
    /// that can be kept.
    pub fn after(before: &Layout) -> Layout {
        Layout {
            start: before.end(),
            ..Layout::default()
        }
    }

    /// The class and word, from the generation's first, after its last.
    pub fn end(&self) -> (u32, u32) {
        (
            self.start.0 + self.heads.len() as u32,
            self.start.1 + self.words.len() as u32,
        )
    }

    /// The class of `set`, added if new. `word_base` is the generation's
    /// first index in the word array. Errors name the capacity exceeded.
    pub fn intern(&mut self, set: &RuleSet, word_base: u32) -> Result<u32, String> {
        let key = set.keyed();
        if let Some(&id) = self.index.get(&key) {
            return Ok(id);
        }
        let id = self.push(set, word_base)?;
        self.index.insert(key, id);
        Ok(id)
    }

    /// Adds `set` as a new class, whether or not one holds it already:
    /// for sets known to differ (the compiler's classes), which need no
    /// lookup.
    pub fn push(&mut self, set: &RuleSet, word_base: u32) -> Result<u32, String> {
        if set.words().len() > WORDS as usize {
            return Err(format!(
                "a rule set reaches rule {}; a table holds {} rules",
                set.words().len() * 64,
                WORDS * 64
            ));
        }
        let id = self.end().0;
        if id >= CLASSES_PER_GEN {
            return Err(format!(
                "more than {CLASSES_PER_GEN} distinct rule sets (classes) in one policy generation"
            ));
        }
        let mut head = ClassHead {
            summary: [0; SUMMARY_WORDS],
            offset: [0; SUMMARY_WORDS],
            dense: 0,
            pad: 0,
        };
        for (s, chunk) in set.words().chunks(64).enumerate() {
            head.offset[s] = word_base + self.end().1;
            for (b, &w) in chunk.iter().enumerate() {
                if w != 0 {
                    head.summary[s] |= 1 << b;
                }
            }
            // Dense when that at most doubles the words stored: the kernel
            // then reads a word without counting the summary bits below it.
            if head.summary[s].count_ones() >= DENSE_FROM {
                head.dense |= 1 << s;
                self.words.extend(chunk);
                self.words.resize(self.words.len() + 64 - chunk.len(), 0);
            } else {
                self.words.extend(chunk.iter().filter(|&&w| w != 0));
            }
        }
        if self.end().1 > CLASS_WORDS_PER_GEN {
            return Err(format!(
                "the rule sets need more than {CLASS_WORDS_PER_GEN} non-zero 64-bit words in one policy generation"
            ));
        }
        self.heads.push(head);
        Ok(id)
    }
}

/// Word `w` of a class, read as the kernel reads it (`word_base` = 0).
#[cfg(test)]
fn word(head: &ClassHead, words: &[u64], w: usize) -> u64 {
    let (s, b) = (w / 64, w % 64);
    if head.summary[s] & (1 << b) == 0 {
        return 0;
    }
    let rank = if head.dense & (1 << s) != 0 {
        b as u32
    } else {
        (head.summary[s] & ((1u64 << b) - 1)).count_ones()
    };
    words[(head.offset[s] + rank) as usize]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn every_word_reads_back(sets in prop::collection::vec(
            prop::collection::vec(0usize..(WORDS as usize * 64), 0..3000), 1..20))
        {
            let sets: Vec<RuleSet> = sets.into_iter().map(|s| s.into_iter().collect()).collect();
            let mut layout = Layout::new();
            let ids: Vec<u32> = sets.iter().map(|s| layout.intern(s, 0).unwrap()).collect();
            for (set, id) in sets.iter().zip(ids) {
                let head = &layout.heads[id as usize];
                for w in 0..WORDS as usize {
                    let want = set.words().get(w).copied().unwrap_or(0);
                    prop_assert_eq!(word(head, &layout.words, w), want, "word {}", w);
                }
            }
        }
    }

    #[test]
    fn equal_sets_share_a_class_and_only_non_zero_words_are_stored() {
        let mut layout = Layout::new();
        let a: RuleSet = [3, 9000].into_iter().collect();
        let b: RuleSet = [3, 9000].into_iter().collect();
        assert_eq!(layout.intern(&a, 100), Ok(0));
        assert_eq!(layout.intern(&b, 100), Ok(0));
        assert_eq!(layout.words.len(), 2);
        assert_eq!(layout.heads[0].offset[0], 100);
        assert_eq!(
            layout.heads[0].offset[2], 101,
            "word 140 is in summary word 2"
        );
    }

    #[test]
    fn a_summary_word_with_many_rules_is_stored_dense() {
        let mut layout = Layout::new();
        // Words 0..40 non-zero (dense), then one word in summary word 1.
        let set: RuleSet = (0..40).map(|w| w * 64).chain([64 * 64 + 5]).collect();
        layout.intern(&set, 0).unwrap();
        let head = &layout.heads[0];
        assert_eq!(head.dense, 0b01);
        assert_eq!(head.offset[1], 64);
        assert_eq!(layout.words.len(), 65);
        assert_eq!(word(head, &layout.words, 39), 1);
        assert_eq!(word(head, &layout.words, 64), 1 << 5);
    }

    #[test]
    fn a_layout_after_another_numbers_on_from_it() {
        let mut first = Layout::new();
        let a: RuleSet = [3, 9000].into_iter().collect();
        first.push(&a, 100).unwrap();
        let mut then = Layout::after(&first);
        assert_eq!(then.start, (1, 2));
        let b: RuleSet = [5].into_iter().collect();
        assert_eq!(then.intern(&b, 100), Ok(1));
        assert_eq!(then.intern(&b, 100), Ok(1));
        assert_eq!(then.heads[0].offset[0], 102, "after the first's two words");
        assert_eq!(then.end(), (2, 3));
    }

    #[test]
    fn the_class_arrays_grow_past_their_room_and_shrink_below_an_eighth() {
        let room = ClassRoom::fitting(0, 0);
        assert_eq!(room, ClassRoom::MIN);
        assert_eq!(room.refit(100, 1000), None);
        assert_eq!(room.refit(1024, 16384), None, "a full room is kept");
        let grown = room.refit(1025, 10).expect("more classes than room");
        assert_eq!(grown.heads, 4096, "twice the need, a power of two");
        assert_eq!(grown.words, ClassRoom::MIN.words);
        assert!(room.refit(10, 16385).is_some(), "more words than room");
        let max = ClassRoom::fitting(u32::MAX, u32::MAX);
        assert_eq!(max, ClassRoom::MAX);
        assert_eq!(max.refit(CLASSES_PER_GEN, CLASS_WORDS_PER_GEN), None);
        let big = ClassRoom::fitting(20_000, 300_000);
        assert_eq!(big.refit(20_000, 300_000), None);
        assert_eq!(big.refit(2_500, 37_500), None, "an eighth of the need");
        assert_eq!(
            big.refit(100, 1000),
            Some(ClassRoom::MIN),
            "far less than an eighth"
        );
    }

    #[test]
    fn a_set_past_the_table_is_refused() {
        let mut layout = Layout::new();
        let big: RuleSet = [WORDS as usize * 64].into_iter().collect();
        assert!(layout.intern(&big, 0).is_err());
    }
}
