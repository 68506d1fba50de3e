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
            first: set.first_from(0).map_or(0, |r| r as u32 + 1),
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
                let mut lowest = None;
                for w in 0..WORDS as usize {
                    let want = set.words().get(w).copied().unwrap_or(0);
                    let got = word(head, &layout.words, w);
                    prop_assert_eq!(got, want, "word {}", w);
                    if lowest.is_none() && got != 0 {
                        lowest = Some(w as u32 * 64 + got.trailing_zeros());
                    }
                }
                // The kernel starts its search at the highest of the
                // classes' `first`: the lowest rule read back, plus one.
                prop_assert_eq!(head.first, lowest.map_or(0, |r| r + 1));
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
    fn a_set_past_the_table_is_refused() {
        let mut layout = Layout::new();
        let big: RuleSet = [WORDS as usize * 64].into_iter().collect();
        assert!(layout.intern(&big, 0).is_err());
    }
}
