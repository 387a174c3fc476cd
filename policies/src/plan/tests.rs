use super::*;
use crate::apply::apply_plan;
use crate::doc::{export, parse_document};
use crate::model::{Action, Semantic, Timestamp};
use crate::testing::{agent, id, n, policy, service, state};

/// A current state: two agents, an admin, a router, a revoked agent, two services, a policy.
fn current() -> State {
    let mut router = agent("edge-1", &[]);
    router.kind = IdentityKind::Router;
    let mut gone = agent("gone", &["analysts"]);
    gone.revoked = true;
    let mut ops = agent("ops", &[]);
    ops.kind = IdentityKind::Admin;
    let mut ann = agent("ann", &["analysts"]);
    ann.expires_at = Some(Timestamp(99));
    state(
        [ann, agent("bob", &["analysts"]), ops, router, gone],
        [service("llm", &["ai"]), service("old", &[])],
        [policy(
            "analysts-llm",
            Action::Dial,
            Semantic::AnyOf,
            &["#analysts"],
            &["@llm"],
        )],
    )
}

/// Ids handed out by a counter, as the controller's random ids would be.
fn ids() -> impl FnMut() -> IdentityId {
    let mut next = 0;
    move || {
        next += 1;
        id(&format!("new-{next}"))
    }
}

fn doc(yaml: &str) -> Document {
    parse_document(yaml).unwrap()
}

/// The export without the routers and revoked identities a document leaves alone.
fn managed(state: &State) -> Document {
    let mut doc = export(state);
    doc.identities
        .retain(|i| i.kind != IdentityKind::Router && !i.revoked);
    doc
}

const DESIRED: &str = r##"
identities:
  - {name: ann, roles: [analysts]}
  - {name: bob, roles: [analysts, ops], disabled: true}
  - {name: cat, roles: [analysts]}
services:
  - {name: llm, roles: [ai], address: "api.internal:443"}
  - {name: notes, hosted: true}
policies:
  - {name: analysts-llm, identities: ["#analysts"], services: ["@llm", "@notes"]}
  - {name: cat-binds, action: bind, identities: ["@cat"], services: ["@notes"]}
"##;

#[test]
fn export_then_parse_plans_nothing() {
    let state = current();
    let yaml = export(&state).to_yaml();
    let plan = plan(&state, &doc(&yaml)).unwrap();
    assert!(plan.is_empty(), "{plan}");
    assert_eq!(plan.to_string(), "no changes\n");
}

#[test]
fn policies_naming_revoked_identities_and_routers_round_trip() {
    let mut state = current();
    let p = policy(
        "p",
        Action::Dial,
        Semantic::AnyOf,
        &["@gone", "@edge-1"],
        &["@llm"],
    );
    state.policies.insert(p.name.clone(), p);
    let yaml = export(&state).to_yaml();
    assert!(yaml.contains("revoked: true"), "{yaml}");
    let desired = doc(&yaml);
    assert!(plan(&state, &desired).unwrap().is_empty());

    // On a controller without the router the document says what is missing.
    let mut routerless = state.clone();
    routerless.identities.remove(&id("id-edge-1"));
    routerless.policies = (routerless.policies.into_iter())
        .map(|(k, mut p)| {
            p.identities.retain(|s| s.to_string() != "@edge-1");
            (k, p)
        })
        .collect();
    let errs = plan(&routerless, &desired).unwrap_err();
    assert_eq!(
        errs[0].to_string(),
        format!(
            "identities[{}].name: \"edge-1\" is not a router of this controller; create it with \
             `umbra router create edge-1` first (documents never create routers)",
            desired
                .identities
                .iter()
                .position(|i| i.name == n("edge-1"))
                .unwrap()
        )
    );

    // Without the router reference, an empty controller gets the revoked record back.
    let yaml = export(&routerless).to_yaml();
    let fresh = plan(&State::default(), &doc(&yaml)).unwrap();
    assert!(fresh
        .to_string()
        .contains("+ identity gone (agent) roles=analysts revoked=true"));
    let next = apply_plan(&State::default(), &fresh, ids()).unwrap();
    assert!(next.identity_by_name("gone").unwrap().revoked);
    assert_eq!(export(&next).to_yaml(), yaml);
}

#[test]
fn documents_never_revoke() {
    let errs = plan(&current(), &doc("identities: [{name: ann, revoked: true}]")).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].path, "identities[0].revoked");
    assert_eq!(
        errs[0].kind,
        DocErrorKind::RevokeInDocument { name: n("ann") }
    );
}

#[test]
fn plans_every_kind_of_change_in_a_safe_order() {
    let plan = plan(&current(), &doc(DESIRED)).unwrap();
    let text = plan.to_string();
    assert_eq!(
        text,
        "\
+ identity cat (agent) roles=analysts
~ service llm: address hosted -> api.internal:443
+ service notes address=hosted
~ identity bob: roles analysts -> analysts,ops, disabled false -> true
~ policy analysts-llm: services @llm -> @llm,@notes
+ policy cat-binds action=bind identities=@cat services=@notes semantic=anyOf
- service old
- identity ops
"
    );
    assert!(matches!(&plan.changes[0], Change::CreateIdentity { name, .. } if name == &n("cat")));
    assert!(matches!(
        plan.changes.last(),
        Some(Change::DeleteIdentity { id: i, .. }) if i == &id("id-ops")
    ));
}

#[test]
fn a_plan_shown_in_part_counts_the_rest_by_kind() {
    let plan = plan(&current(), &doc(DESIRED)).unwrap();
    let whole = plan.to_string();
    assert_eq!(plan.shown(usize::MAX).to_string(), whole);
    assert_eq!(plan.shown(plan.changes.len()).to_string(), whole);
    let part = plan.shown(3).to_string();
    let lines: Vec<&str> = part.lines().collect();
    assert_eq!(lines[..3], whole.lines().take(3).collect::<Vec<_>>()[..]);
    assert_eq!(
        lines[3..],
        ["... and 5 more change(s): 2 to identities, 1 to services, 2 to policies"]
    );
    assert_eq!(Plan::default().shown(0).to_string(), "no changes\n");
}

#[test]
fn routers_and_revoked_identities_are_never_touched() {
    let plan = plan(&current(), &doc("{}")).unwrap();
    let deleted: Vec<&str> = (plan.changes.iter())
        .filter_map(|c| match c {
            Change::DeleteIdentity { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, ["ann", "bob", "ops"]);
}

#[test]
fn documents_may_not_take_router_or_revoked_names() {
    let yaml = "identities: [{name: ann}, {name: edge-1}, {name: gone}]";
    let errs = plan(&current(), &doc(yaml)).unwrap_err();
    let got: Vec<(&str, &DocErrorKind)> = errs.iter().map(|e| (e.path.as_str(), &e.kind)).collect();
    assert_eq!(
        got,
        [
            (
                "identities[1].name",
                &DocErrorKind::RouterName { name: n("edge-1") }
            ),
            (
                "identities[2].name",
                &DocErrorKind::RevokedName { name: n("gone") }
            ),
        ]
    );
}

#[test]
fn kinds_cannot_change() {
    let errs = plan(&current(), &doc("identities: [{name: ops, kind: agent}]")).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].path, "identities[0].kind");
    assert_eq!(
        errs[0].kind,
        DocErrorKind::KindChange {
            name: n("ops"),
            current: IdentityKind::Admin,
            desired: IdentityKind::Agent
        }
    );
    assert_eq!(
        errs[0].to_string(),
        "identities[0].kind: \"ops\" is an existing admin; delete it and create a new agent instead"
    );
}

#[test]
fn invalid_documents_built_in_code_are_refused() {
    let mut desired = doc(DESIRED);
    desired.policies[1].identities = vec!["@nobody".parse().unwrap()];
    let errs = plan(&current(), &desired).unwrap_err();
    assert_eq!(errs[0].path, "policies[1].identities[0]");
}

#[test]
fn applying_the_plan_reaches_the_document() {
    let current = current();
    let desired = doc(DESIRED);
    let plan = plan(&current, &desired).unwrap();
    let next = apply_plan(&current, &plan, ids()).unwrap();
    assert_eq!(managed(&next), desired.normalized());
    assert_eq!(next.identity_by_name("cat").unwrap().id, id("new-1"));
    // What the document does not manage is kept: the router, the revoked record, the expiry.
    assert!(next.identity_by_name("edge-1").is_some());
    assert!(next.identity_by_name("gone").is_some());
    assert_eq!(
        next.identity_by_name("ann").unwrap().expires_at,
        Some(Timestamp(99))
    );
    assert!(crate::plan(&next, &desired).unwrap().is_empty());
}

#[test]
fn every_intermediate_state_is_valid() {
    let mut state = current();
    let mut new_ids = ids();
    for change in plan(&state, &doc(DESIRED)).unwrap().changes {
        state = apply_plan(&state, &Plan::new(vec![change.clone()]), &mut new_ids)
            .unwrap_or_else(|e| panic!("{change:?}: {e:?}"));
    }
    assert_eq!(managed(&state), doc(DESIRED).normalized());
}

#[test]
fn stale_or_unsafe_plans_are_refused_with_every_reason() {
    let plan = Plan::new(vec![
        Change::DeleteIdentity {
            id: id("no-such"),
            name: n("x"),
        },
        Change::UpdateIdentity {
            id: id("id-edge-1"),
            name: n("edge-1"),
            roles: Roles::new(),
            disabled: true,
        },
        Change::DeleteIdentity {
            id: id("id-gone"),
            name: n("gone"),
        },
        Change::DeleteService { name: n("nope") },
        Change::DeletePolicy { name: n("nope") },
        Change::CreateIdentity {
            name: n("bob"),
            kind: IdentityKind::Agent,
            roles: Roles::new(),
            disabled: false,
            revoked: false,
        },
        Change::CreateIdentity {
            name: n("r2"),
            kind: IdentityKind::Router,
            roles: Roles::new(),
            disabled: false,
            revoked: false,
        },
    ]);
    let errs = apply_plan(&current(), &plan, ids()).unwrap_err();
    let kinds: Vec<(&str, &DocErrorKind)> =
        errs.iter().map(|e| (e.path.as_str(), &e.kind)).collect();
    assert_eq!(
        kinds,
        [
            (
                "changes[0]",
                &DocErrorKind::UnknownIdentityId(id("no-such"))
            ),
            (
                "changes[1]",
                &DocErrorKind::RouterName { name: n("edge-1") }
            ),
            ("changes[2]", &DocErrorKind::RevokedName { name: n("gone") }),
            ("changes[3]", &DocErrorKind::UnknownService(n("nope"))),
            ("changes[4]", &DocErrorKind::UnknownPolicy(n("nope"))),
            (
                "changes[5]",
                &DocErrorKind::Duplicate {
                    entity: crate::Entity::Identity,
                    name: n("bob"),
                    first: "identities[\"id-bob\"]".into()
                }
            ),
            ("changes[6]", &DocErrorKind::RouterInDocument),
        ]
    );
}

#[test]
fn reused_ids_are_refused() {
    let plan = Plan::new(vec![Change::CreateIdentity {
        name: n("new"),
        kind: IdentityKind::Agent,
        roles: Roles::new(),
        disabled: false,
        revoked: false,
    }]);
    let errs = apply_plan(&current(), &plan, || id("id-ann")).unwrap_err();
    assert_eq!(errs[0].kind, DocErrorKind::IdTaken(id("id-ann")));
}

#[test]
fn the_result_must_be_a_valid_state() {
    let plan = Plan::new(vec![
        Change::PutPolicy(policy(
            "p",
            Action::Dial,
            Semantic::AnyOf,
            &["@ghost"],
            &["#all"],
        )),
        Change::DeleteService { name: n("llm") },
    ]);
    let errs = apply_plan(&current(), &plan, ids()).unwrap_err();
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "policies[\"analysts-llm\"].services[0]",
            "policies[\"p\"].identities[0]"
        ]
    );
}

#[test]
fn plans_built_by_hand_display_without_diffs() {
    let plan = Plan::new(vec![
        Change::UpdateIdentity {
            id: id("id-bob"),
            name: n("bob"),
            roles: [n("a"), n("b")].into(),
            disabled: false,
        },
        Change::DeletePolicy { name: n("old") },
    ]);
    assert_eq!(plan.to_string(), "~ identity bob roles=a,b\n- policy old\n");
}
