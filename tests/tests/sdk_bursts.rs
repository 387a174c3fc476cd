//! A burst of dials from a context with no connection yet (an agent's connections arriving
//! together at its tunneler) makes one connection to the router and every dial succeeds. Each
//! dial used to open a connection of its own: the router refused the identity's connections
//! past its bound of 32, and each refused dial put the router in backoff for seconds.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_sdk::Context;
use umbra_tests::dataplane::*;
use umbra_tests::TestController;

const DIALS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_dials_shares_one_connection_and_all_succeed() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    let id = a.id.clone();
    echo_service(&t, &echo, "echo", "agent-1").await;
    let ctx = Context::new(a).expect("context");
    // The view first, so that every dial goes straight to connecting.
    ctx.edge().await.expect("edge view");

    let dials = (0..DIALS).map(|i| {
        let ctx = ctx.clone();
        async move {
            let mut s = ctx.dial("echo").await.map_err(|e| e.to_string())?;
            let msg = format!("dial {i}");
            s.write_all(msg.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await.map_err(|e| e.to_string())?;
            assert_eq!(back, msg.as_bytes());
            Ok::<_, String>(s)
        }
    });
    let results = tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(dials))
        .await
        .expect("the burst is served within the bound");
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().cloned())
        .collect();
    let mut kinds = std::collections::BTreeMap::new();
    for f in &failed {
        *kinds
            .entry(f.split(':').next().unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    eprintln!("{kinds:?}");
    assert!(
        failed.is_empty(),
        "{} of {DIALS} dials failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    let usage = router.usage(&id);
    assert_eq!(usage.connections, 1, "{usage:?}");
    assert_eq!(usage.streams, DIALS, "{usage:?}");
    assert_eq!(router.stats().limited, 0);
    drop(results);
    router.shutdown().await;
}

/// The same burst with its router gone: every dial fails over to a fresh router list, and the
/// controller is asked for it once or twice, not once per dial (the controller refuses an
/// identity's connections past 32, which failed most of such a burst with a TLS error instead
/// of "unavailable", and would lock the identity's other controller calls out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_failing_dials_asks_the_controller_for_routers_once() {
    let registry = umbra_metrics::Registry::new();
    let r = registry.clone();
    let t = TestController::start_with(move |c| c.metrics = Some(r)).await;
    let scraped = umbra_tests::metrics::endpoint(&registry).await;
    let router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let ctx = Context::new(a).expect("context");
    ctx.edge().await.expect("edge view");
    router.shutdown().await;

    let edge = [("route", "/v1/edge"), ("method", "GET")];
    let asked =
        |m: &umbra_tests::exposition::Exposition| m.sum("umbra_controller_requests_total", &edge);
    let before = asked(
        &umbra_tests::exposition::scrape(scraped.local_addr())
            .await
            .expect("scrape"),
    );
    let dials = (0..100).map(|_| {
        let ctx = ctx.clone();
        async move { ctx.dial("echo").await.map(drop).map_err(|e| e.to_string()) }
    });
    let results = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(dials))
        .await
        .expect("the burst ends within the bound");
    let tls: Vec<_> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .filter(|e| e.contains("TLS"))
        .collect();
    assert!(results.iter().all(Result::is_err), "no router, no stream");
    assert!(
        tls.is_empty(),
        "{} refused by the controller: {:?}",
        tls.len(),
        tls.first()
    );
    let after = asked(
        &umbra_tests::exposition::scrape(scraped.local_addr())
            .await
            .expect("scrape"),
    );
    assert!(
        after - before <= 3.0,
        "the controller was asked for routers {} times",
        after - before
    );
}
