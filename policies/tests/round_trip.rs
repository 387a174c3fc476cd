//! Property tests: whatever state the controller can be in, `umbra export` writes a document
//! that `umbra apply` takes back. Planned against the same state it is no change; planned
//! against an empty state it recreates the state (up to ids and the routers no document can
//! create).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use umbra_policies::Roles;
use umbra_policies::{
    apply_plan, export, parse_document, plan, Action, DocErrorKind, GrantLimits, HostPort, Hosting,
    Identity, IdentityId, IdentityKind, Name, Patterns, Rpm, Selector, Semantic, Service,
    ServicePolicy, State, TokenBudget,
};

fn name(s: String) -> Name {
    Name::new(s).unwrap()
}

const ROLES: usize = 4;
const INTERCEPTS: usize = 6;

fn roles() -> impl Strategy<Value = Roles> {
    proptest::collection::btree_set((0..ROLES).prop_map(|r| name(format!("r{r}"))), 0..3)
        .prop_map(|s| s.into_iter().collect())
}

/// An identity of any kind and standing: active, disabled or revoked agents, admins, routers.
fn identity() -> impl Strategy<Value = Identity> {
    let kind = prop_oneof![
        3 => Just(IdentityKind::Agent),
        1 => Just(IdentityKind::Admin),
        1 => Just(IdentityKind::Router)
    ];
    (0usize..14, kind, roles(), 0u8..4).prop_map(|(k, kind, roles, standing)| Identity {
        id: IdentityId::new(format!("id{k}")).unwrap(),
        name: name(format!("i{k}")),
        kind,
        roles,
        disabled: standing == 1,
        revoked: standing == 2,
        // No controller command sets an expiry, so no state the controller can be in has one.
        expires_at: None,
    })
}

/// A service with any combination of options: hosted or addressed, roles, intercepts (some
/// repeated within the service), PROXY protocol.
fn service() -> impl Strategy<Value = Service> {
    let intercepts = proptest::collection::vec(0..INTERCEPTS, 0..3);
    (0usize..8, roles(), any::<bool>(), intercepts, any::<bool>()).prop_map(
        |(k, roles, sdk, intercepts, proxy_protocol)| Service {
            name: name(format!("s{k}")),
            roles,
            hosting: if sdk {
                Hosting::Sdk
            } else {
                Hosting::Address("svc.internal:443".parse().unwrap())
            },
            intercepts: (intercepts.into_iter())
                .map(|i| HostPort::new(&format!("x{i}.umbra"), 443).unwrap())
                .collect(),
            proxy_protocol,
        },
    )
}

/// A selector for a valid state: `@name` only of a name the state holds.
fn resolve(choice: (u8, usize), names: &[&Name]) -> Selector {
    match choice.0 % 3 {
        0 => Selector::All,
        1 => Selector::Role(name(format!("r{}", choice.1 % ROLES))),
        _ if names.is_empty() => Selector::All,
        _ => Selector::Named(names[choice.1 % names.len()].clone()),
    }
}

type PolicyDraft = (usize, bool, bool, Vec<(u8, usize)>, Vec<(u8, usize)>, bool);

fn policy_draft() -> impl Strategy<Value = PolicyDraft> {
    let choices = || proptest::collection::vec((any::<u8>(), any::<usize>()), 1..4);
    (
        0usize..10,
        any::<bool>(),
        any::<bool>(),
        choices(),
        choices(),
        any::<bool>(),
    )
}

/// A state the controller's rules accept: unique names, resolving `@name`s (to revoked
/// identities and routers too), no empty selector list, each intercept in one service only.
fn controller_state() -> impl Strategy<Value = State> {
    (
        proptest::collection::vec(identity(), 0..12),
        proptest::collection::vec(service(), 0..7),
        proptest::collection::vec(policy_draft(), 0..8),
    )
        .prop_map(|(identities, services, policies)| {
            let identities: BTreeMap<IdentityId, Identity> =
                identities.into_iter().map(|i| (i.id.clone(), i)).collect();
            let mut taken = BTreeSet::new();
            let services: BTreeMap<Name, Service> = (services.into_iter())
                .map(|s| (s.name.clone(), s))
                .collect::<BTreeMap<_, _>>()
                .into_values()
                .map(|mut s| {
                    s.intercepts.retain(|i| !taken.contains(i));
                    taken.extend(s.intercepts.iter().cloned());
                    (s.name.clone(), s)
                })
                .collect();
            let id_names: Vec<&Name> = identities.values().map(|i| &i.name).collect();
            let svc_names: Vec<&Name> = services.keys().collect();
            let policies = (policies.into_iter())
                .map(|(k, bind, all_of, ids, svcs, limits)| ServicePolicy {
                    name: name(format!("p{k}")),
                    action: if bind { Action::Bind } else { Action::Dial },
                    identities: ids.into_iter().map(|c| resolve(c, &id_names)).collect(),
                    services: svcs.into_iter().map(|c| resolve(c, &svc_names)).collect(),
                    semantic: if all_of {
                        Semantic::AllOf
                    } else {
                        Semantic::AnyOf
                    },
                    limits: GrantLimits {
                        models: limits.then(|| patterns("gpt-*,!gpt-4")),
                        tokens: limits.then(|| "200000/day".parse::<TokenBudget>().unwrap()),
                        rpm: limits.then(|| Rpm::try_from(60).unwrap()),
                        tools: limits.then(|| patterns("github__*")),
                        resources: limits.then(|| patterns("docs__*")),
                        prompts: limits.then(|| patterns("*")),
                        connections: limits.then(|| 2.try_into().unwrap()),
                        rate: limits.then(|| "600/min".parse().unwrap()),
                        bandwidth: limits.then(|| "10MiB/s".parse().unwrap()),
                    },
                })
                .map(|p| (p.name.clone(), p))
                .collect();
            State {
                identities: identities.into(),
                services: services.into(),
                policies,
            }
        })
}

fn patterns(s: &str) -> Patterns {
    s.parse().unwrap()
}

/// Whether a policy names a router with `@name`: such a document can only be applied where
/// that router is enrolled.
fn names_a_router(state: &State) -> bool {
    (state.policies.values())
        .flat_map(|p| &p.identities)
        .any(|s| matches!(s, Selector::Named(n) if state.identity_by_name(n.as_str()).is_some_and(|i| i.kind == IdentityKind::Router)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn export_then_apply_round_trips(state in controller_state()) {
        state.validate().map_err(|e| TestCaseError::fail(format!("generator: {e:?}")))?;
        let yaml = export(&state).to_yaml();
        let doc = parse_document(&yaml)
            .map_err(|e| TestCaseError::fail(format!("{e:?}\n{yaml}")))?;

        // Against the same state: no change.
        let same = plan(&state, &doc).map_err(|e| TestCaseError::fail(format!("{e:?}\n{yaml}")))?;
        prop_assert!(same.is_empty(), "{}\n{}", same, yaml);

        // Against an empty controller: the same state again, with new ids.
        let fresh = plan(&State::default(), &doc);
        if names_a_router(&state) {
            let errs = fresh.expect_err("a document naming a router needs that router");
            prop_assert!(errs.iter().all(|e| matches!(e.kind, DocErrorKind::RouterNotEnrolled { .. })), "{:?}", errs);
            return Ok(());
        }
        let fresh = fresh.map_err(|e| TestCaseError::fail(format!("{e:?}\n{yaml}")))?;
        let mut n = 0;
        let next = apply_plan(&State::default(), &fresh, || {
            n += 1;
            IdentityId::new(format!("new{n}")).unwrap()
        })
        .map_err(|e| TestCaseError::fail(format!("{e:?}\n{fresh}")))?;
        prop_assert_eq!(export(&next).to_yaml(), yaml);
        prop_assert_eq!(&next.services, &state.services);
        prop_assert_eq!(&next.policies, &state.policies);
        let without_ids = |s: &State| -> BTreeMap<Name, (IdentityKind, Roles, bool, bool)> {
            (s.identities.values())
                .filter(|i| i.kind != IdentityKind::Router)
                .map(|i| (i.name.clone(), (i.kind, i.roles.clone(), i.disabled, i.revoked)))
                .collect()
        };
        prop_assert_eq!(without_ids(&next), without_ids(&state));
        prop_assert!(plan(&next, &doc).unwrap().is_empty());
    }

    #[test]
    fn states_with_an_intercept_in_two_services_are_refused(
        state in controller_state(),
        a in any::<prop::sample::Index>(),
        b in any::<prop::sample::Index>(),
    ) {
        let mut state = state;
        for k in state.services.len()..2 {
            let extra = Service {
                name: name(format!("t{k}")),
                roles: Roles::new(),
                hosting: Hosting::Sdk,
                intercepts: vec![],
                proxy_protocol: false,
            };
            state.services.insert(extra.name.clone(), extra);
        }
        let names: Vec<Name> = state.services.keys().cloned().collect();
        let a = a.index(names.len());
        let b = (a + 1 + b.index(names.len() - 1)) % names.len();
        let mut bad = state.clone();
        let shared = HostPort::new("shared.umbra", 443).unwrap();
        for k in [a, b] {
            bad.services.get_mut(&names[k]).unwrap().intercepts.push(shared.clone());
        }
        let errs = bad.validate().unwrap_err();
        prop_assert_eq!(errs.len(), 1, "{:?}", errs);
        let (first, by) = (names[a.min(b)].clone(), names[a.max(b)].clone());
        prop_assert_eq!(
            &errs[0].kind,
            &DocErrorKind::InterceptTaken { intercept: shared, service: first, by }
        );
        // The same two services in a document are refused as well.
        let yaml = export(&bad).to_yaml();
        prop_assert!(parse_document(&yaml).is_err());
    }
}
