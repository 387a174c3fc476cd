//! Properties of edge-view diffs and of the reader of `GET /v1/edge/watch`: a diff applied to
//! the view it was made from gives the new view exactly, an empty diff means equal views, what
//! is sent survives the wire, and a frame that does not fit ends the watch instead of leaving a
//! wrong view. Arbitrary bytes never panic the reader.

use proptest::prelude::*;
use umbra_policies::{GrantLimits, HostPort, IdentityId, Name, Rpm};
use umbra_proto::api::{EdgeFrame, EdgeService, EdgeView, EdgeViewDiff, GrantKey, HostedGrant};
use umbra_proto::edge::{DiffError, EdgeWatchDecoder, WatchError};
use umbra_proto::{encode, RouterInfo, KEEPALIVE};

fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn id(s: &str) -> IdentityId {
    IdentityId::new(s).unwrap()
}

/// Small pools, so that two random views share most of what they name.
const SERVICES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
const CALLERS: [&str; 5] = ["c1", "c2", "c3", "c4", "c5"];
const POLICIES: [&str; 3] = ["p1", "p2", "p3"];

fn limits() -> impl Strategy<Value = GrantLimits> {
    prop_oneof![
        Just(GrantLimits::default()),
        (1u32..3).prop_map(|r| GrantLimits {
            rpm: Some(Rpm::try_from(r).unwrap()),
            ..GrantLimits::default()
        }),
    ]
}

fn grant() -> impl Strategy<Value = HostedGrant> {
    // The caller's name usually follows its id, but may change (a renamed identity).
    (0..CALLERS.len(), 0..POLICIES.len(), any::<bool>(), limits()).prop_map(
        |(c, p, renamed, limits)| HostedGrant {
            identity: id(CALLERS[c]),
            name: n(&format!("{}{}", CALLERS[c], if renamed { "x" } else { "" })),
            policy: n(POLICIES[p]),
            limits,
        },
    )
}

fn service() -> impl Strategy<Value = EdgeService> {
    (
        0..SERVICES.len(),
        prop::collection::vec(0u16..3, 0..3),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(grant(), 0..6),
    )
        .prop_map(|(s, ports, dial, bind, grants)| EdgeService {
            name: n(SERVICES[s]),
            intercepts: (ports.into_iter())
                .map(|p| HostPort::new("svc.umbra", 440 + p).unwrap())
                .collect(),
            dial,
            bind,
            grants,
        })
}

fn router() -> impl Strategy<Value = RouterInfo> {
    (0u8..3, any::<bool>()).prop_map(|(r, addressed)| RouterInfo {
        id: id(&format!("r{r}")),
        name: n(&format!("r{r}")),
        advertise: addressed.then(|| format!("127.0.0.1:{}", 4433 + u16::from(r))),
    })
}

/// A canonical view with unique service names and grant keys, as the controller makes them.
fn view() -> impl Strategy<Value = EdgeView> {
    (
        prop::collection::vec(router(), 0..3),
        prop::collection::vec(service(), 0..6),
    )
        .prop_map(|(routers, services)| {
            let mut seen = std::collections::HashSet::new();
            let mut services: Vec<EdgeService> = (services.into_iter())
                .filter(|s| seen.insert(s.name.clone()))
                .collect();
            for s in &mut services {
                let mut keys = std::collections::HashSet::new();
                s.grants.retain(|g| keys.insert(g.key()));
            }
            let mut v = EdgeView { routers, services };
            v.canonicalize();
            v
        })
}

fn frames(frames: &[EdgeFrame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out.extend(encode(f).unwrap());
        out.extend(KEEPALIVE);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn applying_the_diff_gives_the_new_view(old in view(), new in view()) {
        let diff = EdgeView::diff(&old, &new);
        let mut got = old.clone();
        got.apply(&diff).unwrap();
        prop_assert_eq!(&got, &new);
        prop_assert_eq!(diff.is_empty(), old == new, "empty exactly when nothing changed");
    }

    #[test]
    fn a_diff_carries_only_what_changed(old in view(), new in view()) {
        let diff = EdgeView::diff(&old, &new);
        for s in &diff.put {
            if old.services.iter().any(|o| o.name == s.name) {
                prop_assert!(s.grants.is_empty(), "a changed service comes without its grants");
            }
        }
        for g in &diff.grants {
            let was = old.services.iter().find(|o| o.name == g.service);
            prop_assert!(was.is_some(), "grant changes only for services held before");
            let was = was.unwrap();
            for added in &g.added {
                prop_assert!(!was.grants.contains(added), "an unchanged grant is not sent");
            }
        }
    }

    #[test]
    fn a_watch_rebuilds_every_view(views in prop::collection::vec(view(), 1..6), split in any::<prop::sample::Index>()) {
        let mut sent = vec![EdgeFrame::View(views[0].clone())];
        for w in views.windows(2) {
            let d = EdgeView::diff(&w[0], &w[1]);
            if !d.is_empty() {
                sent.push(EdgeFrame::Diff(d));
            }
        }
        let bytes = frames(&sent);
        let at = split.index(bytes.len() + 1);
        let mut dec = EdgeWatchDecoder::new(1 << 20);
        let mut got = Vec::new();
        for chunk in [&bytes[..at], &bytes[at..]] {
            dec.push(chunk);
            while let Some(v) = dec.next().unwrap() {
                got.push(v.clone());
            }
        }
        let mut want = views.clone();
        want.dedup();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn a_diff_for_another_view_fails_or_is_exact(old in view(), other in view(), new in view()) {
        // Applied to a view it was not made from, a diff either fails (the watch is reopened)
        // or the result is what a whole view would have said about everything it touched.
        let diff = EdgeView::diff(&other, &new);
        let mut got = old.clone();
        if got.apply(&diff).is_ok() {
            for s in &diff.put {
                let mine = got.services.iter().find(|x| x.name == s.name);
                prop_assert!(mine.is_some());
                let mine = mine.unwrap();
                prop_assert_eq!((&mine.intercepts, mine.dial, mine.bind), (&s.intercepts, s.dial, s.bind));
            }
            for r in &diff.removed {
                prop_assert!(got.services.iter().all(|x| &x.name != r));
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), split in any::<prop::sample::Index>()) {
        let at = split.index(bytes.len() + 1);
        let mut dec = EdgeWatchDecoder::new(256);
        for chunk in [&bytes[..at], &bytes[at..]] {
            dec.push(chunk);
            while let Ok(Some(_)) = dec.next() {}
        }
    }
}

fn hosted(grants: &[(&str, &str)]) -> EdgeService {
    EdgeService {
        name: n("llm"),
        intercepts: vec![],
        dial: false,
        bind: true,
        grants: (grants.iter())
            .map(|(c, p)| HostedGrant {
                identity: id(c),
                name: n(c),
                policy: n(p),
                limits: GrantLimits::default(),
            })
            .collect(),
    }
}

#[test]
fn one_new_dialer_is_one_grant_on_the_wire() {
    let old = EdgeView {
        routers: vec![],
        services: vec![hosted(&[("c1", "p1"), ("c3", "p1")])],
    };
    let new = EdgeView {
        routers: vec![],
        services: vec![hosted(&[("c1", "p1"), ("c2", "p1"), ("c3", "p1")])],
    };
    let diff = EdgeView::diff(&old, &new);
    assert!(diff.put.is_empty() && diff.removed.is_empty() && diff.routers.is_none());
    assert_eq!(diff.grants.len(), 1);
    assert!(diff.grants[0].removed.is_empty());
    assert_eq!(diff.grants[0].added.len(), 1);
    assert_eq!(diff.grants[0].added[0].identity.as_str(), "c2");
    let wire = String::from_utf8(encode(&EdgeFrame::Diff(diff)).unwrap()[4..].to_vec()).unwrap();
    assert!(wire.starts_with(r#"{"diff":"#), "{wire}");
    assert!(!wire.contains("c1") && !wire.contains("c3"), "{wire}");
}

#[test]
fn frames_that_do_not_fit_end_the_watch() {
    let base = EdgeView {
        routers: vec![],
        services: vec![hosted(&[("c1", "p1")])],
    };
    let cases: Vec<(EdgeViewDiff, DiffError)> = vec![
        (
            EdgeViewDiff {
                removed: vec![n("nope")],
                ..Default::default()
            },
            DiffError::NoSuchService(n("nope")),
        ),
        (
            EdgeViewDiff {
                put: vec![hosted(&[("c2", "p1")])],
                ..Default::default()
            },
            DiffError::GrantsOnChange(n("llm")),
        ),
        (
            EdgeViewDiff {
                grants: vec![umbra_proto::api::GrantChanges {
                    service: n("llm"),
                    removed: vec![GrantKey {
                        identity: id("c9"),
                        policy: n("p1"),
                    }],
                    added: vec![],
                }],
                ..Default::default()
            },
            DiffError::NoSuchGrant {
                service: n("llm"),
                key: GrantKey {
                    identity: id("c9"),
                    policy: n("p1"),
                },
            },
        ),
        (
            EdgeViewDiff {
                grants: vec![umbra_proto::api::GrantChanges {
                    service: n("llm"),
                    removed: vec![],
                    added: hosted(&[("c1", "p1")]).grants,
                }],
                ..Default::default()
            },
            DiffError::GrantExists {
                service: n("llm"),
                key: GrantKey {
                    identity: id("c1"),
                    policy: n("p1"),
                },
            },
        ),
        (
            EdgeViewDiff {
                grants: vec![umbra_proto::api::GrantChanges {
                    service: n("other"),
                    removed: vec![],
                    added: vec![],
                }],
                ..Default::default()
            },
            DiffError::GrantsOfMissing(n("other")),
        ),
    ];
    for (diff, want) in cases {
        assert_eq!(base.clone().apply(&diff), Err(want.clone()));
        let mut dec = EdgeWatchDecoder::new(1 << 20);
        dec.push(&frames(&[
            EdgeFrame::View(base.clone()),
            EdgeFrame::Diff(diff),
            EdgeFrame::View(base.clone()),
        ]));
        assert_eq!(dec.next().unwrap(), Some(&base));
        match dec.next() {
            Err(WatchError::Diff(e)) => assert_eq!(e, want),
            other => panic!("{other:?}"),
        }
        assert!(
            dec.next().unwrap().is_none(),
            "after a bad frame nothing more is read: the watch is opened again"
        );
    }
    // A diff before any whole view has nothing to apply to.
    let mut dec = EdgeWatchDecoder::new(1 << 20);
    dec.push(&frames(&[EdgeFrame::Diff(EdgeViewDiff {
        routers: Some(vec![]),
        ..Default::default()
    })]));
    assert!(matches!(dec.next(), Err(WatchError::NoBase)));
}

#[test]
fn frames_refuse_unknown_fields_and_kinds() {
    for bad in [
        r#"{"diff":{"removed":[],"extra":1}}"#,
        r#"{"whole":{"routers":[],"services":[]}}"#,
        r#"{"view":{"routers":[],"services":[]},"diff":{}}"#,
    ] {
        assert!(serde_json::from_str::<EdgeFrame>(bad).is_err(), "{bad}");
    }
}
