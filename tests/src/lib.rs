//! End-to-end test harness: starts the real controller on `127.0.0.1:0` with a fresh directory
//! (fresh CA, fresh admin) and drives it through the real HTTPS API and the real `umbra` binary.
//!
//! Nothing here mocks a part of Umbra. Eventual conditions are retried with a bound, never
//! waited for with a fixed sleep.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use umbra_controller::{Clock, Controller, ControllerConfig, Server};
use umbra_pki::{IdentityFile, TrustDomain};
use umbra_sdk::ControllerClient;

pub mod dataplane;
pub mod docker;
pub mod exposition;
pub mod fake_llm;
pub mod fake_webhook;
pub mod metrics;
pub mod pg;
/// A controller running in this process on an ephemeral loopback port.
pub struct TestController {
    /// The controller's directory (CA, store, admin.json).
    pub dir: tempfile::TempDir,
    /// The controller.
    pub ctrl: Arc<Controller>,
    server: Option<Server>,
    /// The first admin's identity file.
    pub admin: IdentityFile,
}

impl TestController {
    /// Initializes a fresh directory and starts a controller.
    pub async fn start() -> TestController {
        Self::start_with(|_| {}).await
    }

    /// Like `start`, with a chance to change the configuration.
    pub async fn start_with(tweak: impl FnOnce(&mut ControllerConfig)) -> TestController {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = ControllerConfig::new(dir.path().join("ctrl"));
        tweak(&mut cfg);
        let td: TrustDomain = "test.umbra".parse().expect("trust domain");
        let c = cfg.clone();
        tokio::task::spawn_blocking(move || umbra_controller::init(&c, &td, "127.0.0.1:1"))
            .await
            .expect("join")
            .expect("init");
        let mut t = Self::boot(dir, cfg, "127.0.0.1:0".parse().expect("addr")).await;
        t.refresh_admin();
        t
    }

    async fn boot(
        dir: tempfile::TempDir,
        cfg: ControllerConfig,
        listen: SocketAddr,
    ) -> TestController {
        let ctrl = Arc::new(
            tokio::task::spawn_blocking(move || Controller::open(cfg))
                .await
                .expect("join")
                .expect("open"),
        );
        let server = Server::start(ctrl.clone(), listen, None)
            .await
            .expect("start");
        let admin_path = dir.path().join("ctrl").join("admin.json");
        let mut admin = IdentityFile::load(&admin_path).expect("admin.json");
        admin.controller = server.local_addr().to_string();
        admin.save(&admin_path).expect("save admin");
        TestController {
            dir,
            ctrl,
            server: Some(server),
            admin,
        }
    }

    /// A second controller on this one's store (PostgreSQL), as `umbra controller join` makes
    /// it: the same keys copied into a directory of its own, the first admin's identity file
    /// beside them, its own listener.
    pub async fn join(&self) -> TestController {
        self.join_with(|_| {}).await
    }

    /// Like `join`, with a chance to change the second controller's configuration (say,
    /// without the first one's event sinks).
    pub async fn join_with(&self, tweak: impl FnOnce(&mut ControllerConfig)) -> TestController {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = self.ctrl.config().clone();
        cfg.dir = dir.path().join("ctrl");
        tweak(&mut cfg);
        let (c, from) = (cfg.clone(), self.ctrl_dir());
        tokio::task::spawn_blocking(move || umbra_controller::join_dir(&c, &from))
            .await
            .expect("join")
            .expect("join_dir");
        std::fs::copy(self.admin_path(), cfg.dir.join("admin.json")).expect("copy admin.json");
        Self::boot(dir, cfg, "127.0.0.1:0".parse().expect("addr")).await
    }

    fn refresh_admin(&mut self) {
        self.admin = IdentityFile::load(self.admin_path()).expect("admin.json");
    }

    /// Stops the server and opens the same directory again, as a restart would.
    pub async fn restart(self) -> TestController {
        self.restart_with(|_| {}).await
    }

    /// Restarts with a changed configuration (another clock, say).
    pub async fn restart_with(
        mut self,
        tweak: impl FnOnce(&mut ControllerConfig),
    ) -> TestController {
        let mut cfg = self.ctrl.config().clone();
        tweak(&mut cfg);
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        let dir = self.dir;
        drop(self.ctrl);
        Self::boot(dir, cfg, "127.0.0.1:0".parse().expect("addr")).await
    }

    /// Restarts on the same port, as a controller restarted in place: routers and clients that
    /// know its address reconnect to it.
    pub async fn restart_in_place(self) -> TestController {
        self.outage(Duration::ZERO, async {}).await
    }

    /// Stops the controller for `outage`, then starts it again on the same port from the same
    /// directory, as an operator's restart after a crash would. `between` runs while it is down.
    pub async fn outage<F: std::future::Future<Output = ()>>(
        mut self,
        outage: Duration,
        between: F,
    ) -> TestController {
        let cfg = self.ctrl.config().clone();
        let listen: SocketAddr = self.addr().parse().expect("addr");
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        let dir = self.dir;
        drop(self.ctrl);
        let (_, ()) = tokio::join!(tokio::time::sleep(outage), between);
        Self::boot(dir, cfg, listen).await
    }

    /// Stops serving, as a controller that dies would: its clients' connections end. The
    /// controller itself is dropped with the rest of this value.
    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }

    /// The controller's address.
    pub fn addr(&self) -> String {
        self.server
            .as_ref()
            .map(|s| s.local_addr().to_string())
            .unwrap_or_default()
    }

    /// The admin identity file's path.
    pub fn admin_path(&self) -> PathBuf {
        self.dir.path().join("ctrl").join("admin.json")
    }

    /// A management client authenticated as the first admin.
    pub fn admin_client(&self) -> ControllerClient {
        ControllerClient::for_identity(&self.admin, Some(&self.addr())).expect("client")
    }

    /// A client authenticated as `identity`.
    pub fn client_for(&self, identity: &IdentityFile) -> ControllerClient {
        ControllerClient::for_identity(identity, Some(&self.addr())).expect("client")
    }

    /// A scratch path inside the test directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The controller's directory.
    pub fn ctrl_dir(&self) -> PathBuf {
        self.dir.path().join("ctrl")
    }

    /// Runs the `umbra` binary as the first admin against this controller.
    pub fn umbra(&self, args: &[&str]) -> Output {
        umbra_cmd(
            args,
            &[
                ("UMBRA_ADMIN", self.admin_path().as_os_str()),
                ("UMBRA_CONTROLLER", self.addr().as_ref()),
            ],
        )
    }
}

/// A controller configuration whose clock is `offset_secs` away from now.
pub fn shifted_clock(offset_secs: i64) -> impl FnOnce(&mut ControllerConfig) {
    move |cfg| cfg.clock = Clock::shifted(offset_secs)
}

/// The `umbra` binary built for this test run (next to the test executable's directory).
pub fn umbra_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("umbra");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// Runs the `umbra` binary with extra environment variables; returns its output.
pub fn umbra_cmd(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Output {
    let mut cmd = std::process::Command::new(umbra_bin());
    cmd.args(args)
        .env_remove("UMBRA_ADMIN")
        .env_remove("UMBRA_CONTROLLER")
        .env_remove("UMBRA_STORE")
        .env("UMBRA_LOG", "error");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run umbra")
}

/// Standard output as a string.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Standard error as a string.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Retries `f` until it returns `Some`, for at most `timeout`.
pub async fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
