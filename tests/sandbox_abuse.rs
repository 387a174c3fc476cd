//! An abusive agent against `umbra run`, end to end: the real binary, a real controller and
//! router on loopback, an echo service. The agent parks data in socket buffers, holds more
//! connections than the launcher has descriptors by default, floods the DNS responder with
//! half-open TCP connections, and hides data in malformed DNS names; the launcher must contain
//! each, keep serving, keep revocation immediate, and audit what it refused.
//!
//! Every loop here is bounded in count and time; the agents are Python scripts with deadlines.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use http::Method;
use umbra_tests::dataplane::*;
use umbra_tests::*;

/// A controller, one router, an echo service `echo` (intercept `echo.umbra:443`) granted to
/// `agent-1`, and the agent's identity file.
struct World {
    t: TestController,
    _router: umbra_edge_router::RouterHandle,
    _echo: Echo,
    identity: PathBuf,
    workspace: tempfile::TempDir,
}

async fn world() -> World {
    let t = TestController::start().await;
    let router = start_router(&t, "router-1", |_| {}).await;
    let echo = Echo::start().await;
    let file = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let identity = t.path("agent-1.json");
    file.save(&identity).expect("save identity");
    let workspace = tempfile::Builder::new()
        .prefix("umbra-ws-")
        .tempdir()
        .expect("workspace");
    World {
        t,
        _router: router,
        _echo: echo,
        identity,
        workspace,
    }
}

impl World {
    fn ws(&self) -> &Path {
        self.workspace.path()
    }

    /// `umbra run` under a soft descriptor limit of 1024 (the usual default), so that what the
    /// launcher raises and what the agent inherits can be told apart. `prlimit` execs, so the
    /// child's pid is the launcher's.
    fn command(&self, extra: &[&str], script: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("prlimit");
        c.arg("--nofile=1024:")
            .arg(umbra_bin())
            .arg("run")
            .arg("--identity")
            .arg(&self.identity)
            .arg("--workspace")
            .arg(self.ws())
            .args(extra)
            .args(["--", "/usr/bin/python3", "-c", script])
            .env("UMBRA_ADMIN", self.t.admin_path())
            .env("UMBRA_CONTROLLER", self.t.addr())
            .env("UMBRA_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.ws().join(name)).unwrap_or_default()
    }
}

/// What `/proc/<pid>` says about the launcher: descriptors, threads, CPU time.
struct ProcUse {
    fds: usize,
    threads: u64,
    cpu: Duration,
}

fn proc_use(pid: u32) -> ProcUse {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime (fields 14 and 15), in ticks of 10 ms.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ProcUse {
        fds,
        threads,
        cpu: Duration::from_millis(ticks * 10),
    }
}

/// The launcher's CPU share over `window`, sampled from outside.
async fn cpu_share(pid: u32, window: Duration) -> f64 {
    let (c0, t0) = (proc_use(pid).cpu, Instant::now());
    tokio::time::sleep(window).await;
    let (c1, t1) = (proc_use(pid).cpu, Instant::now());
    c1.saturating_sub(c0).as_secs_f64() / (t1 - t0).as_secs_f64()
}

fn events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Parks data in loopback TCP buffers under `--memory 64M`: the agent is killed at the limit or
/// gets no more than the limit into the kernel's buffers.
const SOCKET_BALLOON: &str = r#"
import socket, time, resource, json
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(4096)
chunk = b"x" * 65536
total, keep, stalled, stopped = 0, [], 0, "bound of the attempt"
deadline = time.time() + 20
for i in range(2000):
    if time.time() > deadline or total >= (1 << 30):
        break
    try:
        c = socket.create_connection(l.getsockname()); s, _ = l.accept()
    except OSError as e:
        stopped = str(e); break
    c.setblocking(False)
    mine, until = 0, time.time() + 0.2
    while time.time() < until:
        try:
            mine += c.send(chunk)
        except BlockingIOError:
            time.sleep(0.002)
            try:
                mine += c.send(chunk)
            except OSError:
                break
        except OSError as e:
            stopped = str(e); break
    total += mine; keep.append((c, s))
    stalled = stalled + 1 if mine < 65536 else 0
    if stalled >= 32:
        stopped = "the kernel took no more"; break
open("balloon", "w").write(json.dumps({"mib": total >> 20, "pairs": len(keep), "stopped": stopped}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_buffer_balloon_is_contained_by_memory() {
    let w = world().await;
    let o = tokio::time::timeout(
        Duration::from_secs(90),
        w.command(&["--memory", "64M"], SOCKET_BALLOON).output(),
    )
    .await
    .expect("umbra run ends")
    .expect("umbra run starts");
    let report = w.read("balloon");
    eprintln!("balloon: exit {:?}, {report}", o.status.code());
    match o.status.code() {
        // Killed at the memory limit: contained.
        Some(121) => {}
        Some(0) => {
            let r: serde_json::Value = serde_json::from_str(&report).expect("a report");
            let mib = r["mib"].as_u64().expect("mib");
            assert!(mib <= 64, "parked {mib} MiB under --memory 64M: {r}");
        }
        other => panic!("exit {other:?}: {} {report}", stderr(&o)),
    }
}

/// Holds 1,100 connections to the echo service (more than a default descriptor limit), then asks
/// the DNS responder, then waits to be revoked.
const HOLD: &str = r#"
import socket, time, resource, json, struct
inherited = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
open("started", "w").close()
time.sleep(1)
held, errors, deadline = [], 0, time.time() + 40
for i in range(1100):
    if time.time() > deadline:
        break
    try:
        held.append(socket.create_connection(("echo.umbra", 443), timeout=0.5))
    except OSError:
        errors += 1
time.sleep(1)
q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"\x04echo\x05umbra\x00" + struct.pack(">HH", 1, 1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
t = time.time()
try:
    u.sendto(q, ("127.0.0.53", 53)); r = u.recv(512); rcode = r[3] & 15
except OSError:
    rcode = -1
ms = int((time.time() - t) * 1000)
open("held", "w").write(json.dumps({"held": len(held), "errors": errors, "rcode": rcode, "dns_ms": ms, "inherited": inherited}))
open("holding", "w").close()
time.sleep(60)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_connections_do_not_break_the_launcher_and_revocation_still_kills_at_once() {
    let w = world().await;
    let child = w.command(&[], HOLD).spawn().unwrap();
    let pid = child.id().expect("the launcher's pid");
    let started = w.ws().join("started");
    eventually(Duration::from_secs(30), || started.exists().then_some(()))
        .await
        .expect("the agent starts");
    let baseline = proc_use(pid).fds;
    let mut peak_fds = 0;
    let mut peak_threads = 0;
    let holding = w.ws().join("holding");
    let seen = eventually(Duration::from_secs(60), || {
        let u = proc_use(pid);
        peak_fds = peak_fds.max(u.fds);
        peak_threads = peak_threads.max(u.threads);
        holding.exists().then_some(())
    })
    .await;
    assert!(seen.is_some(), "the agent never held its connections");
    let r: serde_json::Value = serde_json::from_str(&w.read("held")).expect("a report");
    // The agent got its connections (some may wait in the backlog) and starts with the
    // descriptor limit it was given, not the launcher's raised one.
    assert!(r["held"].as_u64().unwrap_or(0) >= 512, "{r}");
    assert_eq!(r["inherited"], 1024, "{r}");
    // The launcher kept answering, within its bounds.
    assert_eq!(r["rcode"], 0, "DNS unanswered while held: {r}");
    assert!(r["dns_ms"].as_u64().unwrap_or(u64::MAX) < 2000, "{r}");
    let share = cpu_share(pid, Duration::from_secs(2)).await;
    let now = proc_use(pid);
    peak_fds = peak_fds.max(now.fds);
    eprintln!("held: {r}; launcher: {peak_fds} fds (from {baseline}), {peak_threads} threads, {share:.3} CPU");
    // The sandbox's connection bound, and room for the launcher's own (peaks of about 200
    // more than the bound were seen while connections churn); what matters is that the count
    // does not follow the agent's 1,100.
    assert!(
        peak_fds <= baseline + 512 + 256,
        "launcher descriptors peaked at {peak_fds} (from {baseline})"
    );
    assert!(
        peak_threads <= 64,
        "launcher threads peaked at {peak_threads}"
    );
    assert!(
        share < 0.5,
        "the launcher used {share:.2} of a CPU while held"
    );

    // Revocation still acts at once.
    let t0 = Instant::now();
    revoke_identity(&w.t, "agent-1").await;
    let o = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("the agent is killed")
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(o.status.code(), Some(120), "{}", stderr(&o));
    assert!(took < Duration::from_secs(5), "revocation took {took:?}");
}

/// Half-open DNS-over-TCP connections, reopened as fast as the agent can, under `--cpus 0.1`.
const DNS_TCP_FLOOD: &str = r#"
import socket, time, struct, json
socket.setdefaulttimeout(0.3)
opened, held, deadline = 0, [], time.time() + 12
open("flooding", "w").close()
while time.time() < deadline and opened < 100000:
    try:
        s = socket.create_connection(("127.0.0.53", 53))
        s.send(b"\x00\x28\x00")
        held.append(s); opened += 1
        if len(held) > 300:
            held.pop(0).close()
    except OSError:
        pass
q = struct.pack(">HHHHHH", 0x4343, 0x0100, 1, 0, 0, 0) + b"\x04echo\x05umbra\x00" + struct.pack(">HH", 1, 1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
try:
    u.sendto(q, ("127.0.0.53", 53)); rcode = u.recv(512)[3] & 15
except OSError:
    rcode = -1
open("flood", "w").write(json.dumps({"opened": opened, "rcode": rcode}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_dns_tcp_flood_does_not_spin_the_launcher() {
    let w = world().await;
    let child = w
        .command(&["--cpus", "0.1"], DNS_TCP_FLOOD)
        .spawn()
        .unwrap();
    let pid = child.id().expect("the launcher's pid");
    let flooding = w.ws().join("flooding");
    eventually(Duration::from_secs(30), || flooding.exists().then_some(()))
        .await
        .expect("the flood starts");
    // Let the flood build up, then measure the launcher over a bounded window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let share = cpu_share(pid, Duration::from_secs(5)).await;
    let fds = proc_use(pid).fds;
    let o = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("umbra run ends")
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&w.read("flood")).expect("a report");
    eprintln!("flood: {r}; launcher: {fds} fds, {share:.3} CPU");
    assert_eq!(r["rcode"], 0, "DNS unanswered after the flood: {r}");
    assert!(
        share < 0.3,
        "the launcher used {share:.2} of a CPU during the flood"
    );
    assert!(
        fds <= 16 + 128,
        "the launcher held {fds} descriptors during the flood"
    );
}

/// Names the agent may not resolve, asked in ways a name-based exfiltration would: mixed case,
/// a dot and binary octets inside a label, and a question the responder cannot parse.
const MALFORMED: &str = r#"
import socket, struct
def ask(qid, labels, raw=None):
    body = raw if raw is not None else b"".join(bytes([len(l)]) + l for l in labels) + b"\x00" + struct.pack(">HH", 1, 1)
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + body
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
    u.sendto(q, ("127.0.0.53", 53))
    return u.recv(512)[3] & 15
out = []
out.append(ask(1, [b"SeCrEt", b"ExFil", b"example"]))
out.append(ask(2, [b"a.b\\c", bytes([0, 127, 255]) + b"Z", b"Example"]))
out.append(ask(3, None, raw=b"\xc0\x0c" + struct.pack(">HH", 1, 1)))
out.append(ask(4, None, raw=b"\x06Leaked\x05"))
open("rcodes", "w").write(" ".join(map(str, out)))
# A burst of distinct names, faster than the audit window admits them one by one.
for i in range(FLOOD):
    ask(5, [b"n%d" % i, b"flood", b"example"])
"#;

/// How many names the burst in [`MALFORMED`] asks.
const FLOOD: usize = 300;

/// Every refused or malformed question is accounted for: written as its own event, or counted
/// in a `suppressed` summary.
fn assert_every_question_accounted(ev: &[serde_json::Value]) {
    let written = ev
        .iter()
        .filter(|e| e["kind"] == "dns_refused" || e["kind"] == "dns_malformed")
        .count() as u64;
    let summarised: u64 = ev
        .iter()
        .filter(|e| e["kind"] == "suppressed" && e["what"] == "dns")
        .map(|e| e["count"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        summarised > 0,
        "a burst of {FLOOD} names is summarised: {ev:#?}"
    );
    assert_eq!(written + summarised, 4 + FLOOD as u64, "{ev:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_refused_dns_names_are_audited_as_asked() {
    let w = world().await;
    // Outside the workspace: the launcher refuses an events file the agent could replace.
    let ev_path = w.t.path("events.jsonl");
    let o = tokio::time::timeout(
        Duration::from_secs(60),
        w.command(
            &["--events", ev_path.to_str().unwrap()],
            &MALFORMED.replace("FLOOD", &FLOOD.to_string()),
        )
        .output(),
    )
    .await
    .expect("umbra run ends")
    .expect("umbra run starts");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // NXDOMAIN for names, FORMERR for what is not a question.
    assert_eq!(w.read("rcodes"), "3 3 1 1");
    let ev = events(&ev_path);
    let named = |kind: &str, name: &str| {
        ev.iter()
            .any(|e| e["kind"] == kind && e["name"].as_str() == Some(name))
    };
    assert!(named("dns_refused", "SeCrEt.ExFil.example"), "{ev:#?}");
    assert!(
        named("dns_refused", r"a\.b\\c.\000\127\255Z.Example"),
        "{ev:#?}"
    );
    assert!(
        ev.iter()
            .any(|e| e["kind"] == "dns_malformed" && e["name"].is_null()),
        "{ev:#?}"
    );
    assert!(named("dns_malformed", "Leaked"), "{ev:#?}");
    assert_every_question_accounted(&ev);
    // The controller's audit log has them, under the identity the certificate proved.
    let log = eventually(Duration::from_secs(10), || {
        let client = w.t.admin_client();
        let log: Vec<serde_json::Value> = futures_block(async move {
            client
                .call(Method::GET, "/v1/audit?limit=1000", None::<&()>)
                .await
                .unwrap_or_default()
        });
        log.iter()
            .any(|e| e["action"] == "sandbox.dns_malformed")
            .then_some(log)
    })
    .await
    .expect("a sandbox.dns_malformed audit entry");
    let refused = log
        .iter()
        .find(|e| {
            e["action"] == "sandbox.dns_refused"
                && e["detail"].to_string().contains("SeCrEt.ExFil.example")
        })
        .unwrap_or_else(|| panic!("no refused name in {log:#?}"));
    assert!(refused["actor"]
        .as_str()
        .unwrap_or_default()
        .ends_with("/agent/agent-1"));
}

/// Runs a future to completion from synchronous code inside the multi-threaded test runtime.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// Without privilege (no cgroup can be made): refused and malformed names are audited the same
/// way, and each socket's buffers are bounded in the sandbox's network namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprivileged_the_names_are_audited_and_socket_buffers_bounded() {
    use std::os::unix::fs::PermissionsExt;
    let w = world().await;
    // Everything the unprivileged user needs, owned by it: the binary, the identity, a workspace.
    let home = tempfile::tempdir().unwrap();
    let bin = home.path().join("umbra");
    std::fs::copy(umbra_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let identity = home.path().join("agent-1.json");
    std::fs::copy(&w.identity, &identity).unwrap();
    let ws = home.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    let chown = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(home.path())
        .status()
        .unwrap();
    assert!(chown.success());
    // Beside the workspace, never inside it: the agent could replace it.
    let ev_path = home.path().join("events.jsonl");
    let script = format!(
        "{}\nopen('rmem', 'w').write(open('/proc/sys/net/ipv4/tcp_rmem').read() + open('/proc/sys/net/ipv4/tcp_wmem').read())\n",
        MALFORMED.replace("FLOOD", &FLOOD.to_string())
    );
    let o = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .args(["run", "--identity"])
            .arg(&identity)
            .arg("--workspace")
            .arg(&ws)
            .arg("--events")
            .arg(&ev_path)
            .args(["--", "/usr/bin/python3", "-c", &script])
            .env("HOME", home.path())
            .env("UMBRA_CONTROLLER", w.t.addr())
            .env("UMBRA_LOG", "error")
            .current_dir(home.path())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("umbra run ends")
    .expect("umbra run starts");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(ws.join("rcodes")).unwrap_or_default(),
        "3 3 1 1"
    );
    let ev = events(&ev_path);
    assert!(
        ev.iter()
            .any(|e| e["kind"] == "dns_refused" && e["name"] == "SeCrEt.ExFil.example"),
        "{ev:#?}"
    );
    assert!(ev.iter().any(|e| e["kind"] == "dns_malformed"), "{ev:#?}");
    assert_every_question_accounted(&ev);
    let rmem = std::fs::read_to_string(ws.join("rmem")).unwrap_or_default();
    let maxima: Vec<u64> = rmem
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
        .collect();
    assert_eq!(maxima.len(), 2, "{rmem}");
    assert!(
        maxima
            .iter()
            .all(|m| *m <= umbra_sandbox::sockbuf::MAX_SOCKET_BUFFER),
        "{rmem}"
    );
}
