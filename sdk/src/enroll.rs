//! Enrollment and renewal, from the identity's side.

use base64::Engine;
use http::Method;
use umbra_pki::{ControllerAddrs, IdentityFile, SpiffeId, ENROLL_SERVER_NAME};
use umbra_proto::api::{EnrollRequest, EnrollResponse, RenewRequest, RenewResponse};

use crate::client::ControllerClient;
use crate::error::SdkError;

/// Enrolls with a one-time token: generates a key pair here, sends only a CSR to the controller
/// named in the token over TLS pinned to the CA fingerprint in the token, and returns the
/// complete identity file (which the caller saves, 0600).
///
/// The token (or `controller_override`) may name several controllers; the identity file keeps
/// the whole list. Enrollment fails over to the next controller only while the request cannot
/// have been sent (no connection, no TLS): once the token may have reached a controller it is
/// not sent to another, since it may already be spent there (see [`crate::ControllerClient`]).
///
/// The token's signature cannot be checked before the CA is trusted; what makes this safe is
/// the pin: a controller that cannot prove a chain to the pinned root gets nothing, and the
/// controller checks the signature before it signs anything.
pub async fn enroll(
    token: &str,
    controller_override: Option<&str>,
) -> Result<IdentityFile, SdkError> {
    let claims = umbra_pki::decode_unverified(token.trim())?;
    let key = umbra_pki::generate_key_and_csr(claims.name.as_str())?;
    let tls = umbra_pki::client_config_pinned(claims.ca, &[b"http/1.1"]);
    let addrs: ControllerAddrs = controller_override.unwrap_or(&claims.iss).parse()?;
    let client = ControllerClient::new(&addrs, ENROLL_SERVER_NAME, tls);
    let req = EnrollRequest {
        token: token.trim().to_owned(),
        csr: base64::engine::general_purpose::STANDARD.encode(&key.csr_der),
    };
    let resp: EnrollResponse = client.call(Method::POST, "/v1/enroll", Some(&req)).await?;

    // Check what came back against what we pinned and asked for.
    let roots = umbra_pki::parse_pem_chain(&resp.ca_pem)?;
    if roots.len() != 1 || umbra_pki::fingerprint(&roots[0]) != claims.ca {
        return Err(SdkError::Protocol(
            "the controller returned a CA other than the pinned one".into(),
        ));
    }
    let file = IdentityFile {
        version: 1,
        id: claims.sub.clone(),
        name: claims.name.clone(),
        kind: claims.kind,
        trust_domain: claims.td.clone(),
        controller: addrs.to_string(),
        ca_pem: resp.ca_pem,
        cert_pem: resp.cert_pem,
        key_pem: key.key_pem,
    };
    check_issued(&file, &SpiffeId::new(&claims.td, claims.kind, &claims.name))?;
    Ok(file)
}

/// Renews the identity's certificate with a fresh key, authenticating with the current one.
/// Returns the updated identity file (its controller list unchanged); the caller saves it.
pub async fn renew(identity: &IdentityFile) -> Result<IdentityFile, SdkError> {
    let client = ControllerClient::for_identity(identity, None)?;
    renew_via(identity, &client).await
}

/// Like [`renew`], through `client` (which presents `identity`'s certificate). The file's
/// controller list is kept.
///
/// A renewal may be repeated on another controller even after it may have reached one: the
/// worst a repetition does is issue a second certificate for the same new key, which never
/// left this machine (and the renewal schedule already does that, with another key, whenever
/// an answer is lost), so it is sent with [`ControllerClient::call_idempotent`].
pub(crate) async fn renew_via(
    identity: &IdentityFile,
    client: &ControllerClient,
) -> Result<IdentityFile, SdkError> {
    let key = umbra_pki::generate_key_and_csr(identity.name.as_str())?;
    let req = RenewRequest {
        csr: base64::engine::general_purpose::STANDARD.encode(&key.csr_der),
    };
    let resp: RenewResponse = client
        .call_idempotent(Method::POST, "/v1/renew", Some(&req))
        .await?;
    let mut file = identity.clone();
    file.cert_pem = resp.cert_pem;
    file.key_pem = key.key_pem;
    check_issued(&file, &identity.spiffe())?;
    Ok(file)
}

/// The certificate names the expected SPIFFE id and works with our key.
fn check_issued(file: &IdentityFile, expected: &SpiffeId) -> Result<(), SdkError> {
    let leaf = file.leaf()?;
    if &leaf.spiffe != expected {
        return Err(SdkError::Protocol(format!(
            "the controller issued {} instead of {expected}",
            leaf.spiffe
        )));
    }
    // Building a client config fails if the certificate and key do not belong together.
    umbra_pki::client_config(file, &[b"http/1.1"])?;
    Ok(())
}
