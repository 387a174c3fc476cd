//! Property tests of the judge: `admit` and `check_stream` against the model, on random states,
//! certificates and revocation lists, by a router's rules (revocations only) and a controller's
//! (every issued certificate recorded).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use umbra_policies::Roles;
use umbra_policies::{
    admit, check_stream, Action, CertRecord, Deny, Hosting, Identity, IdentityId, IdentityKind,
    Index, Name, Presented, Roster, Selector, Semantic, Service, ServicePolicy, State,
    StreamRequest, Target, Timestamp,
};

fn name(s: String) -> Name {
    Name::new(s).unwrap()
}

fn kind() -> impl Strategy<Value = IdentityKind> {
    prop_oneof![
        Just(IdentityKind::Agent),
        Just(IdentityKind::Admin),
        Just(IdentityKind::Router)
    ]
}

fn selector(prefix: &'static str, pool: usize) -> impl Strategy<Value = Selector> {
    prop_oneof![
        1 => Just(Selector::All),
        2 => (0..3usize).prop_map(|r| Selector::Role(name(format!("r{r}")))),
        3 => (0..pool).prop_map(move |k| Selector::Named(name(format!("{prefix}{k}")))),
    ]
}

/// Identities with unique names (as the controller keeps them), ids `id0..`.
fn identities() -> impl Strategy<Value = BTreeMap<IdentityId, Identity>> {
    let one = (
        0usize..8,
        kind(),
        proptest::collection::btree_set((0..3usize).prop_map(|r| name(format!("r{r}"))), 0..3)
            .prop_map(|s| s.into_iter().collect::<Roles>()),
        0u8..6,
        proptest::option::of(0u64..30),
    );
    proptest::collection::vec(one, 0..8).prop_map(|v| {
        let mut seen = BTreeSet::new();
        (v.into_iter().enumerate())
            .filter(|(_, (k, ..))| seen.insert(*k))
            .map(|(i, (k, kind, roles, flags, expires))| {
                let id = IdentityId::new(format!("id{i}")).unwrap();
                let identity = Identity {
                    id: id.clone(),
                    name: name(format!("i{k}")),
                    kind,
                    roles,
                    disabled: flags == 1,
                    revoked: flags == 2,
                    expires_at: expires.map(Timestamp),
                };
                (id, identity)
            })
            .collect()
    })
}

fn state() -> impl Strategy<Value = State> {
    let service = (0usize..6, any::<bool>(), any::<bool>()).prop_map(|(k, sdk, proxy)| Service {
        name: name(format!("s{k}")),
        roles: [name(format!("r{}", k % 3))].into(),
        hosting: if sdk {
            Hosting::Sdk
        } else {
            Hosting::Address(format!("svc{k}.internal:443").parse().unwrap())
        },
        intercepts: vec![],
        proxy_protocol: proxy,
    });
    let policy = (
        0usize..8,
        prop_oneof![Just(Action::Dial), Just(Action::Bind)],
        prop_oneof![Just(Semantic::AnyOf), Just(Semantic::AllOf)],
        proptest::collection::vec(selector("i", 9), 0..3),
        proptest::collection::vec(selector("s", 7), 0..3),
    )
        .prop_map(
            |(k, action, semantic, identities, services)| ServicePolicy {
                name: name(format!("p{k}")),
                action,
                identities,
                services,
                semantic,
                limits: Default::default(),
            },
        );
    (
        identities(),
        proptest::collection::vec(service, 0..6),
        proptest::collection::vec(policy, 0..8),
    )
        .prop_map(|(identities, services, policies)| State {
            identities: identities.into_iter().collect(),
            services: services.into_iter().map(|s| (s.name.clone(), s)).collect(),
            policies: policies.into_iter().map(|p| (p.name.clone(), p)).collect(),
        })
}

/// A roster: the state, revoked serials with their owners, and (for a controller) every
/// issued serial with its owner.
#[derive(Debug)]
struct Book {
    state: State,
    revoked: BTreeMap<String, IdentityId>,
    issued: Option<BTreeMap<String, IdentityId>>,
}

impl Roster for Book {
    fn identity_named(&self, name: &str) -> Option<&Identity> {
        self.state.identity_by_name(name)
    }

    fn certificate(&self, serial: &str) -> CertRecord<'_> {
        if let Some(owner) = self.revoked.get(serial) {
            return CertRecord::Revoked { owner };
        }
        match &self.issued {
            None => CertRecord::NotRevoked,
            Some(issued) => match issued.get(serial) {
                Some(owner) => CertRecord::Issued { owner },
                None => CertRecord::NeverIssued,
            },
        }
    }
}

/// Serials `c0..c9`, each owned by one of `id0..id9` (some of which do not exist: deleted
/// identities), some revoked.
fn book() -> impl Strategy<Value = Book> {
    let owners = proptest::collection::vec((0usize..10, any::<bool>()), 10);
    (state(), owners, any::<bool>()).prop_map(|(state, owners, controller)| {
        let owner = |o: usize| IdentityId::new(format!("id{o}")).unwrap();
        let revoked = (owners.iter().enumerate())
            .filter(|(_, (_, r))| *r)
            .map(|(s, (o, _))| (format!("c{s}"), owner(*o)))
            .collect();
        // A controller records c0..c7; c8 and c9 are certificates it never issued.
        let issued = controller.then(|| {
            (owners.iter().enumerate().take(8))
                .map(|(s, (o, _))| (format!("c{s}"), owner(*o)))
                .collect()
        });
        Book {
            state,
            revoked,
            issued,
        }
    })
}

/// The definition, from the model alone: a certificate speaks for the identity of its name
/// and kind if it is not revoked, was issued to that identity (as far as the party knows),
/// the door admits the kind and the identity is active.
fn model_admits(
    b: &Book,
    c: &Presented<'_>,
    door: Option<IdentityKind>,
    now: Timestamp,
) -> Option<IdentityId> {
    if b.revoked.contains_key(c.serial) {
        return None;
    }
    let i = (b.state.identities.values()).find(|i| i.name.as_str() == c.name)?;
    let issued_to_it = match &b.issued {
        Some(issued) => issued.get(c.serial) == Some(&i.id),
        None => true,
    };
    let ok = i.kind == c.kind
        && issued_to_it
        && c.identity.is_none_or(|id| *id == i.id)
        && door.is_none_or(|k| k == i.kind)
        && i.is_active(now);
    ok.then(|| i.id.clone())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn admit_agrees_with_the_model(
        b in book(),
        who in 0usize..9,
        kind in kind(),
        serial in 0usize..10,
        carries_id in proptest::option::of(0usize..10),
        door in proptest::option::of(kind()),
        now in 0u64..32,
    ) {
        let (who, serial) = (format!("i{who}"), format!("c{serial}"));
        let carried = carries_id.map(|i| IdentityId::new(format!("id{i}")).unwrap());
        let c = Presented {
            name: &who,
            kind,
            serial: &serial,
            identity: carried.as_ref(),
            not_after: Timestamp(1_000),
        };
        let now = Timestamp(now);
        let got = admit(&b, &c, door, now);
        prop_assert_eq!(got.as_ref().ok().map(|i| i.id.clone()), model_admits(&b, &c, door, now));
        match got {
            Ok(i) => prop_assert_eq!(i.name.as_str(), who.as_str()),
            // A revoked serial is always reported as such.
            Err(why) => prop_assert_eq!(why == Deny::CertRevoked, b.revoked.contains_key(&serial)),
        }
    }

    #[test]
    fn check_stream_permits_exactly_what_the_index_grants_with_a_hosting(
        s in state(),
        who in 0usize..10,
        svc in 0usize..7,
        now in 0u64..32,
    ) {
        let index = Index::build(&s);
        let id = IdentityId::new(format!("id{who}")).unwrap();
        let svc = format!("s{svc}");
        let now = Timestamp(now);

        let dial = check_stream(&index, &id, StreamRequest::Dial(&svc), now);
        let granted = index.can_dial(&id, &svc, now);
        match (&dial, &granted) {
            (Ok(permit), Ok(grant)) => {
                prop_assert_eq!(&permit.policy, &grant.policy);
                let service = s.services.get(svc.as_str()).unwrap();
                let want = match &service.hosting {
                    Hosting::Address(a) => Target::Address {
                        address: a.clone(),
                        proxy_protocol: service.proxy_protocol,
                    },
                    Hosting::Sdk => Target::SdkHost,
                };
                prop_assert_eq!(&permit.target, &want);
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            _ => prop_assert!(false, "{:?} but the index says {:?}", dial, granted),
        }
        // A missing service is refused exactly as an ungranted one.
        let active = s.identities.get(&id).is_some_and(|i| i.is_active(now));
        if active && !s.services.contains_key(svc.as_str()) {
            prop_assert_eq!(dial.clone().map(drop), Err(Deny::NotGranted));
        }

        let bind = check_stream(&index, &id, StreamRequest::Bind(&svc), now);
        let may_bind = index.can_bind(&id, &svc, now);
        prop_assert_eq!(
            bind.map(|p| (p.policy, p.target)),
            may_bind.map(|p| (p.policy, Target::Host))
        );
    }
}
