//! Certificate renewal end to end: a controller that issues short-lived certificates, and agents
//! and routers that must renew their own, automatically, to keep working.
//!
//! The controller, the router and the SDK contexts share a manual clock that the test moves:
//! when to renew, when a connection's certificate has expired, and (since every TLS config takes
//! its time from the injected clock) whether a handshake's certificates are valid are all
//! judged on it. Certificates have ordinary lifetimes and nothing waits for them to age.
//!
//! Every wait is bounded and watches for the event itself (a renewal on the identity's `watch`,
//! a connection closing); nothing sleeps a fixed time and hopes. Administrative changes go
//! through the controller's Rust API as the controller itself.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_clock::{Clock, ManualClock};
use umbra_controller::Actor;
use umbra_edge_router::{Router, RouterConfig, RouterHandle};
use umbra_pki::{IdentityFile, SpiffeId};
use umbra_policies::{Action, Hosting, IdentityKind, Selector, Semantic, Service};
use umbra_proto::api::{CreateIdentityRequest, GrantRequest};
use umbra_sdk::{Context, Credentials, SdkError};
use umbra_tests::dataplane::{agent_raw_client, name, Echo};
use umbra_tests::{eventually, TestController};

/// How long certificates are valid in the tests on a manual clock (the CA adds its 5 minutes of
/// backdating to this): real time never renews them within a test.
const VALIDITY: Duration = Duration::from_secs(3600);
/// The bound on anything a test waits for that is not a renewal.
const BOUND: Duration = Duration::from_secs(15);
/// The bound on waiting for one renewal once the clock has been moved to its date.
const RENEWAL_BOUND: Duration = Duration::from_secs(18);

/// A controller on the system clock, for the tests that do not move time.
async fn controller() -> TestController {
    TestController::start_with(|cfg| cfg.cert_validity = VALIDITY).await
}

/// A controller issuing `validity`-long certificates, reading the time from `clock`.
async fn controller_on(clock: &ManualClock, validity: Duration) -> TestController {
    let clock = clock.clock();
    TestController::start_with(|cfg| {
        cfg.cert_validity = validity;
        cfg.clock = clock;
    })
    .await
}

/// Moves `clock` to a second after `not_after` (seconds), if it is not there yet.
fn past(clock: &ManualClock, not_after: u64) {
    let at = UNIX_EPOCH + Duration::from_secs(not_after + 1);
    if clock.now() < at {
        clock.set(at);
    }
}

/// Waits for the next renewal on `rx` and returns the new credentials.
async fn next_renewal(rx: &mut tokio::sync::watch::Receiver<Arc<Credentials>>) -> Arc<Credentials> {
    tokio::time::timeout(RENEWAL_BOUND, rx.changed())
        .await
        .expect("renewed in time")
        .expect("renewal still running");
    Arc::clone(&rx.borrow_and_update())
}

/// Creates and enrolls an agent (through the controller's API as the controller).
async fn agent(t: &TestController, n: &str) -> IdentityFile {
    let tok = t
        .ctrl
        .create_identity(
            &Actor::controller(),
            CreateIdentityRequest {
                name: name(n),
                kind: IdentityKind::Agent,
                roles: Vec::new(),
                token_ttl_secs: None,
            },
        )
        .expect("create agent");
    umbra_sdk::enroll(&tok.token, Some(&t.addr()))
        .await
        .expect("enroll agent")
}

/// Creates, enrolls and starts a router that saves its renewals to `path`, and waits until it
/// holds a policy.
async fn router(t: &TestController, n: &str, path: Option<std::path::PathBuf>) -> RouterHandle {
    router_with(t, n, path, Clock::system()).await
}

/// Like [`router`], reading the time from `clock`.
async fn router_with(
    t: &TestController,
    n: &str,
    path: Option<std::path::PathBuf>,
    clock: Clock,
) -> RouterHandle {
    let tok = t
        .ctrl
        .create_router(&Actor::controller(), name(n), None)
        .expect("create router");
    let identity = umbra_sdk::enroll(&tok.token, Some(&t.addr()))
        .await
        .expect("enroll router");
    if let Some(p) = &path {
        identity.save(p).expect("save router identity");
    }
    let mut cfg = RouterConfig::new(identity, "127.0.0.1:0".parse().expect("addr"));
    cfg.controller = Some(t.addr());
    cfg.identity_path = path;
    cfg.clock = clock;
    let router = Router::start(cfg).await.expect("router starts");
    tokio::time::timeout(BOUND, router.ready())
        .await
        .expect("router synchronizes");
    router
}

/// Creates a service.
fn service(t: &TestController, svc: &str, hosting: Hosting) {
    t.ctrl
        .create_service(
            &Actor::controller(),
            Service {
                name: name(svc),
                roles: Default::default(),
                hosting,
                intercepts: vec![format!("{svc}.umbra:443").parse().expect("intercept")],
                proxy_protocol: false,
            },
        )
        .expect("create service");
}

/// Grants `action` on `svc` to the identity named `who`.
fn grant(t: &TestController, action: Action, who: &str, svc: &str) {
    t.ctrl
        .grant(
            &Actor::controller(),
            GrantRequest {
                name: Some(name(&format!("{who}-{svc}"))),
                action,
                identities: vec![format!("@{who}").parse::<Selector>().expect("selector")],
                services: vec![format!("@{svc}").parse::<Selector>().expect("selector")],
                semantic: Semantic::AnyOf,
                limits: umbra_policies::GrantLimits::default(),
            },
        )
        .expect("grant");
}

/// A service backed by `echo`, dialable by the identity named `who`.
fn echo_service(t: &TestController, echo: &Echo, svc: &str, who: &str) {
    service(t, svc, echo.hosting());
    grant(t, Action::Dial, who, svc);
}

/// Dials `svc` and checks that bytes come back.
async fn echoes(ctx: &Context, svc: &str) -> Result<(), SdkError> {
    let mut s = tokio::time::timeout(BOUND, ctx.dial(svc))
        .await
        .map_err(|_| SdkError::Timeout(svc.to_owned()))??;
    s.write_all(b"ping").await.map_err(SdkError::from_io)?;
    let mut back = [0u8; 4];
    tokio::time::timeout(BOUND, s.read_exact(&mut back))
        .await
        .map_err(|_| SdkError::Timeout(svc.to_owned()))?
        .map_err(SdkError::from_io)?;
    assert_eq!(&back, b"ping");
    Ok(())
}

/// Moves `clock` to the moment the certificate in `creds` is due for renewal.
fn to_renewal(clock: &ManualClock, creds: &Credentials) {
    let leaf = creds.leaf();
    let due = umbra_policies::renewal::deadline(leaf.not_before, leaf.not_after);
    let at = UNIX_EPOCH + Duration::from_secs(due.0);
    if clock.now() < at {
        clock.advance(at.duration_since(clock.now()).unwrap_or_default());
    }
}

#[tokio::test]
async fn a_context_keeps_dialing_across_several_renewals() {
    // The controller, the router and the agent all read one manual clock: renewals happen
    // when the test moves it, not after waiting for certificates to age.
    let clock = ManualClock::starting_now();
    let t = TestController::start_with({
        let clock = clock.clock();
        |cfg| {
            cfg.cert_validity = VALIDITY;
            cfg.clock = clock;
        }
    })
    .await;
    let router = router_with(&t, "r1", None, clock.clock()).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1");
    let first = a.leaf().expect("leaf");
    // The CA backdates by 5 minutes; the validity asked for is what counts for renewal.
    assert_eq!(
        first.not_after.0 - first.not_before.0,
        VALIDITY.as_secs() + umbra_sdk::ISSUE_BACKDATE.as_secs()
    );

    let ctx = Context::with_clock(a.clone(), None, clock.clock()).expect("context");
    let path = t.path("agent-1.json");
    ctx.set_identity_path(&path);
    let mut renewals = ctx.watch_identity();
    let mut serials = vec![first.serial.clone()];
    echoes(&ctx, "echo")
        .await
        .expect("dial with the first certificate");
    // Real time alone renews nothing: the certificate is young on the clock that counts.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        !renewals.has_changed().expect("renewal running"),
        "renewed before the clock was moved"
    );
    for _ in 0..3 {
        let current = Arc::clone(&renewals.borrow());
        to_renewal(&clock, &current);
        let creds = next_renewal(&mut renewals).await;
        let serial = creds.leaf().serial.clone();
        assert!(
            !serials.contains(&serial),
            "every renewal is a new certificate"
        );
        serials.push(serial);
        assert_eq!(
            ctx.current_identity().leaf().expect("leaf").serial,
            serials[serials.len() - 1]
        );
        // Dated by the controller's (manual) clock.
        assert!(creds.leaf().not_after.0 >= umbra_clock::to_timestamp(clock.now()).0);
        echoes(&ctx, "echo").await.expect("dial after a renewal");
    }
    // Three renewals take two validities: on the clock, the first certificate has expired.
    assert!(umbra_clock::to_timestamp(clock.now()) > first.not_after);
    // The identity file on disk follows (0600), so a restart starts from a valid certificate.
    // (Saved before it is published, so the file can be one renewal ahead for a moment.)
    let saved = eventually(BOUND, || {
        let saved = IdentityFile::load(&path).ok()?;
        let serial = saved.leaf().ok()?.serial;
        (serial == ctx.current_identity().leaf().ok()?.serial).then_some(saved)
    })
    .await
    .expect("the saved identity is the current one");
    assert!(saved.leaf().expect("leaf").not_after >= umbra_clock::to_timestamp(clock.now()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // And a new context started from the saved file works.
    let restarted =
        Context::with_clock(saved, None, clock.clock()).expect("context from the saved file");
    echoes(&restarted, "echo")
        .await
        .expect("dial from the saved file");
    router.shutdown().await;
}

#[tokio::test]
async fn an_sdk_host_keeps_serving_across_its_renewals() {
    let clock = ManualClock::starting_now();
    let t = controller_on(&clock, VALIDITY).await;
    let router = router_with(&t, "r1", None, clock.clock()).await;
    let host = agent(&t, "host-1").await;
    let caller = agent(&t, "caller-1").await;
    service(&t, "chat", Hosting::Sdk);
    grant(&t, Action::Bind, "host-1", "chat");
    grant(&t, Action::Dial, "caller-1", "chat");
    let first = host.leaf().expect("leaf");

    let hctx = Context::with_clock(host, None, clock.clock()).expect("host context");
    let mut listener = hctx.bind("chat").await.expect("bind");
    let echo_host = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let cctx = Context::with_clock(caller, None, clock.clock()).expect("caller context");
    echoes(&cctx, "chat").await.expect("dial the SDK host");
    // Past the host's first certificate (on which it registered) and its renewal, every dial
    // still finds the host: it registered again with its renewed certificate before the router
    // closed the connection made with the old one.
    let mut renewals = hctx.watch_identity();
    let mut caller_renewals = cctx.watch_identity();
    to_renewal(&clock, &renewals.borrow());
    let renewed = next_renewal(&mut renewals).await;
    assert_ne!(renewed.leaf().serial, first.serial);
    // Both agents were issued at the same instant of the clock, so the caller renews too.
    next_renewal(&mut caller_renewals).await;
    echoes(&cctx, "chat")
        .await
        .expect("dial after the host renewed");
    past(&clock, first.not_after.0);
    for _ in 0..10 {
        echoes(&cctx, "chat")
            .await
            .expect("dial after the host's first certificate expired on the clock");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        hctx.current_identity().leaf().expect("leaf").serial,
        renewed.leaf().serial
    );
    echoes(&cctx, "chat")
        .await
        .expect("dial after the host's first certificate expired");
    echo_host.abort();
    router.shutdown().await;
}

#[tokio::test]
async fn a_router_keeps_serving_across_its_own_renewal() {
    let clock = ManualClock::starting_now();
    let t = controller_on(&clock, VALIDITY).await;
    let path = t.path("r1.json");
    let router = router_with(&t, "r1", Some(path.clone()), clock.clock()).await;
    let echo = Echo::start().await;
    let mut creds = router.credentials();
    let first = Arc::clone(&creds.borrow_and_update());

    // Move the clock to the router's renewal, then past its first certificate's expiry.
    to_renewal(&clock, &first);
    let renewed = next_renewal(&mut creds).await;
    let first = first.leaf().clone();
    assert_ne!(renewed.leaf().serial, first.serial);
    past(&clock, first.not_after.0);

    // Created only now: the router learns of them over its control channel, which it has
    // reopened with its renewed certificate.
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1");
    // A brand-new client makes a new handshake, which must present a valid certificate: the
    // SDK checks the router's chain and validity (on the clock) like any TLS client.
    let ctx = Context::with_clock(a, None, clock.clock()).expect("context");
    let dialed = async {
        loop {
            match echoes(&ctx, "echo").await {
                Ok(()) => return,
                // The grant may not have reached the router yet.
                Err(SdkError::Denied { .. }) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("dial through the renewed router: {e}"),
            }
        }
    };
    tokio::time::timeout(BOUND, dialed)
        .await
        .expect("dial in time");
    assert!(
        clock.now() > UNIX_EPOCH + Duration::from_secs(first.not_after.0),
        "the router's first certificate had expired on the clock"
    );

    // The router saved its renewals where it was told to.
    let saved = eventually(BOUND, || {
        let s = IdentityFile::load(&path).ok()?.leaf().ok()?.serial;
        (s != first.serial).then_some(s)
    })
    .await;
    assert!(saved.is_some(), "the router saved its renewed identity");
    router.shutdown().await;
}

#[tokio::test]
async fn a_revoked_identity_stops_renewing_and_its_dials_fail() {
    let clock = ManualClock::starting_now();
    let t = controller_on(&clock, VALIDITY).await;
    let router = router_with(&t, "r1", None, clock.clock()).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1");
    let ctx = Context::with_clock(a, None, clock.clock()).expect("context");
    echoes(&ctx, "echo").await.expect("dial before revocation");
    // Renew once, so the revoked certificate is a renewed one.
    let mut renewals = ctx.watch_identity();
    to_renewal(&clock, &renewals.borrow());
    next_renewal(&mut renewals).await;
    echoes(&ctx, "echo").await.expect("dial after renewal");

    t.ctrl
        .revoke_identity(&Actor::controller(), "agent-1")
        .expect("revoke");
    let current = ctx.current_identity();
    let e = umbra_sdk::renew(&current)
        .await
        .expect_err("a revoked identity cannot renew");
    assert!(
        matches!(e, SdkError::Handshake { .. } | SdkError::Api { .. }),
        "{e}"
    );
    let dial = async {
        loop {
            match ctx.dial("echo").await {
                Err(e) => return e,
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    let e = tokio::time::timeout(BOUND, dial).await.expect("dials fail");
    assert!(
        matches!(
            e,
            SdkError::Handshake { .. }
                | SdkError::Revoked
                | SdkError::Denied { .. }
                | SdkError::Api { .. }
        ),
        "{e}"
    );
    // No renewal happens any more: the certificate it holds runs out.
    let held = ctx.current_identity().leaf().expect("leaf");
    past(&clock, held.not_after.0);
    // Time for the renewal task, woken by the clock, to try (and be refused).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        ctx.current_identity().leaf().expect("leaf").serial,
        held.serial,
        "nothing was renewed after the revocation"
    );
    assert!(ctx.dial("echo").await.is_err());
    router.shutdown().await;
}

/// Connects with a raw client presenting `identity` and returns how the connection ended.
async fn handshake_end(router: &RouterHandle, identity: &IdentityFile) -> quinn::ConnectionError {
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
    tokio::time::timeout(BOUND, ended)
        .await
        .expect("the router ends the connection")
}

/// A TLS refusal during the handshake: a QUIC CRYPTO_ERROR (0x100 + TLS alert), not an
/// application close that would mean "admitted, then refused".
fn refused_by_tls(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::ConnectionClosed(c) => {
            let code = u64::from(c.error_code);
            (0x100..0x200).contains(&code)
        }
        quinn::ConnectionError::TransportError(t) => {
            let code = u64::from(t.code);
            (0x100..0x200).contains(&code)
        }
        _ => false,
    }
}

#[tokio::test]
async fn unknown_and_disabled_identities_are_refused_at_the_handshake() {
    let t = controller().await;
    let router = router(&t, "r1", None).await;
    let echo = Echo::start().await;
    let good = agent(&t, "agent-1").await;
    let off = agent(&t, "agent-2").await;
    echo_service(&t, &echo, "echo", "agent-1");

    // A certificate from the right CA for an identity the controller never created.
    let key = umbra_pki::generate_key_and_csr("ghost").expect("key");
    let spiffe = SpiffeId::new(t.ctrl.trust_domain(), IdentityKind::Agent, &name("ghost"));
    let issued = t
        .ctrl
        .ca()
        .issue(
            &key.csr_der,
            &spiffe,
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .expect("issue");
    let mut ghost = good.clone();
    ghost.id = umbra_policies::IdentityId::new("ghost-id").expect("id");
    ghost.name = name("ghost");
    ghost.cert_pem = issued.cert_pem;
    ghost.key_pem = key.key_pem;

    // Disable agent-2 declaratively: the exported state, with one change.
    let mut doc = umbra_policies::export(&t.ctrl.state());
    doc.identities
        .iter_mut()
        .find(|i| i.name.as_str() == "agent-2")
        .expect("agent-2 exported")
        .disabled = true;
    t.ctrl
        .apply(&Actor::controller(), doc.to_yaml(), false)
        .expect("apply");
    let disabled = eventually(BOUND, || {
        let p = router.policy().borrow().clone()?;
        p.index
            .state()
            .identities
            .values()
            .any(|i| i.name.as_str() == "agent-2" && i.disabled)
            .then_some(())
    })
    .await;
    assert!(
        disabled.is_some(),
        "the router learns that agent-2 is disabled"
    );

    for (who, identity) in [("unknown", &ghost), ("disabled", &off)] {
        let e = handshake_end(&router, identity).await;
        assert!(refused_by_tls(&e), "{who}: {e:?}");
    }
    // Never admitted, so never refused after a handshake either.
    assert_eq!(router.stats().connections_refused, 0);
    assert_eq!(router.stats().connections_admitted, 0);

    // The active agent still gets in.
    let ctx = Context::new(good).expect("context");
    echoes(&ctx, "echo").await.expect("the active agent dials");
    router.shutdown().await;
}

#[tokio::test]
async fn a_connection_is_closed_when_its_certificate_expires() {
    // The router judges expiry on its clock, which the test moves.
    let clock = ManualClock::starting_now();
    let t = TestController::start_with({
        let clock = clock.clock();
        |cfg| {
            cfg.cert_validity = VALIDITY;
            cfg.clock = clock;
        }
    })
    .await;
    let router = router_with(&t, "r1", None, clock.clock()).await;
    let a = agent(&t, "agent-1").await;
    let leaf = a.leaf().expect("leaf");
    // A raw client never renews: the connection made with this certificate must end with it,
    // since no delta announces the passing of time.
    let (ep, cfg) = agent_raw_client(&a);
    let conn = tokio::time::timeout(
        BOUND,
        ep.connect_with(cfg, router.local_addr(), "router.umbra")
            .expect("connect"),
    )
    .await
    .expect("timely")
    .expect("admitted");
    let not_after = UNIX_EPOCH + Duration::from_secs(leaf.not_after.0);
    // A second before it expires, on the router's clock, the connection stays.
    clock.set(not_after - Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        conn.close_reason().is_none(),
        "closed a second before the certificate expired"
    );
    clock.set(not_after);
    let ended = tokio::time::timeout(BOUND, conn.closed())
        .await
        .expect("closed when the certificate expired, without waiting for it");
    match ended {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                u64::from(c.error_code),
                u64::from(umbra_proto::stream::codes::DENIED)
            );
            assert_eq!(&c.reason[..], b"expired");
        }
        other => panic!("expected the router's close, got {other}"),
    }
    router.shutdown().await;
}
