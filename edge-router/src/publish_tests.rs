//! A compilation in the background loses no batch that arrives while it runs, and a revocation
//! among those batches is enforced at once, not when the compilation ends.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use umbra_pki::{PeerCert, Serial, SpiffeId, TrustDomain};
use umbra_policies::{
    Action, Hosting, Identity, IdentityId, IdentityKind, Name, Selector, Semantic, Service,
    ServicePolicy, State, Timestamp,
};
use umbra_proto::follow::{ControlFollower, Output};
use umbra_proto::snapshot::SnapshotMessages;
use umbra_proto::{ChangeEvent, ControlMessage, Delta, Replica, RevokedCert};

use super::*;
use crate::policy::PolicyRx;

const NOW: Timestamp = Timestamp(500);

fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn agent(name: &str, role: &str, revoked: bool) -> Identity {
    Identity {
        id: IdentityId::new(format!("id-{name}")).unwrap(),
        name: n(name),
        kind: IdentityKind::Agent,
        roles: [n(role)].into_iter().collect(),
        disabled: false,
        revoked,
        expires_at: None,
    }
}

fn service(name: &str) -> Service {
    Service {
        name: n(name),
        roles: Default::default(),
        hosting: Hosting::Sdk,
        intercepts: vec![],
        proxy_protocol: false,
    }
}

fn grant(name: &str, role: &str, service: &str) -> ServicePolicy {
    ServicePolicy {
        name: n(name),
        action: Action::Dial,
        semantic: Semantic::AnyOf,
        identities: vec![Selector::Role(n(role))],
        services: vec![Selector::Named(n(service))],
        limits: Default::default(),
    }
}

/// Agents `a` (role `in`) and `b` (role `out`), services `s` and `t`, `in` may dial `s`.
fn replica(seq: u64) -> Replica {
    let mut state = State::default();
    for i in [agent("a", "in", false), agent("b", "out", false)] {
        state.identities.insert(i.id.clone(), i);
    }
    for s in [service("s"), service("t")] {
        state.services.insert(s.name.clone(), s);
    }
    let p = grant("p", "in", "s");
    state.policies.insert(p.name.clone(), p);
    Replica {
        epoch: "e".into(),
        seq,
        state,
        ..Replica::default()
    }
}

fn peer(name: &str, serial: u8) -> PeerCert {
    let td = TrustDomain::new("test.umbra").unwrap();
    PeerCert {
        spiffe: SpiffeId::new(&td, IdentityKind::Agent, &n(name)),
        serial: Serial::from_bytes(&[serial]),
        not_before: Timestamp(0),
        not_after: Timestamp(1000),
    }
}

fn can_dial(p: &Policy, who: &str, service: &str) -> bool {
    let id = IdentityId::new(format!("id-{who}")).unwrap();
    p.index.can_dial(&id, service, NOW).is_ok()
}

/// Feeds a session's messages, then carries out what the machine asks.
fn feed(
    machine: &mut ControlFollower,
    publisher: &mut Publisher,
    msgs: impl IntoIterator<Item = ControlMessage>,
) {
    let now = Instant::now();
    for m in msgs {
        machine.handle(m, now).unwrap();
    }
    machine.flush();
    while let Some(out) = machine.poll() {
        match out {
            Output::Publish => publisher.publish(machine),
            Output::Withdraw => publisher.withdraw(),
            Output::Close(e) => panic!("closed: {e}"),
        }
    }
}

fn snapshot(seq: u64) -> Vec<ControlMessage> {
    let hello = ControlMessage::Hello {
        version: umbra_proto::CONTROL_PROTOCOL_VERSION,
        epoch: "e".into(),
    };
    std::iter::once(hello)
        .chain(SnapshotMessages::new(replica(seq)))
        .collect()
}

fn delta(seq: u64, change: ChangeEvent) -> ControlMessage {
    ControlMessage::Delta(Box::new(Delta {
        seq,
        at: Timestamp(1),
        change,
        last_in_commit: true,
    }))
}

fn setup() -> (ControlFollower, Publisher, PolicyRx) {
    let mut machine = ControlFollower::new(Duration::from_secs(30)).unwrap();
    machine.session_started(Instant::now());
    let (tx, rx) = watch::channel(None);
    let publisher = Publisher::new(
        tx,
        umbra_clock::ManualClock::new(std::time::UNIX_EPOCH + Duration::from_secs(NOW.0)).clock(),
    );
    (machine, publisher, rx)
}

async fn finish(machine: &mut ControlFollower, publisher: &mut Publisher) {
    let built = tokio::time::timeout(Duration::from_secs(30), publisher.built())
        .await
        .unwrap();
    publisher.finished(built, machine);
}

#[tokio::test]
async fn batches_during_a_compilation_are_in_what_it_publishes() {
    let (mut machine, mut publisher, rx) = setup();
    feed(&mut machine, &mut publisher, snapshot(10));
    // The compilation runs; two commits arrive meanwhile.
    let revoke = ChangeEvent::CertRevoked {
        cert: RevokedCert {
            serial: Serial::from_bytes(&[7]).as_str().to_owned(),
            identity: IdentityId::new("id-a").unwrap(),
            not_after: Timestamp(900),
        },
    };
    let widen = ChangeEvent::PolicyPut {
        policy: grant("q", "out", "t"),
    };
    feed(&mut machine, &mut publisher, [delta(11, revoke)]);
    feed(&mut machine, &mut publisher, [delta(12, widen)]);
    assert!(
        rx.borrow().is_none(),
        "nothing enforced before the first compilation"
    );
    finish(&mut machine, &mut publisher).await;

    let p = rx.borrow().clone().unwrap();
    assert_eq!(p.seq, 12);
    assert!(p.is_revoked(&Serial::from_bytes(&[7])));
    assert!(p.admit(&peer("a", 7), NOW).is_err());
    assert!(p.admit(&peer("a", 8), NOW).is_ok());
    assert!(
        can_dial(&p, "b", "t"),
        "the commit after the copy is in the result"
    );
    assert!(can_dial(&p, "a", "s"));
    let fresh = Policy::build(machine.replica().unwrap());
    for (who, svc) in [("a", "s"), ("a", "t"), ("b", "s"), ("b", "t")] {
        assert_eq!(
            can_dial(&p, who, svc),
            can_dial(&fresh, who, svc),
            "{who} → {svc}"
        );
    }
}

#[tokio::test]
async fn a_revocation_during_a_compilation_is_enforced_at_once() {
    let (mut machine, mut publisher, rx) = setup();
    feed(&mut machine, &mut publisher, snapshot(10));
    finish(&mut machine, &mut publisher).await;
    assert_eq!(rx.borrow().as_ref().unwrap().seq, 10);

    // A new session with a snapshot: a compilation starts, the old policy stays enforced.
    machine.session_ended(&umbra_proto::follow::SessionEnd::Eof, 0);
    machine.session_started(Instant::now());
    feed(&mut machine, &mut publisher, snapshot(20));
    let revoke = ChangeEvent::IdentityPut {
        identity: agent("a", "in", true),
    };
    let widen = ChangeEvent::PolicyPut {
        policy: grant("q", "out", "t"),
    };
    feed(
        &mut machine,
        &mut publisher,
        [delta(21, revoke), delta(22, widen)],
    );
    {
        let p = rx.borrow().clone().unwrap();
        assert!(
            p.admit(&peer("a", 1), NOW).is_err(),
            "revoked before the compilation ends"
        );
        assert!(!can_dial(&p, "a", "s"));
        assert!(!can_dial(&p, "b", "t"), "a grant waits for the compilation");
        assert!(p.admit(&peer("b", 1), NOW).is_ok(), "the rest is as it was");
    }
    finish(&mut machine, &mut publisher).await;
    let p = rx.borrow().clone().unwrap();
    assert_eq!(p.seq, 22);
    assert!(p.admit(&peer("a", 1), NOW).is_err());
    assert!(can_dial(&p, "b", "t"));
}

#[tokio::test]
async fn a_snapshot_during_a_compilation_is_compiled_next() {
    let (mut machine, mut publisher, rx) = setup();
    feed(&mut machine, &mut publisher, snapshot(10));
    machine.session_ended(&umbra_proto::follow::SessionEnd::Eof, 0);
    machine.session_started(Instant::now());
    // The second copy replaces the first before the first compilation is done.
    let mut second = snapshot(30);
    second.push(delta(
        31,
        ChangeEvent::PolicyPut {
            policy: grant("q", "out", "t"),
        },
    ));
    feed(&mut machine, &mut publisher, second);
    finish(&mut machine, &mut publisher).await;
    assert!(
        rx.borrow().is_none(),
        "an out-of-date compilation is not enforced"
    );
    finish(&mut machine, &mut publisher).await;
    let p = rx.borrow().clone().unwrap();
    assert_eq!(p.seq, 31);
    assert!(can_dial(&p, "b", "t"));
}
