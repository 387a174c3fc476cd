//! The fault suite: the real `umbra` binaries (controller and router as processes), loopback
//! only, every wait bounded. Each test asserts the overlay is closed while the fault lasts,
//! serves again by itself afterwards, and loses no revocation.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_pki::IdentityFile;
use umbra_sdk::{Context, SdkError};
use umbra_tests::dataplane::Echo;
use umbra_tests::*;

/// Long enough for anything on a loaded two-core machine; short enough to fail fast.
const BOUND: Duration = Duration::from_secs(20);
/// The routers' stale window in these tests.
const STALE: &str = "2s";

/// A child process killed (SIGKILL) when dropped, so a failed test leaves nothing running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback port (TCP or UDP): bound, then released for the process to take.
fn free_port(udp: bool) -> u16 {
    if udp {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    } else {
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    }
}

/// A controller directory, a controller process on a fixed port, a router process, and the
/// admin's environment for the CLI.
struct World {
    dir: tempfile::TempDir,
    ctrl_addr: SocketAddr,
    controller: Option<Proc>,
    router: Option<Proc>,
    router_addr: SocketAddr,
}

impl World {
    fn ctrl_dir(&self) -> PathBuf {
        self.dir.path().join("ctrl")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn umbra(&self, args: &[&str]) -> std::process::Output {
        let admin = self.ctrl_dir().join("admin.json");
        let addr = self.ctrl_addr.to_string();
        umbra_cmd(
            args,
            &[
                ("UMBRA_ADMIN", admin.as_os_str()),
                ("UMBRA_CONTROLLER", addr.as_ref()),
            ],
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.umbra(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        stdout(&o)
    }

    fn spawn(&self, args: &[&str], log: &str) -> Proc {
        let log = std::fs::File::create(self.path(log)).unwrap();
        Proc(
            Command::new(umbra_bin())
                .args(args)
                .env("UMBRA_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    /// Starts (or restarts) the controller process and waits until it answers.
    fn start_controller(&mut self) {
        let dir = self.ctrl_dir();
        let listen = self.ctrl_addr.to_string();
        let p = self.spawn(
            &[
                "controller",
                "run",
                "--dir",
                dir.to_str().unwrap(),
                "--listen",
                &listen,
            ],
            "controller.log",
        );
        self.controller = Some(p);
        let start = Instant::now();
        loop {
            if self.umbra(&["identity", "list"]).status.success() {
                return;
            }
            assert!(start.elapsed() < BOUND, "the controller did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill_controller(&mut self) {
        // SIGKILL: no clean shutdown, as a crash or an OOM kill.
        self.controller.take();
    }

    fn start_router(&mut self) {
        let dir = self.path("r1");
        let listen = self.router_addr.to_string();
        let p = self.spawn(
            &[
                "router",
                "run",
                "--dir",
                dir.to_str().unwrap(),
                "--listen",
                &listen,
                "--stale-after",
                STALE,
            ],
            "router.log",
        );
        self.router = Some(p);
    }

    /// Creates and enrolls an agent; returns its identity file.
    fn agent(&self, name: &str) -> IdentityFile {
        let jwt = self.path(&format!("{name}.jwt"));
        let json = self.path(&format!("{name}.json"));
        self.ok(&["identity", "create", name, "-o", jwt.to_str().unwrap()]);
        self.ok(&[
            "enroll",
            jwt.to_str().unwrap(),
            "-o",
            json.to_str().unwrap(),
        ]);
        IdentityFile::load(&json).unwrap()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }
}

/// A controller and one router (stale window 2 s) as processes, an echo service, and an agent
/// granted to dial it.
fn world() -> (World, Echo, IdentityFile) {
    let dir = tempfile::tempdir().unwrap();
    let ctrl_addr: SocketAddr = format!("127.0.0.1:{}", free_port(false)).parse().unwrap();
    let router_addr: SocketAddr = format!("127.0.0.1:{}", free_port(true)).parse().unwrap();
    let mut w = World {
        dir,
        ctrl_addr,
        controller: None,
        router: None,
        router_addr,
    };
    let d = w.ctrl_dir();
    let o = umbra_cmd(
        &[
            "controller",
            "init",
            "--dir",
            d.to_str().unwrap(),
            "--trust-domain",
            "faults.umbra",
            "--address",
            &ctrl_addr.to_string(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    w.start_controller();
    let jwt = w.path("r1.jwt");
    w.ok(&["router", "create", "r1", "-o", jwt.to_str().unwrap()]);
    let rdir = w.path("r1");
    w.ok(&[
        "router",
        "enroll",
        jwt.to_str().unwrap(),
        "--dir",
        rdir.to_str().unwrap(),
    ]);
    w.start_router();
    let echo = futures_block(Echo::start());
    w.ok(&[
        "service",
        "create",
        "echo",
        "--address",
        &echo.addr.to_string(),
    ]);
    let agent = w.agent("agent-1");
    w.ok(&[
        "policy",
        "grant",
        "--identity",
        "@agent-1",
        "--service",
        "@echo",
    ]);
    (w, echo, agent)
}

/// Runs a future to completion from sync code inside the test's multi-threaded runtime.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// One echoed round trip through the overlay, or why not.
async fn round_trip(ctx: &Context) -> Result<(), String> {
    let mut s = ctx
        .dial("echo")
        .await
        .map_err(|e: SdkError| e.to_string())?;
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .map_err(|_| "no echo".to_owned())?
        .map_err(|e| e.to_string())?;
    assert_eq!(&buf, b"ping");
    Ok(())
}

/// Waits until `want(result)` holds for a fresh round trip; returns how long it took.
async fn until(ctx: &Context, what: &str, want: impl Fn(&Result<(), String>) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let r = round_trip(ctx).await;
        if want(&r) {
            return start.elapsed();
        }
        assert!(start.elapsed() < BOUND, "{what}: last result {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn served(r: &Result<(), String>) -> bool {
    r.is_ok()
}

fn refused(r: &Result<(), String>) -> bool {
    r.is_err()
}

/// The reported defect: a router that failed closed during an outage longer than its stale
/// window never served again without a restart. Now: closed during, serving within seconds of
/// the controller's return, and a revocation made after the return cuts the live stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_fails_closed_during_an_outage_and_serves_again_by_itself() {
    let (mut w, _echo, agent) = world();
    let ctx = Context::new(agent).unwrap();
    until(&ctx, "first service", served).await;

    w.kill_controller();
    let closed = until(&ctx, "closed during the outage", refused).await;
    // Past the stale window (2 s) and several reconnection attempts more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(refused(&round_trip(&ctx).await), "still closed");

    let back = Instant::now();
    w.start_controller();
    let recovered = until(&ctx, "serving after the controller's return", served).await;
    println!(
        "fault: controller killed; router closed after {closed:?}; served again {:?} after the controller came back ({recovered:?} after it answered)",
        back.elapsed()
    );
    assert!(
        back.elapsed() < Duration::from_secs(10),
        "within a few seconds"
    );

    // A live stream, then a revocation: nothing of the old session keeps it open.
    let mut live = ctx.dial("echo").await.unwrap();
    live.write_all(b"abcd").await.unwrap();
    let mut buf = [0u8; 4];
    live.read_exact(&mut buf).await.unwrap();
    w.ok(&["identity", "revoke", "agent-1"]);
    let cut = tokio::time::timeout(BOUND, async {
        loop {
            let _ = live.write_all(b"x").await;
            match live.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "the revocation cut the live stream");
    assert!(round_trip(&ctx).await.is_err());
    let log = w.log("router.log");
    assert!(log.contains("failing closed"), "{log}");
}

/// A controller restored from a backup, or re-created with a new history (a new epoch): the
/// router drops its copy, takes the new one whole, and enforces what the new history says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restarted_with_a_new_epoch_is_followed_from_a_fresh_copy() {
    let (mut w, _echo, agent) = world();
    let ctx = Context::new(agent).unwrap();
    until(&ctx, "first service", served).await;
    // A second agent exists in the old history.
    let other = w.agent("agent-2");
    w.ok(&[
        "policy",
        "grant",
        "--identity",
        "@agent-2",
        "--service",
        "@echo",
    ]);
    let other = Context::new(other).unwrap();
    until(&other, "agent-2 served", served).await;

    w.kill_controller();
    // The new history: the same identities, a new epoch, agent-2's grant gone.
    let db = w.ctrl_dir().join("umbra.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute(
            "UPDATE meta SET value = 'restored-epoch' WHERE key = 'epoch'",
            [],
        )
        .unwrap();
    }
    w.start_controller();
    w.ok(&["policy", "revoke", "dial-agent-2-echo"]);
    until(&ctx, "agent-1 served in the new history", served).await;
    until(&other, "agent-2 refused in the new history", refused).await;
    assert!(round_trip(&ctx).await.is_ok());
}

/// A router restarted while a revocation is committed: it starts closed, takes the current
/// copy, and the revoked agent never gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_restarted_mid_stream_loses_no_revocation() {
    let (mut w, echo, agent) = world();
    let ctx = Context::new(agent).unwrap();
    until(&ctx, "first service", served).await;
    let mut live = ctx.dial("echo").await.unwrap();
    live.write_all(b"abcd").await.unwrap();
    let mut buf = [0u8; 4];
    live.read_exact(&mut buf).await.unwrap();

    w.router.take();
    w.ok(&["identity", "revoke", "agent-1"]);
    let fresh = w.agent("agent-3");
    w.ok(&[
        "policy",
        "grant",
        "--identity",
        "@agent-3",
        "--service",
        "@echo",
    ]);
    w.start_router();
    let fresh = Context::new(fresh).unwrap();
    until(&fresh, "a new agent served by the restarted router", served).await;
    assert!(
        round_trip(&ctx).await.is_err(),
        "revoked while the router was down"
    );
    // The restarted router keeps its stateless-reset key: the old connection is told at once
    // that it is gone (well before QUIC's 30 s idle timeout).
    let started = Instant::now();
    let gone = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let _ = live.write_all(b"x").await;
            if matches!(live.read(&mut buf).await, Ok(0) | Err(_)) {
                return;
            }
        }
    })
    .await;
    assert!(gone.is_ok(), "the old stream learns its router restarted");
    println!(
        "fault: router restarted; old stream ended {:?} after the check began",
        started.elapsed()
    );
    let start = Instant::now();
    while echo.open() > 0 && start.elapsed() < BOUND {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        echo.open(),
        0,
        "no connection to the service outlives its stream"
    );
}

/// The controller's disk fills up: writes fail with a clear error and change nothing, reads
/// and the data plane keep working, and writes work again once there is room, without a
/// restart. Needs root (a small tmpfs); skipped otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_and_recovers_when_space_returns() {
    if !nix_is_root() {
        eprintln!("skipped: needs root to mount a tmpfs");
        return;
    }
    let (mut w, _echo, agent) = world();
    let ctx = Context::new(agent).unwrap();
    until(&ctx, "first service", served).await;
    w.kill_controller();
    // Move the controller's directory onto a 4 MiB tmpfs mounted in its place.
    let dir = w.ctrl_dir();
    let old = w.path("ctrl.old");
    std::fs::rename(&dir, &old).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success());
    let _unmount = Unmount(dir.clone());
    let copied = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", old.display()))
        .arg(&dir)
        .status()
        .unwrap();
    assert!(copied.success());
    let mnt = dir;
    w.start_controller();
    until(&ctx, "served from the small disk", served).await;

    fill(&mnt.join("filler"));
    let o = w.umbra(&["identity", "create", "agent-9"]);
    assert!(!o.status.success(), "a write on a full disk fails");
    assert!(!stderr(&o).trim().is_empty());
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    // Reads and the data plane carry on.
    assert!(w.umbra(&["identity", "list"]).status.success());
    assert!(round_trip(&ctx).await.is_ok());
    // Nothing half-written: agent-9 does not exist.
    assert!(!w.ok(&["identity", "list"]).contains("agent-9"));

    std::fs::remove_file(mnt.join("filler")).unwrap();
    w.ok(&["identity", "create", "agent-9"]);
    assert!(w.ok(&["identity", "list"]).contains("agent-9"));
    w.ok(&["identity", "revoke", "agent-1"]);
    until(&ctx, "revoked after the disk recovered", refused).await;
    w.kill_controller();
}

/// Writes zeros until the filesystem refuses more.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    for _ in 0..1024 {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// The address a tunneler's hosts file gives `name`, once it lists it.
fn hosts_entry(hosts: &Path, name: &str) -> Option<std::net::IpAddr> {
    let text = std::fs::read_to_string(hosts).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.split_whitespace();
        let ip = parts.next()?.parse().ok()?;
        parts.any(|n| n == name).then_some(ip)
    })
}

/// A tunneler whose controller connection is reset (the controller crashes and comes back)
/// keeps its listeners meanwhile (the router still authorizes every stream) and follows the
/// identity's view again afterwards: a grant made after the return opens a listener, a
/// revoked one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnelers_controller_connection_reset_is_followed_again() {
    let (mut w, echo, _agent) = world();
    w.ok(&[
        "service",
        "create",
        "echo-a",
        "--address",
        &echo.addr.to_string(),
        "--intercept",
        "echo-a.umbra:7000",
    ]);
    w.ok(&[
        "policy",
        "grant",
        "--identity",
        "@agent-1",
        "--service",
        "@echo-a",
    ]);
    let hosts = w.path("hosts");
    let id = w.path("agent-1.json");
    let _tunnel = w.spawn(
        &[
            "tunnel",
            "--identity",
            id.to_str().unwrap(),
            "--hosts-file",
            hosts.to_str().unwrap(),
        ],
        "tunnel.log",
    );
    let wait_entry = |name: &'static str, present: bool| {
        let hosts = hosts.clone();
        async move {
            let start = Instant::now();
            loop {
                let e = hosts_entry(&hosts, name);
                if e.is_some() == present {
                    return e;
                }
                assert!(start.elapsed() < BOUND, "{name} present={present}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let ip = wait_entry("echo-a.umbra", true).await.unwrap();
    let echo_through = |ip: std::net::IpAddr| async move {
        let mut s = tokio::net::TcpStream::connect((ip, 7000)).await?;
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await??;
        std::io::Result::Ok(buf)
    };
    let start = Instant::now();
    while echo_through(ip).await.is_err() {
        assert!(start.elapsed() < BOUND, "the tunnel serves");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    w.kill_controller();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        hosts_entry(&hosts, "echo-a.umbra").is_some(),
        "kept during the outage"
    );
    w.start_controller();

    w.ok(&[
        "service",
        "create",
        "echo-b",
        "--address",
        &echo.addr.to_string(),
        "--intercept",
        "echo-b.umbra:7000",
    ]);
    w.ok(&[
        "policy",
        "grant",
        "--identity",
        "@agent-1",
        "--service",
        "@echo-b",
    ]);
    let ip_b = wait_entry("echo-b.umbra", true).await.unwrap();
    let start = Instant::now();
    while echo_through(ip_b).await.is_err() {
        assert!(start.elapsed() < BOUND, "the new listener serves");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.ok(&["policy", "revoke", "dial-agent-1-echo-a"]);
    // Names keep their loopback address for the tunneler's life; the listener goes.
    let start = Instant::now();
    while echo_through(ip).await.is_ok() {
        assert!(start.elapsed() < BOUND, "the revoked listener is closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = tokio::net::TcpStream::connect((ip, 7000)).await;
    assert!(refused.is_err(), "nothing listens for the revoked service");
}

/// VmRSS (KiB), open descriptors and threads of a process.
fn footprint(pid: u32) -> (u64, usize, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (field("VmRSS:"), fds, field("Threads:"))
}

/// The churn soak, on demand (not in CI): grants made and revoked, identities revoked, and
/// connections opened and closed, for `UMBRA_SOAK_SECS` (600 by default). Memory, descriptors
/// and threads of the controller and the router must be steady, and no connection to the
/// service outlives its stream. `cargo test -p umbra --test faults -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a 10-minute soak; run on demand"]
async fn churn_soak_keeps_memory_descriptors_and_threads_steady() {
    let secs: u64 = std::env::var("UMBRA_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let (w, echo, agent) = world();
    let ctx = Context::new(agent).unwrap();
    until(&ctx, "first service", served).await;
    let pids = [
        ("controller", w.controller.as_ref().unwrap().0.id()),
        ("router", w.router.as_ref().unwrap().0.id()),
    ];
    let mut round = 0u64;
    let churn = |round: u64| {
        // One identity per round, granted then revoked; one policy made and removed.
        let name = format!("soak-{round}");
        let id = w.agent(&name);
        w.ok(&[
            "policy",
            "grant",
            "--identity",
            &format!("@{name}"),
            "--service",
            "@echo",
        ]);
        id
    };
    // Warm up before the baseline: caches, connection pools and lanes fill once.
    for _ in 0..5 {
        round += 1;
        let id = churn(round);
        let c = Context::new(id).unwrap();
        until(&c, "a soak agent served", served).await;
        w.ok(&["identity", "revoke", &format!("soak-{round}")]);
    }
    let before: Vec<_> = pids.iter().map(|(_, p)| footprint(*p)).collect();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut dials = 0u64;
    while Instant::now() < deadline && round < 100_000 {
        round += 1;
        let id = churn(round);
        let c = Context::new(id).unwrap();
        until(&c, "a soak agent served", served).await;
        for _ in 0..20 {
            round_trip(&ctx).await.expect("the steady agent is served");
            dials += 1;
        }
        w.ok(&["policy", "revoke", &format!("dial-soak-{round}-echo")]);
        w.ok(&["identity", "revoke", &format!("soak-{round}")]);
        until(&c, "a revoked soak agent refused", refused).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: Vec<_> = pids.iter().map(|(_, p)| footprint(*p)).collect();
    println!("soak: {round} rounds, {dials} dials in {secs} s");
    println!("| process | RSS before | RSS after | fds before | fds after | threads before | threads after |");
    println!("|---|---|---|---|---|---|---|");
    for ((name, _), (b, a)) in pids.iter().zip(before.iter().zip(&after)) {
        println!(
            "| {name} | {} KiB | {} KiB | {} | {} | {} | {} |",
            b.0, a.0, b.1, a.1, b.2, a.2
        );
        assert!(a.1 <= b.1 + 16, "{name} leaks descriptors: {b:?} -> {a:?}");
        assert!(a.2 <= b.2 + 4, "{name} leaks threads: {b:?} -> {a:?}");
        assert!(
            a.0 <= b.0 * 3 / 2 + 32 * 1024,
            "{name} grows: {b:?} -> {a:?}"
        );
    }
    assert_eq!(
        echo.open(),
        0,
        "no connection to the service outlives its stream"
    );
}
