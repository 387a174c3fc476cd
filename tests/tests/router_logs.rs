//! What a peer can make a router write to its log is bounded. An agent opening refused streams
//! as fast as it can, and a client failing handshakes, used to cost a line each at `info`
//! (tens of thousands a second); every decision is in the audit log and the metrics, and the
//! router's log gets a few lines a second, the next one saying how many were held back.
//!
//! One test in this binary: it installs the process's global log subscriber.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use umbra_policies::Hosting;
use umbra_proto::stream::Status;
use umbra_tests::dataplane::*;
use umbra_tests::TestController;

/// Counts the lines written to it.
#[derive(Clone, Default)]
struct Lines(Arc<AtomicUsize>, Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.iter().filter(|b| **b == b'\n').count();
        self.0.fetch_add(n, Ordering::Relaxed);
        if let Ok(mut kept) = self.1.lock() {
            if kept.len() < 64 * 1024 {
                kept.extend_from_slice(buf);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const REFUSED: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_streams_and_handshakes_costs_the_log_a_bounded_number_of_lines() {
    let lines = Lines::default();
    let writer = lines.clone();
    tracing_subscriber::fmt()
        .with_env_filter("umbra_edge_router=info")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let a = agent(&t, "agent-1").await;
    service(
        &t,
        "secret",
        Hosting::Address("127.0.0.1:9".parse().expect("addr")),
    )
    .await;
    let (ep, cfg) = agent_raw_client(&a);
    let conn = ep
        .connect_with(cfg, router.local_addr(), "router.umbra")
        .expect("connect")
        .await
        .expect("admitted");

    let before = lines.0.load(Ordering::Relaxed);
    for _ in 0..REFUSED {
        let (status, _send, _recv) = raw_dial(&conn, "secret").await;
        assert_eq!(status, Status::Denied);
    }
    // Clients without a certificate, each failing its handshake.
    for _ in 0..50 {
        let (ep, cfg) = raw_client(None);
        if let Ok(connecting) = ep.connect_with(cfg, router.local_addr(), "router.umbra") {
            let _ = tokio::time::timeout(Duration::from_secs(5), connecting).await;
        }
    }
    assert_eq!(router.stats().streams_denied, REFUSED as u64);
    let written = lines.0.load(Ordering::Relaxed) - before;
    let kept = String::from_utf8_lossy(&lines.1.lock().expect("lines")).to_string();
    println!("{written} lines for {REFUSED} refused streams and 50 failed handshakes");
    assert!(
        written <= 100,
        "{written} lines for {REFUSED} refused streams:\n{}",
        &kept[..kept.len().min(2_000)]
    );
    router.shutdown().await;
}
