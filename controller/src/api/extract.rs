//! Request extractors: JSON bodies with our error envelope, and the caller's verified identity.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use umbra_pki::PeerCert;
use umbra_policies::{Identity, IdentityKind};
use umbra_proto::api::{ApplyRequest, MAX_REQUEST_BODY};

use super::error::ApiError;
use super::{blocking, AppState};
use crate::core::Actor;

/// A JSON body of at most `LIMIT` bytes, read within [`BODY_TIMEOUT`]; unknown fields and
/// syntax errors become 400s in our envelope.
pub struct JsonBody<T, const LIMIT: usize = MAX_REQUEST_BODY>(pub T);

/// Requests that carry only a token and a CSR (enrollment, renewal) are small.
pub const SMALL_BODY: usize = 64 * 1024;
/// How long a client may take to send a request body.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl<T: DeserializeOwned, const LIMIT: usize> FromRequest<AppState> for JsonBody<T, LIMIT> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &AppState) -> Result<Self, ApiError> {
        let bytes =
            tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(req.into_body(), LIMIT))
                .await
                .map_err(|_| ApiError::timeout())?
                .map_err(|_| ApiError::too_large(LIMIT))?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::invalid(format!("malformed request body: {e}")))
    }
}

/// The body of `POST /v1/apply`: a declarative document, sent as it is
/// (`content-type: application/yaml`, up to [`MAX_DOCUMENT`] within [`DOCUMENT_TIMEOUT`]; what
/// the CLI sends) or wrapped in JSON ([`ApplyRequest`], up to [`MAX_REQUEST_BODY`]). Raw, a
/// document of a million identities is read once into memory and parsed from there, instead of
/// being escaped into JSON, read, and unescaped into a second copy.
pub struct DocumentBody {
    /// The YAML text.
    pub document: Bytes,
    /// The JSON form's `dry_run` (the raw form says it in the query).
    pub dry_run: bool,
    /// One of the [`DOCUMENTS_AT_ONCE`] slots, held until the document is dropped (after the
    /// apply), so that admins' connections cannot hold many large documents at once.
    pub slot: tokio::sync::SemaphorePermit<'static>,
}

/// Large documents held at once, across all admins: each may be up to [`MAX_DOCUMENT`], and an
/// apply runs under the command lock anyway, so more would only wait in memory.
pub const DOCUMENTS_AT_ONCE: usize = 2;
static DOCUMENTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(DOCUMENTS_AT_ONCE);

/// The largest document `POST /v1/apply` reads: the core's bound.
pub const MAX_DOCUMENT: usize = umbra_policies::MAX_DOCUMENT_BYTES;
/// How long an admin may take to send a document.
pub const DOCUMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

impl FromRequest<AppState> for DocumentBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let yaml = (req.headers().get(axum::http::header::CONTENT_TYPE))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                matches!(
                    v.trim(),
                    "application/yaml" | "application/x-yaml" | "text/yaml"
                )
            });
        let read = async {
            // Waiting for a slot counts against the same deadline as sending.
            let slot = DOCUMENTS.acquire().await.map_err(|_| ApiError::timeout())?;
            if !yaml {
                let JsonBody(r) = JsonBody::<ApplyRequest>::from_request(req, state).await?;
                return Ok(DocumentBody {
                    document: Bytes::from(r.document),
                    dry_run: r.dry_run,
                    slot,
                });
            }
            let document = axum::body::to_bytes(req.into_body(), MAX_DOCUMENT)
                .await
                .map_err(|_| ApiError::too_large(MAX_DOCUMENT))?;
            Ok(DocumentBody {
                document,
                dry_run: false,
                slot,
            })
        };
        (tokio::time::timeout(DOCUMENT_TIMEOUT, read).await).map_err(|_| ApiError::timeout())?
    }
}

/// The certificate the TLS handshake verified, attached to every request of the connection.
#[derive(Debug, Clone)]
pub struct Peer(pub Arc<PeerCert>);

async fn authorize(
    parts: &Parts,
    state: &AppState,
    kind: Option<IdentityKind>,
) -> Result<(Identity, Arc<PeerCert>), ApiError> {
    let peer = parts
        .extensions
        .get::<Peer>()
        .ok_or_else(ApiError::forbidden)?
        .0
        .clone();
    let p = peer.clone();
    let identity = blocking(state, move |c| c.authorize_peer(&p, kind)).await?;
    Ok((identity, peer))
}

/// An admin: the handshake proved an admin certificate of an active admin identity.
pub struct Admin(pub Actor);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let (identity, peer) = authorize(parts, state, Some(IdentityKind::Admin)).await?;
        Ok(Admin(Actor {
            id: Some(identity.id),
            label: peer.spiffe.to_string(),
        }))
    }
}

/// A router.
pub struct Router(pub Arc<PeerCert>);

impl FromRequestParts<AppState> for Router {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let (_, peer) = authorize(parts, state, Some(IdentityKind::Router)).await?;
        Ok(Router(peer))
    }
}

/// Any active identity (agent, router or admin), e.g. to renew its own certificate; carries the
/// verified certificate.
pub struct AnyIdentity(pub Arc<PeerCert>);

impl FromRequestParts<AppState> for AnyIdentity {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let (_, peer) = authorize(parts, state, None).await?;
        Ok(AnyIdentity(peer))
    }
}

/// Query parameters; a malformed or unknown one is a 400 in our envelope.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| ApiError::invalid(e.body_text()))
    }
}

/// A path parameter; a malformed one is a 400 in our envelope.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e| ApiError::invalid(e.body_text()))
    }
}
