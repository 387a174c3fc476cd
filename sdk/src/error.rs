//! The SDK's error type: callers must be able to tell "the controller said no" from "the
//! controller could not be reached" from "something is broken".

/// Why an SDK call failed.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// The controller (or router) could not be reached.
    #[error("cannot reach {addr}: {source}")]
    Unreachable {
        /// Where we tried.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS handshake failed: wrong CA, refused certificate, or a revoked identity.
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake {
        /// Where.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The controller answered with an error.
    #[error("{message} ({status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The controller's error code, e.g. `not_found`.
        code: String,
        /// Its one-line message.
        message: String,
    },
    /// The peer spoke the protocol wrongly (bad HTTP, malformed JSON, mismatched data).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Certificates, keys or tokens.
    #[error(transparent)]
    Pki(#[from] umbra_pki::PkiError),
    /// A malformed enrollment token.
    #[error("invalid enrollment token: {0}")]
    Token(#[from] umbra_pki::TokenError),
    /// The operation took too long.
    #[error("timed out talking to {0}")]
    Timeout(String),
}
