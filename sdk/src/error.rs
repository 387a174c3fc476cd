//! The SDK's error type: callers must be able to tell "the controller said no" from "the
//! controller could not be reached" from "something is broken", and on the data plane "not
//! allowed" from "no longer allowed" from "not reachable right now".

use umbra_proto::stream::codes;

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
    /// None of several controllers could be reached: each one's error, in the order tried.
    #[error("no controller could be reached: {}", list(.0))]
    NoController(Vec<SdkError>),
    /// The connection to the controller failed after the request was sent, so the controller
    /// may have carried it out; a request that changes something is not sent again to another
    /// controller (an enrollment may have spent its token, a create may have happened).
    #[error("the connection to {addr} failed after the request was sent; it may have been carried out: {reason}")]
    Interrupted {
        /// Where the request went.
        addr: String,
        /// What ended the connection.
        reason: String,
    },
    /// A controller address list that does not parse (`--controller`, an identity file, a
    /// token).
    #[error("invalid controller address: {0}")]
    Controllers(#[from] umbra_pki::ControllerAddrsError),
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
    /// The router refused: the service does not exist or this identity may not use it. The two
    /// are deliberately indistinguishable.
    #[error("access to {service:?} denied")]
    Denied {
        /// The service asked for.
        service: String,
    },
    /// Access was revoked while the stream or connection was open (`codes::REVOKED`).
    #[error("access revoked")]
    Revoked,
    /// Access is granted but the service (or every router) cannot be reached right now.
    #[error("{0} is unavailable")]
    Unavailable(String),
    /// The router refused because this identity has too many streams open.
    #[error("too many streams open")]
    Limit,
    /// The connection to the router ended for a reason that is not a refusal.
    #[error("router connection lost: {0}")]
    Disconnected(String),
    /// Reading or writing a stream failed locally.
    #[error("stream I/O: {0}")]
    Io(std::io::Error),
}

/// Errors one after the other, each with the address it names.
fn list(errors: &[SdkError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl SdkError {
    /// The error behind an I/O error returned by a [`crate::Stream`] (which wraps an `SdkError`
    /// so that a revocation can be told apart from a network failure).
    pub fn from_io(e: std::io::Error) -> SdkError {
        if e.get_ref().is_some_and(|inner| inner.is::<SdkError>()) {
            if let Some(inner) = e.into_inner() {
                if let Ok(sdk) = inner.downcast::<SdkError>() {
                    return *sdk;
                }
            }
            return SdkError::Protocol("unreadable stream error".into());
        }
        SdkError::Io(e)
    }

    /// The error a router meant with an application error code.
    pub(crate) fn from_code(code: u64, what: &str) -> SdkError {
        match u32::try_from(code).unwrap_or(u32::MAX) {
            codes::REVOKED => SdkError::Revoked,
            codes::DENIED => SdkError::Denied {
                service: what.to_owned(),
            },
            codes::UNAVAILABLE | codes::SHUTDOWN => SdkError::Unavailable(what.to_owned()),
            codes::LIMIT => SdkError::Limit,
            codes::OK => SdkError::Disconnected("closed".into()),
            other => SdkError::Protocol(format!("stream ended with code {other:#x}")),
        }
    }

    /// Whether another router might serve the same request.
    pub(crate) fn try_another_router(&self) -> bool {
        matches!(
            self,
            SdkError::Unreachable { .. }
                | SdkError::Handshake { .. }
                | SdkError::Unavailable(_)
                | SdkError::Disconnected(_)
                | SdkError::Timeout(_)
        )
    }
}
