//! Several controller addresses: clients (the CLI, enrollment, routers, tunnelers, SDK contexts)
//! that know a list fail over past a dead controller (a closed port) or a silent one (a
//! listener that accepts and never answers TLS) within about a second, and long-lived streams
//! (a router's control channel, a tunneler's view) move to the next address when theirs dies.
//!
//! Every timing is printed (`--nocapture` shows them) and asserted generously.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use umbra_edge_router::{Router, RouterConfig};
use umbra_pki::IdentityFile;
use umbra_policies::{Hosting, IdentityKind};
use umbra_proto::api::{CreateIdentityRequest, IdentityView, TokenResponse};
use umbra_tests::dataplane::*;
use umbra_tests::*;
use umbra_tunneler::{Tunneler, TunnelerConfig};

/// What one failover may take at most in these tests; about a second is expected.
const FAILOVER_BOUND: Duration = Duration::from_secs(3);

/// An address nobody listens on: bound, then closed, so connections are refused at once.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    drop(l);
    addr
}

/// A controller that hangs: accepts connections and never says a word, so only a timeout
/// gets a client past it. Stops when dropped.
struct BlackHole {
    addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    async fn start() -> BlackHole {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        BlackHole { addr, task }
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP forwarder to the controller: a second address for the same controller, which the
/// test can kill (every connection through it closed, its port closed) as a controller dies, or
/// freeze (connections kept open, nothing forwarded any more) as a controller that hangs or a
/// network that silently drops everything. Counts the connections it accepted.
struct Forwarder {
    addr: String,
    accepted: Arc<AtomicUsize>,
    frozen: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(to: String) -> Forwarder {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let (frozen, frozen_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            // Dropped with the task: every carried connection ends with it.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (to, frozen) = (to.clone(), frozen_rx.clone());
                conns.spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&to).await else {
                        return;
                    };
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    tokio::join!(pump(ir, ow, frozen.clone()), pump(or, iw, frozen));
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Forwarder {
            addr,
            accepted,
            frozen,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes its port and every connection through it, as a controller process that died.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Forwards nothing more, on open connections and new ones, and closes none.
    fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

/// Copies `from` to `to` until either ends, or holds everything once `frozen`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if *frozen.borrow() {
            // Keep both sockets open and silent.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Runs the `umbra` binary on a blocking thread (the test's own listeners keep running).
async fn umbra_async(
    args: Vec<String>,
    env: Vec<(&'static str, std::ffi::OsString)>,
) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &std::ffi::OsStr)> =
            env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
        umbra_cmd(&args, &env)
    })
    .await
    .expect("join")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

async fn create_agent_token(t: &TestController, n: &str) -> String {
    let req = CreateIdentityRequest {
        name: name(n),
        kind: IdentityKind::Agent,
        roles: Default::default(),
        token_ttl_secs: None,
    };
    let tok: TokenResponse = t
        .admin_client()
        .call(Method::POST, "/v1/identities", Some(&req))
        .await
        .expect("create agent");
    tok.token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_fails_over_past_a_dead_and_a_silent_controller() {
    let t = TestController::start().await;
    let hole = BlackHole::start().await;
    let admin = t.admin_path().into_os_string();

    // The real controller alone: what the process itself costs.
    let started = Instant::now();
    let out = umbra_async(
        strings(&["--controller", &t.addr(), "--json", "identity", "list"]),
        vec![("UMBRA_ADMIN", admin.clone())],
    )
    .await;
    let baseline = started.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));

    for (what, first) in [
        ("closed port", closed_port()),
        ("black hole", hole.addr.clone()),
    ] {
        let list = format!("{first}, {}", t.addr());
        let started = Instant::now();
        let out = umbra_async(
            strings(&["--controller", &list, "--json", "identity", "list"]),
            vec![("UMBRA_ADMIN", admin.clone())],
        )
        .await;
        let took = started.elapsed();
        assert!(out.status.success(), "{what}: {}", stderr(&out));
        let listed: Vec<IdentityView> = serde_json::from_str(&stdout(&out)).expect("json");
        assert!(
            listed.iter().any(|i| i.identity.name.as_str() == "admin"),
            "{listed:?}"
        );
        eprintln!("cli: {what} first: {took:?} (the real controller alone: {baseline:?})");
        assert!(took < baseline + FAILOVER_BOUND, "{what}: {took:?}");
    }

    // The same list through the environment, and a broken list refused before anything runs.
    let out = umbra_async(
        strings(&["identity", "list"]),
        vec![
            ("UMBRA_ADMIN", admin.clone()),
            (
                "UMBRA_CONTROLLER",
                format!("{},{}", closed_port(), t.addr()).into(),
            ),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = umbra_async(
        strings(&[
            "--controller",
            &format!("{},,{}", closed_port(), t.addr()),
            "identity",
            "list",
        ]),
        vec![("UMBRA_ADMIN", admin.clone())],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("empty"), "{}", stderr(&out));

    // Every address dead: one line naming each, well within the connect budget.
    let started = Instant::now();
    let out = umbra_async(
        strings(&[
            "--controller",
            &format!("{},{}", hole.addr, closed_port()),
            "identity",
            "list",
        ]),
        vec![("UMBRA_ADMIN", admin)],
    )
    .await;
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("no controller could be reached"), "{err}");
    assert!(err.contains(&hole.addr), "{err}");
    eprintln!("cli: every controller down: failed in {took:?}");
    assert!(took < Duration::from_secs(12), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_fails_over_and_the_identity_file_and_its_renewals_keep_the_list() {
    let t = TestController::start().await;
    let hole = BlackHole::start().await;
    let list = format!("{},{}", hole.addr, t.addr());

    let token = create_agent_token(&t, "agent-1").await;
    let started = Instant::now();
    let file = umbra_sdk::enroll(&token, Some(&list))
        .await
        .expect("enrolls past the black hole");
    let took = started.elapsed();
    eprintln!("enroll: black hole first: {took:?}");
    assert!(took < FAILOVER_BOUND, "{took:?}");
    assert_eq!(
        file.controller, list,
        "the identity file keeps the whole list"
    );

    // Saved and loaded, then used through a context that reads the list from the file.
    let path = t.path("agent-1.json");
    file.save(&path).expect("save");
    let loaded = IdentityFile::load(&path).expect("load");
    assert_eq!(loaded.controllers().expect("list").len(), 2);
    let ctx = umbra_sdk::Context::new(loaded).expect("context");
    ctx.set_identity_path(&path);
    let started = Instant::now();
    ctx.edge().await.expect("edge view past the black hole");
    eprintln!("sdk context: black hole first: {:?}", started.elapsed());
    assert!(started.elapsed() < FAILOVER_BOUND);
    // The client remembers who answered: the next call goes straight there.
    let started = Instant::now();
    ctx.edge().await.expect("edge view");
    eprintln!("sdk context: second call: {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );

    // Renewal keeps the list, in memory and in the saved file.
    let old_serial = ctx.current_identity().leaf().expect("leaf").serial;
    ctx.renew_now().await.expect("renews");
    let renewed = ctx.current_identity();
    assert_ne!(renewed.leaf().expect("leaf").serial, old_serial);
    assert_eq!(renewed.controller, list);
    let saved = IdentityFile::load(&path).expect("renewed file");
    assert_eq!(saved.controller, list);
    assert_eq!(
        saved.leaf().expect("leaf").serial,
        renewed.leaf().expect("leaf").serial
    );

    // The CLI's renewal of a file keeps it too.
    let out = umbra_async(
        strings(&[
            "identity",
            "renew",
            "--identity",
            path.to_str().expect("utf-8"),
        ]),
        vec![],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let saved = IdentityFile::load(&path).expect("renewed file");
    assert_eq!(saved.controller, list);

    // An identity file naming one controller, as every file did before lists, still works.
    let token = create_agent_token(&t, "agent-2").await;
    let old = umbra_sdk::enroll(&token, Some(&t.addr()))
        .await
        .expect("enroll");
    assert_eq!(old.controller, t.addr());
    let path = t.path("agent-2.json");
    old.save(&path).expect("save");
    let json = std::fs::read_to_string(&path).expect("read");
    assert!(
        json.contains(&format!("\"controller\": \"{}\"", t.addr())),
        "{json}"
    );
    let ctx = umbra_sdk::Context::new(IdentityFile::load(&path).expect("load")).expect("context");
    ctx.edge().await.expect("a single-address file works");
    ctx.renew_now().await.expect("renews");
    assert_eq!(ctx.current_identity().controller, t.addr());
}

/// `controller run --advertise dead,real` puts the list in tokens: `enroll` with no
/// `--controller` fails over by the token alone, and the admin file the controller keeps
/// current names the list too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertised_lists_reach_tokens_and_identity_files() {
    let hole = BlackHole::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ctrl_dir = dir.path().join("ctrl");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let real = format!("127.0.0.1:{port}");
    let list = format!("{},{real}", hole.addr);
    let ctrl_dir_s = ctrl_dir.to_str().expect("utf-8").to_owned();
    let out = umbra_async(
        strings(&[
            "controller",
            "init",
            "--dir",
            &ctrl_dir_s,
            "--address",
            &real,
        ]),
        vec![],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));

    // A bad list is refused at once.
    let out = umbra_async(
        strings(&[
            "controller",
            "run",
            "--dir",
            &ctrl_dir_s,
            "--advertise",
            "a:1,,b:2",
        ]),
        vec![],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    let child = std::process::Command::new(umbra_bin())
        .args(["controller", "run", "--dir", &ctrl_dir_s, "--listen", &real])
        .args(["--advertise", &format!("{}, {real}", hole.addr)])
        .env("UMBRA_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("controller runs");
    let _child = KillOnDrop(child);
    // Once it listens, the controller rewrites the admin file with the advertised list (in
    // its canonical form: no spaces).
    let admin_path = ctrl_dir.join("admin.json");
    let rewritten = eventually(Duration::from_secs(10), || {
        IdentityFile::load(&admin_path)
            .ok()
            .filter(|a| a.controller == list)
    })
    .await;
    assert!(rewritten.is_some(), "admin.json names the advertised list");
    let tok = dir.path().join("agent.jwt");
    let started = Instant::now();
    let out = umbra_async(
        strings(&[
            "identity",
            "create",
            "agent-1",
            "-o",
            tok.to_str().expect("utf-8"),
        ]),
        vec![("UMBRA_ADMIN", admin_path.clone().into_os_string())],
    )
    .await;
    eprintln!(
        "cli with the admin file's list (black hole first): {:?}",
        started.elapsed()
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let token = std::fs::read_to_string(&tok).expect("token");
    let claims = umbra_pki::decode_unverified(token.trim()).expect("claims");
    assert_eq!(claims.iss, list, "the token carries the advertised list");

    let id = dir.path().join("agent.json");
    let started = Instant::now();
    let out = umbra_async(
        strings(&[
            "enroll",
            tok.to_str().expect("utf-8"),
            "-o",
            id.to_str().expect("utf-8"),
        ]),
        vec![],
    )
    .await;
    let took = started.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    eprintln!("umbra enroll by the token's list (black hole first): {took:?}");
    assert!(took < FAILOVER_BOUND + Duration::from_secs(1), "{took:?}");
    let file = IdentityFile::load(&id).expect("identity");
    assert_eq!(file.controller, list);

    // Stopped, it cannot guess which address of the stored list is its own: it says so.
    drop(_child);
    let out = umbra_async(
        strings(&["controller", "run", "--dir", &ctrl_dir_s]),
        vec![],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not one IP:PORT; pass --listen"),
        "{}",
        stderr(&out)
    );
}

/// The controller process this test started: killed and reaped when the test ends, however
/// it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_fails_over_at_start_and_when_its_controller_dies() {
    let t = TestController::start().await;
    let hole = BlackHole::start().await;

    // At start: the black hole first.
    let identity = router_identity(&t, "r1").await;
    let mut cfg = RouterConfig::new(identity, "127.0.0.1:0".parse().expect("addr"));
    cfg.controller = Some(format!("{},{}", hole.addr, t.addr()));
    let started = Instant::now();
    let r1 = Router::start(cfg).await.expect("router starts");
    tokio::time::timeout(Duration::from_secs(10), r1.ready())
        .await
        .expect("router synchronizes past the black hole");
    let took = started.elapsed();
    eprintln!("router: black hole first, ready in {took:?}");
    assert!(took < FAILOVER_BOUND, "{took:?}");

    // Mid-session: two addresses for the same controller; the one the router follows dies.
    let f1 = Forwarder::start(t.addr()).await;
    let f2 = Forwarder::start(t.addr()).await;
    let identity = router_identity(&t, "r2").await;
    let mut cfg = RouterConfig::new(identity, "127.0.0.1:0".parse().expect("addr"));
    cfg.controller = Some(format!("{},{}", f1.addr, f2.addr));
    let r2 = Router::start(cfg).await.expect("router starts");
    tokio::time::timeout(Duration::from_secs(10), r2.ready())
        .await
        .expect("router synchronizes");
    assert!(f1.accepted() >= 1, "the router follows the first address");
    let before = f2.accepted();
    let mut policy = r2.policy();
    let held = policy.borrow_and_update().clone().expect("policy");
    let seq = held.seq;

    let killed = Instant::now();
    f1.kill().await;
    let reconnected = eventually(Duration::from_secs(10), || {
        (f2.accepted() > before).then(|| killed.elapsed())
    })
    .await
    .expect("the router reconnects through the second address");
    eprintln!("router: control channel moved to the second address in {reconnected:?}");
    assert!(reconnected < FAILOVER_BOUND, "{reconnected:?}");

    // A change made now reaches it through the second address. Meanwhile the router never
    // stopped serving, and it resumed from its sequence: a snapshot would have published a
    // new copy at the old sequence (a resume publishes nothing until the change arrives).
    service(&t, "after-failover", Hosting::Sdk).await;
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let now = policy.borrow_and_update().clone();
            match now {
                None => return Err("withdrawn: the router refused everything"),
                Some(p) if p.seq > seq => return Ok(killed.elapsed()),
                Some(p) if !Arc::ptr_eq(&p, &held) => {
                    return Err("a new copy at the old sequence: a snapshot, not a resume")
                }
                Some(_) => {}
            }
            if policy.changed().await.is_err() {
                return Err("router gone");
            }
        }
    })
    .await
    .expect("the change arrives")
    .expect("served throughout, resumed");
    eprintln!("router: a change made after the failover arrived {got:?} after the kill");
    assert!(
        r2.policy().borrow().as_ref().is_some_and(|p| p.seq > seq),
        "the router holds the change"
    );
    drop(hole);
    r1.shutdown().await;
    r2.shutdown().await;
}

/// A controller that stops answering without closing anything (hung, or cut off by a network
/// that drops packets): the router gives the session up after three missed heartbeats and its
/// next session goes to the other address first, not back into the silent one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_leaves_a_controller_that_falls_silent_for_the_next_one() {
    let t = TestController::start().await;
    let f1 = Forwarder::start(t.addr()).await;
    let f2 = Forwarder::start(t.addr()).await;
    let identity = router_identity(&t, "r1").await;
    let mut cfg = RouterConfig::new(identity, "127.0.0.1:0".parse().expect("addr"));
    cfg.controller = Some(format!("{},{}", f1.addr, f2.addr));
    // Heartbeats every 500 ms: a session silent for 1.5 s is given up.
    cfg.stale_after = Duration::from_secs(2);
    let router = Router::start(cfg).await.expect("router starts");
    tokio::time::timeout(Duration::from_secs(10), router.ready())
        .await
        .expect("router synchronizes");
    let (at_f1, at_f2) = (f1.accepted(), f2.accepted());
    assert!(
        at_f1 >= 1 && at_f2 == 0,
        "the router follows the first address"
    );

    let frozen = Instant::now();
    f1.freeze();
    let moved = eventually(Duration::from_secs(10), || {
        (f2.accepted() > at_f2).then(|| (frozen.elapsed(), f1.accepted()))
    })
    .await
    .expect("the router reconnects through the second address");
    eprintln!(
        "router: control channel left a silent controller in {:?} (three heartbeats: 1.5 s)",
        moved.0
    );
    assert_eq!(
        moved.1, at_f1,
        "the next session went to the other address first, not back to the silent one"
    );
    assert!(moved.0 < Duration::from_secs(5), "{:?}", moved.0);
    // And it serves from there.
    tokio::time::timeout(Duration::from_secs(10), router.ready())
        .await
        .expect("the router serves");
    service(&t, "after-silence", Hosting::Sdk).await;
    let mut policy = router.policy();
    let arrived = tokio::time::timeout(
        Duration::from_secs(10),
        policy.wait_for(|p| {
            p.as_ref().is_some_and(|p| {
                p.index
                    .state()
                    .services
                    .values()
                    .any(|s| s.name.as_str() == "after-silence")
            })
        }),
    )
    .await;
    assert!(
        matches!(arrived, Ok(Ok(_))),
        "a change arrives through the second address"
    );
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunneler_fails_over_at_start_and_when_its_controller_dies() {
    let t = TestController::start().await;
    let _router = start_router(&t, "r1", |_| {}).await;
    let hole = BlackHole::start().await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;

    // At start: the black hole first.
    let list = format!("{},{}", hole.addr, t.addr());
    let ctx = umbra_sdk::Context::with_controller(a.clone(), Some(&list)).expect("context");
    let cfg = TunnelerConfig {
        controller: Some(list.clone()),
        name_base: "127.93.0.1".parse().expect("ip"),
        ..Default::default()
    };
    let started = Instant::now();
    let tunneler = Tunneler::start(ctx, cfg).await.expect("tunneler starts");
    let listen = wait_for_service(&tunneler, "echo").await;
    let took = started.elapsed();
    eprintln!("tunneler: black hole first, listening in {took:?}");
    assert!(took < FAILOVER_BOUND, "{took:?}");
    assert_eq!(echo_once(listen, b"ping").await.expect("echo"), b"ping");
    tunneler.shutdown().await;

    // Mid-watch: the address it watches through dies; a grant made then still arrives.
    let f1 = Forwarder::start(t.addr()).await;
    let f2 = Forwarder::start(t.addr()).await;
    let list = format!("{},{}", f1.addr, f2.addr);
    let ctx = umbra_sdk::Context::with_controller(a, Some(&list)).expect("context");
    let cfg = TunnelerConfig {
        controller: Some(list),
        name_base: "127.94.0.1".parse().expect("ip"),
        ..Default::default()
    };
    let tunneler = Tunneler::start(ctx, cfg).await.expect("tunneler starts");
    wait_for_service(&tunneler, "echo").await;
    let before = f2.accepted();
    let killed = Instant::now();
    f1.kill().await;
    let reconnected = eventually(Duration::from_secs(10), || {
        (f2.accepted() > before).then(|| killed.elapsed())
    })
    .await
    .expect("the tunneler watches through the second address");
    eprintln!("tunneler: view watch moved to the second address in {reconnected:?}");
    assert!(reconnected < FAILOVER_BOUND, "{reconnected:?}");
    echo_service(&t, &echo, "echo-2", "agent-1").await;
    let listen = wait_for_service(&tunneler, "echo-2").await;
    eprintln!(
        "tunneler: a grant made after the failover arrived {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(echo_once(listen, b"pong").await.expect("echo"), b"pong");
    tunneler.shutdown().await;
}

async fn wait_for_service(t: &Tunneler, svc: &str) -> std::net::SocketAddr {
    let mut rx = t.mappings();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(m) = rx
                .borrow_and_update()
                .iter()
                .find(|m| m.service.as_str() == svc)
            {
                return m.listen;
            }
            if rx.changed().await.is_err() {
                panic!("the tunneler stopped");
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no listener for {svc}"))
}

async fn echo_once(addr: std::net::SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(out)
}

/// A controller that crashes after reading each request: TLS with a certificate of the test
/// controller's own CA (so clients trust it as they trust the real one), the request read in
/// full, then the connection closed without an answer. Counts the requests it swallowed.
struct Crashing {
    addr: String,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Crashing {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Crashing {
    async fn start(t: &TestController) -> Crashing {
        let creds = t
            .ctrl
            .ca()
            .issue_server(Duration::from_secs(3600), std::time::SystemTime::now())
            .expect("server certificate");
        let tls = umbra_pki::server_config(creds, umbra_pki::ClientAuth::None, &[b"http/1.1"])
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = l.accept().await {
                let (acceptor, count) = (acceptor.clone(), Arc::clone(&count));
                conns.spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if read_request(&mut tls).await {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    // Dropped without a word: the process died with the request read.
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Crashing {
            addr,
            requests,
            task,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Reads one HTTP/1.1 request (headers and a `content-length` body); whether it arrived whole.
async fn read_request<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return true;
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A request that may have reached a controller is repeated on another only if repeating it
/// changes nothing: reads and renewals are, a create and an enrollment are not (the token
/// stays unspent, the identity uncreated, and the caller is told the request may have been
/// carried out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_requests_that_can_be_repeated_are_repeated_after_a_controller_dies_mid_request() {
    let t = TestController::start().await;
    let crash = Crashing::start(&t).await;
    let list = format!("{},{}", crash.addr, t.addr());
    let admin = umbra_sdk::ControllerClient::for_identity(&t.admin, Some(&list)).expect("client");

    // A read: swallowed by the first, answered by the second.
    let ids: Vec<IdentityView> = admin
        .call(Method::GET, "/v1/identities", None::<&()>)
        .await
        .expect("a GET is repeated on the next controller");
    assert!(ids.iter().any(|i| i.identity.name.as_str() == "admin"));
    assert_eq!(crash.requests(), 1);
    assert_eq!(admin.addr(), t.addr(), "the client remembers who answered");

    // A create: swallowed, and not repeated. A fresh client, so that the crashing controller
    // is tried first again.
    let admin = umbra_sdk::ControllerClient::for_identity(&t.admin, Some(&list)).expect("client");
    let req = CreateIdentityRequest {
        name: name("ghost"),
        kind: IdentityKind::Agent,
        roles: Default::default(),
        token_ttl_secs: None,
    };
    let e = admin
        .call::<TokenResponse>(Method::POST, "/v1/identities", Some(&req))
        .await
        .expect_err("a create is not repeated");
    assert!(
        matches!(e, umbra_sdk::SdkError::Interrupted { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("may have been carried out"), "{e}");
    assert_eq!(crash.requests(), 2);
    assert!(
        !t.ctrl
            .state()
            .identities
            .values()
            .any(|i| i.name.as_str() == "ghost"),
        "the second controller never saw the create"
    );

    // An enrollment: swallowed, not repeated, and the token is still good afterwards.
    let token = create_agent_token(&t, "agent-1").await;
    let e = umbra_sdk::enroll(&token, Some(&list))
        .await
        .expect_err("an enrollment is not repeated");
    assert!(
        matches!(e, umbra_sdk::SdkError::Interrupted { .. }),
        "{e:?}"
    );
    assert_eq!(crash.requests(), 3);
    let file = umbra_sdk::enroll(&token, Some(&t.addr()))
        .await
        .expect("the token was not spent");

    // A renewal: swallowed, then repeated on the next controller.
    let mut file = file;
    file.controller = list.clone();
    let renewed = umbra_sdk::renew(&file)
        .await
        .expect("a renewal is repeated");
    assert_eq!(crash.requests(), 4);
    assert_ne!(
        renewed.leaf().expect("leaf").serial,
        file.leaf().expect("leaf").serial
    );
    assert_eq!(renewed.controller, list);
}
