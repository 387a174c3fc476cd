//! The router's view of the controller's state, published as immutable snapshots.
//!
//! The control follower builds one [`Policy`] per batch of applied changes and publishes it on a
//! `watch` channel; every connection and stream holds a receiver and re-checks itself when a new
//! one arrives. `None` on the channel means "no trustworthy policy" (never synchronized, or the
//! controller has been silent too long), and the router refuses everything.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::watch;
use umbra_pki::{PeerCert, RevocationCheck, Serial};
use umbra_policies::{Identity, IdentityId, IdentityKind, Index, Timestamp};
use umbra_proto::Replica;

/// The current policy, or `None` when the router must fail closed.
pub type PolicyRx = watch::Receiver<Option<Arc<Policy>>>;

/// One consistent snapshot of everything the router decides with.
#[derive(Debug)]
pub struct Policy {
    /// The controller's state as of `replica.seq`.
    pub replica: Replica,
    /// The compiled index over `replica.state`.
    pub index: Index,
    /// Identity ids by name (names are unique across kinds).
    by_name: HashMap<String, IdentityId>,
    /// Revoked certificate serials.
    revoked: HashSet<String>,
}

/// Why a connecting identity is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No identity of that name and kind exists.
    #[error("unknown identity")]
    Unknown,
    /// Only agents may open data-plane connections.
    #[error("identity kind may not connect")]
    WrongKind,
    /// The identity is revoked, disabled or expired.
    #[error("identity is not active")]
    Inactive,
    /// The certificate's serial is revoked.
    #[error("certificate revoked")]
    CertRevoked,
}

impl Policy {
    /// Compiles a replica.
    pub fn build(replica: Replica) -> Policy {
        let index = Index::build(&replica.state);
        let by_name = (replica.state.identities.values())
            .map(|i| (i.name.as_str().to_owned(), i.id.clone()))
            .collect();
        let revoked = replica.revoked.keys().cloned().collect();
        Policy {
            replica,
            index,
            by_name,
            revoked,
        }
    }

    /// Whether a certificate serial is revoked.
    pub fn is_revoked(&self, serial: &Serial) -> bool {
        self.revoked.contains(serial.as_str())
    }

    /// The identity a handshake-verified certificate belongs to, if it may use the data plane
    /// at `now`: it exists with the certificate's name and kind, it is an agent, it is active,
    /// and the certificate is not revoked.
    pub fn admit(&self, peer: &PeerCert, now: Timestamp) -> Result<&Identity, Refusal> {
        if self.is_revoked(&peer.serial) {
            return Err(Refusal::CertRevoked);
        }
        let identity = (self.by_name.get(peer.spiffe.name().as_str()))
            .and_then(|id| self.replica.state.identities.get(id))
            .filter(|i| i.kind == peer.spiffe.kind())
            .ok_or(Refusal::Unknown)?;
        if identity.kind != IdentityKind::Agent {
            return Err(Refusal::WrongKind);
        }
        if !identity.is_active(now) {
            return Err(Refusal::Inactive);
        }
        Ok(identity)
    }
}

/// The handshake's revocation check, reading whatever policy is current.
#[derive(Clone)]
pub struct LiveRevocations(pub PolicyRx);

impl std::fmt::Debug for LiveRevocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveRevocations")
    }
}

impl RevocationCheck for LiveRevocations {
    fn is_revoked(&self, serial: &Serial) -> bool {
        // No policy: the connection is refused right after the handshake (codes::SHUTDOWN),
        // which tells the client to try another router rather than that it was revoked.
        self.0
            .borrow()
            .as_ref()
            .is_some_and(|p| p.is_revoked(serial))
    }
}

/// Seconds since the epoch, now.
pub fn now() -> Timestamp {
    umbra_pki::unix_timestamp(std::time::SystemTime::now())
}
