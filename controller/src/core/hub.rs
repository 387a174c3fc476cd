//! The edge-view watch hub: every open `GET /v1/edge/watch`, by identity, and the one place a
//! commit wakes them. After each commit the controller computes once which identities' views
//! the batch can alter (`affected`) and wakes only their watchers; the others do no work.
//!
//! A wake is a [`Notify`] permit, not a queued message: it never blocks the committer, however
//! slow a watcher is, and a burst of commits before a watcher runs costs it one recomputation.
//! Nothing is lost by merging wakes, because a woken watcher recomputes its whole view from the
//! current state and sends the diff from what it sent last: a watcher that fell behind catches
//! up in one frame, never with a gap. Watchers per identity are capped by the controller's
//! stream slots (`MAX_STREAMS_PER_IDENTITY`); each holds one permit at most.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, Semaphore, SemaphorePermit};
use umbra_policies::IdentityId;

use super::affected::Affected;

/// Counters of the hub, for tests, benchmarks and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Watches open now.
    pub watchers: usize,
    /// Wakes handed to watchers by commits, in all (merged wakes count once each).
    pub woken: u64,
    /// Views recomputed by woken watchers, in all.
    pub recomputed: u64,
    /// Diffs sent, in all.
    pub diffs_sent: u64,
}

/// Recomputations that run at once; the rest wait their turn, so that a change that wakes
/// every watcher does not start a blocking thread for each (they would only queue on the
/// controller's lock).
const CONCURRENT_RECOMPUTATIONS: usize = 4;

/// Each identity's open watches: a key for unregistering, and the wake.
type Watches = HashMap<IdentityId, Vec<(u64, Arc<Notify>)>>;

/// Open watches by identity.
#[derive(Debug)]
pub struct WatchHub {
    watchers: Mutex<Watches>,
    next_key: AtomicU64,
    woken: AtomicU64,
    recomputed: AtomicU64,
    diffs_sent: AtomicU64,
    recomputing: Semaphore,
}

impl Default for WatchHub {
    fn default() -> Self {
        WatchHub {
            watchers: Mutex::default(),
            next_key: AtomicU64::new(0),
            woken: AtomicU64::new(0),
            recomputed: AtomicU64::new(0),
            diffs_sent: AtomicU64::new(0),
            recomputing: Semaphore::new(CONCURRENT_RECOMPUTATIONS),
        }
    }
}

impl WatchHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Watches> {
        self.watchers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a watch of `id`'s view; dropping the [`Watcher`] removes it.
    pub fn register(self: &Arc<Self>, id: &IdentityId) -> Watcher {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(Notify::new());
        (self.lock().entry(id.clone()).or_default()).push((key, wake.clone()));
        Watcher {
            hub: self.clone(),
            id: id.clone(),
            key,
            wake,
        }
    }

    /// Whether no watch is open (then a commit computes nothing for the hub).
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Wakes the watchers of the affected identities. Never blocks on a watcher.
    pub fn wake(&self, affected: &Affected) {
        if affected.is_empty() {
            return;
        }
        let watchers = self.lock();
        let mut woken = 0u64;
        let mut wake = |list: &Vec<(u64, Arc<Notify>)>| {
            for (_, n) in list {
                n.notify_one();
                woken += 1;
            }
        };
        if affected.everyone || affected.identities.len() > watchers.len() {
            // Walk the smaller side.
            for (id, list) in watchers.iter() {
                if affected.contains(id) {
                    wake(list);
                }
            }
        } else {
            for id in &affected.identities {
                if let Some(list) = watchers.get(id) {
                    wake(list);
                }
            }
        }
        self.woken.fetch_add(woken, Ordering::Relaxed);
    }

    /// The counters.
    pub fn stats(&self) -> WatchStats {
        WatchStats {
            watchers: self.lock().values().map(Vec::len).sum(),
            woken: self.woken.load(Ordering::Relaxed),
            recomputed: self.recomputed.load(Ordering::Relaxed),
            diffs_sent: self.diffs_sent.load(Ordering::Relaxed),
        }
    }
}

/// One open watch; dropping it unregisters it.
#[derive(Debug)]
pub struct Watcher {
    hub: Arc<WatchHub>,
    id: IdentityId,
    key: u64,
    wake: Arc<Notify>,
}

impl Watcher {
    /// Resolves once a commit may have altered this identity's view since the last call
    /// (at once if one did meanwhile).
    pub async fn changed(&self) {
        self.wake.notified().await;
    }

    /// Waits for a turn to recompute the view (one of a few at once) and counts it.
    pub async fn recompute(&self) -> Option<SemaphorePermit<'_>> {
        let permit = self.hub.recomputing.acquire().await.ok()?;
        self.hub.recomputed.fetch_add(1, Ordering::Relaxed);
        Some(permit)
    }

    /// Counts one diff sent.
    pub fn diff_sent(&self) {
        self.hub.diffs_sent.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let mut watchers = self.hub.lock();
        if let Some(list) = watchers.get_mut(&self.id) {
            list.retain(|(k, _)| *k != self.key);
            if list.is_empty() {
                watchers.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id(s: &str) -> IdentityId {
        IdentityId::new(s).unwrap()
    }

    fn only(ids: &[&str]) -> Affected {
        Affected {
            everyone: false,
            identities: ids.iter().map(|s| id(s)).collect(),
        }
    }

    async fn fired(w: &Watcher) -> bool {
        tokio::time::timeout(Duration::from_millis(20), w.changed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn wakes_only_the_affected_and_merges_bursts() {
        let hub = Arc::new(WatchHub::default());
        let (a, b) = (hub.register(&id("a")), hub.register(&id("b")));
        let a2 = hub.register(&id("a"));
        assert_eq!(hub.stats().watchers, 3);
        for _ in 0..100 {
            hub.wake(&only(&["a", "zzz"]));
        }
        assert!(fired(&a).await && fired(&a2).await);
        assert!(!fired(&a).await, "a burst of wakes is one permit");
        assert!(!fired(&b).await, "b was not affected");
        hub.wake(&Affected {
            everyone: true,
            identities: Default::default(),
        });
        assert!(fired(&a).await && fired(&b).await);
        drop((a, a2));
        assert_eq!(hub.stats().watchers, 1);
        hub.wake(&only(&["a"]));
        assert_eq!(hub.stats().woken, 200 + 3, "nobody is left to wake for a");
        drop(b);
        assert!(hub.is_empty());
    }
}
