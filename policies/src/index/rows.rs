//! Sorted lists of small integers, the set operations on them that the index answers
//! questions with, and tables of such lists packed into one allocation.
//!
//! Every relation of the index (identity to policies, service to policies, policy to services,
//! policy to identities) is made of sorted lists of `u32` slots. Packing a table of them back
//! to back (compressed sparse rows) keeps a 100,000-identity index to a handful of allocations
//! and each row contiguous in memory.

/// A table of rows, each a sorted, duplicate-free list of slots.
#[derive(Debug, Clone)]
pub(crate) struct Rows {
    /// `starts[r]..starts[r + 1]` is row `r` in `items`.
    starts: Vec<usize>,
    items: Vec<u32>,
}

impl Default for Rows {
    fn default() -> Self {
        Rows {
            starts: vec![0],
            items: Vec::new(),
        }
    }
}

impl Rows {
    /// Appends a row; the caller passes it sorted and without duplicates.
    pub(crate) fn push(&mut self, row: impl IntoIterator<Item = u32>) {
        self.items.extend(row);
        debug_assert!(self.items[self.starts[self.starts.len() - 1]..]
            .windows(2)
            .all(|w| w[0] < w[1]));
        self.starts.push(self.items.len());
    }

    /// Row `r`. Slots are only ever made by the index itself, so `r` is always in range.
    pub(crate) fn row(&self, r: u32) -> &[u32] {
        let r = r as usize;
        &self.items[self.starts[r]..self.starts[r + 1]]
    }

    /// The number of rows.
    pub(crate) fn len(&self) -> usize {
        self.starts.len() - 1
    }

    /// The transposed table with `columns` rows: row `c` lists the rows that contain `c`.
    /// Rows come out sorted because they are filled in row order.
    pub(crate) fn transpose(&self, columns: usize) -> Rows {
        let mut starts = vec![0usize; columns + 1];
        for &c in &self.items {
            starts[c as usize + 1] += 1;
        }
        for c in 0..columns {
            starts[c + 1] += starts[c];
        }
        let mut fill = starts.clone();
        let mut items = vec![0u32; self.items.len()];
        for r in 0..self.len() {
            for &c in self.row(slot(r)) {
                items[fill[c as usize]] = slot(r);
                fill[c as usize] += 1;
            }
        }
        Rows { starts, items }
    }

    /// Heap bytes held, for capacity planning.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.starts.capacity() * size_of::<usize>() + self.items.capacity() * size_of::<u32>()
    }
}

/// A position as a slot. The index refuses nothing, so a state with more than `u32::MAX`
/// entries of one kind (which could not fit in memory anyway) is a bug, not an input error.
pub(crate) fn slot(i: usize) -> u32 {
    u32::try_from(i).expect("fewer than 2^32 entries of one kind")
}

/// The slots found in both sorted lists, in order. Walks the shorter list and gallops through
/// the longer one, so a short row against a long one costs O(short · log long).
pub(crate) fn common<'a>(a: &'a [u32], b: &'a [u32]) -> impl Iterator<Item = u32> + 'a {
    let (mut small, mut large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    std::iter::from_fn(move || {
        while let Some((&x, rest)) = small.split_first() {
            small = rest;
            large = &large[lower_bound(large, x)..];
            match large.first() {
                None => small = &[],
                Some(&y) if y == x => {
                    large = &large[1..];
                    return Some(x);
                }
                Some(_) => {}
            }
        }
        None
    })
}

/// The smallest slot found in both sorted lists: the lookup's hot loop.
///
/// A plain merge is bound by the latency of one compare per step, each depending on the one
/// before. Comparing blocks of eight against eight at once (the compiler vectorizes the 64
/// comparisons) cuts the dependent steps eightfold. A short list against a much longer one
/// gallops instead.
pub(crate) fn first_common(a: &[u32], b: &[u32]) -> Option<u32> {
    let (small, large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    if small.is_empty() {
        return None;
    }
    if large.len() > GALLOP_RATIO * small.len() {
        return common(small, large).next();
    }
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (x, y) = (block(a, i), block(b, j));
        if x.iter().any(|v| y.contains(v)) {
            // Both blocks are sorted and everything smaller was passed: the first of `x`
            // found in `y` is the smallest common slot.
            return x.iter().copied().find(|v| y.contains(v));
        }
        let (x_max, y_max) = (x[BLOCK - 1], y[BLOCK - 1]);
        i += if x_max <= y_max { BLOCK } else { 0 };
        j += if y_max <= x_max { BLOCK } else { 0 };
    }
    None
}

const BLOCK: usize = 8;

/// How much longer one list must be than the other before galloping beats block merging.
const GALLOP_RATIO: usize = 32;

/// `BLOCK` slots of `s` from `at`, padded with the list's last slot (a real member, so the
/// padding never invents a match). `at` is in range. Written as a fixed-size loop rather than
/// a copy of a variable-length slice, which would cost a call to `memmove` per block.
fn block(s: &[u32], at: usize) -> [u32; BLOCK] {
    let last = s.len() - 1;
    std::array::from_fn(|k| s[(at + k).min(last)])
}

/// The first index of `s` whose value is at least `x`, by exponential then binary search, so
/// that it is cheap when the answer is near the front.
fn lower_bound(s: &[u32], x: u32) -> usize {
    match s.first() {
        Some(&v) if v < x => {}
        _ => return 0,
    }
    let mut bound = 1;
    while bound < s.len() && s[bound] < x {
        bound *= 2;
    }
    let lo = bound / 2 + 1;
    let hi = (bound + 1).min(s.len());
    lo + s[lo..hi].partition_point(|&v| v < x)
}

/// The sorted union of some rows over slots `0..universe`. Sorts when the rows are short
/// compared to the universe, and marks a bitmap when they are not (a policy on `#all`).
pub(crate) fn union<'a>(rows: impl Iterator<Item = &'a [u32]>, universe: usize) -> Vec<u32> {
    let rows: Vec<&[u32]> = rows.filter(|r| !r.is_empty()).collect();
    match rows.as_slice() {
        [] => return Vec::new(),
        [one] => return one.to_vec(),
        _ => {}
    }
    let total: usize = rows.iter().map(|r| r.len()).sum();
    if total.saturating_mul(16) < universe {
        let mut all: Vec<u32> = rows.concat();
        all.sort_unstable();
        all.dedup();
        return all;
    }
    let mut bits = vec![0u64; universe.div_ceil(64)];
    for &x in rows.iter().flat_map(|r| r.iter()) {
        bits[x as usize / 64] |= 1 << (x % 64);
    }
    let mut out = Vec::with_capacity(total.min(universe));
    for (w, &word) in bits.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            out.push(slot(w * 64) + word.trailing_zeros());
            word &= word - 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn sorted() -> impl Strategy<Value = Vec<u32>> {
        proptest::collection::btree_set(0u32..200, 0..60).prop_map(|s| s.into_iter().collect())
    }

    proptest! {
        #[test]
        fn common_is_intersection(a in sorted(), b in sorted()) {
            let want: Vec<u32> = a.iter().copied().filter(|x| b.contains(x)).collect();
            prop_assert_eq!(common(&a, &b).collect::<Vec<_>>(), want);
        }

        #[test]
        fn first_common_is_the_smallest_common(a in sorted(), b in sorted()) {
            let want = a.iter().copied().find(|x| b.contains(x));
            prop_assert_eq!(first_common(&a, &b), want);
            prop_assert_eq!(first_common(&b, &a), want);
        }

        #[test]
        fn first_common_on_skewed_lists(
            a in proptest::collection::btree_set(0u32..5000, 0..4),
            b in proptest::collection::btree_set(0u32..5000, 100..400),
        ) {
            let (a, b): (Vec<u32>, Vec<u32>) = (a.into_iter().collect(), b.into_iter().collect());
            let want = a.iter().copied().find(|x| b.contains(x));
            prop_assert_eq!(first_common(&a, &b), want);
        }

        #[test]
        fn lower_bound_is_partition_point(a in sorted(), x in 0u32..210) {
            prop_assert_eq!(lower_bound(&a, x), a.partition_point(|&v| v < x));
        }

        #[test]
        fn union_is_set_union(rows in proptest::collection::vec(sorted(), 0..5), universe in 200usize..20_000) {
            let want: BTreeSet<u32> = rows.iter().flatten().copied().collect();
            let got = union(rows.iter().map(|r| r.as_slice()), universe);
            prop_assert_eq!(got, want.into_iter().collect::<Vec<_>>());
        }

        #[test]
        fn transpose_twice_is_identity(rows in proptest::collection::vec(sorted(), 0..8)) {
            let mut t = Rows::default();
            for r in &rows {
                t.push(r.iter().copied());
            }
            let back = t.transpose(200).transpose(rows.len());
            for (i, r) in rows.iter().enumerate() {
                prop_assert_eq!(back.row(slot(i)), r.as_slice());
            }
        }
    }
}
