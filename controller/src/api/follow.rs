//! `GET /v1/audit/follow?after=ID`: the audit log as it grows, for admins (`umbra audit
//! --follow`), as JSON lines: one [`umbra_proto::api::AuditEntry`] a line, an empty line as a keepalive, and a
//! last `{"error": ...}` line when the controller ends the stream.
//!
//! Bounds: at most [`MAX_FOLLOWERS`](crate::audit::reader::MAX_FOLLOWERS) followers at once
//! (and each counts against its identity's stream limit); a follower's buffer holds
//! [`QUEUED_LINES`] lines; one that takes nothing for [`SLOW`] while lines wait is dropped, and
//! reads why after the lines already queued (it resumes with `after=` the last id it printed). Rows are read from the
//! store after the follower's own cursor, woken by every audit commit, so a follower costs a
//! query per wake-up and holds one batch, however far behind it starts.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::response::Response;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::SendTimeoutError;

use super::error::ApiError;
use super::extract::{Admin, Peer, Query};
use super::AppState;
use crate::error::ControllerError;

/// Lines a follower's buffer holds.
pub const QUEUED_LINES: usize = 256;
/// How long a follower may leave a full buffer untouched before it is dropped.
pub const SLOW: Duration = Duration::from_secs(10);
/// Rows read per query.
const BATCH: u32 = 200;
/// A keepalive after this much silence, so a follower notices a dead controller.
const HEARTBEAT: Duration = umbra_proto::follow::DEFAULT_HEARTBEAT;

/// The query: where to start.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowQuery {
    /// Rows after this id; the newest row's id (only what comes next) when absent.
    pub after: Option<u64>,
}

fn line(v: &impl serde::Serialize) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

/// `GET /v1/audit/follow`.
pub async fn follow(
    State(s): State<AppState>,
    Admin(actor): Admin,
    Extension(Peer(peer)): Extension<Peer>,
    Query(q): Query<FollowQuery>,
) -> Result<Response, ApiError> {
    let reader = s.audit_reader().clone();
    let Some(slot) = reader.follower() else {
        return Err(ApiError::from(ControllerError::Conflict(format!(
            "at most {} audit followers at once",
            crate::audit::reader::MAX_FOLLOWERS
        ))));
    };
    let guard = match &actor.id {
        Some(id) => Some(s.open_stream(id).map_err(ApiError::from)?),
        None => None,
    };
    let mut after = match q.after {
        Some(a) => a,
        None => reader.span(u64::MAX).await.map_err(ApiError::from)?.1,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUED_LINES);
    // Why the controller ended the stream: sent after every line already queued, so that a
    // follower dropped for a full buffer still reads the reason last.
    let epitaph = Arc::new(Mutex::new(None::<Bytes>));
    let last_words = epitaph.clone();
    let mut bell = s.audit_bell().subscribe();
    let ctrl = s.clone();
    tokio::spawn(async move {
        let (_slot, _guard) = (slot, guard);
        let end = |why: String| {
            let words = line(&serde_json::json!({ "error": why }));
            *last_words.lock().unwrap_or_else(|e| e.into_inner()) = Some(words);
        };
        let mut last_check = std::time::Instant::now();
        // On a shared store, ids seen missing are looked for again (see `sinks::holes`).
        let mut holes = crate::sinks::holes::Holes::default();
        loop {
            bell.borrow_and_update();
            let now = ctrl.config().clock.timestamp();
            let from = after;
            let mut rows = match reader.after(after, BATCH).await {
                Ok(r) => r,
                Err(e) => {
                    end(format!("the audit log cannot be read: {e}"));
                    return;
                }
            };
            if reader.out_of_order() {
                holes.expire(now, crate::sinks::holes::GRACE_SECS);
                let ids: Vec<u64> = rows.iter().map(|r| r.id).collect();
                let late = match holes.is_empty() {
                    true => Vec::new(),
                    false => reader.ids(holes.wanted()).await.unwrap_or_default(),
                };
                for r in &late {
                    holes.filled(r.id);
                }
                holes.saw(from, &ids, now);
                // Late rows first: they are what the follower missed.
                rows.splice(0..0, late);
            }
            if rows.is_empty() {
                tokio::select! {
                    _ = bell.changed() => {}
                    _ = tokio::time::sleep(reader.idle_look()) => {}
                    _ = tx.closed() => return,
                }
                if last_check.elapsed() < HEARTBEAT {
                    continue;
                }
                // A keepalive; a full buffer already tells the reader the stream is alive.
                let _ = tx.try_send(Bytes::from_static(b"\n"));
            }
            for r in &rows {
                match tx.send_timeout(line(r), SLOW).await {
                    Ok(()) => after = after.max(r.id),
                    Err(SendTimeoutError::Timeout(_)) => {
                        tracing::info!(follower = %actor.label, "dropping an audit follower that reads too slowly");
                        end(format!(
                            "dropped: this follower took nothing for {}s while the log grew; resume with after={after}",
                            SLOW.as_secs()
                        ));
                        return;
                    }
                    Err(SendTimeoutError::Closed(_)) => return,
                }
            }
            // The follower's own access is checked again after every batch and heartbeat: a
            // revoked admin's stream ends.
            last_check = std::time::Instant::now();
            let (c, p) = (ctrl.clone(), peer.clone());
            let ok = tokio::task::spawn_blocking(move || {
                c.authorize_peer(&p, Some(umbra_policies::IdentityKind::Admin))
            })
            .await;
            if !matches!(ok, Ok(Ok(_))) {
                end("this identity may no longer follow the audit log".into());
                return;
            }
        }
    });
    let body = futures::stream::unfold(Some(rx), move |rx| {
        let epitaph = epitaph.clone();
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(b) => Some((Ok::<_, Infallible>(b), Some(rx))),
                None => {
                    let words = epitaph.lock().unwrap_or_else(|e| e.into_inner()).take()?;
                    Some((Ok(words), None))
                }
            }
        }
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(body))
        .map_err(ApiError::internal)
}
