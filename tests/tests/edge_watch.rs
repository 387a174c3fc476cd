//! The edge-view watch's lifetime against the real controller: access that ends with time, which
//! no commit announces (and so no wake of the watch hub), still ends the watch.

use std::time::Duration;

use umbra_clock::ManualClock;
use umbra_proto::edge::EdgeWatchDecoder;
use umbra_tests::dataplane::agent;
use umbra_tests::TestController;

const BOUND: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_watch_ends_when_its_certificate_expires() {
    let clock = ManualClock::starting_now();
    let c = clock.clock();
    let t = TestController::start_with(|cfg| cfg.clock = c).await;
    let a = agent(&t, "watcher").await;
    let mut s = t.client_for(&a).stream("/v1/edge/watch").await.unwrap();
    let mut d = EdgeWatchDecoder::new(1 << 20);
    let first = loop {
        if let Some(v) = d.next().unwrap() {
            break v.clone();
        }
        let chunk = tokio::time::timeout(BOUND, s.chunk())
            .await
            .expect("the first view within the bound")
            .unwrap()
            .expect("open");
        d.push(&chunk);
    };
    assert!(first.services.is_empty());

    // Past the certificate's notAfter (24 hours) on the controller's clock: the watch ends,
    // though nothing was committed.
    clock.advance(Duration::from_secs(25 * 3600));
    let ended = tokio::time::timeout(BOUND, async {
        // Keepalives may still arrive before the end.
        while let Ok(Some(_)) = s.chunk().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the watch ended when the certificate expired"
    );
}
