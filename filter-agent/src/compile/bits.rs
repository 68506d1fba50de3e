//! Bit operations on [`Bitmap`]s: bit `r` is rule `r`.

use filter_common::Bitmap;

/// Sets rule `r`.
pub fn set(b: &mut Bitmap, r: usize) {
    b.words[r / 64] |= 1 << (r % 64);
}

/// Whether rule `r` is set.
pub fn get(b: &Bitmap, r: usize) -> bool {
    b.words[r / 64] & (1 << (r % 64)) != 0
}

/// `a |= b`.
pub fn or(a: &mut Bitmap, b: &Bitmap) {
    a.words.iter_mut().zip(&b.words).for_each(|(x, y)| *x |= y);
}

/// `a &= b`.
pub fn and(a: &mut Bitmap, b: &Bitmap) {
    a.words.iter_mut().zip(&b.words).for_each(|(x, y)| *x &= y);
}

/// `a &= !b`.
pub fn and_not(a: &mut Bitmap, b: &Bitmap) {
    a.words.iter_mut().zip(&b.words).for_each(|(x, y)| *x &= !y);
}

/// The lowest rule at or after `start` that is set, as the kernel's verdict
/// loop finds it.
pub fn first_from(b: &Bitmap, start: usize) -> Option<usize> {
    (start / 64..b.words.len()).find_map(|w| {
        let mut x = b.words[w];
        if w == start / 64 {
            x &= u64::MAX << (start % 64);
        }
        (x != 0).then(|| w * 64 + x.trailing_zeros() as usize)
    })
}
