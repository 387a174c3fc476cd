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
use umbra_tests::{eventually, TestController};

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

/// A TCP service whose connects stall: its listener never accepts, and its accept queue is
/// filled first, so the kernel drops every further SYN. Returns the address and what must be
/// kept alive.
fn stalled_service() -> (SocketAddr, std::net::TcpListener, Vec<std::net::TcpStream>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut queued = Vec::new();
    for _ in 0..1_000 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => queued.push(s),
            Err(_) => return (addr, listener, queued),
        }
    }
    panic!("the accept queue never filled");
}

/// Resident memory of this process (router and clients), bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Opens a stream dialing `frame`'s service and writes into it until `until`, as fast as the
/// router's flow control lets it; returns the bytes the router accepted and the stream (kept
/// open by the caller).
async fn stuff(
    conn: quinn::Connection,
    frame: Vec<u8>,
    until: tokio::time::Instant,
) -> (u64, Option<(quinn::SendStream, quinn::RecvStream)>) {
    // Opening may wait for a stream slot, and the request for window the other streams took.
    let opened = tokio::time::timeout_at(until, async {
        let (mut send, recv) = conn.open_bi().await.ok()?;
        send.write_all(&frame).await.ok()?;
        Some((send, recv))
    });
    let Ok(Some((mut send, recv))) = opened.await else {
        return (0, None);
    };
    let chunk = vec![0x55u8; 64 * 1024];
    let mut sent = 0u64;
    while tokio::time::Instant::now() < until {
        match tokio::time::timeout_at(until, send.write(&chunk)).await {
            Ok(Ok(n)) => sent += n as u64,
            Ok(Err(_)) => return (sent, None),
            Err(_) => break,
        }
    }
    (sent, Some((send, recv)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_cannot_make_a_router_hold_gigabytes() {
    const MIB: u64 = 1024 * 1024;
    const CONNS: usize = 24;
    const STREAMS: usize = 4;
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |c| {
        c.limits.connections_per_identity = 16;
        c.limits.streams_per_identity = 40;
        c.limits.connect_timeout = Duration::from_secs(60);
    })
    .await;
    let limits = umbra_edge_router::Limits::default();
    let (stalled, _listener, _queued) = stalled_service();
    let abuser = agent(&t, "abuser").await;
    let good = agent(&t, "good").await;
    service(
        &t,
        "stalled",
        umbra_policies::Hosting::Address(stalled.to_string().parse().expect("hostport")),
    )
    .await;
    grant(
        &t,
        "abuse",
        umbra_policies::Action::Dial,
        "abuser",
        "stalled",
    )
    .await;
    let echo = Echo::start().await;
    echo_service(&t, &echo, "echo", "good").await;
    let frame = umbra_proto::stream::encode_request(
        umbra_proto::stream::Op::Dial,
        &umbra_proto::stream::ServiceRequest {
            service: name("stalled"),
        },
    )
    .expect("frame");

    let rss_before = rss();
    let (endpoint, cfg) = agent_raw_client(&abuser);
    let mut conns = Vec::new();
    let mut refused = 0;
    for _ in 0..CONNS {
        let conn = endpoint
            .connect_with(cfg.clone(), router.local_addr(), "router.umbra")
            .expect("connect")
            .await
            .expect("handshake");
        conns.push(conn);
    }
    let began = tokio::time::Instant::now();
    let until = began + Duration::from_secs(3);
    let mut tasks = tokio::task::JoinSet::new();
    for conn in &conns {
        for _ in 0..STREAMS {
            tasks.spawn(stuff(conn.clone(), frame.clone(), until));
        }
    }

    // Meanwhile another identity dials and moves data at full speed.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let ctx = Context::new(good.clone()).expect("context");
    let dial_began = Instant::now();
    let mut s = tokio::time::timeout(Duration::from_secs(10), ctx.dial("echo"))
        .await
        .expect("timely")
        .expect("the other identity dials");
    let payload = vec![7u8; 4 * MIB as usize];
    let (mut r, mut w) = tokio::io::split(&mut s);
    let (wrote, back) = tokio::join!(
        async {
            w.write_all(&payload).await?;
            w.shutdown().await
        },
        async {
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.map(|_| back)
        }
    );
    let other_took = dial_began.elapsed();
    wrote.expect("write");
    assert!(back.expect("echo") == payload, "the echo came back whole");
    let good_usage = router.usage(&good.id);

    let mut accepted = 0u64;
    let mut held = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (n, stream) = r.expect("task");
        accepted += n;
        held.extend(stream);
    }
    for conn in &conns {
        if conn.close_reason().is_some() {
            refused += 1;
        }
    }
    let usage = router.usage(&abuser.id);
    let stats = router.stats();
    let grown = rss().saturating_sub(rss_before);
    println!(
        "abuser: {CONNS} connections x {STREAMS} streams; {refused} connections refused; router accepted {} MiB of its data; {} streams open; its books: {usage:?}",
        accepted / MIB,
        held.len(),
    );
    println!(
        "other identity: 4 MiB echoed in {other_took:?}, its books: {good_usage:?}; process RSS grew {} MiB; router: {stats:?}",
        grown / MIB
    );
    // Connections over the identity's cap were refused with LIMIT; its streams stayed under
    // theirs (once its windows are full, its further requests cannot even arrive).
    assert_eq!(refused, CONNS - 16, "connections over the cap were closed");
    assert_eq!(usage.connections, 16);
    assert!(usage.streams <= 40, "{usage:?}");
    assert!(stats.limited >= (CONNS - 16) as u64, "{stats:?}");
    // What the abuser can make the router buffer: its budget, plus the handshake window of
    // each connection beyond it. Before, every connection had 16 MiB (384 MiB here).
    let bound = limits.buffer_per_identity + 16 * 2 * u64::from(limits.handshake_window);
    assert!(usage.buffer_bytes <= bound, "{usage:?} over {bound}");
    assert!(
        accepted <= bound / 2 + MIB,
        "the router accepted {accepted} bytes, its windows allow {}",
        bound / 2
    );
    assert!(
        accepted >= 16 * MIB,
        "the abuser did fill its windows ({accepted})"
    );
    // The other identity was granted full windows: the abuser's budget is not its.
    assert_eq!(
        good_usage.buffer_bytes,
        good_usage.connections as u64 * 2 * u64::from(limits.connection_window),
        "{good_usage:?}"
    );
    assert!(other_took < Duration::from_secs(5), "{other_took:?}");
    assert!(grown < 300 * MIB, "the process grew {} MiB", grown / MIB);

    // Budget given back is granted again: with all but four of the abuser's connections
    // closed, the short ones grow (every second) until the budget is spent again.
    let live: Vec<&quinn::Connection> = conns
        .iter()
        .filter(|c| c.close_reason().is_none())
        .collect();
    let keep = live.len().saturating_sub(4);
    for conn in &live[..keep] {
        conn.close(0u32.into(), b"done");
    }
    let regrown = eventually(Duration::from_secs(10), || {
        let u = router.usage(&abuser.id);
        (u.connections == 4 && u.buffer_bytes >= limits.buffer_per_identity).then_some(u)
    })
    .await;
    println!(
        "after closing {keep} connections: {:?}",
        router.usage(&abuser.id)
    );
    let regrown = regrown.expect("the remaining connections grew into the budget");
    assert!(regrown.buffer_bytes <= bound, "{regrown:?}");
    // Everything is given back when the abuser leaves.
    drop(held);
    for conn in &conns {
        conn.close(0u32.into(), b"done");
    }
    let empty = eventually(Duration::from_secs(10), || {
        (router.usage(&abuser.id) == umbra_edge_router::Usage::default()).then_some(())
    })
    .await;
    assert!(
        empty.is_some(),
        "left behind: {:?}",
        router.usage(&abuser.id)
    );
    router.shutdown().await;
}

/// Accepts any router certificate, but only after `stall`: a client whose handshake stops
/// halfway, holding a validated handshake slot on the router, as a flood from real addresses
/// that answer Retry would.
#[derive(Debug)]
struct Stalling(Arc<rustls::crypto::CryptoProvider>, Duration);

impl rustls::client::danger::ServerCertVerifier for Stalling {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        std::thread::sleep(self.1);
        Err(rustls::Error::General("stalled".into()))
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("tls12".into()))
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("unreachable".into()))
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Starts, on a thread of its own, a handshake from `src` that stalls for `stall` once the
/// router's first flight arrives.
fn stalled_handshake(
    src: Ipv4Addr,
    router: SocketAddr,
    stall: Duration,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("tls13")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Stalling(provider, stall)))
                .with_no_client_auth();
            tls.alpn_protocols = vec![umbra_proto::stream::ALPN.to_vec()];
            let crypto =
                quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).expect("quic tls");
            let Ok(endpoint) = quinn::Endpoint::client(SocketAddr::new(src.into(), 0)) else {
                return;
            };
            let cfg = quinn::ClientConfig::new(Arc::new(crypto));
            if let Ok(c) = endpoint.connect_with(cfg, router, "router.umbra") {
                let _ = tokio::time::timeout(stall + Duration::from_secs(1), c).await;
            }
        })
    })
}

/// A dozen real addresses that answer Retry and then stall their handshakes hold every slot
/// of a router with small limits; a new source still gets in, taking the slot of the busiest
/// source's oldest handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_validated_handshakes_cannot_keep_a_new_source_out() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |c| {
        c.limits.handshakes_in_flight = 8;
        c.limits.handshakes_before_retry = 0;
        c.limits.handshakes_per_source = 4;
    })
    .await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let addr = router.local_addr();
    // Two sources fill the eight slots with handshakes stalled for 6 s.
    let stall = Duration::from_secs(6);
    let stalled: Vec<_> = (0..8)
        .map(|i| stalled_handshake(Ipv4Addr::new(127, 0, 5, 1 + (i % 2) as u8), addr, stall))
        .collect();
    let filled = eventually(Duration::from_secs(5), || {
        (router.stats().handshakes_in_flight >= 8).then_some(())
    })
    .await;
    assert!(
        filled.is_some(),
        "the stalled handshakes fill the router: {:?}",
        router.stats()
    );
    let start = Instant::now();
    let ctx = Context::new(a).unwrap();
    let mut s = tokio::time::timeout(DIAL_BOUND * 3, ctx.dial("echo"))
        .await
        .expect("the dial is not held up by stalled handshakes")
        .expect("dial");
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    println!("dial through stalled handshakes: {:?}", start.elapsed());
    drop(s);
    for h in stalled {
        let _ = h.join();
    }
}
