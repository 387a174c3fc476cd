//! The tunneler against the real controller and router: listeners exist exactly for the
//! services the identity may dial, follow grants live, and carry bytes end to end.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use umbra_policies::Action;
use umbra_tests::dataplane::*;
use umbra_tests::*;
use umbra_tunneler::{Mapping, Tunneler, TunnelerConfig};

async fn wait_for(t: &Tunneler, what: &str, pred: impl Fn(&[Mapping]) -> bool) -> Vec<Mapping> {
    let mut rx = t.mappings();
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let now = rx.borrow_and_update().clone();
            if pred(&now) {
                return now;
            }
            if rx.changed().await.is_err() {
                return now;
            }
        }
    })
    .await;
    r.unwrap_or_else(|_| panic!("timed out waiting for {what}: {:?}", t.mappings().borrow()))
}

fn listen_of(m: &[Mapping], svc: &str) -> Option<SocketAddr> {
    m.iter()
        .find(|m| m.service.as_str() == svc)
        .map(|m| m.listen)
}

async fn echo_once(addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_follow_grants_and_carry_bytes() {
    let t = TestController::start().await;
    let _router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    service(&t, "secret", echo.hosting()).await; // exists, never granted

    let ctx = umbra_sdk::Context::with_controller(a, Some(&t.addr())).unwrap();
    let cfg = TunnelerConfig {
        controller: Some(t.addr()),
        name_base: "127.91.0.1".parse().unwrap(),
        ..Default::default()
    };
    let tun = Tunneler::start(ctx, cfg).await.unwrap();

    let m = wait_for(&tun, "the echo listener", |m| {
        listen_of(m, "echo").is_some()
    })
    .await;
    assert_eq!(m.len(), 1, "only the granted service has a listener: {m:?}");
    let addr = listen_of(&m, "echo").unwrap();
    assert!(addr.ip().is_loopback());
    assert_eq!(addr.port(), 443, "the intercept keeps its real port");
    assert_eq!(
        echo_once(addr, b"hello through the overlay").await.unwrap(),
        b"hello through the overlay"
    );

    // A new grant adds a listener live; revoking it removes the listener.
    grant(&t, "agent-1-secret", Action::Dial, "agent-1", "secret").await;
    let m = wait_for(&tun, "the secret listener", |m| {
        listen_of(m, "secret").is_some()
    })
    .await;
    let secret = listen_of(&m, "secret").unwrap();
    assert_ne!(secret, addr);
    assert_eq!(echo_once(secret, b"x").await.unwrap(), b"x");
    revoke_policy(&t, "agent-1-secret").await;
    wait_for(&tun, "the secret listener to go", |m| {
        listen_of(m, "secret").is_none()
    })
    .await;
    assert!(
        TcpStream::connect(secret).await.is_err(),
        "a revoked service has nothing listening"
    );

    // A live connection is cut when the identity is revoked, and every listener goes.
    let mut live = TcpStream::connect(addr).await.unwrap();
    live.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    live.read_exact(&mut buf).await.unwrap();
    revoke_identity(&t, "agent-1").await;
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        let mut b = [0u8; 16];
        loop {
            match live.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        cut.is_ok(),
        "the live connection must be closed after a revocation"
    );
    wait_for(&tun, "every listener to go", |m| m.is_empty()).await;
    tun.shutdown().await;
}

/// An agent granted more services than the tunneler carries connections at once: every
/// listener serves (an idle listener holds no connection slot), and past the bound a connection
/// waits in the backlog until a slot frees, instead of being refused or costing a descriptor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_listeners_than_connection_slots_all_serve_within_the_bound() {
    let t = TestController::start().await;
    let _router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    let names: Vec<String> = (0..6).map(|i| format!("echo-{i}")).collect();
    for n in &names {
        echo_service(&t, &echo, n, "agent-1").await;
    }
    let ctx = umbra_sdk::Context::with_controller(a, Some(&t.addr())).unwrap();
    let cfg = TunnelerConfig {
        controller: Some(t.addr()),
        name_base: "127.92.0.1".parse().unwrap(),
        max_connections: 2,
        ..Default::default()
    };
    let tun = Tunneler::start(ctx, cfg).await.unwrap();
    let m = wait_for(&tun, "six listeners", |m| m.len() == 6).await;
    for n in &names {
        let addr = listen_of(&m, n).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), echo_once(addr, n.as_bytes()))
            .await
            .unwrap_or_else(|_| panic!("{n}: no echo within 5 s"))
            .unwrap();
        assert_eq!(got, n.as_bytes());
    }

    // Two live connections take both slots: a third waits, and is carried once one closes.
    let mut live = Vec::new();
    for n in &names[..2] {
        let mut s = TcpStream::connect(listen_of(&m, n).unwrap()).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        live.push(s);
    }
    let mut third = TcpStream::connect(listen_of(&m, &names[5]).unwrap())
        .await
        .unwrap();
    third.write_all(b"wait").await.unwrap();
    let mut buf = [0u8; 4];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read_exact(&mut buf)).await;
    assert!(
        early.is_err(),
        "a third connection is carried past a bound of two"
    );
    drop(live.pop());
    tokio::time::timeout(Duration::from_secs(5), third.read_exact(&mut buf))
        .await
        .expect("carried once a slot is free")
        .unwrap();
    assert_eq!(&buf, b"wait");
    tun.shutdown().await;
}

/// While the tunneler's own thread is busy (here: a task hogging it, as a bulk transfer does), a
/// new connection is carried on another lane, over that lane's own QUIC connection; both carry
/// bytes. The tunneler runs on this test's single-threaded runtime, its first lane.
#[tokio::test]
async fn a_connection_opened_while_the_first_lane_is_busy_takes_another() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |c| c.limits.lanes = 2).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let ctx = umbra_sdk::Context::with_controller(a, Some(&t.addr())).unwrap();
    let cfg = TunnelerConfig {
        controller: Some(t.addr()),
        name_base: "127.92.0.1".parse().unwrap(),
        lanes: 2,
        ..Default::default()
    };
    let tun = Tunneler::start(ctx, cfg).await.unwrap();
    let m = wait_for(&tun, "the echo listener", |m| {
        listen_of(m, "echo").is_some()
    })
    .await;
    let addr = listen_of(&m, "echo").unwrap();

    // Idle: the first connection stays on the first lane.
    let mut first = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 5];
    first.write_all(b"first").await.unwrap();
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"first");
    assert_eq!(router.connections_by_lane().iter().sum::<usize>(), 1);

    // Busy: this thread computes 5 ms at a time between yields.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hog = tokio::spawn({
        let stop = stop.clone();
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t0 = std::time::Instant::now();
                while t0.elapsed() < Duration::from_millis(5) {
                    std::hint::spin_loop();
                }
                tokio::task::yield_now().await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut second = TcpStream::connect(addr).await.unwrap();
    second.write_all(b"second").await.unwrap();
    let mut buf2 = [0u8; 6];
    second.read_exact(&mut buf2).await.unwrap();
    assert_eq!(&buf2, b"second");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    hog.await.unwrap();
    // The second lane made a connection of its own to the router.
    assert_eq!(router.connections_by_lane().iter().sum::<usize>(), 2);
    // Both keep working, in both directions, with half-close.
    for (s, msg) in [
        (&mut first, &b"again-1"[..]),
        (&mut second, &b"again-2"[..]),
    ] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    second.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut rest))
        .await
        .expect("the end of the stream arrives")
        .unwrap();
    assert!(rest.is_empty());
    tun.shutdown().await;
}

/// Dropping a tunneler without `shutdown` stops it all the same: its listeners close, the
/// connections it carries are cut and none of its tasks stays behind (an early return in a
/// caller cannot leave one running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_tunneler_stops_its_tasks_listeners_and_connections() {
    let t = TestController::start().await;
    let _router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let ctx = umbra_sdk::Context::with_controller(a, Some(&t.addr())).unwrap();
    let cfg = TunnelerConfig {
        controller: Some(t.addr()),
        name_base: "127.93.0.1".parse().unwrap(),
        ..Default::default()
    };
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    let tun = Tunneler::start(ctx, cfg).await.unwrap();
    let m = wait_for(&tun, "the echo listener", |m| {
        listen_of(m, "echo").is_some()
    })
    .await;
    let addr = listen_of(&m, "echo").unwrap();
    let mut live = TcpStream::connect(addr).await.unwrap();
    live.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    live.read_exact(&mut buf).await.unwrap();
    assert!(tasks() > before, "a running tunneler has tasks");

    drop(tun);
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        let mut b = [0u8; 16];
        loop {
            match live.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "a carried connection outlived its tunneler");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "a dropped tunneler still listens"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tasks() > before && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        tasks() <= before,
        "tasks alive after the tunneler was dropped: {} (before: {before})",
        tasks()
    );
}
