//! Event sinks against the real controller on 127.0.0.1:0 (issue 16, alerts): a signed HTTPS
//! webhook (a faithful fake receiver that checks the signature), a JSON-lines file and syslog
//! over UDP on loopback get what agents report and what operators do, filtered by kind, within
//! a second of the commit; an outage of the receiver (and a controller restart during it)
//! loses nothing; a sink down for longer than its bounds skips ahead and says so.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use http::Method;
use umbra_controller::ControllerConfig;
use umbra_proto::api::{AuditEntry, ReportEventsRequest, ReportedEvent};
use umbra_sdk::ControllerClient;
use umbra_tests::dataplane::{agent, echo_service, revoke_identity, start_router, Echo};
use umbra_tests::fake_webhook::FakeWebhook;
use umbra_tests::pg::PgServer;
use umbra_tests::{eventually, umbra_bin, TestController};

const SECRET: &str = "a-webhook-secret-of-32-bytes-...";
/// Asserted per event: the issue's "an alert within a second".
const ALERT_WITHIN: Duration = Duration::from_secs(1);
const BOUND: Duration = Duration::from_secs(20);

fn sinks(yaml: &str) -> impl FnOnce(&mut ControllerConfig) {
    let parsed = umbra_controller::sinks::config::parse(yaml, |_| None).expect("sinks file");
    move |c: &mut ControllerConfig| c.sinks = parsed
}

async fn report(client: &ControllerClient, kind: &str, tag: &str, n: usize) {
    let req = ReportEventsRequest {
        events: (0..n)
            .map(|i| ReportedEvent {
                kind: kind.into(),
                sandbox: "umbra-sinks".into(),
                at: "2026-01-01T00:00:00Z".into(),
                detail: serde_json::json!({ "host": format!("{tag}-{i}.example"), "port": 443 }),
            })
            .collect(),
    };
    let r: serde_json::Value = client
        .call(Method::POST, "/v1/audit/events", Some(&req))
        .await
        .expect("report");
    assert_eq!(r["recorded"], n, "{r}");
}

async fn audit(t: &TestController) -> Vec<AuditEntry> {
    t.admin_client()
        .call(Method::GET, "/v1/audit?limit=10000", None::<&()>)
        .await
        .expect("audit")
}

/// Waits until the receiver has an event matching `pred`; returns when it arrived, after `t0`.
async fn arrives(
    hook: &FakeWebhook,
    t0: Instant,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    eventually(BOUND, || {
        hook.received()
            .iter()
            .find(|r| pred(&r.event))
            .map(|r| r.at.saturating_duration_since(t0))
    })
    .await
    .expect("the event reaches the webhook")
}

/// A refusal a sandbox reports and a revocation each reach the webhook, correctly signed,
/// within a second; the webhook's filter keeps other kinds out while the file sink (all kinds)
/// and the syslog sink (`sandbox.*`) get theirs, as RFC 5424 over UDP on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_revocations_reach_the_sinks_within_a_second() {
    let work = tempfile::tempdir().expect("tempdir");
    let hook = FakeWebhook::start(work.path(), SECRET).await;
    let syslog = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("udp");
    let jsonl = work.path().join("events.jsonl");
    let yaml = format!(
        r#"
sinks:
  - name: secops
    kind: webhook
    url: {url}
    secret: {SECRET}
    ca_file: {ca}
    events: [sandbox.dial_denied, sandbox.dns_refused, identity.revoke]
  - name: archive
    kind: file
    path: {jsonl}
    max_bytes: 65536
    keep: 2
  - name: siem
    kind: syslog
    udp: {udp}
    events: ["sandbox.*"]
"#,
        url = hook.url(),
        ca = hook.ca_file.display(),
        jsonl = jsonl.display(),
        udp = syslog.local_addr().expect("addr"),
    );
    let t = TestController::start_with(sinks(&yaml)).await;
    let a = agent(&t, "agent-a").await;
    let client = t.client_for(&a);

    let t0 = Instant::now();
    report(&client, "dial_denied", "first", 1).await;
    let took = arrives(&hook, t0, |e| e["kind"] == "sandbox.dial_denied").await;
    println!("a reported dial refusal reached the webhook {took:?} after the report was sent");
    assert!(took < ALERT_WITHIN, "report to webhook took {took:?}");

    let _victim = agent(&t, "victim").await;
    let t1 = Instant::now();
    revoke_identity(&t, "victim").await;
    let took = arrives(&hook, t1, |e| e["kind"] == "identity.revoke").await;
    println!("a revocation reached the webhook {took:?} after the command was sent");
    assert!(took < ALERT_WITHIN, "revocation to webhook took {took:?}");

    report(&client, "dns_refused", "dns", 1).await;
    report(&client, "started", "noise", 1).await;
    arrives(&hook, Instant::now(), |e| {
        e["kind"] == "sandbox.dns_refused"
    })
    .await;
    // What the webhook got: its three kinds only, each once, with the agent as actor.
    let got = hook.received();
    let kinds: Vec<&str> = got
        .iter()
        .filter_map(|r| r.event["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "sandbox.dial_denied",
            "identity.revoke",
            "sandbox.dns_refused"
        ],
        "the filter keeps identity.create and sandbox.started out"
    );
    assert!(got[0].event["actor"]
        .as_str()
        .is_some_and(|a| a.ends_with("/agent-a")));
    assert_eq!(got[0].event["detail"]["event"]["host"], "first-0.example");
    assert_eq!(hook.bad_signatures(), 0);

    // The file sink has every kind, as JSON lines, in a 0600 file.
    let lines = eventually(BOUND, || {
        let text = std::fs::read_to_string(&jsonl).ok()?;
        let kinds: Vec<String> = (text.lines())
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["kind"].as_str().map(str::to_owned))
            .collect();
        kinds
            .iter()
            .any(|k| k == "sandbox.started")
            .then_some(kinds)
    })
    .await
    .expect("the file sink writes every kind");
    for k in [
        "identity.create",
        "sandbox.dial_denied",
        "identity.revoke",
        "sandbox.started",
    ] {
        assert!(lines.iter().any(|l| l == k), "{k} missing from {lines:?}");
    }
    let mode = std::fs::metadata(&jsonl)
        .expect("meta")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    // Syslog: the three sandbox events, each a datagram that parses as RFC 5424.
    let mut buf = vec![0u8; 65536];
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let n = tokio::time::timeout(BOUND, syslog.recv(&mut buf))
            .await
            .expect("a syslog datagram")
            .expect("recv");
        let text = std::str::from_utf8(&buf[..n]).expect("utf-8").to_owned();
        let m = syslog_rfc5424::parse_message(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(m.appname.as_deref(), Some("umbra"));
        seen.push(m.msgid.clone().unwrap_or_default());
    }
    assert_eq!(
        seen,
        [
            "sandbox.dial_denied",
            "sandbox.dns_refused",
            "sandbox.started"
        ]
    );
}

/// The receiver answers 500, then drops connections, and the controller restarts in the
/// middle; once the receiver is back, every event reported before, during and after the
/// outage arrives, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_outage_and_a_controller_restart_lose_no_event() {
    let work = tempfile::tempdir().expect("tempdir");
    let hook = FakeWebhook::start(work.path(), SECRET).await;
    let yaml = format!(
        "sinks:\n  - {{name: hook, kind: webhook, url: '{}', secret: '{SECRET}', ca_file: '{}', events: ['sandbox.*'], batch: 7}}\n",
        hook.url(),
        hook.ca_file.display()
    );
    let t = TestController::start_with(sinks(&yaml)).await;
    let a = agent(&t, "agent-a").await;
    report(&t.client_for(&a), "dial_denied", "before", 5).await;
    eventually(BOUND, || (hook.received().len() >= 5).then_some(()))
        .await
        .expect("first five");

    hook.answer(500);
    for i in 0..4 {
        report(&t.client_for(&a), "dial_denied", &format!("during{i}"), 5).await;
    }
    eventually(BOUND, || (hook.refused() >= 2).then_some(()))
        .await
        .expect("the sink retried");
    hook.answer(0);
    let t = t.restart().await;
    let client = t.client_for(&a);
    report(&client, "dns_refused", "after-restart", 5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        hook.received().len(),
        5,
        "nothing is delivered while the receiver is down"
    );
    hook.answer(200);
    let back = Instant::now();
    report(&client, "dial_denied", "after", 5).await;

    let want: Vec<u64> = audit(&t)
        .await
        .into_iter()
        .filter(|e| e.action.starts_with("sandbox."))
        .map(|e| e.id)
        .collect();
    assert_eq!(want.len(), 35);
    let got = eventually(BOUND, || {
        let ids: Vec<u64> = (hook.received().iter())
            .filter_map(|r| r.event["id"].as_u64())
            .collect();
        let distinct: HashSet<u64> = ids.iter().copied().collect();
        want.iter().all(|w| distinct.contains(w)).then_some(ids)
    })
    .await
    .expect("every event arrives once the receiver is back");
    println!(
        "35 events delivered, {} deliveries, caught up {:?} after the receiver came back",
        got.len(),
        back.elapsed()
    );
    let mut counts = BTreeMap::new();
    for id in &got {
        *counts.entry(*id).or_insert(0) += 1;
    }
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "repeats: {repeated:?}");
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(got, sorted, "delivered in order");
    assert_eq!(hook.bad_signatures(), 0);
}

/// A sink whose receiver stays down past `max_lag_events` skips ahead: it delivers one
/// `sinks.dropped` record with the count instead of the backlog, then what comes after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_down_too_long_skips_ahead_and_says_how_many_it_dropped() {
    let work = tempfile::tempdir().expect("tempdir");
    let hook = FakeWebhook::start(work.path(), SECRET).await;
    let yaml = format!(
        "sinks:\n  - {{name: hook, kind: webhook, url: '{}', secret: '{SECRET}', ca_file: '{}', events: ['sandbox.*'], max_lag_events: 20}}\n",
        hook.url(),
        hook.ca_file.display()
    );
    let t = TestController::start_with(sinks(&yaml)).await;
    let a = agent(&t, "agent-a").await;
    let client = t.client_for(&a);
    hook.answer(500);
    report(&client, "dial_denied", "backlog", 50).await;
    eventually(BOUND, || (hook.refused() >= 2).then_some(()))
        .await
        .expect("the sink retried");
    hook.answer(200);
    let dropped = eventually(BOUND, || {
        (hook.received().iter())
            .find(|r| r.event["kind"] == "sinks.dropped")
            .map(|r| r.event.clone())
    })
    .await
    .expect("a dropped record");
    println!("dropped record: {dropped}");
    assert!(
        dropped["detail"]["count"].as_u64().is_some_and(|n| n >= 50),
        "{dropped}"
    );
    assert_eq!(dropped["target"], "hook");
    report(&client, "dial_denied", "fresh", 3).await;
    eventually(BOUND, || {
        let got = hook.received();
        let fresh = got
            .iter()
            .filter(|r| {
                r.event["detail"]["event"]["host"]
                    .as_str()
                    .is_some_and(|h| h.starts_with("fresh-"))
            })
            .count();
        (fresh == 3).then_some(())
    })
    .await
    .expect("events after the skip are delivered");
    let backlog = hook
        .received()
        .iter()
        .filter(|r| {
            r.event["detail"]["event"]["host"]
                .as_str()
                .is_some_and(|h| h.starts_with("backlog-"))
        })
        .count();
    assert_eq!(
        backlog, 0,
        "the backlog past the bound is skipped, not delivered"
    );
}

/// Rows a file's JSON lines name: (id, kind, reported host or target).
fn rows_of(path: &std::path::Path) -> Vec<(u64, String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    (text.lines())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            let host = v["detail"]["event"]["host"].as_str().map(str::to_owned);
            (
                v["id"].as_u64().unwrap_or(0),
                v["kind"].as_str().unwrap_or_default().to_owned(),
                host.unwrap_or_else(|| v["target"].as_str().unwrap_or_default().to_owned()),
            )
        })
        .collect()
}

/// On PostgreSQL shared by two controllers given the same sinks file, one of them at a time
/// delivers the sink (a lock in the store), in id order and each row once, what agents report
/// to either; when it stops, the other takes over from the cursor it left in the store. A
/// follower on the second sees rows the first commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_one_controller_at_a_time_delivers_a_sink_and_another_takes_over() {
    let work = tempfile::tempdir().expect("tempdir");
    let jsonl = work.path().join("events.jsonl");
    let yaml = format!(
        "sinks:\n  - {{name: archive, kind: file, path: '{}', events: ['sandbox.*', 'identity.*']}}\n",
        jsonl.display()
    );
    let store: umbra_controller::StoreConfig =
        PgServer::shared().database().parse().expect("store url");
    let parsed = umbra_controller::sinks::config::parse(&yaml, |_| None).expect("sinks file");
    let mut first = TestController::start_with(move |c| {
        c.store = store;
        c.sinks = parsed;
    })
    .await;
    // The same sinks file: the first leads it already.
    let mut second = first.join().await;
    let a = agent(&first, "agent-a").await;
    let mut follow = second
        .admin_client()
        .stream("/v1/audit/follow")
        .await
        .expect("follow on the second");
    let t0 = Instant::now();
    report(&first.client_for(&a), "dial_denied", "via-first", 1).await;
    report(&second.client_for(&a), "dns_refused", "via-second", 1).await;
    eventually(BOUND, || {
        let rows = rows_of(&jsonl);
        rows.iter()
            .any(|r| r.2 == "via-second-0.example")
            .then_some(())
    })
    .await
    .expect("the second controller's rows are delivered");
    println!(
        "both controllers' reports delivered after {:?}",
        t0.elapsed()
    );

    // A follower on the second sees the first's rows.
    let mut buf = Vec::new();
    let deadline = Instant::now() + BOUND;
    let mut seen = Vec::new();
    while !seen.iter().any(|k: &String| k == "sandbox.dial_denied") {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, follow.chunk())
            .await
            .expect("in time")
            .expect("stream")
            .expect("open");
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            if let Ok(e) = serde_json::from_slice::<AuditEntry>(&line) {
                seen.push(e.action);
            }
        }
    }
    drop(follow);

    // The leader stops; the second takes the sink over where the first left it.
    first.stop().await;
    let t1 = Instant::now();
    report(&second.client_for(&a), "dial_denied", "after-failover", 1).await;
    eventually(BOUND, || {
        let rows = rows_of(&jsonl);
        rows.iter()
            .any(|r| r.2 == "after-failover-0.example")
            .then_some(())
    })
    .await
    .expect("the second controller takes the sink over");
    println!("the sink failed over in {:?}", t1.elapsed());
    let rows = rows_of(&jsonl);
    let ids: Vec<u64> = rows.iter().map(|r| r.0).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in order, each once: {rows:?}"
    );
    for want in ["via-first-0.example", "via-second-0.example", "agent-a"] {
        assert!(
            rows.iter().any(|r| r.2 == want),
            "{want} missing from {rows:?}"
        );
    }
    second.stop().await;
}

/// A real sandboxed agent (`umbra run`) asks for a name it has no grant for: the refusal raises
/// a webhook alert within a second of the attempt inside the sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_inside_a_sandbox_raises_a_webhook_alert_within_a_second() {
    let work = tempfile::tempdir().expect("tempdir");
    let hook = FakeWebhook::start(work.path(), SECRET).await;
    let yaml = format!(
        "sinks:\n  - {{name: secops, kind: webhook, url: '{}', secret: '{SECRET}', ca_file: '{}', events: [sandbox.dial_denied, sandbox.dns_refused]}}\n",
        hook.url(),
        hook.ca_file.display()
    );
    let t = TestController::start_with(sinks(&yaml)).await;
    let _router = start_router(&t, "router-1", |_| {}).await;
    let echo = Echo::start().await;
    let file = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let identity = t.path("agent-1.json");
    file.save(&identity).expect("save identity");
    let ws = tempfile::Builder::new()
        .prefix("umbra-ws-")
        .tempdir()
        .expect("workspace");
    // The time of the attempt, written down inside the sandbox just before it.
    let script = "date +%s%N > before; getent hosts exfil.example.com; sleep 3";
    let mut run = std::process::Command::new(umbra_bin())
        .args(["run", "--identity"])
        .arg(&identity)
        .arg("--workspace")
        .arg(ws.path())
        .args(["--", "/bin/sh", "-c", script])
        .env("UMBRA_ADMIN", t.admin_path())
        .env("UMBRA_CONTROLLER", t.addr())
        .env("UMBRA_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("umbra run");
    let alert = eventually(BOUND, || {
        hook.received()
            .into_iter()
            .find(|r| r.event["kind"] == "sandbox.dns_refused")
    })
    .await
    .expect("the sandbox's refusal reaches the webhook");
    let before: u128 = std::fs::read_to_string(ws.path().join("before"))
        .expect("the attempt's time")
        .trim()
        .parse()
        .expect("nanoseconds");
    let arrived = alert
        .wall
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos();
    let took =
        Duration::from_nanos(u64::try_from(arrived.saturating_sub(before)).unwrap_or(u64::MAX));
    println!("a refused name inside a sandbox alerted the webhook {took:?} after the attempt");
    assert!(took < ALERT_WITHIN, "{took:?}");
    assert!(
        alert.event["detail"]
            .to_string()
            .contains("exfil.example.com"),
        "{}",
        alert.event
    );
    assert!(alert.event["actor"]
        .as_str()
        .is_some_and(|a| a.ends_with("/agent/agent-1")));
    let status = eventually(BOUND, || run.try_wait().ok().flatten()).await;
    if status.is_none() {
        let _ = run.kill();
        let _ = run.wait();
    }
    assert!(status.is_some_and(|s| s.success()), "umbra run: {status:?}");
}

/// On PostgreSQL an id is taken at insert and becomes visible at commit, so a row can commit
/// after a higher id was delivered: the sink looks for the id it saw missing and delivers the
/// row when its transaction commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_a_row_committed_out_of_id_order_is_still_delivered() {
    let work = tempfile::tempdir().expect("tempdir");
    let jsonl = work.path().join("events.jsonl");
    let yaml = format!(
        "sinks:\n  - {{name: archive, kind: file, path: '{}', events: ['sandbox.*']}}\n",
        jsonl.display()
    );
    let url = PgServer::shared().database();
    let store: umbra_controller::StoreConfig = url.parse().expect("store url");
    let parsed = umbra_controller::sinks::config::parse(&yaml, |_| None).expect("sinks file");
    let t = TestController::start_with(move |c| {
        c.store = store;
        c.sinks = parsed;
    })
    .await;
    let a = agent(&t, "agent-a").await;
    let mut follow = t
        .admin_client()
        .stream("/v1/audit/follow")
        .await
        .expect("follow");
    // A transaction that takes an id now and commits later, as a slow writer would.
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (took, taken) = std::sync::mpsc::channel::<i64>();
    let holder = std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        let mut tx = c.transaction().expect("begin");
        let row = tx
            .query_one(
                "INSERT INTO audit (at, actor, action, target, detail, origin) VALUES \
                 (extract(epoch from now())::bigint, 'spiffe://test.umbra/agent/slow', \
                  'sandbox.dial_denied', 'late-row', '{}', 'agent') RETURNING id",
                &[],
            )
            .expect("insert");
        took.send(row.get::<_, i64>(0)).expect("send id");
        released.recv().expect("release");
        tx.commit().expect("commit");
    });
    let held = taken.recv_timeout(BOUND).expect("the held id");
    report(&t.client_for(&a), "dial_denied", "after-held", 1).await;
    let targets = |text: &str| -> Vec<(u64, String)> {
        (text.lines())
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                let host = v["detail"]["event"]["host"].as_str().map(str::to_owned);
                let target = v["target"].as_str().unwrap_or_default().to_owned();
                (v["id"].as_u64().unwrap_or(0), host.unwrap_or(target))
            })
            .collect()
    };
    eventually(BOUND, || {
        let text = std::fs::read_to_string(&jsonl).ok()?;
        targets(&text)
            .iter()
            .any(|(_, h)| h == "after-held-0.example")
            .then_some(())
    })
    .await
    .unwrap_or_else(|| {
        let text = std::fs::read_to_string(&jsonl).unwrap_or_default();
        panic!("the later row is not delivered while the earlier id {held} is held:\n{text}")
    });
    let t0 = Instant::now();
    release.send(()).expect("release");
    holder.join().expect("holder");
    let got = eventually(BOUND, || {
        let text = std::fs::read_to_string(&jsonl).ok()?;
        let got = targets(&text);
        got.iter().any(|(_, h)| h == "late-row").then_some(got)
    })
    .await
    .expect("the row committed late is delivered");
    println!(
        "a row committed out of id order delivered {:?} after its commit",
        t0.elapsed()
    );
    let late = got.iter().find(|(_, h)| h == "late-row").expect("late");
    assert_eq!(late.0, u64::try_from(held).expect("id"));
    assert_eq!(got.iter().filter(|(_, h)| h == "late-row").count(), 1);

    // A follower gets it too, after the rows it had already seen.
    let mut buf = Vec::new();
    let mut targets_seen = Vec::new();
    let deadline = Instant::now() + BOUND;
    while !targets_seen.iter().any(|t: &String| t == "late-row") {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, follow.chunk())
            .await
            .unwrap_or_else(|_| panic!("the follower gets the late row; saw {targets_seen:?}"))
            .expect("stream")
            .expect("open");
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            if let Ok(e) = serde_json::from_slice::<AuditEntry>(&line) {
                targets_seen.push(e.target);
            }
        }
    }
}

/// `umbra controller run --sinks FILE` refuses a bad file before serving, naming every problem
/// and never echoing a secret.
#[test]
fn the_binary_refuses_a_bad_sinks_file_with_every_problem() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("ctrl");
    let d = dir.to_str().expect("utf-8");
    let init = umbra_tests::umbra_cmd(&["controller", "init", "--dir", d], &[]);
    assert!(init.status.success(), "{}", umbra_tests::stderr(&init));
    let bad = work.path().join("sinks.yaml");
    std::fs::write(
        &bad,
        "sinks:\n  - {name: hook, kind: webhook, url: 'http://plain/', secret: 'hunter2-hunter2-hunter2'}\n  - {name: f, kind: file}\n",
    )
    .expect("write");
    let out = umbra_tests::umbra_cmd(
        &[
            "controller",
            "run",
            "--dir",
            d,
            "--listen",
            "127.0.0.1:0",
            "--sinks",
            bad.to_str().expect("utf-8"),
        ],
        &[],
    );
    let err = umbra_tests::stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("https://") && err.contains("needs path"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}
