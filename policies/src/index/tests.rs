use super::*;
use crate::model::Semantic::{AllOf, AnyOf};
use crate::testing::{agent, id, n, policy, service, state};
use Action::{Bind, Dial};

const NOW: Timestamp = Timestamp(1_000);

fn permit(name: &str) -> Result<Permit, Deny> {
    Ok(Permit { policy: n(name) })
}

fn names(services: Vec<&Service>) -> Vec<&str> {
    services.iter().map(|s| s.name.as_str()).collect()
}

/// agents: ann (analysts), bob (analysts, ops), cid (no roles)
/// services: llm (ai), db (data), notes (hosted)
fn sample() -> Index {
    Index::build(&state(
        [
            agent("ann", &["analysts"]),
            agent("bob", &["analysts", "ops"]),
            agent("cid", &[]),
        ],
        [
            service("llm", &["ai"]),
            service("db", &["data"]),
            service("notes", &[]),
        ],
        [
            policy("p-analysts-ai", Dial, AnyOf, &["#analysts"], &["#ai"]),
            policy("a-ops-all", Dial, AllOf, &["#ops", "#analysts"], &["#all"]),
            policy("cid-db", Dial, AnyOf, &["@cid"], &["@db"]),
            policy("bob-binds-notes", Bind, AnyOf, &["@bob"], &["@notes"]),
        ],
    ))
}

#[test]
fn dial_is_granted_by_the_first_policy_by_name() {
    let index = sample();
    assert_eq!(
        index.can_dial(&id("id-ann"), "llm", NOW),
        permit("p-analysts-ai")
    );
    // bob is granted llm by two policies; the first by name wins.
    assert_eq!(
        index.can_dial(&id("id-bob"), "llm", NOW),
        permit("a-ops-all")
    );
    assert_eq!(
        index.can_dial(&id("id-bob"), "db", NOW),
        permit("a-ops-all")
    );
    assert_eq!(index.can_dial(&id("id-cid"), "db", NOW), permit("cid-db"));
}

#[test]
fn not_granted_and_nonexistent_services_look_the_same() {
    let index = sample();
    let ungranted = index.can_dial(&id("id-ann"), "db", NOW);
    let missing = index.can_dial(&id("id-ann"), "no-such-service", NOW);
    assert_eq!(ungranted, Err(Deny::NotGranted));
    assert_eq!(missing, ungranted);
}

#[test]
fn unknown_identities_are_refused() {
    let index = sample();
    let who = id("nobody");
    assert_eq!(index.can_dial(&who, "llm", NOW), Err(Deny::UnknownIdentity));
    assert!(index.services_for(&who, Dial, NOW).is_empty());
}

#[test]
fn inactive_identities_are_refused_revocation_first() {
    let mut ann = agent("ann", &["analysts"]);
    ann.expires_at = Some(NOW);
    let s = || service("llm", &["ai"]);
    let p = || policy("p", Dial, AnyOf, &["#all"], &["#all"]);
    let check = |ann: &Identity, now| {
        Index::build(&state([ann.clone()], [s()], [p()])).can_dial(&ann.id, "llm", now)
    };
    assert_eq!(check(&ann, Timestamp(NOW.0 - 1)), permit("p"));
    assert_eq!(
        check(&ann, NOW),
        Err(Deny::IdentityExpired),
        "expiry is exclusive"
    );
    ann.disabled = true;
    assert_eq!(check(&ann, Timestamp(0)), Err(Deny::IdentityDisabled));
    ann.revoked = true;
    assert_eq!(check(&ann, NOW), Err(Deny::IdentityRevoked));
}

#[test]
fn dial_and_bind_are_separate_grants() {
    let index = sample();
    assert_eq!(
        index.can_bind(&id("id-bob"), "notes", NOW),
        permit("bob-binds-notes")
    );
    assert_eq!(
        index.check(Bind, &id("id-bob"), "notes", NOW),
        permit("bob-binds-notes")
    );
    // bob may dial notes through a-ops-all, but ann may not bind what she dials.
    assert_eq!(
        index.can_dial(&id("id-bob"), "notes", NOW),
        permit("a-ops-all")
    );
    assert_eq!(
        index.can_bind(&id("id-ann"), "llm", NOW),
        Err(Deny::NotGranted)
    );
}

#[test]
fn all_of_needs_every_selector() {
    let index = sample();
    // a-ops-all needs #ops and #analysts: bob has both, ann only one.
    assert_eq!(
        index.can_dial(&id("id-ann"), "notes", NOW),
        Err(Deny::NotGranted)
    );
    let index = Index::build(&state(
        [agent("ann", &["x"]), agent("bob", &["x"])],
        [service("s", &["a", "b"]), service("t", &["a"])],
        [policy(
            "p",
            Dial,
            AllOf,
            &["@ann", "#x"],
            &["#a", "#b", "#all"],
        )],
    ));
    assert_eq!(index.can_dial(&id("id-ann"), "s", NOW), permit("p"));
    assert_eq!(
        index.can_dial(&id("id-ann"), "t", NOW),
        Err(Deny::NotGranted)
    );
    assert_eq!(
        index.can_dial(&id("id-bob"), "s", NOW),
        Err(Deny::NotGranted)
    );
}

#[test]
fn empty_selector_lists_grant_nothing() {
    for semantic in [AnyOf, AllOf] {
        let index = Index::build(&state(
            [agent("ann", &[])],
            [service("s", &[])],
            [
                policy("no-ids", Dial, semantic, &[], &["#all"]),
                policy("no-svcs", Dial, semantic, &["#all"], &[]),
            ],
        ));
        assert_eq!(
            index.can_dial(&id("id-ann"), "s", NOW),
            Err(Deny::NotGranted)
        );
    }
}

#[test]
fn repeated_selectors_are_harmless() {
    let index = Index::build(&state(
        [agent("ann", &["a"])],
        [service("s", &[])],
        [policy(
            "p",
            Dial,
            AnyOf,
            &["#a", "#a", "@ann"],
            &["@s", "@s"],
        )],
    ));
    assert_eq!(index.can_dial(&id("id-ann"), "s", NOW), permit("p"));
    assert_eq!(names(index.services_for(&id("id-ann"), Dial, NOW)), ["s"]);
}

#[test]
fn long_and_short_lists_meet() {
    // 300 policies reach every service; each identity is selected by one or by all of them,
    // so lookups intersect a short list with a long one both ways round.
    let policies = (0..300).map(|k| {
        let role = format!("#team-{k}");
        policy(&format!("p{k:03}"), Dial, AnyOf, &[&role], &["#all"])
    });
    let everyone = policy("q-all", Dial, AnyOf, &["#all"], &["@rare"]);
    let index = Index::build(&state(
        [agent("one", &["team-250"]), agent("many", &[])],
        [service("common", &[]), service("rare", &[])],
        policies.chain([everyone]),
    ));
    assert_eq!(index.can_dial(&id("id-one"), "common", NOW), permit("p250"));
    assert_eq!(index.can_dial(&id("id-one"), "rare", NOW), permit("p250"));
    assert_eq!(index.can_dial(&id("id-many"), "rare", NOW), permit("q-all"));
    assert_eq!(
        index.can_dial(&id("id-many"), "common", NOW),
        Err(Deny::NotGranted)
    );
}

#[test]
fn services_for_is_the_sorted_union() {
    let index = sample();
    assert_eq!(
        names(index.services_for(&id("id-bob"), Dial, NOW)),
        ["db", "llm", "notes"]
    );
    assert_eq!(names(index.services_for(&id("id-ann"), Dial, NOW)), ["llm"]);
    assert_eq!(
        names(index.services_for(&id("id-bob"), Bind, NOW)),
        ["notes"]
    );
    assert!(index.services_for(&id("id-ann"), Bind, NOW).is_empty());
}

#[test]
fn services_for_is_empty_for_inactive_identities() {
    let mut bob = agent("bob", &["ops"]);
    bob.disabled = true;
    let index = Index::build(&state(
        [bob],
        [service("s", &[])],
        [policy("p", Dial, AnyOf, &["#all"], &["#all"])],
    ));
    assert!(index.services_for(&id("id-bob"), Dial, NOW).is_empty());
}

#[test]
fn binders_are_active_identities_with_bind() {
    let mut gone = agent("gone", &["hosts"]);
    gone.revoked = true;
    let index = Index::build(&state(
        [
            agent("zed", &["hosts"]),
            agent("amy", &["hosts"]),
            agent("dialer", &["users"]),
            gone,
        ],
        [service("s", &["x"]), service("t", &[])],
        [
            policy("bind-s", Bind, AnyOf, &["#hosts"], &["#x"]),
            policy("bind-s-again", Bind, AnyOf, &["@amy"], &["@s"]),
            policy("dial-s", Dial, AnyOf, &["#users"], &["#x"]),
        ],
    ));
    let binders = index.binders_of("s", NOW);
    assert_eq!(binders, [&id("id-amy"), &id("id-zed")]);
    assert!(index.binders_of("t", NOW).is_empty());
    assert!(index.binders_of("no-such", NOW).is_empty());
}

#[test]
fn dialers_are_active_identities_with_their_granting_policies() {
    let mut gone = agent("gone", &["users"]);
    gone.revoked = true;
    let index = Index::build(&state(
        [
            agent("zed", &["users"]),
            agent("amy", &["users", "vip"]),
            gone,
        ],
        [service("s", &["x"]), service("t", &[])],
        [
            policy("dial-s", Dial, AnyOf, &["#users"], &["#x"]),
            policy("a-vip", Dial, AnyOf, &["#vip"], &["@s"]),
            policy("bind-s", Bind, AnyOf, &["#users"], &["#x"]),
        ],
    ));
    let got: Vec<(&str, &str)> = (index.dialers_of("s", NOW).into_iter())
        .map(|(i, p)| (i.name.as_str(), p.name.as_str()))
        .collect();
    assert_eq!(
        got,
        [("amy", "a-vip"), ("amy", "dial-s"), ("zed", "dial-s")]
    );
    assert!(index.dialers_of("t", NOW).is_empty());
    assert!(index.dialers_of("no-such", NOW).is_empty());
}

#[test]
fn explain_gives_the_facts_and_a_sentence() {
    let index = sample();
    let e = index.explain(&id("id-bob"), "llm", Dial, NOW);
    assert_eq!(e.identity, Some(n("bob")));
    assert!(e.service_exists);
    assert_eq!(e.granting, [n("a-ops-all"), n("p-analysts-ai")]);
    assert_eq!(e.decision, permit("a-ops-all"));
    assert_eq!(
        e.reason,
        "bob may dial \"llm\" through policy a-ops-all (1 other policy also grants it)."
    );

    let e = index.explain(&id("id-ann"), "db", Dial, NOW);
    assert_eq!(e.decision, Err(Deny::NotGranted));
    assert!(e.granting.is_empty());
    assert_eq!(e.reason, "No dial policy selects both ann and \"db\".");

    let e = index.explain(&id("id-ann"), "nope", Bind, NOW);
    assert!(!e.service_exists);
    assert_eq!(e.reason, "There is no service named \"nope\".");

    let e = index.explain(&id("ghost"), "llm", Dial, NOW);
    assert_eq!((e.identity, e.decision), (None, Err(Deny::UnknownIdentity)));
    assert_eq!(e.reason, "No identity has id \"ghost\".");
}

#[test]
fn explain_names_what_an_inactive_identity_would_get() {
    let mut ann = agent("ann", &["analysts"]);
    ann.expires_at = Some(Timestamp(10));
    let index = Index::build(&state(
        [ann],
        [service("llm", &[])],
        [policy("p", Dial, AnyOf, &["#analysts"], &["@llm"])],
    ));
    let e = index.explain(&id("id-ann"), "llm", Dial, Timestamp(20));
    assert_eq!(e.decision, Err(Deny::IdentityExpired));
    assert_eq!(e.granting, [n("p")]);
    assert_eq!(
        e.reason,
        "ann is expired (at 10, now is 20), so it may not dial \"llm\", \
         though policy p would otherwise grant it."
    );
}

#[test]
fn with_identity_revokes_without_recompiling() {
    let index = sample();
    let mut bob = index.state().identities[&id("id-bob")].clone();
    bob.revoked = true;
    let revoked = index.with_identity(bob);
    // Nothing but bob's record changed: the services' lists are the same allocations.
    let llm = |i: &Index| Arc::clone(i.services.get("llm").unwrap());
    assert!(Arc::ptr_eq(&llm(&index), &llm(&revoked)));
    let bob = |i: &Index| Arc::clone(i.identities.get(&id("id-bob")).unwrap());
    let (before, after) = (bob(&index), bob(&revoked));
    assert!(Arc::ptr_eq(&before.terms, &after.terms));
    assert_eq!(
        revoked.can_dial(&id("id-bob"), "llm", NOW),
        Err(Deny::IdentityRevoked)
    );
    assert!(revoked.state().identities[&id("id-bob")].revoked);
    // The original index is a snapshot and is unchanged.
    assert_eq!(
        index.can_dial(&id("id-bob"), "llm", NOW),
        permit("a-ops-all")
    );
    assert_eq!(
        revoked.can_dial(&id("id-ann"), "llm", NOW),
        permit("p-analysts-ai")
    );
}

#[test]
fn with_identity_recompiles_when_roles_change_or_the_identity_is_new() {
    let index = sample();
    let cid = agent("cid", &["ai-users", "analysts"]);
    let changed = index.with_identity(cid);
    assert_eq!(
        changed.can_dial(&id("id-cid"), "llm", NOW),
        permit("p-analysts-ai")
    );
    let added = index.with_identity(agent("dee", &["analysts"]));
    assert_eq!(
        added.can_dial(&id("id-dee"), "llm", NOW),
        permit("p-analysts-ai")
    );
}

#[test]
fn the_index_keeps_its_state_and_is_shareable() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Index>();
    let s = state([agent("ann", &[])], [], []);
    assert_eq!(Index::build(&s).state(), &s);
    assert!(format!("{:?}", Index::build(&s)).contains("identities: 1"));
}

#[test]
fn deny_reads_as_an_error() {
    let e: Box<dyn std::error::Error> = Box::new(Deny::NotGranted);
    assert_eq!(e.to_string(), "not granted");
}

#[test]
fn only_services_hosted_through_the_sdk_have_dialers() {
    let mut addressed = service("a", &["x"]);
    addressed.hosting = crate::Hosting::Address("backend.internal:443".parse().unwrap());
    let index = Index::build(&state(
        [agent("zed", &["users"])],
        [service("s", &["x"]), addressed],
        [policy("dial-x", Dial, AnyOf, &["#users"], &["#x"])],
    ));
    assert_eq!(index.dialers_of("s", NOW).len(), 1);
    assert!(
        index.dialers_of("a", NOW).is_empty(),
        "no host serves an address service"
    );
    assert_eq!(index.can_dial(&id("id-zed"), "a", NOW), permit("dial-x"));
}

#[test]
fn answers_stay_sorted_when_labels_run_out() {
    // Each id sorts just after "a" and before the previous one, halving the room between
    // labels every time, until every identity is relabelled.
    let mut index = Index::build(&state([agent("a", &["x"])], [], []));
    for k in 1..60 {
        let mut identity = agent(&format!("b{k}"), &["x"]);
        identity.id = id(&format!("a{}", "0".repeat(k)));
        index.apply(&crate::StateChange::IdentityPut(identity));
    }
    let everyone = policy("p", Bind, AnyOf, &["#x"], &["#all"]);
    let got = index.identities_selected_by(&everyone);
    let want: Vec<&IdentityId> = index.state().identities.keys().collect();
    assert_eq!(got.len(), 60);
    assert_eq!(got, want);
}
