//! Prometheus metrics end to end, control and data plane: the real controller and router (in
//! process and as `umbra controller run` / `umbra router run`), scraped over HTTP and parsed as
//! the exposition format (`umbra_tests::exposition`), never grepped; and the endpoint's bounds.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_metrics::{serve, Registry, ServeOptions};
use umbra_policies::Action;
use umbra_sdk::{Context, SdkError};
use umbra_tests::dataplane::*;
use umbra_tests::exposition::{scrape, Exposition};
use umbra_tests::metrics::*;
use umbra_tests::{eventually, TestController};

/// The bound on anything a test waits for.
const BOUND: Duration = Duration::from_secs(15);

async fn round_trip(s: &mut umbra_sdk::Stream, msg: &[u8]) -> Result<Vec<u8>, SdkError> {
    s.write_all(msg).await.map_err(SdkError::from_io)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.map_err(SdkError::from_io)?;
    Ok(back)
}

#[tokio::test]
async fn router_counts_decisions_bytes_revocations_and_control_lag() {
    let registry = Registry::new();
    let r = registry.clone();
    let t = TestController::start_with(move |c| c.metrics = Some(r)).await;
    let server = endpoint(&registry).await;
    let router = start_router(&t, "r1", |c| c.metrics = Some(registry.clone())).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    service(&t, "echo-b", echo.hosting()).await;
    grant(&t, "pb", Action::Dial, "agent-1", "echo-b").await;
    service(&t, "secret", echo.hosting()).await;
    let ctx = Context::new(a).expect("context");

    // Allowed, and ended normally after 100,000 bytes each way.
    let payload = vec![7u8; 100_000];
    let mut s = ctx.dial("echo").await.expect("dial echo");
    assert_eq!(round_trip(&mut s, &payload).await.expect("echo"), payload);
    // Counted as the bytes move: the stream is still open.
    let live = scrape(server.local_addr()).await.expect("scrape");
    let echo_up = [("service", "echo"), ("direction", "up")];
    let counted = live.value("umbra_router_service_bytes_total", &echo_up);
    assert!(
        counted >= Some(100_000.0),
        "an open stream's bytes: {counted:?}"
    );
    s.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    tokio::time::timeout(BOUND, s.read_to_end(&mut rest))
        .await
        .expect("timely")
        .expect("end");
    // Denied: an existing service not granted, and one that does not exist.
    let e = ctx.dial("secret").await.expect_err("secret is not granted");
    assert!(matches!(e, SdkError::Denied { .. }), "{e}");
    let e = ctx.dial("made-up-1").await.expect_err("no such service");
    assert!(matches!(e, SdkError::Denied { .. }), "{e}");
    // A live stream cut by revoking its grant.
    let mut sb = ctx.dial("echo-b").await.expect("dial echo-b");
    assert_eq!(round_trip(&mut sb, b"b").await.expect("echo"), b"b");
    revoke_policy(&t, "pb").await;
    let cut = tokio::time::timeout(BOUND, async {
        loop {
            if let Err(e) = round_trip(&mut sb, b"ping").await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("cut within the bound");
    assert!(matches!(cut, SdkError::Revoked), "{cut}");

    // A client without a certificate is refused at the handshake.
    let frame = umbra_proto::stream::encode_request(
        umbra_proto::stream::Op::Dial,
        &umbra_proto::stream::ServiceRequest {
            service: name("echo"),
        },
    )
    .expect("frame");
    let (ep, cfg) = raw_client(None);
    let r = tokio::time::timeout(BOUND, raw_request(&ep, &cfg, router.local_addr(), &frame))
        .await
        .expect("timely");
    assert!(r.is_err(), "a client without a certificate got {r:?}");

    // The bytes are counted when the router sees the stream end; wait for that.
    let done = eventually(BOUND, || (echo.open() == 0).then_some(())).await;
    assert!(done.is_some(), "the service connections closed");
    // The client may see the handshake fail before the router's task has counted it.
    let handshake = [("outcome", "refused"), ("reason", "handshake")];
    let deadline = std::time::Instant::now() + BOUND;
    let m = loop {
        let m = scrape(server.local_addr()).await.expect("scrape");
        let counted = m.value("umbra_router_connections_total", &handshake);
        if counted.is_some() || std::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let streams = "umbra_router_streams_total";
    let allowed = [
        ("action", "dial"),
        ("outcome", "allowed"),
        ("service", "echo"),
    ];
    assert_eq!(m.value(streams, &allowed), Some(1.0));
    let denied = [
        ("outcome", "denied"),
        ("service", "secret"),
        ("reason", "not_granted"),
    ];
    assert_eq!(m.value(streams, &denied), Some(1.0));
    // A made-up name is not a label value: the refusal is counted without it.
    let unnamed = [
        ("outcome", "denied"),
        ("service", ""),
        ("reason", "not_granted"),
    ];
    assert_eq!(m.value(streams, &unnamed), Some(1.0));
    assert!(m
        .matching(streams, &[("service", "made-up-1")])
        .next()
        .is_none());
    let cut = [
        ("outcome", "terminated"),
        ("service", "echo-b"),
        ("reason", "not_granted"),
    ];
    assert_eq!(m.value(streams, &cut), Some(1.0));
    let bytes = "umbra_router_service_bytes_total";
    for direction in ["up", "down"] {
        let sent = m.value(bytes, &[("service", "echo"), ("direction", direction)]);
        assert!(
            sent.is_some_and(|b| b >= 100_000.0),
            "{direction}: {sent:?}"
        );
    }
    // A stream cut by a revocation counted what it moved before the cut.
    for direction in ["up", "down"] {
        let cut = m.value(bytes, &[("service", "echo-b"), ("direction", direction)]);
        assert!(cut >= Some(1.0), "the cut stream's {direction}: {cut:?}");
    }
    let revocations = "umbra_router_revocation_cut_seconds";
    assert_eq!(m.value(&format!("{revocations}_count"), &[]), Some(1.0));
    let took = m
        .value(&format!("{revocations}_sum"), &[])
        .unwrap_or(f64::NAN);
    assert!((0.0..1.0).contains(&took), "revocation to cut: {took} s");
    assert_eq!(
        m.value("umbra_router_connections_total", &[("outcome", "admitted")]),
        Some(1.0)
    );
    assert_eq!(
        m.value("umbra_router_connections_total", &handshake),
        Some(1.0)
    );
    assert!(m.value("umbra_router_handshake_seconds_count", &[]) >= Some(1.0));
    assert_eq!(
        m.value("umbra_router_policy_check_seconds_count", &[]),
        Some(4.0)
    );
    assert!(m.value("umbra_router_policy_compile_seconds_count", &[]) >= Some(1.0));
    assert_eq!(
        m.value("umbra_router_control_failing_closed", &[]),
        Some(0.0)
    );
    assert_eq!(m.value("umbra_router_control_lag", &[]), Some(0.0));
    let applied = m.value("umbra_router_control_applied_seq", &[]);
    assert_eq!(
        applied,
        router.policy().borrow().as_ref().map(|p| p.seq as f64)
    );
    let stale = m
        .value("umbra_router_control_staleness_seconds", &[])
        .unwrap_or(f64::NAN);
    assert!((0.0..5.0).contains(&stale), "staleness {stale}");
    assert_eq!(m.value("umbra_router_held_connections", &[]), Some(1.0));
    println!(
        "revocation to cut {:.1} ms, staleness {stale:.2} s",
        took * 1e3
    );
    router.shutdown().await;
}

#[tokio::test]
async fn idle_connections_do_not_block_a_scrape() {
    let registry = Registry::new();
    let server = endpoint(&registry).await;
    // Far more idle connections than the endpoint holds.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(
            tokio::net::TcpStream::connect(server.local_addr())
                .await
                .expect("connect"),
        );
    }
    let started = Instant::now();
    let m = tokio::time::timeout(Duration::from_secs(2), scrape(server.local_addr()))
        .await
        .expect("a scrape is answered at once")
        .expect("scrape");
    let took = started.elapsed();
    assert!(m.samples.is_empty());
    let held = server.connections();
    assert!(held <= ServeOptions::default().max_connections, "{held}");
    println!("scrape behind 100 idle connections: {took:?}, {held} held");
}

#[tokio::test]
async fn a_non_loopback_address_needs_consent() {
    let addr = "0.0.0.0:0".parse().expect("addr");
    let refused = serve(addr, Registry::new(), ServeOptions::default()).await;
    assert!(matches!(
        refused,
        Err(umbra_metrics::ServeError::NotLoopback(_))
    ));
}

#[test]
fn an_exposition_without_eof_is_refused() {
    assert!(Exposition::parse("# TYPE x gauge\nx 1\n").is_err());
}

#[tokio::test]
async fn umbra_controller_run_and_router_run_serve_their_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("ctrl");
    let listen = free_port();
    let o = umbra_tests::umbra_cmd(
        &[
            "controller",
            "init",
            "--dir",
            &d.display().to_string(),
            "--address",
            &listen.to_string(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", umbra_tests::stderr(&o));
    let metrics = free_port();
    let mut cmd = std::process::Command::new(umbra_tests::umbra_bin());
    cmd.args(["controller", "run", "--dir", &d.display().to_string()])
        .args([
            "--listen",
            &listen.to_string(),
            "--metrics",
            &metrics.to_string(),
        ])
        .env("UMBRA_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _child = Child(cmd.spawn().expect("umbra controller run"));
    let admin = d.join("admin.json").display().to_string();
    let listed = eventually(BOUND, || {
        let o = umbra_tests::umbra_cmd(&["--admin", &admin, "identity", "list"], &[]);
        o.status.success().then_some(())
    })
    .await;
    assert!(listed.is_some(), "the controller answers");
    let m = scrape(metrics).await.expect("scrape");
    let list = [
        ("route", "/v1/identities"),
        ("method", "GET"),
        ("status", "200"),
    ];
    assert!(m.value("umbra_controller_requests_total", &list) >= Some(1.0));
    assert_eq!(m.value("umbra_controller_store_in_touch", &[]), Some(1.0));
    assert_eq!(m.value("umbra_controller_store_shared", &[]), Some(0.0));

    // A router enrolled and run from the command line, following that controller.
    let token = dir.path().join("router.token").display().to_string();
    let o = umbra_tests::umbra_cmd(
        &["--admin", &admin, "router", "create", "r1", "-o", &token],
        &[],
    );
    assert!(o.status.success(), "{}", umbra_tests::stderr(&o));
    let rdir = dir.path().join("router").display().to_string();
    let ctrl = listen.to_string();
    let o = umbra_tests::umbra_cmd(
        &[
            "--controller",
            &ctrl,
            "router",
            "enroll",
            &token,
            "--dir",
            &rdir,
        ],
        &[],
    );
    assert!(o.status.success(), "{}", umbra_tests::stderr(&o));
    let router_metrics = free_port();
    let mut cmd = std::process::Command::new(umbra_tests::umbra_bin());
    cmd.args(["--controller", &ctrl, "router", "run", "--dir", &rdir])
        .args(["--listen", "127.0.0.1:0", "--lanes", "1"])
        .args(["--metrics", &router_metrics.to_string()])
        .env("UMBRA_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _router = Child(cmd.spawn().expect("umbra router run"));
    let mut m = Exposition::default();
    let deadline = Instant::now() + BOUND;
    while Instant::now() < deadline {
        m = scrape(router_metrics).await.unwrap_or_default();
        if m.value("umbra_router_control_failing_closed", &[]) == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        m.value("umbra_router_control_failing_closed", &[]),
        Some(0.0)
    );
    assert_eq!(m.value("umbra_router_control_lag", &[]), Some(0.0));
    let stale = m.value("umbra_router_control_staleness_seconds", &[]);
    assert!(stale < Some(5.0), "{stale:?}");
}

/// An agent (any enrolled identity may call the API) sends requests to a real route with
/// methods it makes up: each would be a new time series if the method were a label as sent.
/// The methods HTTP defines are labels; any other is `other`.
#[tokio::test]
async fn made_up_http_methods_add_no_series_to_the_controllers_metrics() {
    let registry = Registry::new();
    let r = registry.clone();
    let t = TestController::start_with(move |c| c.metrics = Some(r)).await;
    let a = agent(&t, "agent-1").await;
    let client = t.client_for(&a);
    for i in 0..50 {
        let m = http::Method::from_bytes(format!("X{i}").as_bytes()).expect("a method");
        let _: Result<serde_json::Value, _> = client.call(m, "/v1/audit/events", None::<&()>).await;
    }
    let _: Result<serde_json::Value, _> = client
        .call(http::Method::GET, "/v1/audit/events", None::<&()>)
        .await;
    let m = Exposition::parse(&registry.encode()).expect("exposition");
    let methods: std::collections::BTreeSet<String> = m
        .matching("umbra_controller_requests_total", &[])
        .filter_map(|s| s.labels.get("method").cloned())
        .collect();
    println!("method labels: {methods:?}");
    // The test's own setup posted as an admin; the agent's made-up methods are all `other`.
    let want: std::collections::BTreeSet<String> = ["GET", "POST", "other"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(methods, want);
    let made_up = m.sum("umbra_controller_requests_total", &[("method", "other")]);
    assert_eq!(made_up, 50.0);
}
