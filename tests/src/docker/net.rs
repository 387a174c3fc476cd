//! Networks and containers of a test, the guard that removes them, and the reaping of what a
//! killed test process left.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::cmd::{checked, docker, docker_cmd, output_bounded, QUICK};
use super::{
    ensure_engine, postgres_image, DockerError, Image, Result, LABEL_OWNER, LABEL_SCOPE, PG_BIN,
    PG_PORT,
};

/// A private Docker network for one test (`--internal`, a /24 of its own) and every container
/// started on it. Dropping it removes them all, also while a panic unwinds.
#[derive(Debug)]
pub struct TestNet {
    name: String,
    scope: String,
    subnet: Ipv4Addr,
}

/// What [`TestNet::run`] starts.
#[derive(Debug, Clone)]
pub struct RunSpec {
    image: Image,
    host: u8,
    user: Option<String>,
    env: Vec<(String, String)>,
    args: Vec<String>,
    segments: Vec<(Segment, u8)>,
    files: Vec<(PathBuf, String)>,
}

impl RunSpec {
    /// A container of `image` at host number `host` of the network (its address is
    /// [`TestNet::ip`]`(host)`; 2 to 254, 1 is the host machine's side of the bridge).
    pub fn new(image: &Image, host: u8) -> RunSpec {
        RunSpec {
            image: image.clone(),
            host,
            user: None,
            env: Vec::new(),
            args: Vec::new(),
            segments: Vec::new(),
            files: Vec::new(),
        }
    }

    /// Puts it on `segment` too, as host number `host` there, before its command starts (where
    /// [`Container::join`] after [`TestNet::run`] would race with the command's first packets).
    pub fn on(mut self, segment: &Segment, host: u8) -> RunSpec {
        self.segments.push((segment.clone(), host));
        self
    }

    /// Copies `src` (a file or a directory of this machine) to `dest` inside before its
    /// command starts (`docker cp`): key material another container made, say.
    pub fn file(mut self, src: &Path, dest: &str) -> RunSpec {
        self.files.push((src.to_path_buf(), dest.to_owned()));
        self
    }

    /// Runs the command as `user` (a name from the image's passwd, or `uid:gid`).
    pub fn user(mut self, user: &str) -> RunSpec {
        self.user = Some(user.to_owned());
        self
    }

    /// Sets an environment variable: how a value such as an enrollment token reaches a
    /// [`RunSpec::shell`] script (as `"$NAME"`) without being quoted into the script's text.
    pub fn env(mut self, key: &str, value: &str) -> RunSpec {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The command and its arguments.
    pub fn args<I, S>(mut self, args: I) -> RunSpec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The command is `/bin/sh -c script` (for an init step followed by `exec` of a server).
    pub fn shell(self, script: &str) -> RunSpec {
        self.args(["/bin/sh", "-c", script])
    }
}

/// A container started by [`TestNet::run`]. Removed with its network.
#[derive(Debug, Clone)]
pub struct Container {
    name: String,
    network: String,
    ip: Ipv4Addr,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name Docker accepts, from a test's name.
fn sanitize(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    out.truncate(24);
    out.trim_matches('-').to_owned()
}

/// The IPv4 routes of this host, as (network, mask), from /proc/net/route.
fn host_routes() -> Vec<(u32, u32)> {
    let Ok(text) = std::fs::read_to_string("/proc/net/route") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            // The kernel prints the address's bytes as a number in this machine's byte order.
            let addr = |v: u32| u32::from(Ipv4Addr::from(v.to_ne_bytes()));
            Some((addr(dest), addr(mask)))
        })
        .collect()
}

/// Whether the /24 at `net` overlaps a route of this host other than the default route.
fn overlaps_route(net: Ipv4Addr, routes: &[(u32, u32)]) -> bool {
    let n = u32::from(net);
    let m24 = 0xffff_ff00u32;
    routes
        .iter()
        .filter(|(_, mask)| *mask != 0)
        .any(|(dest, mask)| {
            let m = mask & m24;
            (n & m) == (dest & m)
        })
}

/// When process `pid` started (clock ticks after boot, field 22 of `/proc/PID/stat`), if it runs.
fn started(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// This machine's host name (of its UTS namespace).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// The value of [`LABEL_OWNER`] on what this process makes: `HOST:PID:START`, so that a
/// leftover is reaped only by a test process of the same host, and only once its maker is gone
/// (a pid reused by a later process has another start time).
pub fn owner_label() -> String {
    static OWNER: OnceLock<String> = OnceLock::new();
    OWNER
        .get_or_init(|| {
            let pid = std::process::id();
            format!("{}:{pid}:{}", hostname(), started(pid).unwrap_or(0))
        })
        .clone()
}

/// Whether an owner label names a test process of this host that is no longer running.
fn owner_gone(label: &str) -> bool {
    let mut parts = label.rsplitn(3, ':');
    let (Some(start), Some(pid), Some(host)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(start), Ok(pid)) = (start.parse::<u64>(), pid.parse::<u32>()) else {
        return false;
    };
    host == hostname() && started(pid) != Some(start)
}

/// Removes the containers and networks that a test process of this host made and left when
/// it died without unwinding (SIGKILL, abort, a timeout's kill).
fn reap_orphans() {
    let format = format!("{{{{.ID}}}} {{{{.Label \"{LABEL_OWNER}\"}}}}");
    let filter = format!("label={LABEL_OWNER}");
    let gone = |listing: String| -> Vec<String> {
        listing
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, owner)| owner_gone(owner))
            .map(|(id, _)| id.to_owned())
            .collect()
    };
    if let Ok(cs) = docker(["ps", "-a", "--filter", &filter, "--format", &format]) {
        for id in gone(cs) {
            let _ = docker(["rm", "-f", "-v", &id]);
        }
    }
    if let Ok(ns) = docker(["network", "ls", "--filter", &filter, "--format", &format]) {
        for id in gone(ns) {
            let _ = docker(["network", "rm", &id]);
        }
    }
}

/// Address number `host` of the /24 at `subnet`.
fn host_ip(subnet: Ipv4Addr, host: u8) -> Ipv4Addr {
    let [a, b, c, _] = subnet.octets();
    Ipv4Addr::new(a, b, c, host)
}

/// The /16s test networks take their /24s from, in order: private ranges that Docker's own
/// default pools (172.17–31, 192.168) leave alone, and a fallback for a host routing those.
const RANGES: [[u8; 2]; 3] = [[10, 213], [10, 97], [172, 29]];

/// Creates the `--internal` network `name` with the labels of `scope`, on a /24 that neither
/// another Docker network nor a route of this host uses; its subnet.
fn create_network(name: &str, scope: &str) -> Result<Ipv4Addr> {
    let pid = std::process::id();
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let routes = host_routes();
    // Start at a place of this process's own, so that tests running at once rarely try the
    // same subnet first.
    let start = (pid.wrapping_mul(31).wrapping_add(n.wrapping_mul(7))) % 256;
    let mut last = None;
    for [a, b] in RANGES {
        for i in 0..64u32 {
            let third = ((start + i * 37) % 256) as u8;
            let subnet = Ipv4Addr::new(a, b, third, 0);
            if overlaps_route(subnet, &routes) {
                continue;
            }
            let r = docker([
                "network",
                "create",
                "--internal",
                "--driver",
                "bridge",
                "--subnet",
                &format!("{subnet}/24"),
                "--gateway",
                &host_ip(subnet, 1).to_string(),
                "--label",
                &format!("{LABEL_SCOPE}={scope}"),
                "--label",
                &format!("{LABEL_OWNER}={}", owner_label()),
                name,
            ]);
            match r {
                Ok(_) => return Ok(subnet),
                Err(DockerError::Failed { stderr, .. }) if stderr.contains("overlap") => {
                    last = Some(stderr);
                }
                Err(e) => return Err(e),
            }
        }
    }
    Err(DockerError::NotReady(format!(
        "no free /24 for a test network in {RANGES:?} (last: {})",
        last.unwrap_or_else(|| "every candidate is under a route of this host".into())
            .trim()
    )))
}

/// Another network of a test ([`TestNet::segment`]), removed with its [`TestNet`]: for
/// partitions that cut some links and keep others.
#[derive(Debug, Clone)]
pub struct Segment {
    name: String,
    subnet: Ipv4Addr,
}

impl Segment {
    /// The network's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address of host number `host` on this segment.
    pub fn ip(&self, host: u8) -> Ipv4Addr {
        host_ip(self.subnet, host)
    }

    /// This machine's own address on the segment (the bridge's).
    pub fn gateway(&self) -> Ipv4Addr {
        self.ip(1)
    }
}

impl TestNet {
    /// Creates a private network for the test `test` (a name for people reading `docker ps`),
    /// with a /24 subnet that neither another Docker network nor a route of this host uses.
    /// Leftovers of test processes that died without unwinding are removed first.
    pub fn create(test: &str) -> Result<TestNet> {
        ensure_engine()?;
        reap_orphans();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("umbra-{}-{}-{n}", sanitize(test), std::process::id());
        let subnet = create_network(&name, &name)?;
        Ok(TestNet {
            scope: name.clone(),
            name,
            subnet,
        })
    }

    /// Another network of this test (its own `--internal` /24, removed with this one), for
    /// partitions that cut one link and keep another: controllers cut off from their database
    /// but not from their routers, say. Containers join it with [`Container::join`].
    pub fn segment(&self, name: &str) -> Result<Segment> {
        let full = format!("{}-{}", self.name, sanitize(name));
        let subnet = create_network(&full, &self.scope)?;
        Ok(Segment { name: full, subnet })
    }

    /// The network's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address of host number `host` on this network.
    pub fn ip(&self, host: u8) -> Ipv4Addr {
        host_ip(self.subnet, host)
    }

    /// This machine's own address on the network (the bridge's): a test process listens here
    /// for containers to reach it, and reaches containers from it.
    pub fn gateway(&self) -> Ipv4Addr {
        self.ip(1)
    }

    /// Starts a container called `name` (unique within this network) as `spec` says, in the
    /// background, with its address fixed so that a container disconnected and connected
    /// again keeps it.
    pub fn run(&self, name: &str, spec: RunSpec) -> Result<Container> {
        if !(2..=254).contains(&spec.host) {
            return Err(DockerError::NotReady(format!(
                "host number {} is not 2 to 254",
                spec.host
            )));
        }
        let full = format!("{}-{}", self.name, sanitize(name));
        let ip = self.ip(spec.host);
        // What must be in place before the command starts: created, set up, then started.
        let staged = !spec.segments.is_empty() || !spec.files.is_empty();
        let mut args: Vec<String> = if staged {
            vec!["create".into()]
        } else {
            vec!["run".into(), "-d".into()]
        };
        args.extend([
            "--name".into(),
            full.clone(),
            "--hostname".into(),
            sanitize(name),
            "--network".into(),
            self.name.clone(),
            "--ip".into(),
            ip.to_string(),
            "--label".into(),
            format!("{LABEL_SCOPE}={}", self.scope),
            "--label".into(),
            format!("{LABEL_OWNER}={}", owner_label()),
        ]);
        if let Some(u) = &spec.user {
            args.push("--user".into());
            args.push(u.clone());
        }
        for (k, v) in &spec.env {
            args.push("--env".into());
            args.push(format!("{k}={v}"));
        }
        args.push(spec.image.tag.clone());
        args.extend(spec.args.iter().cloned());
        docker(&args)?;
        if staged {
            // A failure leaves a created container, removed with the network like any other.
            for (segment, host) in &spec.segments {
                docker([
                    "network",
                    "connect",
                    "--ip",
                    &segment.ip(*host).to_string(),
                    &segment.name,
                    &full,
                ])?;
            }
            for (src, dest) in &spec.files {
                let mut c = docker_cmd(["cp"]);
                c.arg(src).arg(format!("{full}:{dest}"));
                checked(c, QUICK)?;
            }
            docker(["start", &full])?;
        }
        Ok(Container {
            name: full,
            network: self.name.clone(),
            ip,
        })
    }

    /// Starts PostgreSQL (the [`postgres_image`]) as `name` at host number `host`: a fresh
    /// cluster (`initdb`, superuser `postgres`, trust authentication from this network) on
    /// port [`PG_PORT`]. Returns once it accepts connections (`pg_isready`), within `bound`.
    pub fn postgres(&self, name: &str, host: u8, bound: Duration) -> Result<Container> {
        let image = postgres_image()?;
        let script = format!(
            "set -e; export PATH={PG_BIN}:/bin; \
             initdb -D /tmp/pgdata -U postgres -A trust -E UTF8 --locale=C -N; \
             echo 'host all all all trust' >> /tmp/pgdata/pg_hba.conf; \
             exec postgres -D /tmp/pgdata -c listen_addresses='*' -c port={PG_PORT} -c jit=off"
        );
        let c = self.run(
            name,
            RunSpec::new(&image, host).user("postgres").shell(&script),
        )?;
        let start = Instant::now();
        loop {
            let o = c.exec(&[
                &format!("{PG_BIN}/pg_isready"),
                "-h",
                "127.0.0.1",
                "-p",
                &PG_PORT.to_string(),
                "-U",
                "postgres",
            ])?;
            if o.status.success() {
                return Ok(c);
            }
            if !c.running()? {
                return Err(DockerError::NotReady(format!(
                    "postgres in {} exited: {}",
                    c.name,
                    c.logs().unwrap_or_default()
                )));
            }
            if start.elapsed() > bound {
                return Err(DockerError::NotReady(format!(
                    "postgres in {} not ready within {bound:?}: {}",
                    c.name,
                    c.logs().unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The names of the containers that exist now with this network's scope label.
    pub fn containers(&self) -> Result<Vec<String>> {
        Ok(docker([
            "ps",
            "-a",
            "--filter",
            &format!("label={LABEL_SCOPE}={}", self.scope),
            "--format",
            "{{.Names}}",
        ])?
        .lines()
        .map(str::to_owned)
        .collect())
    }

    /// Removes every container of this network and the network itself. Also what `Drop` does;
    /// call it to see the errors.
    pub fn remove(&self) -> Result<()> {
        let ids = docker([
            "ps",
            "-aq",
            "--filter",
            &format!("label={LABEL_SCOPE}={}", self.scope),
        ])?;
        let ids: Vec<&str> = ids.lines().filter(|l| !l.is_empty()).collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids);
            docker(args)?;
        }
        // This network and its segments.
        let nets = docker([
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("label={LABEL_SCOPE}={}", self.scope),
        ])?;
        for id in nets.lines().filter(|l| !l.is_empty()) {
            docker(["network", "rm", id])?;
        }
        Ok(())
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("cleaning up the test network {}: {e}", self.name);
        }
    }
}

impl Container {
    /// The container's name (`docker ps`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its address on the test network (kept across [`Container::disconnect`] and
    /// [`Container::connect`]).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Runs a command inside (`docker exec`), within a minute; its output whatever its status.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        ensure_engine()?;
        let mut c = docker_cmd(["exec", &self.name]);
        c.args(args);
        output_bounded(c, QUICK)
    }

    /// Runs a command inside as `user`; its output whatever its status.
    pub fn exec_as(&self, user: &str, args: &[&str]) -> Result<Output> {
        ensure_engine()?;
        let mut c = docker_cmd(["exec", "--user", user, &self.name]);
        c.args(args);
        output_bounded(c, QUICK)
    }

    /// Runs a command inside; its standard output if it exited 0, else an error with its
    /// standard error.
    pub fn exec_ok(&self, args: &[&str]) -> Result<String> {
        ensure_engine()?;
        let mut c = docker_cmd(["exec", &self.name]);
        c.args(args);
        checked(c, QUICK)
    }

    /// What the container has written to standard output and standard error so far.
    pub fn logs(&self) -> Result<String> {
        ensure_engine()?;
        let o = output_bounded(docker_cmd(["logs", &self.name]), QUICK)?;
        let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&o.stderr));
        Ok(s)
    }

    /// Waits, within `bound`, until the logs contain `needle`; returns them.
    pub fn wait_for_log(&self, needle: &str, bound: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            let logs = self.logs()?;
            if logs.contains(needle) {
                return Ok(logs);
            }
            if start.elapsed() > bound {
                return Err(DockerError::NotReady(format!(
                    "{} did not log {needle:?} within {bound:?}; its logs:\n{logs}",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether it is running.
    pub fn running(&self) -> Result<bool> {
        Ok(docker(["inspect", "--format", "{{.State.Running}}", &self.name])? == "true")
    }

    /// Cuts it off the test network (a partition): it keeps running, with loopback only.
    pub fn disconnect(&self) -> Result<()> {
        docker(["network", "disconnect", &self.network, &self.name]).map(drop)
    }

    /// Puts it back on the test network at the same address (the partition heals).
    pub fn connect(&self) -> Result<()> {
        docker([
            "network",
            "connect",
            "--ip",
            &self.ip.to_string(),
            &self.network,
            &self.name,
        ])
        .map(drop)
    }

    /// Waits, within `bound`, until it exits; its exit code.
    pub fn wait(&self, bound: Duration) -> Result<i64> {
        ensure_engine()?;
        let code = checked(docker_cmd(["wait", &self.name]), bound)?;
        code.trim().parse().map_err(|_| {
            DockerError::NotReady(format!("`docker wait {}` printed {code:?}", self.name))
        })
    }

    /// Connects it to `segment` too, as host number `host` there (another interface).
    pub fn join(&self, segment: &Segment, host: u8) -> Result<()> {
        docker([
            "network",
            "connect",
            "--ip",
            &segment.ip(host).to_string(),
            &segment.name,
            &self.name,
        ])
        .map(drop)
    }

    /// Cuts it off `segment` only: a partition of that link, its other networks kept.
    pub fn leave(&self, segment: &Segment) -> Result<()> {
        docker(["network", "disconnect", &segment.name, &self.name]).map(drop)
    }

    /// Copies `path` (a file or a directory) out of it to `dest` on this machine (`docker cp`),
    /// running or not.
    pub fn copy_out(&self, path: &str, dest: &Path) -> Result<()> {
        ensure_engine()?;
        let mut c = docker_cmd(["cp"]);
        c.arg(format!("{}:{path}", self.name)).arg(dest);
        checked(c, QUICK).map(drop)
    }

    /// Kills it (SIGKILL), as a crash or the loss of its host would.
    pub fn kill(&self) -> Result<()> {
        docker(["kill", &self.name]).map(drop)
    }

    /// Starts it again after [`Container::kill`] (same command, same files, same address).
    pub fn start(&self) -> Result<()> {
        docker(["start", &self.name]).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_gone_owner_of_this_host_is_reaped() {
        let me = owner_label();
        assert!(!owner_gone(&me), "{me}");
        let pid = std::process::id();
        let host = hostname();
        // The same pid with another start time: a reused pid, its maker gone.
        assert!(owner_gone(&format!("{host}:{pid}:1")));
        // Another host's objects are never this process's to judge.
        assert!(!owner_gone(&format!("{host}-elsewhere:{pid}:1")));
        assert!(!owner_gone("garbage"));
    }

    #[test]
    fn a_subnet_under_a_route_is_not_used() {
        let routes = vec![
            (u32::from(Ipv4Addr::new(10, 213, 4, 0)), 0xffff_ff00),
            (0, 0),
        ];
        assert!(overlaps_route(Ipv4Addr::new(10, 213, 4, 0), &routes));
        assert!(!overlaps_route(Ipv4Addr::new(10, 213, 5, 0), &routes));
        // A wider route covers it too.
        let wide = vec![(u32::from(Ipv4Addr::new(10, 0, 0, 0)), 0xff00_0000)];
        assert!(overlaps_route(Ipv4Addr::new(10, 213, 5, 0), &wide));
    }

    #[test]
    fn names_are_what_docker_accepts() {
        assert_eq!(sanitize("A router_fails/closed"), "a-router-fails-closed");
        assert!(sanitize("x".repeat(100).as_str()).len() <= 24);
    }
}
