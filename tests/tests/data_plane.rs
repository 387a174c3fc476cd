//! The data plane end to end: the real controller, a real edge router and real TCP services on
//! 127.0.0.1, with agents using the SDK (or misbehaving raw QUIC clients).

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_edge_router::{Router, RouterConfig};
use umbra_policies::{Action, Hosting};
use umbra_proto::stream::{decode_response, Status};
use umbra_sdk::{Context, Early, SdkError};
use umbra_tests::dataplane::*;
use umbra_tests::{eventually, TestController};

/// The bound on anything a test waits for.
const BOUND: Duration = Duration::from_secs(15);

/// Sends `msg` on a stream and reads the echo.
async fn round_trip(s: &mut umbra_sdk::Stream, msg: &[u8]) -> Result<Vec<u8>, SdkError> {
    s.write_all(msg).await.map_err(SdkError::from_io)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.map_err(SdkError::from_io)?;
    Ok(back)
}

#[tokio::test]
async fn dial_works_end_to_end_and_echoes() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;

    let ctx = Context::new(a).unwrap();
    let view = ctx.edge().await.unwrap();
    assert_eq!(view.routers.len(), 1);
    assert_eq!(
        view.routers[0].advertise.as_deref(),
        Some(router.local_addr().to_string().as_str())
    );

    let mut s = tokio::time::timeout(BOUND, ctx.dial("echo"))
        .await
        .expect("timely")
        .expect("dial");
    assert_eq!(round_trip(&mut s, b"hello").await.unwrap(), b"hello");
    // Half-close: our end-of-file reaches the service, whose answer and end reach us.
    s.write_all(b" world").await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(BOUND, s.read_to_end(&mut rest))
        .await
        .expect("timely")
        .unwrap();
    assert_eq!(rest, b" world");

    // A second stream reuses the connection.
    let mut s2 = ctx.dial("echo").await.unwrap();
    assert_eq!(
        round_trip(&mut s2, &[7u8; 100_000]).await.unwrap(),
        vec![7u8; 100_000]
    );
    router.shutdown().await;
}

#[tokio::test]
async fn ungranted_and_nonexistent_services_look_the_same() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    service(&t, "secret", echo.hosting()).await;

    let ctx = Context::new(a).unwrap();
    let ungranted = ctx.dial("secret").await.unwrap_err();
    let missing = ctx.dial("ghost").await.unwrap_err();
    assert!(
        matches!(&ungranted, SdkError::Denied { service } if service == "secret"),
        "{ungranted}"
    );
    assert!(
        matches!(&missing, SdkError::Denied { service } if service == "ghost"),
        "{missing}"
    );

    // The same bytes on the wire, too.
    let (ep, cfg) = agent_raw_client(ctx.identity());
    let frame = |svc: &str| {
        umbra_proto::stream::encode_request(
            umbra_proto::stream::Op::Dial,
            &umbra_proto::stream::ServiceRequest { service: name(svc) },
        )
        .unwrap()
    };
    let a1 = raw_request(&ep, &cfg, router.local_addr(), &frame("secret"))
        .await
        .unwrap();
    let a2 = raw_request(&ep, &cfg, router.local_addr(), &frame("ghost"))
        .await
        .unwrap();
    assert_eq!(a1, a2);
    assert_eq!(decode_response(a1).unwrap(), Status::Denied);
    // And the granted one still works.
    let mut s = ctx.dial("echo").await.unwrap();
    assert_eq!(round_trip(&mut s, b"ok").await.unwrap(), b"ok");
    router.shutdown().await;
}

#[tokio::test]
async fn clients_without_a_certificate_or_from_another_ca_are_refused() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let frame = umbra_proto::stream::encode_request(
        umbra_proto::stream::Op::Dial,
        &umbra_proto::stream::ServiceRequest {
            service: name("echo"),
        },
    )
    .unwrap();

    // No certificate at all.
    let (ep, cfg) = raw_client(None);
    let r = tokio::time::timeout(BOUND, raw_request(&ep, &cfg, router.local_addr(), &frame))
        .await
        .expect("timely");
    assert!(r.is_err(), "a client without a certificate got {r:?}");

    // A certificate from another controller's CA, for an agent of the same name.
    let other = TestController::start().await;
    let foreign = agent(&other, "agent-1").await;
    let (ep, cfg) = raw_client(Some(&foreign));
    let r = tokio::time::timeout(BOUND, raw_request(&ep, &cfg, router.local_addr(), &frame))
        .await
        .expect("timely");
    assert!(r.is_err(), "a foreign certificate got {r:?}");
    // Through the SDK the foreign identity does not even trust the router.
    let e = Context::new(foreign)
        .unwrap()
        .dial_via(&router.local_addr().to_string(), "echo")
        .await
        .unwrap_err();
    assert!(matches!(e, SdkError::Handshake { .. }), "{e}");

    // The router's own identity is not an agent: refused after the handshake.
    let (ep, cfg) = raw_client(Some(&router_identity(&t, "r2").await));
    let r = tokio::time::timeout(BOUND, raw_request(&ep, &cfg, router.local_addr(), &frame))
        .await
        .expect("timely");
    assert!(r.is_err(), "a router identity got {r:?}");

    // The legitimate agent is served.
    let (ep, cfg) = raw_client(Some(&a));
    let r = raw_request(&ep, &cfg, router.local_addr(), &frame)
        .await
        .unwrap();
    assert_eq!(decode_response(r).unwrap(), Status::Ok);
    router.shutdown().await;
}

/// Reads until the stream fails (returning why) or `BOUND` passes.
async fn read_until_error(mut r: impl tokio::io::AsyncRead + Unpin) -> SdkError {
    let mut buf = vec![0u8; 64 * 1024];
    let read = async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) => return SdkError::Disconnected("clean end of file".into()),
                Ok(_) => {}
                Err(e) => return SdkError::from_io(e),
            }
        }
    };
    tokio::time::timeout(BOUND, read)
        .await
        .expect("the stream was cut within the bound")
}

#[tokio::test]
async fn revoking_the_identity_cuts_a_large_transfer() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let ctx = Context::new(a).unwrap();
    let s = ctx.dial("echo").await.unwrap();
    let (mut r, mut w) = tokio::io::split(s);

    // Writes without end (up to 4 GiB), until the stream is cut.
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; 256 * 1024];
        for _ in 0..16_384 {
            if let Err(e) = w.write_all(&chunk).await {
                return SdkError::from_io(e);
            }
        }
        SdkError::Disconnected("wrote everything".into())
    });
    // Let a few megabytes flow through before revoking.
    let mut buf = vec![0u8; 64 * 1024];
    let mut seen = 0usize;
    while seen < 8 * 1024 * 1024 {
        let n = tokio::time::timeout(BOUND, r.read(&mut buf))
            .await
            .expect("data flows")
            .unwrap();
        assert!(n > 0);
        seen += n;
    }
    revoke_identity(&t, "agent-1").await;
    let e = read_until_error(r).await;
    assert!(matches!(e, SdkError::Revoked), "the reader saw {e}");
    let e = tokio::time::timeout(BOUND, writer)
        .await
        .expect("writer stops")
        .unwrap();
    assert!(matches!(e, SdkError::Revoked), "the writer saw {e}");
    // The router closed its side towards the service too.
    let closed = eventually(BOUND, || (echo.open() == 0).then_some(())).await;
    assert!(closed.is_some(), "the service connection was closed");
    assert_eq!(router.stats().connections_terminated, 1);

    // A new connection from the revoked identity is refused.
    let e = ctx.dial("echo").await.unwrap_err();
    assert!(
        matches!(
            e,
            SdkError::Handshake { .. }
                | SdkError::Revoked
                | SdkError::Denied { .. }
                | SdkError::Api { .. }
        ),
        "{e}"
    );
    router.shutdown().await;
}

#[tokio::test]
async fn revoking_one_policy_ends_only_that_services_stream() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    service(&t, "echo-a", echo.hosting()).await;
    service(&t, "echo-b", echo.hosting()).await;
    grant(&t, "pa", Action::Dial, "agent-1", "echo-a").await;
    grant(&t, "pb", Action::Dial, "agent-1", "echo-b").await;
    let ctx = Context::new(a).unwrap();
    let mut sa = ctx.dial("echo-a").await.unwrap();
    let mut sb = ctx.dial("echo-b").await.unwrap();
    assert_eq!(round_trip(&mut sa, b"a").await.unwrap(), b"a");
    assert_eq!(round_trip(&mut sb, b"b").await.unwrap(), b"b");

    revoke_policy(&t, "pa").await;
    // Keep using stream a until it is cut; never longer than the bound.
    let cut = tokio::time::timeout(BOUND, async {
        loop {
            if let Err(e) = round_trip(&mut sa, b"ping").await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("stream a is cut within the bound");
    assert!(matches!(cut, SdkError::Revoked), "{cut}");
    let closed = eventually(BOUND, || (echo.open() == 1).then_some(())).await;
    assert!(closed.is_some(), "only a's service connection was closed");
    assert_eq!(router.stats().streams_terminated, 1);
    assert_eq!(router.stats().connections_terminated, 0);
    // Stream b, on the same connection, keeps flowing, and new streams to b work.
    assert_eq!(
        round_trip(&mut sb, b"still here").await.unwrap(),
        b"still here"
    );
    let mut sb2 = ctx.dial("echo-b").await.unwrap();
    assert_eq!(round_trip(&mut sb2, b"new").await.unwrap(), b"new");
    let e = ctx.dial("echo-a").await.unwrap_err();
    assert!(matches!(e, SdkError::Denied { .. }), "{e}");
    router.shutdown().await;
}

#[tokio::test]
async fn garbage_datagrams_do_not_crash_the_router() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;

    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..2000usize {
        let len = [1, 20, 1200, 1500, 65_000][i % 5];
        let mut bytes = vec![0u8; len];
        for b in bytes.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        // Some look like QUIC long-header Initial packets of version 1.
        if i % 3 == 0 && len > 5 {
            bytes[..5].copy_from_slice(&[0xc0, 0, 0, 0, 1]);
        }
        let _ = sock.send_to(&bytes, router.local_addr()).await;
    }
    let ctx = Context::new(a).unwrap();
    let mut s = tokio::time::timeout(BOUND, ctx.dial("echo"))
        .await
        .expect("timely")
        .expect("still serves");
    assert_eq!(
        round_trip(&mut s, b"after the garbage").await.unwrap(),
        b"after the garbage"
    );
    router.shutdown().await;
}

#[tokio::test]
async fn malformed_oversized_and_unsent_requests_are_refused() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |c| {
        c.limits.request_timeout = Duration::from_millis(300)
    })
    .await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let (ep, cfg) = agent_raw_client(&a);
    let conn = ep
        .connect_with(cfg, router.local_addr(), "router.umbra")
        .unwrap()
        .await
        .unwrap();
    let mut oversized = vec![1u8, 1, 0xff, 0xff];
    oversized.extend(vec![b'x'; 70_000]);
    for bad in [
        vec![2u8, 1, 0, 2, b'{', b'}'],                 // unknown version
        vec![1, 9, 0, 2, b'{', b'}'],                   // unknown op
        oversized,                                      // declared length above the bound
        vec![1, 1, 0, 5, b'h', b'e', b'l', b'l', b'o'], // not JSON
        br#"{"service":"echo","identity":"admin"}"#.to_vec(), // no header at all
        vec![1, 3, 0, 2, b'{', b'}'],                   // Incoming is not a client's op
        vec![1, 1, 0, 100, b'{'],                       // never completed: times out
    ] {
        let answer = tokio::time::timeout(BOUND, request_on(&conn, &bad))
            .await
            .unwrap_or_else(|_| panic!("no answer in time to {bad:?}"));
        match answer {
            Ok(r) => assert_eq!(decode_response(r).unwrap(), Status::BadRequest, "{bad:?}"),
            Err(e) => panic!("no refusal for {bad:?}: {e}"),
        }
    }
    // The connection and the router are fine afterwards.
    let good = umbra_proto::stream::encode_request(
        umbra_proto::stream::Op::Dial,
        &umbra_proto::stream::ServiceRequest {
            service: name("echo"),
        },
    )
    .unwrap();
    assert_eq!(
        decode_response(request_on(&conn, &good).await.unwrap()).unwrap(),
        Status::Ok
    );
    let mut s = Context::new(a).unwrap().dial("echo").await.unwrap();
    assert_eq!(round_trip(&mut s, b"fine").await.unwrap(), b"fine");
    router.shutdown().await;
}

#[tokio::test]
async fn an_sdk_hosted_service_needs_no_listening_port_and_learns_its_caller() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let host = agent(&t, "host-1").await;
    let caller = agent(&t, "caller-1").await;
    let stranger = agent(&t, "stranger").await;
    sdk_service(&t, "chat", "host-1", "caller-1").await;

    // Without a bind grant, binding is denied like dialing.
    let e = Context::new(stranger.clone())
        .unwrap()
        .bind("chat")
        .await
        .unwrap_err();
    assert!(matches!(e, SdkError::Denied { .. }), "{e}");
    // Nobody hosts it yet: granted, but unavailable.
    let cctx = Context::new(caller).unwrap();
    let e = cctx.dial("chat").await.unwrap_err();
    assert!(matches!(e, SdkError::Unavailable(_)), "{e}");

    let hctx = Context::new(host).unwrap();
    let mut listener = hctx.bind("chat").await.unwrap();
    let server = tokio::spawn(async move {
        let (mut s, who) = listener.accept().await.expect("a caller");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
        let reply = format!("hello {}: {}", who.name, String::from_utf8_lossy(&buf));
        s.write_all(reply.as_bytes()).await.expect("write");
        s.shutdown().await.expect("finish");
        (who, listener)
    });
    let mut s = tokio::time::timeout(BOUND, cctx.dial("chat"))
        .await
        .expect("timely")
        .expect("dial");
    s.write_all(b"hi").await.unwrap();
    s.shutdown().await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(BOUND, s.read_to_string(&mut reply))
        .await
        .expect("timely")
        .unwrap();
    assert_eq!(reply, "hello caller-1: hi");
    let (who, mut listener) = server.await.unwrap();
    assert_eq!(who.name.as_str(), "caller-1");
    assert_eq!(who.spiffe, "spiffe://test.umbra/agent/caller-1");

    // Revoking the host's Bind grant cuts the callers it is serving.
    let echo_host = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let mut s = cctx.dial("chat").await.unwrap();
    assert_eq!(round_trip(&mut s, b"echo?").await.unwrap(), b"echo?");
    revoke_policy(&t, "chat-host").await;
    let e = read_until_error(s).await;
    assert!(matches!(e, SdkError::Revoked), "{e}");
    let e = cctx.dial("chat").await.unwrap_err();
    assert!(
        matches!(e, SdkError::Unavailable(_)),
        "no host may serve it any more: {e}"
    );
    // And the host's listener closes: it may no longer host the service.
    tokio::time::timeout(BOUND, echo_host)
        .await
        .expect("the listener closes")
        .unwrap();

    // An identity without a dial grant is denied, the same as for a router-hosted service.
    let e = Context::new(stranger)
        .unwrap()
        .dial("chat")
        .await
        .unwrap_err();
    assert!(matches!(e, SdkError::Denied { .. }), "{e}");
    router.shutdown().await;
}

/// A host that answers before reading the whole request (an early refusal) and stops reading:
/// the stop reaches the caller, whose further writes fail, and the answer still arrives whole.
#[tokio::test]
async fn an_answer_sent_after_the_host_stops_reading_is_delivered_whole() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let host = agent(&t, "host-1").await;
    let caller = agent(&t, "caller-1").await;
    sdk_service(&t, "early", "host-1", "caller-1").await;

    let hctx = Context::new(host).unwrap();
    let mut listener = hctx.bind("early").await.unwrap();
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("a caller");
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await.expect("the head");
        s.stop_reading();
        let _ = stopped_tx.send(());
        let _ = go_rx.await;
        s.write_all(b"403 no").await.expect("write");
        s.shutdown().await.expect("finish");
        listener
    });
    let cctx = Context::new(caller).unwrap();
    let mut s = tokio::time::timeout(BOUND, cctx.dial("early"))
        .await
        .expect("timely")
        .expect("dial");
    s.write_all(b"HEAD ").await.unwrap();
    stopped_rx.await.unwrap();
    // The caller keeps writing until the stop reaches it through the router.
    let body = vec![7u8; 16 * 1024];
    let e = tokio::time::timeout(BOUND, async {
        loop {
            if let Err(e) = s.write_all(&body).await {
                return SdkError::from_io(e);
            }
        }
    })
    .await
    .expect("the stop reached the caller");
    assert!(
        matches!(e, SdkError::Disconnected(_)),
        "a stop, not a failure: {e}"
    );
    go_tx.send(()).unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(BOUND, s.read_to_end(&mut answer))
        .await
        .expect("timely")
        .expect("the answer, not a reset");
    assert_eq!(answer, b"403 no");
    drop(server.await.unwrap());
    router.shutdown().await;
}

#[tokio::test]
async fn limits_and_unreachable_services_get_clean_errors() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |c| c.limits.streams_per_identity = 2).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    // A granted service whose address refuses connections.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead: umbra_policies::HostPort = closed.local_addr().unwrap().to_string().parse().unwrap();
    drop(closed);
    service(&t, "dead", Hosting::Address(dead)).await;
    grant(&t, "dead-dial", Action::Dial, "agent-1", "dead").await;

    let ctx = Context::new(a).unwrap();
    let e = ctx.dial("dead").await.unwrap_err();
    assert!(matches!(e, SdkError::Unavailable(_)), "{e}");

    let mut s1 = ctx.dial("echo").await.unwrap();
    let s2 = ctx.dial("echo").await.unwrap();
    let e = ctx.dial("echo").await.unwrap_err();
    assert!(matches!(e, SdkError::Limit), "{e}");
    assert_eq!(round_trip(&mut s1, b"one").await.unwrap(), b"one");
    // Closing a stream frees its slot.
    drop(s2);
    let mut s3 = tokio::time::timeout(BOUND, async {
        loop {
            match ctx.dial("echo").await {
                Ok(s) => return s,
                Err(SdkError::Limit) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("a slot frees up");
    assert_eq!(round_trip(&mut s3, b"three").await.unwrap(), b"three");
    router.shutdown().await;
}

/// A stale window shorter than the heartbeats would make an idle router flap: refused.
#[tokio::test]
async fn a_stale_window_shorter_than_the_heartbeats_is_refused() {
    let t = TestController::start().await;
    let identity = router_identity(&t, "r1").await;
    let mut cfg = RouterConfig::new(identity, "127.0.0.1:0".parse().unwrap());
    cfg.controller = Some(t.addr());
    cfg.stale_after = Duration::from_millis(300);
    let e = Router::start(cfg).await.err().expect("refused");
    assert!(e.to_string().contains("heartbeat"), "{e}");
}

/// Bytes given to `dial_early` travel with the request and reach the service once, before what
/// is written after the dial; on another router after a failover too. An early read that has
/// nothing yet does not hold the dial up.
#[tokio::test]
async fn early_bytes_travel_with_the_request() {
    let t = TestController::start().await;
    let r1 = start_router(&t, "r1", |_| {}).await;
    let r2 = start_router(&t, "r2", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let ctx = Context::new(a).unwrap();

    async fn exchange(s: &mut umbra_sdk::Stream) -> Vec<u8> {
        s.write_all(b"late").await.unwrap();
        s.shutdown().await.unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(BOUND, s.read_to_end(&mut all))
            .await
            .expect("timely")
            .unwrap();
        all
    }
    let mut early = Early::new(async { Bytes::from_static(b"early ") });
    let mut s = ctx.dial_early("echo", &mut early).await.unwrap();
    assert_eq!(early.taken().map(|b| &b[..]), Some(&b"early "[..]));
    assert_eq!(exchange(&mut s).await, b"early late");

    let mut idle = Early::new(std::future::pending());
    let mut s = tokio::time::timeout(BOUND, ctx.dial_early("echo", &mut idle))
        .await
        .expect("not held up")
        .unwrap();
    assert!(idle.taken().is_none());
    assert_eq!(exchange(&mut s).await, b"late");

    // Refused: the early bytes are kept for the next attempt.
    let mut early = Early::new(async { Bytes::from_static(b"kept ") });
    let e = ctx.dial_early("nope", &mut early).await.unwrap_err();
    assert!(matches!(e, SdkError::Denied { .. }), "{e}");
    r1.shutdown().await;
    let mut s = tokio::time::timeout(BOUND, ctx.dial_early("echo", &mut early))
        .await
        .expect("timely")
        .expect("fails over");
    assert_eq!(exchange(&mut s).await, b"kept late");
    r2.shutdown().await;
}

#[tokio::test]
async fn a_dial_fails_over_to_another_router() {
    let t = TestController::start().await;
    let r1 = start_router(&t, "r1", |_| {}).await;
    let r2 = start_router(&t, "r2", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let ctx = Context::new(a).unwrap();
    assert_eq!(ctx.edge().await.unwrap().routers.len(), 2);
    // Both routers serve.
    for r in [&r1, &r2] {
        let mut s = ctx
            .dial_via(&r.local_addr().to_string(), "echo")
            .await
            .unwrap();
        assert_eq!(round_trip(&mut s, b"x").await.unwrap(), b"x");
    }
    // One goes away; dialing by name still works.
    r1.shutdown().await;
    let mut s = tokio::time::timeout(BOUND, ctx.dial("echo"))
        .await
        .expect("timely")
        .expect("fails over");
    assert_eq!(round_trip(&mut s, b"still").await.unwrap(), b"still");
    r2.shutdown().await;
}

#[tokio::test]
async fn a_proxy_protocol_service_learns_the_verified_caller() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let a = agent(&t, "agent-1").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = umbra_policies::Service {
        name: name("pp"),
        roles: Default::default(),
        hosting: Hosting::Address(addr.to_string().parse().unwrap()),
        intercepts: vec![],
        proxy_protocol: true,
    };
    let _: umbra_policies::Service = t
        .admin_client()
        .call(http::Method::POST, "/v1/services", Some(&svc))
        .await
        .unwrap();
    grant(&t, "pp-dial", Action::Dial, "agent-1", "pp").await;

    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut head = [0u8; 16];
        sock.read_exact(&mut head).await.unwrap();
        assert_eq!(&head[..12], &umbra_edge_router::proxy::SIGNATURE);
        let mut rest = vec![0u8; u16::from_be_bytes([head[14], head[15]]) as usize];
        sock.read_exact(&mut rest).await.unwrap();
        // IPv4: 12 bytes of addresses, then the SPIFFE TLV.
        assert_eq!(head[13], 0x11);
        assert_eq!(rest[12], umbra_edge_router::proxy::TLV_SPIFFE);
        let l = u16::from_be_bytes([rest[13], rest[14]]) as usize;
        let spiffe = String::from_utf8(rest[15..15 + l].to_vec()).unwrap();
        sock.write_all(spiffe.as_bytes()).await.unwrap();
        sock.shutdown().await.unwrap();
    });
    let mut s = Context::new(a).unwrap().dial("pp").await.unwrap();
    let mut got = String::new();
    tokio::time::timeout(BOUND, s.read_to_string(&mut got))
        .await
        .expect("timely")
        .unwrap();
    assert_eq!(got, "spiffe://test.umbra/agent/agent-1");
    server.await.unwrap();
    router.shutdown().await;
}

#[tokio::test]
async fn an_agent_sees_its_services_and_their_changes() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let ctx = Context::new(a).unwrap();
    let names: Vec<String> = ctx
        .services()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(names, ["echo"]);
    let mut watch = ctx.watch_edge().await.unwrap();
    let first = tokio::time::timeout(BOUND, watch.next())
        .await
        .expect("timely")
        .unwrap()
        .unwrap();
    assert_eq!(first.services.len(), 1);
    echo_service(&t, &echo, "echo-2", "agent-1").await;
    let next = tokio::time::timeout(BOUND, async {
        loop {
            let v = watch.next().await.unwrap().expect("open");
            if v.services.len() == 2 {
                return v;
            }
        }
    })
    .await
    .expect("the change is pushed");
    assert!(next
        .services
        .iter()
        .any(|s| s.name.as_str() == "echo-2" && s.dial));
    router.shutdown().await;
}

#[tokio::test]
async fn an_sdk_host_binds_again_when_its_router_goes_away() {
    let t = TestController::start().await;
    let r1 = start_router(&t, "r1", |_| {}).await;
    let host = agent(&t, "host-1").await;
    let caller = agent(&t, "caller-1").await;
    sdk_service(&t, "chat", "host-1", "caller-1").await;
    let hctx = Context::new(host).unwrap();
    let mut listener = hctx.bind("chat").await.unwrap();
    let echo_host = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let cctx = Context::new(caller).unwrap();
    let mut s = cctx.dial("chat").await.unwrap();
    assert_eq!(round_trip(&mut s, b"via r1").await.unwrap(), b"via r1");

    // A second router appears and the first goes away: the host registers with the second.
    let r2 = start_router(&t, "r2", |_| {}).await;
    r1.shutdown().await;
    let r2_addr = r2.local_addr().to_string();
    let mut s = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match cctx.dial_via(&r2_addr, "chat").await {
                Ok(s) => return s,
                Err(SdkError::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("the host binds again within the bound");
    assert_eq!(round_trip(&mut s, b"via r2").await.unwrap(), b"via r2");
    echo_host.abort();
    r2.shutdown().await;
}

/// Not a benchmark (see the benches): a smoke measurement of one stream's bulk throughput
/// through the router, printed. Run with `--release -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bulk_throughput_smoke() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    // A sink service: reads everything, then answers with the byte count.
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = sink.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = sink.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k as u64,
                    }
                }
                let _ = sock.write_all(&n.to_be_bytes()).await;
            });
        }
    });
    let a = agent(&t, "agent-1").await;
    service(
        &t,
        "sink",
        Hosting::Address(addr.to_string().parse().unwrap()),
    )
    .await;
    grant(&t, "sink-dial", Action::Dial, "agent-1", "sink").await;
    let ctx = Context::new(a).unwrap();
    let mut s = ctx.dial("sink").await.unwrap();
    let chunk = vec![0u8; 256 * 1024];
    let total: u64 = 2 * 1024 * 1024 * 1024;
    let start = std::time::Instant::now();
    let mut sent = 0u64;
    while sent < total {
        s.write_all(&chunk).await.unwrap();
        sent += chunk.len() as u64;
    }
    s.shutdown().await.unwrap();
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(u64::from_be_bytes(n), total);
    println!(
        "one stream through the router: {:.2} Gbit/s",
        total as f64 * 8.0 / secs / 1e9
    );
    router.shutdown().await;
}

/// A thread running a runtime of its own until the returned sender is dropped.
fn lane_thread() -> (tokio::runtime::Handle, tokio::sync::oneshot::Sender<()>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let handle = rt.handle().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        rt.block_on(async move {
            let _ = stopped.await;
        })
    });
    (handle, stop)
}

#[tokio::test]
async fn a_contexts_lanes_land_on_different_router_lanes_and_revocation_cuts_them_all() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |c| c.limits.lanes = 4).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let ctx = Context::new(a).unwrap();
    let threads: Vec<_> = (0..3).map(|_| lane_thread()).collect();
    let mut lanes = vec![ctx.clone()];
    lanes.extend(threads.iter().map(|(h, _)| ctx.on_runtime(h.clone())));

    let mut streams = Vec::new();
    for (i, lane) in lanes.iter().enumerate() {
        let mut s = tokio::time::timeout(BOUND, lane.dial("echo"))
            .await
            .expect("timely")
            .expect("dial");
        let msg = vec![i as u8; 10_000];
        assert_eq!(round_trip(&mut s, &msg).await.unwrap(), msg);
        streams.push(s);
    }
    // One connection per context lane, each on its own router lane (the kernel steers by the
    // connection ID that the SDK and the router's lanes agree on).
    assert_eq!(router.connections_by_lane(), vec![1, 1, 1, 1]);
    // More streams on a lane reuse its connection.
    let mut again = lanes[2].dial("echo").await.unwrap();
    assert_eq!(round_trip(&mut again, b"x").await.unwrap(), b"x");
    assert_eq!(router.connections_by_lane(), vec![1, 1, 1, 1]);
    drop(again);

    // A lane dropped with its streams closes its connection; the others stay.
    let (last, stream) = (lanes.pop(), streams.pop());
    drop((last, stream));
    let closed = eventually(BOUND, || {
        (router.connections_by_lane().iter().sum::<usize>() == 3).then_some(())
    })
    .await;
    assert!(closed.is_some(), "{:?}", router.connections_by_lane());

    revoke_identity(&t, "agent-1").await;
    for s in streams {
        let e = read_until_error(s).await;
        assert!(matches!(e, SdkError::Revoked), "{e}");
    }
    let gone = eventually(BOUND, || {
        (router.connections_by_lane().iter().sum::<usize>() == 0).then_some(())
    })
    .await;
    assert!(gone.is_some(), "{:?}", router.connections_by_lane());
    assert_eq!(router.stats().connections_terminated, 3);
    router.shutdown().await;
}

#[tokio::test]
async fn a_router_lane_polls_after_moving_bytes_and_sleeps_when_idle() {
    let t = TestController::start().await;
    let polling = start_router(&t, "r1", |c| c.limits.lanes = 1).await;
    let off = start_router(&t, "r2", |c| {
        c.limits.lanes = 1;
        c.limits.busy_poll = Duration::ZERO;
    })
    .await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let ctx = Context::new(a).unwrap();
    assert_eq!(
        polling.polling_by_lane(),
        vec![Duration::ZERO],
        "idle: asleep"
    );

    for router in [&polling, &off] {
        let addr = router.local_addr().to_string();
        let mut s = tokio::time::timeout(BOUND, ctx.dial_via(&addr, "echo"))
            .await
            .expect("timely")
            .expect("dial");
        for _ in 0..20 {
            assert_eq!(round_trip(&mut s, b"ping").await.unwrap(), b"ping");
        }
    }
    let polled = eventually(BOUND, || {
        let p = polling.polling_by_lane()[0];
        (p > Duration::ZERO).then_some(p)
    })
    .await;
    assert!(polled.is_some(), "the lane never polled");
    // Once nothing moves (the streams are open but quiet), polling stops within its window.
    let settled = eventually(BOUND, || {
        let before = polling.polling_by_lane()[0];
        std::thread::sleep(Duration::from_millis(50));
        (polling.polling_by_lane()[0] == before).then_some(())
    })
    .await;
    assert!(
        settled.is_some(),
        "the lane kept polling with nothing moving"
    );
    assert_eq!(off.polling_by_lane(), vec![Duration::ZERO], "polling off");
    polling.shutdown().await;
    off.shutdown().await;
}
