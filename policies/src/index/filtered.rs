//! A sorted list of policies with a small bitmap of its members, for the lookup's hot loop.

use super::rows::first_common;

/// A sorted list with a small bitmap of its members (each slot sets bit `slot % 512`), stored
/// next to it, for answering "which of these is the first in the list" without a merge.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Filtered<'a> {
    bits: &'a [u32],
    list: &'a [u32],
}

/// Words in a filter.
pub(crate) const FILTER_WORDS: usize = 16;

/// Longer lists set most bits of the filter, which then filters nothing.
const FILTER_MAX: usize = 96;

impl<'a> Filtered<'a> {
    /// The filter of `list`, to store before it.
    pub(crate) fn bits_of(list: &[u32]) -> [u32; FILTER_WORDS] {
        let mut bits = [0; FILTER_WORDS];
        for &x in list {
            bits[(x as usize / 32) % FILTER_WORDS] |= 1 << (x % 32);
        }
        bits
    }

    /// A stored filter and its list.
    pub(crate) fn new(bits: &'a [u32], list: &'a [u32]) -> Self {
        debug_assert_eq!(bits.len(), FILTER_WORDS);
        Filtered { bits, list }
    }

    /// The list.
    pub(crate) fn list(&self) -> &'a [u32] {
        self.list
    }

    /// The first slot of `sorted` that is in the list: the lookup's hot loop.
    ///
    /// Each slot of `sorted` is tested against the filter independently of the others, so the
    /// processor tests many at once, and only the few that pass are looked up in the list.
    /// This beats any merge, whose every step waits on the one before. Long lists, whose
    /// filters are nearly full, are merged instead.
    pub(crate) fn first_of(&self, sorted: &[u32]) -> Option<u32> {
        if self.list.len() > FILTER_MAX {
            return first_common(sorted, self.list);
        }
        sorted.iter().copied().find(|&x| {
            self.bits[(x as usize / 32) % FILTER_WORDS] & (1 << (x % 32)) != 0
                && self.list.binary_search(&x).is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sorted(max_len: usize) -> impl Strategy<Value = Vec<u32>> {
        proptest::collection::btree_set(0u32..2000, 0..max_len)
            .prop_map(|s| s.into_iter().collect())
    }

    proptest! {
        #[test]
        fn finds_the_first_common_slot(a in sorted(60), b in sorted(150)) {
            let bits = Filtered::bits_of(&b);
            let want = a.iter().copied().find(|x| b.contains(x));
            prop_assert_eq!(Filtered::new(&bits, &b).first_of(&a), want);
        }
    }
}
