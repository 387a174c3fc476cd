//! The write gate in `Controller::commit`, on a real store: what the core refuses is never
//! written, and a problem a store already had blocks only the writes that add to it.

use super::*;
use umbra_policies::{HostPort, Hosting};

fn service(name: &str, intercept: &str) -> Service {
    Service {
        name: parse_name(name).unwrap(),
        roles: Default::default(),
        hosting: Hosting::Sdk,
        intercepts: vec![intercept.parse::<HostPort>().unwrap()],
        proxy_protocol: false,
    }
}

fn controller(dir: &Path) -> Controller {
    let cfg = ControllerConfig::new(dir.join("ctrl"));
    let td: TrustDomain = "test.umbra".parse().unwrap();
    init(&cfg, &td, "127.0.0.1:1").unwrap();
    Controller::open(cfg).unwrap()
}

#[test]
fn a_refused_batch_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ctrl = controller(dir.path());
    let actor = Actor::controller();
    ctrl.create_service(&actor, service("one", "x.umbra:443"))
        .unwrap();
    let before = (ctrl.state(), ctrl.lock().replica.seq);
    let e = ctrl
        .create_service(&actor, service("two", "X.umbra:443"))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "intercept x.umbra:443 is already used by service one"
    );
    assert!(matches!(e, ControllerError::Conflict(_)));
    assert_eq!((ctrl.state(), ctrl.lock().replica.seq), before);
    // Nothing reached the store either.
    drop(ctrl);
    let again = Controller::open(ControllerConfig::new(dir.path().join("ctrl"))).unwrap();
    assert_eq!(again.state(), before.0);
}

#[test]
fn an_old_problem_blocks_only_writes_that_add_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let ctrl = controller(dir.path());
    let actor = Actor::controller();
    // A store written before the rule existed: two services on one intercept, stored without
    // going through the gate.
    {
        let mut inner = ctrl.lock();
        let mut batch = Batch::default();
        for s in [service("one", "x.umbra:443"), service("two", "x.umbra:443")] {
            batch.changes.push(ChangeEvent::ServicePut { service: s });
        }
        let seq = inner.replica.seq;
        for d in inner.store.commit(&batch, seq, Timestamp(1)).unwrap() {
            inner.replica.apply_change(&d.change);
            inner.replica.seq = d.seq;
        }
    }
    // Opened again, as such a store would be.
    drop(ctrl);
    let ctrl = Controller::open(ControllerConfig::new(dir.path().join("ctrl"))).unwrap();
    assert!(ctrl.state().validate().is_err());
    // Unrelated writes go through.
    ctrl.insert_identity(
        &actor,
        parse_name("agent-1").unwrap(),
        IdentityKind::Agent,
        Default::default(),
    )
    .unwrap();
    // A third service on the same intercept is refused.
    let e = ctrl
        .create_service(&actor, service("three", "x.umbra:443"))
        .unwrap_err();
    assert!(matches!(e, ControllerError::Conflict(_)), "{e}");
    // Removing one of the two fixes the state.
    ctrl.delete_service(&actor, "two", false).unwrap();
    ctrl.state().validate().unwrap();
}
