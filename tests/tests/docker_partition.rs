//! A controller and an edge router on hosts of their own (Docker containers on a private
//! network), the real `umbra` binary in both, and agents in this process: a partition that cuts
//! the controller off, measured against the router's stale window, then healed.
//!
//! What it proves, on real processes and a real network cut (`docker network disconnect`):
//! - a granted stream works across hosts (agent here → router container → echo service on the
//!   test network);
//! - cut off from its controller, the router keeps serving its last policy for its stale window
//!   and no less (still served just after the cut; the first refusal no earlier than the window
//!   minus one heartbeat), then fails closed within the window plus a margin: new streams are
//!   refused and a live stream is cut;
//! - a change made on the partitioned controller (a grant revoked with the CLI inside its
//!   container) is enforced by the router once the partition heals, and the router never serves
//!   that grant meanwhile; the router serves the grants that remain again by itself.
//!
//! The stale window is 4 s (the CLI takes whole seconds, at least 1 s; the router asks for a
//! heartbeat every quarter of it), so the whole file runs in well under a minute once its image
//! exists. Needs a Docker engine (`UMBRA_DOCKER_TESTS=skip` skips it) and the `umbra` binary
//! built beside the tests (`cargo test --workspace` builds it; otherwise `cargo build -p umbra`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use umbra_sdk::Context;
use umbra_tests::docker::probe::{blocking, must, probe, round_trip, HostEcho as Echo, Probe};
use umbra_tests::docker::{self, Container, RunSpec, TestNet, UMBRA_IN_IMAGE};

/// Long enough for anything on a loaded two-core machine; short enough to fail fast.
const BOUND: Duration = Duration::from_secs(20);
/// The router's stale window, and the same for its command line.
const STALE: Duration = Duration::from_secs(4);
const STALE_ARG: &str = "4s";
/// The heartbeat the router asks for: a quarter of its window. It last heard from the
/// controller at most this long before the cut, so it may fail closed this much before
/// cut + window, never earlier.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Timers, `docker` round trips and scheduling on a busy machine.
const SLACK: Duration = Duration::from_millis(500);
/// How far past the window the refusal may come.
const MARGIN: Duration = Duration::from_secs(2);
/// Time between probes.
const PROBE_EVERY: Duration = Duration::from_millis(100);

const CTRL_HOST: u8 = 10;
const ROUTER_HOST: u8 = 20;
const CTRL_PORT: u16 = 1280;
const ROUTER_PORT: u16 = 3022;
const ADMIN: &str = "/data/ctrl/admin.json";

/// The deployment: a network, the controller's and the router's containers, and the echo.
struct World {
    ctrl: Container,
    router: Option<Container>,
    echo: Echo,
    // Dropped last (fields drop in order): removes the containers and the network.
    net: TestNet,
}

impl World {
    /// Runs the `umbra` CLI as the first admin inside the controller's container, against the
    /// controller on its loopback (which a partition does not cut); its standard output.
    fn admin(&self, args: &[&str]) -> String {
        let mut all = vec![
            UMBRA_IN_IMAGE,
            "--admin",
            ADMIN,
            "--controller",
            "127.0.0.1:1280",
        ];
        all.extend_from_slice(args);
        must(
            blocking(|| self.ctrl.exec_ok(&all)),
            &format!("umbra {args:?}"),
        )
        .trim()
        .to_owned()
    }

    fn router(&self) -> &Container {
        self.router.as_ref().expect("router started")
    }

    fn router_addr(&self) -> String {
        format!("{}:{ROUTER_PORT}", self.router().ip())
    }

    /// Creates and enrolls (from this process, over the test network) an agent.
    async fn agent(&self, name: &str) -> Context {
        let token = self.admin(&["identity", "create", name]);
        let identity = umbra_sdk::enroll(&token, None)
            .await
            .unwrap_or_else(|e| panic!("enroll {name} with the controller container: {e}"));
        Context::new(identity).expect("agent context")
    }
}

async fn world() -> World {
    let image = must(blocking(docker::umbra_image), "the umbra image");
    let net = must(blocking(|| TestNet::create("partition")), "a test network");
    let echo = Echo::start(net.gateway()).await;
    let ctrl_addr = format!("{}:{CTRL_PORT}", net.ip(CTRL_HOST));
    let ctrl = must(
        blocking(|| {
            net.run(
                "ctrl",
                RunSpec::new(&image, CTRL_HOST)
                    .env("UMBRA_LOG", "info")
                    .shell(&format!(
                        "set -e; [ -e /data/ctrl/admin.json ] || {UMBRA_IN_IMAGE} controller init \
                         --dir /data/ctrl --trust-domain docker.umbra --address {ctrl_addr}; \
                         exec {UMBRA_IN_IMAGE} controller run --dir /data/ctrl \
                         --listen 0.0.0.0:{CTRL_PORT} --advertise {ctrl_addr}"
                    )),
            )
        }),
        "the controller's container",
    );
    let mut w = World {
        ctrl,
        router: None,
        echo,
        net,
    };
    // The controller answers its CLI.
    let start = Instant::now();
    loop {
        let o = must(
            blocking(|| {
                w.ctrl.exec(&[
                    UMBRA_IN_IMAGE,
                    "--admin",
                    ADMIN,
                    "--controller",
                    "127.0.0.1:1280",
                    "identity",
                    "list",
                ])
            }),
            "identity list",
        );
        if o.status.success() {
            break;
        }
        assert!(
            start.elapsed() < BOUND,
            "the controller did not come up: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            blocking(|| w.ctrl.logs()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The router enrolls inside its own container, then runs there.
    let token = w.admin(&["router", "create", "r1"]);
    let router_ip = w.net.ip(ROUTER_HOST);
    let router = must(
        blocking(|| {
            w.net.run(
                "r1",
                RunSpec::new(&image, ROUTER_HOST)
                    .env("UMBRA_LOG", "info")
                    .env("UMBRA_TOKEN", &token)
                    .shell(&format!(
                        "set -e; {UMBRA_IN_IMAGE} router enroll \"$UMBRA_TOKEN\" --dir /data/r1; \
                         exec {UMBRA_IN_IMAGE} router run --dir /data/r1 \
                         --listen 0.0.0.0:{ROUTER_PORT} --advertise {router_ip}:{ROUTER_PORT} \
                         --stale-after {STALE_ARG} --lanes 1 --busy-poll 0"
                    )),
            )
        }),
        "the router's container",
    );
    must(
        blocking(|| router.wait_for_log("router listening", BOUND)),
        "the router starts",
    );
    w.router = Some(router);

    let echo_addr = w.echo.addr.to_string();
    w.admin(&["service", "create", "echo", "--address", &echo_addr]);
    w
}

/// Probes until `done` holds for the result, at most `bound`; returns the last result.
async fn until(
    ctx: &Context,
    router: &str,
    bound: Duration,
    done: impl Fn(&Probe) -> bool,
) -> Probe {
    let start = Instant::now();
    loop {
        let p = probe(ctx, router).await;
        if done(&p) || start.elapsed() > bound {
            return p;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_router_fails_closed_after_its_window_and_heals_with_the_changes_made_meanwhile(
) {
    if docker::skip_requested() {
        eprintln!("UMBRA_DOCKER_TESTS=skip: skipped");
        return;
    }
    let t0 = Instant::now();
    let w = world().await;
    let setup = t0.elapsed();
    let a1 = w.agent("agent-1").await;
    let a2 = w.agent("agent-2").await;
    w.admin(&[
        "policy",
        "grant",
        "--identity",
        "@agent-1",
        "--service",
        "@echo",
        "--name",
        "a1-echo",
    ]);
    w.admin(&[
        "policy",
        "grant",
        "--identity",
        "@agent-2",
        "--service",
        "@echo",
        "--name",
        "a2-echo",
    ]);
    let router = w.router_addr();

    // Granted streams work across the hosts.
    for (who, ctx) in [("agent-1", &a1), ("agent-2", &a2)] {
        let p = until(ctx, &router, BOUND, |p| *p == Probe::Served).await;
        assert_eq!(p, Probe::Served, "{who} through the router before the cut");
    }
    // A live stream, open across the cut.
    let mut live = a2.dial_via(&router, "echo").await.expect("a live stream");
    round_trip(&mut live).await.expect("live stream echoes");

    // The cut: the controller's host leaves the network.
    let before_cut = Instant::now();
    must(
        blocking(|| w.ctrl.disconnect()),
        "disconnect the controller",
    );
    let after_cut = Instant::now();

    // Served on the last policy, then refused: never before the window (less the heartbeat).
    let mut served = Vec::new();
    let closed_at = loop {
        let p = probe(&a1, &router).await;
        let now = Instant::now();
        match p {
            Probe::Served => served.push(now - after_cut),
            Probe::Closed => break now,
            other => panic!("after the cut, at {:?}: {other:?}", now - after_cut),
        }
        assert!(
            now - after_cut < STALE + MARGIN,
            "still serving {:?} after the cut, past its {STALE:?} window",
            now - after_cut
        );
        tokio::time::sleep(PROBE_EVERY).await;
    };
    let closed_after = closed_at - before_cut;
    let first_served = *served.first().expect("served at least once after the cut");
    let last_served = *served.last().expect("served at least once after the cut");
    assert!(
        first_served < Duration::from_secs(1),
        "not served just after the cut: first served {first_served:?} after it"
    );
    assert!(
        closed_after + SLACK >= STALE - HEARTBEAT,
        "failed closed {closed_after:?} after the cut, before its {STALE:?} window"
    );
    assert!(
        closed_at - after_cut <= STALE + MARGIN,
        "failed closed {:?} after the cut",
        closed_at - after_cut
    );
    // The live stream is cut too.
    let cut = tokio::time::timeout(Duration::from_secs(3), round_trip(&mut live)).await;
    assert!(
        matches!(cut, Ok(Err(_))),
        "a live stream outlived the stale window: {cut:?}"
    );
    assert_eq!(
        probe(&a2, &router).await,
        Probe::Closed,
        "every identity is refused"
    );

    // The partition is real: nothing on the network reaches the controller.
    let ctrl_addr = SocketAddr::from((w.ctrl.ip(), CTRL_PORT));
    let reach = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(ctrl_addr),
    )
    .await;
    assert!(
        !matches!(reach, Ok(Ok(_))),
        "the controller is reachable at {ctrl_addr} during the partition"
    );

    // A change on the partitioned controller: the CLI inside its host, over its loopback.
    let revoked = w.admin(&["policy", "revoke", "a1-echo"]);
    assert!(revoked.contains("a1-echo"), "{revoked}");
    assert_eq!(probe(&a1, &router).await, Probe::Closed, "still closed");

    // Heal. The router comes back by itself, with the change: agent-2 served again, agent-1
    // denied, and agent-1 never served in between.
    let healed = Instant::now();
    must(blocking(|| w.ctrl.connect()), "reconnect the controller");
    let (mut a1_last, mut a2_last);
    loop {
        a1_last = probe(&a1, &router).await;
        assert!(
            matches!(a1_last, Probe::Closed | Probe::Denied),
            "{:?} after healing, agent-1 (revoked during the partition) got {a1_last:?}",
            healed.elapsed()
        );
        a2_last = probe(&a2, &router).await;
        assert!(
            matches!(a2_last, Probe::Closed | Probe::Served),
            "{:?} after healing, agent-2 got {a2_last:?}",
            healed.elapsed()
        );
        if a1_last == Probe::Denied && a2_last == Probe::Served {
            break;
        }
        assert!(
            healed.elapsed() < BOUND,
            "not healed within {BOUND:?}: agent-1 {a1_last:?}, agent-2 {a2_last:?}; router logs:\n{}",
            blocking(|| w.router().logs()).unwrap_or_default()
        );
        tokio::time::sleep(PROBE_EVERY).await;
    }
    let recovered = healed.elapsed();
    let logs = must(blocking(|| w.router().logs()), "router logs");
    assert!(logs.contains("failing closed"), "{logs}");
    println!(
        "docker partition: setup {setup:?}; after the cut: served {} times, first at \
         {first_served:?}, last at {last_served:?}; failed closed at {closed_after:?} (window \
         {STALE:?}, heartbeat {HEARTBEAT:?}); served again and enforcing the partition's change \
         {recovered:?} after reconnecting; total {:?}",
        served.len(),
        t0.elapsed()
    );
}
