use std::collections::BTreeMap;

use super::*;
use crate::model::{Semantic, State};
use crate::testing::{agent, id, n, policy, service, state};

/// A roster over a state: by a router's rules (revocations only) or a controller's (every
/// issued certificate, `issued` is `Some`).
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

fn cert<'a>(name: &'a str, kind: IdentityKind, serial: &'a str) -> Presented<'a> {
    Presented {
        name,
        kind,
        serial,
        identity: None,
        not_after: Timestamp(1_000),
    }
}

fn book(issued: bool) -> Book {
    let mut off = agent("off", &[]);
    off.disabled = true;
    let mut old = agent("old", &[]);
    old.expires_at = Some(Timestamp(50));
    let mut gone = agent("gone", &[]);
    gone.revoked = true;
    let mut admin = agent("root", &[]);
    admin.kind = IdentityKind::Admin;
    let state = state([agent("a", &[]), off, old, gone, admin], [], []);
    let owners = [
        ("1", "id-a"),
        ("2", "id-off"),
        ("3", "id-old"),
        ("4", "id-gone"),
        ("5", "id-root"),
        // Issued to an `a` that was deleted; the `a` above was created again since.
        ("7", "id-a-before"),
    ];
    Book {
        state,
        revoked: [("9".to_owned(), id("id-a"))].into(),
        issued: issued.then(|| owners.iter().map(|(s, o)| (s.to_string(), id(o))).collect()),
    }
}

const NOW: Timestamp = Timestamp(10);
const AGENT: Option<IdentityKind> = Some(IdentityKind::Agent);

#[test]
fn admits_only_active_identities_of_the_doors_kind() {
    for issued in [false, true] {
        let b = book(issued);
        let got = admit(&b, &cert("a", IdentityKind::Agent, "1"), AGENT, NOW);
        assert_eq!(got.map(|i| i.name.as_str()), Ok("a"));
        let refused = |name, kind, serial, door, now| {
            admit(&b, &cert(name, kind, serial), door, now).map(|i| i.name.clone())
        };
        use IdentityKind::{Admin, Agent};
        assert_eq!(refused("a", Agent, "9", AGENT, NOW), Err(Deny::CertRevoked));
        assert_eq!(
            refused("ghost", Agent, "1", AGENT, NOW),
            Err(Deny::UnknownIdentity)
        );
        // A certificate of another kind with the same name is not that identity.
        assert_eq!(
            refused("a", Admin, "1", AGENT, NOW),
            Err(Deny::UnknownIdentity)
        );
        assert_eq!(
            refused("root", Admin, "5", AGENT, NOW),
            Err(Deny::WrongKind)
        );
        assert!(refused("root", Admin, "5", Some(Admin), NOW).is_ok());
        assert!(refused("root", Admin, "5", None, NOW).is_ok());
        assert_eq!(
            refused("off", Agent, "2", AGENT, NOW),
            Err(Deny::IdentityDisabled)
        );
        assert_eq!(
            refused("gone", Agent, "4", AGENT, NOW),
            Err(Deny::IdentityRevoked)
        );
        assert!(refused("old", Agent, "3", AGENT, NOW).is_ok());
        let late = Timestamp(50);
        assert_eq!(
            refused("old", Agent, "3", AGENT, late),
            Err(Deny::IdentityExpired)
        );
    }
}

#[test]
fn a_namesakes_certificate_is_not_this_identitys() {
    // With a record of issued certificates, the owner decides.
    let controller = book(true);
    let earlier = cert("a", IdentityKind::Agent, "7");
    assert_eq!(
        admit(&controller, &earlier, AGENT, NOW),
        Err(Deny::UnknownIdentity)
    );
    // A certificate this party never issued is nobody's.
    let foreign = cert("a", IdentityKind::Agent, "8");
    assert_eq!(
        admit(&controller, &foreign, AGENT, NOW),
        Err(Deny::UnknownIdentity)
    );
    // A certificate that names its identity id is checked against it, by every party.
    let router = book(false);
    let before = id("id-a-before");
    let named = Presented {
        identity: Some(&before),
        ..cert("a", IdentityKind::Agent, "8")
    };
    assert_eq!(
        admit(&router, &named, AGENT, NOW),
        Err(Deny::UnknownIdentity)
    );
    let own = id("id-a");
    let named = Presented {
        identity: Some(&own),
        ..named
    };
    assert!(admit(&router, &named, AGENT, NOW).is_ok());
}

#[test]
fn a_connection_ends_at_the_earlier_expiry() {
    let mut a = agent("a", &[]);
    let c = cert("a", IdentityKind::Agent, "1");
    assert_eq!(
        admitted_until(&a, &c),
        (Timestamp(1_000), Deny::CertExpired)
    );
    a.expires_at = Some(Timestamp(400));
    assert_eq!(
        admitted_until(&a, &c),
        (Timestamp(400), Deny::IdentityExpired)
    );
    a.expires_at = Some(Timestamp(4_000));
    assert_eq!(
        admitted_until(&a, &c),
        (Timestamp(1_000), Deny::CertExpired)
    );
}

#[test]
fn a_permit_carries_the_target_and_the_policy() {
    let mut web = service("web", &[]);
    web.hosting = Hosting::Address("10.0.0.1:80".parse().unwrap());
    web.proxy_protocol = true;
    let state = state(
        [agent("a", &[])],
        [web, service("chat", &[]), service("secret", &[])],
        [
            policy(
                "p-web",
                Action::Dial,
                Semantic::AnyOf,
                &["@a"],
                &["@web", "@chat"],
            ),
            policy("p-host", Action::Bind, Semantic::AnyOf, &["@a"], &["@chat"]),
        ],
    );
    let index = Index::build(&state);
    let a = id("id-a");
    let web = check_stream(&index, &a, StreamRequest::Dial("web"), NOW);
    assert_eq!(
        web,
        Ok(StreamPermit {
            policy: n("p-web"),
            target: Target::Address {
                address: "10.0.0.1:80".parse().unwrap(),
                proxy_protocol: true,
            },
        })
    );
    let chat = check_stream(&index, &a, StreamRequest::Dial("chat"), NOW);
    assert_eq!(chat.map(|p| p.target), Ok(Target::SdkHost));
    let host = check_stream(&index, &a, StreamRequest::Bind("chat"), NOW);
    assert_eq!(
        host,
        Ok(StreamPermit {
            policy: n("p-host"),
            target: Target::Host
        })
    );
    for (request, who) in [
        (StreamRequest::Dial("secret"), "id-a"),
        (StreamRequest::Dial("ghost"), "id-a"),
        (StreamRequest::Bind("web"), "id-a"),
    ] {
        let got = check_stream(&index, &id(who), request, NOW);
        assert_eq!(got, Err(Deny::NotGranted), "{request:?}");
    }
    let got = check_stream(&index, &id("nobody"), StreamRequest::Dial("web"), NOW);
    assert_eq!(got, Err(Deny::UnknownIdentity));
}

/// Grants that permit everything but know no services: a view caught between two updates.
struct Torn;

impl Grants for Torn {
    fn grant(&self, _: Action, _: &IdentityId, _: &str, _: Timestamp) -> Result<Permit, Deny> {
        Ok(Permit { policy: n("p") })
    }
    fn service(&self, _: &str) -> Option<&Service> {
        None
    }
}

#[test]
fn a_granted_service_without_hosting_is_refused() {
    let got = check_stream(&Torn, &id("id-a"), StreamRequest::Dial("web"), NOW);
    assert_eq!(got, Err(Deny::NoHosting));
    let bind = check_stream(&Torn, &id("id-a"), StreamRequest::Bind("web"), NOW);
    assert_eq!(bind.map(|p| p.target), Ok(Target::Host));
}
