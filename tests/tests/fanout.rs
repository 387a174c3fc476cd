//! Edge-view fan-out: many concurrent watchers, each its own enrolled identity, follow their
//! views through the real controller on 127.0.0.1:0. One role change reaches every one of them,
//! and a change that touches one identity wakes only that identity's watcher (the hub's
//! counters say so). The time and CPU of the fan-out are printed, never asserted: speed targets
//! live in `cargo bench -p umbra --bench scale`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use http::Method;
use tokio::sync::mpsc;
use umbra_pki::IdentityFile;
use umbra_policies::{Action, Hosting, IdentityKind, Name, Selector, Semantic, Service};
use umbra_proto::api::{CreateIdentityRequest, EdgeView, GrantRequest, TokenResponse};
use umbra_sdk::{Context, ControllerClient};
use umbra_tests::TestController;

/// Watchers in the test: the 1,000, enrolled and followed in about 11 s on two
/// cores in a debug build; the bench runs the same shape against separate processes.
const WATCHERS: usize = 1000;
/// Enrollments and watch openings in flight at once: the controller admits at most 16
/// unauthenticated connections per source, and every one here comes from 127.0.0.1.
const IN_FLIGHT: usize = 8;
/// Bound on every wait (never a fixed sleep).
const BOUND: Duration = Duration::from_secs(60);

fn name(s: &str) -> Name {
    Name::new(s).expect("name")
}

fn agent_name(i: usize) -> String {
    format!("fan-{i:04}")
}

async fn enroll(admin: &ControllerClient, t: &TestController, i: usize) -> IdentityFile {
    let req = CreateIdentityRequest {
        name: name(&agent_name(i)),
        kind: IdentityKind::Agent,
        roles: [name("fan")].into(),
        token_ttl_secs: None,
    };
    let tok: TokenResponse = admin
        .call(Method::POST, "/v1/identities", Some(&req))
        .await
        .expect("create");
    umbra_sdk::enroll(&tok.token, Some(&t.addr()))
        .await
        .expect("enroll")
}

async fn service(admin: &ControllerClient, n: &str) {
    let s = Service {
        name: name(n),
        roles: Default::default(),
        hosting: Hosting::Address("127.0.0.1:9".parse().expect("address")),
        intercepts: vec![format!("{n}.umbra:443").parse().expect("intercept")],
        proxy_protocol: false,
    };
    let _: Service = admin
        .call(Method::POST, "/v1/services", Some(&s))
        .await
        .expect("service");
}

async fn grant(admin: &ControllerClient, policy: &str, who: &str, what: &str) {
    let req = GrantRequest {
        name: Some(name(policy)),
        action: Action::Dial,
        identities: vec![who.parse::<Selector>().expect("selector")],
        services: vec![what.parse::<Selector>().expect("selector")],
        semantic: Semantic::AnyOf,
        limits: Default::default(),
    };
    let _: umbra_policies::ServicePolicy = admin
        .call(Method::POST, "/v1/policies", Some(&req))
        .await
        .expect("grant");
}

/// User and system CPU of this whole process (controller and clients alike), from
/// `/proc/self/stat` in clock ticks of 10 ms.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Fields 14 and 15 of the file (utime, stime) are 12 and 13 after the command name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn names(v: &EdgeView) -> BTreeSet<String> {
    v.services.iter().map(|s| s.name.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_role_change_reaches_every_watcher_and_one_identity_wakes_one() {
    let t = TestController::start_with(|cfg| {
        cfg.connections.agents = WATCHERS + 64;
        cfg.connections.total = WATCHERS + 256;
    })
    .await;
    let admin = t.admin_client();

    let started = Instant::now();
    let files: Vec<IdentityFile> = futures::stream::iter(0..WATCHERS)
        .map(|i| enroll(&admin, &t, i))
        .buffered(IN_FLIGHT)
        .collect()
        .await;
    println!("enrolled {WATCHERS} agents in {:?}", started.elapsed());

    // Each watcher sends every view it gets, tagged with its number.
    let started = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, EdgeView)>();
    let contexts: Vec<Context> = files
        .into_iter()
        .map(|f| Context::new(f).expect("context"))
        .collect();
    let watches: Vec<_> = futures::stream::iter(contexts.iter().enumerate())
        .map(|(i, ctx)| async move { (i, ctx.watch_edge().await.expect("watch")) })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut w) in watches {
        let tx = tx.clone();
        tasks.spawn(async move {
            while let Ok(Some(v)) = w.next().await {
                if tx.send((i, v)).is_err() {
                    return;
                }
            }
        });
    }
    let mut latest: Vec<Option<EdgeView>> = vec![None; WATCHERS];
    let mut seen = 0;
    while seen < WATCHERS {
        let (i, v) = tokio::time::timeout(BOUND, rx.recv())
            .await
            .expect("every first view within the bound")
            .expect("open");
        assert!(v.services.is_empty(), "nothing is granted yet: {v:?}");
        if latest[i].replace(v).is_none() {
            seen += 1;
        }
    }
    println!("{WATCHERS} watches open in {:?}", started.elapsed());
    assert_eq!(t.ctrl.watch_stats().watchers, WATCHERS);

    // A service nobody may use yet wakes nobody.
    let before = t.ctrl.watch_stats();
    service(&admin, "fanned").await;
    service(&admin, "solo").await;
    assert_eq!(
        t.ctrl.watch_stats().woken,
        before.woken,
        "no view can change"
    );

    // One role change that alters every view: all of them see it, each recomputed once.
    let before = t.ctrl.watch_stats();
    let (cpu, started) = (process_cpu(), Instant::now());
    grant(&admin, "fan-out", "#fan", "@fanned").await;
    let mut updated = 0;
    while updated < WATCHERS {
        let (i, v) = tokio::time::timeout(BOUND, rx.recv())
            .await
            .expect("every watcher updated within the bound")
            .expect("open");
        assert_eq!(names(&v), ["fanned".to_owned()].into(), "watcher {i}");
        let dial = v
            .services
            .iter()
            .all(|s| s.dial && !s.bind && s.grants.is_empty());
        assert!(dial, "watcher {i}: {v:?}");
        let was = latest[i].replace(v);
        assert!(
            was.is_some_and(|w| w.services.is_empty()),
            "one update each"
        );
        updated += 1;
    }
    let (took, cpu) = (started.elapsed(), process_cpu().saturating_sub(cpu));
    let after = t.ctrl.watch_stats();
    println!(
        "fan-out to {WATCHERS} watchers: {took:?}, process CPU {cpu:?} (controller and the \
         {WATCHERS} in-process clients together); woken {}, views recomputed {}, diffs sent {}",
        after.woken - before.woken,
        after.recomputed - before.recomputed,
        after.diffs_sent - before.diffs_sent,
    );
    assert_eq!(
        after.woken - before.woken,
        WATCHERS as u64,
        "each watcher woken once"
    );
    assert_eq!(after.recomputed - before.recomputed, WATCHERS as u64);
    assert_eq!(after.diffs_sent - before.diffs_sent, WATCHERS as u64);

    // A change that touches one identity wakes one watcher, and only that one recomputes.
    let one = WATCHERS / 2;
    let before = t.ctrl.watch_stats();
    grant(&admin, "solo", &format!("@{}", agent_name(one)), "@solo").await;
    assert_eq!(
        t.ctrl.watch_stats().woken - before.woken,
        1,
        "the commit woke exactly one watcher"
    );
    let (i, v) = tokio::time::timeout(BOUND, rx.recv())
        .await
        .expect("the one watcher updated within the bound")
        .expect("open");
    assert_eq!(i, one);
    assert_eq!(names(&v), ["fanned".to_owned(), "solo".to_owned()].into());
    let after = t.ctrl.watch_stats();
    assert_eq!(
        after.recomputed - before.recomputed,
        1,
        "one view recomputed"
    );
    assert_eq!(after.diffs_sent - before.diffs_sent, 1);
    assert!(rx.try_recv().is_err(), "nobody else got a frame");
    tasks.abort_all();
}
