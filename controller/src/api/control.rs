//! `GET /v1/control`: the push channel to routers, as a streaming response body of
//! length-prefixed JSON frames (see `umbra_proto::frame`).

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use umbra_proto::{ChangeEvent, ControlMessage};

use super::error::ApiError;
use super::extract::{Query, Router};
use super::{blocking, AppState};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlQuery {
    /// The epoch the router last followed.
    #[serde(default)]
    epoch: Option<String>,
    /// The last sequence number it applied.
    #[serde(default)]
    seq: Option<u64>,
    /// Where clients reach the router (`host:port`).
    #[serde(default)]
    advertise: Option<String>,
    /// How often the router wants a heartbeat on an idle channel (derived from its stale
    /// window); kept within `umbra_proto::follow`'s bounds whatever it asks.
    #[serde(default)]
    heartbeat_ms: Option<u64>,
}

pub async fn stream(
    State(s): State<AppState>,
    Router(peer): Router,
    Query(q): Query<ControlQuery>,
) -> Result<Response, ApiError> {
    if let Some(addr) = &q.advertise {
        if addr.len() > 300 || addr.parse::<umbra_policies::HostPort>().is_err() {
            return Err(ApiError::invalid("advertise must be HOST:PORT"));
        }
    }
    let heartbeat = umbra_proto::follow::granted_heartbeat(q.heartbeat_ms);
    let since = q.epoch.zip(q.seq);
    let p = peer.clone();
    let (router, sub) = blocking(&s, move |c| {
        c.subscribe_router(
            &p,
            since.as_ref().map(|(e, s)| (e.as_str(), *s)),
            q.advertise.as_deref(),
        )
    })
    .await?;
    let since_label = if sub.snapshot { "snapshot" } else { "resumed" };
    let (initial, mut last, mut rx) = (sub.initial, sub.seq, sub.deltas);
    let guard = s.open_stream(&router.id).map_err(ApiError::from)?;
    let (tx, body_rx) = mpsc::channel::<Bytes>(64);
    let serial = peer.serial.to_string();
    tracing::info!(router = %router.name, since = since_label, "control channel opened");
    let ctrl = s.clone();
    tokio::spawn(async move {
        let _guard = guard;
        for msg in initial {
            if send(&tx, &msg).await.is_err() {
                return;
            }
        }
        loop {
            let msg = tokio::select! {
                r = rx.recv() => match r {
                    Ok(d) if d.seq <= last => continue,
                    Ok(d) => {
                        last = d.seq;
                        let ends = ends_identity(&d.change, &router.id, &serial);
                        let msg = ControlMessage::Delta(Box::new((*d).clone()));
                        if send(&tx, &msg).await.is_err() || ends {
                            return;
                        }
                        continue;
                    }
                    // Too far behind, or the controller is shutting down: the router
                    // reconnects and resumes from the store.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tokio::time::sleep(heartbeat) => {
                    // A controller cut off from its shared store vouches for nothing: the
                    // router fails over, or fails closed after its stale window.
                    if !ctrl.in_touch() {
                        tracing::warn!(router = %router.name, "the store is out of reach: ending the control channel");
                        return;
                    }
                    ControlMessage::Heartbeat { seq: last }
                }
                _ = tx.closed() => return,
            };
            if send(&tx, &msg).await.is_err() {
                return;
            }
        }
    });
    let body = futures::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Response::builder()
        .header("content-type", "application/x-umbra-control")
        .body(Body::from_stream(body))
        .map_err(ApiError::internal)
}

/// Whether a change revokes the identity's own access, which ends its channel.
fn ends_identity(change: &ChangeEvent, id: &umbra_policies::IdentityId, serial: &str) -> bool {
    match change {
        ChangeEvent::CertRevoked { cert } => cert.serial == serial,
        ChangeEvent::IdentityDeleted { id: gone } => gone == id,
        ChangeEvent::IdentityPut { identity } => {
            &identity.id == id && (identity.revoked || identity.disabled)
        }
        _ => false,
    }
}

async fn send(tx: &mpsc::Sender<Bytes>, msg: &ControlMessage) -> Result<(), ()> {
    send_frame(tx, msg).await
}

/// Sends one message as a frame; fails once the body is gone.
pub(super) async fn send_frame<T: serde::Serialize>(
    tx: &mpsc::Sender<Bytes>,
    msg: &T,
) -> Result<(), ()> {
    let frame = umbra_proto::encode(msg).map_err(|_| ())?;
    tx.send(Bytes::from(frame)).await.map_err(|_| ())
}
