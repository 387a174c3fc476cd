//! Event sinks: the controller delivers audit rows (operators' actions, agents' reported
//! refusals, routers' decisions) to a JSON-lines file, syslog (RFC 5424) or an HTTPS webhook,
//! each filtered by event kind, configured by a file (`umbra controller run --sinks FILE`,
//! [`config`]).
//!
//! Delivery is at least once, and bounded. The audit log in the store is the queue: each sink
//! keeps a cursor (the last audit id it delivered, in a 0600 file `DIR/sinks/NAME.cursor`),
//! reads the rows after it, delivers those its filter takes, and only then moves the cursor. A
//! sink that fails retries the same rows with exponential backoff and jitter ([`plan`]), so an
//! outage loses nothing and repeats at most the batch in flight (and, after a crash, the batch
//! delivered but not yet recorded); receivers tell repeats apart by `id`. Memory holds one
//! batch a sink. A sink more than `max_lag_events` rows or `max_lag` behind skips to the newest
//! row and delivers a `sinks.dropped` event saying how many it skipped, so that a long outage
//! costs a visible gap, never unbounded work. Rows reach a sink within milliseconds of their
//! commit: every commit that stores audit rows rings [`crate::audit::AuditBell`].
//!
//! With several controllers on one PostgreSQL database given the same sinks file, one at a time
//! delivers each sink: its task holds a session lock in the store (`Store::try_lead`, on a
//! connection of its own) and keeps its cursor in the store's metadata, so that when the leader
//! stops (its connection, and so the lock, goes) another controller takes over within a second
//! from where it stopped, repeating at most the batch in flight. Rows other controllers commit
//! ring nothing here and are found by a look four times a second. PostgreSQL assigns ids at
//! insert, not at commit, so a row whose transaction commits after a higher id was delivered
//! arrives below the cursor: on a shared store a sink remembers the ids it saw missing
//! ([`holes`], at most 1,024, for 60 s; not carried over to a new leader) and delivers them when
//! they turn up, out of id order. SQLite commits in id order. A file sink's path is the same on
//! every controller: a file each controller writes only while it leads.

pub mod config;
mod file;
pub mod filter;
pub mod holes;
pub mod plan;
pub mod syslog;
pub mod webhook;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use umbra_policies::Timestamp;
use umbra_proto::api::AuditEntry;

use crate::audit::reader::Reader;
use crate::core::Controller;

pub use config::{SinkConfig, SinkKind};

/// Why a delivery failed; the sink retries.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Writing, connecting or sending failed.
    #[error("{0}")]
    Io(String),
    /// The webhook answered something other than 2xx.
    #[error("the receiver answered {0}")]
    Status(u16),
    /// The sink cannot be set up (a CA file that does not parse).
    #[error("{0}")]
    Setup(String),
}

/// One event as sinks deliver it: an audit row, its kind being the row's action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The audit row's id (increasing; a receiver drops repeats by it).
    pub id: u64,
    /// When it was stored, RFC 3339 UTC.
    pub time: String,
    /// The kind, e.g. `sandbox.dial_denied`, `identity.revoke`, `router.stream_refused`.
    pub kind: String,
    /// Who acted or reported (a SPIFFE id, or `controller`).
    pub actor: String,
    /// On what.
    pub target: String,
    /// Details.
    pub detail: serde_json::Value,
}

/// RFC 3339 for a unix time in seconds.
pub fn rfc3339(t: Timestamp) -> String {
    let secs = i64::try_from(t.0).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

impl From<&AuditEntry> for Event {
    fn from(e: &AuditEntry) -> Event {
        Event {
            id: e.id,
            time: rfc3339(e.at),
            kind: e.action.clone(),
            actor: e.actor.clone(),
            target: e.target.clone(),
            detail: e.detail.clone(),
        }
    }
}

/// The kind of the record a sink delivers after skipping rows.
pub const DROPPED: &str = "sinks.dropped";

/// What a sink persists: the last id it is done with, and a skip not yet reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Cursor {
    after: u64,
    #[serde(default)]
    dropped: Option<Dropped>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Dropped {
    count: u64,
    first_after: u64,
    through: u64,
    at: u64,
}

fn load_cursor(path: &Path) -> Option<Cursor> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn save_cursor(path: &Path, c: &Cursor) {
    let text = serde_json::to_vec(c).unwrap_or_default();
    if let Err(e) = umbra_pki::write_file(path, &text, 0o600) {
        tracing::warn!(path = %path.display(), error = %e, "cannot record a sink's cursor");
    }
}

/// Starts one task per configured sink; they end when `cancel` is.
pub fn spawn(ctrl: &Arc<Controller>, cancel: &CancellationToken) -> JoinSet<()> {
    let mut set = JoinSet::new();
    let cfg = ctrl.config();
    if cfg.sinks.is_empty() {
        return set;
    }
    let reader = ctrl.audit_reader().clone();
    let dir = cfg.dir.join("sinks");
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
    }) {
        tracing::error!(dir = %dir.display(), error = %e, "cannot create the sinks' directory");
    }
    for sink in cfg.sinks.clone() {
        let out = match Output::new(&sink.kind) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(sink = %sink.name, error = %e, "sink not started");
                continue;
            }
        };
        let task = SinkTask {
            cursor_path: dir.join(format!("{}.cursor", sink.name)),
            sink,
            out,
            reader: reader.clone(),
            ctrl: ctrl.clone(),
            lead: cfg
                .store
                .is_shared()
                .then(|| Reader::new(cfg.store.clone())),
        };
        set.spawn(task.run(cancel.clone()));
    }
    set
}

enum Output {
    File(Option<file::FileSink>),
    Syslog(syslog::SyslogSink),
    Webhook(Box<webhook::WebhookSink>),
}

impl Output {
    fn new(kind: &SinkKind) -> Result<Output, SinkError> {
        Ok(match kind.clone() {
            SinkKind::File {
                path,
                max_bytes,
                keep,
            } => Output::File(Some(file::FileSink::new(path, max_bytes, keep))),
            SinkKind::Syslog {
                transport,
                facility,
                app_name,
            } => Output::Syslog(syslog::SyslogSink::new(transport, facility, app_name)),
            SinkKind::Webhook {
                url,
                secret,
                ca_file,
                timeout,
            } => Output::Webhook(Box::new(webhook::WebhookSink::new(
                url.0,
                secret,
                ca_file.as_deref(),
                timeout,
            )?)),
        })
    }

    async fn send(&mut self, events: &[Event], now: u64) -> Result<(), SinkError> {
        match self {
            Output::Syslog(s) => s.send(events).await,
            Output::Webhook(w) => w.send(events, now).await,
            Output::File(slot) => {
                let mut lines = Vec::new();
                for e in events {
                    serde_json::to_writer(&mut lines, e)
                        .map_err(|e| SinkError::Io(e.to_string()))?;
                    lines.push(b'\n');
                }
                let Some(mut f) = slot.take() else {
                    return Err(SinkError::Io("the file sink is busy".into()));
                };
                let (f, r) = tokio::task::spawn_blocking(move || {
                    let r = f.write(&lines);
                    (f, r)
                })
                .await
                .map_err(|e| SinkError::Io(e.to_string()))?;
                *slot = Some(f);
                r
            }
        }
    }
}

struct SinkTask {
    sink: SinkConfig,
    out: Output,
    reader: Reader,
    ctrl: Arc<Controller>,
    cursor_path: PathBuf,
    /// On a shared store: a connection of this sink's own that holds its leadership lock, and
    /// keeps its cursor in the store, so that one controller at a time delivers it and another
    /// takes over where it stopped.
    lead: Option<Reader>,
}

/// The lock key of a sink's leadership on a shared store: "umbr" and the FNV-1a hash of its
/// name.
fn lead_key(name: &str) -> i64 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    (0x756d_6272_i64 << 32) | i64::from(h)
}

impl SinkTask {
    fn now(&self) -> Timestamp {
        self.ctrl.config().clock.timestamp()
    }

    fn meta_key(&self) -> String {
        format!("sink.cursor.{}", self.sink.name)
    }

    /// The cursor as recorded: in the store when shared, else in the sink's file.
    async fn load(&self) -> Result<Option<Cursor>, crate::ControllerError> {
        match &self.lead {
            Some(l) => Ok(l
                .meta(self.meta_key())
                .await?
                .and_then(|t| serde_json::from_str(&t).ok())),
            None => Ok(load_cursor(&self.cursor_path)),
        }
    }

    async fn save(&self, c: &Cursor) {
        match &self.lead {
            Some(l) => {
                let text = serde_json::to_string(c).unwrap_or_default();
                if let Err(e) = l.set_meta(self.meta_key(), text).await {
                    tracing::warn!(sink = %self.sink.name, error = %e, "cannot record a sink's cursor");
                }
            }
            None => save_cursor(&self.cursor_path, c),
        }
    }

    /// Whether this controller delivers the sink now (always, alone on SQLite).
    async fn leading(&self) -> bool {
        match &self.lead {
            Some(l) => match l.try_lead(lead_key(&self.sink.name)).await {
                Ok(leads) => leads,
                Err(e) => {
                    tracing::warn!(sink = %self.sink.name, error = %e, "cannot tell whether this controller leads the sink");
                    false
                }
            },
            None => true,
        }
    }

    /// Waits until this controller leads the sink; false when cancelled.
    async fn wait_to_lead(&self, cancel: &CancellationToken) -> bool {
        while !self.leading().await {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                _ = cancel.cancelled() => return false,
            }
        }
        true
    }

    /// Where the sink resumes: its recorded cursor, or, the first time, after the newest row
    /// (it delivers what happens from now on, not the whole history).
    async fn first_cursor(&self, cancel: &CancellationToken) -> Option<Cursor> {
        let mut attempt = 0;
        loop {
            let found = match self.load().await {
                Ok(Some(c)) => return Some(c),
                Ok(None) => self.reader.span(u64::MAX).await,
                Err(e) => Err(e),
            };
            match found {
                Ok((_, head)) => {
                    let c = Cursor {
                        after: head,
                        dropped: None,
                    };
                    self.save(&c).await;
                    return Some(c);
                }
                Err(e) => {
                    tracing::warn!(sink = %self.sink.name, error = %e, "cannot read the audit log");
                    if !self.pause(attempt, cancel).await {
                        return None;
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// Waits the backoff for `attempt`; false when cancelled.
    async fn pause(&self, attempt: u32, cancel: &CancellationToken) -> bool {
        let d = plan::backoff(attempt, rand::random::<f64>());
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = cancel.cancelled() => false,
        }
    }

    async fn run(mut self, cancel: CancellationToken) {
        let mut bell = self.ctrl.audit_bell().subscribe();
        if !self.wait_to_lead(&cancel).await {
            return;
        }
        let Some(mut cursor) = self.first_cursor(&cancel).await else {
            return;
        };
        let bounds = plan::Bounds {
            max_events: self.sink.max_lag_events,
            max_age: self.sink.max_lag,
        };
        let batch = self.sink.batch;
        tracing::info!(sink = %self.sink.name, after = cursor.after, "event sink started");
        let mut attempt = 0u32;
        let mut holes = holes::Holes::default();
        while !cancel.is_cancelled() {
            if !self.leading().await {
                tracing::info!(sink = %self.sink.name, "another controller delivers this sink now");
                if !self.wait_to_lead(&cancel).await {
                    return;
                }
                // Where the last leader stopped.
                match self.first_cursor(&cancel).await {
                    Some(c) => cursor = c,
                    None => return,
                }
                holes = holes::Holes::default();
                tracing::info!(sink = %self.sink.name, after = cursor.after, "delivering this sink");
            }
            // Marked seen before reading: a ring after the read wakes the wait below.
            bell.borrow_and_update();
            let after = cursor.after;
            let rows = match self.reader.after(after, batch).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(sink = %self.sink.name, error = %e, "cannot read the audit log");
                    if !self.pause(attempt.min(6), &cancel).await {
                        return;
                    }
                    attempt = attempt.saturating_add(1);
                    continue;
                }
            };
            let now = self.now();
            // On a shared store, ids seen missing below the cursor are looked for again.
            let late = if self.reader.out_of_order() && !holes.is_empty() {
                holes.expire(now, holes::GRACE_SECS);
                match holes.is_empty() {
                    true => Vec::new(),
                    false => self.reader.ids(holes.wanted()).await.unwrap_or_default(),
                }
            } else {
                Vec::new()
            };
            if let Some(first) = rows.first() {
                let may_be_behind = attempt > 0
                    || rows.len() >= batch as usize
                    || now.0.saturating_sub(first.at.0) > bounds.max_age.as_secs();
                if may_be_behind {
                    let span = self.reader.span(after).await;
                    if let Ok((pending, head)) = span {
                        if plan::must_skip(bounds, pending, first.at, now) {
                            tracing::warn!(sink = %self.sink.name, skipped = pending, "event sink too far behind; skipping ahead");
                            let d = cursor.dropped.get_or_insert(Dropped {
                                count: 0,
                                first_after: after,
                                through: head,
                                at: now.0,
                            });
                            d.count += pending;
                            d.through = head;
                            cursor.after = head;
                            self.save(&cursor).await;
                            continue;
                        }
                    }
                }
            } else if cursor.dropped.is_none() && late.is_empty() {
                tokio::select! {
                    _ = bell.changed() => {}
                    _ = tokio::time::sleep(self.reader.idle_look()) => {}
                    _ = cancel.cancelled() => return,
                }
                continue;
            }
            let mut events: Vec<Event> = Vec::new();
            if let Some(d) = &cursor.dropped {
                events.push(Event {
                    id: d.through,
                    time: rfc3339(Timestamp(d.at)),
                    kind: DROPPED.into(),
                    actor: "controller".into(),
                    target: self.sink.name.clone(),
                    detail: serde_json::json!({
                        "count": d.count,
                        "after": d.first_after,
                        "through": d.through,
                        "reason": "the sink fell further behind than its bounds",
                    }),
                });
            }
            events.extend(
                (late.iter().chain(&rows))
                    .filter(|r| self.sink.filter.matches(&r.action))
                    .map(Event::from),
            );
            if !events.is_empty() {
                if let Err(e) = self.out.send(&events, now.0).await {
                    if attempt == 0 || attempt % 10 == 0 {
                        tracing::warn!(sink = %self.sink.name, error = %e, attempt, "event delivery failed; retrying");
                    }
                    if !self.pause(attempt, &cancel).await {
                        return;
                    }
                    attempt = attempt.saturating_add(1);
                    continue;
                }
                if attempt > 0 {
                    tracing::info!(sink = %self.sink.name, "event delivery recovered");
                }
            }
            attempt = 0;
            cursor.dropped = None;
            for r in &late {
                holes.filled(r.id);
            }
            if self.reader.out_of_order() {
                let ids: Vec<u64> = rows.iter().map(|r| r.id).collect();
                holes.saw(after, &ids, now);
            }
            if let Some(last) = rows.last() {
                cursor.after = last.id;
            }
            self.save(&cursor).await;
        }
    }
}
