//! `GET /v1/edge` and `GET /v1/edge/watch`: an identity's view, once or followed.
//!
//! A watch sends the whole view first, then a diff (`umbra_proto::api::EdgeFrame`) each time a
//! commit altered it. It does no work for commits that cannot alter it: the controller's watch
//! hub wakes only the watchers whose views a commit can change (see `core::hub`), and a woken
//! watcher recomputes its view once however many commits woke it.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::Response;
use serde::Serialize;
use tokio::sync::mpsc;
use umbra_proto::api::{EdgeView, EdgeViewDiff};

use super::control::send_frame;
use super::error::ApiError;
use super::extract::AnyIdentity;
use super::{blocking, AppState};

/// How often an idle edge-view watch carries a keepalive, so a watcher notices a dead
/// controller; a router's control channel asks for its own (see `umbra_proto::follow`).
pub const HEARTBEAT: Duration = umbra_proto::follow::DEFAULT_HEARTBEAT;

/// Frames a watch holds for a slow reader before its task waits (the hub never does).
const QUEUED_FRAMES: usize = 16;

/// `umbra_proto::api::EdgeFrame` by reference, so that the view kept for the next diff is not
/// copied to be sent.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum Frame<'a> {
    View(&'a EdgeView),
    Diff(&'a EdgeViewDiff),
}

/// `GET /v1/edge`: the caller's services and the routers.
pub async fn edge(
    State(s): State<AppState>,
    AnyIdentity(peer): AnyIdentity,
) -> Result<axum::Json<EdgeView>, ApiError> {
    blocking(&s, move |c| {
        let identity = c.authorize_peer(&peer, None)?;
        Ok(c.edge_view(&identity))
    })
    .await
    .map(axum::Json)
}

/// `GET /v1/edge/watch`: the caller's view now, then a diff after every commit that altered it,
/// as length-prefixed JSON frames; it ends when the caller loses its own access (revoked,
/// disabled, deleted, or its certificate or identity expired).
pub async fn edge_watch(
    State(s): State<AppState>,
    AnyIdentity(peer): AnyIdentity,
) -> Result<Response, ApiError> {
    let p = peer.clone();
    let (identity, watcher) = blocking(&s, move |c| c.watch_edge(&p)).await?;
    let guard = s.open_stream(&identity.id).map_err(ApiError::from)?;
    // Access also ends with time (the certificate's or the identity's expiry), which no commit
    // announces: the watch ends then, and the client opens a new one with what it holds.
    let ends = (identity.expires_at).map_or(peer.not_after, |e| e.min(peer.not_after));
    let ends = std::time::UNIX_EPOCH + Duration::from_secs(ends.0);
    let clock = s.config().clock.clone();
    // Registered before the first view is computed: a commit in between wakes the watcher.
    let first = blocking(&s, move |c| Ok(c.edge_view(&identity))).await?;
    let (tx, body_rx) = mpsc::channel::<Bytes>(QUEUED_FRAMES);
    let ctrl = s.clone();
    tokio::spawn(async move {
        let _guard = guard;
        let expired = clock.sleep_until(ends);
        tokio::pin!(expired);
        let mut last = first;
        if send_frame(&tx, &Frame::View(&last)).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                _ = watcher.changed() => {}
                _ = tokio::time::sleep(HEARTBEAT) => {
                    if tx.send(Bytes::from_static(&umbra_proto::KEEPALIVE)).await.is_err() {
                        return;
                    }
                    continue;
                }
                _ = tx.closed() => return,
                _ = &mut expired => return,
            }
            let Some(turn) = watcher.recompute().await else {
                return;
            };
            let (c, p) = (ctrl.clone(), peer.clone());
            // The peer is checked again: a watch ends when its own access does.
            let next = tokio::task::spawn_blocking(move || {
                c.authorize_peer(&p, None).map(|i| c.edge_view(&i))
            })
            .await;
            let Ok(Ok(view)) = next else { return };
            let diff = EdgeView::diff(&last, &view);
            if diff.is_empty() {
                continue;
            }
            watcher.diff_sent();
            drop(turn);
            if send_frame(&tx, &Frame::Diff(&diff)).await.is_err() {
                return;
            }
            last = view;
        }
    });
    let body = futures::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Response::builder()
        .header("content-type", "application/x-umbra-edge")
        .body(Body::from_stream(body))
        .map_err(ApiError::internal)
}
