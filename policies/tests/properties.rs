//! Property tests: the compiled index against a naive evaluation of every policy, and planning
//! against the document it plans for.

use std::collections::BTreeMap;

use proptest::prelude::*;
use umbra_policies::Roles;
use umbra_policies::{
    apply_plan, export, parse_document, plan, Action, DocIdentity, Document, Hosting, Identity,
    IdentityId, IdentityKind, Index, Name, Selector, Semantic, Service, ServicePolicy, State,
    Timestamp,
};

fn name(s: String) -> Name {
    Name::new(s).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The naive reference: every question answered by testing every policy, written from the
// definitions and sharing no code with the index.

fn selector_matches(s: &Selector, name: &Name, roles: &Roles) -> bool {
    match s {
        Selector::All => true,
        Selector::Role(r) => roles.contains(r.as_str()),
        Selector::Named(n) => n == name,
    }
}

fn side_matches(p: &ServicePolicy, sel: &[Selector], name: &Name, roles: &Roles) -> bool {
    !sel.is_empty()
        && match p.semantic {
            Semantic::AnyOf => sel.iter().any(|s| selector_matches(s, name, roles)),
            Semantic::AllOf => sel.iter().all(|s| selector_matches(s, name, roles)),
        }
}

fn naive_check(
    state: &State,
    action: Action,
    id: &IdentityId,
    service: &str,
    now: Timestamp,
) -> Result<Name, umbra_policies::Deny> {
    use umbra_policies::Deny;
    let i = state.identities.get(id).ok_or(Deny::UnknownIdentity)?;
    if i.revoked {
        return Err(Deny::IdentityRevoked);
    }
    if i.disabled {
        return Err(Deny::IdentityDisabled);
    }
    if i.expires_at.is_some_and(|e| now.0 >= e.0) {
        return Err(Deny::IdentityExpired);
    }
    let s = state.services.get(service).ok_or(Deny::NotGranted)?;
    // BTreeMap order is name order, so the first match is the first granting policy by name.
    (state.policies.values())
        .find(|p| {
            p.action == action
                && side_matches(p, &p.identities, &i.name, &i.roles)
                && side_matches(p, &p.services, &s.name, &s.roles)
        })
        .map(|p| p.name.clone())
        .ok_or(Deny::NotGranted)
}

/// Every (identity id, policy name) pair through which the identity may dial `service` at
/// `now`, by policy name then id: every policy tried against every identity. Only a service
/// hosted through the SDK has a host to tell, so any other has none.
fn naive_dialers(state: &State, service: &str, now: Timestamp) -> Vec<(IdentityId, Name)> {
    let Some(s) = state
        .services
        .get(service)
        .filter(|s| s.hosting == Hosting::Sdk)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in state.policies.values() {
        if p.action != Action::Dial || !side_matches(p, &p.services, &s.name, &s.roles) {
            continue;
        }
        for i in state.identities.values() {
            let active = !i.revoked && !i.disabled && i.expires_at.is_none_or(|e| now.0 < e.0);
            if active && side_matches(p, &p.identities, &i.name, &i.roles) {
                out.push((i.id.clone(), p.name.clone()));
            }
        }
    }
    out
}

fn dialers(index: &Index, service: &str, now: Timestamp) -> Vec<(IdentityId, Name)> {
    (index.dialers_of(service, now).into_iter())
        .map(|(i, p)| (i.id.clone(), p.name.clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Random states for the index: small name and role pools so that selectors hit often, with
// every kind of identity and activity, dangling `@name`s and empty selector lists included.

const ROLES: usize = 5;

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

fn identity() -> impl Strategy<Value = (usize, IdentityKind, Roles, u8, Option<u64>)> {
    let kind = prop_oneof![
        Just(IdentityKind::Agent),
        Just(IdentityKind::Admin),
        Just(IdentityKind::Router)
    ];
    let expires = proptest::option::of(0u64..30);
    (0usize..20, kind, roles(), 0u8..10, expires)
}

fn service() -> impl Strategy<Value = Service> {
    (0usize..14, roles(), any::<bool>()).prop_map(|(k, roles, sdk)| Service {
        name: name(format!("s{k}")),
        roles,
        hosting: if sdk {
            Hosting::Sdk
        } else {
            Hosting::Address("svc.internal:443".parse().unwrap())
        },
        intercepts: vec![],
        proxy_protocol: false,
    })
}

fn policy() -> impl Strategy<Value = ServicePolicy> {
    let action = prop_oneof![Just(Action::Dial), Just(Action::Bind)];
    let semantic = prop_oneof![Just(Semantic::AnyOf), Just(Semantic::AllOf)];
    (
        0usize..30,
        action,
        semantic,
        proptest::collection::vec(selector("i", 22), 0..4),
        proptest::collection::vec(selector("s", 16), 0..4),
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

fn any_state() -> impl Strategy<Value = State> {
    (
        proptest::collection::vec(identity(), 0..25),
        proptest::collection::vec(service(), 0..12),
        proptest::collection::vec(policy(), 0..16),
    )
        .prop_map(|(identities, services, policies)| State {
            identities: (identities.into_iter().enumerate())
                .map(|(i, (k, kind, roles, flags, expires))| {
                    let id = IdentityId::new(format!("id{i}")).unwrap();
                    let identity = Identity {
                        id: id.clone(),
                        // Names may repeat: the index must not care.
                        name: name(format!("i{k}")),
                        kind,
                        roles,
                        disabled: flags == 1,
                        revoked: flags == 2,
                        expires_at: expires.map(Timestamp),
                    };
                    (id, identity)
                })
                .collect(),
            services: services.into_iter().map(|s| (s.name.clone(), s)).collect(),
            policies: policies.into_iter().map(|p| (p.name.clone(), p)).collect(),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn index_answers_like_the_naive_evaluation(state in any_state(), now in 0u64..32) {
        let now = Timestamp(now);
        let index = Index::build(&state);
        let mut ids: Vec<IdentityId> = state.identities.keys().cloned().collect();
        ids.push(IdentityId::new("unknown").unwrap());
        let mut services: Vec<String> = state.services.keys().map(|n| n.to_string()).collect();
        services.push("no-such-service".into());

        for id in &ids {
            for service in &services {
                for action in [Action::Dial, Action::Bind] {
                    let want = naive_check(&state, action, id, service, now);
                    let got = index.check(action, id, service, now).map(|p| p.policy);
                    prop_assert_eq!(&got, &want, "{:?} {} {}", action, id, service);
                    let explained = index.explain(id, service, action, now);
                    prop_assert_eq!(explained.decision.map(|p| p.policy), want);
                }
                let dial = index.can_dial(id, service, now).map(|p| p.policy);
                prop_assert_eq!(dial, naive_check(&state, Action::Dial, id, service, now));
                let bind = index.can_bind(id, service, now).map(|p| p.policy);
                prop_assert_eq!(bind, naive_check(&state, Action::Bind, id, service, now));
            }
            for action in [Action::Dial, Action::Bind] {
                let want: Vec<&Name> = (state.services.keys())
                    .filter(|s| naive_check(&state, action, id, s.as_str(), now).is_ok())
                    .collect();
                let got: Vec<&Name> = index.services_for(id, action, now).iter().map(|s| &s.name).collect();
                prop_assert_eq!(got, want);
            }
        }
        for service in &services {
            let want: Vec<&IdentityId> = (state.identities.keys())
                .filter(|id| naive_check(&state, Action::Bind, id, service, now).is_ok())
                .collect();
            prop_assert_eq!(index.binders_of(service, now), want);
            prop_assert_eq!(dialers(&index, service, now), naive_dialers(&state, service, now));
        }
    }

    #[test]
    fn with_identity_answers_like_a_fresh_build(
        state in any_state(),
        pick in any::<prop::sample::Index>(),
        flags in 0u8..4,
        now in 0u64..32,
    ) {
        prop_assume!(!state.identities.is_empty());
        let now = Timestamp(now);
        let index = Index::build(&state);
        let all: Vec<&Identity> = state.identities.values().collect();
        let mut changed = (*pick.get(&all)).clone();
        changed.disabled = flags == 1;
        changed.revoked = flags == 2;
        changed.expires_at = (flags == 3).then_some(Timestamp(10));
        let updated = index.with_identity(changed.clone());
        let mut fresh_state = state.clone();
        fresh_state.identities.insert(changed.id.clone(), changed);
        prop_assert_eq!(updated.state(), &fresh_state);
        let fresh = Index::build(&fresh_state);
        for service in state.services.keys() {
            prop_assert_eq!(
                dialers(&updated, service.as_str(), now),
                dialers(&fresh, service.as_str(), now)
            );
        }
        for id in state.identities.keys() {
            for service in state.services.keys() {
                prop_assert_eq!(
                    updated.can_dial(id, service.as_str(), now),
                    fresh.can_dial(id, service.as_str(), now)
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Random valid documents and current states for planning. Kinds follow name prefixes (`a` for
// agents, `m` for admins) so a document never asks for a kind change; routers (`r`) and revoked
// identities (`x`) use their own names, which documents never take.

fn doc_identity() -> impl Strategy<Value = DocIdentity> {
    (
        any::<bool>(),
        0usize..12,
        roles(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(admin, k, roles, disabled)| DocIdentity {
            name: name(format!("{}{k}", if admin { "m" } else { "a" })),
            kind: if admin {
                IdentityKind::Admin
            } else {
                IdentityKind::Agent
            },
            roles,
            disabled,
            revoked: false,
        })
}

/// A selector for a valid document: `@name` only of a name the document holds.
fn resolve(choice: (u8, usize), names: &[&Name]) -> Selector {
    match choice.0 % 3 {
        0 => Selector::All,
        1 => Selector::Role(name(format!("r{}", choice.1 % ROLES))),
        _ if names.is_empty() => Selector::All,
        _ => Selector::Named(names[choice.1 % names.len()].clone()),
    }
}

fn document() -> impl Strategy<Value = Document> {
    let choices = || proptest::collection::vec((any::<u8>(), any::<usize>()), 1..4);
    let policy = (
        0usize..12,
        any::<bool>(),
        any::<bool>(),
        choices(),
        choices(),
    );
    (
        proptest::collection::vec(doc_identity(), 0..14),
        proptest::collection::vec(service(), 0..8),
        proptest::collection::vec(policy, 0..10),
    )
        .prop_map(|(identities, services, policies)| {
            let identities: BTreeMap<Name, DocIdentity> = identities
                .into_iter()
                .map(|i| (i.name.clone(), i))
                .collect();
            let services: BTreeMap<Name, Service> =
                services.into_iter().map(|s| (s.name.clone(), s)).collect();
            let id_names: Vec<&Name> = identities.keys().collect();
            let svc_names: Vec<&Name> = services.keys().collect();
            let policies: BTreeMap<Name, ServicePolicy> = (policies.into_iter())
                .map(|(k, bind, all_of, ids, svcs)| ServicePolicy {
                    name: name(format!("p{k}")),
                    action: if bind { Action::Bind } else { Action::Dial },
                    identities: ids.into_iter().map(|c| resolve(c, &id_names)).collect(),
                    services: svcs.into_iter().map(|c| resolve(c, &svc_names)).collect(),
                    semantic: if all_of {
                        Semantic::AllOf
                    } else {
                        Semantic::AnyOf
                    },
                    limits: umbra_policies::GrantLimits::default(),
                })
                .map(|p| (p.name.clone(), p))
                .collect();
            Document {
                identities: identities.into_values().rev().collect(),
                services: services.into_values().collect(),
                policies: policies.into_values().collect(),
            }
        })
}

/// A current state: what some earlier document made, plus routers, revoked identities and
/// expiry times that documents do not manage, and policies naming routers.
fn current_state() -> impl Strategy<Value = State> {
    (
        document(),
        0usize..3,
        0usize..3,
        proptest::option::of(0u64..100),
        policy(),
    )
        .prop_map(|(doc, routers, revoked, expiry, extra_policy)| {
            let mut state = State::default();
            let mut add = |name: Name, kind, roles, disabled, revoked| {
                let id = IdentityId::new(format!("old-{name}")).unwrap();
                let identity = Identity {
                    id: id.clone(),
                    name,
                    kind,
                    roles,
                    disabled,
                    revoked,
                    expires_at: expiry.map(Timestamp),
                };
                state.identities.insert(id, identity);
            };
            for i in doc.identities {
                add(i.name, i.kind, i.roles, i.disabled, false);
            }
            for k in 0..routers {
                add(
                    name(format!("r{k}")),
                    IdentityKind::Router,
                    Roles::new(),
                    false,
                    false,
                );
            }
            for k in 0..revoked {
                add(
                    name(format!("x{k}")),
                    IdentityKind::Agent,
                    Roles::new(),
                    false,
                    true,
                );
            }
            state.services = doc
                .services
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect();
            state.policies = doc
                .policies
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect();
            state
                .policies
                .insert(extra_policy.name.clone(), extra_policy);
            state
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn applying_a_plan_reaches_the_document(current in current_state(), desired in document()) {
        let plan = plan(&current, &desired).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let mut next_id = 0;
        let next = apply_plan(&current, &plan, || {
            next_id += 1;
            IdentityId::new(format!("new-{next_id}")).unwrap()
        });
        let next = next.map_err(|e| TestCaseError::fail(format!("{e:?}\n{plan}")))?;
        // The export also lists the routers and revoked identities the state keeps (those the
        // document left alone); the rest is the document.
        let mut managed = export(&next);
        managed.identities.retain(|i| i.kind != IdentityKind::Router && !i.revoked);
        prop_assert_eq!(managed, desired.normalized());
        prop_assert!(umbra_policies::plan(&next, &desired).unwrap().is_empty());
        // Routers and revoked identities are exactly as they were.
        let untouchable = |s: &State| -> Vec<Identity> {
            (s.identities.values())
                .filter(|i| i.kind == IdentityKind::Router || i.revoked)
                .cloned()
                .collect()
        };
        prop_assert_eq!(untouchable(&next), untouchable(&current));
    }

    #[test]
    fn documents_round_trip_through_yaml(doc in document()) {
        let yaml = doc.to_yaml();
        prop_assert_eq!(parse_document(&yaml).unwrap(), doc);
    }

    #[test]
    fn parsing_never_panics(yaml in "\\PC{0,200}") {
        let _ = parse_document(&yaml);
    }
}
