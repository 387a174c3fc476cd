//! The identity file `umbra enroll` writes: everything a process needs to act as an identity
//! (its certificate chain, its private key, the CA to trust and where the controller is).

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use umbra_policies::{IdentityId, IdentityKind, Name};
use zeroize::Zeroizing;

use crate::cert::{parse_peer_cert, parse_pem_chain, parse_private_key_pem, PeerCert};
use crate::controllers::{ControllerAddrs, ControllerAddrsError};
use crate::csr::SecretString;
use crate::error::{CertificateError, PkiError};
use crate::fsutil;
use crate::spiffe::{SpiffeId, TrustDomain};

/// The identity-file format version this crate reads and writes.
pub const IDENTITY_FILE_VERSION: u32 = 1;

/// The largest identity file read; real ones are a few kilobytes.
const MAX_IDENTITY_FILE: u64 = 1024 * 1024;

/// An enrolled identity, as stored on disk (JSON, mode 0600). `Debug` does not show the key.
#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// The format version; [`IDENTITY_FILE_VERSION`].
    pub version: u32,
    /// The identity's stable id.
    pub id: IdentityId,
    /// The identity's name (also in its SPIFFE id).
    pub name: Name,
    /// What the identity is for.
    pub kind: IdentityKind,
    /// The trust domain the identity belongs to.
    pub trust_domain: TrustDomain,
    /// Where the controllers are: one `host:port`, or several separated by commas (see
    /// [`ControllerAddrs`]). A string rather than a JSON list so that files written before
    /// there could be several controllers load unchanged, and files written now are read by
    /// the same field; [`IdentityFile::load`] refuses a file whose list does not parse.
    pub controller: String,
    /// The root CA certificate(s) to trust, PEM.
    pub ca_pem: String,
    /// The identity's certificate chain, leaf first, PEM.
    pub cert_pem: String,
    /// The identity's private key, PKCS#8 PEM.
    pub key_pem: SecretString,
}

/// Why an identity file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityFileError {
    /// The file is not valid identity-file JSON.
    #[error("not a valid identity file: {0}")]
    Json(#[from] serde_json::Error),
    /// The `controller` field is not an address or a list of addresses.
    #[error("controller: {0}")]
    Controllers(#[from] ControllerAddrsError),
    /// The file has a version this crate does not understand.
    #[error("unsupported identity file version {0} (expected {IDENTITY_FILE_VERSION})")]
    UnsupportedVersion(u32),
    /// The certificate names another identity than the file's id fields.
    #[error("the certificate is for {found}, but the file describes {expected}")]
    SpiffeMismatch {
        /// The SPIFFE id built from the file's trust domain, kind and name.
        expected: SpiffeId,
        /// The SPIFFE id in the certificate.
        found: SpiffeId,
    },
}

impl fmt::Debug for IdentityFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityFile")
            .field("version", &self.version)
            .field("id", &self.id)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("trust_domain", &self.trust_domain)
            .field("controller", &self.controller)
            .field("ca_pem", &format_args!("<{} bytes>", self.ca_pem.len()))
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &self.key_pem)
            .finish()
    }
}

impl IdentityFile {
    /// Reads and checks an identity file: known version, parsable CA, chain and key, a key that
    /// belongs to the leaf certificate, and a leaf whose SPIFFE id matches the file's trust
    /// domain, kind and name.
    ///
    /// A file readable by other users is loaded, with a warning.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, PkiError> {
        let path = path.as_ref();
        let data = Zeroizing::new(fsutil::read_limited(path, MAX_IDENTITY_FILE)?);
        if fsutil::is_shared(path) {
            tracing::warn!(path = %path.display(), "identity file is readable by other users; it holds a private key");
        }
        let file: IdentityFile = serde_json::from_slice(&data)
            .map_err(|e| PkiError::from(IdentityFileError::from(e)).in_file(path))?;
        file.check().map_err(|e| e.in_file(path))?;
        Ok(file)
    }

    fn check(&self) -> Result<(), PkiError> {
        if self.version != IDENTITY_FILE_VERSION {
            return Err(IdentityFileError::UnsupportedVersion(self.version).into());
        }
        self.controllers()?;
        parse_pem_chain(&self.ca_pem)?;
        let chain = parse_pem_chain(&self.cert_pem)?;
        let key = parse_private_key_pem(&self.key_pem)?;
        // The key must belong to the leaf, or every handshake would fail later and less clearly.
        rustls::sign::CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => PkiError::from(CertificateError::KeyMismatch),
                other => PkiError::from(other),
            })?;
        let leaf = self.leaf()?;
        let expected = self.spiffe();
        if leaf.spiffe != expected {
            return Err(IdentityFileError::SpiffeMismatch {
                expected,
                found: leaf.spiffe,
            }
            .into());
        }
        Ok(())
    }

    /// Writes the file atomically with mode 0600 (it holds the private key).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), PkiError> {
        let path = path.as_ref();
        let json = Zeroizing::new(
            serde_json::to_vec_pretty(self)
                .map_err(|e| PkiError::from(IdentityFileError::from(e)).in_file(path))?,
        );
        crate::outfile::write_file(path, &json, fsutil::PRIVATE_MODE).map_err(PkiError::from)
    }

    /// The controllers this identity talks to, in order of preference.
    pub fn controllers(&self) -> Result<ControllerAddrs, IdentityFileError> {
        Ok(self.controller.parse()?)
    }

    /// The identity's SPIFFE id, from the file's trust domain, kind and name.
    pub fn spiffe(&self) -> SpiffeId {
        SpiffeId::new(&self.trust_domain, self.kind, &self.name)
    }

    /// What the leaf certificate says: SPIFFE id, serial and validity (to decide when to renew).
    pub fn leaf(&self) -> Result<PeerCert, PkiError> {
        let chain = parse_pem_chain(&self.cert_pem)?;
        let leaf = chain.first().ok_or(CertificateError::NoCertificates)?;
        parse_peer_cert(leaf)
    }
}
