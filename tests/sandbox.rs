//! `umbra run` and `umbra verify` end to end: the real binary, a real controller and router on
//! loopback, an echo service, and test hosts in network namespaces these tests make themselves.
//! Every escape attempt of `umbra verify` runs here, so CI proves them on every change.

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
    echo: Echo,
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
        echo,
        identity,
        workspace,
    }
}

impl World {
    fn ws(&self) -> &Path {
        self.workspace.path()
    }

    fn command(&self, extra: &[&str], cmd: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(umbra_bin());
        c.arg("run")
            .arg("--identity")
            .arg(&self.identity)
            .arg("--workspace")
            .arg(self.ws())
            .args(extra)
            .arg("--")
            .args(cmd)
            .env("UMBRA_ADMIN", self.t.admin_path())
            .env("UMBRA_CONTROLLER", self.t.addr())
            .env("UMBRA_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    async fn run(&self, extra: &[&str], cmd: &[&str]) -> std::process::Output {
        tokio::time::timeout(Duration::from_secs(60), self.command(extra, cmd).output())
            .await
            .expect("umbra run ends")
            .expect("umbra run starts")
    }
}

fn sh(script: &str) -> Vec<&str> {
    vec!["/bin/sh", "-c", script]
}

/// Nothing of a sandbox is left on the host once `umbra run` has returned.
fn assert_nothing_left(id: &str) {
    let id = id.trim();
    assert!(id.starts_with("umbra-"), "sandbox id {id:?}");
    for dir in [
        PathBuf::from("/run/umbra/sandboxes").join(id),
        std::env::temp_dir().join("umbra-sandboxes-0").join(id),
        PathBuf::from("/sys/fs/cgroup/memory/umbra").join(id),
        PathBuf::from("/sys/fs/cgroup/pids/umbra").join(id),
        PathBuf::from("/sys/fs/cgroup/cpu/umbra").join(id),
        PathBuf::from("/sys/fs/cgroup/umbra").join(id),
    ] {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_confines_the_agent_to_its_workspace_and_services() {
    let w = world().await;
    let script = r#"
        set -e
        echo "$UMBRA_SANDBOX" > id
        id -u > uid
        cat /etc/hosts > hosts
        getent hosts echo.umbra > resolved
        if getent hosts evil.example; then echo yes > evil; fi
        /usr/bin/python3 -c '
import socket, struct
name = b"".join(bytes([len(p)]) + p for p in b"echo.umbra".split(b"."))
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + name + b"\0" + struct.pack(">HH", 1, 1)
s = socket.create_connection(("127.0.0.53", 53), timeout=5)
s.sendall(struct.pack(">H", len(q)) + q)
n = struct.unpack(">H", s.recv(2))[0]
r = b""
while len(r) < n:
    r += s.recv(n - len(r))
print(r[3] & 15, ".".join(str(b) for b in r[-4:]))
' > dns-tcp
        /usr/bin/python3 -c '
import socket
s = socket.create_connection(("echo.umbra", 443), timeout=5)
s.sendall(b"through the overlay")
print(s.recv(100).decode())
' > echoed
        touch /etc/x 2>/dev/null && echo wrote > etc
        true
    "#;
    let events = w.t.path("events.jsonl");
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(ro.path().join("data.txt"), "read-only data").unwrap();
    let script = format!(
        "{script}\ncat {ro}/data.txt > ro-read\necho x > {ro}/new.txt 2>/dev/null && echo yes > ro-wrote\nexit 7",
        ro = ro.path().display()
    );
    let o = w
        .run(
            &[
                "--events",
                events.to_str().unwrap(),
                "--ro",
                ro.path().to_str().unwrap(),
            ],
            &sh(&script),
        )
        .await;
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    let read = |f: &str| std::fs::read_to_string(w.ws().join(f)).unwrap_or_default();
    assert_eq!(read("uid").trim(), "1000", "the agent is not root inside");
    assert!(read("hosts").contains("echo.umbra"), "{}", read("hosts"));
    assert!(
        read("resolved").starts_with("127.77."),
        "{}",
        read("resolved")
    );
    assert_eq!(read("evil"), "", "an unauthorized name resolved");
    // DNS over TCP gives the same answer (rcode 0, the same address).
    let resolved_ip = read("resolved");
    let resolved_ip = resolved_ip.split_whitespace().next().unwrap_or_default();
    assert_eq!(
        read("dns-tcp").trim(),
        format!("0 {resolved_ip}"),
        "over TCP"
    );
    assert_eq!(read("echoed").trim(), "through the overlay");
    assert_eq!(read("etc"), "", "/etc was writable");
    assert_eq!(read("ro-read"), "read-only data");
    assert_eq!(read("ro-wrote"), "", "a --ro path was writable");
    assert!(!ro.path().join("new.txt").exists());
    // Files the agent writes belong to whoever ran `umbra run`.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(w.ws().join("uid")).unwrap();
    assert_eq!(meta.uid(), unsafe_getuid());
    assert_nothing_left(&read("id"));
    let ev = std::fs::read_to_string(&events).unwrap();
    assert!(ev.contains(r#""kind":"started""#), "{ev}");
    assert!(
        ev.contains(r#""kind":"dns_refused""#) && ev.contains("evil.example"),
        "{ev}"
    );
    assert!(ev.contains(r#""kind":"exited","code":7"#), "{ev}");
    // The controller's audit log has them too, under the identity the certificate proved.
    let log: Vec<serde_json::Value> =
        w.t.admin_client()
            .call(Method::GET, "/v1/audit?limit=1000", None::<&()>)
            .await
            .unwrap();
    let refused = log
        .iter()
        .find(|e| e["action"] == "sandbox.dns_refused")
        .unwrap_or_else(|| panic!("no sandbox event in {log:#?}"));
    assert!(refused["actor"]
        .as_str()
        .unwrap()
        .ends_with("/agent/agent-1"));
    assert!(refused["detail"].to_string().contains("evil.example"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_events_are_checked_and_attributed_by_certificate() {
    let t = TestController::start().await;
    let file = agent(&t, "agent-9").await;
    let c = t.client_for(&file);
    let ok: serde_json::Value = c
        .call(
            Method::POST,
            "/v1/audit/events",
            Some(&serde_json::json!({ "events": [
                { "kind": "limit", "sandbox": "umbra-x1", "at": "2026-01-01T00:00:00Z", "detail": { "limit": "pids" } }
            ]})),
        )
        .await
        .unwrap();
    assert_eq!(ok["recorded"], 1);
    for bad in [
        serde_json::json!({ "events": [ { "kind": "identity.create", "sandbox": "s", "at": "" } ] }),
        serde_json::json!({ "events": [ { "kind": "limit", "sandbox": "../x", "at": "" } ] }),
        serde_json::json!({ "events": [ { "kind": "limit", "sandbox": "s", "at": "", "identity": "admin" } ] }),
        serde_json::json!({ "events": [ { "kind": "limit", "sandbox": "s", "at": "", "detail": "x".repeat(5000) } ] }),
        serde_json::json!({ "events": vec![serde_json::json!({ "kind": "limit", "sandbox": "s", "at": "" }); 101] }),
        serde_json::json!({ "nothing": true }),
    ] {
        let r: Result<serde_json::Value, _> =
            c.call(Method::POST, "/v1/audit/events", Some(&bad)).await;
        assert!(
            matches!(r, Err(umbra_sdk::SdkError::Api { status: 400, .. })),
            "{bad}: {r:?}"
        );
    }
    let log: Vec<serde_json::Value> = t
        .admin_client()
        .call(Method::GET, "/v1/audit?limit=1000", None::<&()>)
        .await
        .unwrap();
    let mine: Vec<&serde_json::Value> = log
        .iter()
        .filter(|e| e["action"].as_str().unwrap_or("").starts_with("sandbox."))
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "nothing of a refused report was written: {mine:#?}"
    );
    assert!(mine[0]["actor"]
        .as_str()
        .unwrap()
        .ends_with("/agent/agent-9"));
}

fn unsafe_getuid() -> u32 {
    // Read from /proc to stay free of unsafe code in tests.
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_material_is_never_shown_even_across_renewals() {
    // The README's first layout: the controller's directory `.umbra` and the identity file in
    // the working directory, which is the default workspace.
    let t = TestController::start_with(|_| {}).await;
    let _router = start_router(&t, "router-1", |_| {}).await;
    let file = agent(&t, "agent-1").await;
    let ws = tempfile::tempdir().unwrap();
    let ctl = ws.path().join(".umbra");
    std::fs::create_dir(&ctl).unwrap();
    std::fs::write(ctl.join(umbra_controller::files::DB), b"database").unwrap();
    std::fs::write(ctl.join("ca.key"), b"private key").unwrap();
    let identity = ws.path().join("agent-1.json");
    file.save(&identity).unwrap();
    let run = |extra: Vec<String>, script: &str| {
        let mut c = tokio::process::Command::new(umbra_bin());
        c.args(["run", "--identity"])
            .arg(&identity)
            .args(extra)
            .args(["--", "/bin/sh", "-c", script])
            .current_dir(ws.path())
            .env("UMBRA_CONTROLLER", t.addr())
            .env("UMBRA_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    };
    // Shown as they are, or with only the files covered (a renewal renames a new file over the
    // covered one), they are refused before anything starts: one line, exit 125.
    for extra in [
        vec![],
        vec!["--hide".to_string(), ".umbra".to_string()],
        vec![
            "--hide".to_string(),
            ".umbra".to_string(),
            "--hide".to_string(),
            "agent-1.json".to_string(),
        ],
    ] {
        let o = run(extra.clone(), "touch ran").output().await.unwrap();
        assert_eq!(o.status.code(), Some(125), "{extra:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
        assert!(!ws.path().join("ran").exists(), "{extra:?}: the agent ran");
    }
    assert!(
        stderr(&run(vec![], "true").output().await.unwrap()).contains("agent-1.json"),
        "the message names the file"
    );
    // Whole directories hidden: the run starts, and what the host renames into them while it
    // runs (a renewal, a new key) stays out of sight.
    let private = ws.path().join("private");
    std::fs::create_dir(&private).unwrap();
    let identity_in_private = private.join("agent-1.json");
    std::fs::rename(&identity, &identity_in_private).unwrap();
    let mut c = tokio::process::Command::new(umbra_bin());
    c.args(["run", "--identity"])
        .arg(&identity_in_private)
        .args(["--hide", ".umbra", "--hide", "private", "--", "/bin/sh", "-c"])
        .arg(
            "ls -a .umbra private > seen; touch started; \
             while [ ! -e go ]; do sleep 0.05; done; \
             cat .umbra/ca.key private/agent-1.json >> seen 2>&1; ls -a .umbra private >> seen; true",
        )
        .current_dir(ws.path())
        .env("UMBRA_CONTROLLER", t.addr())
        .env("UMBRA_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = c.spawn().unwrap();
    let started = Instant::now();
    while !ws.path().join("started").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the agent never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (dir, name, body) in [
        (&ctl, "ca.key", "renewed private key"),
        (
            &private,
            "agent-1.json",
            "-----BEGIN PRIVATE KEY----- renewed",
        ),
    ] {
        let tmp = dir.join(".new");
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
    std::fs::write(ws.path().join("go"), "").unwrap();
    let o = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let seen = std::fs::read_to_string(ws.path().join("seen")).unwrap();
    for secret in ["private key", "umbra.db", "BEGIN", "renewed", "database"] {
        assert!(!seen.contains(secret), "{secret} seen: {seen}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_one_line_and_leaves_nothing() {
    let w = world().await;
    let o = w.run(&[], &["/no/such/program"]).await;
    assert_eq!(o.status.code(), Some(127), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("/no/such/program"), "{}", stderr(&o));

    let o = w.run(&[], &["no-such-command-anywhere"]).await;
    assert_eq!(o.status.code(), Some(127), "{}", stderr(&o));

    let missing = w.ws().join("missing.json");
    let o = umbra_cmd(
        &["run", "--identity", missing.to_str().unwrap(), "--", "true"],
        &[],
    );
    assert_eq!(o.status.code(), Some(125));
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("missing.json"), "{}", stderr(&o));

    let garbage = w.ws().join("garbage.json");
    std::fs::write(&garbage, b"{ not an identity").unwrap();
    let o = umbra_cmd(
        &["run", "--identity", garbage.to_str().unwrap(), "--", "true"],
        &[],
    );
    assert_eq!(o.status.code(), Some(125));
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));

    for (args, what) in [
        (vec!["--workspace", "/no/such/workspace"], "workspace"),
        (vec!["--workspace", "/"], "cannot be /"),
        (vec!["--workspace", "/usr/lib"], "system path"),
        (vec!["--memory", "lots"], "size"),
        (vec!["--cpus", "-1"], "CPU"),
    ] {
        let mut c = tokio::process::Command::new(umbra_bin());
        c.arg("run")
            .arg("--identity")
            .arg(&w.identity)
            .args(&args)
            .args(["--", "true"])
            .env("UMBRA_CONTROLLER", w.t.addr())
            .env("UMBRA_LOG", "error");
        let o = c.output().await.unwrap();
        assert_eq!(o.status.code(), Some(125), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
        assert!(stderr(&o).contains(what), "{args:?}: {}", stderr(&o));
    }
    // A usage error is clap's: exit 2, and no command at all is one.
    let o = umbra_cmd(&["run", "--identity", "x.json"], &[]);
    assert_eq!(o.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_identity_kills_the_agent_at_once() {
    let w = world().await;
    let events = w.t.path("events.jsonl");
    let child = w
        .command(
            &["--events", events.to_str().unwrap()],
            &sh("echo \"$UMBRA_SANDBOX\" > id; touch started; exec sleep 60"),
        )
        .spawn()
        .unwrap();
    let started = w.ws().join("started");
    eventually(Duration::from_secs(20), || started.exists().then_some(()))
        .await
        .expect("the agent starts");
    let t0 = Instant::now();
    revoke_identity(&w.t, "agent-1").await;
    let o = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("the agent is killed")
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(o.status.code(), Some(120), "{}", stderr(&o));
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let ev = std::fs::read_to_string(&events).unwrap();
    assert!(ev.contains(r#""kind":"revoked","terminated":true"#), "{ev}");
    let id = std::fs::read_to_string(w.ws().join("id")).unwrap();
    assert_nothing_left(&id);
}

/// A launcher killed outright (SIGKILL: no destructor runs) takes its sandbox with it, and what
/// it leaves on the host (state directory, cgroup) is removed by the next `umbra run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_launchers_leftovers_are_removed_by_the_next_run() {
    let w = world().await;
    let mut child = w
        .command(
            &[],
            &sh("echo \"$UMBRA_SANDBOX\" > id; touch started; exec sleep 60"),
        )
        .spawn()
        .unwrap();
    let started = w.ws().join("started");
    eventually(Duration::from_secs(20), || started.exists().then_some(()))
        .await
        .expect("the agent starts");
    let id = std::fs::read_to_string(w.ws().join("id")).unwrap();
    let id = id.trim();
    let leftovers = || {
        [
            PathBuf::from("/run/umbra/sandboxes").join(id),
            std::env::temp_dir().join("umbra-sandboxes-0").join(id),
        ]
        .into_iter()
        .any(|d| d.exists())
    };
    assert!(leftovers(), "the running sandbox has its state");
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    // The sandbox dies with its launcher: its cgroup empties.
    let procs = [
        PathBuf::from("/sys/fs/cgroup/pids/umbra").join(id),
        PathBuf::from("/sys/fs/cgroup/umbra").join(id),
    ]
    .map(|d| d.join("cgroup.procs"));
    let empty = || {
        procs
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .all(|s| s.trim().is_empty())
            .then_some(())
    };
    eventually(Duration::from_secs(10), empty)
        .await
        .expect("the agent died with its launcher");
    assert!(leftovers(), "a killed launcher leaves its state behind");
    let o = w.run(&[], &["/bin/true"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_nothing_left(id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_on_revoke_keeps_the_agent_but_not_its_network() {
    let w = world().await;
    let script = r#"
        touch started
        /usr/bin/python3 -c '
import socket, time, os
ok = 0
for i in range(300):
    try:
        s = socket.create_connection(("127.77.0.1", 443), timeout=1)
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise OSError("closed")
        ok += 1
        open("ok", "w").write(str(ok))
    except OSError as e:
        if ok:
            open("lost", "w").write(str(e))
            break
    time.sleep(0.05)
'
        exit 4
    "#;
    let child = w
        .command(&["--keep-on-revoke"], &sh(script))
        .spawn()
        .unwrap();
    let ok = w.ws().join("ok");
    eventually(Duration::from_secs(20), || ok.exists().then_some(()))
        .await
        .expect("the agent reaches its service");
    revoke_identity(&w.t, "agent-1").await;
    let o = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the agent ends by itself")
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(4),
        "its own exit code: {}",
        stderr(&o)
    );
    assert!(
        w.ws().join("lost").exists(),
        "the network went away after the revocation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_change_names_and_listeners_live() {
    let w = world().await;
    let script = r#"
        touch started
        for i in $(seq 1 200); do
            if getent hosts late.umbra > /dev/null; then break; fi
            sleep 0.05
        done
        getent hosts late.umbra > late
        /usr/bin/python3 -c '
import socket
s = socket.create_connection(("late.umbra", 443), timeout=5)
s.sendall(b"granted while running")
print(s.recv(100).decode())
' > echoed
    "#;
    let child = w.command(&[], &sh(script)).spawn().unwrap();
    let started = w.ws().join("started");
    eventually(Duration::from_secs(20), || started.exists().then_some(()))
        .await
        .expect("the agent starts");
    // A second service on the same echo, granted while the agent runs.
    let echo = Echo::start().await;
    echo_service(&w.t, &echo, "late", "agent-1").await;
    let o = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the agent ends")
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let echoed = std::fs::read_to_string(w.ws().join("echoed")).unwrap_or_default();
    assert_eq!(echoed.trim(), "granted while running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internet_egress_is_a_service_named_after_its_host() {
    let w = world().await;
    let addr = w.echo.addr.to_string();
    let o = w.t.umbra(&[
        "service",
        "create",
        "example-api",
        "--address",
        &addr,
        "--intercept",
        "api.example.com:443",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = w.t.umbra(&[
        "policy",
        "grant",
        "--identity",
        "@agent-1",
        "--service",
        "@example-api",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let script = r#"
        getent hosts api.example.com > resolved
        getent hosts www.example.com > other
        /usr/bin/python3 -c '
import socket
s = socket.create_connection(("api.example.com", 443), timeout=5)
s.sendall(b"egress by name")
print(s.recv(100).decode())
' > echoed
    "#;
    let o = w.run(&[], &sh(script)).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let read = |f: &str| std::fs::read_to_string(w.ws().join(f)).unwrap_or_default();
    assert!(
        read("resolved").starts_with("127.77."),
        "{}",
        read("resolved")
    );
    assert!(read("resolved").contains("api.example.com"));
    assert_eq!(
        read("other"),
        "",
        "another name of the same domain resolved"
    );
    assert_eq!(read("echoed").trim(), "egress by name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_whole_tree() {
    let w = world().await;
    let t0 = Instant::now();
    let o = w
        .run(
            &["--timeout", "1s"],
            &sh("echo \"$UMBRA_SANDBOX\" > id; (sleep 300 &); sleep 300 & sleep 300"),
        )
        .await;
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    assert!(t0.elapsed() < Duration::from_secs(10));
    let id = std::fs::read_to_string(w.ws().join("id")).unwrap();
    assert_nothing_left(&id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_identities_live_only_as_long_as_their_task() {
    let w = world().await;
    let o = w.t.umbra(&[
        "policy",
        "grant",
        "--identity",
        "#tasks",
        "--service",
        "@echo",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let script = r#"
        /usr/bin/python3 -c '
import socket
s = socket.create_connection(("echo.umbra", 443), timeout=5)
s.sendall(b"ephemeral")
print(s.recv(100).decode())
' > echoed
        exit 3
    "#;
    let mut c = tokio::process::Command::new(umbra_bin());
    c.args(["run", "--ephemeral", "--role", "tasks", "--workspace"])
        .arg(w.ws())
        .arg("--")
        .args(sh(script))
        .env("UMBRA_ADMIN", w.t.admin_path())
        .env("UMBRA_CONTROLLER", w.t.addr())
        .env("UMBRA_LOG", "error");
    let o = c.output().await.unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(w.ws().join("echoed"))
            .unwrap_or_default()
            .trim(),
        "ephemeral"
    );
    let list: Vec<serde_json::Value> =
        w.t.admin_client()
            .call(Method::GET, "/v1/identities", None::<&()>)
            .await
            .unwrap();
    let names: Vec<&str> = list.iter().filter_map(|i| i["name"].as_str()).collect();
    assert!(
        !names.iter().any(|n| n.starts_with("task-")),
        "the ephemeral identity outlived its task: {names:?}"
    );
}

/// A test host: a TCP listener in a network namespace of our own, reachable from the host over
/// a veth pair (proved before use), and removed on drop.
struct TestHost {
    ns: String,
    addr: std::net::SocketAddr,
    server: std::process::Child,
}

impl TestHost {
    fn start() -> Option<TestHost> {
        let n = std::process::id() % 200 + 20;
        let ns = format!("umbra-th-{}", std::process::id());
        let host_if = format!("uth{}a", std::process::id() % 100000);
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        let (host_ip, peer_ip) = (format!("10.213.{n}.1/30"), format!("10.213.{n}.2"));
        let ok = ip(&["netns", "add", &ns])
            && ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])
            && ip(&["addr", "add", &host_ip, "dev", &host_if])
            && ip(&["link", "set", &host_if, "up"])
            && ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{peer_ip}/30"),
                "dev",
                "eth0",
            ])
            && ip(&["-n", &ns, "link", "set", "eth0", "up"])
            && ip(&["-n", &ns, "link", "set", "lo", "up"]);
        if !ok {
            let _ = ip(&["netns", "del", &ns]);
            return None;
        }
        let addr: std::net::SocketAddr = format!("{peer_ip}:8080").parse().ok()?;
        let server = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "/usr/bin/python3", "-c"])
            .arg(format!(
                "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('{peer_ip}',8080))\ns.listen()\nwhile True:\n c,_=s.accept()\n c.sendall(b'test host')\n c.close()\n"
            ))
            .spawn()
            .ok()?;
        Some(TestHost { ns, addr, server })
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_suite_holds() {
    let w = world().await;
    let host = TestHost::start().expect("a test host in a network namespace (needs root and ip)");
    // The test host is real: reachable from the host's own namespace.
    let reached = eventually(Duration::from_secs(10), || {
        std::net::TcpStream::connect_timeout(&host.addr, Duration::from_millis(200)).ok()
    })
    .await;
    assert!(reached.is_some(), "the test host answers from the host");
    // A listener on the host's loopback that the sandbox must not reach.
    let o = umbra_cmd(
        &[
            "verify",
            "--json",
            "--identity",
            w.identity.to_str().unwrap(),
            "--workspace",
            w.ws().to_str().unwrap(),
            "--test-host",
            &host.addr.to_string(),
        ],
        &[
            ("UMBRA_ADMIN", w.t.admin_path().as_os_str()),
            ("UMBRA_CONTROLLER", w.t.addr().as_ref()),
        ],
    );
    let attempts: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("verify --json: {e}: {} {}", stdout(&o), stderr(&o)));
    let escaped: Vec<&serde_json::Value> =
        attempts.iter().filter(|a| a["escaped"] == true).collect();
    assert!(escaped.is_empty(), "escaped: {escaped:#?}");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let names: Vec<&str> = attempts
        .iter()
        .filter_map(|a| a["attempt"].as_str())
        .collect();
    for want in [
        "write /etc",
        "write the host's /tmp",
        "write /etc through a symlink in the workspace",
        "hard link /etc/passwd into the workspace",
        "read the host through /proc/1/root",
        "read /proc/self/cwd/../../../../../../etc/shadow",
        "network namespace holds only lo",
        "TCP to an external address",
        "UDP to an external address",
        "TCP to 169.254.169.254",
        "TCP to the host's 127.0.0.1",
        "TCP to ::1",
        "TCP to ::ffff:127.0.0.1",
        "open a raw socket",
        "ping an external address",
        "add a route over netlink",
        "open /dev/net/tun",
        "mount a filesystem",
        "unshare a user namespace",
        "setns into pid 1's namespace",
        "ptrace the parent (towards the tunneler)",
        "ptrace the tunneler",
        "io_uring_setup",
        "memfd_create with exec",
        "resolve the unauthorized name umbra-verify-refused.example",
        "scan loopback ports for services not granted",
        "audit event for the refused name",
        "fork bomb",
        "memory balloon",
        "busy loop",
        "processes left on the host after the limit attempts",
        "be root on the host (uid map)",
        "create a set-id file",
        "chmod u+s a file in the workspace",
        "fchmod g+s a file in the workspace",
        "make a set-gid directory",
        "read the host's private keys in /etc",
        "read masked /proc files",
        "device nodes are what they claim",
        "read a --hide path",
        "carry a --hide path out from under its cover (seen from the host)",
        "a set-id file in the workspace (seen from the host)",
        "reach the host's loopback listener (seen from the host)",
        "socket-buffer balloon under --memory 64M",
        "hold 1,100 connections and half-open DNS-over-TCP against the launcher",
    ] {
        assert!(
            names.contains(&want),
            "missing attempt {want:?} in {names:?}"
        );
    }
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("read the identity file")),
        "{names:?}"
    );
    assert!(
        names.contains(&format!("TCP to the test host {}", host.addr).as_str()),
        "{names:?}"
    );
    // The scan saw the granted listener: the sandbox is not simply dead.
    let scan = attempts
        .iter()
        .find(|a| a["attempt"] == "scan loopback ports for services not granted")
        .unwrap();
    assert!(
        scan["observed"].as_str().unwrap().contains(", 1 open,"),
        "{scan}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_user_gets_the_same_sandbox() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
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
    let nobody = |args: &[&str]| {
        let mut c = tokio::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .args(args)
            .env("HOME", home.path())
            .env("UMBRA_CONTROLLER", w.t.addr())
            .env("UMBRA_LOG", "error")
            .current_dir(home.path());
        c
    };
    let script = r#"
        id -u > uid
        /usr/bin/python3 -c '
import socket
s = socket.create_connection(("echo.umbra", 443), timeout=5)
s.sendall(b"no privilege needed")
print(s.recv(100).decode())
' > echoed
    "#;
    let o = nobody(&[
        "run",
        "--identity",
        identity.to_str().unwrap(),
        "--workspace",
        ws.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        script,
    ])
    .output()
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(ws.join("echoed")).unwrap().trim(),
        "no privilege needed"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("uid")).unwrap().trim(),
        "1000"
    );
    assert_eq!(std::fs::metadata(ws.join("uid")).unwrap().uid(), 65534);

    let o = nobody(&[
        "verify",
        "--json",
        "--skip-limits",
        "--identity",
        identity.to_str().unwrap(),
        "--workspace",
        ws.to_str().unwrap(),
    ])
    .output()
    .await
    .unwrap();
    let attempts: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("verify --json: {e}: {} {}", stdout(&o), stderr(&o)));
    let escaped: Vec<&serde_json::Value> =
        attempts.iter().filter(|a| a["escaped"] == true).collect();
    assert!(escaped.is_empty(), "escaped: {escaped:#?}");
    assert!(attempts.len() > 30);
}

/// The launcher's owners at work: an error after the sandbox and the tunneler have started (here
/// the controller refuses the identity before the first view) returns without a task of the
/// launcher's still running, and with the sandbox's cgroup and state gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_after_start_leaves_no_task_or_cgroup_behind() {
    let w = world().await;
    let file = umbra_pki::IdentityFile::load(&w.identity).expect("identity file");
    let ctx = umbra_sdk::Context::with_controller(file, Some(&w.t.addr())).expect("context");
    revoke_identity(&w.t, "agent-1").await;
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    let id = format!("umbra-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let opts = umbra_launcher::RunOptions {
        sandbox: umbra_sandbox::SandboxConfig {
            program: umbra_bin(),
            id: id.clone(),
            workspace: w.ws().to_path_buf(),
            ro: Vec::new(),
            hide: vec![w.identity.clone()],
            extra: Vec::new(),
            argv: vec!["/bin/true".into()],
            env: Vec::new(),
            limits: umbra_sandbox::Limits {
                pids: Some(64),
                ..Default::default()
            },
            allow_degraded: false,
            capture_stdout: false,
        },
        events: umbra_sandbox::events::EventSink::new(&id, "agent-1", None).expect("sink"),
        timeout: Some(Duration::from_secs(20)),
        keep_on_revoke: false,
        tunnel: umbra_tunneler::TunnelerConfig {
            controller: Some(w.t.addr()),
            ..Default::default()
        },
    };
    let r = umbra_launcher::run(ctx, opts).await;
    assert!(
        matches!(r, Err(umbra_launcher::RunError::Tunnel(_))),
        "a refused identity fails the run before the agent starts: {r:?}"
    );
    // The cgroup is removed by a thread of its own once it has emptied: a moment, not more.
    let deadline = Instant::now() + Duration::from_secs(5);
    while (tasks() > before || cgroup_left(&id)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        tasks() <= before,
        "tasks still alive after the run returned: {} (before: {before})",
        tasks()
    );
    assert_nothing_left(&id);
}

/// Whether any of the sandbox `id`'s cgroup directories is still there.
fn cgroup_left(id: &str) -> bool {
    ["", "memory", "pids", "cpu"].iter().any(|c| {
        Path::new("/sys/fs/cgroup")
            .join(c)
            .join("umbra")
            .join(id)
            .exists()
    })
}
