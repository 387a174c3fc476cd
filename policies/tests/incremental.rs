//! Property tests of the incrementally maintained index: after any sequence of changes it
//! answers every question exactly like `Index::build` of the resulting state, and checking a
//! batch of changes finds exactly the problems the batch adds.

use proptest::prelude::*;
use umbra_policies::Roles;
use umbra_policies::{
    Action, DocError, HostPort, Hosting, Identity, IdentityId, IdentityKind, Index, Name, Selector,
    Semantic, Service, ServicePolicy, State, StateChange, Timestamp,
};

fn name(s: String) -> Name {
    Name::new(s).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Random changes over small pools, so that puts replace, deletes hit, and selectors, names and
// roles overlap often.

const ROLES: usize = 5;
const IDS: usize = 12;

fn roles() -> impl Strategy<Value = Roles> {
    proptest::collection::btree_set((0..ROLES).prop_map(|r| name(format!("r{r}"))), 0..4)
        .prop_map(|s| s.into_iter().collect())
}

fn selector(names: &'static str, pool: usize) -> impl Strategy<Value = Selector> {
    prop_oneof![
        1 => Just(Selector::All),
        4 => (0..ROLES).prop_map(|r| Selector::Role(name(format!("r{r}")))),
        3 => (0..pool).prop_map(move |k| Selector::Named(name(format!("{names}{k}")))),
    ]
}

fn identity() -> impl Strategy<Value = Identity> {
    let kind = prop_oneof![
        Just(IdentityKind::Agent),
        Just(IdentityKind::Admin),
        Just(IdentityKind::Router)
    ];
    (
        0..IDS,
        0usize..10,
        kind,
        roles(),
        0u8..8,
        proptest::option::of(0u64..30),
    )
        .prop_map(|(i, k, kind, roles, flags, expires)| Identity {
            id: IdentityId::new(format!("id{i}")).unwrap(),
            // Names may repeat across ids: the index must not care.
            name: name(format!("i{k}")),
            kind,
            roles,
            disabled: flags == 1,
            revoked: flags == 2,
            expires_at: expires.map(Timestamp),
        })
}

fn intercept() -> impl Strategy<Value = HostPort> {
    (0u16..4).prop_map(|p| HostPort::new("svc.umbra", 440 + p).unwrap())
}

fn service() -> impl Strategy<Value = Service> {
    let intercepts = proptest::collection::vec(intercept(), 0..3);
    (0usize..8, roles(), any::<bool>(), intercepts).prop_map(|(k, roles, sdk, intercepts)| {
        Service {
            name: name(format!("s{k}")),
            roles,
            hosting: if sdk {
                Hosting::Sdk
            } else {
                Hosting::Address("svc.internal:443".parse().unwrap())
            },
            intercepts,
            proxy_protocol: false,
        }
    })
}

fn policy() -> impl Strategy<Value = ServicePolicy> {
    let action = prop_oneof![Just(Action::Dial), Just(Action::Bind)];
    let semantic = prop_oneof![Just(Semantic::AnyOf), Just(Semantic::AllOf)];
    (
        0usize..10,
        action,
        semantic,
        proptest::collection::vec(selector("i", 10), 0..4),
        proptest::collection::vec(selector("s", 8), 0..4),
    )
        .prop_map(
            |(k, action, semantic, identities, services)| ServicePolicy {
                name: name(format!("p{k}")),
                action,
                identities,
                services,
                semantic,
                limits: umbra_policies::GrantLimits::default(),
            },
        )
}

/// A change, some resolved against the state it applies to.
#[derive(Debug, Clone)]
enum Op {
    Put(StateChange),
    DeleteIdentity(usize),
    DeleteService(usize),
    DeletePolicy(usize),
    /// Flip the activity of the identity with this id, if there is one.
    Flip(usize, u8, Option<u64>),
    /// Give the identity with this id new roles, if there is one.
    Roles(usize, Roles),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => identity().prop_map(|i| Op::Put(StateChange::IdentityPut(i))),
        2 => service().prop_map(|s| Op::Put(StateChange::ServicePut(s))),
        3 => policy().prop_map(|p| Op::Put(StateChange::PolicyPut(p))),
        1 => (0..IDS).prop_map(Op::DeleteIdentity),
        1 => (0usize..8).prop_map(Op::DeleteService),
        1 => (0usize..10).prop_map(Op::DeletePolicy),
        2 => (0..IDS, 0u8..4, proptest::option::of(0u64..30)).prop_map(|(i, f, e)| Op::Flip(i, f, e)),
        2 => (0..IDS, roles()).prop_map(|(i, r)| Op::Roles(i, r)),
    ]
}

fn resolve(op: Op, state: &State) -> Option<StateChange> {
    let id = |i: usize| IdentityId::new(format!("id{i}")).unwrap();
    Some(match op {
        Op::Put(change) => change,
        Op::DeleteIdentity(i) => StateChange::IdentityDeleted(id(i)),
        Op::DeleteService(k) => StateChange::ServiceDeleted(name(format!("s{k}"))),
        Op::DeletePolicy(k) => StateChange::PolicyDeleted(name(format!("p{k}"))),
        Op::Flip(i, flags, expires) => {
            let mut identity = state.identities.get(&id(i))?.clone();
            identity.disabled = flags == 1;
            identity.revoked = flags == 2;
            identity.expires_at = expires.map(Timestamp);
            StateChange::IdentityPut(identity)
        }
        Op::Roles(i, roles) => {
            let mut identity = state.identities.get(&id(i))?.clone();
            identity.roles = roles;
            StateChange::IdentityPut(identity)
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Comparing two indexes on every question.

fn answers_agree(got: &Index, want: &Index, extra: &[ServicePolicy], now: Timestamp) {
    let state = want.state();
    assert_eq!(got.state(), state);
    let mut ids: Vec<IdentityId> = state.identities.keys().cloned().collect();
    ids.extend((0..IDS + 1).map(|i| IdentityId::new(format!("id{i}")).unwrap()));
    let mut services: Vec<String> = (0..9).map(|k| format!("s{k}")).collect();
    services.push("no-such".into());
    for id in &ids {
        for service in &services {
            for action in [Action::Dial, Action::Bind] {
                let (g, w) = (
                    got.check(action, id, service, now),
                    want.check(action, id, service, now),
                );
                assert_eq!(g, w, "check {action} {id} {service}");
                let (g, w) = (
                    got.explain(id, service, action, now),
                    want.explain(id, service, action, now),
                );
                assert_eq!(g, w, "explain {action} {id} {service}");
            }
        }
        for action in [Action::Dial, Action::Bind] {
            assert_eq!(
                got.services_for(id, action, now),
                want.services_for(id, action, now)
            );
        }
    }
    for service in &services {
        assert_eq!(
            got.binders_of(service, now),
            want.binders_of(service, now),
            "{service}"
        );
        assert_eq!(
            got.dialers_of(service, now),
            want.dialers_of(service, now),
            "{service}"
        );
    }
    for service in &services {
        assert_eq!(
            got.policies_selecting(service),
            want.policies_selecting(service),
            "{service}"
        );
    }
    for policy in state.policies.values().chain(extra) {
        assert_eq!(
            got.identities_selected_by(policy),
            want.identities_selected_by(policy)
        );
        assert_eq!(
            got.services_selected_by(policy),
            want.services_selected_by(policy)
        );
    }
}

/// What a side selects, by the definition: every entity tested.
fn naive_selected<'a, T>(
    entities: impl Iterator<Item = &'a T>,
    selectors: &[Selector],
    semantic: Semantic,
    name_roles: impl Fn(&T) -> (&Name, &Roles),
) -> Vec<&'a T>
where
    T: 'a,
{
    entities
        .filter(|e| {
            let (n, r) = name_roles(e);
            semantic.matches(selectors, n, r)
        })
        .collect()
}

fn problems(state: &State) -> Vec<DocError> {
    state.validate().err().unwrap_or_default()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn incremental_index_answers_like_a_fresh_build(
        ops in proptest::collection::vec(op(), 0..40),
        extra in proptest::collection::vec(policy(), 0..3),
        now in 0u64..32,
    ) {
        let now = Timestamp(now);
        let mut index = Index::build(&State::default());
        let mut history = vec![index.clone()];
        for op in ops {
            let Some(change) = resolve(op, index.state()) else { continue };
            index.apply(&change);
            history.push(index.clone());
        }
        let fresh = Index::build(index.state());
        answers_agree(&index, &fresh, &extra, now);
        // Earlier versions are untouched snapshots.
        let first = &history[history.len() / 2];
        answers_agree(first, &Index::build(first.state()), &extra, now);
        // What a policy selects, against the definition.
        for policy in index.state().policies.values().chain(&extra) {
            let ids = naive_selected(index.state().identities.values(), &policy.identities, policy.semantic, |i| (&i.name, &i.roles));
            let want: Vec<&IdentityId> = ids.into_iter().map(|i| &i.id).collect();
            prop_assert_eq!(index.identities_selected_by(policy), want);
            let want = naive_selected(index.state().services.values(), &policy.services, policy.semantic, |s| (&s.name, &s.roles));
            prop_assert_eq!(index.services_selected_by(policy), want);
        }
        // Which policies select a service, against the definition.
        for service in index.state().services.values() {
            let want: Vec<&ServicePolicy> = (index.state().policies.values())
                .filter(|p| p.selects_service(service))
                .collect();
            prop_assert_eq!(index.policies_selecting(service.name.as_str()), want);
        }
    }

    #[test]
    fn validating_changes_finds_exactly_the_problems_they_add(
        setup in proptest::collection::vec(op(), 0..30),
        batch in proptest::collection::vec(op(), 0..6),
    ) {
        let mut index = Index::build(&State::default());
        for op in setup {
            let Some(change) = resolve(op, index.state()) else { continue };
            index.apply(&change);
        }
        let mut after = index.state().clone();
        let mut changes = Vec::new();
        for op in batch {
            let Some(change) = resolve(op, &after) else { continue };
            after.apply(&change);
            changes.push(change);
        }
        let before = problems(index.state());
        let mut want: Vec<DocError> = problems(&after).into_iter().filter(|p| !before.contains(p)).collect();
        want.sort_by_key(|p| p.to_string());
        let mut got = index.validate_changes(&changes).err().unwrap_or_default();
        got.sort_by_key(|p| p.to_string());
        prop_assert_eq!(got, want);
    }
}
