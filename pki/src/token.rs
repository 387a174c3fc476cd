//! One-time enrollment tokens: compact JWS (a JWT) signed with EdDSA (Ed25519).
//!
//! The controller signs a token per identity; the enrollee uses the unverified claims only to
//! find the controller (`iss`) and to pin its CA (`ca`), then presents the token with its CSR; the
//! controller verifies signature, lifetime and single use (`jti`). The verifier is deliberately
//! narrow: one header, one algorithm, strict unpadded base64url, a size bound, and claims with no
//! unknown fields. There is no algorithm negotiation to confuse.

use std::fmt;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::RngCore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde::{Deserialize, Serialize};
use umbra_policies::{IdentityId, IdentityKind, Name, Timestamp};
use zeroize::Zeroizing;

use crate::error::{KeyError, PkiError};
use crate::fingerprint::Fingerprint;
use crate::fsutil;
use crate::spiffe::TrustDomain;

/// The largest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;

/// How far in the future `iat` may be before a token counts as not yet valid, to tolerate clock
/// differences between controller replicas.
pub const TOKEN_CLOCK_SKEW_SECS: u64 = 60;

/// The only header accepted, byte for byte.
const HEADER: &str = r#"{"alg":"EdDSA","typ":"JWT"}"#;

/// PKCS#8 v1 DER prefix of an Ed25519 private key; the 32-byte seed follows (RFC 8410).
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The largest signer key file read.
const MAX_KEY_FILE: u64 = 16 * 1024;

/// What an enrollment token says.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentClaims {
    /// Where the enrollee sends its CSR: the controller's address as `host:port`, or the
    /// addresses of several controllers separated by commas (see
    /// [`crate::ControllerAddrs`]; a string, so that tokens of either kind read the same way).
    /// It becomes the identity file's `controller`.
    pub iss: String,
    /// The id of the identity being enrolled.
    pub sub: IdentityId,
    /// The identity's name.
    pub name: Name,
    /// What the identity is for.
    pub kind: IdentityKind,
    /// The trust domain the identity will belong to.
    pub td: TrustDomain,
    /// SHA-256 of the root CA certificate; the enrollee pins it on first contact.
    pub ca: Fingerprint,
    /// When the token was issued.
    pub iat: Timestamp,
    /// When the token expires.
    pub exp: Timestamp,
    /// A random nonce (see [`new_nonce`]); the controller accepts each one once.
    pub jti: String,
}

/// Which part of a token is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Malformation {
    /// The token is not three dot-separated parts.
    #[error("a token has exactly three dot-separated parts")]
    Segments,
    /// The header is not strict unpadded base64url.
    #[error("header is not unpadded base64url")]
    HeaderEncoding,
    /// The header is not exactly `{"alg":"EdDSA","typ":"JWT"}`.
    #[error("header is not {{\"alg\":\"EdDSA\",\"typ\":\"JWT\"}}")]
    Header,
    /// The payload is not strict unpadded base64url.
    #[error("payload is not unpadded base64url")]
    PayloadEncoding,
    /// The payload is not valid enrollment claims (bad JSON, missing or unknown field, bad value).
    #[error("payload is not valid enrollment claims")]
    Claims,
    /// The signature is not strict unpadded base64url of 64 bytes.
    #[error("signature is not 64 bytes of unpadded base64url")]
    SignatureEncoding,
}

/// Why an enrollment token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token is larger than [`MAX_TOKEN_LEN`].
    #[error("token is larger than {MAX_TOKEN_LEN} bytes")]
    TooLarge,
    /// The token is not well-formed.
    #[error("malformed token: {0}")]
    Malformed(Malformation),
    /// The header names another algorithm than EdDSA (for example `none` or `HS256`).
    #[error("unsupported token algorithm; only EdDSA is accepted")]
    UnsupportedAlgorithm,
    /// The signature does not verify with the controller's key.
    #[error("token signature does not verify")]
    BadSignature,
    /// The token's `exp` has passed.
    #[error("token has expired")]
    Expired,
    /// The token's `iat` is in the future.
    #[error("token is not valid yet")]
    NotYetValid,
    /// The token expires before it was issued.
    #[error("token expires before it was issued")]
    BadLifetime,
}

/// The controller's token-signing key (Ed25519). `Debug` does not show it.
pub struct TokenSigner {
    key: SigningKey,
}

/// The public half of a [`TokenSigner`], which verifies tokens.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenVerifier(VerifyingKey);

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner")
            .field("public", &self.verifying_key())
            .field("key", &"...")
            .finish()
    }
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenVerifier({})", hex::encode(self.0.as_bytes()))
    }
}

impl TokenSigner {
    /// Generates a new signing key from the operating system's random source.
    pub fn generate() -> TokenSigner {
        TokenSigner {
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// Writes the key as PKCS#8 PEM (`PRIVATE KEY`, as OpenSSL writes Ed25519 keys), atomically,
    /// with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), PkiError> {
        let mut der = Zeroizing::new(Vec::with_capacity(48));
        der.extend_from_slice(&ED25519_PKCS8_PREFIX);
        der.extend_from_slice(self.key.as_bytes());
        let pem = Zeroizing::new(crate::pem::encode("PRIVATE KEY", &der));
        crate::outfile::write_file(path, pem.as_bytes(), fsutil::PRIVATE_MODE)
            .map_err(PkiError::from)
    }

    /// Reads a key written by [`save`](Self::save) (or an OpenSSL Ed25519 PKCS#8 PEM key).
    pub fn load(path: &Path) -> Result<Self, PkiError> {
        let text = Zeroizing::new(fsutil::read_limited(path, MAX_KEY_FILE)?);
        if fsutil::is_shared(path) {
            tracing::warn!(path = %path.display(), "token signing key file is readable by other users");
        }
        let der = PrivatePkcs8KeyDer::from_pem_slice(&text).map_err(|e| {
            PkiError::Key(match e {
                rustls_pki_types::pem::Error::NoItemsFound => KeyError::NotAPrivateKey,
                _ => KeyError::Malformed,
            })
            .in_file(path)
        })?;
        let der = der.secret_pkcs8_der();
        if der.len() != ED25519_PKCS8_PREFIX.len() + 32 || !der.starts_with(&ED25519_PKCS8_PREFIX) {
            return Err(PkiError::Key(KeyError::UnsupportedAlgorithm).in_file(path));
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&der[ED25519_PKCS8_PREFIX.len()..]);
        Ok(TokenSigner {
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// The public key that verifies this signer's tokens.
    pub fn verifying_key(&self) -> TokenVerifier {
        TokenVerifier(self.key.verifying_key())
    }

    /// Signs `claims` as a compact JWS. The token is only accepted by [`TokenVerifier::verify`]
    /// if it fits in [`MAX_TOKEN_LEN`], which any claims with a sane `iss` do.
    pub fn sign(&self, claims: &EnrollmentClaims) -> String {
        // Serializing plain strings, numbers and unit enums into a Vec cannot fail.
        #[allow(clippy::expect_used)]
        let payload = serde_json::to_vec(claims).expect("enrollment claims serialize to JSON");
        let mut token = URL_SAFE_NO_PAD.encode(HEADER);
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(payload));
        let signature = self.key.sign(token.as_bytes());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
        token
    }
}

impl TokenVerifier {
    /// Verifies a token's form, signature and lifetime at `now`, and returns its claims.
    ///
    /// Single use (`jti`) is the caller's to enforce. Checks, in order: size, form, header,
    /// signature (before the claims are even parsed), claims, `exp > iat`, `now < exp`,
    /// `iat <= now + TOKEN_CLOCK_SKEW_SECS`.
    pub fn verify(&self, token: &str, now: Timestamp) -> Result<EnrollmentClaims, TokenError> {
        let parts = split(token)?;
        self.0
            .verify_strict(parts.signed.as_bytes(), &parts.signature)
            .map_err(|_| TokenError::BadSignature)?;
        let claims = parts.claims()?;
        if claims.exp <= claims.iat {
            return Err(TokenError::BadLifetime);
        }
        if now >= claims.exp {
            return Err(TokenError::Expired);
        }
        if claims.iat > now.plus(TOKEN_CLOCK_SKEW_SECS) {
            return Err(TokenError::NotYetValid);
        }
        Ok(claims)
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// A verifier from a raw 32-byte Ed25519 public key; refuses weak (small-order) keys.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<TokenVerifier, KeyError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| KeyError::Malformed)?;
        if key.is_weak() {
            return Err(KeyError::Malformed);
        }
        Ok(TokenVerifier(key))
    }
}

/// A token split into its parts, with header and signature already checked for form.
struct Parts<'a> {
    /// `header.payload`, the signed text.
    signed: &'a str,
    payload: &'a str,
    signature: Signature,
}

impl Parts<'_> {
    fn claims(&self) -> Result<EnrollmentClaims, TokenError> {
        let json = URL_SAFE_NO_PAD
            .decode(self.payload)
            .map_err(|_| TokenError::Malformed(Malformation::PayloadEncoding))?;
        serde_json::from_slice(&json).map_err(|_| TokenError::Malformed(Malformation::Claims))
    }
}

fn split(token: &str) -> Result<Parts<'_>, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLarge);
    }
    let mut it = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(TokenError::Malformed(Malformation::Segments));
    };
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed(Malformation::HeaderEncoding))?;
    if header != HEADER.as_bytes() {
        // Say "unsupported algorithm" when the header is JSON naming another one: that is the
        // attack this refusal is about (alg=none, HS256 keyed with the public key, ...).
        #[derive(Deserialize)]
        struct AlgOnly {
            alg: String,
        }
        return Err(match serde_json::from_slice::<AlgOnly>(&header) {
            Ok(h) if h.alg != "EdDSA" => TokenError::UnsupportedAlgorithm,
            _ => TokenError::Malformed(Malformation::Header),
        });
    }
    let sig = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| TokenError::Malformed(Malformation::SignatureEncoding))?;
    let sig: [u8; 64] = sig
        .try_into()
        .map_err(|_| TokenError::Malformed(Malformation::SignatureEncoding))?;
    // Lengths of the two parts plus the dot: the prefix of `token` that the signature covers.
    let signed = &token[..token.len() - signature.len() - 1];
    Ok(Parts {
        signed,
        payload,
        signature: Signature::from_bytes(&sig),
    })
}

/// Decodes a token's claims without verifying its signature or lifetime.
///
/// For the enrollee only, which cannot verify the signature before it trusts the CA: it may use
/// `iss` and `ca` to find and pin the controller, and nothing else. The token's form and header
/// are still checked.
pub fn decode_unverified(token: &str) -> Result<EnrollmentClaims, TokenError> {
    split(token)?.claims()
}

/// A fresh random nonce for `jti`: 128 bits, unpadded base64url (22 characters).
pub fn new_nonce() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}
