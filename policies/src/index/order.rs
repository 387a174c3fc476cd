//! Labels that follow key order (identity ids, service names), so that answers listing
//! identities or services sort them by comparing integers rather than strings: slots are
//! reused and assigned in arrival order, so they say nothing about order.
//!
//! A new entry takes a label between its neighbours' in the state's ordered map; when there
//! is no room left between them (after about 40 insertions at one place) every entry is
//! relabelled evenly, once, in O(n).

use std::ops::Bound;
use std::sync::Arc;

use imbl::OrdMap;

use super::records::{IdRecord, SvcRecord};
use super::Index;
use crate::model::IdentityId;
use crate::name::Name;

/// The gap left after the last entry, so that appending in order (as building does) never
/// runs out: 2^24 appends before a relabelling.
const STEP: u64 = 1 << 40;

/// A label strictly between two labels (either may be absent), if there is one.
fn between(before: Option<u64>, after: Option<u64>) -> Option<u64> {
    match (before, after) {
        (None, None) => Some(STEP),
        (Some(b), None) => b.checked_add(STEP),
        (None, Some(a)) => (a >= 2).then_some(a / 2),
        (Some(b), Some(a)) => (a > b && a - b >= 2).then(|| b + (a - b) / 2),
    }
}

/// The label for `key` from its neighbours' labels in `map` (`label_of` gives the label of an
/// indexed key), if there is room.
fn label<K: Ord + Clone, V: Clone>(
    map: &OrdMap<K, V>,
    key: &K,
    label_of: impl Fn(&K) -> Option<u64>,
) -> Option<u64> {
    let before = map.range(..key).next_back().and_then(|(k, _)| label_of(k));
    let after =
        (map.range((Bound::Excluded(key), Bound::Unbounded)).next()).and_then(|(k, _)| label_of(k));
    between(before, after)
}

/// Evenly spaced labels for `n` entries.
fn spacing(n: usize) -> u64 {
    (u64::MAX / (n as u64 + 2)).min(STEP)
}

impl Index {
    /// The label for a new identity stored under `id`; relabels the others if needed.
    pub(super) fn identity_label(&mut self, id: &IdentityId) -> u64 {
        let of = |k: &IdentityId| self.identities.get(k).map(|r| r.order);
        if let Some(l) = label(&self.state.identities, id, of) {
            return l;
        }
        let step = spacing(self.state.identities.len());
        let mut next = step;
        let mut mine = step;
        for key in self.state.identities.keys() {
            if key == id {
                mine = next;
            } else if let Some(record) = self.identities.get(key) {
                let record = Arc::new(IdRecord {
                    order: next,
                    ..IdRecord::clone(record)
                });
                self.identity_slots.set(record.slot, Arc::clone(&record));
                self.identities.insert(key.clone(), record);
            }
            next += step;
        }
        mine
    }

    /// The label for a new service stored under `name`; relabels the others if needed.
    pub(super) fn service_label(&mut self, name: &Name) -> u64 {
        let of = |k: &Name| self.services.get(k).map(|r| r.order);
        if let Some(l) = label(&self.state.services, name, of) {
            return l;
        }
        let step = spacing(self.state.services.len());
        let mut next = step;
        let mut mine = step;
        for key in self.state.services.keys() {
            if key == name {
                mine = next;
            } else if let Some(record) = self.services.get(key) {
                let record = Arc::new(SvcRecord {
                    order: next,
                    ..SvcRecord::clone(record)
                });
                self.service_slots.set(record.slot, Arc::clone(&record));
                self.services.insert(key.clone(), record);
            }
            next += step;
        }
        mine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_fall_between_and_run_out() {
        assert_eq!(between(Some(10), Some(20)), Some(15));
        assert_eq!(between(Some(10), Some(11)), None);
        assert_eq!(between(None, Some(1)), None);
        assert_eq!(between(Some(u64::MAX - 1), None), None);
        assert!(between(None, None).is_some());
    }
}
