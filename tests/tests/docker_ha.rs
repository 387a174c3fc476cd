//! Two controllers on one PostgreSQL database, each on a host of its own, routers following
//! them, and agents in this process: one controller partitioned from everything, then from the
//! database only, then healed. The real `umbra` binary in every container.
//!
//! Two networks: the test network ("back") holds PostgreSQL and every umbra host; the segment
//! "front" holds the controllers, the routers and this machine (agents, echo service). The
//! controllers advertise their front addresses and the routers follow those, so that cutting a
//! controller off the back network cuts it off its database and nothing else.
//!
//! What it proves, on real processes and real network cuts (`docker network disconnect`):
//! - a grant made through controller B is served by routers that follow controller A;
//! - A partitioned from everything: the router that follows A and B fails over to B and keeps
//!   serving past its stale window (every probe served, a live stream kept), and enforces a
//!   revocation and a grant made through B meanwhile (a live stream of the revoked grant is
//!   cut); the router that follows A alone fails closed within its window plus a margin;
//! - the partition heals: what was written through B meanwhile (a revocation, a grant, an
//!   identity) is visible through A's own API within seconds, and A's lone router enforces it,
//!   never serving the revoked grant on the way;
//! - A cut off its database only, still reachable by its routers: A ends its control channels
//!   (it no longer vouches), and its lone router, which cannot learn a revocation made through
//!   B, fails closed no later than A's out-of-touch delay plus the stale window plus a margin;
//!   the router following both keeps serving and enforces that revocation. Healed, the lone
//!   router serves again and enforces it.
//!
//! The stale window is 4 s, as in `docker_partition.rs`. Needs a Docker engine
//! (`UMBRA_DOCKER_TESTS=skip` skips it) and the `umbra` binary built beside the tests (`cargo
//! build -p umbra`) or named by `UMBRA_BIN`.

use std::process::Output;
use std::time::{Duration, Instant};

use umbra_sdk::Context;
use umbra_tests::docker::probe::{blocking, must, probe, round_trip, HostEcho as Echo, Probe};
use umbra_tests::docker::{self, Container, RunSpec, Segment, TestNet, PG_PORT, UMBRA_IN_IMAGE};

/// Long enough for anything on a loaded two-core machine; short enough to fail fast.
const BOUND: Duration = Duration::from_secs(20);
/// The routers' stale window, and the same for their command line.
const STALE: Duration = Duration::from_secs(4);
const STALE_ARG: &str = "4s";
/// The heartbeat a router asks for: a quarter of its window.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a controller goes on vouching without an answer from its database (the
/// controller's `OUT_OF_TOUCH`, not exported).
const OUT_OF_TOUCH: Duration = Duration::from_secs(3);
/// Timers, `docker` round trips and scheduling on a busy machine.
const SLACK: Duration = Duration::from_millis(500);
/// How far past its deadline a refusal may come.
const MARGIN: Duration = Duration::from_secs(2);
/// Time between probes.
const PROBE_EVERY: Duration = Duration::from_millis(100);

const PG_HOST: u8 = 5;
const A_HOST: u8 = 11;
const B_HOST: u8 = 12;
/// Follows A and B.
const R1_HOST: u8 = 21;
/// Follows A alone.
const R2_HOST: u8 = 22;
const CTRL_PORT: u16 = 1280;
const ROUTER_PORT: u16 = 3022;
/// The first admin's identity file: made in A's directory, copied with it into B's container.
const ADMIN_A: &str = "/data/a/admin.json";
const ADMIN_B: &str = "/data/from-a/admin.json";

/// Probes until `done` holds for the result, at most `bound`; returns the last result and when
/// it came, from `since`.
async fn until(
    ctx: &Context,
    router: &str,
    since: Instant,
    bound: Duration,
    done: impl Fn(&Probe) -> bool,
) -> (Probe, Duration) {
    loop {
        let p = probe(ctx, router).await;
        if done(&p) || since.elapsed() > bound {
            return (p, since.elapsed());
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// Uses a live stream until it is cut, at most `bound`; how long that took from `since`.
async fn until_cut(s: &mut umbra_sdk::Stream, since: Instant, bound: Duration) -> Option<Duration> {
    tokio::time::timeout(bound, async {
        loop {
            if round_trip(s).await.is_err() {
                return since.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .ok()
}

/// The controller a router's control channel last opened to, from its logs.
fn attached_to(router: &Container) -> Option<String> {
    let logs = router.logs().ok()?;
    let line = logs
        .lines()
        .rev()
        .find(|l| l.contains("control channel open"))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("controller="))
        .map(str::to_owned)
}

/// Waits until `router`'s control channel is open to `ctrl`; how long that took.
async fn attaches(router: &Container, ctrl: &str, bound: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let on = blocking(|| attached_to(router));
        if on.as_deref() == Some(ctrl) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < bound,
            "{} is on {on:?}, not {ctrl}, after {bound:?}; its logs:\n{}",
            router.name(),
            blocking(|| router.logs()).unwrap_or_default()
        );
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// The deployment.
struct World {
    a: Container,
    b: Container,
    /// Follows A and B (in that order).
    r1: Container,
    /// Follows A alone.
    r2: Container,
    front: Segment,
    echo: Echo,
    // Dropped last (fields drop in order): removes the containers and the networks.
    _net: TestNet,
}

impl World {
    fn a_addr(&self) -> String {
        format!("{}:{CTRL_PORT}", self.front.ip(A_HOST))
    }

    fn b_addr(&self) -> String {
        format!("{}:{CTRL_PORT}", self.front.ip(B_HOST))
    }

    fn r1_addr(&self) -> String {
        format!("{}:{ROUTER_PORT}", self.front.ip(R1_HOST))
    }

    fn r2_addr(&self) -> String {
        format!("{}:{ROUTER_PORT}", self.front.ip(R2_HOST))
    }

    /// Runs the `umbra` CLI as the first admin inside `ctrl`'s container, against that
    /// controller on its loopback (which no partition cuts); its output whatever its status.
    fn cli(ctrl: &Container, admin: &str, args: &[&str]) -> Output {
        let mut all = vec![
            UMBRA_IN_IMAGE,
            "--admin",
            admin,
            "--controller",
            "127.0.0.1:1280",
        ];
        all.extend_from_slice(args);
        must(blocking(|| ctrl.exec(&all)), &format!("umbra {args:?}"))
    }

    /// A management command through controller B; its standard output.
    fn via_b(&self, args: &[&str]) -> String {
        let o = World::cli(&self.b, ADMIN_B, args);
        assert!(
            o.status.success(),
            "umbra {args:?} through B: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    /// A management command through controller A.
    fn via_a(&self, args: &[&str]) -> Output {
        World::cli(&self.a, ADMIN_A, args)
    }

    /// Creates (through B) and enrolls (from this process, over the front segment) an agent.
    async fn agent(&self, name: &str) -> Context {
        let token = self.via_b(&["identity", "create", name]);
        let identity = umbra_sdk::enroll(&token, None)
            .await
            .unwrap_or_else(|e| panic!("enroll {name}: {e}"));
        Context::new(identity).expect("agent context")
    }

    fn grant(&self, agent: &str, name: &str) {
        let out = self.via_b(&[
            "policy",
            "grant",
            "--identity",
            &format!("@{agent}"),
            "--service",
            "@echo",
            "--name",
            name,
        ]);
        assert!(out.contains(name), "{out}");
    }
}

/// Waits until the controller in `ctrl` answers its CLI on loopback.
async fn answers(ctrl: &Container, admin: &str) {
    let start = Instant::now();
    loop {
        let o = World::cli(ctrl, admin, &["identity", "list"]);
        if o.status.success() {
            return;
        }
        assert!(
            start.elapsed() < BOUND,
            "{} did not come up: {}\n{}",
            ctrl.name(),
            String::from_utf8_lossy(&o.stderr),
            blocking(|| ctrl.logs()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn world() -> World {
    let image = must(blocking(docker::umbra_image), "the umbra image");
    let net = must(blocking(|| TestNet::create("ha")), "a test network");
    let front = must(blocking(|| net.segment("front")), "the front segment");
    let echo = Echo::start(front.gateway()).await;
    let pg = must(
        blocking(|| net.postgres("pg", PG_HOST, BOUND)),
        "the database's container",
    );
    let store = format!("postgres://postgres@{}:{PG_PORT}/postgres", pg.ip());
    let a_addr = format!("{}:{CTRL_PORT}", front.ip(A_HOST));
    let b_addr = format!("{}:{CTRL_PORT}", front.ip(B_HOST));
    let run = |dir: &str| {
        format!(
            "exec {UMBRA_IN_IMAGE} controller run --dir {dir} --store {store} \
             --listen 0.0.0.0:{CTRL_PORT} --advertise {a_addr},{b_addr}"
        )
    };

    // A: init (keys in its directory, state in the database), then run.
    let a = must(
        blocking(|| {
            net.run(
                "ctrl-a",
                RunSpec::new(&image, A_HOST)
                    .on(&front, A_HOST)
                    .env("UMBRA_LOG", "info")
                    .shell(&format!(
                        "set -e; {UMBRA_IN_IMAGE} controller init --dir /data/a \
                         --trust-domain docker.umbra --store {store} --address {a_addr}; {}",
                        run("/data/a")
                    )),
            )
        }),
        "controller A's container",
    );
    answers(&a, ADMIN_A).await;

    // B: A's directory, copied through this machine, then `controller join` and run.
    let keys = tempfile::tempdir().expect("a scratch directory");
    let copy = keys.path().join("a");
    must(
        blocking(|| a.copy_out("/data/a", &copy)),
        "copy A's keys out",
    );
    let b = must(
        blocking(|| {
            net.run(
                "ctrl-b",
                RunSpec::new(&image, B_HOST)
                    .on(&front, B_HOST)
                    .file(&copy, "/data/from-a")
                    .env("UMBRA_LOG", "info")
                    .shell(&format!(
                        "set -e; {UMBRA_IN_IMAGE} controller join --dir /data/b \
                         --from /data/from-a --store {store}; {}",
                        run("/data/b")
                    )),
            )
        }),
        "controller B's container",
    );
    drop(keys);
    answers(&b, ADMIN_B).await;

    // The routers enroll inside their own containers (tokens made through B), then run.
    let router = |name: &str, host: u8, controllers: &str| {
        let o = World::cli(&b, ADMIN_B, &["router", "create", name]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let token = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        let advertise = format!("{}:{ROUTER_PORT}", front.ip(host));
        let r = must(
            blocking(|| {
                net.run(
                    name,
                    RunSpec::new(&image, host)
                        .on(&front, host)
                        .env("UMBRA_LOG", "info")
                        .env("UMBRA_TOKEN", &token)
                        .shell(&format!(
                            "set -e; {UMBRA_IN_IMAGE} router enroll \"$UMBRA_TOKEN\" --dir /data/r; \
                             exec {UMBRA_IN_IMAGE} --controller {controllers} router run \
                             --dir /data/r --listen 0.0.0.0:{ROUTER_PORT} --advertise {advertise} \
                             --stale-after {STALE_ARG} --lanes 1 --busy-poll 0"
                        )),
                )
            }),
            &format!("the router {name}'s container"),
        );
        must(
            blocking(|| r.wait_for_log("router listening", BOUND)),
            &format!("the router {name} starts"),
        );
        r
    };
    let r1 = router("r1", R1_HOST, &format!("{a_addr},{b_addr}"));
    let r2 = router("r2", R2_HOST, &a_addr);

    let w = World {
        a,
        b,
        r1,
        r2,
        front,
        echo,
        _net: net,
    };
    let echo_addr = w.echo.addr.to_string();
    w.via_b(&["service", "create", "echo", "--address", &echo_addr]);
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_controller_stops_vouching_and_the_other_one_carries_the_routers() {
    if docker::skip_requested() {
        eprintln!("UMBRA_DOCKER_TESTS=skip: skipped");
        return;
    }
    let t0 = Instant::now();
    let w = world().await;
    let setup = t0.elapsed();
    let (r1, r2) = (w.r1_addr(), w.r2_addr());
    let (a_addr, b_addr) = (w.a_addr(), w.b_addr());

    // 1. Both routers start on A (the first of their lists); everything is written through B.
    attaches(&w.r1, &a_addr, BOUND).await;
    attaches(&w.r2, &a_addr, BOUND).await;
    let a1 = w.agent("agent-1").await;
    let a2 = w.agent("agent-2").await;
    let a3 = w.agent("agent-3").await;
    let granted = Instant::now();
    w.grant("agent-1", "alpha-echo");
    w.grant("agent-2", "bravo-echo");
    for (who, ctx) in [("agent-1", &a1), ("agent-2", &a2)] {
        for r in [&r1, &r2] {
            let (p, _) = until(ctx, r, Instant::now(), BOUND, |p| *p == Probe::Served).await;
            assert_eq!(
                p,
                Probe::Served,
                "{who} through {r}, a grant made through B"
            );
        }
    }
    let served_after_grant = granted.elapsed();
    assert_eq!(probe(&a3, &r1).await, Probe::Denied, "agent-3 has no grant");
    let mut live1 = a1
        .dial_via(&r1, "echo")
        .await
        .expect("agent-1's live stream");
    round_trip(&mut live1)
        .await
        .expect("agent-1's live stream echoes");
    let mut live2 = a2
        .dial_via(&r1, "echo")
        .await
        .expect("agent-2's live stream");
    round_trip(&mut live2)
        .await
        .expect("agent-2's live stream echoes");

    // 2. A is cut off from everything: its routers, its database.
    let cut = Instant::now();
    must(
        blocking(|| w.a.leave(&w.front).and_then(|()| w.a.disconnect())),
        "partition A",
    );
    let after_cut = Instant::now();
    // r1 serves all along, past its window; r2 (A alone) fails closed after its window.
    let mut r2_closed = None;
    while after_cut.elapsed() < STALE + MARGIN {
        let p = probe(&a2, &r1).await;
        assert_eq!(
            p,
            Probe::Served,
            "{:?} after A's partition, the router following A and B",
            after_cut.elapsed()
        );
        let p = probe(&a2, &r2).await;
        match (&p, r2_closed) {
            (Probe::Served, None) => {}
            (Probe::Closed, None) => r2_closed = Some(cut.elapsed()),
            (Probe::Closed, Some(_)) => {}
            _ => panic!(
                "{:?} after A's partition, the router following A alone: {p:?}",
                after_cut.elapsed()
            ),
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
    let r2_closed = r2_closed.unwrap_or_else(|| {
        panic!("the router following A alone still served {STALE:?} + {MARGIN:?} after the cut")
    });
    assert!(
        r2_closed + SLACK >= STALE - HEARTBEAT,
        "the lone router failed closed {r2_closed:?} after the cut, before its window"
    );
    round_trip(&mut live2)
        .await
        .expect("a live stream through r1 outlives the stale window");
    attaches(&w.r1, &b_addr, Duration::from_secs(1)).await;
    let reach = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(a_addr.as_str()),
    )
    .await;
    assert!(
        !matches!(reach, Ok(Ok(_))),
        "A is reachable during its partition"
    );

    // Changes through B during the partition, enforced by r1.
    let changed = Instant::now();
    let out = w.via_b(&["policy", "revoke", "alpha-echo"]);
    assert!(out.contains("alpha-echo"), "{out}");
    let live_cut = until_cut(&mut live1, changed, BOUND).await;
    let live_cut = live_cut.expect("the revocation through B cuts agent-1's live stream on r1");
    let (p, denied) = until(&a1, &r1, changed, BOUND, |p| *p == Probe::Denied).await;
    assert_eq!(
        p,
        Probe::Denied,
        "agent-1 on r1 after its revocation through B"
    );
    let granted_b = Instant::now();
    w.grant("agent-3", "charlie-echo");
    let (p, served3) = until(&a3, &r1, granted_b, BOUND, |p| *p == Probe::Served).await;
    assert_eq!(p, Probe::Served, "agent-3 on r1 after its grant through B");
    let token = w.via_b(&["identity", "create", "late-agent"]);
    assert!(!token.is_empty());
    assert_eq!(probe(&a2, &r2).await, Probe::Closed, "r2 still closed");
    round_trip(&mut live2)
        .await
        .expect("agent-2's live stream through r1 all along");
    let partition = cut.elapsed();

    // 4. Heal: A is back on both networks. What B wrote meanwhile is visible through A's API.
    // Not at once: the query A's follower had in flight at the cut waits for TCP to retransmit
    // (about 6 s here; the store's TCP user timeout, 20 s, bounds it).
    let healed = Instant::now();
    must(
        blocking(|| w.a.connect().and_then(|()| w.a.join(&w.front, A_HOST))),
        "heal A",
    );
    loop {
        let policies = w.via_a(&["--json", "policy", "list"]);
        let identities = w.via_a(&["--json", "identity", "list"]);
        let (p, i) = (
            String::from_utf8_lossy(&policies.stdout),
            String::from_utf8_lossy(&identities.stdout),
        );
        if policies.status.success()
            && identities.status.success()
            && p.contains("\"charlie-echo\"")
            && !p.contains("\"alpha-echo\"")
            && p.contains("\"bravo-echo\"")
            && i.contains("\"late-agent\"")
        {
            break;
        }
        assert!(
            healed.elapsed() < BOUND,
            "A does not show B's writes {BOUND:?} after healing: policies {p} {}; \
             identities {i} {}; A's logs:\n{}",
            String::from_utf8_lossy(&policies.stderr),
            String::from_utf8_lossy(&identities.stderr),
            blocking(|| w.a.logs()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let visible_on_a = healed.elapsed();
    // A's lone router comes back with B's changes, never serving the revoked grant meanwhile.
    loop {
        let p1 = probe(&a1, &r2).await;
        assert!(
            matches!(p1, Probe::Closed | Probe::Denied),
            "{:?} after healing, agent-1 (revoked through B) on r2: {p1:?}",
            healed.elapsed()
        );
        let p3 = probe(&a3, &r2).await;
        assert!(
            matches!(p3, Probe::Closed | Probe::Served),
            "{:?} after healing, agent-3 on r2: {p3:?}",
            healed.elapsed()
        );
        if p1 == Probe::Denied && p3 == Probe::Served {
            break;
        }
        assert!(
            healed.elapsed() < BOUND,
            "r2 not serving B's changes {BOUND:?} after healing; its logs:\n{}",
            blocking(|| w.r2.logs()).unwrap_or_default()
        );
        tokio::time::sleep(PROBE_EVERY).await;
    }
    let r2_back = healed.elapsed();
    attaches(&w.r2, &a_addr, Duration::from_secs(1)).await;

    // 3. A cut off its database only: its routers still reach it. It stops vouching, and its
    // lone router cannot learn a revocation made through B: it must fail closed no later than
    // A's out-of-touch delay plus the window (plus a margin), never serve past that.
    const ENDED: &str = "the store is out of reach: ending the control channel router=r2";
    let ended_before = must(blocking(|| w.a.logs()), "A's logs")
        .matches(ENDED)
        .count();
    let db_cut = Instant::now();
    must(blocking(|| w.a.disconnect()), "cut A off its database");
    let out = w.via_b(&["policy", "revoke", "bravo-echo"]);
    assert!(out.contains("bravo-echo"), "{out}");
    let deadline = OUT_OF_TOUCH + STALE + MARGIN;
    let mut r2_stale_served = Duration::ZERO;
    let mut r1_denied = None;
    let r2_refused = loop {
        let p = probe(&a2, &r2).await;
        let at = db_cut.elapsed();
        match p {
            Probe::Served => r2_stale_served = at,
            Probe::Closed | Probe::Denied => break at,
            Probe::Other(e) => panic!("{at:?} after A lost its database, r2: {e}"),
        }
        assert!(
            at < deadline,
            "r2 served agent-2's revoked grant {at:?} after A lost its database (the \
             controller's {OUT_OF_TOUCH:?} + the window {STALE:?} + {MARGIN:?})"
        );
        let p = probe(&a3, &r1).await;
        assert_eq!(p, Probe::Served, "{at:?} after A lost its database, r1");
        if r1_denied.is_none() && probe(&a2, &r1).await == Probe::Denied {
            r1_denied = Some(db_cut.elapsed());
        }
        tokio::time::sleep(PROBE_EVERY).await;
    };
    let (p, r1_denied) = match r1_denied {
        Some(at) => (Probe::Denied, at),
        None => until(&a2, &r1, db_cut, BOUND, |p| *p == Probe::Denied).await,
    };
    assert_eq!(
        p,
        Probe::Denied,
        "r1 enforces the revocation made through B"
    );
    // A was reachable all along: it ended the channel because it lost its database.
    let reach = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(a_addr.as_str()),
    )
    .await;
    assert!(
        matches!(reach, Ok(Ok(_))),
        "A is unreachable from the front while cut off its database only: {reach:?}"
    );
    let a_logs = must(blocking(|| w.a.logs()), "A's logs");
    assert!(
        a_logs.matches(ENDED).count() > ended_before,
        "A did not end r2's control channel for want of its database; its logs:\n{a_logs}"
    );
    assert_eq!(probe(&a3, &r2).await, Probe::Closed, "r2 refuses everyone");

    // A's database link heals: r2 serves again, with the revocation.
    let db_healed = Instant::now();
    must(blocking(|| w.a.connect()), "give A its database back");
    loop {
        let p2 = probe(&a2, &r2).await;
        assert!(
            matches!(p2, Probe::Closed | Probe::Denied),
            "{:?} after A's database came back, agent-2 (revoked through B) on r2: {p2:?}",
            db_healed.elapsed()
        );
        let p3 = probe(&a3, &r2).await;
        if p2 == Probe::Denied && p3 == Probe::Served {
            break;
        }
        assert!(
            db_healed.elapsed() < BOUND,
            "r2 not serving {BOUND:?} after A's database came back: agent-3 {p3:?}; r2's \
             logs:\n{}",
            blocking(|| w.r2.logs()).unwrap_or_default()
        );
        tokio::time::sleep(PROBE_EVERY).await;
    }
    let db_back = db_healed.elapsed();

    println!(
        "docker ha: setup {setup:?}; grants through B served on A's routers in \
         {served_after_grant:?}. A partitioned: r1 served every probe for {:?} (window \
         {STALE:?}), r2 (A alone) failed closed {r2_closed:?} after the cut; through B during \
         the partition a revocation cut r1's live stream in {live_cut:?} (denied at \
         {denied:?}), a grant served on r1 in {served3:?}; partition lasted {partition:?}. \
         Healed: B's writes visible through A in {visible_on_a:?}, r2 enforcing them in \
         {r2_back:?}. A cut off its database only: r2 served the revoked grant until \
         {r2_stale_served:?}, refused at {r2_refused:?} (bound {deadline:?}), r1 denied it at \
         {r1_denied:?}; database back: r2 serving in {db_back:?}. Total {:?}",
        STALE + MARGIN,
        t0.elapsed()
    );
}
