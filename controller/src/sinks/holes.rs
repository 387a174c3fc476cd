//! Ids a reader saw missing where ids can commit out of order (PostgreSQL assigns them at
//! insert, so a transaction still open holds an id below rows already committed): a sink looks
//! again for each missing id for a grace period, then gives it up (an id can be missing for
//! good: a rolled-back transaction, a pruned row). Sans I/O; `now` is an argument.

use std::collections::BTreeMap;

use umbra_policies::Timestamp;

/// Most missing ids tracked; the lowest (oldest) are given up first.
pub const MAX_HOLES: usize = 1024;
/// How long a missing id is looked for: longer than a command's commit can be held up (the
/// shared store's lock wait is 30 s).
pub const GRACE_SECS: u64 = 60;

/// The missing ids and when each was first seen missing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Holes(BTreeMap<u64, Timestamp>);

impl Holes {
    /// Records the ids missing between `after` and each of `ids` (ascending, above `after`)
    /// that a read returned at `now`.
    pub fn saw(&mut self, after: u64, ids: &[u64], now: Timestamp) {
        let mut prev = after;
        for &id in ids {
            let from = prev
                .saturating_add(1)
                .max(id.saturating_sub(MAX_HOLES as u64));
            for missing in from..id {
                self.0.entry(missing).or_insert(now);
            }
            prev = prev.max(id);
        }
        while self.0.len() > MAX_HOLES {
            self.0.pop_first();
        }
    }

    /// The ids to look for again.
    pub fn wanted(&self) -> Vec<u64> {
        self.0.keys().copied().collect()
    }

    /// An id turned up (and was delivered).
    pub fn filled(&mut self, id: u64) {
        self.0.remove(&id);
    }

    /// Gives up ids missing for longer than `grace_secs` at `now`.
    pub fn expire(&mut self, now: Timestamp, grace_secs: u64) {
        self.0
            .retain(|_, seen| now.0.saturating_sub(seen.0) <= grace_secs);
    }

    /// Whether nothing is missing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_tracked_filled_expired_and_bounded() {
        let t = Timestamp(1000);
        let mut h = Holes::default();
        h.saw(10, &[11, 12, 15, 16], t);
        assert_eq!(h.wanted(), [13, 14]);
        h.filled(13);
        assert_eq!(h.wanted(), [14]);
        // Seen again later: the first sighting counts.
        h.saw(16, &[18], t.plus(30));
        h.expire(t.plus(GRACE_SECS), GRACE_SECS);
        assert_eq!(h.wanted(), [14, 17]);
        h.expire(t.plus(GRACE_SECS + 1), GRACE_SECS);
        assert_eq!(h.wanted(), [17]);
        h.expire(t.plus(1000), GRACE_SECS);
        assert!(h.is_empty());
        // A huge gap (a prune, a skip) tracks only the ids just below the row.
        h.saw(0, &[1_000_000], t);
        assert_eq!(h.wanted().len(), MAX_HOLES);
        assert_eq!(h.wanted()[0], 1_000_000 - MAX_HOLES as u64);
        h.saw(1_000_000, &[1_000_000 + 10], t);
        assert_eq!(h.wanted().len(), MAX_HOLES, "bounded");
        assert_eq!(*h.wanted().last().unwrap(), 1_000_009);
    }
}
