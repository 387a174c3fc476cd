//! Request extractors: JSON bodies with our error envelope, and the caller's verified identity.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use umbra_pki::PeerCert;
use umbra_policies::{Identity, IdentityKind};
use umbra_proto::api::MAX_REQUEST_BODY;

use super::error::ApiError;
use super::{blocking, AppState};
use crate::core::Actor;

/// A JSON body, bounded in size; unknown fields and syntax errors become 400s in our envelope.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &AppState) -> Result<Self, ApiError> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_REQUEST_BODY)
            .await
            .map_err(|_| ApiError::too_large(MAX_REQUEST_BODY))?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::invalid(format!("malformed request body: {e}")))
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
pub struct Router(pub Identity, pub Arc<PeerCert>);

impl FromRequestParts<AppState> for Router {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let (identity, peer) = authorize(parts, state, Some(IdentityKind::Router)).await?;
        Ok(Router(identity, peer))
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
