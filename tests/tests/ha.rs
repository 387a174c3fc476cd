//! Several controllers on one PostgreSQL database (a real server, see `umbra_tests::pg`): any
//! of them writes, every one learns the others' commits at once, and whatever is committed
//! through one is enforced by routers that follow another.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_policies::Action;
use umbra_sdk::{Context, SdkError};
use umbra_tests::dataplane::*;
use umbra_tests::pg::PgServer;
use umbra_tests::TestController;

/// The bound on anything a test waits for.
const BOUND: Duration = Duration::from_secs(15);

async fn on_postgres(url: &str) -> TestController {
    let store = url.parse().expect("store URL");
    TestController::start_with(move |c| c.store = store).await
}

async fn round_trip(s: &mut umbra_sdk::Stream, msg: &[u8]) -> Result<Vec<u8>, SdkError> {
    s.write_all(msg).await.map_err(SdkError::from_io)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.map_err(SdkError::from_io)?;
    Ok(back)
}

/// Dials `service` until it succeeds (the router may not have heard of the grant yet).
async fn dial_when_granted(ctx: &Context, service: &str) -> umbra_sdk::Stream {
    let deadline = Instant::now() + BOUND;
    loop {
        match ctx.dial(service).await {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{service} never became dialable: {e}"),
        }
    }
}

/// Uses a stream until it is cut; returns the error and how long it took from `since`.
async fn until_cut(s: &mut umbra_sdk::Stream, since: Instant) -> (SdkError, Duration) {
    tokio::time::timeout(BOUND, async {
        loop {
            if let Err(e) = round_trip(s, b"ping").await {
                return (e, since.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the stream is cut within the bound")
}

/// Waits until every controller holds the same state at the same sequence number.
async fn converged(ctrls: &[&TestController]) {
    let deadline = Instant::now() + BOUND;
    loop {
        let states: Vec<_> = ctrls.iter().map(|t| t.ctrl.state()).collect();
        if states.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        assert!(Instant::now() < deadline, "the controllers never converged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_controller_cuts_a_stream_on_a_router_following_another() {
    let url = PgServer::shared().database();
    let a = on_postgres(&url).await;
    let b = a.join().await;
    let _router = start_router(&a, "r1", |_| {}).await;
    let echo = Echo::start().await;
    // Everything about the agent is written through B; the router follows A.
    let agent1 = agent(&b, "agent-1").await;
    echo_service(&b, &echo, "echo", "agent-1").await;
    let ctx = Context::new(agent1).expect("context");
    let mut s = dial_when_granted(&ctx, "echo").await;
    assert_eq!(round_trip(&mut s, b"hello").await.expect("echo"), b"hello");

    let sent = Instant::now();
    revoke_identity(&b, "agent-1").await;
    let (e, took) = until_cut(&mut s, sent).await;
    assert!(matches!(e, SdkError::Revoked), "{e}");
    println!("revoked through B, cut on A's router in {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    converged(&[&a, &b]).await;
    let revoked =
        (a.ctrl.state().identities.values()).any(|i| i.name.as_str() == "agent-1" && i.revoked);
    assert!(revoked, "A holds the revocation B committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_spent_once_across_controllers_even_when_both_race() {
    let url = PgServer::shared().database();
    let a = on_postgres(&url).await;
    let b = a.join().await;
    for round in 0..8 {
        let name = format!("agent-{round}");
        let req = umbra_proto::api::CreateIdentityRequest {
            name: name.parse().expect("name"),
            kind: umbra_policies::IdentityKind::Agent,
            roles: Default::default(),
            token_ttl_secs: None,
        };
        let tok: umbra_proto::api::TokenResponse = a
            .admin_client()
            .call(http::Method::POST, "/v1/identities", Some(&req))
            .await
            .expect("create");
        let (ta, tb) = (tok.token.clone(), tok.token);
        let (addr_a, addr_b) = (a.addr(), b.addr());
        let (ra, rb) = tokio::join!(
            tokio::spawn(async move { umbra_sdk::enroll(&ta, Some(&addr_a)).await }),
            tokio::spawn(async move { umbra_sdk::enroll(&tb, Some(&addr_b)).await }),
        );
        let (ra, rb) = (ra.expect("join"), rb.expect("join"));
        assert!(
            ra.is_ok() != rb.is_ok(),
            "round {round}: exactly one enrollment succeeds: {:?} / {:?}",
            ra.as_ref().map(|_| ()),
            rb.as_ref().map(|_| ())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_three_controllers_form_one_history() {
    let url = PgServer::shared().database();
    let a = on_postgres(&url).await;
    let b = a.join().await;
    let c = a.join().await;
    let echo = Echo::start().await;
    // Interleaved writes through all three, some racing each other.
    for i in 0..6 {
        let (x, y, z) = (format!("s{i}-a"), format!("s{i}-b"), format!("s{i}-c"));
        tokio::join!(
            service(&a, &x, echo.hosting()),
            service(&b, &y, echo.hosting()),
            service(&c, &z, echo.hosting()),
        );
    }
    converged(&[&a, &b, &c]).await;
    let state = a.ctrl.state();
    assert_eq!(state.services.len(), 18);
    // One log: a follower of any controller resumes from any sequence number on another.
    let sa = a.ctrl.subscribe(None).expect("subscribe a");
    let sc = c.ctrl.subscribe(None).expect("subscribe c");
    assert_eq!(sa.seq, sc.seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_fails_over_when_its_controller_dies_and_keeps_enforcing() {
    let url = PgServer::shared().database();
    let mut a = on_postgres(&url).await;
    let b = a.join().await;
    let both = format!("{},{}", a.addr(), b.addr());
    let _router = start_router(&a, "r1", |c| {
        c.controller = Some(both.clone());
        c.stale_after = Duration::from_secs(3);
    })
    .await;
    let echo = Echo::start().await;
    let agent1 = agent(&b, "agent-1").await;
    echo_service(&b, &echo, "echo", "agent-1").await;
    let ctx = Context::new(agent1).expect("context");
    let mut s = dial_when_granted(&ctx, "echo").await;
    assert_eq!(round_trip(&mut s, b"x").await.expect("echo"), b"x");

    // The router's first channel, to A, began with a snapshot; B has served none.
    assert!(a.ctrl.snapshots_served() >= 1);
    assert_eq!(b.ctrl.snapshots_served(), 0);
    a.stop().await;
    // Past the router's stale window: had it not found B, it would refuse everything now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        b.ctrl.snapshots_served(),
        0,
        "the router resumed on B from its last sequence number, without a snapshot"
    );
    assert_eq!(
        round_trip(&mut s, b"still").await.expect("still served"),
        b"still"
    );
    let sent = Instant::now();
    revoke_policy(&b, "agent-1-echo").await;
    let (e, took) = until_cut(&mut s, sent).await;
    assert!(matches!(e, SdkError::Revoked), "{e}");
    println!("after A died, a revocation through B cut the stream in {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    grant(&b, "again", Action::Dial, "agent-1", "echo").await;
    let mut s = dial_when_granted(&ctx, "echo").await;
    assert_eq!(round_trip(&mut s, b"y").await.expect("echo"), b"y");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_cut_off_from_the_database_stops_vouching_and_recovers() {
    let pg = std::sync::Arc::new(PgServer::private());
    let url = pg.database();
    let a = on_postgres(&url).await;
    let _router = start_router(&a, "r1", |c| c.stale_after = Duration::from_secs(3)).await;
    let echo = Echo::start().await;
    let agent1 = agent(&a, "agent-1").await;
    echo_service(&a, &echo, "echo", "agent-1").await;
    let ctx = Context::new(agent1).expect("context");
    let mut s = dial_when_granted(&ctx, "echo").await;
    assert_eq!(round_trip(&mut s, b"x").await.expect("echo"), b"x");

    let stopped = Instant::now();
    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.stop())
        .await
        .expect("join");
    let ctrl = a.ctrl.clone();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + BOUND;
        while ctrl.in_touch() {
            assert!(
                Instant::now() < deadline,
                "still vouching without a database"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .expect("out of touch");
    println!(
        "out of touch {:?} after the database stopped",
        stopped.elapsed()
    );
    // The router hears no more heartbeats: it refuses everything past its stale window.
    let cut = tokio::time::timeout(BOUND, async {
        loop {
            if round_trip(&mut s, b"ping").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        cut.is_ok(),
        "the router kept serving without a vouching controller"
    );
    println!(
        "router refused {:?} after the database stopped",
        stopped.elapsed()
    );
    let write: Result<serde_json::Value, _> = a
        .admin_client()
        .call(
            http::Method::DELETE,
            "/v1/policies/agent-1-echo",
            None::<&()>,
        )
        .await;
    assert!(write.is_err(), "a write without the database must fail");

    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.start())
        .await
        .expect("join");
    let restarted = Instant::now();
    let mut s = dial_when_granted(&ctx, "echo").await;
    assert_eq!(round_trip(&mut s, b"back").await.expect("echo"), b"back");
    println!(
        "served again {:?} after the database returned",
        restarted.elapsed()
    );
    service(&a, "after", echo.hosting()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunneler_fails_over_when_its_controller_dies_and_follows_the_other() {
    let url = PgServer::shared().database();
    let mut a = on_postgres(&url).await;
    let b = a.join().await;
    let _router = start_router(&a, "r1", |c| {
        c.controller = Some(format!("{},{}", a.addr(), b.addr()))
    })
    .await;
    let echo = Echo::start().await;
    let file = agent(&a, "agent-1").await;
    echo_service(&a, &echo, "echo", "agent-1").await;
    let both = format!("{},{}", a.addr(), b.addr());
    let ctx = Context::with_controller(file, Some(&both)).expect("context");
    let cfg = umbra_tunneler::TunnelerConfig {
        controller: Some(both.clone()),
        name_base: "127.93.0.1".parse().expect("base"),
        ..Default::default()
    };
    let tun = umbra_tunneler::Tunneler::start(ctx, cfg)
        .await
        .expect("tunneler");
    let mappings = tun.mappings();
    let wait_for = |want: &'static str, present: bool| {
        let mut rx = mappings.clone();
        async move {
            tokio::time::timeout(BOUND, async {
                loop {
                    let has = rx
                        .borrow_and_update()
                        .iter()
                        .any(|m| m.service.as_str() == want);
                    if has == present {
                        return;
                    }
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await
            .unwrap_or_else(|_| {
                panic!("{want}: never {}", if present { "listed" } else { "gone" })
            });
        }
    };
    wait_for("echo", true).await;

    a.stop().await;
    // Written through B after A died: the tunneler's watch, now on B, follows it.
    let died = Instant::now();
    service(&b, "later", echo.hosting()).await;
    grant(&b, "later-dial", Action::Dial, "agent-1", "later").await;
    wait_for("later", true).await;
    println!(
        "after A died, a grant through B reached the tunneler in {:?}",
        died.elapsed()
    );
    revoke_policy(&b, "agent-1-echo").await;
    wait_for("echo", false).await;
    tun.shutdown().await;
}
