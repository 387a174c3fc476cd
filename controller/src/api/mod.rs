//! The controller's HTTPS API. Two routers share one port: the enrollment router, reached with
//! the TLS server name `enroll.controller.umbra` and no client certificate, and the main router,
//! where the handshake requires a client certificate from this CA and each route then checks the
//! identity's kind (admin for management, router for the control channel).

mod control;
pub mod error;
mod extract;
mod follow;
mod handlers;
mod reports;
mod watch;

use std::sync::Arc;

use axum::routing::{get, post};
use base64::Engine;

pub use extract::Peer;

use crate::core::Controller;
use crate::error::ControllerError;
use error::ApiError;

/// Shared by every handler.
pub type AppState = Arc<Controller>;

/// Runs a blocking controller call on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Controller) -> Result<T, ControllerError> + Send + 'static,
) -> Result<T, ApiError> {
    let ctrl = state.clone();
    tokio::task::spawn_blocking(move || f(&ctrl))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)
}

/// Decodes a base64 (standard alphabet) CSR, bounded in size.
pub(crate) fn decode_csr(b64: &str) -> Result<Vec<u8>, ApiError> {
    if b64.len() > 32 * 1024 {
        return Err(ApiError::invalid("the CSR is too large"));
    }
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| ApiError::invalid("the CSR is not valid base64"))
}

/// Routes served without a client certificate.
pub fn enroll_router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/v1/enroll", post(handlers::enroll))
        .route("/v1/health", get(handlers::health))
        .with_state(state)
}

/// Routes that require a client certificate.
pub fn main_router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/v1/health", get(handlers::health))
        .route("/v1/renew", post(handlers::renew))
        .route("/v1/control", get(control::stream))
        .route("/v1/edge", get(watch::edge))
        .route("/v1/edge/watch", get(watch::edge_watch))
        .route(
            "/v1/identities",
            get(handlers::list_identities).post(handlers::create_identity),
        )
        .route(
            "/v1/identities/{name}",
            get(handlers::show_identity).delete(handlers::delete_identity),
        )
        .route(
            "/v1/identities/{name}/revoke",
            post(handlers::revoke_identity),
        )
        .route("/v1/identities/{name}/token", post(handlers::issue_token))
        .route(
            "/v1/services",
            get(handlers::list_services).post(handlers::create_service),
        )
        .route(
            "/v1/services/{name}",
            get(handlers::show_service).delete(handlers::delete_service),
        )
        .route(
            "/v1/policies",
            get(handlers::list_policies).post(handlers::grant),
        )
        .route(
            "/v1/policies/{name}",
            axum::routing::delete(handlers::revoke_policy),
        )
        .route("/v1/explain", get(handlers::explain))
        .route(
            "/v1/routers",
            get(handlers::list_routers).post(handlers::create_router),
        )
        .route(
            "/v1/routers/{name}",
            axum::routing::delete(handlers::delete_router),
        )
        .route("/v1/apply", post(handlers::apply))
        .route("/v1/export", get(handlers::export))
        .route("/v1/audit", get(handlers::audit))
        .route("/v1/audit/events", post(handlers::report_events))
        .route("/v1/audit/follow", get(follow::follow))
        .route("/v1/audit/decisions", post(reports::decisions))
        .with_state(state)
}
