//! The one thread that stores reported events: a bounded queue in, many rows per transaction
//! out, on a store connection of its own (never under the controller's command lock), with the
//! suppressed summaries and the retention pass between batches.

use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use umbra_policies::Timestamp;

use super::limiter::{Limiter, Suppressed};
use super::prune::prune;
use super::{AuditConfig, Recorded};
use crate::clock::Clock;
use crate::error::ControllerError;
use crate::store::{Store, StoreConfig};

// One row to store.
pub(crate) use crate::store::AgentEvent as Row;

/// Most rows in one transaction.
const MAX_BATCH: usize = 1000;
/// How often agent rows are pruned (and once at start).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// What the queue carries: rows, and after a report's rows a wake-up for the report's caller
/// once everything before it is committed (so many reports share one transaction, and
/// `recorded` in an answer means stored).
enum Msg {
    Row(Row),
    Ack(SyncSender<()>),
}

/// How long a report waits for its rows to be committed before answering anyway.
const ACK_WAIT: Duration = Duration::from_secs(5);

/// The queue's sending side and the buckets; dropping it flushes the queue and the summaries
/// and joins the thread.
pub(crate) struct AuditSink {
    tx: Option<SyncSender<Msg>>,
    limiter: Arc<Mutex<Limiter>>,
    /// Routers' decision reports have buckets of their own, sized for a router's stream rate.
    routers: Arc<Mutex<Limiter>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSink").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AuditSink {
    /// Opens a connection of its own to the store (already created and migrated) and starts the
    /// writer thread; prunes once before returning, so a restart applies the retention at once.
    pub fn start(
        store: &StoreConfig,
        cfg: AuditConfig,
        clock: Clock,
        bell: super::AuditBell,
    ) -> Result<AuditSink, ControllerError> {
        let mut conn = store.open()?;
        let gone = prune(
            conn.as_mut(),
            clock.timestamp(),
            cfg.retention,
            cfg.max_agent_rows,
        )?;
        if gone > 0 {
            tracing::info!(
                rows = gone,
                "agent audit rows past retention or the cap deleted"
            );
        }
        let limiter = Arc::new(Mutex::new(Limiter::new(cfg.limits)));
        let routers = Arc::new(Mutex::new(Limiter::new(super::Limits::ROUTERS)));
        let (tx, rx) = mpsc::sync_channel(cfg.queue);
        let l = [limiter.clone(), routers.clone()];
        let thread = std::thread::Builder::new()
            .name("umbra-audit".into())
            .spawn(move || run(conn, rx, l, cfg, clock, bell))
            .map_err(|e| ControllerError::Setup(format!("audit writer thread: {e}")))?;
        Ok(AuditSink {
            tx: Some(tx),
            limiter,
            routers,
            thread: Some(thread),
        })
    }

    /// Queues the rows `who` may have stored (each with its serialized size) and counts the
    /// rest as suppressed.
    pub fn submit(&self, who: &str, rows: Vec<(Row, usize)>, now: Instant) -> Recorded {
        self.submit_to(&self.limiter, who, rows, now)
    }

    /// [`AuditSink::submit`] for a router's decisions, with the routers' buckets; `dropped`
    /// decisions the router could not queue are counted as suppressed too.
    pub fn submit_router(
        &self,
        who: &str,
        rows: Vec<(Row, usize)>,
        dropped: u64,
        now: Instant,
    ) -> Recorded {
        if dropped > 0 {
            lock(&self.routers).suppress(who, dropped, 0, now);
        }
        self.submit_to(&self.routers, who, rows, now)
    }

    fn submit_to(
        &self,
        limiter: &Mutex<Limiter>,
        who: &str,
        rows: Vec<(Row, usize)>,
        now: Instant,
    ) -> Recorded {
        let sizes: Vec<usize> = rows.iter().map(|(_, n)| *n).collect();
        let admitted = lock(limiter).admit(who, &sizes, now);
        let mut rec = Recorded {
            accepted: 0,
            suppressed: 0,
        };
        let (mut lost, mut lost_bytes) = (0u64, 0u64);
        for ((row, size), ok) in rows.into_iter().zip(admitted) {
            if !ok {
                rec.suppressed += 1;
                continue;
            }
            match self.tx.as_ref().map(|tx| tx.try_send(Msg::Row(row))) {
                Some(Ok(())) => rec.accepted += 1,
                Some(Err(TrySendError::Full(_) | TrySendError::Disconnected(_))) | None => {
                    rec.suppressed += 1;
                    lost += 1;
                    lost_bytes += size as u64;
                }
            }
        }
        if lost > 0 {
            tracing::warn!(%who, events = lost, "audit queue full; events counted as suppressed");
            lock(limiter).suppress(who, lost, lost_bytes, now);
        }
        if rec.accepted > 0 {
            let (ack, done) = mpsc::sync_channel(1);
            if let Some(Ok(())) = self.tx.as_ref().map(|tx| tx.try_send(Msg::Ack(ack))) {
                if done.recv_timeout(ACK_WAIT).is_err() {
                    tracing::warn!(%who, "reported events not yet committed; answering anyway");
                }
            }
        }
        rec
    }
}

impl Drop for AuditSink {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn summary_row(s: Suppressed, at: Timestamp) -> Row {
    Row {
        at,
        actor: s.who.clone(),
        action: "audit.suppressed",
        target: s.who,
        detail: serde_json::json!({ "count": s.count, "bytes": s.bytes }).to_string(),
    }
}

fn run(
    mut conn: Box<dyn Store>,
    rx: mpsc::Receiver<Msg>,
    limiters: [Arc<Mutex<Limiter>>; 2],
    cfg: AuditConfig,
    clock: Clock,
    bell: super::AuditBell,
) {
    let mut last_prune = Instant::now();
    let mut open = true;
    while open {
        let (mut batch, mut acks) = (Vec::new(), Vec::new());
        let mut take = |m: Msg| match m {
            Msg::Row(r) => batch.push(r),
            Msg::Ack(a) => acks.push(a),
        };
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(m) => take(m),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => open = false,
        }
        for _ in 0..MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => take(m),
                Err(_) => break,
            }
        }
        // At the end every pending summary is written, whatever its age.
        let period = if open {
            cfg.summary_period
        } else {
            Duration::ZERO
        };
        let now = clock.timestamp();
        for limiter in &limiters {
            let summaries = lock(limiter).summaries(Instant::now(), period);
            batch.extend(summaries.into_iter().map(|s| summary_row(s, now)));
        }
        if !batch.is_empty() {
            match conn.append_agent_events(&batch) {
                Ok(()) => bell.ring(),
                Err(e) => {
                    tracing::error!(error = %e, rows = batch.len(), "cannot store reported audit events")
                }
            }
        }
        for a in acks {
            let _ = a.try_send(());
        }
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = Instant::now();
            match prune(
                conn.as_mut(),
                clock.timestamp(),
                cfg.retention,
                cfg.max_agent_rows,
            ) {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    rows = n,
                    "agent audit rows past retention or the cap deleted"
                ),
                Err(e) => tracing::error!(error = %e, "cannot prune the audit log"),
            }
        }
    }
}
