//! The SDK authenticates each router as exactly the router the controller lists at the address
//! it dials (`spiffe://TD/router/NAME`), not as any router of the trust domain: a router (or a
//! holder of some router's key) answering at another router's listed address is refused, for
//! dials and for hosting, while correctly listed routers keep working.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_policies::{Action, Hosting};
use umbra_proto::stream::{decode_response, encode_request, Op, ServiceRequest, Status};
use umbra_sdk::{Context, SdkError};
use umbra_tests::dataplane::*;
use umbra_tests::TestController;

/// The bound on anything a test waits for.
const BOUND: Duration = Duration::from_secs(20);

/// A free UDP port on 127.0.0.1 (free when this returns; tests bind it right after).
fn free_udp_addr() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr")
}

async fn round_trip(s: &mut umbra_sdk::Stream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.expect("read");
    back
}

/// Two routers of the same controller, each listening where the controller lists the *other*
/// one: whatever the SDK connects to answers with a valid router certificate of its trust
/// domain, but never the one the view names for that address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_answering_at_another_routers_address_is_refused() {
    let t = TestController::start().await;
    let (a1, a2) = (free_udp_addr(), free_udp_addr());
    let r1 = start_router(&t, "r1", |c| {
        c.listen = a1;
        c.advertise = Some(a2.to_string());
    })
    .await;
    let r2 = start_router(&t, "r2", |c| {
        c.listen = a2;
        c.advertise = Some(a1.to_string());
    })
    .await;
    assert_eq!((r1.local_addr(), r2.local_addr()), (a1, a2));
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let host = agent(&t, "host-1").await;
    service(&t, "chat", Hosting::Sdk).await;
    grant(&t, "chat-host", Action::Bind, "host-1", "chat").await;

    let ctx = Context::new(a.clone()).unwrap();
    let view = ctx.edge().await.unwrap();
    let listed = |n: &str| {
        view.routers
            .iter()
            .find(|r| r.name.as_str() == n)
            .and_then(|r| r.advertise.clone())
    };
    assert_eq!(listed("r1"), Some(a2.to_string()));
    assert_eq!(listed("r2"), Some(a1.to_string()));

    // The routers do serve the agent (a client accepting any router gets through): what follows
    // is refused because of who answers, not because of policy or reachability.
    let frame = encode_request(
        Op::Dial,
        &ServiceRequest {
            service: name("echo"),
        },
    )
    .unwrap();
    let (ep, cfg) = agent_raw_client(&a);
    for addr in [a1, a2] {
        let answer = tokio::time::timeout(BOUND, raw_request(&ep, &cfg, addr, &frame))
            .await
            .expect("timely")
            .expect("an unpinned client gets an answer");
        assert_eq!(decode_response(answer).unwrap(), Status::Ok);
    }

    // Dialing by name: each listed address answers with the wrong router's certificate.
    let e = tokio::time::timeout(BOUND, ctx.dial("echo"))
        .await
        .expect("timely")
        .expect_err("an impostor router is refused");
    assert!(matches!(e, SdkError::Handshake { .. }), "{e}");
    // Dialing a listed address directly: pinned to the router listed there, refused too.
    for addr in [a1, a2] {
        let e = tokio::time::timeout(BOUND, ctx.dial_via(&addr.to_string(), "echo"))
            .await
            .expect("timely")
            .expect_err("an impostor router is refused");
        assert!(matches!(e, SdkError::Handshake { .. }), "{addr}: {e}");
    }
    // A fresh context (no view yet) fetches the view before dialing an address: same refusal.
    let e = tokio::time::timeout(
        BOUND,
        Context::new(a.clone())
            .unwrap()
            .dial_via(&a1.to_string(), "echo"),
    )
    .await
    .expect("timely")
    .expect_err("an impostor router is refused");
    assert!(matches!(e, SdkError::Handshake { .. }), "{e}");

    // A host does not register with an impostor: it would hand it the callers' identities.
    let hctx = Context::new(host).unwrap();
    let e = tokio::time::timeout(BOUND, hctx.bind("chat"))
        .await
        .expect("timely")
        .expect_err("no impostor takes the registration");
    assert!(matches!(e, SdkError::Unavailable(_)), "{e}");

    // A correctly listed router works, by name and by address, for dialing and hosting.
    let r3 = start_router(&t, "r3", |_| {}).await;
    let a3 = r3.local_addr().to_string();
    let mut s = tokio::time::timeout(BOUND, ctx.dial("echo"))
        .await
        .expect("timely")
        .expect("dial through the listed router");
    assert_eq!(round_trip(&mut s, b"hello").await, b"hello");
    let mut s = tokio::time::timeout(BOUND, ctx.dial_via(&a3, "echo"))
        .await
        .expect("timely")
        .expect("dial via the listed router");
    assert_eq!(round_trip(&mut s, b"again").await, b"again");
    let listener = tokio::time::timeout(BOUND, hctx.bind("chat"))
        .await
        .expect("timely")
        .expect("host through the listed router");
    drop(listener);

    for r in [r1, r2, r3] {
        r.shutdown().await;
    }
}

/// Two routers listed at the same address: each connection is verified for one of them, so
/// only the one really there is used, and a connection verified for one router is never taken
/// for the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_listed_at_one_address_only_the_real_one_is_used() {
    let t = TestController::start().await;
    let r1 = start_router(&t, "r1", |_| {}).await;
    let a1 = r1.local_addr();
    // r2 listens elsewhere but claims r1's address.
    let r2 = start_router(&t, "r2", |c| c.advertise = Some(a1.to_string())).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let ctx = Context::new(a).unwrap();
    let view = ctx.edge().await.unwrap();
    assert!(view
        .routers
        .iter()
        .all(|r| r.advertise.as_deref() == Some(a1.to_string().as_str())));
    // Whichever is tried first, the dial goes through r1, the router really at that address.
    for _ in 0..3 {
        let mut s = tokio::time::timeout(BOUND, ctx.dial("echo"))
            .await
            .expect("timely")
            .expect("dial");
        assert_eq!(round_trip(&mut s, b"x").await, b"x");
        let mut s = tokio::time::timeout(BOUND, ctx.dial_via(&a1.to_string(), "echo"))
            .await
            .expect("timely")
            .expect("dial via");
        assert_eq!(round_trip(&mut s, b"y").await, b"y");
    }
    r1.shutdown().await;
    r2.shutdown().await;
}
