//! What a refused peer is told, end to end: the real controller and router, and raw QUIC
//! clients that read the exact status bytes, stream codes and close codes. Every answer comes
//! from one mapping (`umbra_proto::verdict`) of the core's reasons (`umbra_policies::Deny`), so
//! one reason reads the same on the connect path and when a policy change ends what was open,
//! and a missing service reads exactly like an ungranted one.

use std::time::Duration;

use quinn::{Connection, ConnectionError, ReadError, RecvStream};
use umbra_controller::Actor;
use umbra_edge_router::RouterHandle;
use umbra_pki::IdentityFile;
use umbra_policies::IdentityKind;
use umbra_proto::stream::{codes, Status};
use umbra_tests::dataplane::{
    agent, agent_raw_client, echo_service, name, raw_dial, raw_echo, revoke_identity,
    revoke_policy, service, start_router, Echo,
};
use umbra_tests::{eventually, TestController};

const BOUND: Duration = Duration::from_secs(15);
/// The QUIC code of a TLS `certificate_revoked` alert (CRYPTO_ERROR 0x100 + alert 44).
const TLS_REVOKED: u64 = 0x100 + 44;

/// An admitted connection presenting `identity`.
async fn connect(router: &RouterHandle, identity: &IdentityFile) -> Connection {
    let (ep, cfg) = agent_raw_client(identity);
    let connecting = ep.connect_with(cfg, router.local_addr(), "router.umbra");
    tokio::time::timeout(BOUND, connecting.expect("connect"))
        .await
        .expect("timely")
        .expect("admitted")
}

/// How a connection attempt presenting `identity` ends: a TLS alert code if the handshake
/// refused it, or the application close code if it was admitted and then closed.
async fn refused_how(router: &RouterHandle, identity: &IdentityFile) -> u64 {
    let (ep, cfg) = agent_raw_client(identity);
    let connecting = ep
        .connect_with(cfg, router.local_addr(), "router.umbra")
        .expect("connect");
    let ended = async {
        match connecting.await {
            Err(e) => e,
            Ok(conn) => conn.closed().await,
        }
    };
    match tokio::time::timeout(BOUND, ended).await.expect("ended") {
        ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        ConnectionError::TransportError(t) => u64::from(t.code),
        ConnectionError::ApplicationClosed(c) => c.error_code.into_inner(),
        other => panic!("unexpected end: {other}"),
    }
}

/// The code and reason a connection was closed with by the router.
async fn closed_with(conn: &Connection) -> (u32, Vec<u8>) {
    let ended = tokio::time::timeout(BOUND, conn.closed())
        .await
        .expect("the router closes the connection");
    match ended {
        ConnectionError::ApplicationClosed(c) => (
            u32::try_from(c.error_code.into_inner()).expect("a u32 code"),
            c.reason.to_vec(),
        ),
        other => panic!("expected the router's close, got {other}"),
    }
}

/// A refused request: its status and the code the router stopped our side with.
async fn refused_request(conn: &Connection, svc: &str) -> (Status, u32) {
    let (status, send, _recv) = raw_dial(conn, svc).await;
    let stopped = tokio::time::timeout(BOUND, send.stopped())
        .await
        .expect("timely")
        .expect("stopped")
        .expect("with a code");
    (status, u32::try_from(stopped.into_inner()).expect("u32"))
}

/// The code an open stream was reset with by the router.
async fn reset_with(recv: &mut RecvStream) -> u32 {
    let mut buf = [0u8; 1024];
    let reset = tokio::time::timeout(BOUND, async {
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(_)) => continue,
                Err(ReadError::Reset(code)) => return code,
                other => panic!("expected a reset, got {other:?}"),
            }
        }
    })
    .await
    .expect("the router resets the stream");
    u32::try_from(reset.into_inner()).expect("u32")
}

/// Disables `who` declaratively (there is no other command for it) and waits for the router.
async fn disable(t: &TestController, router: &RouterHandle, who: &str) {
    let mut doc = umbra_policies::export(&t.ctrl.state());
    doc.identities
        .iter_mut()
        .find(|i| i.name.as_str() == who)
        .expect("exported")
        .disabled = true;
    t.ctrl
        .apply(&Actor::controller(), doc.to_yaml(), false)
        .expect("apply");
    let seen = eventually(BOUND, || {
        let p = router.policy().borrow().clone()?;
        (p.index.state().identities.values())
            .any(|i| i.name.as_str() == who && i.disabled)
            .then_some(())
    })
    .await;
    assert!(seen.is_some(), "the router learns that {who} is disabled");
}

#[tokio::test]
async fn a_missing_service_and_an_ungranted_one_read_the_same_on_both_paths() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "kept", "agent-1").await;
    echo_service(&t, &echo, "ungranted", "agent-1").await;
    echo_service(&t, &echo, "deleted", "agent-1").await;
    service(&t, "secret", echo.hosting()).await;
    let conn = connect(&router, &a).await;

    // Asking: a missing and an ungranted service get the same status and the same code.
    let missing = refused_request(&conn, "ghost").await;
    let ungranted = refused_request(&conn, "secret").await;
    assert_eq!(missing, (Status::Denied, codes::DENIED));
    assert_eq!(ungranted, missing);

    // Open: a withdrawn grant and a deleted service end their streams the same way.
    let (_s1, mut withdrawn) = raw_echo(&conn, "ungranted").await;
    let (_s2, mut gone) = raw_echo(&conn, "deleted").await;
    let (mut s3, mut kept) = raw_echo(&conn, "kept").await;
    revoke_policy(&t, "agent-1-ungranted").await;
    assert_eq!(reset_with(&mut withdrawn).await, codes::REVOKED);
    t.ctrl
        .delete_service(&Actor::controller(), "deleted", true)
        .expect("delete the service and its policy");
    assert_eq!(reset_with(&mut gone).await, codes::REVOKED);
    // And after: both are refused like a service that never existed.
    assert_eq!(refused_request(&conn, "ungranted").await, missing);
    assert_eq!(refused_request(&conn, "deleted").await, missing);

    // The connection and the granted stream are untouched.
    s3.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    kept.read_exact(&mut back).await.expect("still echoes");
    assert_eq!(router.stats().connections_terminated, 0);
    assert_eq!(router.stats().streams_terminated, 2);
    router.shutdown().await;
}

#[tokio::test]
async fn a_revoked_identity_is_told_revoked_on_every_path() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let conn = connect(&router, &a).await;
    let (_send, mut recv) = raw_echo(&conn, "echo").await;

    revoke_identity(&t, "agent-1").await;
    assert_eq!(reset_with(&mut recv).await, codes::REVOKED);
    assert_eq!(
        closed_with(&conn).await,
        (codes::REVOKED, b"revoked".to_vec())
    );
    // Connecting again: refused at the handshake, and told it is revoked.
    assert_eq!(refused_how(&router, &a).await, TLS_REVOKED);
    assert_eq!(router.stats().connections_terminated, 1);
    router.shutdown().await;
}

#[tokio::test]
async fn a_disabled_identity_is_denied_not_revoked_on_every_path() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let conn = connect(&router, &a).await;
    let (_send, mut recv) = raw_echo(&conn, "echo").await;

    // Before, a policy change closed everything it refused as "revoked", while the same
    // identity connecting was "denied".
    disable(&t, &router, "agent-1").await;
    assert_eq!(reset_with(&mut recv).await, codes::DENIED);
    assert_eq!(closed_with(&conn).await, (codes::DENIED, Vec::new()));
    // Connecting again: refused at the handshake, not as revoked.
    let again = refused_how(&router, &a).await;
    assert!((0x100..0x200).contains(&again), "a TLS refusal: {again:#x}");
    assert_ne!(again, TLS_REVOKED);
    assert_eq!(router.stats().connections_terminated, 1);
    router.shutdown().await;
}

#[tokio::test]
async fn a_deleted_namesakes_certificate_is_refused_by_router_and_controller() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let before = agent(&t, "agent-1").await;
    t.ctrl
        .delete_identity(&Actor::controller(), "agent-1", true, None)
        .expect("delete");
    let after = agent(&t, "agent-1").await;
    assert_ne!(before.id, after.id, "a new identity of the same name");
    echo_service(&t, &echo, "echo", "agent-1").await;
    let granted = eventually(BOUND, || {
        let p = router.policy().borrow().clone()?;
        p.index.can_dial(&after.id, "echo", unix_now()).ok()
    })
    .await;
    assert!(
        granted.is_some(),
        "the router learns the new agent-1's grant"
    );

    // The earlier agent-1's certificate names agent-1 too; it is not this identity's.
    assert_eq!(refused_how(&router, &before).await, TLS_REVOKED);
    let old = before.leaf().expect("leaf");
    assert!(
        t.ctrl.authorize_peer(&old, None).is_err(),
        "and the controller"
    );
    let new = after.leaf().expect("leaf");
    let admitted = t.ctrl.authorize_peer(&new, Some(IdentityKind::Agent));
    assert_eq!(admitted.expect("the new one is admitted").id, after.id);
    // The controller's own extra: a certificate its CA signed but it never recorded (another
    // controller's with the same CA, or one issued after the backup it was restored from).
    let key = umbra_pki::generate_key_and_csr("agent-1").expect("key");
    let spiffe =
        umbra_pki::SpiffeId::new(t.ctrl.trust_domain(), IdentityKind::Agent, &name("agent-1"));
    let forged = (t.ctrl.ca())
        .issue(
            &key.csr_der,
            &spiffe,
            Duration::from_secs(3600),
            std::time::SystemTime::now(),
        )
        .expect("issue");
    let forged =
        umbra_pki::parse_peer_cert(&umbra_pki::parse_pem_chain(&forged.cert_pem).expect("pem")[0])
            .expect("parse");
    assert!(
        t.ctrl.authorize_peer(&forged, None).is_err(),
        "never issued by this controller"
    );
    // The new agent-1 is served.
    let conn = connect(&router, &after).await;
    raw_echo(&conn, "echo").await;
    assert_eq!(router.stats().connections_admitted, 1);
    router.shutdown().await;
}

fn unix_now() -> umbra_policies::Timestamp {
    umbra_pki::unix_timestamp(std::time::SystemTime::now())
}
