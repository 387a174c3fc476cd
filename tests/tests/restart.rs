//! Restarts: the controller's state, and every router's access decisions, survive restarting
//! the controller in place and restarting a router; a revocation committed while a router was
//! down reaches it before it serves anyone.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_edge_router::{Router, RouterConfig, RouterHandle};
use umbra_pki::IdentityFile;
use umbra_policies::Action;
use umbra_sdk::{Context, SdkError};
use umbra_tests::dataplane::*;
use umbra_tests::*;

async fn router_from(t: &TestController, identity: &IdentityFile) -> RouterHandle {
    let mut cfg = RouterConfig::new(identity.clone(), "127.0.0.1:0".parse().unwrap());
    cfg.controller = Some(t.addr());
    let r = Router::start(cfg).await.expect("router starts");
    tokio::time::timeout(Duration::from_secs(10), r.ready())
        .await
        .expect("router synchronizes");
    r
}

/// Dials `service` through one router, retrying (bounded) while the router catches up.
async fn dial_result(
    ctx: &Context,
    router: &RouterHandle,
    service: &str,
    want_ok: bool,
) -> Result<(), SdkError> {
    let addr = router.local_addr().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = async {
            let mut s = ctx.dial_via(&addr, service).await?;
            s.write_all(b"hi").await.map_err(SdkError::from_io)?;
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.map_err(SdkError::from_io)?;
            Ok::<(), SdkError>(())
        }
        .await;
        if r.is_ok() == want_ok || tokio::time::Instant::now() >= deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_stays_right_across_controller_and_router_restarts() {
    let t = TestController::start().await;
    let (r1_id, r2_id) = (
        router_identity(&t, "r1").await,
        router_identity(&t, "r2").await,
    );
    let r1 = router_from(&t, &r1_id).await;
    let r2 = router_from(&t, &r2_id).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-a").await;
    let b = agent(&t, "agent-b").await;
    echo_service(&t, &echo, "echo", "agent-a").await;
    grant(&t, "b-echo", Action::Dial, "agent-b", "echo").await;
    let ca = Context::with_controller(a, Some(&t.addr())).unwrap();
    let cb = Context::with_controller(b, Some(&t.addr())).unwrap();
    for r in [&r1, &r2] {
        dial_result(&ca, r, "echo", true).await.expect("a dials");
        dial_result(&cb, r, "echo", true).await.expect("b dials");
    }

    // Restart the controller in place: routers resume and keep following it.
    let t = t.restart_in_place().await;
    assert!(t.ctrl.state().policies.len() == 2, "policies survive");
    revoke_policy(&t, "b-echo").await;
    for r in [&r1, &r2] {
        // A stream admitted just before the revocation reached the router is cut by it
        // ("revoked"); the dials after it are denied.
        let mut e = dial_result(&cb, r, "echo", false).await.unwrap_err();
        for _ in 0..10 {
            if !matches!(e, SdkError::Revoked) {
                break;
            }
            e = dial_result(&cb, r, "echo", false).await.unwrap_err();
        }
        assert!(matches!(e, SdkError::Denied { .. }), "{e}");
        dial_result(&ca, r, "echo", true)
            .await
            .expect("a is unaffected");
    }

    // Stop r2, revoke agent-a while it is down, start it again: it must refuse agent-a from
    // its first moment, because it takes the revocation before it serves.
    r2.shutdown().await;
    revoke_identity(&t, "agent-a").await;
    let r2 = router_from(&t, &r2_id).await;
    let e = dial_result(&ca, &r2, "echo", false).await.unwrap_err();
    assert!(
        matches!(
            e,
            SdkError::Revoked | SdkError::Handshake { .. } | SdkError::Denied { .. }
        ),
        "{e}"
    );
    let e = dial_result(&ca, &r1, "echo", false).await.unwrap_err();
    assert!(
        matches!(
            e,
            SdkError::Revoked | SdkError::Handshake { .. } | SdkError::Denied { .. }
        ),
        "{e}"
    );

    // A new grant after all of that reaches both routers.
    grant(&t, "b-echo-again", Action::Dial, "agent-b", "echo").await;
    for r in [&r1, &r2] {
        dial_result(&cb, r, "echo", true)
            .await
            .expect("b dials again");
    }
    r1.shutdown().await;
    r2.shutdown().await;
}
