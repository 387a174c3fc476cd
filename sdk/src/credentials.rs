//! [`Credentials`]: an identity file and what every connection derives from it. Its own module
//! because the controller client presents them and renewal replaces them: both use it, and
//! neither depends on the other through it.

use std::sync::Arc;

use umbra_clock::Clock;
use umbra_pki::{IdentityFile, PeerCert};

use crate::error::SdkError;

/// An identity file together with what every connection derives from it, built once per
/// certificate. Immutable: a renewal publishes a new one.
pub struct Credentials {
    identity: Arc<IdentityFile>,
    leaf: PeerCert,
    controller_tls: Arc<rustls::ClientConfig>,
    /// The clock the TLS configurations judge peers' certificates by (the renewal's clock).
    clock: Clock,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("spiffe", &self.leaf.spiffe.to_string())
            .field("serial", &self.leaf.serial.to_string())
            .field("not_after", &self.leaf.not_after.0)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Checks an identity file (a leaf with the file's SPIFFE id, a key that belongs to it) and
    /// builds its controller TLS configuration, which judges certificates at `clock`'s time.
    pub fn new(identity: IdentityFile, clock: Clock) -> Result<Credentials, SdkError> {
        let leaf = identity.leaf()?;
        if leaf.spiffe != identity.spiffe() {
            return Err(SdkError::Protocol(format!(
                "the certificate is for {}, but the file describes {}",
                leaf.spiffe,
                identity.spiffe()
            )));
        }
        // Fails if the certificate and key do not belong together.
        let controller_tls =
            umbra_pki::client_config_with_clock(&identity, &[b"http/1.1"], &clock)?;
        Ok(Credentials {
            identity: Arc::new(identity),
            leaf,
            controller_tls,
            clock,
        })
    }

    /// The identity file, certificate and key included.
    pub fn identity(&self) -> &Arc<IdentityFile> {
        &self.identity
    }

    /// What the current leaf certificate says (serial, validity).
    pub fn leaf(&self) -> &PeerCert {
        &self.leaf
    }

    /// The clock these credentials' TLS configurations judge certificates by.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub(crate) fn controller_tls(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.controller_tls)
    }
}
