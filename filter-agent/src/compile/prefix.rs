//! Prefix sets → per-prefix rule bitmaps with longest-prefix-match meaning.
//!
//! A field (an address, or a port) is matched by each rule against a list of
//! positive prefixes (`nets`, `ports`) and negative ones (`notNets`,
//! `notPorts`). Put every prefix any rule names, plus the root, in one trie:
//! for a value whose longest match is prefix P, "the value is in q" holds
//! exactly for the q of the set that contain P. So the bitmap stored at P is
//! exact: rule r is in it iff r has no positive list or one of its positive
//! prefixes contains P, and none of its negative prefixes contains P
//! (docs/design.md, "The classifier").

use std::collections::BTreeMap;

use super::bits::RuleSet;

/// A prefix of a `width`-bit value, left-aligned in a `u128`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    /// Value bits, left-aligned; bits past `len` are zero.
    pub bits: u128,
    /// Prefix length in bits.
    pub len: u8,
}

impl Prefix {
    /// The whole space.
    pub const ROOT: Prefix = Prefix { bits: 0, len: 0 };

    /// `value` of `width` bits, its first `len` bits significant.
    pub fn new(value: u128, width: u8, len: u8) -> Prefix {
        let bits = value << (128 - u32::from(width));
        Prefix {
            bits: bits & mask(len),
            len,
        }
    }

    /// Whether `self` contains `other`.
    pub fn contains(self, other: Prefix) -> bool {
        self.len <= other.len && (self.bits ^ other.bits) & mask(self.len) == 0
    }

    /// The first `width` bits of the value, right-aligned.
    pub fn value(self, width: u8) -> u128 {
        self.bits >> (128 - u32::from(width))
    }
}

fn mask(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

/// One rule's constraint on a field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldMatch {
    /// Empty: no positive constraint.
    pub pos: Vec<Prefix>,
    /// The value must be in none of these.
    pub neg: Vec<Prefix>,
}

/// Computes the rule set of every prefix named by `rules` (plus the root)
/// and hands each to `class`, which interns it; returns prefix → class in
/// prefix order. `active` holds the rules that take part at all (for an
/// address field: the rules not dropped for this family).
///
/// Inputs are sparse (each prefix lists the rules naming it), and each
/// prefix's dense set is built from its parent's and interned at once, so
/// memory follows the trie depth, not the number of prefixes.
pub fn classify<'a>(
    rules: impl IntoIterator<Item = &'a FieldMatch>,
    active: &RuleSet,
    class: &mut impl FnMut(RuleSet) -> u32,
) -> Vec<(Prefix, u32)> {
    let mut direct: BTreeMap<Prefix, (Vec<usize>, Vec<usize>)> = BTreeMap::new();
    let mut no_pos = RuleSet::new();
    direct.entry(Prefix::ROOT).or_default();
    for (r, m) in rules.into_iter().enumerate() {
        if m.pos.is_empty() {
            no_pos.insert(r);
        }
        for p in &m.pos {
            direct.entry(*p).or_default().0.push(r);
        }
        for p in &m.neg {
            direct.entry(*p).or_default().1.push(r);
        }
    }
    // BTreeMap order on (bits, len) visits every prefix after all prefixes
    // that contain it, so a stack of open ancestors gives each its parent.
    let mut out = Vec::with_capacity(direct.len());
    let mut stack: Vec<(Prefix, RuleSet, RuleSet)> = Vec::new();
    for (p, (pos, neg)) in direct {
        while stack.last().is_some_and(|(q, _, _)| !q.contains(p)) {
            stack.pop();
        }
        let (mut hit, mut miss) = stack
            .last()
            .map(|(_, h, m)| (h.clone(), m.clone()))
            .unwrap_or_default();
        for r in pos {
            hit.insert(r);
        }
        for r in neg {
            miss.insert(r);
        }
        let mut result = no_pos.clone();
        result.union_with(&hit);
        result.subtract(&miss);
        result.intersect_with(active);
        out.push((p, class(result)));
        stack.push((p, hit, miss));
    }
    out
}

/// Splits the inclusive range `first..=last` of a `width`-bit field into the
/// fewest aligned prefixes (at most `2 * width - 2`).
pub fn range_to_prefixes(first: u32, last: u32, width: u8) -> Vec<Prefix> {
    let mut out = Vec::new();
    let mut lo = u64::from(first);
    let hi = u64::from(last);
    while lo <= hi {
        // Largest aligned block starting at lo that stays within hi.
        let mut size_bits = if lo == 0 {
            u32::from(width)
        } else {
            lo.trailing_zeros().min(u32::from(width))
        };
        while lo + (1u64 << size_bits) - 1 > hi {
            size_bits -= 1;
        }
        out.push(Prefix::new(u128::from(lo), width, width - size_bits as u8));
        lo += 1u64 << size_bits;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Prefix {
        let n: ipnetwork::Ipv4Network = s.parse().expect("test CIDR");
        Prefix::new(u128::from(u32::from(n.network())), 32, n.prefix())
    }

    #[test]
    fn ranges_decompose_exactly() {
        for (a, b) in [
            (1, 65535),
            (30000, 32767),
            (80, 80),
            (0, 65535),
            (1024, 2047),
            (5, 9),
        ] {
            let ps = range_to_prefixes(a, b, 16);
            assert!(ps.len() <= 30, "{a}:{b} -> {}", ps.len());
            for v in [a.saturating_sub(1), a, b, (a + b) / 2, b + 1]
                .into_iter()
                .filter(|v| *v <= 65535)
            {
                let inside = ps
                    .iter()
                    .any(|p| p.contains(Prefix::new(u128::from(v), 16, 16)));
                assert_eq!(inside, (a..=b).contains(&v), "{v} in {a}:{b}");
            }
        }
    }

    #[test]
    fn rule_sets_follow_longest_match() {
        let all: RuleSet = (0..3).collect();
        let rules = vec![
            FieldMatch {
                pos: vec![v4("10.0.0.0/8")],
                neg: vec![],
            },
            FieldMatch {
                pos: vec![],
                neg: vec![v4("10.1.0.0/16")],
            },
            FieldMatch::default(),
        ];
        let mut sets = Vec::new();
        let m: std::collections::BTreeMap<Prefix, u32> = classify(&rules, &all, &mut |s| {
            sets.push(s);
            (sets.len() - 1) as u32
        })
        .into_iter()
        .collect();
        let get = |s: &str| {
            (0..3)
                .filter(|r| sets[m[&v4(s)] as usize].contains(*r))
                .collect::<Vec<_>>()
        };
        assert_eq!(get("0.0.0.0/0"), vec![1, 2]);
        assert_eq!(get("10.0.0.0/8"), vec![0, 1, 2]);
        assert_eq!(get("10.1.0.0/16"), vec![0, 2]);
    }
}
