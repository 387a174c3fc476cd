//! Per-grant router limits end to end: the real controller and router, QUIC clients presenting
//! enrolled identities (two connections each where it matters, since a limit holds across all
//! of an identity's connections on a router), and TCP services on loopback. A stream over
//! `connections` or `rate` is refused with the LIMIT status and code and counted; `bandwidth`
//! slows a bulk transfer to the limit without touching another identity; the CLI takes the
//! flags, `apply` and `export` carry them, and `policy explain` shows them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::Method;
use quinn::{Connection, RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_edge_router::RouterHandle;
use umbra_pki::IdentityFile;
use umbra_policies::{GrantLimits, Hosting, Selector, Semantic, ServicePolicy};
use umbra_proto::api::GrantRequest;
use umbra_proto::stream::{codes, Status};
use umbra_sdk::{Context, SdkError};
use umbra_tests::dataplane::{
    agent, agent_raw_client, name, raw_dial, raw_echo, sdk_service, service, start_router, Echo,
};
use umbra_tests::{eventually, stderr, stdout, TestController};

const BOUND: Duration = Duration::from_secs(15);

/// Grants `svc` to every identity in `who` as policy `policy` with `limits`.
async fn grant(t: &TestController, policy: &str, who: &[&str], svc: &str, limits: GrantLimits) {
    let req = GrantRequest {
        name: Some(name(policy)),
        action: umbra_policies::Action::Dial,
        identities: (who.iter())
            .map(|w| format!("@{w}").parse::<Selector>().expect("selector"))
            .collect(),
        services: vec![format!("@{svc}").parse::<Selector>().expect("selector")],
        semantic: Semantic::AnyOf,
        limits,
    };
    let _: ServicePolicy = t
        .admin_client()
        .call(Method::POST, "/v1/policies", Some(&req))
        .await
        .expect("grant");
}

/// Waits until the router's policy holds `policy` with `limits`.
async fn router_sees(router: &RouterHandle, policy: &str, limits: &GrantLimits) {
    let seen = eventually(BOUND, || {
        let p = router.policy().borrow().clone()?;
        let got = p.index.state().policies.get(&name(policy))?;
        (got.limits == *limits).then_some(())
    })
    .await;
    assert!(seen.is_some(), "the router learns {policy}'s limits");
}

/// Changes `policy`'s limits declaratively (export, edit, apply) and waits for the router.
async fn set_limits(t: &TestController, router: &RouterHandle, policy: &str, l: GrantLimits) {
    let mut doc = umbra_policies::export(&t.ctrl.state());
    let p = doc.policies.iter_mut().find(|p| p.name.as_str() == policy);
    p.expect("exported").limits = l.clone();
    t.ctrl
        .apply(&umbra_controller::Actor::controller(), doc.to_yaml(), false)
        .expect("apply");
    router_sees(router, policy, &l).await;
}

/// An admitted connection presenting `identity`.
async fn connect(router: &RouterHandle, identity: &IdentityFile) -> Connection {
    let (ep, cfg) = agent_raw_client(identity);
    let connecting = ep.connect_with(cfg, router.local_addr(), "router.umbra");
    tokio::time::timeout(BOUND, connecting.expect("connect"))
        .await
        .expect("timely")
        .expect("admitted")
}

/// Dials `svc` and expects a LIMIT refusal: the status and the code the router stopped us with.
async fn refused(conn: &Connection, svc: &str) {
    let (status, send, _recv) = raw_dial(conn, svc).await;
    assert_eq!(status, Status::Unavailable, "{svc}: refused for a limit");
    let stopped = tokio::time::timeout(BOUND, send.stopped())
        .await
        .expect("timely")
        .expect("stopped")
        .expect("with a code");
    assert_eq!(stopped.into_inner(), u64::from(codes::LIMIT));
}

/// Ends an echo stream cleanly and waits for the echo's end, so the router's side is done.
async fn close_echo((mut send, mut recv): (SendStream, RecvStream)) {
    send.finish().expect("finish");
    let rest = tokio::time::timeout(BOUND, recv.read_to_end(1024)).await;
    assert!(matches!(rest, Ok(Ok(_))), "the echo ends: {rest:?}");
}

fn limits(f: impl FnOnce(&mut GrantLimits)) -> GrantLimits {
    let mut l = GrantLimits::default();
    f(&mut l);
    l
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cap_an_identitys_streams_across_its_connections_and_a_freed_slot_admits() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let (a, b) = (agent(&t, "agent-a").await, agent(&t, "agent-b").await);
    service(&t, "echo", echo.hosting()).await;
    let two = limits(|l| l.connections = Some(2.try_into().unwrap()));
    grant(
        &t,
        "two-streams",
        &["agent-a", "agent-b"],
        "echo",
        two.clone(),
    )
    .await;
    router_sees(&router, "two-streams", &two).await;

    let (a1, a2, b1) = (
        connect(&router, &a).await,
        connect(&router, &a).await,
        connect(&router, &b).await,
    );
    let first = raw_echo(&a1, "echo").await;
    let _second = raw_echo(&a2, "echo").await;
    // The third of agent-a's streams is refused, on either of its connections.
    refused(&a1, "echo").await;
    refused(&a2, "echo").await;
    assert_eq!(router.stats().grant_limited, 2);
    // agent-b, under the same policy, has its own two.
    let _b = (raw_echo(&b1, "echo").await, raw_echo(&b1, "echo").await);
    refused(&b1, "echo").await;

    // A slot freed by a stream that ended admits again.
    close_echo(first).await;
    let again = eventually(BOUND, || (router.usage(&a.id).streams <= 1).then_some(())).await;
    assert!(
        again.is_some(),
        "agent-a's first stream ended on the router"
    );
    let _third = raw_echo(&a1, "echo").await;
    refused(&a2, "echo").await;
    assert_eq!(router.stats().grant_limited, 4);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_grants_admit_while_any_has_room_an_unlimited_one_wins_and_changes_apply() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-a").await;
    service(&t, "echo", echo.hosting()).await;
    let one = limits(|l| l.connections = Some(1.try_into().unwrap()));
    grant(&t, "one-x", &["agent-a"], "echo", one.clone()).await;
    grant(&t, "one-y", &["agent-a"], "echo", one.clone()).await;
    router_sees(&router, "one-y", &one).await;
    let conn = connect(&router, &a).await;

    // Each grant has room for one: two streams, then a refusal.
    let _s = (raw_echo(&conn, "echo").await, raw_echo(&conn, "echo").await);
    refused(&conn, "echo").await;
    // A limit raised applies to the next stream.
    let three = limits(|l| l.connections = Some(3.try_into().unwrap()));
    set_limits(&t, &router, "one-x", three).await;
    let _more = (raw_echo(&conn, "echo").await, raw_echo(&conn, "echo").await);
    refused(&conn, "echo").await;
    // A grant without limits wins over limited ones.
    grant(
        &t,
        "unlimited",
        &["agent-a"],
        "echo",
        GrantLimits::default(),
    )
    .await;
    let seen = eventually(BOUND, || {
        let p = router.policy().borrow().clone()?;
        p.index.state().policies.get(&name("unlimited")).map(drop)
    })
    .await;
    assert!(seen.is_some());
    let _free: Vec<_> = futures::future::join_all((0..4).map(|_| raw_echo(&conn, "echo"))).await;
    assert_eq!(router.stats().grant_limited, 2);
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_refuses_streams_past_its_bucket_and_admits_again_after_refill() {
    let t = TestController::start().await;
    let registry = umbra_metrics::Registry::new();
    let r = registry.clone();
    let router = start_router(&t, "r1", |c| c.metrics = Some(r)).await;
    let scraped = umbra_tests::metrics::endpoint(&registry).await;
    let echo = Echo::start().await;
    let (a, b) = (agent(&t, "agent-a").await, agent(&t, "agent-b").await);
    service(&t, "echo", echo.hosting()).await;
    // A burst of 5, then one every 200 ms.
    let rate = limits(|l| l.rate = Some("5/s".parse().unwrap()));
    grant(&t, "paced", &["agent-a"], "echo", rate.clone()).await;
    grant(&t, "free", &["agent-b"], "echo", GrantLimits::default()).await;
    router_sees(&router, "paced", &rate).await;
    let (a1, a2, b1) = (
        connect(&router, &a).await,
        connect(&router, &a).await,
        connect(&router, &b).await,
    );

    let start = Instant::now();
    let (mut admitted, mut refusals) = (0u32, 0u32);
    for i in 0..12 {
        let conn = if i % 2 == 0 { &a1 } else { &a2 };
        let (status, mut send, _recv) = raw_dial(conn, "echo").await;
        match status {
            Status::Ok => admitted += 1,
            Status::Unavailable => refusals += 1,
            other => panic!("unexpected {other:?}"),
        }
        let _ = send.finish();
    }
    let elapsed = start.elapsed();
    // At most the burst plus what refilled meanwhile; past it, refused.
    let refilled = (elapsed.as_millis() / 200) as u32;
    assert!(
        admitted <= 5 + refilled,
        "{admitted} admitted in {elapsed:?}"
    );
    assert!(admitted >= 5, "the burst is admitted: {admitted}");
    assert!(refusals >= 1, "streams past the bucket are refused");
    assert_eq!(u64::from(refusals), router.stats().grant_limited);
    // The same refusals in the exposition, under the service and the limit's name.
    let exposition = umbra_tests::exposition::scrape(scraped.local_addr())
        .await
        .expect("scrape");
    let labels = [
        ("outcome", "grant_limited"),
        ("service", "echo"),
        ("reason", "rate"),
    ];
    assert_eq!(
        exposition.sum("umbra_router_streams_total", &labels),
        f64::from(refusals)
    );
    // Each refusal is in the audit log, naming the grant and the limit.
    let deadline = Instant::now() + BOUND;
    loop {
        let rows: Vec<umbra_proto::api::AuditEntry> = t
            .admin_client()
            .call(Method::GET, "/v1/audit?limit=1000", None::<&()>)
            .await
            .expect("audit");
        let limited = rows
            .iter()
            .filter(|e| e.action == "router.stream_refused" && e.target == "echo")
            .filter(|e| e.detail["policy"] == "paced" && e.detail["reason"] == "limit: rate")
            .filter(|e| e.actor.ends_with("/agent/agent-a"))
            .count();
        if limited == refusals as usize {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{limited} of {refusals} refusals audited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Another identity is not slowed by agent-a's bucket.
    for _ in 0..8 {
        close_echo(raw_echo(&b1, "echo").await).await;
    }

    // After a refill (200 ms for one token) agent-a is admitted again.
    let refused_at = Instant::now();
    let mut readmitted = None;
    while refused_at.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (status, mut send, _recv) = raw_dial(&a1, "echo").await;
        let _ = send.finish();
        if status == Status::Ok {
            readmitted = Some(refused_at.elapsed());
            break;
        }
    }
    let after = readmitted.expect("admitted again after the bucket refilled");
    assert!(
        after <= Duration::from_millis(600),
        "refilled after {after:?}"
    );
    router.shutdown().await;
}

/// A TCP service that reads everything it is sent and then answers with the byte count.
async fn sink() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sink");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut n = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(k) = sock.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                let _ = sock.write_all(&n.to_be_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// Sends `bytes` to the sink service `svc` on a new stream and waits for its count.
async fn upload(conn: Connection, svc: &'static str, bytes: usize) -> Instant {
    let (status, mut send, mut recv) = raw_dial(&conn, svc).await;
    assert_eq!(status, Status::Ok);
    let chunk = vec![7u8; 32 * 1024];
    let mut left = bytes;
    while left > 0 {
        let k = left.min(chunk.len());
        send.write_all(&chunk[..k]).await.expect("upload");
        left -= k;
    }
    send.finish().expect("finish");
    let mut count = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(30), recv.read_exact(&mut count))
        .await
        .expect("timely")
        .expect("the sink's count");
    assert_eq!(u64::from_be_bytes(count), bytes as u64);
    Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_holds_an_identitys_streams_together_to_the_limit_and_spares_another() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let (addr, _sink) = sink().await;
    let (a, b) = (agent(&t, "agent-a").await, agent(&t, "agent-b").await);
    let hosting = Hosting::Address(addr.to_string().parse().expect("hostport"));
    service(&t, "sink", hosting).await;
    const LIMIT: u64 = 1 << 20;
    let shaped = limits(|l| l.bandwidth = Some("1MiB/s".parse().unwrap()));
    grant(&t, "shaped", &["agent-a"], "sink", shaped.clone()).await;
    grant(&t, "free", &["agent-b"], "sink", GrantLimits::default()).await;
    router_sees(&router, "shaped", &shaped).await;
    let (a1, a2, b1) = (
        connect(&router, &a).await,
        connect(&router, &a).await,
        connect(&router, &b).await,
    );

    // agent-a moves 2 MiB over two connections at once, agent-b 2 MiB alongside.
    const EACH: usize = 1 << 20;
    let start = Instant::now();
    let a_streams = tokio::spawn(async move {
        let (x, y) = tokio::join!(upload(a1, "sink", EACH), upload(a2, "sink", EACH));
        x.max(y)
    });
    let b_done = upload(b1, "sink", 2 * EACH).await;
    let a_done = a_streams.await.expect("agent-a's uploads");

    let a_secs = (a_done - start).as_secs_f64();
    let a_rate = (2 * EACH) as f64 / a_secs;
    let b_rate = (2 * EACH) as f64 / (b_done - start).as_secs_f64();
    eprintln!(
        "agent-a {a_rate:.0} B/s over {a_secs:.2} s; agent-b {b_rate:.0} B/s (limit {LIMIT})"
    );
    let limit = LIMIT as f64;
    assert!(
        (0.75 * limit..=1.25 * limit).contains(&a_rate),
        "agent-a's two streams together ran at {a_rate:.0} B/s, limit {limit}"
    );
    assert!(
        b_rate > 2.0 * limit,
        "agent-b is not held back: {b_rate:.0} B/s"
    );
    assert_eq!(
        router.stats().grant_limited,
        0,
        "bandwidth slows, never refuses"
    );
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_stream_follows_its_grants_new_bandwidth() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let (addr, _sink) = sink().await;
    let a = agent(&t, "agent-a").await;
    let hosting = Hosting::Address(addr.to_string().parse().expect("hostport"));
    service(&t, "sink", hosting).await;
    let slow = limits(|l| l.bandwidth = Some("256KiB/s".parse().unwrap()));
    grant(&t, "shaped", &["agent-a"], "sink", slow.clone()).await;
    router_sees(&router, "shaped", &slow).await;
    let conn = connect(&router, &a).await;

    // 4 MiB at 256 KiB/s would take 16 s; raised to 1 GiB/s after 0.5 s, it is done at once.
    let start = Instant::now();
    let upload = tokio::spawn(upload(conn, "sink", 4 << 20));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!upload.is_finished(), "still shaped to 256 KiB/s");
    let fast = limits(|l| l.bandwidth = Some("1GiB/s".parse().unwrap()));
    set_limits(&t, &router, "shaped", fast).await;
    let done = tokio::time::timeout(BOUND, upload).await.expect("timely");
    let took = done.expect("upload") - start;
    eprintln!("4 MiB took {took:?}");
    assert!(
        took < Duration::from_secs(4),
        "the live stream sped up: {took:?}"
    );
    router.shutdown().await;
}

/// Through the SDK on both ends (a service an agent hosts): the caller is refused a stream over
/// `connections`, and its upload to the host is shaped to `bandwidth`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_hosted_service_is_limited_the_same_way() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let (host, caller) = (agent(&t, "host-1").await, agent(&t, "caller-1").await);
    sdk_service(&t, "bulk", "host-1", "caller-1").await;
    let l = limits(|l| {
        l.connections = Some(1.try_into().unwrap());
        l.bandwidth = Some("1MiB/s".parse().unwrap());
    });
    set_limits(&t, &router, "bulk-dial", l).await;

    let mut listener = Context::new(host)
        .expect("host")
        .bind("bulk")
        .await
        .expect("bind");
    let _host = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut n = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    let ctx = Context::new(caller).expect("caller");
    let mut s = tokio::time::timeout(BOUND, ctx.dial("bulk"))
        .await
        .expect("timely")
        .expect("dial");
    // The status byte a LIMIT refusal shares with "unavailable" is told apart by the stream's
    // stop code, so the caller learns it hit a limit (and does not try other routers).
    let e = ctx
        .dial("bulk")
        .await
        .expect_err("a second stream is over the limit");
    assert!(matches!(e, SdkError::Limit), "{e}");
    assert_eq!(router.stats().grant_limited, 1);

    const BYTES: usize = 1 << 20;
    let start = Instant::now();
    let chunk = vec![7u8; 32 * 1024];
    for _ in 0..BYTES / chunk.len() {
        s.write_all(&chunk).await.expect("upload");
    }
    s.shutdown().await.expect("finish");
    let mut count = [0u8; 8];
    tokio::time::timeout(BOUND, s.read_exact(&mut count))
        .await
        .expect("timely")
        .expect("the host's count");
    assert_eq!(u64::from_be_bytes(count), BYTES as u64);
    let rate = BYTES as f64 / start.elapsed().as_secs_f64();
    eprintln!("SDK upload at {rate:.0} B/s (limit 1048576)");
    let limit = (1u64 << 20) as f64;
    assert!(
        (0.75 * limit..=1.3 * limit).contains(&rate),
        "{rate:.0} B/s"
    );
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_grants_limits_explain_shows_them_and_apply_round_trips_them() {
    let t = TestController::start().await;
    let token = t.path("agent-a.token");
    for args in [
        vec![
            "identity",
            "create",
            "agent-a",
            "--output",
            token.to_str().expect("utf-8"),
        ],
        vec!["service", "create", "echo", "--address", "127.0.0.1:9"],
    ] {
        let o = t.umbra(&args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    let o = t.umbra(&[
        "policy",
        "grant",
        "--name",
        "limited",
        "--identity",
        "@agent-a",
        "--service",
        "@echo",
        "--connections",
        "2",
        "--rate",
        "600/min",
        "--bandwidth",
        "10MiB/s",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p = t.ctrl.state().policies.get(&name("limited")).cloned();
    let l = p.expect("granted").limits;
    assert_eq!(
        l.to_string(),
        "connections=2 rate=600/min bandwidth=10MiB/s"
    );

    let o = t.umbra(&[
        "policy",
        "explain",
        "--identity",
        "agent-a",
        "--service",
        "echo",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("limits of limited: connections=2 rate=600/min bandwidth=10MiB/s"),
        "{}",
        stdout(&o)
    );

    // Bad values are refused before anything is sent, saying what a good one looks like.
    for (flag, bad, hint) in [
        ("--bandwidth", "0MiB/s", "10MiB/s"),
        ("--bandwidth", "lots", "10MiB/s"),
        ("--rate", "10/day", "600/min"),
        ("--connections", "0", "between 1"),
    ] {
        let o = t.umbra(&[
            "policy",
            "grant",
            "--identity",
            "@agent-a",
            "--service",
            "@echo",
            flag,
            bad,
        ]);
        assert!(!o.status.success(), "{flag} {bad} accepted");
        assert!(stderr(&o).contains(hint), "{flag} {bad}: {}", stderr(&o));
    }

    // export writes the limits as fields, and applying the export changes nothing.
    let o = t.umbra(&["export"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc = stdout(&o);
    for field in ["connections: 2", "rate: 600/min", "bandwidth: 10MiB/s"] {
        assert!(doc.contains(field), "{field} in {doc}");
    }
    let file = t.path("exported.yaml");
    std::fs::write(&file, &doc).expect("write");
    let o = t.umbra(&["apply", "-f", file.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "no changes");

    // A changed document changes the limits.
    let changed = doc.replace("bandwidth: 10MiB/s", "bandwidth: 512KiB/s");
    std::fs::write(&file, changed).expect("write");
    let o = t.umbra(&["apply", "-f", file.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p = t.ctrl.state().policies.get(&name("limited")).cloned();
    let b = p.expect("kept").limits.bandwidth.map(|b| b.bytes_per_sec());
    assert_eq!(b, Some(512 * 1024));
}
