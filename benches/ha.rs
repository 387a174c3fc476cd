//! `cargo bench -p umbra --bench ha`: writes per second and revocation latency with several
//! controllers on one PostgreSQL database, beside one controller on SQLite, in one run.
//!
//! Controllers, router and agents run in this process on loopback (real TLS, QUIC, HTTP), the
//! database is a real PostgreSQL (`UMBRA_TEST_POSTGRES`, or one started from Debian's binaries,
//! see `umbra_tests::pg`). Rows:
//! - writes/s, one writer: `BENCH_WRITES` (300) service creates in a row, each a new TLS
//!   connection as the CLI makes, through one controller (two: alternating).
//! - writes/s, 8 writers at once: the same number spread over 8 tasks (two controllers: 4 each).
//! - revocation → stream cut: `BENCH_REVOCATIONS` (50) agents, each with a live stream through a
//!   router that follows controller A, revoked through A (one controller) or through B (two),
//!   timed from the request sent to the stream's end.

use std::time::{Duration, Instant};

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_policies::{Hosting, Service};
use umbra_sdk::{Context, SdkError};
use umbra_tests::dataplane::*;
use umbra_tests::pg::PgServer;
use umbra_tests::TestController;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

async fn create_service(client: &umbra_sdk::ControllerClient, name: &str) -> Result<(), String> {
    let svc = Service {
        name: name.parse().map_err(|e| format!("{e}"))?,
        roles: Default::default(),
        hosting: Hosting::Address("127.0.0.1:9".parse().map_err(|e| format!("{e}"))?),
        intercepts: vec![],
        proxy_protocol: false,
    };
    client
        .call::<Service>(Method::POST, "/v1/services", Some(&svc))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Writes through `ctrls` in turn: one writer, then `writers` at once; writes per second each.
async fn writes(ctrls: &[&TestController], tag: &str, n: usize, writers: usize) -> (f64, f64) {
    let clients: Vec<umbra_sdk::ControllerClient> =
        ctrls.iter().map(|t| t.admin_client()).collect();
    let started = Instant::now();
    for i in 0..n {
        let client = &clients[i % clients.len()];
        if let Err(e) = create_service(client, &format!("{tag}-seq-{i:05}")).await {
            panic!("write {i}: {e}");
        }
    }
    let one = n as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let client = clients[w % clients.len()].clone();
        let tag = tag.to_owned();
        tasks.spawn(async move {
            for i in (w..n).step_by(writers) {
                if let Err(e) = create_service(&client, &format!("{tag}-par-{i:05}")).await {
                    panic!("write {i}: {e}");
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("writer");
    }
    let many = n as f64 / started.elapsed().as_secs_f64();
    (one, many)
}

async fn round_trip(s: &mut umbra_sdk::Stream, msg: &[u8]) -> Result<(), SdkError> {
    s.write_all(msg).await.map_err(SdkError::from_io)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.map_err(SdkError::from_io)?;
    Ok(())
}

/// Revokes `n` agents through `via`, each holding a stream through a router following
/// `follow`; the cut latencies, sorted.
async fn revocations(follow: &TestController, via: &TestController, n: usize) -> Vec<Duration> {
    let _router = start_router(follow, "r1", |_| {}).await;
    let echo = Echo::start().await;
    service(via, "echo", echo.hosting()).await;
    let mut cuts = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("agent-{i:03}");
        let file = agent(via, &name).await;
        grant(
            via,
            &format!("g-{i:03}"),
            umbra_policies::Action::Dial,
            &name,
            "echo",
        )
        .await;
        let ctx = Context::new(file).expect("context");
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut s = loop {
            match ctx.dial("echo").await {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "{name}: never dialable: {e}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        round_trip(&mut s, b"x").await.expect("echo");
        let sent = Instant::now();
        revoke_identity(via, &name).await;
        let cut = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if round_trip(&mut s, b"p").await.is_err() {
                    return sent.elapsed();
                }
            }
        })
        .await
        .expect("cut within 10 s");
        cuts.push(cut);
    }
    cuts.sort();
    cuts
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n_writes = env_usize("BENCH_WRITES", 300);
    let n_rev = env_usize("BENCH_REVOCATIONS", 50);
    println!("ha bench: {n_writes} writes, {n_rev} revocations per setup");

    let sqlite = TestController::start().await;
    let (s1, s8) = writes(&[&sqlite], "sq", n_writes, 8).await;
    let sq_rev = revocations(&sqlite, &sqlite, n_rev).await;
    drop(sqlite);

    let url = PgServer::shared().database();
    let store: umbra_controller::StoreConfig = url.parse().expect("store URL");
    let pg1 = TestController::start_with(|c| c.store = store).await;
    let (p1, p8) = writes(&[&pg1], "p1", n_writes, 8).await;
    let pg1_rev = revocations(&pg1, &pg1, n_rev).await;
    drop(pg1);

    let url = PgServer::shared().database();
    let store: umbra_controller::StoreConfig = url.parse().expect("store URL");
    let a = TestController::start_with(|c| c.store = store).await;
    let b = a.join().await;
    let (d1, d8) = writes(&[&a, &b], "p2", n_writes, 8).await;
    let pg2_rev = revocations(&a, &b, n_rev).await;

    println!();
    println!(
        "| setup | writes/s, 1 writer | writes/s, 8 writers | revocation → cut p50 | p99 | max |"
    );
    println!("|---|---|---|---|---|---|");
    for (label, one, many, rev) in [
        ("1 controller, SQLite (baseline)", s1, s8, &sq_rev),
        ("1 controller, PostgreSQL", p1, p8, &pg1_rev),
        (
            "2 controllers, PostgreSQL (router on A, writes/revokes via both / B)",
            d1,
            d8,
            &pg2_rev,
        ),
    ] {
        println!(
            "| {label} | {one:.0} | {many:.0} | {} | {} | {} |",
            ms(quantile(rev, 0.5)),
            ms(quantile(rev, 0.99)),
            ms(quantile(rev, 1.0)),
        );
    }
    println!("writes are service creates over the management API, a new TLS connection each (as the CLI)");
}
