//! Floods against the real controller on 127.0.0.1:0 (issue 12 items 2 and 5).
//!
//! Sources are told apart by address: all of 127/8 is loopback, so the test binds its client
//! sockets to 127.0.0.2 (idle sockets), 127.0.0.3 (a handshake flood) and leaves the admins and
//! the router on 127.0.0.1. Every loop is bounded in count and in time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use tokio::net::{TcpSocket, TcpStream};
use umbra_proto::api::IdentityView;
use umbra_tests::dataplane::router_identity;
use umbra_tests::TestController;

/// Idle connections held by the first source.
const IDLE: usize = 1000;
/// Handshakes a second opened by the second source.
const FLOOD_PER_SEC: u64 = 100;
/// Per-source bound on anonymous connections (`Limits::DEFAULT.per_source`).
const PER_SOURCE: usize = umbra_controller::admission::Limits::DEFAULT.per_source;
/// What the test asserts per operation: generous, since a loaded 2-core CI machine must not
/// flake; the p99 measured is printed (the target is 100 ms).
const BOUND: Duration = Duration::from_secs(1);

/// Raises the descriptor soft limit to what the test needs (or the hard limit); returns it.
fn raise_nofile(want: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let cur = getrlimit(Resource::Nofile);
    let soft = cur.current.unwrap_or(u64::MAX);
    if soft >= want {
        return soft;
    }
    let target = cur.maximum.map_or(want, |h| h.min(want));
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: cur.maximum,
        },
    );
    getrlimit(Resource::Nofile).current.unwrap_or(target)
}

async fn connect_from(src: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    tokio::time::timeout(Duration::from_secs(2), s.connect(to))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// Latencies of one kind of operation.
struct Sample {
    what: &'static str,
    ok: Vec<Duration>,
    failed: usize,
}

impl Sample {
    fn pct(&self, p: f64) -> Duration {
        let mut v = self.ok.clone();
        v.sort();
        let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1)) - 1;
        v.get(i).copied().unwrap_or_default()
    }
    fn row(&self) -> String {
        format!(
            "| {:<40} | {:>4} | {:>6} | {:>8.1} | {:>8.1} | {:>8.1} |",
            self.what,
            self.ok.len(),
            self.failed,
            self.pct(0.5).as_secs_f64() * 1e3,
            self.pct(0.99).as_secs_f64() * 1e3,
            self.pct(1.0).as_secs_f64() * 1e3,
        )
    }
}

/// `n` admin `identity list` calls and `n` router control connections (to the first frame),
/// one after the other, each a new TCP + TLS connection as the CLI and a reconnecting router
/// make.
async fn measure(
    t: &TestController,
    router: &umbra_pki::IdentityFile,
    n: usize,
    min: Duration,
    tag: &str,
) -> (Sample, Sample) {
    let admin = t.admin_client();
    let rc = t.client_for(router);
    let mut list = Sample {
        what: leak(format!("identity list ({tag})")),
        ok: Vec::new(),
        failed: 0,
    };
    let mut control = Sample {
        what: leak(format!("router control, first frame ({tag})")),
        ok: Vec::new(),
        failed: 0,
    };
    let began = Instant::now();
    for i in 0..n * 10 {
        if i >= n && began.elapsed() >= min {
            break;
        }
        let start = Instant::now();
        let r: Result<Vec<IdentityView>, _> = tokio::time::timeout(
            BOUND * 5,
            admin.call(Method::GET, "/v1/identities", None::<&()>),
        )
        .await
        .unwrap_or_else(|_| Err(umbra_sdk::SdkError::Timeout("list".into())));
        match r {
            Ok(ids) if ids.len() >= 2 => list.ok.push(start.elapsed()),
            _ => list.failed += 1,
        }
        let start = Instant::now();
        let r = tokio::time::timeout(BOUND * 5, async {
            let mut s = rc.stream("/v1/control").await?;
            s.chunk().await
        })
        .await;
        match r {
            Ok(Ok(Some(frame))) if !frame.is_empty() => control.ok.push(start.elapsed()),
            _ => control.failed += 1,
        }
    }
    (list, control)
}

/// How many of `socks` the controller has not closed, polled until it is at most `want` or
/// `within` has passed.
async fn still_open(socks: &mut [TcpStream], within: Duration, want: usize) -> usize {
    let end = Instant::now() + within;
    loop {
        let open = socks
            .iter_mut()
            .filter(|s| {
                let mut b = [0u8; 1];
                matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count();
        if open <= want || Instant::now() >= end {
            return open;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// One source holds 1,000 idle TCP connections (and keeps opening more), another opens TLS
/// handshakes at 100/s (half for enrollment, completed and then held; half for mutual TLS with
/// no certificate); admins and a router, from a third address, still get through. The idle
/// source is held to its per-source bound: all but a handful of its sockets are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_and_a_handshake_flood_do_not_lock_out_admins_or_routers() {
    let limit = raise_nofile(4096);
    assert!(
        limit >= 2048,
        "the test needs 2,048 descriptors; RLIMIT_NOFILE allows {limit}"
    );
    let t = TestController::start().await;
    let router = router_identity(&t, "r1").await;
    let addr: SocketAddr = t.addr().parse().expect("addr");

    let (base_list, base_control) = measure(&t, &router, 20, Duration::ZERO, "quiet").await;

    // Source A: 1,000 idle connections, all of them established (the kernel completes them).
    let idle_src = Ipv4Addr::new(127, 0, 0, 2);
    let mut idle = Vec::with_capacity(IDLE);
    let opened = Instant::now();
    while idle.len() < IDLE && opened.elapsed() < Duration::from_secs(30) {
        match connect_from(idle_src, addr).await {
            Ok(s) => idle.push(s),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    assert_eq!(idle.len(), IDLE, "source A could not open its connections");
    // Held to its bound: at any moment the controller keeps at most PER_SOURCE of them open
    // (each newcomer displaces the source's own oldest silent socket), long before the 2 s
    // first-byte deadline would close them anyway.
    let open = still_open(&mut idle, Duration::from_secs(1), PER_SOURCE).await;
    println!(
        "source A: {IDLE} sockets opened in {:?}, {open} still open",
        opened.elapsed()
    );
    assert!(
        open <= PER_SOURCE,
        "source A still holds {open} connections (bound {PER_SOURCE})"
    );

    // Source A keeps the pressure on (50 more idle sockets per 100 ms, the newest 200 held),
    // and source B opens handshakes at 100/s, until told to stop.
    let stop = tokio_util_stop();
    let churn = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut held = std::collections::VecDeque::new();
            for _ in 0..600 {
                if stop.load(Ordering::Relaxed) != 0 {
                    break;
                }
                for _ in 0..50 {
                    if let Ok(s) = connect_from(idle_src, addr).await {
                        held.push_back(s);
                    }
                    while held.len() > 200 {
                        held.pop_front();
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let flooded = Arc::new(AtomicUsize::new(0));
    let flood = {
        let (stop, flooded) = (stop.clone(), flooded.clone());
        let fp = t.ctrl.ca().fingerprint();
        tokio::spawn(async move {
            let enroll = umbra_pki::client_config_pinned(fp, &[b"http/1.1"]);
            let anon = tokio_rustls::TlsConnector::from(enroll);
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / FLOOD_PER_SEC));
            let mut held = Vec::new();
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..6000u32 {
                if stop.load(Ordering::Relaxed) != 0 {
                    break;
                }
                tick.tick().await;
                let (anon, flooded) = (anon.clone(), flooded.clone());
                tasks.spawn(async move {
                    let name = if i % 2 == 0 {
                        umbra_pki::ENROLL_SERVER_NAME
                    } else {
                        "controller.umbra"
                    };
                    let sni = rustls_pki_types::ServerName::try_from(name).ok()?;
                    let tcp = connect_from(Ipv4Addr::new(127, 0, 0, 3), addr).await.ok()?;
                    flooded.fetch_add(1, Ordering::Relaxed);
                    tokio::time::timeout(Duration::from_secs(2), anon.connect(sni, tcp))
                        .await
                        .ok()?
                        .ok()
                });
                while let Some(r) = tasks.try_join_next() {
                    if let Ok(Some(s)) = r {
                        held.push(s);
                        held.truncate(64);
                    }
                }
            }
            tasks.shutdown().await;
        })
    };

    // Let both floods reach their steady state, then measure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (list, control) = measure(&t, &router, 100, Duration::from_secs(3), "flooded").await;
    stop.store(1, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(10), churn).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), flood).await;

    println!(
        "\n| operation                                |   ok | failed |  p50 ms |  p99 ms |  max ms |"
    );
    println!(
        "|------------------------------------------|------|--------|---------|---------|---------|"
    );
    for s in [&base_list, &base_control, &list, &control] {
        println!("{}", s.row());
    }
    println!(
        "(source A: {IDLE} idle sockets held plus churn; source B: {} handshakes opened)",
        flooded.load(Ordering::Relaxed)
    );

    for s in [&base_list, &base_control, &list, &control] {
        assert_eq!(s.failed, 0, "{}: {} failed", s.what, s.failed);
        assert!(s.pct(0.99) < BOUND, "{}: p99 {:?}", s.what, s.pct(0.99));
    }
    assert!(
        flooded.load(Ordering::Relaxed) >= 200,
        "the handshake flood did not run"
    );
}

/// A stop flag shared by the flood tasks.
fn tokio_util_stop() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

/// An authenticated TLS connection to the controller as `identity`, with a request started
/// whose body never finishes (`content-length` promised, one byte sent).
async fn slow_body(
    identity: &umbra_pki::IdentityFile,
    to: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use tokio::io::AsyncWriteExt;
    let cfg = umbra_pki::client_config(identity, &[b"http/1.1"]).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(to).await?;
    let name = rustls_pki_types::ServerName::try_from(umbra_pki::CONTROLLER_SERVER_NAME)
        .map_err(std::io::Error::other)?;
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    tls.write_all(
        b"POST /v1/audit/events HTTP/1.1\r\nhost: c\r\ncontent-type: application/json\r\ncontent-length: 60000\r\n\r\n{",
    )
    .await?;
    tls.flush().await?;
    Ok(tls)
}

/// Whether the server has closed `s` (EOF, an error, or an answer) within `within`.
async fn closed_within(
    s: &mut tokio_rustls::client::TlsStream<TcpStream>,
    within: Duration,
) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 512];
    tokio::time::timeout(within, s.read(&mut buf)).await.is_ok()
}

/// The red team's finding: one agent's certificate held every authenticated slot with request
/// bodies that never finish, and admins and routers were refused. Now an identity holds at most
/// its share, a body must arrive within its deadline, and admins get through meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_with_slow_bodies_cannot_lock_out_admins() {
    let limits = umbra_controller::sessions::AuthLimits::default();
    raise_nofile(4096);
    let t = TestController::start().await;
    let agent = umbra_tests::dataplane::agent(&t, "greedy").await;
    let to: SocketAddr = t.addr().parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..limits.per_identity + 8 {
        if let Ok(s) = slow_body(&agent, to).await {
            held.push(s);
        }
    }
    // The ones over the share are closed at once; the share stays open for now.
    let mut open = Vec::new();
    for mut s in held {
        if !closed_within(&mut s, Duration::from_millis(300)).await {
            open.push(s);
        }
    }
    assert_eq!(
        open.len(),
        limits.per_identity,
        "one identity holds exactly its share"
    );
    // Admins are unaffected.
    let admin = t.admin_client();
    for _ in 0..5 {
        let r: Result<serde_json::Value, _> = tokio::time::timeout(
            BOUND * 5,
            admin.call(http::Method::GET, "/v1/identities", None::<&()>),
        )
        .await
        .expect("timely");
        assert!(r.is_ok(), "{r:?}");
    }
    // The bodies never finish: every such connection is ended at the body deadline.
    let start = std::time::Instant::now();
    for s in &mut open {
        assert!(
            closed_within(s, Duration::from_secs(20)).await,
            "a trickled body is cut at its deadline"
        );
    }
    println!("slow bodies cut after {:?}", start.elapsed());
}

/// A TCP connection from `src` that has sent a complete ClientHello for the controller's
/// mutual-TLS name and then stalls (as a handshake flood does).
async fn stalled_hello(
    cfg: Arc<rustls::ClientConfig>,
    src: Ipv4Addr,
    to: SocketAddr,
) -> std::io::Result<TcpStream> {
    use tokio::io::AsyncWriteExt;
    let name = rustls_pki_types::ServerName::try_from(umbra_pki::CONTROLLER_SERVER_NAME)
        .map_err(std::io::Error::other)?;
    let mut conn = rustls::ClientConnection::new(cfg, name).map_err(std::io::Error::other)?;
    let mut hello = Vec::new();
    conn.write_tls(&mut hello)?;
    let mut tcp = connect_from(src, to).await?;
    tcp.write_all(&hello).await?;
    Ok(tcp)
}

/// The red team's second finding: complete ClientHellos from a dozen sources, never finished,
/// held every mutual-TLS handshake slot for 5 s at a time, and admins were refused. Now a new
/// source takes the slot of the busiest source's oldest stalled handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_from_many_sources_do_not_lock_out_admins() {
    raise_nofile(4096);
    let limits = umbra_controller::admission::Limits::DEFAULT;
    let t = TestController::start().await;
    let to: SocketAddr = t.addr().parse().unwrap();
    let cfg = umbra_pki::client_config(&t.admin, &[b"http/1.1"]).unwrap();
    // Enough sources at the per-source cap to fill the pool, and one more.
    let sources = limits.main_handshakes / PER_SOURCE + 1;
    let stop = Instant::now() + Duration::from_secs(8);
    let attackers: Vec<_> = (0..sources)
        .map(|i| {
            let cfg = cfg.clone();
            tokio::spawn(async move {
                let src = Ipv4Addr::new(127, 0, 3, 1 + i as u8);
                let mut held: Vec<TcpStream> = Vec::new();
                // Keep the source's share full until `stop`, reopening what the server closes.
                while Instant::now() < stop {
                    while held.len() < PER_SOURCE {
                        match stalled_hello(cfg.clone(), src, to).await {
                            Ok(s) => held.push(s),
                            Err(_) => break,
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    held.retain(|s| s.peer_addr().is_ok());
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let admin = t.admin_client();
    let mut ok = 0;
    for _ in 0..10 {
        let r: Result<serde_json::Value, _> = tokio::time::timeout(
            BOUND * 5,
            admin.call(Method::GET, "/v1/identities", None::<&()>),
        )
        .await
        .unwrap_or_else(|_| Err(umbra_sdk::SdkError::Protocol("timeout".into())));
        if r.is_ok() {
            ok += 1;
        }
    }
    for a in attackers {
        a.abort();
    }
    assert_eq!(
        ok, 10,
        "every admin call got through the stalled handshakes"
    );
}
