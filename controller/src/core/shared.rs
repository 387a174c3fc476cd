//! Several controllers on one database (PostgreSQL): every one serves, any one writes.
//!
//! Writes are serialized by the database, not by a consensus of our own. A command takes the
//! store's write lock (a session-level advisory lock, held from before the command reads the
//! state until after its transaction commits), catches up with what the other controllers
//! committed, builds its batch on that newest state and commits it with the next sequence
//! numbers. The store also refuses, inside the transaction, a batch whose base is not the log's
//! last change (`ControllerError::Stale`): with the lock held that can only happen if the
//! database session was lost mid-command, and then nothing is written.
//!
//! Each controller learns the others' commits at once from the database's notification (`LISTEN
//! umbra_changes`, sent in the committing transaction) and, whatever it hears, reads the log's
//! end every [`POLL`], so a lost notification costs at most that long and loses nothing. It
//! applies them exactly as its own commits (`Controller::absorb`), so its routers and watchers
//! get every change in the log's order, whichever controller made it. A controller too far
//! behind to replay (more than the log keeps) reloads the whole state and ends its routers'
//! control channels: they resume from the log or get a snapshot.
//!
//! A controller that cannot reach the database stops vouching for its copy: once the store has
//! been silent for [`OUT_OF_TOUCH`] it ends its control channels and refuses new ones, so its
//! routers fail over to another controller or, past their stale window, refuse everything; a
//! partitioned controller never keeps routers serving grants it can no longer confirm.

use std::ops::{Deref, DerefMut};
use std::sync::Weak;
use std::time::Instant;

use super::*;

/// How often a controller reads the log's end even without a notification.
pub const POLL: Duration = Duration::from_millis(500);

/// How long the store may be silent before a controller stops vouching for its copy.
pub const OUT_OF_TOUCH: Duration = Duration::from_secs(3);

/// What a controller on a shared store keeps besides its state.
pub(super) struct Shared {
    /// When the store last answered.
    contact: Contact,
    /// A connection of its own for the write lock, so that a command waiting for another
    /// controller's does not hold the command lock (every read here would wait with it).
    writer: Mutex<Box<dyn crate::store::Store>>,
}

impl Shared {
    /// Opens the write lock's connection; the state was just loaded at `now`.
    pub(super) fn open(
        store: &crate::store::StoreConfig,
        now: Instant,
    ) -> Result<Shared, ControllerError> {
        Ok(Shared {
            contact: Contact::new(now),
            writer: Mutex::new(store.open()?),
        })
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("contact", &self.contact)
            .finish_non_exhaustive()
    }
}

/// When a shared store last answered.
#[derive(Debug)]
pub struct Contact {
    heard: Mutex<Instant>,
}

impl Contact {
    /// Heard at `now` (the state was just loaded from it).
    pub fn new(now: Instant) -> Contact {
        Contact {
            heard: Mutex::new(now),
        }
    }

    fn heard(&self, now: Instant) {
        let mut h = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        *h = (*h).max(now);
    }

    /// Whether the store answered within [`OUT_OF_TOUCH`] before `now`.
    pub fn in_touch(&self, now: Instant) -> bool {
        let h = *self.heard.lock().unwrap_or_else(|e| e.into_inner());
        now.saturating_duration_since(h) < OUT_OF_TOUCH
    }
}

/// The command lock, and with a shared store the database's write lock, released on drop.
pub(super) struct WriteGuard<'a> {
    inner: MutexGuard<'a, Inner>,
    writer: Option<MutexGuard<'a, Box<dyn crate::store::Store>>>,
}

impl Deref for WriteGuard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl DerefMut for WriteGuard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.inner
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.writer.as_mut() {
            // Never fails: a session that cannot release it is closed, which releases it.
            w.unlock_writes();
        }
    }
}

impl Controller {
    /// Whether other controllers may write to this one's store.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Whether this controller may vouch for its copy of the state: always with a store of its
    /// own; with a shared one, while the store answers.
    pub fn in_touch(&self) -> bool {
        (self.shared.as_ref()).is_none_or(|s| s.contact.in_touch(Instant::now()))
    }

    /// Takes the command lock for a write. With a shared store, also its write lock, and
    /// catches up with the other controllers' commits, so that the command reads the newest
    /// state and its batch follows the log's last change.
    pub(super) fn write(&self) -> Result<WriteGuard<'_>, ControllerError> {
        let Some(shared) = &self.shared else {
            return Ok(WriteGuard {
                inner: self.lock(),
                writer: None,
            });
        };
        // The database's lock first, without the command lock: reads go on meanwhile.
        let mut writer = shared.writer.lock().unwrap_or_else(|e| e.into_inner());
        writer.lock_writes()?;
        let mut guard = WriteGuard {
            writer: Some(writer),
            inner: self.lock(),
        };
        self.catch_up_locked(&mut guard)?;
        Ok(guard)
    }

    /// Applies what other controllers committed after this one's last change.
    pub(super) fn catch_up_locked(&self, inner: &mut Inner) -> Result<(), ControllerError> {
        let result = match inner.store.changes_since(inner.replica.seq)? {
            Some(deltas) => {
                if !deltas.is_empty() {
                    tracing::debug!(
                        from = inner.replica.seq + 1,
                        to = inner.replica.seq + deltas.len() as u64,
                        "applying other controllers' changes"
                    );
                    self.absorb(inner, deltas, self.now());
                }
                Ok(())
            }
            None => self.reload_locked(inner),
        };
        if result.is_ok() {
            if let Some(s) = &self.shared {
                s.contact.heard(Instant::now());
            }
        }
        result
    }

    /// Loads the whole state again (too far behind to replay): every control channel ends and
    /// every watcher recomputes its view.
    fn reload_locked(&self, inner: &mut Inner) -> Result<(), ControllerError> {
        let replica = inner.store.load(inner.replica.epoch.clone(), self.now())?;
        tracing::warn!(
            from = inner.replica.seq,
            to = replica.seq,
            "too far behind the other controllers to replay their changes: reloading the state"
        );
        inner.names = (replica.state.identities.values())
            .map(|i| (i.name.clone(), i.id.clone()))
            .collect();
        inner.index = Arc::new(Index::build(&replica.state));
        self.revoked
            .replace(replica.revoked.keys().cloned().collect());
        inner.replica = replica;
        // Dropping the old sender ends every channel: its routers resume or get a snapshot.
        self.deltas
            .store(Arc::new(broadcast::channel(DELTA_CAPACITY).0));
        self.hub.wake(&affected::Affected {
            everyone: true,
            ..Default::default()
        });
        Ok(())
    }
}

/// Follows the other controllers' commits on a thread of its own (with a shared store; `None`
/// otherwise). The thread ends soon after the controller is dropped.
pub fn follow(ctrl: &Arc<Controller>) -> Option<std::thread::JoinHandle<()>> {
    if !ctrl.is_shared() {
        return None;
    }
    let weak = Arc::downgrade(ctrl);
    let store = ctrl.cfg.store.clone();
    std::thread::Builder::new()
        .name("umbra-store-follow".into())
        .spawn(move || follow_loop(weak, store))
        .map_err(|e| tracing::error!(error = %e, "cannot start following the shared store"))
        .ok()
}

fn follow_loop(weak: Weak<Controller>, store: crate::store::StoreConfig) {
    let mut watcher = None;
    let mut failing = false;
    loop {
        if weak.strong_count() == 0 {
            return;
        }
        // Wait for a notification, or the poll interval.
        match watcher.as_mut() {
            None => match store.commit_watcher() {
                Ok(w) => watcher = Some(w),
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot listen for other controllers' changes");
                    }
                    failing = true;
                    std::thread::sleep(POLL);
                }
            },
            Some(w) => {
                if let Err(e) = w.wait(POLL) {
                    tracing::warn!(error = %e, "lost the store's notifications; reconnecting");
                    watcher = None;
                }
            }
        }
        let Some(ctrl) = weak.upgrade() else {
            return;
        };
        let caught_up = {
            let mut inner = ctrl.lock();
            ctrl.catch_up_locked(&mut inner)
        };
        match caught_up {
            Ok(()) if failing => {
                tracing::info!("the store answers again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    tracing::error!(error = %e, "cannot read the store: no longer vouching for this controller's state");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_silent_for_longer_than_the_window_is_out_of_touch() {
        let t0 = Instant::now();
        let c = Contact::new(t0);
        assert!(c.in_touch(t0 + OUT_OF_TOUCH - Duration::from_millis(1)));
        assert!(!c.in_touch(t0 + OUT_OF_TOUCH));
        c.heard(t0 + Duration::from_secs(10));
        assert!(c.in_touch(t0 + Duration::from_secs(11)));
        // An older answer arriving late does not move contact back.
        c.heard(t0);
        assert!(c.in_touch(t0 + Duration::from_secs(11)));
    }
}
