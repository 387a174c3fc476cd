//! A policy kept up to date change by change answers exactly as one compiled from the replica
//! the same changes lead to.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use umbra_policies::{Action, Name, Selector, Semantic, Service, ServicePolicy};
use umbra_proto::{ChangeEvent, Replica, RevokedCert};

use super::*;

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

fn name(i: usize) -> Name {
    Name::new(NAMES[i % NAMES.len()]).unwrap()
}

fn id(i: usize) -> IdentityId {
    IdentityId::new(format!("id-{i}")).unwrap()
}

/// Random changes over a few ids, names, roles and serials, so that renames, namesakes,
/// deletions of absent entries and repeated revocations all happen.
fn change() -> impl Strategy<Value = ChangeEvent> {
    prop_oneof![
        (
            0..5usize,
            0..4usize,
            any::<bool>(),
            any::<bool>(),
            0..2usize
        )
            .prop_map(|(i, n, disabled, revoked, role)| ChangeEvent::IdentityPut {
                identity: Identity {
                    id: id(i),
                    name: name(n),
                    kind: IdentityKind::Agent,
                    roles: [Name::new(format!("r{role}")).unwrap()]
                        .into_iter()
                        .collect(),
                    disabled,
                    revoked,
                    expires_at: None,
                },
            }),
        (0..5usize).prop_map(|i| ChangeEvent::IdentityDeleted { id: id(i) }),
        (0..6u8, 0..5usize, 1..100u64).prop_map(|(serial, i, not_after)| {
            ChangeEvent::CertRevoked {
                cert: RevokedCert {
                    serial: Serial::from_bytes(&[serial]).as_str().to_owned(),
                    identity: id(i),
                    not_after: Timestamp(not_after),
                },
            }
        }),
        (0..2usize).prop_map(|r| ChangeEvent::PolicyPut {
            policy: ServicePolicy {
                name: Name::new("p").unwrap(),
                action: Action::Dial,
                semantic: Semantic::AnyOf,
                identities: vec![Selector::Role(Name::new(format!("r{r}")).unwrap())],
                services: vec![Selector::Named(Name::new("s").unwrap())],
                limits: Default::default(),
            },
        }),
        Just(ChangeEvent::ServicePut {
            service: Service {
                name: Name::new("s").unwrap(),
                roles: Default::default(),
                hosting: umbra_policies::Hosting::Sdk,
                intercepts: vec![],
                proxy_protocol: false,
            },
        }),
    ]
}

fn peer(n: usize, serial: u8) -> PeerCert {
    let td = umbra_pki::TrustDomain::new("test.umbra").unwrap();
    PeerCert {
        spiffe: umbra_pki::SpiffeId::new(&td, IdentityKind::Agent, &name(n)),
        serial: Serial::from_bytes(&[serial]),
        not_before: Timestamp(0),
        not_after: Timestamp(1000),
    }
}

proptest! {
    #[test]
    fn a_policy_kept_up_to_date_answers_as_a_fresh_one(
        batches in proptest::collection::vec(proptest::collection::vec(change(), 0..6), 1..8),
        prune in proptest::collection::vec(0..120u64, 8),
    ) {
        let mut replica = Replica::default();
        let mut kept = Policy::build(&replica);
        for (batch, now) in batches.iter().zip(prune) {
            // Only changes the controller could commit: names stay unique.
            let mut valid = Vec::new();
            for c in batch {
                if let ChangeEvent::IdentityPut { identity } = c {
                    let taken = (replica.state.identities.values())
                        .any(|i| i.name == identity.name && i.id != identity.id);
                    if taken {
                        continue;
                    }
                }
                replica.apply_change(c);
                valid.push(c.clone());
            }
            replica.seq += valid.len() as u64;
            kept = kept.apply(replica.seq, &valid);
            let now = Timestamp(now);
            if kept.prune_revoked(now) {
                replica.prune_revoked(now);
            }
            let mut fresh = Policy::build(&replica);
            fresh.prune_revoked(now);
            prop_assert_eq!(kept.seq, fresh.seq);
            for (n, label) in NAMES.iter().enumerate() {
                prop_assert_eq!(
                    kept.identity_named(label).map(|i| &i.id),
                    fresh.identity_named(label).map(|i| &i.id)
                );
                for serial in 0..7u8 {
                    let p = peer(n, serial);
                    prop_assert_eq!(kept.admit(&p, now).map(|i| i.id.clone()),
                        fresh.admit(&p, now).map(|i| i.id.clone()));
                    prop_assert_eq!(kept.is_revoked(&p.serial), fresh.is_revoked(&p.serial));
                }
            }
            for i in 0..5 {
                prop_assert_eq!(
                    kept.index.can_dial(&id(i), "s", now).map(|p| p.policy),
                    fresh.index.can_dial(&id(i), "s", now).map(|p| p.policy)
                );
            }
        }
    }
}
