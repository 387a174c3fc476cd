//! Request handlers: parse, authorize (by extractor), call the controller, answer JSON.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use umbra_policies::{Action, IdentityKind, Name};
use umbra_proto::api::*;

use super::error::ApiError;
use super::extract::{Admin, AnyIdentity, DocumentBody, JsonBody, Path, Query, SMALL_BODY};
use super::{blocking, decode_csr, AppState};

type Res<T> = Result<Json<T>, ApiError>;

pub async fn health() -> &'static str {
    "ok"
}

pub async fn enroll(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<EnrollRequest, SMALL_BODY>,
) -> Res<EnrollResponse> {
    if req.token.len() > 8 * 1024 {
        return Err(ApiError::invalid("the token is too large"));
    }
    let csr = decode_csr(&req.csr)?;
    let resp = blocking(&s, move |c| c.enroll(&req.token, &csr)).await;
    if let Err(e) = &resp {
        tracing::info!(error = ?e, "enrollment refused");
    }
    resp.map(Json)
}

pub async fn renew(
    State(s): State<AppState>,
    AnyIdentity(peer): AnyIdentity,
    JsonBody(req): JsonBody<RenewRequest, SMALL_BODY>,
) -> Res<RenewResponse> {
    let csr = decode_csr(&req.csr)?;
    blocking(&s, move |c| c.renew(&peer, &csr)).await.map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindQuery {
    kind: Option<IdentityKind>,
}

pub async fn list_identities(
    State(s): State<AppState>,
    _: Admin,
    Query(q): Query<KindQuery>,
) -> Res<Vec<IdentityView>> {
    blocking(&s, move |c| c.list_identities(q.kind))
        .await
        .map(Json)
}

pub async fn create_identity(
    State(s): State<AppState>,
    Admin(a): Admin,
    JsonBody(req): JsonBody<CreateIdentityRequest>,
) -> Result<(StatusCode, Json<TokenResponse>), ApiError> {
    blocking(&s, move |c| c.create_identity(&a, req))
        .await
        .map(|r| (StatusCode::CREATED, Json(r)))
}

pub async fn show_identity(
    State(s): State<AppState>,
    _: Admin,
    Path(name): Path<String>,
) -> Res<IdentityView> {
    blocking(&s, move |c| c.show_identity(&name))
        .await
        .map(Json)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CascadeQuery {
    #[serde(default)]
    cascade: bool,
}

#[derive(serde::Serialize)]
pub struct Deleted {
    deleted_policies: Vec<Name>,
}

pub async fn delete_identity(
    State(s): State<AppState>,
    Admin(a): Admin,
    Path(name): Path<String>,
    Query(q): Query<CascadeQuery>,
) -> Res<Deleted> {
    blocking(&s, move |c| c.delete_identity(&a, &name, q.cascade, None))
        .await
        .map(|deleted_policies| Json(Deleted { deleted_policies }))
}

pub async fn revoke_identity(
    State(s): State<AppState>,
    Admin(a): Admin,
    Path(name): Path<String>,
) -> Res<umbra_policies::Identity> {
    blocking(&s, move |c| c.revoke_identity(&a, &name))
        .await
        .map(Json)
}

pub async fn issue_token(
    State(s): State<AppState>,
    Admin(a): Admin,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<TokenRequest>,
) -> Res<TokenResponse> {
    blocking(&s, move |c| c.issue_token(&a, &name, req.token_ttl_secs))
        .await
        .map(Json)
}

pub async fn list_services(State(s): State<AppState>, _: Admin) -> Res<Vec<ServiceBody>> {
    blocking(&s, |c| Ok(c.list_services())).await.map(Json)
}

pub async fn create_service(
    State(s): State<AppState>,
    Admin(a): Admin,
    JsonBody(svc): JsonBody<ServiceBody>,
) -> Result<(StatusCode, Json<ServiceBody>), ApiError> {
    blocking(&s, move |c| c.create_service(&a, svc))
        .await
        .map(|r| (StatusCode::CREATED, Json(r)))
}

pub async fn show_service(
    State(s): State<AppState>,
    _: Admin,
    Path(name): Path<String>,
) -> Res<ServiceBody> {
    blocking(&s, move |c| c.show_service(&name)).await.map(Json)
}

pub async fn delete_service(
    State(s): State<AppState>,
    Admin(a): Admin,
    Path(name): Path<String>,
    Query(q): Query<CascadeQuery>,
) -> Res<Deleted> {
    blocking(&s, move |c| c.delete_service(&a, &name, q.cascade))
        .await
        .map(|deleted_policies| Json(Deleted { deleted_policies }))
}

pub async fn list_policies(State(s): State<AppState>, _: Admin) -> Res<Vec<PolicyBody>> {
    blocking(&s, |c| Ok(c.list_policies())).await.map(Json)
}

pub async fn grant(
    State(s): State<AppState>,
    Admin(a): Admin,
    JsonBody(req): JsonBody<GrantRequest>,
) -> Result<(StatusCode, Json<PolicyBody>), ApiError> {
    blocking(&s, move |c| c.grant(&a, req))
        .await
        .map(|r| (StatusCode::CREATED, Json(r)))
}

pub async fn revoke_policy(
    State(s): State<AppState>,
    Admin(a): Admin,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(&s, move |c| c.revoke_policy(&a, &name))
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainQuery {
    identity: String,
    service: String,
    #[serde(default)]
    action: Option<Action>,
}

pub async fn explain(
    State(s): State<AppState>,
    _: Admin,
    Query(q): Query<ExplainQuery>,
) -> Res<ExplainResponse> {
    blocking(&s, move |c| {
        c.explain(&q.identity, &q.service, q.action.unwrap_or(Action::Dial))
    })
    .await
    .map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterCreate {
    name: Name,
    #[serde(default)]
    token_ttl_secs: Option<u64>,
}

pub async fn list_routers(State(s): State<AppState>, _: Admin) -> Res<Vec<RouterView>> {
    blocking(&s, |c| c.list_routers()).await.map(Json)
}

pub async fn create_router(
    State(s): State<AppState>,
    Admin(a): Admin,
    JsonBody(req): JsonBody<RouterCreate>,
) -> Result<(StatusCode, Json<TokenResponse>), ApiError> {
    blocking(&s, move |c| {
        c.create_router(&a, req.name, req.token_ttl_secs)
    })
    .await
    .map(|r| (StatusCode::CREATED, Json(r)))
}

pub async fn delete_router(
    State(s): State<AppState>,
    Admin(a): Admin,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(&s, move |c| {
        c.delete_identity(&a, &name, true, Some(IdentityKind::Router))
    })
    .await
    .map(|_| StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyQuery {
    /// Only compute and return the plan (for a document sent as YAML).
    #[serde(default)]
    dry_run: bool,
}

pub async fn apply(
    State(s): State<AppState>,
    Admin(a): Admin,
    Query(q): Query<ApplyQuery>,
    body: DocumentBody,
) -> Res<ApplyResponse> {
    let dry_run = q.dry_run || body.dry_run;
    // The document and its slot are held until the apply is done.
    blocking(&s, move |c| {
        let DocumentBody { document, slot, .. } = body;
        let r = c.apply(&a, document, dry_run);
        drop(slot);
        r
    })
    .await
    .map(Json)
}

pub async fn export(State(s): State<AppState>, _: Admin) -> Res<ExportResponse> {
    blocking(&s, |c| {
        Ok(ExportResponse {
            document: c.export(),
        })
    })
    .await
    .map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    #[serde(default)]
    limit: Option<u32>,
}

pub async fn audit(
    State(s): State<AppState>,
    _: Admin,
    Query(q): Query<AuditQuery>,
) -> Res<Vec<AuditEntry>> {
    let limit = q.limit.unwrap_or(100).min(10_000);
    blocking(&s, move |c| c.audit_log(limit)).await.map(Json)
}

/// Any enrolled identity reports its own sandbox's events; the certificate says who it is. The
/// answer says how many were stored and how many only counted (over the identity's limits).
pub async fn report_events(
    State(s): State<AppState>,
    AnyIdentity(peer): AnyIdentity,
    JsonBody(req): JsonBody<ReportEventsRequest, SMALL_BODY>,
) -> Res<serde_json::Value> {
    blocking(&s, move |c| c.record_events(&peer, &req.events))
        .await
        .map(|r| Json(serde_json::json!({ "recorded": r.accepted, "suppressed": r.suppressed })))
}
