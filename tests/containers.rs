//! `umbra tunnel --netns PATH | --pid PID`: Umbra as the only network of a namespace it did not
//! make. The real binary, a real controller and router on loopback, an echo service; namespaces
//! made by the test (`ip netns add`) and a real `docker run --network none` container from an
//! image built here. The clients run inside (`ip netns exec`, `docker exec`).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Method;
use tokio::io::AsyncBufReadExt;
use umbra_tests::dataplane::*;
use umbra_tests::*;

/// A controller, one router, the echo service `echo` (intercept `echo.umbra:443`) granted to
/// `agent-1`, the service `other` (`other.umbra:443`, same echo) not granted, and the agent's
/// identity file.
struct World {
    t: TestController,
    _router: umbra_edge_router::RouterHandle,
    _echo: Echo,
    identity: PathBuf,
}

async fn world() -> World {
    world_with(|_| {}).await
}

async fn world_with(tweak: impl FnOnce(&mut umbra_edge_router::RouterConfig)) -> World {
    let t = TestController::start().await;
    let router = start_router(&t, "router-1", tweak).await;
    let echo = Echo::start().await;
    let file = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    service(&t, "other", echo.hosting()).await;
    let identity = t.path("agent-1.json");
    file.save(&identity).expect("save identity");
    World {
        t,
        _router: router,
        _echo: echo,
        identity,
    }
}

/// A namespace made with `ip netns add`, deleted (with its `/etc/netns` files) when dropped.
struct Ns {
    name: String,
}

impl Ns {
    fn create(tag: &str) -> Ns {
        let name = format!("umbra-{tag}-{}", std::process::id());
        let _ = ip(&["netns", "delete", &name]);
        let ns = Ns { name };
        let o = ip(&["netns", "add", &ns.name]);
        assert!(o.status.success(), "ip netns add: {}", stderr(&o));
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `/etc/netns/NAME`: `ip netns exec` shows its files over `/etc`.
    fn etc(&self) -> PathBuf {
        PathBuf::from("/etc/netns").join(&self.name)
    }

    /// Runs a program inside.
    fn exec(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    fn delete(&self) {
        let _ = ip(&["netns", "delete", &self.name]);
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        self.delete();
        let _ = std::fs::remove_dir_all(self.etc());
    }
}

fn ip(args: &[&str]) -> std::process::Output {
    std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("ip runs")
}

/// A running `umbra tunnel`, killed when dropped; what it prints is collected.
struct Tunnel {
    child: tokio::process::Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

impl Tunnel {
    fn start(w: &World, args: &[&str]) -> Tunnel {
        let mut child = tokio::process::Command::new(umbra_bin())
            .arg("tunnel")
            .arg("--identity")
            .arg(&w.identity)
            .args(args)
            .env("UMBRA_CONTROLLER", w.t.addr())
            .env("UMBRA_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("umbra tunnel starts");
        let collect = |pipe: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>| {
            let buf = Arc::new(Mutex::new(String::new()));
            let b = buf.clone();
            if let Some(pipe) = pipe {
                tokio::spawn(async move {
                    let mut lines = tokio::io::BufReader::new(pipe).lines();
                    while let Ok(Some(l)) = lines.next_line().await {
                        let mut g = b.lock().unwrap();
                        g.push_str(&l);
                        g.push('\n');
                    }
                });
            }
            buf
        };
        let out = collect(child.stdout.take().map(|p| Box::new(p) as _));
        let err = collect(child.stderr.take().map(|p| Box::new(p) as _));
        Tunnel { child, out, err }
    }

    /// Waits (10 s at most) until the output holds `text`.
    async fn printed(&self, text: &str) {
        let seen = eventually(Duration::from_secs(10), || {
            self.out.lock().unwrap().contains(text).then_some(())
        })
        .await;
        assert!(
            seen.is_some(),
            "umbra tunnel never printed {text:?}; stdout:\n{}\nstderr:\n{}",
            self.out.lock().unwrap(),
            self.err.lock().unwrap()
        );
    }

    /// SIGTERM, as a service manager stops it.
    fn terminate(&self) {
        let pid = self.child.id().expect("running");
        let o = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .output()
            .unwrap();
        assert!(o.status.success());
    }

    /// Waits (10 s at most) for the process to end; its code and standard error.
    async fn ended(&mut self) -> (Option<i32>, String) {
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("umbra tunnel ends")
            .expect("wait");
        // The pipes' last lines.
        tokio::time::sleep(Duration::from_millis(50)).await;
        (status.code(), self.err.lock().unwrap().clone())
    }
}

/// A client for inside the namespace: `dns NAME` asks the responder at 127.0.0.53 over UDP
/// and prints `rcode ip`; `echo HOST PORT` makes one round trip and prints what came back or
/// the error's name.
const CLIENT: &str = r#"
import socket, struct, sys
cmd = sys.argv[1]
if cmd == "dns":
    name = b"".join(bytes([len(p)]) + p for p in sys.argv[2].encode().split(b"."))
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + name + b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(q, ("127.0.0.53", 53))
    try:
        r = s.recv(1500)
    except OSError:
        print("timeout")
        sys.exit(0)
    ip = ".".join(str(b) for b in r[-4:]) if struct.unpack(">H", r[6:8])[0] else "-"
    print(r[3] & 15, ip)
elif cmd == "echo":
    try:
        s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=5)
        s.sendall(b"through the overlay")
        print(s.recv(100).decode())
    except OSError as e:
        print(type(e).__name__)
elif cmd == "hold":
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=5)
    s.sendall(b"first")
    print(s.recv(100).decode(), flush=True)
    sys.stdin.readline()
    s.settimeout(10)
    try:
        s.sendall(b"second")
        got = s.recv(100)
        print("cut" if got == b"" else "alive " + got.decode(), flush=True)
    except OSError as e:
        print("cut", type(e).__name__, flush=True)
"#;

fn client(ns: &Ns, args: &[&str]) -> String {
    let mut all = vec!["/usr/bin/python3", "-c", CLIENT];
    all.extend_from_slice(args);
    let o = ns.exec(&all);
    assert!(o.status.success(), "client {args:?}: {}", stderr(&o));
    stdout(&o).trim().to_string()
}

async fn audit_actions(t: &TestController) -> Vec<serde_json::Value> {
    t.admin_client()
        .call(Method::GET, "/v1/audit?limit=1000", None::<&()>)
        .await
        .expect("audit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_made_with_ip_netns_gets_umbra_as_its_only_path() {
    let w = world().await;
    let ns = Ns::create("tun");
    std::fs::create_dir_all(ns.etc()).unwrap();
    std::fs::write(ns.etc().join("resolv.conf"), "nameserver 127.0.0.53\n").unwrap();
    let hosts = ns.etc().join("hosts");
    std::fs::write(&hosts, "127.0.0.1\tlocalhost\n").unwrap();
    let events = w.t.path("events.jsonl");
    let started = Instant::now();
    let mut tunnel = Tunnel::start(
        &w,
        &[
            "--netns",
            ns.path().to_str().unwrap(),
            "--hosts-file",
            hosts.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
        ],
    );
    tunnel.printed("+ echo.umbra:443").await;
    println!("tunnel serving after {:?}", started.elapsed());

    // Only lo, brought up by the tunneler.
    let links = stdout(&ns.exec(&["ip", "-o", "link"]));
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains(": lo:") && links.contains("UP"), "{links}");

    // The hosts file kept its own line and gained Umbra's block; names resolve through it.
    let h = std::fs::read_to_string(&hosts).unwrap();
    assert!(
        h.starts_with("127.0.0.1\tlocalhost\n") && h.contains("echo.umbra"),
        "{h}"
    );
    let resolved = stdout(&ns.exec(&["getent", "hosts", "echo.umbra"]));
    assert!(resolved.starts_with("127.77."), "{resolved}");

    // A round trip through the intercept; the ungranted service does not exist.
    assert_eq!(
        client(&ns, &["echo", "echo.umbra", "443"]),
        "through the overlay"
    );
    let (rcode, ip) = {
        let r = client(&ns, &["dns", "echo.umbra"]);
        let (a, b) = r.split_once(' ').unwrap();
        (a.to_string(), b.to_string())
    };
    assert_eq!(
        (rcode.as_str(), ip.as_str()),
        ("0", resolved.split_whitespace().next().unwrap())
    );
    assert_eq!(client(&ns, &["dns", "other.umbra"]), "3 -");
    assert_eq!(
        client(&ns, &["echo", "127.77.0.2", "443"]),
        "ConnectionRefusedError"
    );

    // A grant made live appears, in listeners, hosts and DNS.
    let t0 = Instant::now();
    grant(
        &w.t,
        "agent-1-other",
        umbra_policies::Action::Dial,
        "agent-1",
        "other",
    )
    .await;
    tunnel.printed("+ other.umbra:443").await;
    println!("grant to listener: {:?}", t0.elapsed());
    assert_eq!(
        client(&ns, &["echo", "other.umbra", "443"]),
        "through the overlay"
    );
    assert!(client(&ns, &["dns", "other.umbra"]).starts_with("0 127.77."));

    // A revocation removes the listener and cuts a live connection.
    let mut hold = tokio::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "/usr/bin/python3", "-c", CLIENT])
        .args(["hold", "echo.umbra", "443"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(hold.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), out.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.as_deref(), Some("first"));
    let t0 = Instant::now();
    revoke_policy(&w.t, "agent-1-echo").await;
    tunnel.printed("- echo.umbra:443").await;
    println!("revocation to listener gone: {:?}", t0.elapsed());
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = hold.stdin.take().unwrap();
        stdin.write_all(b"go\n").await.unwrap();
    }
    let after = tokio::time::timeout(Duration::from_secs(15), out.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_default();
    assert!(after.starts_with("cut"), "the live connection: {after}");
    let echo_ip = resolved.split_whitespace().next().unwrap().to_string();
    assert_eq!(
        client(&ns, &["echo", &echo_ip, "443"]),
        "ConnectionRefusedError",
        "the revoked listener"
    );
    assert_eq!(client(&ns, &["echo", "echo.umbra", "443"]), "gaierror");
    assert_eq!(client(&ns, &["dns", "echo.umbra"]), "3 -");
    assert!(!std::fs::read_to_string(&hosts)
        .unwrap()
        .contains("echo.umbra"));

    // Refused names are events, in the file and in the controller's audit.
    assert_eq!(client(&ns, &["dns", "evil.example"]), "3 -");
    let ev = eventually(Duration::from_secs(5), || {
        let ev = std::fs::read_to_string(&events).ok()?;
        ev.contains("evil.example").then_some(ev)
    })
    .await
    .expect("the refused name in the events file");
    assert!(ev.contains(r#""kind":"dns_refused""#), "{ev}");
    let mut found = None;
    for _ in 0..50 {
        let log = audit_actions(&w.t).await;
        found = log.into_iter().find(|e| {
            e["action"] == "sandbox.dns_refused" && e["detail"].to_string().contains("evil.example")
        });
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let found = found.expect("the refused name in the controller's audit");
    assert!(found["actor"].as_str().unwrap().ends_with("/agent/agent-1"));
    assert_eq!(found["target"], format!("netns-{}", ns.name));

    // The namespace goes away: the tunnel notices and ends cleanly.
    let t0 = Instant::now();
    ns.delete();
    let (code, err) = tunnel.ended().await;
    println!("namespace deleted to exit: {:?}", t0.elapsed());
    assert_eq!(code, Some(0), "{err}");
    assert!(tunnel.out.lock().unwrap().contains("the namespace is gone"));
    // Umbra's block is gone from the hosts file; the file's own line stays.
    assert_eq!(
        std::fs::read_to_string(&hosts).unwrap(),
        "127.0.0.1\tlocalhost\n"
    );
}

/// A namespace held by a process (`unshare --net`), named by `/proc/PID/ns/net`: served while
/// the process lives, and the tunnel ends when it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_namespace_is_served_until_the_process_exits() {
    let w = world().await;
    let mut holder = tokio::process::Command::new("unshare")
        .args(["--net", "sleep", "120"])
        .kill_on_drop(true)
        .spawn()
        .expect("unshare");
    let pid = holder.id().unwrap();
    let path = format!("/proc/{pid}/ns/net");
    // `unshare` has made the namespace once its file differs from ours.
    let own = std::fs::metadata("/proc/self/ns/net").unwrap();
    let made = eventually(Duration::from_secs(5), || {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&path).ok()?;
        (m.ino() != own.ino()).then_some(())
    })
    .await;
    assert!(made.is_some(), "unshare made no namespace");
    let mut tunnel = Tunnel::start(&w, &["--netns", &path]);
    tunnel.printed("+ echo.umbra:443").await;
    let o = std::process::Command::new("nsenter")
        .arg(format!("--net={path}"))
        .args([
            "/usr/bin/python3",
            "-c",
            CLIENT,
            "echo",
            "127.77.0.1",
            "443",
        ])
        .output()
        .unwrap();
    assert_eq!(stdout(&o).trim(), "through the overlay", "{}", stderr(&o));
    let t0 = Instant::now();
    holder.kill().await.unwrap();
    let (code, err) = tunnel.ended().await;
    println!("process exit to tunnel exit: {:?}", t0.elapsed());
    assert_eq!(code, Some(0), "{err}");
    assert!(tunnel.out.lock().unwrap().contains("the namespace is gone"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_with_another_interface_is_refused_unless_allowed() {
    let w = world().await;
    let ns = Ns::create("dummy");
    let o = ip(&["-n", &ns.name, "link", "add", "b0", "type", "bridge"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut refused = Tunnel::start(&w, &["--netns", ns.path().to_str().unwrap()]);
    let (code, err) = refused.ended().await;
    assert_ne!(code, Some(0));
    assert!(
        err.contains("besides lo (b0)") && err.contains("--allow-network"),
        "{err}"
    );
    // Allowed, it serves (and says loudly that Umbra is not the only path).
    let allowed = Tunnel::start(
        &w,
        &["--netns", ns.path().to_str().unwrap(), "--allow-network"],
    );
    allowed.printed("+ echo.umbra:443").await;
    assert!(allowed.err.lock().unwrap().contains("NOT its only path"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_sharing_the_hosts_filesystem_is_no_container() {
    let w = world().await;
    let hosts_before = std::fs::read_to_string("/etc/hosts").unwrap();
    let mut t = Tunnel::start(&w, &["--pid", &std::process::id().to_string()]);
    let (code, err) = t.ended().await;
    assert_ne!(code, Some(0));
    assert!(err.contains("shares this host's filesystem"), "{err}");
    assert_eq!(std::fs::read_to_string("/etc/hosts").unwrap(), hosts_before);
}

/// A real `docker run --network none` container, served from the host by `umbra tunnel --pid`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_container_with_no_network_reaches_its_services_through_umbra() {
    use umbra_tests::docker;
    if docker::skip_requested() {
        eprintln!("skipped: UMBRA_DOCKER_TESTS=skip");
        return;
    }
    let image = docker::client_image().expect("client image");
    let c =
        docker::Isolated::start("tunnel-pid", &image, Duration::from_secs(300)).expect("container");
    let before_hosts = c.exec("cat /etc/hosts").unwrap();
    let before_resolv = c.exec("cat /etc/resolv.conf").unwrap();
    let w = world().await;
    let events = w.t.path("events.jsonl");
    let mut tunnel = Tunnel::start(
        &w,
        &[
            "--pid",
            &c.pid().to_string(),
            "--events",
            events.to_str().unwrap(),
        ],
    );
    tunnel.printed("+ echo.umbra:443").await;
    let hosts = c.exec("cat /etc/hosts").unwrap();
    assert!(hosts.starts_with(&before_hosts), "{hosts}");
    assert!(hosts.contains("echo.umbra"), "{hosts}");
    let resolv = c.exec("cat /etc/resolv.conf").unwrap();
    assert!(resolv.contains("nameserver 127.0.0.53"), "{resolv}");

    // Names resolve (hosts, then DNS); a TCP round trip through the intercept.
    let got = c.exec("getent hosts echo.umbra").unwrap();
    assert!(got.starts_with("127.77."), "{got}");
    let rt = "exec 3<>/dev/tcp/echo.umbra/443 && echo through-docker >&3 && timeout 5 bash -c 'read -r l <&3; echo $l'";
    assert_eq!(c.exec(rt).unwrap().trim(), "through-docker");
    // The ungranted service does not resolve, and its refusal is audited.
    assert!(c.exec("getent hosts other.umbra").is_err());
    let ev = eventually(Duration::from_secs(5), || {
        let ev = std::fs::read_to_string(&events).ok()?;
        ev.contains("other.umbra").then_some(ev)
    })
    .await
    .expect("the refused name in the events file");
    assert!(ev.contains(r#""kind":"dns_refused""#) && ev.contains(&format!("pid-{}", c.pid())));
    // Nothing but lo inside.
    let links = c.exec("cat /proc/net/dev").unwrap();
    let ifaces: Vec<&str> = links
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, ["lo"], "{links}");

    // A live connection, then the revocation cuts it and the name goes.
    let mut hold = c
        .spawn("exec 3<>/dev/tcp/echo.umbra/443; echo first >&3; read -r l <&3; echo $l; read -r go; echo second >&3; if timeout 10 bash -c 'read -r l <&3 && echo got $l'; then :; else echo cut; fi")
        .unwrap();
    let mut stdin = hold.stdin.take().unwrap();
    let mut out = std::io::BufReader::new(hold.stdout.take().unwrap());
    let first = tokio::task::spawn_blocking(move || {
        let mut l = String::new();
        std::io::BufRead::read_line(&mut out, &mut l).map(|_| (l, out))
    });
    let (first, mut out) = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.trim(), "first");
    let t0 = Instant::now();
    revoke_policy(&w.t, "agent-1-echo").await;
    tunnel.printed("- echo.umbra:443").await;
    println!("docker: revocation to listener gone: {:?}", t0.elapsed());
    std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
    let after = tokio::task::spawn_blocking(move || {
        let mut l = String::new();
        let _ = std::io::BufRead::read_line(&mut out, &mut l);
        l
    });
    let after = tokio::time::timeout(Duration::from_secs(20), after)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.trim(), "cut", "the live connection");
    let _ = hold.kill();
    let _ = hold.wait();
    assert!(c.exec(rt).is_err(), "the revoked service still answers");
    assert!(c.exec("getent hosts echo.umbra").is_err());

    // Interrupted, the tunnel gives the container its own files back.
    tunnel.terminate();
    let (code, err) = tunnel.ended().await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(c.exec("cat /etc/hosts").unwrap(), before_hosts);
    assert_eq!(c.exec("cat /etc/resolv.conf").unwrap(), before_resolv);

    // Served again, then the container ends: the tunnel notices and exits cleanly.
    let mut tunnel = Tunnel::start(&w, &["--pid", &c.pid().to_string()]);
    tunnel.printed("services: 0").await;
    let t0 = Instant::now();
    c.kill().unwrap();
    let (code, err) = tunnel.ended().await;
    println!("docker: container killed to exit: {:?}", t0.elapsed());
    assert_eq!(code, Some(0), "{err}");
    assert!(tunnel.out.lock().unwrap().contains("the namespace is gone"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_identity_ends_the_tunnel_and_leaves_the_namespace_nothing() {
    let w = world().await;
    let ns = Ns::create("rev");
    let events = w.t.path("events.jsonl");
    let mut tunnel = Tunnel::start(
        &w,
        &[
            "--netns",
            ns.path().to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
        ],
    );
    tunnel.printed("+ echo.umbra:443").await;
    assert!(client(&ns, &["dns", "echo.umbra"]).starts_with("0 127.77."));
    revoke_identity(&w.t, "agent-1").await;
    let (code, err) = tunnel.ended().await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("revoked"), "{err}");
    let ev = std::fs::read_to_string(&events).unwrap();
    assert!(
        ev.contains(r#""kind":"revoked","terminated":false"#),
        "{ev}"
    );
    // Nothing listens in the namespace any more.
    assert_eq!(
        client(&ns, &["echo", "127.77.0.1", "443"]),
        "ConnectionRefusedError"
    );
    assert_eq!(client(&ns, &["dns", "echo.umbra"]), "timeout");
}

/// Holds connections to the echo service from inside: first up to 700 one at a time, each
/// waiting (5 s at most) for its echo, until one gets none; then 100 more at once. Prints how
/// many echoed in each phase, then waits for a line on stdin.
const HOLD: &str = r#"
import socket, sys, time
held, first = [], 0
for i in range(700):
    s = socket.create_connection(("127.77.0.1", 443), timeout=5)
    held.append(s)
    s.sendall(b"x")
    try:
        if s.recv(10):
            first += 1
            continue
    except OSError:
        pass
    break
more = []
for i in range(100):
    s = socket.create_connection(("127.77.0.1", 443), timeout=5)
    s.sendall(b"x")
    s.setblocking(False)
    more.append(s)
time.sleep(2)
second = 0
for s in more:
    try:
        if s.recv(10):
            second += 1
    except OSError:
        pass
print(first, second, flush=True)
sys.stdin.readline()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_costs_the_tunnel_at_most_its_bound() {
    // A router that carries more than the tunnel's bound, so that the bound is the tunnel's.
    let w = world_with(|c| {
        c.limits.streams_per_connection = 2048;
        c.limits.streams_per_identity = 4096;
    })
    .await;
    let ns = Ns::create("flood");
    let events = w.t.path("events.jsonl");
    let tunnel = Tunnel::start(
        &w,
        &[
            "--netns",
            ns.path().to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
        ],
    );
    tunnel.printed("+ echo.umbra:443").await;
    let pid = tunnel.child.id().unwrap();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let baseline = fds();
    let mut hold = tokio::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "/usr/bin/python3", "-c", HOLD])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(hold.stdout.take().unwrap()).lines();
    let mut peak = 0;
    let report = loop {
        tokio::select! {
            l = out.next_line() => break l.unwrap().unwrap_or_default(),
            _ = tokio::time::sleep(Duration::from_millis(50)) => peak = peak.max(fds()),
        }
    };
    peak = peak.max(fds());
    let (first, second) = report.split_once(' ').unwrap();
    let (first, second): (usize, usize) = (first.parse().unwrap(), second.parse().unwrap());
    println!("echoed {first} one by one, then {second} of 100 more; tunnel descriptors {baseline} -> peak {peak}");
    // The tunnel carries exactly its bound: the connection past it waits in the kernel's
    // backlog (no echo), and so do the next hundred, at no cost to the tunnel.
    assert_eq!(first, umbra_launcher::SANDBOX_CONNECTIONS);
    assert_eq!(second, 0);
    assert!(
        peak <= baseline + umbra_launcher::SANDBOX_CONNECTIONS + 64,
        "descriptors peaked at {peak} (from {baseline})"
    );
    // It still answers names while held, and serves again once the flood lets go.
    assert!(client(&ns, &["dns", "echo.umbra"]).starts_with("0 127.77."));
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = hold.stdin.take().unwrap();
        stdin.write_all(b"done\n").await.unwrap();
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), hold.wait()).await;
    let again = eventually(Duration::from_secs(10), || {
        let r = client(&ns, &["echo", "127.77.0.1", "443"]);
        (r == "through the overlay").then_some(())
    })
    .await;
    assert!(again.is_some(), "no round trip after the flood");
    assert!(
        fds() <= baseline + 16,
        "descriptors left: {} (from {baseline})",
        fds()
    );
}

/// An agent that can unmount Docker's `/etc/hosts` (it was given `CAP_SYS_ADMIN`) plants a
/// link there to a host file its container only reads: the tunnel, root outside, must not
/// follow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_planted_in_the_containers_etc_is_not_followed() {
    use umbra_tests::docker;
    if docker::skip_requested() {
        eprintln!("skipped: UMBRA_DOCKER_TESTS=skip");
        return;
    }
    let vol = tempfile::tempdir().unwrap();
    let secret = vol.path().join("file");
    std::fs::write(&secret, "host data\n").unwrap();
    let image = docker::client_image().expect("client image");
    let mount = format!("{}:/data:ro", vol.path().display());
    let c = docker::Isolated::start_with(
        "planted-link",
        &image,
        Duration::from_secs(300),
        &[
            "--cap-add",
            "SYS_ADMIN",
            "--security-opt",
            "apparmor=unconfined",
            "-v",
            &mount,
        ],
    )
    .expect("container");
    c.exec("umount /etc/hosts && ln -sf /data/file /etc/hosts")
        .expect("the agent plants its link");
    assert_eq!(c.exec("cat /etc/hosts").unwrap(), "host data\n");
    let w = world().await;
    let mut tunnel = Tunnel::start(&w, &["--pid", &c.pid().to_string()]);
    let (code, err) = tunnel.ended().await;
    assert_ne!(code, Some(0));
    // ELOOP: RESOLVE_NO_SYMLINKS met the link.
    assert!(
        err.contains("/etc/hosts") && err.contains("os error 40"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host data\n");
}

/// A process in a mount (and network) namespace of its own but on the host's root filesystem
/// (`unshare -m`, a systemd service with `PrivateTmp=`), with files mounted over its
/// `/etc/hosts` and `/etc/resolv.conf`: its /etc is the host's, so `--pid` refuses it and
/// writes nothing (before, only a shared mount namespace was refused, and the tunnel rewrote
/// whatever that process's /etc held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_on_the_hosts_root_in_its_own_mount_namespace_is_no_container() {
    let w = world().await;
    let dir = tempfile::tempdir().unwrap();
    let (hosts, resolv) = (dir.path().join("hosts"), dir.path().join("resolv"));
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    std::fs::write(&resolv, "nameserver 10.9.9.9\n").unwrap();
    let script = format!(
        "mount --bind {} /etc/hosts && mount --bind {} /etc/resolv.conf && echo ready && exec sleep 60",
        hosts.display(),
        resolv.display()
    );
    let mut holder = tokio::process::Command::new("unshare")
        .args(["-m", "-n", "--propagation", "private", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("unshare");
    let mut out = tokio::io::BufReader::new(holder.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(5), out.next_line()).await;
    assert!(
        matches!(&ready, Ok(Ok(Some(l))) if l == "ready"),
        "{ready:?}"
    );
    let pid = holder.id().unwrap().to_string();
    let mut t = Tunnel::start(&w, &["--pid", &pid]);
    let (code, err) = t.ended().await;
    assert_ne!(code, Some(0));
    assert!(err.contains("shares this host's filesystem"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&hosts).unwrap(),
        "127.0.0.1 localhost\n"
    );
    assert_eq!(
        std::fs::read_to_string(&resolv).unwrap(),
        "nameserver 10.9.9.9\n"
    );
}

/// An agent that is root only in its own user namespace (host ids from 100000, as in a rootless
/// or user-namespaced container) bind-mounts host files it may read but not write over its
/// `/etc/hosts` and `/etc/resolv.conf`. The tunnel, root outside, must not write for it what
/// it could not write itself.
const USERNS_AGENT: &str = r#"
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
croot, vhosts, vresolv = sys.argv[1:4]
r, w = os.pipe(); r2, w2 = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(w); os.close(r2)
    # CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET
    if libc.unshare(0x10000000 | 0x00020000 | 0x40000000) != 0:
        os._exit(2)
    os.write(w2, b"u"); os.close(w2)
    os.read(r, 1)
    os.setresgid(0, 0, 0); os.setresuid(0, 0, 0)
    MS_BIND, MS_REC, MS_PRIVATE = 4096, 0x4000, 1 << 18
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        os._exit(3)
    for src, dst in [(vhosts, "etc/hosts"), (vresolv, "etc/resolv.conf")]:
        if libc.mount(src.encode(), os.path.join(croot, dst).encode(), None, MS_BIND, None) != 0:
            os._exit(4)
    os.chroot(croot); os.chdir("/")
    try:
        open("/etc/hosts", "a").write("x")
        print("agent-wrote", flush=True)
    except OSError:
        print("agent-cannot-write", flush=True)
    time.sleep(60)
    os._exit(0)
os.close(r); os.close(w2)
os.read(r2, 1)
open(f"/proc/{pid}/uid_map", "w").write("0 100000 65536")
open(f"/proc/{pid}/gid_map", "w").write("0 100000 65536")
print(pid, flush=True)
os.write(w, b"g")
os.waitpid(pid, 0)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_file_mounted_in_a_user_namespaced_container_is_not_written() {
    use std::os::unix::fs::PermissionsExt;
    let w = world().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let croot = dir.path().join("root");
    std::fs::create_dir_all(croot.join("etc")).unwrap();
    for f in ["etc/hosts", "etc/resolv.conf"] {
        std::fs::write(croot.join(f), "").unwrap();
        std::os::unix::fs::chown(croot.join(f), Some(100_000), Some(100_000)).unwrap();
    }
    let (vhosts, vresolv) = (dir.path().join("vhosts"), dir.path().join("vresolv"));
    std::fs::write(&vhosts, "host data\n").unwrap();
    std::fs::write(&vresolv, "nameserver 10.9.9.9\n").unwrap();
    let mut agent = tokio::process::Command::new("/usr/bin/python3")
        .args(["-c", USERNS_AGENT])
        .args([&croot, &vhosts, &vresolv])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    let mut out = tokio::io::BufReader::new(agent.stdout.take().unwrap()).lines();
    let line = |l: Result<Result<Option<String>, std::io::Error>, _>| match l {
        Ok(Ok(Some(l))) => l,
        other => panic!("the agent did not start: {other:?}"),
    };
    let pid = line(tokio::time::timeout(Duration::from_secs(5), out.next_line()).await);
    let wrote = line(tokio::time::timeout(Duration::from_secs(5), out.next_line()).await);
    assert_eq!(wrote, "agent-cannot-write");
    let mut t = Tunnel::start(&w, &["--pid", &pid]);
    let (code, err) = t.ended().await;
    assert_ne!(code, Some(0));
    assert!(err.contains("does not map"), "{err}");
    assert_eq!(std::fs::read_to_string(&vhosts).unwrap(), "host data\n");
    assert_eq!(
        std::fs::read_to_string(&vresolv).unwrap(),
        "nameserver 10.9.9.9\n"
    );
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .output();
}

/// `--hosts-file` naming a FIFO (someone with a hand in its directory made one there): the
/// tunnel reads the file back at every change, so it would wait on the FIFO forever. Refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosts_file_that_is_a_fifo_is_refused() {
    let w = world().await;
    let ns = Ns::create("fifo");
    let fifo = w.t.path("hosts.fifo");
    let o = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .output()
        .unwrap();
    assert!(o.status.success());
    let mut t = Tunnel::start(
        &w,
        &[
            "--netns",
            ns.path().to_str().unwrap(),
            "--hosts-file",
            fifo.to_str().unwrap(),
        ],
    );
    let (code, err) = t.ended().await;
    assert_ne!(code, Some(0));
    assert!(err.contains("not a regular file"), "{err}");
}
