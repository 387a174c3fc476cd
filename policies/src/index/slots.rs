//! Persistent building blocks of the index: sets of slots and tables of records by slot.
//!
//! Every part of the index is persistent (shared between versions, copied only along the path
//! a change touches), so that cloning an index is O(1) and applying a change costs what it
//! touches. Sets of slots are small sorted arrays while short (most are: one identity per
//! name, a few policies per role) and B-trees once long (the identities holding a popular
//! role), so that neither a million small sets nor an update of a long one is expensive.

use std::sync::Arc;

use imbl::{OrdSet, Vector};

use super::trie::Trie;

/// Longest set kept as a sorted array; past it, a B-tree.
const SMALL_MAX: usize = 32;

/// A persistent set of slots.
#[derive(Clone, Debug)]
pub(crate) enum SlotSet {
    /// Sorted, without duplicates, at most `SMALL_MAX` long (empty without allocating).
    Small(Option<Arc<[u32]>>),
    /// Longer sets.
    Big(OrdSet<u32>),
}

impl Default for SlotSet {
    fn default() -> Self {
        SlotSet::Small(None)
    }
}

impl SlotSet {
    /// The set of these sorted, duplicate-free slots.
    pub(crate) fn from_sorted(slots: Vec<u32>) -> Self {
        debug_assert!(slots.windows(2).all(|w| w[0] < w[1]));
        if slots.is_empty() {
            SlotSet::Small(None)
        } else if slots.len() <= SMALL_MAX {
            SlotSet::Small(Some(slots.into()))
        } else {
            SlotSet::Big(slots.into_iter().collect())
        }
    }

    /// Whether `x` is in the set.
    #[cfg(test)]
    pub(crate) fn contains(&self, x: u32) -> bool {
        match self {
            SlotSet::Small(s) => s.as_deref().unwrap_or(&[]).binary_search(&x).is_ok(),
            SlotSet::Big(s) => s.contains(&x),
        }
    }

    /// The number of slots.
    pub(crate) fn len(&self) -> usize {
        match self {
            SlotSet::Small(s) => s.as_deref().map_or(0, <[u32]>::len),
            SlotSet::Big(s) => s.len(),
        }
    }

    /// Whether the set is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with each slot in increasing order (a plain loop: the lookup's hot path).
    #[inline]
    pub(crate) fn for_each(&self, mut f: impl FnMut(u32)) {
        match self {
            SlotSet::Small(s) => {
                for &x in s.as_deref().unwrap_or(&[]) {
                    f(x);
                }
            }
            SlotSet::Big(s) => {
                for &x in s {
                    f(x);
                }
            }
        }
    }

    /// The slots in increasing order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let (small, big) = match self {
            SlotSet::Small(s) => (s.as_deref().unwrap_or(&[]), None),
            SlotSet::Big(s) => (&[][..], Some(s.iter().copied())),
        };
        small.iter().copied().chain(big.into_iter().flatten())
    }

    /// Adds `x`.
    pub(crate) fn insert(&mut self, x: u32) {
        match self {
            SlotSet::Big(s) => {
                s.insert(x);
            }
            SlotSet::Small(s) => {
                let old = s.as_deref().unwrap_or(&[]);
                let Err(at) = old.binary_search(&x) else {
                    return;
                };
                let mut new = Vec::with_capacity(old.len() + 1);
                new.extend_from_slice(&old[..at]);
                new.push(x);
                new.extend_from_slice(&old[at..]);
                *self = SlotSet::from_sorted(new);
            }
        }
    }

    /// Removes `x`.
    pub(crate) fn remove(&mut self, x: u32) {
        match self {
            SlotSet::Big(s) => {
                s.remove(&x);
                if s.len() <= SMALL_MAX / 2 {
                    *self = SlotSet::from_sorted(s.iter().copied().collect());
                }
            }
            SlotSet::Small(s) => {
                let old = s.as_deref().unwrap_or(&[]);
                let Ok(at) = old.binary_search(&x) else {
                    return;
                };
                let mut new = old.to_vec();
                new.remove(at);
                *self = SlotSet::from_sorted(new);
            }
        }
    }
}

/// Records by slot, with a free list so that slots are reused and the table stays as long as
/// the most records held at once.
#[derive(Clone, Debug)]
pub(crate) struct Slots<T: Clone> {
    by_slot: Trie<T>,
    free: Vector<u32>,
    len: usize,
}

impl<T: Clone> Default for Slots<T> {
    fn default() -> Self {
        Slots {
            by_slot: Trie::default(),
            free: Vector::new(),
            len: 0,
        }
    }
}

impl<T: Clone> Slots<T> {
    /// Stores `value` in a free slot and returns it.
    pub(crate) fn add(&mut self, value: T) -> u32 {
        self.len += 1;
        match self.free.pop_back() {
            Some(slot) => {
                self.by_slot.set(slot as usize, Some(value));
                slot
            }
            None => {
                self.by_slot.push(Some(value));
                slot(self.by_slot.len() - 1)
            }
        }
    }

    /// The slot the next [`Slots::add`] will use.
    pub(crate) fn next_slot(&self) -> u32 {
        match self.free.back() {
            Some(&slot) => slot,
            None => slot(self.by_slot.len()),
        }
    }

    /// Replaces the record in a used slot.
    pub(crate) fn set(&mut self, slot: u32, value: T) {
        debug_assert!(self.get(slot).is_some());
        self.by_slot.set(slot as usize, Some(value));
    }

    /// Frees a used slot.
    pub(crate) fn remove(&mut self, slot: u32) {
        if self.get(slot).is_some() {
            self.by_slot.set(slot as usize, None);
            self.len -= 1;
            self.free.push_back(slot);
        }
    }

    /// The record in `slot`, if it is used, to change in place (see [`Trie::get_mut`]).
    pub(crate) fn get_mut(&mut self, slot: u32) -> Option<&mut T> {
        self.by_slot.get_mut(slot as usize)
    }

    /// The record in `slot`, if it is used.
    pub(crate) fn get(&self, slot: u32) -> Option<&T> {
        self.by_slot.get(slot as usize)
    }

    /// The number of used slots.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// One more than the highest slot ever used: every slot is below it.
    pub(crate) fn bound(&self) -> usize {
        self.by_slot.len()
    }

    /// Every record, in slot order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.by_slot.iter()
    }
}

/// `slots` (all below `bound`) sorted and without duplicates: by sorting when they are few
/// compared to `bound`, else through a bitmap (a union of long lists, as `#all` makes).
pub(crate) fn sorted_unique(mut slots: Vec<u32>, bound: usize) -> Vec<u32> {
    if slots.len().saturating_mul(16) < bound {
        slots.sort_unstable();
        slots.dedup();
        return slots;
    }
    let mut bits = vec![0u64; bound.div_ceil(64)];
    for &x in &slots {
        if let Some(word) = bits.get_mut(x as usize / 64) {
            *word |= 1 << (x % 64);
        }
    }
    slots.clear();
    for (w, &word) in bits.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            slots.push(slot(w * 64) + word.trailing_zeros());
            word &= word - 1;
        }
    }
    slots
}

/// The union of `sets` (all slots below `bound`), sorted: gathered and sorted when small
/// compared to `bound`, else marked in a bitmap (a union of long sets, as `#all` makes).
pub(crate) fn union(sets: &[&SlotSet], bound: usize) -> Vec<u32> {
    let total: usize = sets.iter().map(|s| s.len()).sum();
    if total.saturating_mul(16) < bound {
        let mut all = Vec::with_capacity(total);
        for set in sets {
            set.for_each(|x| all.push(x));
        }
        all.sort_unstable();
        all.dedup();
        return all;
    }
    let mut bits = vec![0u64; bound.div_ceil(64)];
    for set in sets {
        set.for_each(|x| {
            if let Some(word) = bits.get_mut(x as usize / 64) {
                *word |= 1 << (x % 64);
            }
        });
    }
    let mut out = Vec::with_capacity(total.min(bound));
    for (w, &word) in bits.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            out.push(slot(w * 64) + word.trailing_zeros());
            word &= word - 1;
        }
    }
    out
}

/// A position as a slot. The index refuses nothing, so a state with more than `u32::MAX`
/// entries of one kind (which could not fit in memory anyway) is a bug, not an input error.
pub(crate) fn slot(i: usize) -> u32 {
    u32::try_from(i).expect("fewer than 2^32 entries of one kind")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn slot_sets_behave_like_sets(ops in proptest::collection::vec((any::<bool>(), 0u32..80), 0..300)) {
            let mut set = SlotSet::default();
            let mut model = BTreeSet::new();
            for (add, x) in ops {
                if add {
                    set.insert(x);
                    model.insert(x);
                } else {
                    set.remove(x);
                    model.remove(&x);
                }
                prop_assert_eq!(set.len(), model.len());
                prop_assert_eq!(set.contains(x), model.contains(&x));
            }
            prop_assert_eq!(set.iter().collect::<Vec<_>>(), model.into_iter().collect::<Vec<_>>());
        }

        #[test]
        fn sorted_unique_is_the_sorted_set(v in proptest::collection::vec(0u32..300, 0..400)) {
            let want: Vec<u32> = v.iter().copied().collect::<BTreeSet<_>>().into_iter().collect();
            prop_assert_eq!(sorted_unique(v, 300), want);
        }

        #[test]
        fn union_is_the_sorted_union(sets in proptest::collection::vec(proptest::collection::btree_set(0u32..300, 0..80), 0..6)) {
            let want: Vec<u32> = sets.iter().flatten().copied().collect::<BTreeSet<_>>().into_iter().collect();
            let sets: Vec<SlotSet> = sets.into_iter().map(|s| SlotSet::from_sorted(s.into_iter().collect())).collect();
            let refs: Vec<&SlotSet> = sets.iter().collect();
            prop_assert_eq!(union(&refs, 300), want);
        }

        #[test]
        fn slots_reuse_freed_slots(ops in proptest::collection::vec(any::<bool>(), 0..100)) {
            let mut slots = Slots::default();
            let mut used = BTreeSet::new();
            for add in ops {
                if add || used.is_empty() {
                    let s = slots.add(7u8);
                    prop_assert!(used.insert(s));
                } else {
                    let s = *used.iter().next().unwrap();
                    slots.remove(s);
                    used.remove(&s);
                }
                prop_assert_eq!(slots.len(), used.len());
                // Never longer than the most slots used at once.
                prop_assert!(slots.by_slot.len() <= 100);
            }
        }
    }
}
