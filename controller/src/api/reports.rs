//! `POST /v1/audit/decisions`: routers report the stream decisions they made (see
//! `core::decisions`); only a router's certificate may.

use axum::extract::State;
use axum::Json;
use umbra_proto::api::DecisionReport;

use super::error::ApiError;
use super::extract::{JsonBody, Router};
use super::{blocking, AppState};

/// Largest report body: [`umbra_proto::api::MAX_DECISIONS`] decisions of bounded fields.
const DECISIONS_BODY: usize = 512 * 1024;

/// Stores what the router reports; the answer says how many were stored and how many only
/// counted (over the router's limits).
pub async fn decisions(
    State(s): State<AppState>,
    Router(peer): Router,
    JsonBody(req): JsonBody<DecisionReport, DECISIONS_BODY>,
) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(&s, move |c| c.record_decisions(&peer, &req))
        .await
        .map(|r| Json(serde_json::json!({ "recorded": r.accepted, "suppressed": r.suppressed })))
}
