//! A snapshot of the whole state, sent as many bounded frames instead of one.
//!
//! At a million identities one JSON frame holding the whole state is hundreds of megabytes: the
//! controller would serialize it at once, and a router would buffer the whole frame and then
//! hold it beside the decoded copy. Here a snapshot is `SnapshotBegin`, then chunks of at most
//! [`CHUNK_ENTRIES`] entries each, then `SnapshotEnd` with how many entries of each kind were
//! sent. The sender produces chunks lazily from a copy of its replica; the receiver adds each
//! chunk to the copy it is assembling, and replaces what it enforces only when the counts at
//! the end match what it received, so that an interrupted or inconsistent snapshot changes
//! nothing.

use serde::{Deserialize, Serialize};
use umbra_policies::{Identity, Service, ServicePolicy};

use crate::control::{ControlMessage, Replica, RevokedCert, RouterInfo};

/// The most entries (of all kinds together) one chunk carries: about a quarter of a megabyte
/// of JSON, so neither end ever holds a large frame.
pub const CHUNK_ENTRIES: usize = 1024;

/// Part of a snapshot: entries of any kind, added to what came before.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotChunk {
    /// Identities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<Identity>,
    /// Services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    /// Service policies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<ServicePolicy>,
    /// Certificates revoked before they expire.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<RevokedCert>,
    /// Known routers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routers: Vec<RouterInfo>,
}

impl SnapshotChunk {
    fn len(&self) -> usize {
        self.identities.len()
            + self.services.len()
            + self.policies.len()
            + self.revoked.len()
            + self.routers.len()
    }
}

/// How many entries of each kind a whole snapshot holds: the receiver's check that nothing was
/// lost on the way (the controller is authenticated; this guards completeness, not integrity).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCounts {
    /// Identities.
    pub identities: u64,
    /// Services.
    pub services: u64,
    /// Service policies.
    pub policies: u64,
    /// Revoked certificates.
    pub revoked: u64,
    /// Routers.
    pub routers: u64,
}

impl SnapshotCounts {
    fn of(r: &Replica) -> SnapshotCounts {
        let n = |len: usize| len as u64;
        SnapshotCounts {
            identities: n(r.state.identities.len()),
            services: n(r.state.services.len()),
            policies: n(r.state.policies.len()),
            revoked: n(r.revoked.len()),
            routers: n(r.routers.len()),
        }
    }
}

/// Why a snapshot could not be assembled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// A chunk or end arrived with no snapshot begun.
    #[error("snapshot part without a beginning")]
    NotBegun,
    /// Something other than a chunk or the end arrived in the middle of a snapshot.
    #[error("snapshot interrupted by another message")]
    Interrupted,
    /// The end says the snapshot held more or other entries than the ones that arrived.
    #[error("snapshot incomplete: announced {announced:?}, received {received:?}")]
    Counts {
        /// What the end announced.
        announced: SnapshotCounts,
        /// What the assembled copy holds.
        received: SnapshotCounts,
    },
    /// A chunk larger than the protocol allows.
    #[error("snapshot chunk of {0} entries (at most {CHUNK_ENTRIES})")]
    ChunkTooLarge(usize),
}

type Entries<T> = Box<dyn Iterator<Item = T> + Send>;

/// The messages of one snapshot, made lazily from an owned replica (a cheap copy of the
/// sender's, whose structure it shares): begin, chunks, end.
pub struct SnapshotMessages {
    begin: Option<ControlMessage>,
    end: Option<ControlMessage>,
    identities: Entries<Identity>,
    services: Entries<Service>,
    policies: Entries<ServicePolicy>,
    revoked: Entries<RevokedCert>,
    routers: Entries<RouterInfo>,
}

impl std::fmt::Debug for SnapshotMessages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotMessages").finish_non_exhaustive()
    }
}

impl SnapshotMessages {
    /// The snapshot of `replica`.
    pub fn new(replica: Replica) -> SnapshotMessages {
        let counts = SnapshotCounts::of(&replica);
        let Replica {
            epoch,
            seq,
            state,
            revoked,
            routers,
        } = replica;
        SnapshotMessages {
            begin: Some(ControlMessage::SnapshotBegin { epoch, seq }),
            end: Some(ControlMessage::SnapshotEnd(counts)),
            identities: Box::new(state.identities.into_iter().map(|(_, v)| v)),
            services: Box::new(state.services.into_iter().map(|(_, v)| v)),
            policies: Box::new(state.policies.into_iter().map(|(_, v)| v)),
            revoked: Box::new(revoked.into_iter().map(|(_, v)| v)),
            routers: Box::new(routers.into_iter().map(|(_, v)| v)),
        }
    }

    fn chunk(&mut self) -> SnapshotChunk {
        let mut c = SnapshotChunk::default();
        let mut room = CHUNK_ENTRIES;
        fill(&mut c.identities, &mut self.identities, &mut room);
        fill(&mut c.services, &mut self.services, &mut room);
        fill(&mut c.policies, &mut self.policies, &mut room);
        fill(&mut c.revoked, &mut self.revoked, &mut room);
        fill(&mut c.routers, &mut self.routers, &mut room);
        c
    }
}

fn fill<T>(into: &mut Vec<T>, from: &mut Entries<T>, room: &mut usize) {
    while *room > 0 {
        let Some(x) = from.next() else { return };
        into.push(x);
        *room -= 1;
    }
}

impl Iterator for SnapshotMessages {
    type Item = ControlMessage;

    fn next(&mut self) -> Option<ControlMessage> {
        if let Some(begin) = self.begin.take() {
            return Some(begin);
        }
        self.end.as_ref()?;
        let chunk = self.chunk();
        if chunk.len() > 0 {
            return Some(ControlMessage::SnapshotChunk(Box::new(chunk)));
        }
        self.end.take()
    }
}

/// A snapshot being received: the copy grows chunk by chunk and is handed out only when the
/// end's counts match it.
#[derive(Debug)]
pub struct SnapshotAssembly {
    replica: Replica,
}

impl SnapshotAssembly {
    /// A snapshot of the history `epoch` as of `seq` begins.
    pub fn begin(epoch: String, seq: u64) -> SnapshotAssembly {
        SnapshotAssembly {
            replica: Replica {
                epoch,
                seq,
                ..Default::default()
            },
        }
    }

    /// Adds a chunk.
    pub fn push(&mut self, chunk: SnapshotChunk) -> Result<(), SnapshotError> {
        if chunk.len() > CHUNK_ENTRIES {
            return Err(SnapshotError::ChunkTooLarge(chunk.len()));
        }
        let r = &mut self.replica;
        for i in chunk.identities {
            r.state.identities.insert(i.id.clone(), i);
        }
        for s in chunk.services {
            r.state.services.insert(s.name.clone(), s);
        }
        for p in chunk.policies {
            r.state.policies.insert(p.name.clone(), p);
        }
        for c in chunk.revoked {
            r.revoked.insert(c.serial.clone(), c);
        }
        for x in chunk.routers {
            r.routers.insert(x.id.clone(), x);
        }
        Ok(())
    }

    /// The whole copy, if it holds exactly what the end announced.
    pub fn finish(self, announced: SnapshotCounts) -> Result<Replica, SnapshotError> {
        let received = SnapshotCounts::of(&self.replica);
        if received != announced {
            return Err(SnapshotError::Counts {
                announced,
                received,
            });
        }
        Ok(self.replica)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ChangeEvent;
    use proptest::prelude::*;
    use umbra_policies::{IdentityId, IdentityKind, Name, Timestamp};

    fn identity(i: usize) -> Identity {
        Identity {
            id: IdentityId::new(format!("id{i:05}")).unwrap(),
            name: Name::new(format!("n{i}")).unwrap(),
            kind: IdentityKind::Agent,
            roles: Default::default(),
            disabled: false,
            revoked: i % 3 == 0,
            expires_at: None,
        }
    }

    fn replica(identities: usize, revoked: usize) -> Replica {
        let mut r = Replica {
            epoch: "e".into(),
            seq: 7,
            ..Default::default()
        };
        for i in 0..identities {
            r.apply_change(&ChangeEvent::IdentityPut {
                identity: identity(i),
            });
        }
        for i in 0..revoked {
            r.apply_change(&ChangeEvent::CertRevoked {
                cert: RevokedCert {
                    serial: format!("{i:x}"),
                    identity: IdentityId::new(format!("id{i:05}")).unwrap(),
                    not_after: Timestamp(i as u64),
                },
            });
        }
        r
    }

    fn assemble(msgs: impl IntoIterator<Item = ControlMessage>) -> Result<Replica, SnapshotError> {
        let mut a: Option<SnapshotAssembly> = None;
        for m in msgs {
            match m {
                ControlMessage::SnapshotBegin { epoch, seq } => {
                    a = Some(SnapshotAssembly::begin(epoch, seq))
                }
                ControlMessage::SnapshotChunk(c) => {
                    a.as_mut().ok_or(SnapshotError::NotBegun)?.push(*c)?
                }
                ControlMessage::SnapshotEnd(n) => {
                    return a.take().ok_or(SnapshotError::NotBegun)?.finish(n)
                }
                _ => return Err(SnapshotError::Interrupted),
            }
        }
        Err(SnapshotError::Interrupted)
    }

    proptest! {
        #[test]
        fn a_snapshot_round_trips_through_bounded_chunks(n in 0usize..3000, revoked in 0usize..1500) {
            let r = replica(n, revoked);
            let msgs: Vec<ControlMessage> = SnapshotMessages::new(r.clone()).collect();
            for m in &msgs {
                if let ControlMessage::SnapshotChunk(c) = m {
                    prop_assert!(c.len() <= CHUNK_ENTRIES && c.len() > 0);
                }
                // Every message survives its JSON form.
                let back: ControlMessage = serde_json::from_str(&serde_json::to_string(m).unwrap()).unwrap();
                prop_assert_eq!(&back, m);
            }
            prop_assert_eq!(assemble(msgs).unwrap(), r);
        }
    }

    #[test]
    fn a_lost_chunk_or_entry_is_refused() {
        let r = replica(2500, 10);
        let msgs: Vec<ControlMessage> = SnapshotMessages::new(r).collect();
        assert_eq!(msgs.len(), 5, "begin, three chunks, end");
        let mut lost = msgs.clone();
        lost.remove(2);
        assert!(matches!(assemble(lost), Err(SnapshotError::Counts { .. })));
        // A chunk short of one entry.
        let mut short = msgs.clone();
        if let ControlMessage::SnapshotChunk(c) = &mut short[2] {
            c.identities.pop();
        }
        assert!(matches!(assemble(short), Err(SnapshotError::Counts { .. })));
        let big = SnapshotChunk {
            identities: (0..=CHUNK_ENTRIES).map(identity).collect(),
            ..Default::default()
        };
        let mut a = SnapshotAssembly::begin("e".into(), 1);
        assert_eq!(
            a.push(big),
            Err(SnapshotError::ChunkTooLarge(CHUNK_ENTRIES + 1))
        );
    }

    #[test]
    fn an_empty_state_is_begin_and_end() {
        let msgs: Vec<ControlMessage> = SnapshotMessages::new(Replica::default()).collect();
        assert_eq!(msgs.len(), 2);
        assert_eq!(assemble(msgs).unwrap(), Replica::default());
    }
}
