//! Audit events that identities report about themselves (`POST /v1/audit/events`), kept apart
//! from the commands' write path.
//!
//! Before, every report was an fsync'd transaction under the controller's global write lock, so
//! one agent could write 40,000 rows in 4.4 s and stall every command behind it. Now a report is
//! checked against per-identity buckets ([`limiter`], pure), what passes goes into a bounded
//! queue, and one writer thread (`writer`) commits many rows per transaction on its own SQLite
//! connection, never under the command lock; a report is answered once the transaction holding
//! its rows has committed (group commit), so `recorded` means stored. What the buckets or the queue refuse is counted and
//! stored as one `audit.suppressed` row per identity a period. Agent rows expire after the
//! retention and, above a row cap, the oldest go first; operator rows are never deleted by
//! either ([`prune`]).

use std::time::Duration;

pub mod limiter;
pub mod prune;
pub mod reader;
pub(crate) mod writer;

pub use limiter::Limits;

/// Rings after every commit that stored audit rows (a command's or the writer's), so that event
/// sinks and `audit --follow` read the new rows at once instead of polling. It carries only a
/// count: readers always read the store after their own cursor, so a ring they missed costs
/// nothing but latency, and on a shared store rows other controllers commit are found by the
/// readers' periodic look.
#[derive(Debug, Clone)]
pub struct AuditBell(std::sync::Arc<tokio::sync::watch::Sender<u64>>);

impl Default for AuditBell {
    fn default() -> Self {
        AuditBell(std::sync::Arc::new(tokio::sync::watch::Sender::new(0)))
    }
}

impl AuditBell {
    /// Says that rows were committed.
    pub fn ring(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver whose `changed()` completes after the next ring.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// How reported events are limited and kept.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditConfig {
    /// Agent events older than this are deleted (`--audit-retention`); `None` keeps them until
    /// the row cap.
    pub retention: Option<Duration>,
    /// Most agent rows kept; above it the oldest agent rows are deleted, never operator rows.
    pub max_agent_rows: u64,
    /// Per-identity rates and bursts.
    pub limits: Limits,
    /// How often an identity's suppressed events are summarized in one row.
    pub summary_period: Duration,
    /// Rows waiting for the writer at most; beyond it reports are counted as suppressed.
    pub queue: usize,
}

impl Default for AuditConfig {
    /// 30 days, a million agent rows, [`Limits::DEFAULT`], a summary every 10 s, 8,192 queued.
    fn default() -> Self {
        AuditConfig {
            retention: Some(Duration::from_secs(30 * 24 * 3600)),
            max_agent_rows: 1_000_000,
            limits: Limits::DEFAULT,
            summary_period: Duration::from_secs(10),
            queue: 8192,
        }
    }
}

/// What became of one report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// Events queued for storage.
    pub accepted: usize,
    /// Events counted in the identity's next `audit.suppressed` row instead.
    pub suppressed: usize,
}
