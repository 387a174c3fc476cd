//! The router's books of what each identity holds (`quota`), shared by every lane, and the
//! guards that hold an identity's connection or stream and give it back when dropped.

use std::sync::{Arc, Mutex, MutexGuard};

use quinn::{Connection, VarInt};
use umbra_policies::IdentityId;

use crate::config::Limits;
use crate::quota::{Limit, QuotaLimits, Quotas};
use crate::stats::Usage;

/// What every identity holds on this router.
pub(crate) struct Books {
    quotas: Mutex<Quotas<IdentityId>>,
}

impl Books {
    pub fn new(l: &Limits) -> Arc<Books> {
        let limits = QuotaLimits {
            connections_per_identity: l.connections_per_identity,
            connections_total: l.connections_total,
            streams_per_identity: l.streams_per_identity,
            streams_total: l.streams_total,
            buffer_per_identity: l.buffer_per_identity,
            buffer_total: l.buffer_total,
            handshake_window: u64::from(l.handshake_window),
            connection_window: u64::from(l.connection_window.max(l.handshake_window)),
        };
        Arc::new(Books {
            quotas: Mutex::new(Quotas::new(limits)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Quotas<IdentityId>> {
        self.quotas.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `id` holds now.
    pub fn usage(&self, id: &IdentityId) -> Usage {
        Usage::from(self.lock().held(id))
    }

    /// What all identities hold now.
    pub fn total(&self) -> Usage {
        Usage::from(self.lock().total())
    }

    /// Admits a connection of `id` and grants `conn` its window, or names the limit it met.
    pub fn open_connection(
        self: &Arc<Self>,
        id: &IdentityId,
        conn: &Connection,
    ) -> Result<ConnSlot, Limit> {
        let (window, max) = {
            let mut q = self.lock();
            (q.open_connection(id)?, q.limits().connection_window)
        };
        set_windows(conn, window);
        Ok(ConnSlot {
            books: Arc::clone(self),
            id: id.clone(),
            window,
            full: window >= max,
        })
    }

    /// Opens a stream of `id`, or names the limit it met.
    pub fn open_stream(self: &Arc<Self>, id: &IdentityId) -> Result<StreamSlot, Limit> {
        self.lock().open_stream(id)?;
        Ok(StreamSlot {
            books: Arc::clone(self),
            id: id.clone(),
        })
    }
}

/// Sets both flow-control windows of `conn` (see `quota`).
fn set_windows(conn: &Connection, window: u64) {
    conn.set_receive_window(VarInt::from_u64(window).unwrap_or(VarInt::MAX));
    conn.set_send_window(window);
}

/// An admitted connection of one identity and its window; given back when dropped.
pub(crate) struct ConnSlot {
    books: Arc<Books>,
    id: IdentityId,
    window: u64,
    full: bool,
}

impl ConnSlot {
    /// Whether the connection was granted less than a full window (and so should try to grow).
    pub fn short(&self) -> bool {
        !self.full
    }

    /// Grows the window of `conn` as far as the budgets now allow.
    pub fn grow(&mut self, conn: &Connection) {
        let (grown, max) = {
            let mut q = self.books.lock();
            (q.grow(&self.id, self.window), q.limits().connection_window)
        };
        if grown > self.window {
            tracing::debug!(from = self.window, to = grown, "connection window grown");
            self.window = grown;
            set_windows(conn, grown);
        }
        self.full = grown >= max;
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.books.lock().close_connection(&self.id, self.window);
    }
}

/// An open stream of one identity; given back when dropped.
pub(crate) struct StreamSlot {
    books: Arc<Books>,
    id: IdentityId,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.books.lock().close_stream(&self.id);
    }
}
