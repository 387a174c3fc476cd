//! `umbra audit --follow` against the real controller on 127.0.0.1:0 (issue 16): entries appear
//! as they are committed, in order, through the API and through the real binary, which resumes
//! after the controller restarts without losing or repeating one; only admins may follow, and
//! each within its identity's stream limit.

use std::io::BufRead;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use http::Method;
use umbra_proto::api::{
    AuditEntry, DecisionReport, ReportEventsRequest, ReportedEvent, StreamDecision, StreamOutcome,
};
use umbra_sdk::ControllerClient;
use umbra_tests::dataplane::{agent, revoke_identity, router_identity};
use umbra_tests::{umbra_bin, TestController};

const BOUND: Duration = Duration::from_secs(20);

async fn report(client: &ControllerClient, kind: &str, host: &str) {
    let req = ReportEventsRequest {
        events: vec![ReportedEvent {
            kind: kind.into(),
            sandbox: "umbra-follow".into(),
            at: "2026-01-01T00:00:00Z".into(),
            detail: serde_json::json!({ "host": host }),
        }],
    };
    let _: serde_json::Value = client
        .call(Method::POST, "/v1/audit/events", Some(&req))
        .await
        .expect("report");
}

/// Reads JSON lines from a follow stream until `n` entries came (keepalives skipped).
async fn entries(
    s: &mut umbra_sdk::ResponseStream,
    buf: &mut Vec<u8>,
    n: usize,
) -> Vec<AuditEntry> {
    let mut out = Vec::new();
    let deadline = Instant::now() + BOUND;
    while out.len() < n {
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            if line.len() > 1 {
                out.push(serde_json::from_slice(&line).expect("an entry"));
            }
        }
        if out.len() >= n {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, s.chunk())
            .await
            .expect("entries in time")
            .expect("stream")
            .expect("not ended");
        buf.extend_from_slice(&chunk);
    }
    out
}

/// A follower sees a revocation and then a sandbox's reported refusal, in order, each within
/// moments of its commit; an agent may not follow; an admin's streams are bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sees_commits_in_order_and_only_admins_follow() {
    let t = TestController::start().await;
    let a = agent(&t, "agent-a").await;
    let _victim = agent(&t, "victim").await;
    let admin = t.admin_client();
    let mut s = admin.stream("/v1/audit/follow").await.expect("follow");
    let mut buf = Vec::new();

    let t0 = Instant::now();
    revoke_identity(&t, "victim").await;
    report(&t.client_for(&a), "dial_denied", "evil.example").await;
    let got = entries(&mut s, &mut buf, 2).await;
    println!(
        "both entries followed {:?} after the revocation began",
        t0.elapsed()
    );
    assert_eq!(got[0].action, "identity.revoke");
    assert_eq!(got[0].target, "victim");
    assert_eq!(got[1].action, "sandbox.dial_denied");
    assert!(got[1].actor.ends_with("/agent-a"), "{}", got[1].actor);
    assert_eq!(got[1].detail["event"]["host"], "evil.example");
    assert!(got[0].id < got[1].id);

    // From an id: the history after it, then what comes next.
    let mut from = admin
        .stream(&format!("/v1/audit/follow?after={}", got[0].id - 1))
        .await
        .expect("follow from an id");
    let mut buf2 = Vec::new();
    let again = entries(&mut from, &mut buf2, 2).await;
    assert_eq!(
        again.iter().map(|e| e.id).collect::<Vec<_>>(),
        got.iter().map(|e| e.id).collect::<Vec<_>>()
    );

    // An agent may not follow the audit log.
    let refused = t.client_for(&a).stream("/v1/audit/follow").await;
    assert!(refused.is_err(), "an agent followed the audit log");

    // One admin holds at most its identity's stream limit (8), two of which are open here.
    let mut held = Vec::new();
    let mut refused_at = None;
    for i in 0..10 {
        match admin.stream("/v1/audit/follow").await {
            Ok(s) => held.push(s),
            Err(e) => {
                refused_at = Some((i, e.to_string()));
                break;
            }
        }
    }
    let (i, why) = refused_at.expect("the streams are bounded");
    assert_eq!(i, 6, "{why}");
}

fn spawn_follow(t: &TestController) -> (Child, mpsc::Receiver<String>) {
    let mut child = std::process::Command::new(umbra_bin())
        .args(["audit", "--follow", "--json", "--limit", "1"])
        .env("UMBRA_ADMIN", t.admin_path())
        .env("UMBRA_CONTROLLER", t.addr())
        .env("UMBRA_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("umbra audit --follow");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Waits for the next printed entry whose action is `action`, collecting every line.
fn next_action(rx: &mpsc::Receiver<String>, seen: &mut Vec<AuditEntry>, action: &str) {
    let deadline = Instant::now() + BOUND;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("{action} printed in time; saw {seen:?}"));
        let e: AuditEntry = serde_json::from_str(&line).expect("a JSON line");
        let done = e.action == action;
        seen.push(e);
        if done {
            return;
        }
    }
}

/// The real binary follows with `--json`, and after the controller restarts on the same port it
/// resumes from its last id: every entry once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_follows_and_resumes_after_a_controller_restart() {
    let t = TestController::start().await;
    let a = agent(&t, "agent-a").await;
    let (mut child, rx) = spawn_follow(&t);
    let mut seen = Vec::new();
    // `--limit 1`: the newest entry (the agent's enrollment) first.
    next_action(&rx, &mut seen, "identity.enroll");
    let _victim = agent(&t, "victim").await;
    revoke_identity(&t, "victim").await;
    next_action(&rx, &mut seen, "identity.revoke");

    let t = t.restart_in_place().await;
    report(&t.client_for(&a), "dns_refused", "after-restart.example").await;
    next_action(&rx, &mut seen, "sandbox.dns_refused");
    let _ = child.kill();
    let _ = child.wait();

    let ids: Vec<u64> = seen.iter().map(|e| e.id).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted, "in order, none twice: {seen:?}");
    let all: Vec<AuditEntry> = t
        .admin_client()
        .call(Method::GET, "/v1/audit?limit=1000", None::<&()>)
        .await
        .expect("audit");
    let first = ids[0];
    let want: Vec<u64> = all.iter().map(|e| e.id).filter(|&i| i >= first).collect();
    assert_eq!(ids, want, "none missed");
}

/// A follower that stops reading while the log grows by tens of megabytes is dropped after
/// `SLOW` (10 s): its stream ends, and after the lines already queued, in order, it reads why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_stops_reading_is_dropped_and_told_why() {
    let t = TestController::start().await;
    let mut s = t
        .admin_client()
        .stream("/v1/audit/follow")
        .await
        .expect("follow");
    // Routers' decision reports are the fastest way to grow the log: 8 routers x 5,000 rows of
    // about 400 bytes, more than the socket buffers between us hold.
    let pad = "x".repeat(200);
    let mut tasks = tokio::task::JoinSet::new();
    for r in 0..8 {
        let client = t.client_for(&router_identity(&t, &format!("r{r}")).await);
        let pad = pad.clone();
        tasks.spawn(async move {
            for round in 0..25 {
                let report = DecisionReport {
                    decisions: (0..200)
                        .map(|i| StreamDecision {
                            identity: "spiffe://test.umbra/agent/a".into(),
                            service: format!("svc-{round}-{i}"),
                            action: "dial".into(),
                            outcome: StreamOutcome::Refused,
                            policy: None,
                            reason: Some(pad.clone()),
                            bytes_up: 0,
                            bytes_down: 0,
                            duration_ms: 0,
                        })
                        .collect(),
                    dropped: 0,
                };
                let _: serde_json::Value = client
                    .call(Method::POST, "/v1/audit/decisions", Some(&report))
                    .await
                    .expect("report");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    // Stalled past SLOW.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.chunk())
            .await
            .expect("the stream ends")
        {
            Ok(Some(b)) => buf.extend_from_slice(&b),
            Ok(None) | Err(_) => break,
        }
    }
    let lines: Vec<serde_json::Value> = (buf.split(|&b| b == b'\n'))
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("JSON lines"))
        .collect();
    let last = lines.last().expect("lines");
    let why = last["error"].as_str().expect("the last line says why");
    assert!(why.contains("dropped") && why.contains("after="), "{why}");
    let ids: Vec<u64> = lines.iter().filter_map(|l| l["id"].as_u64()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] + 1 == w[1]),
        "in order, none missing"
    );
    println!(
        "a stalled follower got {} of 40,000+ rows, then: {why}",
        ids.len()
    );
    assert!(ids.len() < 40_000, "the follower was not dropped");
}

/// Followers are bounded in all, not only per identity: five admins holding as many follows
/// as each may get 32 between them, and the next is refused; one that ends frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_are_bounded_in_all() {
    let t = TestController::start().await;
    let mut admins = Vec::new();
    for i in 0..5 {
        let req = umbra_proto::api::CreateIdentityRequest {
            name: umbra_tests::dataplane::name(&format!("admin-{i}")),
            kind: umbra_policies::IdentityKind::Admin,
            roles: Default::default(),
            token_ttl_secs: None,
        };
        let tok: umbra_proto::api::TokenResponse = t
            .admin_client()
            .call(Method::POST, "/v1/identities", Some(&req))
            .await
            .expect("create admin");
        let file = umbra_sdk::enroll(&tok.token, Some(&t.addr()))
            .await
            .expect("enroll admin");
        admins.push(t.client_for(&file));
    }
    let total = umbra_controller::audit::reader::MAX_FOLLOWERS;
    let mut held = Vec::new();
    let mut refused = 0;
    for admin in &admins {
        for _ in 0..8 {
            match admin.stream("/v1/audit/follow").await {
                Ok(s) => held.push(s),
                Err(_) => refused += 1,
            }
        }
    }
    assert_eq!(held.len(), total, "{refused} refused");
    assert_eq!(refused, 5 * 8 - total);
    // A follower that goes away frees its place for another.
    drop(held.pop());
    let again = tokio::time::timeout(BOUND, async {
        loop {
            if let Ok(s) = admins[4].stream("/v1/audit/follow").await {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(again.is_ok(), "a freed place is taken again");
}
