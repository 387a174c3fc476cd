//! The router's view of the controller's state, published as immutable snapshots.
//!
//! The control follower builds one [`Policy`] per batch of applied changes and publishes it on a
//! `watch` channel; every connection and stream holds a receiver and re-checks itself when a new
//! one arrives. `None` on the channel means "no trustworthy policy" (never synchronized, or the
//! controller has been silent too long), and the router refuses everything.

use std::sync::Arc;

use tokio::sync::watch;
use umbra_pki::{CertificateError, PeerCert, RevocationCheck, Serial};
use umbra_policies::{
    CertRecord, Deny, Identity, IdentityId, IdentityKind, Index, Roster, Timestamp,
};
use umbra_proto::stream::codes;
use umbra_proto::verdict::{Moment, Verdict};
use umbra_proto::{ChangeEvent, Replica, RevokedCert};

/// The current policy, or `None` when the router must fail closed.
pub type PolicyRx = watch::Receiver<Option<Arc<Policy>>>;

/// One consistent snapshot of everything the router decides with. It decides nothing itself:
/// it is the [`Roster`] that `umbra_policies::admit` reads and, through `index`, the
/// `Grants` that `umbra_policies::check_stream` reads.
///
/// Every part is persistent (the index, the state it holds, the maps here), so the policy after
/// a change is a copy of the one before with that change applied ([`Policy::apply`]): a
/// revocation costs the router a few map updates, not a compilation of every identity, and
/// consecutive policies share all the structure a change did not touch.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The sequence number of the controller's last change included.
    pub seq: u64,
    /// The compiled index, with the controller's state (`index.state()`).
    pub index: Index,
    /// Revoked certificate serials, with the identity each was issued to and its expiry.
    revoked: imbl::HashMap<String, RevokedCert>,
    /// The earliest expiry on the revocation list: nothing needs pruning before it.
    prune_at: Option<Timestamp>,
}

impl Policy {
    /// Compiles a replica from scratch (after a snapshot).
    pub fn build(replica: &Replica) -> Policy {
        let state = &replica.state;
        let revoked: imbl::HashMap<String, RevokedCert> = (replica.revoked.values())
            .map(|r| (r.serial.clone(), r.clone()))
            .collect();
        Policy {
            seq: replica.seq,
            index: Index::build(state),
            prune_at: revoked.values().map(|r| r.not_after).min(),
            revoked,
        }
    }

    /// This policy with `changes` (the controller's, in order, up to `seq`) applied: what
    /// [`Policy::build`] of the replica they lead to would give, at the cost of what they touch.
    pub fn apply(&self, seq: u64, changes: &[ChangeEvent]) -> Policy {
        let mut next = self.clone();
        next.seq = seq;
        for change in changes {
            next.apply_one(change);
        }
        next
    }

    /// This policy with `cuts` (changes that only take access away) applied, at the same
    /// sequence number: what the router enforces while a newer copy is being compiled.
    pub fn tightened(&self, cuts: &[ChangeEvent]) -> Policy {
        let mut next = self.clone();
        for change in cuts {
            next.apply_one(change);
        }
        next
    }

    fn apply_one(&mut self, change: &ChangeEvent) {
        if let ChangeEvent::CertRevoked { cert } = change {
            self.prune_at = Some(
                self.prune_at
                    .map_or(cert.not_after, |t| t.min(cert.not_after)),
            );
            self.revoked.insert(cert.serial.clone(), cert.clone());
        }
        if let Some(change) = change.state_change() {
            self.index.apply(&change);
        }
    }

    /// Drops revocations of certificates that have expired anyway (a certificate past its
    /// expiry is refused by the handshake itself); says whether there were any. Costs nothing
    /// until the earliest expires.
    pub fn prune_revoked(&mut self, now: Timestamp) -> bool {
        if self.prune_at.is_none_or(|t| t > now) {
            return false;
        }
        self.revoked.retain(|_, r| r.not_after > now);
        self.prune_at = self.revoked.values().map(|r| r.not_after).min();
        true
    }

    /// Whether a certificate serial is revoked.
    pub fn is_revoked(&self, serial: &Serial) -> bool {
        self.revoked.contains_key(serial.as_str())
    }

    /// The identity a handshake-verified certificate belongs to, if it may use the data plane
    /// at `now`: the core's [`umbra_policies::admit`] for agents.
    pub fn admit(&self, peer: &PeerCert, now: Timestamp) -> Result<&Identity, Deny> {
        umbra_policies::admit(self, &peer.presented(), Some(IdentityKind::Agent), now)
    }

    /// [`Policy::admit`] for a connection already admitted as `id`: the certificate must still
    /// speak for that same identity, not for one that took its name since.
    pub fn readmit(
        &self,
        peer: &PeerCert,
        id: &IdentityId,
        now: Timestamp,
    ) -> Result<&Identity, Deny> {
        self.admit(peer, now).and_then(|i| {
            if i.id == *id {
                Ok(i)
            } else {
                Err(Deny::UnknownIdentity)
            }
        })
    }
}

/// A router keeps no list of the certificates the controller issued, only the revocations
/// (which name their owner): see [`umbra_policies::admit`] for why that is enough to refuse a
/// deleted namesake's certificate.
impl Roster for Policy {
    fn identity_named(&self, name: &str) -> Option<&Identity> {
        self.index.identity_named(name)
    }

    fn certificate(&self, serial: &str) -> CertRecord<'_> {
        match self.revoked.get(serial) {
            Some(cert) => CertRecord::Revoked {
                owner: &cert.identity,
            },
            None => CertRecord::NotRevoked,
        }
    }
}

/// The handshake's revocation check, reading whatever policy is current and the router's
/// clock.
#[derive(Clone)]
pub struct LiveRevocations(pub PolicyRx, pub umbra_clock::Clock);

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

    /// The whole admission check at the handshake: an unknown, disabled, expired or non-agent
    /// identity never gets a connection, so it cannot even learn that the router speaks the
    /// data-plane protocol. The same check runs again after the handshake and on every policy
    /// change; this one only moves the first refusal earlier.
    fn admit(&self, peer: &PeerCert) -> Result<(), CertificateError> {
        let policy = self.0.borrow();
        // No policy: admitted here, refused right after (see `is_revoked`).
        let Some(p) = policy.as_ref() else {
            return Ok(());
        };
        match p.admit(peer, self.1.timestamp()) {
            Ok(_) => Ok(()),
            // The alert says "revoked" exactly when the close code would (`verdict`).
            Err(why) if Verdict::of(why, Moment::Request).code == codes::REVOKED => {
                Err(CertificateError::Revoked)
            }
            Err(why) => Err(CertificateError::NotAdmitted {
                spiffe: peer.spiffe.to_string(),
                reason: why.reason(),
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use umbra_pki::{SpiffeId, TrustDomain};
    use umbra_policies::Name;
    use umbra_proto::RevokedCert;

    fn identity(name: &str, kind: IdentityKind) -> Identity {
        Identity {
            id: IdentityId::new(format!("id-{name}")).unwrap(),
            name: Name::new(name).unwrap(),
            kind,
            roles: Default::default(),
            disabled: false,
            revoked: false,
            expires_at: None,
        }
    }

    fn peer(name: &str, kind: IdentityKind, serial: u8) -> PeerCert {
        let td = TrustDomain::new("test.umbra").unwrap();
        PeerCert {
            spiffe: SpiffeId::new(&td, kind, &Name::new(name).unwrap()),
            serial: Serial::from_bytes(&[serial]),
            not_before: Timestamp(0),
            not_after: Timestamp(1000),
        }
    }

    fn policy() -> Policy {
        let mut replica = Replica::default();
        let mut disabled = identity("off", IdentityKind::Agent);
        disabled.disabled = true;
        let mut expiring = identity("old", IdentityKind::Agent);
        expiring.expires_at = Some(Timestamp(50));
        let mut gone = identity("gone", IdentityKind::Agent);
        gone.revoked = true;
        for i in [
            identity("a", IdentityKind::Agent),
            identity("r", IdentityKind::Router),
            disabled,
            expiring,
            gone,
        ] {
            replica.state.identities.insert(i.id.clone(), i);
        }
        // 9: one of a's; 8: one of the `a` deleted before this one was created.
        for (serial, owner) in [(9, "id-a"), (8, "id-a-deleted")] {
            let serial = Serial::from_bytes(&[serial]).as_str().to_owned();
            replica.revoked.insert(
                serial.clone(),
                RevokedCert {
                    serial,
                    identity: IdentityId::new(owner).unwrap(),
                    not_after: Timestamp(1000),
                },
            );
        }
        Policy::build(&replica)
    }

    #[test]
    fn admits_only_active_agents_with_unrevoked_certificates() {
        let p = policy();
        let now = Timestamp(10);
        assert_eq!(
            p.admit(&peer("a", IdentityKind::Agent, 1), now)
                .unwrap()
                .name
                .as_str(),
            "a"
        );
        assert_eq!(
            p.admit(&peer("a", IdentityKind::Agent, 9), now)
                .unwrap_err(),
            Deny::CertRevoked
        );
        assert_eq!(
            p.admit(&peer("ghost", IdentityKind::Agent, 1), now)
                .unwrap_err(),
            Deny::UnknownIdentity
        );
        // A certificate of another kind with the same name is not that identity.
        assert_eq!(
            p.admit(&peer("a", IdentityKind::Admin, 1), now)
                .unwrap_err(),
            Deny::UnknownIdentity
        );
        assert_eq!(
            p.admit(&peer("r", IdentityKind::Router, 1), now)
                .unwrap_err(),
            Deny::WrongKind
        );
        assert_eq!(
            p.admit(&peer("off", IdentityKind::Agent, 1), now)
                .unwrap_err(),
            Deny::IdentityDisabled
        );
        assert!(p.admit(&peer("old", IdentityKind::Agent, 1), now).is_ok());
        assert_eq!(
            p.admit(&peer("old", IdentityKind::Agent, 1), Timestamp(50))
                .unwrap_err(),
            Deny::IdentityExpired
        );
    }

    #[test]
    fn a_connection_stays_with_the_identity_it_was_admitted_as() {
        let p = policy();
        let a = peer("a", IdentityKind::Agent, 1);
        let now = Timestamp(10);
        let same = IdentityId::new("id-a").unwrap();
        assert_eq!(p.readmit(&a, &same, now).map(|i| i.id.clone()), Ok(same));
        // Admitted as an earlier `a`: the certificate does not speak for the new one.
        let earlier = IdentityId::new("id-a-deleted").unwrap();
        assert_eq!(
            p.readmit(&a, &earlier, now).unwrap_err(),
            Deny::UnknownIdentity
        );
    }

    #[test]
    fn the_handshake_check_reads_the_live_policy() {
        let (tx, rx) = watch::channel(None);
        let check = LiveRevocations(rx, umbra_clock::Clock::system());
        let nine = Serial::from_bytes(&[9]);
        assert!(
            !check.is_revoked(&nine),
            "no policy: refused after the handshake instead"
        );
        tx.send_replace(Some(Arc::new(policy())));
        assert!(check.is_revoked(&nine));
        assert!(!check.is_revoked(&Serial::from_bytes(&[1])));
    }

    #[test]
    fn the_handshake_refuses_unknown_disabled_and_revoked_identities() {
        let (tx, rx) = watch::channel(None);
        let check = LiveRevocations(rx, umbra_clock::Clock::system());
        // No policy yet: refused after the handshake, with a code that says "try elsewhere".
        assert_eq!(check.admit(&peer("ghost", IdentityKind::Agent, 1)), Ok(()));
        tx.send_replace(Some(Arc::new(policy())));
        assert_eq!(check.admit(&peer("a", IdentityKind::Agent, 1)), Ok(()));
        // Revoked: a's revoked certificate, a deleted namesake's, a revoked identity's.
        for (name, serial) in [("a", 9), ("a", 8), ("gone", 1)] {
            assert_eq!(
                check.admit(&peer(name, IdentityKind::Agent, serial)),
                Err(CertificateError::Revoked),
                "{name} {serial}"
            );
        }
        for (name, kind) in [
            ("ghost", IdentityKind::Agent),
            ("off", IdentityKind::Agent),
            ("r", IdentityKind::Router),
        ] {
            assert!(
                matches!(
                    check.admit(&peer(name, kind, 1)),
                    Err(CertificateError::NotAdmitted { .. })
                ),
                "{name}"
            );
        }
    }
}

#[cfg(test)]
#[path = "policy_incremental_tests.rs"]
mod incremental_tests;
