//! What a router does under floods, with the real controller and router on 127.0.0.1: a flood
//! of QUIC Initial packets from many source addresses (every address of 127.0.0.0/8 is
//! loopback on Linux) that never answer, as from spoofed sources, while a real agent dials.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_sdk::Context;
use umbra_tests::dataplane::*;
use umbra_tests::TestController;

/// Source addresses of the flood: 127.0.0.2 to 127.0.0.200.
const SOURCES: std::ops::RangeInclusive<u8> = 2..=200;
/// Initial packets the flood sends a second, over all sources (the flood was 26).
const FLOOD_RATE: u64 = 1_000;
/// How long a legitimate dial may take under the flood (handshake, Retry round trip included).
const DIAL_BOUND: Duration = Duration::from_secs(1);

/// `n` distinct client Initial datagrams (each a fresh ClientHello with its own connection IDs,
/// padded to 1,200 bytes) for a handshake with `router`, built by quinn's state machine and
/// never continued: replayed from a socket that never reads, they act as spoofed sources.
fn initials(router: SocketAddr, n: usize) -> Vec<Vec<u8>> {
    let (_endpoint, cfg) = raw_client(None);
    let mut ep = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let now = Instant::now();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (_, mut conn) = ep
            .connect(now, cfg.clone(), router, "router.umbra")
            .expect("connect");
        let mut buf = Vec::new();
        let t = conn.poll_transmit(now, 1, &mut buf).expect("an Initial");
        buf.truncate(t.size);
        assert!(buf.len() >= 1200, "Initials are padded");
        out.push(buf);
    }
    out
}

/// Sends `packets` round robin from one socket per address of [`SOURCES`] at [`FLOOD_RATE`]
/// until `stop`; returns how many it sent.
fn flood(router: SocketAddr, packets: Vec<Vec<u8>>, stop: Arc<AtomicBool>) -> u64 {
    let sockets: Vec<UdpSocket> = SOURCES
        .map(|last| UdpSocket::bind((Ipv4Addr::new(127, 0, 0, last), 0)).expect("bind source"))
        .collect();
    let start = Instant::now();
    let mut sent = 0u64;
    // Bounded in time even if nobody stops it.
    while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(30) {
        let due = start.elapsed().as_millis() as u64 * FLOOD_RATE / 1000;
        while sent < due {
            let i = sent as usize;
            let _ = sockets[i % sockets.len()].send_to(&packets[i % packets.len()], router);
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_initial_flood_does_not_lock_out_agents() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let limits = umbra_edge_router::Limits::default();
    let addr = router.local_addr();

    let made = Instant::now();
    let packets = initials(addr, 2_000);
    println!("built {} Initials in {:?}", packets.len(), made.elapsed());
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || flood(addr, packets, stop))
    };
    // Let the flood fill what it can: well over the old 256 slots at this rate.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let peak = AtomicU64::new(0);
    let mut latencies = Vec::new();
    for i in 0..5 {
        // A fresh context each time: a new connection, so a new handshake under the flood.
        let ctx = Context::new(a.clone()).expect("context");
        ctx.edge().await.expect("view from the controller");
        let began = Instant::now();
        let dialed = tokio::time::timeout(Duration::from_secs(10), async {
            let mut s = ctx.dial("echo").await?;
            s.write_all(b"ping")
                .await
                .map_err(umbra_sdk::SdkError::from_io)?;
            let mut back = [0u8; 4];
            s.read_exact(&mut back)
                .await
                .map_err(umbra_sdk::SdkError::from_io)?;
            Ok::<_, umbra_sdk::SdkError>(back)
        })
        .await;
        let took = began.elapsed();
        let stats = router.stats();
        peak.fetch_max(stats.handshakes_in_flight, Ordering::Relaxed);
        println!("dial {i} under the flood: {took:?} ({dialed:?}); router: {stats:?}");
        assert_eq!(&dialed.expect("answered").expect("dial"), b"ping");
        latencies.push(took);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let sent = flooder.join().expect("flood thread");
    let stats = router.stats();
    println!(
        "flood: {sent} Initials from {} sources; dials {latencies:?}; peak handshakes in flight {}; {stats:?}",
        SOURCES.count(),
        peak.load(Ordering::Relaxed)
    );
    assert!(sent > 2_000, "the flood ran ({sent})");
    assert!(
        stats.handshakes_retried > 1_000,
        "flooded attempts were answered with Retry: {stats:?}"
    );
    // Unvalidated attempts hold at most `handshakes_before_retry` slots; the agents' own
    // handshakes are the rest.
    assert!(
        peak.load(Ordering::Relaxed) <= (limits.handshakes_before_retry + 5) as u64,
        "handshakes in flight stayed bounded"
    );
    for (i, took) in latencies.iter().enumerate() {
        assert!(*took < DIAL_BOUND, "dial {i} took {took:?} under the flood");
    }
    router.shutdown().await;
}
