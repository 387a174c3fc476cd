//! `affected` against the brute-force truth: after random batches on random small states, every
//! identity whose view changed (computed whole, before and after) is among those woken.

use std::collections::BTreeMap;

use proptest::prelude::*;
use umbra_policies::{
    GrantLimits, HostPort, Identity, IdentityKind, Rpm, Selector, Semantic, Service, ServicePolicy,
    State,
};
use umbra_proto::{Replica, RevokedCert, RouterInfo};

use super::*;
use crate::core::views::{edge_view, listed_routers};

const NOW: Timestamp = Timestamp(1_000);
const IDS: usize = 6;
const ROLES: [&str; 3] = ["r0", "r1", "r2"];

fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn id(i: usize) -> IdentityId {
    IdentityId::new(format!("id{i}")).unwrap()
}

fn roles() -> impl Strategy<Value = umbra_policies::Roles> {
    prop::collection::btree_set((0..ROLES.len()).prop_map(|r| n(ROLES[r])), 0..3)
        .prop_map(|s| s.into_iter().collect())
}

fn identity() -> impl Strategy<Value = Identity> {
    (0..IDS, 0..3usize, roles(), 0..6u8, any::<bool>()).prop_map(
        |(i, name, roles, flags, router)| Identity {
            id: id(i),
            // Usually the name that goes with the id; sometimes a rename.
            name: n(&format!("i{i}{}", ["", "", "x"][name])),
            kind: if router && i == 0 {
                IdentityKind::Router
            } else {
                IdentityKind::Agent
            },
            roles,
            disabled: flags == 1,
            revoked: flags == 2,
            expires_at: (flags == 3).then_some(Timestamp(500)),
        },
    )
}

fn service() -> impl Strategy<Value = Service> {
    (0..4usize, roles(), any::<bool>(), 0..2u16).prop_map(|(s, roles, sdk, port)| Service {
        name: n(&format!("s{s}")),
        roles,
        hosting: if sdk {
            Hosting::Sdk
        } else {
            Hosting::Address(HostPort::new("10.0.0.1", 80).unwrap())
        },
        intercepts: vec![HostPort::new("svc.umbra", 440 + port).unwrap()],
        proxy_protocol: false,
    })
}

fn selector(prefix: &'static str, count: usize) -> impl Strategy<Value = Selector> {
    prop_oneof![
        Just(Selector::All),
        (0..ROLES.len()).prop_map(|r| Selector::Role(n(ROLES[r]))),
        (0..count).prop_map(move |i| Selector::Named(n(&format!("{prefix}{i}")))),
    ]
}

fn policy() -> impl Strategy<Value = ServicePolicy> {
    (
        0..4usize,
        any::<bool>(),
        prop::collection::vec(selector("i", IDS), 1..3),
        prop::collection::vec(selector("s", 4), 1..3),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(p, dial, identities, services, all_of, limited)| ServicePolicy {
                name: n(&format!("p{p}")),
                action: if dial { Action::Dial } else { Action::Bind },
                identities,
                services,
                semantic: if all_of {
                    Semantic::AllOf
                } else {
                    Semantic::AnyOf
                },
                limits: GrantLimits {
                    rpm: limited.then(|| Rpm::try_from(5).unwrap()),
                    ..GrantLimits::default()
                },
            },
        )
}

fn router(addressed: bool) -> RouterInfo {
    RouterInfo {
        id: id(0),
        name: n("i0"),
        advertise: addressed.then(|| "127.0.0.1:4433".to_owned()),
    }
}

fn change() -> impl Strategy<Value = ChangeEvent> {
    prop_oneof![
        3 => identity().prop_map(|identity| ChangeEvent::IdentityPut { identity }),
        1 => (0..IDS).prop_map(|i| ChangeEvent::IdentityDeleted { id: id(i) }),
        2 => service().prop_map(|service| ChangeEvent::ServicePut { service }),
        1 => (0..4usize).prop_map(|s| ChangeEvent::ServiceDeleted { name: n(&format!("s{s}")) }),
        3 => policy().prop_map(|policy| ChangeEvent::PolicyPut { policy }),
        1 => (0..4usize).prop_map(|p| ChangeEvent::PolicyDeleted { name: n(&format!("p{p}")) }),
        1 => (0..IDS).prop_map(|i| ChangeEvent::CertRevoked {
            cert: RevokedCert { serial: format!("{i:02x}"), identity: id(i), not_after: NOW }
        }),
        1 => any::<bool>().prop_map(|a| ChangeEvent::RouterPut { router: router(a) }),
        1 => Just(ChangeEvent::RouterDeleted { id: id(0) }),
    ]
}

fn replica() -> impl Strategy<Value = Replica> {
    (
        prop::collection::vec(identity(), 0..IDS),
        prop::collection::vec(service(), 0..4),
        prop::collection::vec(policy(), 0..4),
        any::<bool>(),
    )
        .prop_map(|(identities, services, policies, routed)| Replica {
            epoch: "e".into(),
            seq: 0,
            state: State {
                identities: identities.into_iter().map(|i| (i.id.clone(), i)).collect(),
                services: services.into_iter().map(|s| (s.name.clone(), s)).collect(),
                policies: policies.into_iter().map(|p| (p.name.clone(), p)).collect(),
            },
            revoked: Default::default(),
            routers: (if routed { vec![router(true)] } else { vec![] })
                .into_iter()
                .map(|r| (r.id.clone(), r))
                .collect(),
        })
}

/// Every identity's view, by id (identities absent from the state see an empty one).
fn views(r: &Replica, index: &Index) -> BTreeMap<IdentityId, umbra_proto::api::EdgeView> {
    let routers = listed_routers(&r.state, r.routers.values(), NOW);
    (0..IDS)
        .map(id)
        .map(|i| {
            let v = edge_view(index, &i, routers.clone(), NOW);
            (i, v)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn every_changed_view_is_woken(before in replica(), changes in prop::collection::vec(change(), 1..4)) {
        let mut after = before.clone();
        for c in &changes {
            after.apply_change(c);
        }
        let (bi, ai) = (Index::build(&before.state), Index::build(&after.state));
        let woken = affected(&bi, &ai, |id| after.routers.contains_key(id), &changes, NOW);
        let (old, new) = (views(&before, &bi), views(&after, &ai));
        for (who, view) in &new {
            if old.get(who) != Some(view) {
                prop_assert!(woken.contains(who), "{who}'s view changed but it was not woken: {changes:?}");
            }
        }
        for c in &changes {
            if let ChangeEvent::CertRevoked { cert } = c {
                prop_assert!(woken.contains(&cert.identity), "the owner of a revoked certificate is woken");
            }
        }
    }
}

fn agent(i: usize, roles: &[&str]) -> Identity {
    Identity {
        id: id(i),
        name: n(&format!("i{i}")),
        kind: IdentityKind::Agent,
        roles: roles.iter().map(|r| n(r)).collect(),
        disabled: false,
        revoked: false,
        expires_at: None,
    }
}

fn sdk(name: &str, roles: &[&str]) -> Service {
    Service {
        name: n(name),
        roles: roles.iter().map(|r| n(r)).collect(),
        hosting: Hosting::Sdk,
        intercepts: vec![],
        proxy_protocol: false,
    }
}

fn grant(name: &str, action: Action, who: &str, what: &str) -> ServicePolicy {
    ServicePolicy {
        name: n(name),
        action,
        identities: vec![who.parse().unwrap()],
        services: vec![what.parse().unwrap()],
        semantic: Semantic::AnyOf,
        limits: GrantLimits::default(),
    }
}

/// A gateway `i0` hosting `llm`, dialled by the `users` (`i1`, `i2`); `i3` and `i4` use `db`.
fn deployment() -> State {
    State {
        identities: [
            agent(0, &["gw"]),
            agent(1, &["users"]),
            agent(2, &["users"]),
            agent(3, &["dbusers"]),
            agent(4, &["dbusers"]),
        ]
        .into_iter()
        .map(|i| (i.id.clone(), i))
        .collect(),
        services: [sdk("llm", &[]), sdk("db", &[])]
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect(),
        policies: [
            grant("host", Action::Bind, "#gw", "@llm"),
            grant("use", Action::Dial, "#users", "@llm"),
            grant("db", Action::Dial, "#dbusers", "@db"),
        ]
        .into_iter()
        .map(|p| (p.name.clone(), p))
        .collect(),
    }
}

fn woken(before: &State, changes: &[ChangeEvent]) -> Vec<IdentityId> {
    let mut after = Replica {
        epoch: "e".into(),
        seq: 0,
        state: before.clone(),
        revoked: Default::default(),
        routers: Default::default(),
    };
    for c in changes {
        after.apply_change(c);
    }
    let a = affected(
        &Index::build(before),
        &Index::build(&after.state),
        |id| after.routers.contains_key(id),
        changes,
        NOW,
    );
    assert!(!a.everyone);
    let mut ids: Vec<_> = a.identities.into_iter().collect();
    ids.sort();
    ids
}

#[test]
fn a_change_wakes_only_the_views_it_touches() {
    let s = deployment();
    // A dialer's roles change: it and the gateway whose grants list it, nobody else.
    let mut i1 = agent(1, &["users", "extra"]);
    assert_eq!(
        woken(
            &s,
            &[ChangeEvent::IdentityPut {
                identity: i1.clone()
            }]
        ),
        vec![id(0), id(1)]
    );
    // A database user: only itself (nobody hosts `db` through a gateway).
    assert_eq!(
        woken(
            &s,
            &[ChangeEvent::IdentityPut {
                identity: agent(3, &["dbusers", "x"])
            }]
        ),
        vec![id(3)]
    );
    // The users' policy: the users, and the gateway.
    i1.roles = umbra_policies::Roles::new();
    assert_eq!(
        woken(&s, &[ChangeEvent::PolicyDeleted { name: n("use") }]),
        vec![id(0), id(1), id(2)]
    );
    // The `db` service: its users only.
    assert_eq!(
        woken(
            &s,
            &[ChangeEvent::ServicePut {
                service: sdk("db", &["new"])
            }]
        ),
        vec![id(3), id(4)]
    );
    // A revoked certificate: its owner.
    let cert = RevokedCert {
        serial: "01".into(),
        identity: id(4),
        not_after: NOW,
    };
    assert_eq!(woken(&s, &[ChangeEvent::CertRevoked { cert }]), vec![id(4)]);
}

#[test]
fn routers_wake_everyone() {
    let s = deployment();
    let change = ChangeEvent::RouterPut {
        router: router(true),
    };
    let index = Index::build(&s);
    assert!(affected(&index, &index, |_| false, &[change], NOW).everyone);
}

/// A batch too large to be worth narrowing wakes everyone, whatever it holds.
#[test]
fn a_large_batch_wakes_everyone() {
    let index = Index::build(&deployment());
    let batch: Vec<ChangeEvent> = (0..=WAKE_EVERYONE_ABOVE)
        .map(|i| ChangeEvent::IdentityPut {
            identity: agent(1000 + i, &[]),
        })
        .collect();
    let out = affected(&index, &index, |_| false, &batch, NOW);
    assert!(out.everyone);
    let out = affected(&index, &index, |_| false, &batch[1..], NOW);
    assert!(!out.everyone, "at the bound it is still narrowed");
}
