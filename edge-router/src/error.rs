//! Why a router could not start.

/// Why [`crate::Router::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The identity is not a router identity.
    #[error("the identity {0} is not a router")]
    NotARouter(String),
    /// The identity's certificates or key could not be used.
    #[error("the router identity cannot be used: {0}")]
    Pki(#[from] umbra_pki::PkiError),
    /// The TLS configuration has no QUIC-capable cipher suite.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The controller client could not be built.
    #[error("controller client: {0}")]
    Sdk(#[from] umbra_sdk::SdkError),
    /// The stale window would make an idle router flap between heartbeats.
    #[error("{0}")]
    StaleWindow(#[from] umbra_proto::follow::StaleTooShort),
}
