//! Routers' decision reports against the real controller and router on 127.0.0.1:0 (issue 16):
//! an agent's dial through a router to an echo service becomes an audit row naming the
//! identity, the service, the granting policy and the bytes each way; a refused dial one naming
//! the reason; a stream cut by a revoked grant one saying so. Only routers may report, and a
//! router's reports are bounded per router (the excess summarized, not stored).

use std::time::{Duration, Instant};

use http::Method;
use umbra_policies::Hosting;
use umbra_proto::api::{AuditEntry, DecisionReport, StreamDecision, StreamOutcome};
use umbra_proto::stream::{encode_request, Op, ServiceRequest, Status};
use umbra_tests::dataplane::{
    agent, agent_raw_client, echo_service, name, raw_dial, revoke_policy, router_identity, service,
    start_router, Echo,
};
use umbra_tests::TestController;

const BOUND: Duration = Duration::from_secs(20);

async fn audit(t: &TestController) -> Vec<AuditEntry> {
    t.admin_client()
        .call(Method::GET, "/v1/audit?limit=10000", None::<&()>)
        .await
        .expect("audit")
}

async fn row(t: &TestController, pred: impl Fn(&AuditEntry) -> bool) -> AuditEntry {
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(e) = audit(t).await.into_iter().find(|e| pred(e)) {
            return e;
        }
        assert!(Instant::now() < deadline, "no such audit row");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_says_who_reached_what_under_which_policy() {
    let t = TestController::start().await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-a").await;
    echo_service(&t, &echo, "echo", "agent-a").await;
    echo_service(&t, &echo, "cut", "agent-a").await;
    service(
        &t,
        "secret",
        Hosting::Address("127.0.0.1:9".parse().expect("hostport")),
    )
    .await;
    let router = start_router(&t, "r1", |_| {}).await;
    let (ep, cfg) = agent_raw_client(&a);
    let conn = ep
        .connect_with(cfg, router.local_addr(), "router.umbra")
        .expect("connect")
        .await
        .expect("admitted");

    // An allowed dial: 11 bytes up, echoed 11 bytes down.
    let (status, mut send, mut recv) = raw_dial(&conn, "echo").await;
    assert_eq!(status, Status::Ok);
    send.write_all(b"hello umbra").await.expect("write");
    send.finish().expect("finish");
    let back = tokio::time::timeout(BOUND, recv.read_to_end(1024))
        .await
        .expect("timely")
        .expect("echoed");
    assert_eq!(back, b"hello umbra");

    // A refused dial: a service the agent has no grant for.
    let (status, _s, _r) = raw_dial(&conn, "secret").await;
    assert_ne!(status, Status::Ok);

    // A stream cut when its grant goes.
    let (status, _cs, _cr) = raw_dial(&conn, "cut").await;
    assert_eq!(status, Status::Ok);
    revoke_policy(&t, "agent-a-cut").await;

    let t0 = Instant::now();
    let done = row(&t, |e| e.action == "router.stream" && e.target == "echo").await;
    println!(
        "the allowed stream's row appeared {:?} after the last revocation",
        t0.elapsed()
    );
    assert!(done.actor.ends_with("/agent/agent-a"), "{}", done.actor);
    assert_eq!(done.detail["policy"], "agent-a-echo");
    assert_eq!(done.detail["bytes_up"], 11);
    assert_eq!(done.detail["bytes_down"], 11);
    assert_eq!(done.detail["reason"], serde_json::Value::Null);
    assert!(done.detail["router"]
        .as_str()
        .is_some_and(|r| r.ends_with("/router/r1")));
    assert!(done.detail["duration_ms"].as_u64().is_some());

    let refused = row(&t, |e| e.action == "router.stream_refused").await;
    assert!(refused.actor.ends_with("/agent/agent-a"));
    assert_eq!(refused.target, "secret");
    assert_eq!(refused.detail["reason"], "not granted");
    assert_eq!(refused.detail["policy"], serde_json::Value::Null);

    let cut = row(&t, |e| e.action == "router.stream_terminated").await;
    assert_eq!(cut.target, "cut");
    assert_eq!(cut.detail["policy"], "agent-a-cut");
    assert_eq!(cut.detail["reason"], "not granted");

    // `umbra audit` shows them to an operator.
    let out = t.umbra(&["audit", "--limit", "50"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "router.stream ",
        "router.stream_refused",
        "router.stream_terminated",
        "secret",
        "policy=agent-a-echo bytes=11/11",
        "reason=\"not granted\"",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

fn decision(i: usize) -> StreamDecision {
    StreamDecision {
        identity: "spiffe://test.umbra/agent/flooder".into(),
        service: format!("svc-{i}"),
        action: "dial".into(),
        outcome: StreamOutcome::Refused,
        policy: None,
        reason: Some("not granted".into()),
        bytes_up: 0,
        bytes_down: 0,
        duration_ms: 0,
    }
}

/// A router that reports more than its bucket holds has the excess counted in one
/// `audit.suppressed` row; a report over the size bound is refused whole; an agent may not
/// report decisions at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_reports_are_bounded_per_router_and_routers_only() {
    let t = TestController::start_with(|c| c.audit.summary_period = Duration::from_secs(1)).await;
    let r = router_identity(&t, "r-flood").await;
    let client = t.client_for(&r);
    let (mut recorded, mut suppressed) = (0u64, 0u64);
    for round in 0..30 {
        let report = DecisionReport {
            decisions: (0..200).map(|i| decision(round * 200 + i)).collect(),
            dropped: if round == 0 { 7 } else { 0 },
        };
        let v: serde_json::Value = client
            .call(Method::POST, "/v1/audit/decisions", Some(&report))
            .await
            .expect("report");
        recorded += v["recorded"].as_u64().expect("recorded");
        suppressed += v["suppressed"].as_u64().expect("suppressed");
    }
    println!("6000 decisions sent: {recorded} stored, {suppressed} suppressed");
    assert!((5000..6000).contains(&recorded), "{recorded}");
    assert_eq!(recorded + suppressed, 6000);
    let summary = row(&t, |e| {
        e.action == "audit.suppressed" && e.actor.ends_with("/router/r-flood")
    })
    .await;
    assert_eq!(
        summary.detail["count"].as_u64(),
        Some(suppressed + 7),
        "{summary:?}"
    );

    let too_many = DecisionReport {
        decisions: (0..201).map(decision).collect(),
        dropped: 0,
    };
    let r: Result<serde_json::Value, _> = client
        .call(Method::POST, "/v1/audit/decisions", Some(&too_many))
        .await;
    assert!(r.is_err(), "an oversized report was taken");

    let a = agent(&t, "agent-a").await;
    let one = DecisionReport {
        decisions: vec![decision(0)],
        dropped: 0,
    };
    let r: Result<serde_json::Value, _> = t
        .client_for(&a)
        .call(Method::POST, "/v1/audit/decisions", Some(&one))
        .await;
    assert!(r.is_err(), "an agent reported router decisions");
}

/// One agent floods a router with refused dials (tens of thousands a second, one connection) to
/// spend the router's share of the audit (its queue to the controller and the controller's
/// bucket for it) so that another agent's refusal right after is only counted, not stored. Each
/// identity has its own budget on the router: the flood is cut to it, and the other agent's
/// refusal is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agents_flood_of_refusals_does_not_push_out_anothers() {
    let t = TestController::start().await;
    let a = agent(&t, "flooder").await;
    let b = agent(&t, "victim").await;
    service(
        &t,
        "secret",
        Hosting::Address("127.0.0.1:9".parse().expect("hostport")),
    )
    .await;
    let router = start_router(&t, "r1", |_| {}).await;
    let connect = |file: &umbra_pki::IdentityFile| {
        let (ep, cfg) = agent_raw_client(file);
        let addr = router.local_addr();
        async move {
            let c = ep
                .connect_with(cfg, addr, "router.umbra")
                .expect("connect")
                .await
                .expect("admitted");
            (ep, c)
        }
    };
    let (_ea, conn) = connect(&a).await;
    let t0 = Instant::now();
    // Bounded: 3 s and 100,000 dials at most, 100 at a time, over one connection.
    let flood = tokio::spawn(async move {
        let mut refused = 0u64;
        for _ in 0..1000 {
            let dials = (0..100).map(|_| async {
                let Ok((mut send, mut recv)) = conn.open_bi().await else {
                    return false;
                };
                let request = ServiceRequest {
                    service: name("secret"),
                };
                let frame = encode_request(Op::Dial, &request).expect("frame");
                if send.write_all(&frame).await.is_err() {
                    return false;
                }
                let mut answer = [0u8; 2];
                recv.read_exact(&mut answer).await.is_ok()
            });
            let done = tokio::time::timeout(BOUND, futures::future::join_all(dials)).await;
            let Ok(done) = done else { break };
            refused += done.into_iter().filter(|ok| *ok).count() as u64;
            if t0.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        refused
    });
    // The other agent's refusal, in the middle of the flood.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_eb, conn_b) = connect(&b).await;
    let (status, _s, _r) = raw_dial(&conn_b, "secret").await;
    assert_ne!(status, Status::Ok);
    let refused = flood.await.expect("the flood");
    println!("{refused} refused dials in {:?}", t0.elapsed());
    assert!(refused >= 10_000, "the flood did not happen: {refused}");
    let theirs = row(&t, |e| {
        e.action == "router.stream_refused" && e.actor.ends_with("/agent/victim")
    })
    .await;
    assert_eq!(theirs.target, "secret");
    let stored = audit(&t)
        .await
        .into_iter()
        .filter(|e| e.action == "router.stream_refused" && e.actor.ends_with("/agent/flooder"))
        .count() as f64;
    let bound = f64::from(umbra_edge_router::REPORT_BURST)
        + f64::from(umbra_edge_router::REPORTS_PER_SEC) * (t0.elapsed().as_secs_f64() + 1.0);
    println!("the flooder's stored refusals: {stored} (its budget: {bound})");
    assert!(stored <= bound, "{stored} > {bound}");
}
