//! `GET /v1/control`: the push channel to routers, as a streaming response body of
//! length-prefixed JSON frames (see `umbra_proto::frame`).

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::response::Response;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use umbra_proto::{ChangeEvent, ControlMessage};

use super::error::ApiError;
use super::extract::Router;
use super::{blocking, AppState};

/// How often an idle channel carries a heartbeat, so a router notices a dead controller.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

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
}

pub async fn stream(State(s): State<AppState>, Router(router, peer): Router, Query(q): Query<ControlQuery>) -> Result<Response, ApiError> {
    if let Some(addr) = q.advertise.clone() {
        if addr.len() > 300 || addr.parse::<umbra_policies::HostPort>().is_err() {
            return Err(ApiError::invalid("advertise must be HOST:PORT"));
        }
        let r = router.clone();
        blocking(&s, move |c| c.router_advertise(&r, &addr)).await?;
    }
    let since = q.epoch.zip(q.seq);
    let (initial, mut last, mut rx) =
        blocking(&s, move |c| c.subscribe(since.as_ref().map(|(e, s)| (e.as_str(), *s)))).await?;
    let (tx, body_rx) = mpsc::channel::<Bytes>(64);
    let serial = peer.serial.to_string();
    tracing::info!(router = %router.name, since = ?since_label(&initial), "control channel opened");
    tokio::spawn(async move {
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
                        let ends = ends_router(&d.change, &router.id, &serial);
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
                _ = tokio::time::sleep(HEARTBEAT) => ControlMessage::Heartbeat { seq: last },
                _ = tx.closed() => return,
            };
            if send(&tx, &msg).await.is_err() {
                return;
            }
        }
    });
    let body = futures::stream::unfold(body_rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) });
    Response::builder()
        .header("content-type", "application/x-umbra-control")
        .body(Body::from_stream(body))
        .map_err(ApiError::internal)
}

fn since_label(initial: &[ControlMessage]) -> &'static str {
    if initial.iter().any(|m| matches!(m, ControlMessage::Snapshot(_))) {
        "snapshot"
    } else {
        "resumed"
    }
}

/// Whether a change revokes the router's own access, which ends its channel.
fn ends_router(change: &ChangeEvent, id: &umbra_policies::IdentityId, serial: &str) -> bool {
    match change {
        ChangeEvent::CertRevoked { cert } => cert.serial == serial,
        ChangeEvent::IdentityDeleted { id: gone } => gone == id,
        ChangeEvent::IdentityPut { identity } => &identity.id == id && (identity.revoked || identity.disabled),
        _ => false,
    }
}

async fn send(tx: &mpsc::Sender<Bytes>, msg: &ControlMessage) -> Result<(), ()> {
    let frame = umbra_proto::encode(msg).map_err(|_| ())?;
    tx.send(Bytes::from(frame)).await.map_err(|_| ())
}
