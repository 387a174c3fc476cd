//! A store connection of its own for reading the audit log as it grows (event sinks,
//! `audit --follow`), never the command connection: a follower reading a large backlog does not
//! hold the lock every command needs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use umbra_proto::api::AuditEntry;

use crate::error::ControllerError;
use crate::store::{Store, StoreConfig};

/// Most `audit --follow` streams open at once, all admins together (each also counts against
/// its identity's stream limit).
pub const MAX_FOLLOWERS: usize = 32;

/// Reads the audit log after a cursor; connects on first use and again after a failure.
#[derive(Clone)]
pub struct Reader {
    cfg: StoreConfig,
    conn: Arc<Mutex<Option<Box<dyn Store>>>>,
    followers: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").field("store", &self.cfg).finish()
    }
}

/// Holds one of the [`MAX_FOLLOWERS`] places until dropped.
#[derive(Debug)]
pub struct FollowerSlot(Arc<AtomicUsize>);

impl Drop for FollowerSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Reader {
    /// A reader of `cfg`'s audit log (not connected yet).
    pub fn new(cfg: StoreConfig) -> Reader {
        Reader {
            cfg,
            conn: Arc::new(Mutex::new(None)),
            followers: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// How long a reader with nothing to read waits for a ring before looking anyway: rows
    /// other controllers commit to a shared store ring nothing here, so it looks four times a
    /// second there; alone on SQLite every commit rings, and the look is only a backstop.
    pub fn idle_look(&self) -> std::time::Duration {
        if self.cfg.is_shared() {
            std::time::Duration::from_millis(250)
        } else {
            std::time::Duration::from_secs(1)
        }
    }

    /// A place for one more follower, or `None` when [`MAX_FOLLOWERS`] are open.
    pub fn follower(&self) -> Option<FollowerSlot> {
        let n = self.followers.fetch_add(1, Ordering::SeqCst);
        let slot = FollowerSlot(self.followers.clone());
        (n < MAX_FOLLOWERS).then_some(slot)
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Store) -> Result<T, ControllerError> + Send + 'static,
    ) -> Result<T, ControllerError> {
        let conn = self.conn.clone();
        let cfg = self.cfg.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|e| e.into_inner());
            if guard.is_none() {
                *guard = Some(cfg.open()?);
            }
            match guard.as_mut() {
                Some(s) => f(s.as_mut()),
                None => Err(ControllerError::Unavailable("no store connection".into())),
            }
        })
        .await
        .map_err(|e| ControllerError::Unavailable(e.to_string()))?
    }

    /// Rows after `after`, oldest first, at most `limit`.
    pub async fn after(&self, after: u64, limit: u32) -> Result<Vec<AuditEntry>, ControllerError> {
        self.with(move |s| s.audit_after(after, limit)).await
    }

    /// Whether this reader's connection leads `key` (see [`Store::try_lead`]).
    pub async fn try_lead(&self, key: i64) -> Result<bool, ControllerError> {
        self.with(move |s| s.try_lead(key)).await
    }

    /// A metadata value (a sink's cursor on a shared store).
    pub async fn meta(&self, key: String) -> Result<Option<String>, ControllerError> {
        self.with(move |s| s.meta(&key)).await
    }

    /// Writes a metadata value.
    pub async fn set_meta(&self, key: String, value: String) -> Result<(), ControllerError> {
        self.with(move |s| s.set_meta(&key, &value)).await
    }

    /// The rows among `ids` that exist now.
    pub async fn ids(&self, ids: Vec<u64>) -> Result<Vec<AuditEntry>, ControllerError> {
        self.with(move |s| s.audit_ids(&ids)).await
    }

    /// Whether ids can commit out of order (a shared PostgreSQL store), so that readers must
    /// look again for ids they saw missing.
    pub fn out_of_order(&self) -> bool {
        self.cfg.is_shared()
    }

    /// How many rows follow `after`, and the newest id.
    pub async fn span(&self, after: u64) -> Result<(u64, u64), ControllerError> {
        self.with(move |s| s.audit_span(after)).await
    }
}
