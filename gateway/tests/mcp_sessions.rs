//! Upstream MCP sessions against real child processes (a small stdio server in Python): bounds on
//! what a server's output can make the gateway hold, waiting requests that are always cleaned
//! up, and a slow upstream start that delays nobody else.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use umbra_gateway::mcp::pool::Pool;
use umbra_gateway::mcp::upstream::{Session, Transport};
use umbra_gateway::upstream::Upstream;
use umbra_policies::IdentityId;

fn stub(args: &[&str]) -> Transport {
    let script = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/stdio_stub.py"
    ));
    let mut a = vec![script.display().to_string()];
    a.extend(args.iter().map(|s| s.to_string()));
    Transport::Stdio {
        command: "python3".into(),
        args: a,
        env: BTreeMap::new(),
    }
}

/// The peak resident memory of this process, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test]
async fn a_huge_stdio_line_ends_the_session_without_being_buffered() {
    // 150 MB on one line: the gateway once grew by 128 MiB reading it whole before its check.
    let sess = Session::connect(&stub(&["huge", "150000000"]), &Upstream::new())
        .await
        .expect("the stub starts");
    let before = peak_rss();
    let t0 = Instant::now();
    let err = sess
        .request("tools/list", json!({}))
        .await
        .expect_err("an oversized answer is refused");
    assert!(err.message.contains("exceeds"), "{err:?}");
    assert!(
        !sess.alive(),
        "the session is over; the next use starts another"
    );
    assert_eq!(sess.pending(), 0);
    let grown = peak_rss().saturating_sub(before);
    assert!(
        grown < 48 << 20,
        "peak memory grew by {} MiB reading one line",
        grown >> 20
    );
    assert!(t0.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn waiting_requests_leave_no_entry_on_timeout_or_cancel() {
    let mut sess = Session::connect(&stub(&["silent"]), &Upstream::new())
        .await
        .expect("the stub starts");
    sess.set_timeout(Duration::from_millis(300));
    let err = sess.request("tools/list", json!({})).await.unwrap_err();
    assert!(err.message.contains("timed out"), "{err:?}");
    assert_eq!(sess.pending(), 0, "a timed-out request keeps no entry");
    sess.set_timeout(Duration::from_secs(60));
    // A caller that goes away (its future dropped) keeps none either.
    for _ in 0..5 {
        let gone = tokio::time::timeout(
            Duration::from_millis(50),
            sess.request("tools/list", json!({})),
        )
        .await;
        assert!(gone.is_err(), "the silent stub never answers");
    }
    assert_eq!(sess.pending(), 0, "cancelled requests keep no entry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_start_delays_only_its_own_identity() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let slow = stub(&["slow", marker.to_str().unwrap(), "30"]);
    let fast = stub(&["ok"]);
    let pool = Arc::new(Pool::new(Arc::new(|_: &IdentityId| {})));
    let (a, b) = (
        IdentityId::new("tenant-a").unwrap(),
        IdentityId::new("tenant-b").unwrap(),
    );
    let upstream = Upstream::new();
    // Tenant A starts an upstream that takes 30 s to come up...
    let starting = {
        let (pool, a, slow, upstream) = (pool.clone(), a.clone(), slow.clone(), upstream.clone());
        tokio::spawn(async move { pool.session(&a, "srv", &slow, &upstream).await })
    };
    let mut seen = false;
    for _ in 0..200 {
        if marker.exists() {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "the slow upstream was started");
    // ...meanwhile tenant B starts and uses its own at once.
    let t0 = Instant::now();
    let sess = tokio::time::timeout(
        Duration::from_secs(10),
        pool.session(&b, "srv", &fast, &upstream),
    )
    .await
    .expect("tenant B is not held behind tenant A's start")
    .expect("B's upstream starts");
    let r = sess.request("tools/list", json!({})).await.unwrap();
    assert_eq!(r["tools"][0]["name"], "echo");
    assert!(
        !starting.is_finished(),
        "B finished while A was still starting"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    // The same (identity, server) is started once however many ask at the same time.
    let (x, y) = tokio::join!(
        pool.session(&b, "other", &fast, &upstream),
        pool.session(&b, "other", &fast, &upstream)
    );
    assert!(Arc::ptr_eq(&x.unwrap(), &y.unwrap()));
    starting.abort();
}

#[tokio::test]
async fn sessions_add_no_task_however_often_they_are_asked_for() {
    let pool = Pool::new(Arc::new(|_: &IdentityId| {}));
    let who = IdentityId::new("tenant-a").unwrap();
    let upstream = Upstream::new();
    let ok = stub(&["ok"]);
    let missing = Transport::Stdio {
        command: "/nonexistent/mcp-server".into(),
        args: vec![],
        env: BTreeMap::new(),
    };
    pool.session(&who, "ok", &ok, &upstream).await.unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    for _ in 0..50 {
        pool.session(&who, "ok", &ok, &upstream).await.unwrap();
        assert!(pool
            .session(&who, "missing", &missing, &upstream)
            .await
            .is_err());
    }
    assert_eq!(metrics.num_alive_tasks(), before);
}
