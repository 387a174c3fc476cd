//! A service hosted again from the same context (a gateway restarted in its process) keeps
//! its callers. The old listener, dropped late (its task aborted, dropped whenever the runtime
//! got to it), used to remove the new listener's entry, and every caller after that was
//! refused as if nobody hosted the service; seen under load as an LLM gateway unreachable for
//! good after a restart.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_sdk::Context;
use umbra_tests::dataplane::*;
use umbra_tests::TestController;

const BOUND: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_listener_dropped_after_a_new_bind_leaves_the_new_one_serving() {
    let t = TestController::start().await;
    let router = start_router(&t, "r1", |_| {}).await;
    let host = agent(&t, "host-1").await;
    let caller = agent(&t, "caller-1").await;
    sdk_service(&t, "svc", "host-1", "caller-1").await;
    let host = Context::new(host).expect("host context");
    let old = tokio::time::timeout(BOUND, host.bind("svc"))
        .await
        .expect("timely")
        .expect("first bind");
    // The restart: a new listener for the same service, then the old one goes.
    let mut new = tokio::time::timeout(BOUND, host.bind("svc"))
        .await
        .expect("timely")
        .expect("second bind");
    drop(old);

    let serve = tokio::spawn(async move {
        let (mut s, _who) = new.accept().await.expect("a caller");
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.expect("read");
        s.write_all(&buf).await.expect("write");
        s.shutdown().await.expect("finish");
        new
    });
    let caller = Context::new(caller).expect("caller context");
    let mut s = tokio::time::timeout(BOUND, async {
        loop {
            match caller.dial("svc").await {
                Ok(s) => return s,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("the new listener takes callers");
    s.write_all(b"hello").await.expect("write");
    let mut back = Vec::new();
    tokio::time::timeout(BOUND, s.read_to_end(&mut back))
        .await
        .expect("timely")
        .expect("read");
    assert_eq!(back, b"hello");
    let _new = serve.await.expect("served");
    router.shutdown().await;
}
