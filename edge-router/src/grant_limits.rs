//! The books behind a grant's `connections`, `rate` and `bandwidth` limits on this router: one
//! per (identity, service, policy), shared by all of that identity's connections and lanes, so
//! that opening more connections buys no more streams or bytes.
//!
//! The decisions are `umbra_policies::throttle`'s; this module keeps the books, the clock and
//! the guards. A stream charged to a grant holds a [`GrantSlot`] that gives its slot back when
//! the stream ends, and carries the grant's bandwidth [`Shaper`] (see `shaping`). The books are
//! bounded ([`MAX_GRANT_BOOKS`]): a book that holds nothing a fresh one would not (no open
//! stream, full buckets) is forgotten when its last stream ends or when room is needed, and
//! when every book is busy a new one is refused rather than grown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use umbra_policies::{
    admit_stream, Action, GrantBook, GrantLimit, IdentityId, Name, StreamPermit, Throughput,
    Timestamp,
};

use umbra_proto::verdict::Verdict;

use crate::policy::{Policy, PolicyRx};
use crate::shaping::Shaper;
use crate::stats::bump;
use crate::stream::ConnCtx;

/// The most grant books a router keeps (each is a few hundred bytes).
pub(crate) const MAX_GRANT_BOOKS: usize = 100_000;

/// A stream refused by a limit of the grant it came through: who, what, which policy, which
/// limit. This is the value to log, count and report to the controller's audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantLimitHit {
    /// The caller.
    pub identity: IdentityId,
    /// The service it dialed.
    pub service: Name,
    /// The granting policy whose limit refused it (the first by name when several grant).
    pub policy: Name,
    /// Which limit.
    pub limit: GrantLimit,
}

/// Why a stream was not charged to a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// A grant's limit.
    Grant(GrantLimitHit),
    /// Every book is busy: the router's own bound ([`MAX_GRANT_BOOKS`]).
    Full,
}

type Key = (IdentityId, Name, Name);

/// One identity's book for one grant to one service.
struct Entry {
    book: GrantBook,
    limits: Throughput,
    shaper: Option<Arc<Shaper>>,
}

impl Entry {
    fn is_idle(&mut self, now: Duration) -> bool {
        let shaper_full = self.shaper.as_ref().is_none_or(|s| s.is_full(now));
        self.book.is_idle(&self.limits, now) && shaper_full
    }
}

/// After a scan for idle books found none to forget, how long new books are refused without
/// another: a full table of busy books costs one scan (100,000 books, under the lock every
/// limited dial takes) per pause, not one per new stream.
const SCAN_PAUSE: Duration = Duration::from_millis(100);

/// The books, keyed by (identity, service, policy), at most `bound` of them.
pub(crate) struct Table {
    entries: HashMap<Key, Entry>,
    bound: usize,
    /// When the last scan for idle books freed too little.
    fruitless_at: Option<Duration>,
    /// Scans for idle books made.
    scans: u64,
}

impl Table {
    pub(crate) fn new(bound: usize) -> Table {
        Table {
            entries: HashMap::new(),
            bound,
            fruitless_at: None,
            scans: 0,
        }
    }

    /// Takes the books of `keys` out of the table, fresh ones for keys it has none for,
    /// forgetting idle books if the table would outgrow its bound. Every book taken must be put
    /// back ([`Table::put_back`]).
    fn take(
        &mut self,
        keys: Vec<(Key, Throughput)>,
        now: Duration,
    ) -> Result<Vec<(Key, Entry)>, Refused> {
        let missing = |t: &Table| {
            (keys.iter())
                .filter(|(k, _)| !t.entries.contains_key(k))
                .count()
        };
        let new = missing(self);
        if new > 0 && self.entries.len() + new > self.bound {
            if self.fruitless_at.is_some_and(|at| now < at + SCAN_PAUSE) {
                return Err(Refused::Full);
            }
            self.scans += 1;
            self.entries.retain(|_, e| !e.is_idle(now));
            if self.entries.len() + missing(self) > self.bound {
                self.fruitless_at = Some(now);
                return Err(Refused::Full);
            }
            self.fruitless_at = None;
        }
        let taken = (keys.into_iter()).map(|(key, limits)| {
            let mut entry = self.entries.remove(&key).unwrap_or_else(|| Entry {
                book: GrantBook::default(),
                limits,
                shaper: None,
            });
            entry.limits = limits;
            (key, entry)
        });
        Ok(taken.collect())
    }

    fn put_back(&mut self, taken: Vec<(Key, Entry)>) {
        self.entries.extend(taken);
    }

    /// Books held now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Every grant book on this router, and the instant its buckets count time from.
pub(crate) struct GrantBooks {
    table: Mutex<Table>,
    epoch: tokio::time::Instant,
}

impl GrantBooks {
    pub(crate) fn new(bound: usize) -> Arc<GrantBooks> {
        Arc::new(GrantBooks {
            table: Mutex::new(Table::new(bound)),
            epoch: tokio::time::Instant::now(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Time since the epoch: what the buckets take as `now`.
    pub(crate) fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Charges a dial stream that `permit` allowed to one of the grants that allow it, or says
    /// which limit refused it. `None`: no grant limits it (nothing to hold or shape).
    pub(crate) fn admit(
        self: &Arc<Self>,
        policy: &Policy,
        identity: &IdentityId,
        service: &Name,
        permit: &StreamPermit,
        t: Timestamp,
        rx: &PolicyRx,
    ) -> Result<Option<GrantSlot>, Refused> {
        let state = policy.index.state();
        // The usual case, no router limits on the first granting policy, costs one lookup.
        let first = state.policies.get(&permit.policy);
        if first.is_none_or(|p| p.limits.throughput().is_unlimited()) {
            return Ok(None);
        }
        let grants: Vec<(Name, Throughput)> = (policy.index)
            .granting_policies(identity, service.as_str(), Action::Dial, t)
            .into_iter()
            .map(|p| (p.name.clone(), p.limits.throughput()))
            .collect();
        if grants.iter().any(|(_, l)| l.is_unlimited()) {
            return Ok(None);
        }
        let now = self.now();
        let keys: Vec<(Key, Throughput)> = (grants.iter())
            .map(|(p, l)| ((identity.clone(), service.clone(), p.clone()), *l))
            .collect();
        let mut table = self.lock();
        // In policy-name order, as `admit_stream` wants them.
        let mut taken = table.take(keys, now)?;
        let decision = {
            let mut books: Vec<(Throughput, &mut GrantBook)> = (taken.iter_mut())
                .map(|(_, e)| (e.limits, &mut e.book))
                .collect();
            admit_stream(&mut books, now)
        };
        let slot = match decision {
            Ok(Some(i)) => taken.get_mut(i).map(|(key, entry)| {
                let shaper = entry.limits.bandwidth.map(|b| match &entry.shaper {
                    Some(s) => {
                        s.follow(b);
                        Arc::clone(s)
                    }
                    None => {
                        let s = Shaper::new(self.epoch, b, key.2.clone(), rx.clone(), now);
                        entry.shaper = Some(Arc::clone(&s));
                        s
                    }
                });
                GrantSlot {
                    books: Arc::clone(self),
                    key: key.clone(),
                    shaper,
                }
            }),
            Ok(None) => None,
            Err(limit) => {
                let policy = grants.first().map(|(p, _)| p.clone());
                let hit = GrantLimitHit {
                    identity: identity.clone(),
                    service: service.clone(),
                    policy: policy.unwrap_or_else(|| permit.policy.clone()),
                    limit,
                };
                table.put_back(taken);
                return Err(Refused::Grant(hit));
            }
        };
        table.put_back(taken);
        Ok(slot)
    }

    /// A charged stream ended: frees its slot, and forgets the book if it now holds nothing.
    fn close(&self, key: &Key) {
        let now = self.now();
        let mut table = self.lock();
        if let Some(entry) = table.entries.get_mut(key) {
            entry.book.close();
            if entry.is_idle(now) {
                table.entries.remove(key);
            }
        }
    }

    /// Books held now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Charges a dial stream of `ctx`'s identity that `permit` allowed to its grant's books: the
/// slot to hold while it runs (`None`: no grant limits it), or the verdict to refuse it with,
/// already logged and counted. The one call `stream.rs` makes.
pub(crate) fn charge(
    ctx: &ConnCtx,
    policy: &Policy,
    service: &Name,
    permit: &StreamPermit,
) -> Result<Option<GrantSlot>, Verdict> {
    let shared = &ctx.shared;
    let t = shared.clock.timestamp();
    match (shared.grants).admit(policy, &ctx.id, service, permit, t, &shared.policy) {
        Ok(slot) => Ok(slot),
        Err(Refused::Grant(hit)) => {
            tracing::debug!(
                decision = "deny",
                action = "dial",
                identity = %hit.identity,
                service = %hit.service,
                policy = %hit.policy,
                limit = hit.limit.as_str(),
                "stream refused: grant limit"
            );
            bump(&shared.stats.grant_limited);
            shared.metrics.grant_limited(service, hit.limit.as_str());
            let (svc, policy) = (service.as_str(), Some(hit.policy.as_str()));
            (shared.reports).limited(&ctx.peer.spiffe, svc, "dial", policy, hit.limit.as_str());
            Err(Verdict::LIMIT)
        }
        Err(Refused::Full) => {
            crate::logbudget::budgeted!(
                shared.logs,
                warn,
                books = MAX_GRANT_BOOKS,
                "stream refused: grant books full"
            );
            bump(&shared.stats.limited);
            shared.metrics.refused("limited");
            let svc = service.as_str();
            (shared.reports).limited(&ctx.peer.spiffe, svc, "dial", None, "grant books full");
            Err(Verdict::LIMIT)
        }
    }
}

/// A stream's place in its grant's book: the slot is given back when it is dropped.
pub(crate) struct GrantSlot {
    books: Arc<GrantBooks>,
    key: Key,
    shaper: Option<Arc<Shaper>>,
}

impl GrantSlot {
    /// The grant's bandwidth shaper, if it limits bandwidth.
    pub(crate) fn shaper(&self) -> Option<&Shaper> {
        self.shaper.as_deref()
    }
}

impl Drop for GrantSlot {
    fn drop(&mut self) {
        self.books.close(&self.key);
    }
}

#[cfg(test)]
#[path = "grant_limits_tests.rs"]
mod tests;
