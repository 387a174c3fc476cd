//! The control channel: how the controller keeps every router's copy of the model exact.
//!
//! A router connects, says which history (`epoch`) and sequence number it last applied, and the
//! controller answers with either the deltas after that number or a full snapshot (in bounded
//! chunks, see [`crate::snapshot`]) followed by deltas. Every committed change has exactly one sequence number, so a router that applies
//! deltas in order holds the same state as the controller; a gap means it must resynchronize.
//! Revocations are deltas like any other, persisted with their sequence number, so a router that
//! was away when one happened still receives it before anything newer.

use serde::{Deserialize, Serialize};
use umbra_policies::{
    Identity, IdentityId, Name, Service, ServicePolicy, State, StateChange, Timestamp,
};

/// Version of the control protocol; a router refuses messages of another version.
pub const CONTROL_PROTOCOL_VERSION: u32 = 1;

/// A certificate that must be refused before it expires on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedCert {
    /// The certificate's serial number, lower-case hex.
    pub serial: String,
    /// The identity it was issued to.
    pub identity: IdentityId,
    /// When it would have expired anyway; after this it can be dropped from the list.
    pub not_after: Timestamp,
}

/// Where clients reach a router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterInfo {
    /// The router's identity id.
    pub id: IdentityId,
    /// The router's name.
    pub name: Name,
    /// The address (`host:port`, UDP) that clients connect to; absent until it first reports.
    pub advertise: Option<String>,
}

/// One committed change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delta {
    /// Its sequence number: exactly one more than the previous delta's.
    pub seq: u64,
    /// When the controller committed it.
    pub at: Timestamp,
    /// What changed.
    pub change: ChangeEvent,
    /// Whether this is the last change of its commit. One command (an `apply`, a delete with
    /// `--cascade`) can commit several changes; a follower enforces only states at commit
    /// boundaries, never a half-applied command.
    #[serde(default = "yes")]
    pub last_in_commit: bool,
}

fn yes() -> bool {
    true
}

/// What a delta changes. Puts carry the whole new value, so applying one needs no prior value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ChangeEvent {
    /// An identity was created or changed (including being disabled or revoked).
    IdentityPut {
        /// The new value.
        identity: Identity,
    },
    /// An identity was deleted.
    IdentityDeleted {
        /// Its id.
        id: IdentityId,
    },
    /// A service was created or changed.
    ServicePut {
        /// The new value.
        service: Service,
    },
    /// A service was deleted.
    ServiceDeleted {
        /// Its name.
        name: Name,
    },
    /// A policy was created or changed.
    PolicyPut {
        /// The new value.
        policy: ServicePolicy,
    },
    /// A policy was deleted.
    PolicyDeleted {
        /// Its name.
        name: Name,
    },
    /// A certificate was revoked.
    CertRevoked {
        /// Which one.
        cert: RevokedCert,
    },
    /// A router was created or reported a new address.
    RouterPut {
        /// The new value.
        router: RouterInfo,
    },
    /// A router was deleted.
    RouterDeleted {
        /// Its id.
        id: IdentityId,
    },
}

impl ChangeEvent {
    /// The change to the model this event makes, in the core's terms (what `State::apply` and
    /// `Index::apply` take); `None` for certificates and routers, which the model does not hold.
    pub fn state_change(&self) -> Option<StateChange> {
        Some(match self {
            ChangeEvent::IdentityPut { identity } => StateChange::IdentityPut(identity.clone()),
            ChangeEvent::IdentityDeleted { id } => StateChange::IdentityDeleted(id.clone()),
            ChangeEvent::ServicePut { service } => StateChange::ServicePut(service.clone()),
            ChangeEvent::ServiceDeleted { name } => StateChange::ServiceDeleted(name.clone()),
            ChangeEvent::PolicyPut { policy } => StateChange::PolicyPut(policy.clone()),
            ChangeEvent::PolicyDeleted { name } => StateChange::PolicyDeleted(name.clone()),
            ChangeEvent::CertRevoked { .. }
            | ChangeEvent::RouterPut { .. }
            | ChangeEvent::RouterDeleted { .. } => return None,
        })
    }
}

/// One frame on the control channel, controller to router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlMessage {
    /// Start of a stream: the protocol version, so either side can refuse a mismatch.
    Hello {
        /// [`CONTROL_PROTOCOL_VERSION`] of the sender.
        version: u32,
        /// The controller's epoch.
        epoch: String,
    },
    /// A snapshot of the whole state begins: chunks follow, then its end, then deltas.
    SnapshotBegin {
        /// The controller's epoch.
        epoch: String,
        /// The sequence number of the last change included.
        seq: u64,
    },
    /// Part of the snapshot (see [`crate::snapshot`]).
    SnapshotChunk(Box<crate::snapshot::SnapshotChunk>),
    /// The snapshot is complete: it held this many entries of each kind.
    SnapshotEnd(crate::snapshot::SnapshotCounts),
    /// One change.
    Delta(Box<Delta>),
    /// Sent when nothing else was for a while, so a router notices a dead connection.
    Heartbeat {
        /// The latest sequence number.
        seq: u64,
    },
}

/// Why a delta could not be applied to a local copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The delta does not follow the last applied one; the copy must be resynchronized.
    #[error("sequence gap: expected {expected}, got {got}")]
    Gap {
        /// The next sequence number the copy expected.
        expected: u64,
        /// What arrived.
        got: u64,
    },
}

/// A router's (or any follower's) copy of the controller's state, kept exact by applying
/// snapshots and deltas in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replica {
    /// The controller epoch this copy follows.
    pub epoch: String,
    /// The last applied sequence number.
    pub seq: u64,
    /// The model.
    pub state: State,
    /// Revoked certificate serials with their details.
    pub revoked: imbl::OrdMap<String, RevokedCert>,
    /// Known routers by id.
    pub routers: imbl::OrdMap<IdentityId, RouterInfo>,
}

impl Replica {
    /// Applies the next delta. A delta that is not exactly `seq + 1` is refused, because
    /// skipping one could skip a revocation.
    pub fn apply(&mut self, delta: &Delta) -> Result<(), ApplyError> {
        let expected = self.seq + 1;
        if delta.seq != expected {
            return Err(ApplyError::Gap {
                expected,
                got: delta.seq,
            });
        }
        self.apply_change(&delta.change);
        self.seq = delta.seq;
        Ok(())
    }

    /// Applies a change without sequence bookkeeping (the controller uses this on its own copy).
    pub fn apply_change(&mut self, change: &ChangeEvent) {
        if let Some(change) = change.state_change() {
            self.state.apply(&change);
            return;
        }
        match change {
            ChangeEvent::IdentityPut { .. }
            | ChangeEvent::IdentityDeleted { .. }
            | ChangeEvent::ServicePut { .. }
            | ChangeEvent::ServiceDeleted { .. }
            | ChangeEvent::PolicyPut { .. }
            | ChangeEvent::PolicyDeleted { .. } => {}
            ChangeEvent::CertRevoked { cert } => {
                self.revoked.insert(cert.serial.clone(), cert.clone());
            }
            ChangeEvent::RouterPut { router } => {
                self.routers.insert(router.id.clone(), router.clone());
            }
            ChangeEvent::RouterDeleted { id } => {
                self.routers.remove(id);
            }
        }
    }

    /// Drops revoked entries for certificates that have expired anyway.
    pub fn prune_revoked(&mut self, now: Timestamp) {
        let expired: Vec<String> = (self.revoked.iter())
            .filter(|(_, r)| r.not_after <= now)
            .map(|(serial, _)| serial.clone())
            .collect();
        for serial in expired {
            self.revoked.remove(&serial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use umbra_policies::{IdentityKind, Name};

    fn ident(id: &str) -> Identity {
        Identity {
            id: IdentityId::new(id).unwrap(),
            name: Name::new(id).unwrap(),
            kind: IdentityKind::Agent,
            roles: Default::default(),
            disabled: false,
            revoked: false,
            expires_at: None,
        }
    }

    fn delta(seq: u64, change: ChangeEvent) -> Delta {
        Delta {
            last_in_commit: true,
            seq,
            at: Timestamp(0),
            change,
        }
    }

    #[test]
    fn applies_in_order_and_refuses_gaps() {
        let mut r = Replica {
            epoch: "e".into(),
            ..Default::default()
        };
        r.apply(&delta(
            1,
            ChangeEvent::IdentityPut {
                identity: ident("a"),
            },
        ))
        .unwrap();
        assert_eq!(r.state.identities.len(), 1);
        let err = r.apply(&delta(
            3,
            ChangeEvent::IdentityDeleted {
                id: IdentityId::new("a").unwrap(),
            },
        ));
        assert_eq!(
            err,
            Err(ApplyError::Gap {
                expected: 2,
                got: 3
            })
        );
        assert_eq!(
            r.state.identities.len(),
            1,
            "a refused delta changes nothing"
        );
        r.apply(&delta(
            2,
            ChangeEvent::IdentityDeleted {
                id: IdentityId::new("a").unwrap(),
            },
        ))
        .unwrap();
        assert!(r.state.identities.is_empty());
        assert_eq!(r.seq, 2);
    }

    #[test]
    fn prunes_expired_revocations() {
        let mut r = Replica {
            epoch: "e".into(),
            ..Default::default()
        };
        r.apply(&delta(
            1,
            ChangeEvent::CertRevoked {
                cert: RevokedCert {
                    serial: "ab".into(),
                    identity: IdentityId::new("a").unwrap(),
                    not_after: Timestamp(10),
                },
            },
        ))
        .unwrap();
        r.prune_revoked(Timestamp(9));
        assert_eq!(r.revoked.len(), 1);
        r.prune_revoked(Timestamp(10));
        assert!(r.revoked.is_empty());
    }

    #[test]
    fn unknown_fields_and_kinds_are_refused() {
        assert!(
            serde_json::from_str::<ControlMessage>(r#"{"kind":"heartbeat","seq":1,"x":2}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<ControlMessage>(r#"{"kind":"nope"}"#).is_err());
    }
}
