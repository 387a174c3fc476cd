//! A real PostgreSQL for tests: the server `.ci/run` started (`UMBRA_TEST_POSTGRES`, a URL), or
//! one started here, once per test process, from Debian's `postgresql` binaries.
//!
//! A server started here runs as the unprivileged `postgres` user when the tests run as root
//! (PostgreSQL refuses root), in a scratch directory, on a free loopback port, with its socket in
//! the scratch directory. It dies with the test process: it is spawned by a dedicated thread
//! that never returns, through `setpriv --pdeathsig KILL`, and the parent-death signal fires when
//! that *thread* ends, which is when the process ends. Scratch directories left by earlier test
//! processes are removed at the next start. Each test takes a fresh database
//! ([`PgServer::database`]), so tests are independent.
//!
//! Every call here uses the blocking PostgreSQL client on a thread of its own, so it works from
//! a `#[tokio::test]` as well as from a plain `#[test]`.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The environment variable naming a server to use instead of starting one.
pub const ENV: &str = "UMBRA_TEST_POSTGRES";

/// A PostgreSQL server for tests.
pub struct PgServer {
    /// A URL of the server's `postgres` database (for `CREATE DATABASE`).
    url: String,
    /// The thread that owns the server process, when this process started it.
    control: Option<Mutex<SyncSender<Order>>>,
    next: AtomicU64,
}

impl std::fmt::Debug for PgServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgServer")
            .field("url", &self.url)
            .field("own", &self.control.is_some())
            .finish()
    }
}

enum Cmd {
    Start,
    Stop,
    Exit,
}

/// A command for the owner thread and where to say it is done.
type Order = (Cmd, SyncSender<Result<(), String>>);

static SHARED: OnceLock<PgServer> = OnceLock::new();

impl PgServer {
    /// The server every test of this process shares: `UMBRA_TEST_POSTGRES` if set, otherwise
    /// one started now. Panics with what to install if the binaries are missing.
    pub fn shared() -> &'static PgServer {
        SHARED.get_or_init(|| match std::env::var(ENV) {
            Ok(url) if !url.is_empty() => PgServer {
                url,
                control: None,
                next: AtomicU64::new(0),
            },
            _ => PgServer::start_own().unwrap_or_else(|e| panic!("{e}")),
        })
    }

    /// A server of the caller's own, whatever `UMBRA_TEST_POSTGRES` says, for a test that stops
    /// and starts it ([`stop`](Self::stop), [`start`](Self::start)); stopped when dropped.
    pub fn private() -> PgServer {
        PgServer::start_own().unwrap_or_else(|e| panic!("{e}"))
    }

    /// A fresh, empty database on this server; its URL.
    pub fn database(&self) -> String {
        let name = format!(
            "umbra_{}_{}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        // One at a time: concurrent CREATE DATABASE can trip over the template being in use.
        static CREATING: Mutex<()> = Mutex::new(());
        let _one = CREATING.lock().unwrap_or_else(|e| e.into_inner());
        admin_sql(&self.url, &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        with_database(&self.url, &name)
    }

    /// Stops the server (fast shutdown: connections are closed); panics if it is not this
    /// process's own.
    pub fn stop(&self) {
        self.command(Cmd::Stop);
    }

    /// Starts the server again on the same port and data, and waits until it accepts
    /// connections.
    pub fn start(&self) {
        self.command(Cmd::Start);
    }

    fn command(&self, cmd: Cmd) {
        let Some(control) = &self.control else {
            panic!("the server at {ENV} is not this process's to stop or start");
        };
        let (ack, done) = mpsc::sync_channel(1);
        control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((cmd, ack))
            .expect("the PostgreSQL thread is gone");
        done.recv()
            .expect("the PostgreSQL thread is gone")
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn start_own() -> Result<PgServer, String> {
        let bin = find_bin()?;
        let user = unprivileged()?;
        let scratch = scratch_dir()?;
        let port = free_port()?;
        let spec = Spec {
            bin,
            user,
            data: scratch.join("data"),
            log: scratch.join("server.log"),
            scratch,
            port,
        };
        spec.initdb()?;
        let (tx, rx) = mpsc::sync_channel(1);
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        std::thread::Builder::new()
            .name("umbra-test-postgres".into())
            .spawn(move || owner(spec, rx))
            .map_err(|e| format!("PostgreSQL thread: {e}"))?;
        let server = PgServer {
            url,
            control: Some(Mutex::new(tx)),
            next: AtomicU64::new(0),
        };
        let (ack, done) = mpsc::sync_channel(1);
        (server.control.as_ref())
            .ok_or("no control")?
            .lock()
            .map_err(|_| "poisoned")?
            .send((Cmd::Start, ack))
            .map_err(|_| "the PostgreSQL thread is gone")?;
        done.recv().map_err(|_| "the PostgreSQL thread is gone")??;
        Ok(server)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(control) = &self.control {
            let (ack, done) = mpsc::sync_channel(1);
            let sent = control
                .lock()
                .map(|c| c.send((Cmd::Exit, ack)).is_ok())
                .unwrap_or(false);
            if sent {
                let _ = done.recv();
            }
        }
    }
}

/// Where and as whom the server runs.
struct Spec {
    bin: PathBuf,
    /// The unprivileged user's ids, when running as root.
    user: Option<(u32, u32)>,
    scratch: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
}

impl Spec {
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        self.as_user(&mut c);
        c
    }

    fn as_user(&self, c: &mut Command) {
        use std::os::unix::process::CommandExt;
        if let Some((uid, gid)) = self.user {
            c.uid(uid).gid(gid);
        }
        c.current_dir(&self.scratch).env("LC_ALL", "C");
    }

    fn initdb(&self) -> Result<(), String> {
        let log = fs::File::create(self.scratch.join("initdb.log")).map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let status = self
            .command("initdb")
            .arg("-D")
            .arg(&self.data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8"])
            .args(["--no-locale", "--no-sync"])
            .stdout(log)
            .stderr(err)
            .status()
            .map_err(|e| format!("initdb: {e}"))?;
        if !status.success() {
            let out = fs::read_to_string(self.scratch.join("initdb.log")).unwrap_or_default();
            return Err(format!("initdb failed ({status}): {out}"));
        }
        Ok(())
    }

    /// Spawns the server; the caller is the owner thread, so the parent-death signal is tied
    /// to it.
    fn spawn(&self) -> Result<Child, String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        // setpriv runs as the unprivileged user already (set before it executes), so the
        // parent-death signal it sets is not cleared by a change of credentials.
        let mut c = Command::new("setpriv");
        self.as_user(&mut c);
        c.args(["--pdeathsig", "KILL", "--"])
            .arg(self.bin.join("postgres"))
            .arg("-D")
            .arg(&self.data)
            .arg("-k")
            .arg(&self.scratch)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("postgres: {e}"))
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Waits until the server answers a query, or it exits, or 30 s pass.
    fn wait_ready(&self, child: &mut Child) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match admin_sql(&self.url(), "SELECT 1") {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("PostgreSQL did not start: {e}; {}", self.tail()))
                }
                Err(_) => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("postgres exited ({status}): {}", self.tail()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

/// The thread that owns the server process. It never returns while the process lives unless
/// told to (`Exit`): the server's parent-death signal is tied to it.
fn owner(spec: Spec, rx: Receiver<Order>) {
    let mut child: Option<Child> = None;
    while let Ok((cmd, ack)) = rx.recv() {
        let r = match cmd {
            Cmd::Start if child.is_some() => Ok(()),
            Cmd::Start => start_child(&spec).map(|c| {
                child = Some(c);
            }),
            Cmd::Stop => {
                stop_child(child.take());
                Ok(())
            }
            Cmd::Exit => {
                stop_child(child.take());
                let _ = fs::remove_dir_all(&spec.scratch);
                let _ = ack.send(Ok(()));
                return;
            }
        };
        let _ = ack.send(r);
    }
    // Every sender is gone (the shared server lives in a static, so only at exit): park, so
    // that the server lives as long as the process.
    loop {
        std::thread::park();
    }
}

fn start_child(spec: &Spec) -> Result<Child, String> {
    // A server killed a moment ago may leave backends that still hold its shared memory for a
    // few milliseconds; try again for a while.
    let mut last = String::new();
    for _ in 0..5 {
        let mut c = spec.spawn()?;
        match spec.wait_ready(&mut c) {
            Ok(()) => return Ok(c),
            Err(e) => {
                let _ = c.kill();
                let _ = c.wait();
                last = e;
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    Err(last)
}

/// Fast shutdown (SIGINT: connections are closed, nothing waits for clients), then wait.
fn stop_child(child: Option<Child>) {
    let Some(mut c) = child else { return };
    let _ = Command::new("kill")
        .args(["-INT", &c.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// The newest `/usr/lib/postgresql/N/bin` holding `initdb` and `postgres`.
fn find_bin() -> Result<PathBuf, String> {
    let missing = || {
        "PostgreSQL's server binaries were not found under /usr/lib/postgresql/*/bin: \
         install Debian's `postgresql` package (apt-get install -y postgresql), or set \
         UMBRA_TEST_POSTGRES to the URL of a server"
            .to_string()
    };
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| missing())?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file())
                .then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(missing)
}

/// The `postgres` user's ids when running as root (PostgreSQL refuses to run as root), or
/// `None` to run as the current user.
fn unprivileged() -> Result<Option<(u32, u32)>, String> {
    if !rustix::process::geteuid().is_root() {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            let uid = f[2].parse().map_err(|_| "bad uid for postgres")?;
            let gid = f[3].parse().map_err(|_| "bad gid for postgres")?;
            return Ok(Some((uid, gid)));
        }
    }
    Err(
        "no `postgres` user to run PostgreSQL as (it refuses root): install Debian's \
         `postgresql` package, which creates it"
            .into(),
    )
}

/// A new scratch directory under `$TMPDIR/umbra-test-pg`, owned by the server's user, after
/// removing those of test processes that are gone.
fn scratch_dir() -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let root = std::env::temp_dir().join("umbra-test-pg");
    fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    // Traversable by the server's user; each scratch directory inside is its own (0700).
    fs::set_permissions(&root, fs::Permissions::from_mode(0o711))
        .map_err(|e| format!("{}: {e}", root.display()))?;
    if let Ok(entries) = fs::read_dir(&root) {
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name();
            let pid = name.to_str().and_then(|n| n.split('-').next());
            if let Some(pid) = pid {
                if !Path::new("/proc").join(pid).exists() {
                    release_shared_memory(&e.path());
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = root.join(format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    if let Some((uid, gid)) = unprivileged()? {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", dir.display()))?;
    }
    Ok(dir)
}

/// Removes the small System V segment a killed server leaves behind (its key and id are on the
/// seventh line of `postmaster.pid`), so that test runs do not pile them up.
fn release_shared_memory(scratch: &Path) {
    let Ok(pid_file) = fs::read_to_string(scratch.join("data").join("postmaster.pid")) else {
        return;
    };
    let id = pid_file
        .lines()
        .nth(6)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|id| id.parse::<u64>().ok());
    if let Some(id) = id {
        let _ = Command::new("ipcrm")
            .args(["-m", &id.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Runs `sql` on `url` from a thread of its own (the blocking client refuses to run inside an
/// async runtime).
pub fn admin_sql(url: &str, sql: &str) -> Result<(), String> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).map_err(|e| e.to_string())?;
        c.batch_execute(&sql).map_err(|e| e.to_string())
    })
    .join()
    .map_err(|_| "the SQL thread panicked".to_string())?
}

/// `url` with its database replaced by `db` (query parameters kept).
pub fn with_database(url: &str, db: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[after_scheme..];
    let path_start = rest.find('/').map_or(url.len(), |i| after_scheme + i);
    let query = url[path_start..].find('?').map(|i| &url[path_start + i..]);
    format!("{}/{db}{}", &url[..path_start], query.unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_name_replaces_the_path_and_keeps_the_parameters() {
        assert_eq!(
            with_database("postgres://u@127.0.0.1:5/postgres", "t1"),
            "postgres://u@127.0.0.1:5/t1"
        );
        assert_eq!(
            with_database("postgres://u@h:5/postgres?sslmode=disable", "t2"),
            "postgres://u@h:5/t2?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://u@h:5", "t3"),
            "postgres://u@h:5/t3"
        );
    }
}
