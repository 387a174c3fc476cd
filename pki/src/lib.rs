//! Umbra's public-key infrastructure: SPIFFE identities, the controller's certificate authority,
//! certificate signing requests, one-time enrollment tokens, identity files and the rustls
//! configurations that every Umbra connection uses.
//!
//! Everything that decides who a peer is lives here, so that the controller, the routers and the
//! SDK make that decision the same way. The crate never reads the clock on its own (callers pass
//! `now`), except where rustls verifies certificate validity during a handshake.
//!
//! What this crate must never do:
//! - let a private key leave the machine that generated it: enrollees send a CSR, never a key;
//! - trust what a CSR asks for: the CA decides the subject, the SANs and every extension;
//! - print a secret: keys and identity files redact themselves in `Debug`;
//! - rely on a process-wide rustls crypto provider: every config names `ring` explicitly;
//! - accept anything but TLS 1.3;
//! - write a file any other way than through [`outfile`], which never renames over (or chmods)
//!   anything but a regular file and never widens a file's permissions.

pub mod ca;
pub mod cert;
pub mod controllers;
pub mod csr;
pub mod error;
pub mod fingerprint;
mod fsutil;
pub mod identity_file;
pub mod outfile;
mod pem;
mod serial;
pub mod spiffe;
pub mod tls;
pub mod token;

pub use ca::{
    CertificateAuthority, IssuedCert, ServerCredentials, CONTROLLER_SERVER_NAME,
    ENROLL_SERVER_NAME, MAX_CSR_SIZE,
};
pub use cert::{parse_peer_cert, parse_pem_chain, parse_private_key_pem, unix_timestamp, PeerCert};
pub use controllers::{ControllerAddrs, ControllerAddrsError, MAX_CONTROLLERS};
pub use csr::{csr_for_key, generate_key_and_csr, KeyAndCsr, SecretString};
pub use error::{CertificateError, CsrError, KeyError, PkiError};
pub use fingerprint::{fingerprint, Fingerprint, FingerprintError};
pub use identity_file::{IdentityFile, IdentityFileError, IDENTITY_FILE_VERSION};
pub use outfile::{check_target, open_append, private_database, write_file, OutFileError};
pub use serial::{Serial, SerialError};
pub use spiffe::{SpiffeError, SpiffeId, TrustDomain, TrustDomainError};
pub use tls::{
    client_config, client_config_pinned, client_config_pinned_with_clock, client_config_spiffe,
    client_config_spiffe_with_clock, client_config_with_clock, peer_identity, server_config,
    server_config_with_clock, ClientAuth, ClockTime, ExpectedServer, PeerRejected, RevocationCheck,
};
pub use token::{
    decode_unverified, new_nonce, EnrollmentClaims, Malformation, TokenError, TokenSigner,
    TokenVerifier, MAX_TOKEN_LEN, TOKEN_CLOCK_SKEW_SECS,
};
