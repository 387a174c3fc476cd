//! Each identity's upstream sessions, one per (identity, server), started on first use.
//!
//! Starting a session is I/O (a process to spawn and initialize, an HTTP exchange), and a slow
//! upstream start must delay nobody else: the map of sessions is a plain mutex held only to find
//! or add a slot, never across an `.await`; each slot has its own async lock, held while that one
//! session starts, so that concurrent first uses of the same (identity, server) start it once
//! and every other pair proceeds at once.
//!
//! Each session started gets one task that watches its list changes and calls the pool's
//! callback; the task ends when the session is dropped (replaced after it died, or with the
//! pool), so however often catalogs are rebuilt, no task is added.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use umbra_policies::IdentityId;

use super::upstream::{RpcError, Session, Transport};
use crate::upstream::Upstream;

type Slot = Arc<tokio::sync::Mutex<Option<Arc<Session>>>>;

/// Called with the identity whose session's lists changed.
pub type OnChange = Arc<dyn Fn(&IdentityId) + Send + Sync>;

/// The upstream sessions of every identity.
pub struct Pool {
    slots: Mutex<HashMap<(IdentityId, String), Slot>>,
    on_change: OnChange,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.slots.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("Pool").field("slots", &n).finish()
    }
}

impl Pool {
    /// An empty pool; `on_change` runs when a session says its lists changed.
    pub fn new(on_change: OnChange) -> Pool {
        Pool {
            slots: Mutex::default(),
            on_change,
        }
    }

    /// The live session of `who` with `server`, started (or restarted) through `transport`.
    pub async fn session(
        &self,
        who: &IdentityId,
        server: &str,
        transport: &Transport,
        upstream: &Upstream,
    ) -> Result<Arc<Session>, RpcError> {
        let slot: Slot = {
            let mut m = self
                .slots
                .lock()
                .map_err(|_| RpcError::transport("session pool poisoned"))?;
            m.entry((who.clone(), server.to_string()))
                .or_default()
                .clone()
        };
        // Only callers of this very (identity, server) wait here.
        let mut cur = slot.lock().await;
        if let Some(sess) = cur.as_ref().filter(|s| s.alive()) {
            return Ok(sess.clone());
        }
        let sess = Arc::new(Session::connect(transport, upstream).await?);
        self.watch(who, &sess);
        *cur = Some(sess.clone());
        Ok(sess)
    }

    /// One task per session: list changes call back until the session is dropped.
    fn watch(&self, who: &IdentityId, sess: &Session) {
        let (changed, mut dropped) = (sess.changed.clone(), sess.dropped());
        let (who, on_change) = (who.clone(), self.on_change.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = changed.notified() => on_change(&who),
                    // The sender is dropped with the session.
                    _ = dropped.changed() => return,
                }
            }
        });
    }
}
