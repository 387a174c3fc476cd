//! The crate's error type and its typed causes.
//!
//! The variants say what went wrong and, where a file is involved, which file, so that the
//! controller and the CLI can show an operator one clear line. Causes that a caller may want to
//! branch on (a refused CSR, a certificate without a SPIFFE id) are typed sub-enums rather than
//! strings.

use std::path::PathBuf;

use crate::identity_file::IdentityFileError;
use crate::outfile::OutFileError;
use crate::spiffe::{SpiffeError, TrustDomain};
use crate::token::TokenError;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Reading, writing or renaming a file failed; `path` names the file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory that could not be read or written.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// Writing an output file failed or was refused (see [`crate::outfile`]).
    #[error(transparent)]
    Output(#[from] OutFileError),
    /// A file was read but its content is not what it should be; `cause` says why.
    #[error("{}: {cause}", path.display())]
    File {
        /// The file with the bad content.
        path: PathBuf,
        /// Why the content was refused.
        #[source]
        cause: Box<PkiError>,
    },
    /// A file is larger than anything this crate writes, so it is not read at all.
    #[error("{}: file is larger than {max} bytes", path.display())]
    FileTooLarge {
        /// The oversized file.
        path: PathBuf,
        /// The limit for this kind of file.
        max: u64,
    },
    /// PEM text holding certificates could not be decoded.
    #[error("bad PEM: {0}")]
    Pem(#[from] rustls_pki_types::pem::Error),
    /// A certificate is malformed or is not the certificate it should be.
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    /// A certificate signing request was refused.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// A private key could not be read or is of a refused kind.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A SPIFFE id or trust domain is invalid.
    #[error(transparent)]
    Spiffe(#[from] SpiffeError),
    /// An enrollment token was refused.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// An identity file is invalid.
    #[error(transparent)]
    IdentityFile(#[from] IdentityFileError),
    /// rcgen failed to generate a key or to sign a certificate.
    #[error("generating a key or certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused a configuration (for example a key that does not match the certificate).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// rustls refused to build a certificate verifier (for example: no trust anchors).
    #[error("TLS certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

impl PkiError {
    /// Attaches the path of the file whose content caused this error.
    pub(crate) fn in_file(self, path: impl Into<PathBuf>) -> PkiError {
        PkiError::File {
            path: path.into(),
            cause: Box::new(self),
        }
    }
}

/// Why a certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertificateError {
    /// The bytes are not a DER-encoded X.509 certificate.
    #[error("not a valid X.509 certificate")]
    Malformed,
    /// Bytes follow the certificate's DER encoding.
    #[error("trailing bytes after the certificate")]
    TrailingData,
    /// PEM text that should hold certificates holds none.
    #[error("no certificate found")]
    NoCertificates,
    /// PEM text holds more certificates than any Umbra chain has.
    #[error("{0} certificates in one chain; at most {max} are accepted", max = crate::cert::MAX_CHAIN_LEN)]
    TooManyCertificates(usize),
    /// A file that should hold exactly one certificate holds several.
    #[error("expected exactly one certificate, found {0}")]
    NotExactlyOne(usize),
    /// The subjectAltName extension is malformed or present twice.
    #[error("malformed or duplicated subjectAltName extension")]
    BadSubjectAltName,
    /// The certificate has no URI SAN, so it names no SPIFFE identity.
    #[error("the certificate has no SPIFFE id (no URI SAN)")]
    NoSpiffeId,
    /// The certificate has several URI SANs; an Umbra identity has exactly one.
    #[error("the certificate has {0} URI SANs; exactly one SPIFFE id is required")]
    SeveralUris(usize),
    /// The URI SAN is not a valid SPIFFE id of an Umbra identity.
    #[error("bad SPIFFE id in the certificate: {0}")]
    BadSpiffeId(SpiffeError),
    /// The certificate belongs to another trust domain than the expected one.
    #[error("the certificate belongs to trust domain {found:?}, expected {expected}")]
    WrongTrustDomain {
        /// The trust domain the caller expected.
        expected: TrustDomain,
        /// The trust domain found in the certificate (possibly invalid, hence a string).
        found: String,
    },
    /// The certificate's validity period cannot be represented (before 1970) or is empty.
    #[error("the certificate has an unusable validity period")]
    BadValidity,
    /// The requested lifetime would end after the issuing CA's own certificate expires.
    #[error("the certificate would outlive its issuing CA (requested notAfter {requested}, CA notAfter {issuer})")]
    OutlivesIssuer {
        /// The requested notAfter, in seconds since the Unix epoch.
        requested: u64,
        /// The issuing CA certificate's notAfter, in seconds since the Unix epoch.
        issuer: u64,
    },
    /// A certificate that must be a CA (basicConstraints cA=TRUE) is not one.
    #[error("the certificate is not a CA certificate")]
    NotCa,
    /// The certificate was not signed by the CA it should chain to.
    #[error("the certificate is not signed by the expected issuer")]
    NotSignedByIssuer,
    /// The private key stored next to the certificate belongs to another certificate.
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    /// No certificate in the server's chain has the pinned SHA-256 fingerprint.
    #[error("no certificate in the presented chain matches the pinned CA fingerprint")]
    PinMismatch,
    /// The certificate's serial number is on the revocation list.
    #[error("the certificate has been revoked")]
    Revoked,
    /// The certificate is valid, but the identity it names may not connect here (unknown to
    /// the server's policy, disabled, expired, or of a kind this server does not serve).
    #[error("the identity {spiffe} is not admitted: {reason}")]
    NotAdmitted {
        /// The SPIFFE id in the certificate.
        spiffe: String,
        /// Why, in a few words.
        reason: &'static str,
    },
    /// The peer's certificate names an identity the caller did not expect.
    #[error("unexpected peer identity {found}")]
    UnexpectedPeer {
        /// The SPIFFE id found in the peer's certificate.
        found: String,
    },
    /// The TLS peer presented no certificate (or the handshake has not finished).
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
}

/// Why a certificate signing request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// The CSR is empty.
    #[error("empty CSR")]
    Empty,
    /// The CSR is larger than [`crate::MAX_CSR_SIZE`]; no honest CSR is.
    #[error("CSR is {size} bytes; at most {max} are accepted")]
    TooLarge {
        /// The size received.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a DER-encoded PKCS#10 certification request.
    #[error("not a valid PKCS#10 certification request")]
    Malformed,
    /// Bytes follow the CSR's DER encoding.
    #[error("trailing bytes after the CSR")]
    TrailingData,
    /// The CSR's public key is neither EC P-256 (uncompressed) nor Ed25519.
    #[error("unsupported public key; only EC P-256 and Ed25519 keys are accepted")]
    UnsupportedKey,
    /// The CSR is signed with an algorithm other than ECDSA-SHA256 (P-256 keys) or Ed25519.
    #[error("unsupported CSR signature algorithm for this key")]
    UnsupportedSignatureAlgorithm,
    /// The CSR's self-signature does not verify with the key it carries: the requester has not
    /// proven that it holds the private key.
    #[error("CSR signature does not verify (no proof of possession of the private key)")]
    BadSignature,
}

/// Why a private key was refused. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The PEM text holds no private key.
    #[error("no private key found")]
    NotAPrivateKey,
    /// The private key could not be decoded.
    #[error("malformed private key")]
    Malformed,
    /// The key is of an algorithm this use does not accept.
    #[error("unsupported private key algorithm")]
    UnsupportedAlgorithm,
}
