//! The processes the bench runs (the real `umbra` binary: controller, router, tunnelers, the
//! CLI) and what it reads about them from `/proc`. Every child is owned by a [`Proc`], which
//! stops it when dropped, so every path out of the bench (a failed step, a panic) leaves
//! nothing running.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `umbra` binary built with this bench.
pub fn umbra_bin() -> &'static str {
    env!("CARGO_BIN_EXE_umbra")
}

/// A child process stopped on drop: SIGTERM (a clean shutdown), then SIGKILL after 5 s.
pub struct Proc(Child);

impl Proc {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A log file in the scratch directory for a child's output.
fn log_file(dir: &Path, name: &str) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .map_err(|e| format!("log file {name}: {e}"))
}

/// Starts `cmd` and returns it with the rest of the first stdout line that starts with
/// `prefix` (within 60 s); the rest of stdout is drained, stderr goes to `log`.
fn spawn_until(
    cmd: &mut Command,
    prefix: &str,
    dir: &Path,
    log: &str,
) -> Result<(Proc, String), String> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(log_file(dir, log)?)
        .spawn()
        .map_err(|e| format!("spawn {log}: {e}"))?;
    let mut p = Proc(child);
    let stdout = p.0.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = prefix.to_owned();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent && line.starts_with(&wanted) {
                let _ = tx.send(line[wanted.len()..].trim().to_owned());
                sent = true;
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| format!("{log}: no line starting with {prefix:?} within 60 s"))?;
    Ok((p, line))
}

/// A free loopback TCP port, for the controller (its enrollment tokens carry its address, so
/// it must be known before it starts).
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

/// A controller and one edge router as processes, and the admin's CLI environment.
pub struct Deployment {
    /// The scratch directory.
    pub dir: PathBuf,
    /// The controller's address.
    pub ctrl_addr: String,
    /// The admin identity file.
    pub admin: PathBuf,
    /// `umbra controller run`.
    pub controller: Proc,
    /// `umbra router run`.
    pub router: Proc,
}

impl Deployment {
    /// `controller init`, `controller run`, `router create`, `router enroll`, `router run`.
    pub fn start(dir: &Path) -> Result<Deployment, String> {
        let ctrl_dir = dir.join("ctrl");
        let ctrl_addr = format!("127.0.0.1:{}", free_port()?);
        let init = Command::new(umbra_bin())
            .args(["controller", "init", "--trust-domain", "scale.umbra"])
            .args(["--address", &ctrl_addr, "--dir"])
            .arg(&ctrl_dir)
            .env("UMBRA_LOG", "error")
            .output()
            .map_err(|e| format!("controller init: {e}"))?;
        if !init.status.success() {
            return Err(format!(
                "controller init: {}",
                String::from_utf8_lossy(&init.stderr)
            ));
        }
        let (controller, _) = spawn_until(
            Command::new(umbra_bin())
                .args(["controller", "run", "--listen", &ctrl_addr, "--dir"])
                .arg(&ctrl_dir)
                .env("UMBRA_LOG", "warn"),
            "controller listening on ",
            dir,
            "controller",
        )?;
        let admin = ctrl_dir.join("admin.json");
        let cli = Cli {
            admin: admin.clone(),
            controller: ctrl_addr.clone(),
        };
        let tok = dir.join("r1.jwt");
        let rdir = dir.join("r1");
        cli.run(&["router", "create", "r1", "-o", path_str(&tok)?])?;
        cli.run(&[
            "router",
            "enroll",
            path_str(&tok)?,
            "--dir",
            path_str(&rdir)?,
        ])?;
        let (router, _) = spawn_until(
            Command::new(umbra_bin())
                .args(["router", "run", "--listen", "127.0.0.1:0", "--dir"])
                .arg(&rdir)
                .env("UMBRA_LOG", "warn"),
            "router listening on ",
            dir,
            "router",
        )?;
        Ok(Deployment {
            dir: dir.to_owned(),
            ctrl_addr,
            admin,
            controller,
            router,
        })
    }

    /// The admin's CLI.
    pub fn cli(&self) -> Cli {
        Cli {
            admin: self.admin.clone(),
            controller: self.ctrl_addr.clone(),
        }
    }

    /// Starts `umbra tunnel` for an identity file; its output goes to `tunnel-NAME.log`.
    /// Where `umbra tunnel` for `name` writes its output (its listeners as they change).
    pub fn tunnel_log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("tunnel-{name}.log"))
    }

    pub fn tunnel(&self, identity: &Path, name: &str) -> Result<Proc, String> {
        let out = log_file(&self.dir, &format!("tunnel-{name}"))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(umbra_bin())
            .args(["tunnel", "--identity"])
            .arg(identity)
            .env("UMBRA_LOG", "warn")
            .env_remove("UMBRA_CONTROLLER")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn tunnel: {e}"))?;
        Ok(Proc(child))
    }
}

/// A path as UTF-8, for an argument.
pub fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", p.display()))
}

/// The `umbra` CLI as the first admin.
pub struct Cli {
    admin: PathBuf,
    controller: String,
}

impl Cli {
    /// Runs one command; its stdout, or its stderr's first line as the error.
    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        let o = Command::new(umbra_bin())
            .args(args)
            .env("UMBRA_ADMIN", &self.admin)
            .env("UMBRA_CONTROLLER", &self.controller)
            .env("UMBRA_LOG", "error")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("umbra {}: {e}", args.join(" ")))?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            let err = String::from_utf8_lossy(&o.stderr);
            Err(err.lines().next().unwrap_or("failed").trim().to_owned())
        }
    }
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
}

/// Resident and peak resident memory of a process, in MiB.
pub fn memory_mib(pid: u32) -> Option<(f64, f64)> {
    let rss = status_kib(pid, "VmRSS")?;
    let hwm = status_kib(pid, "VmHWM")?;
    Some((rss as f64 / 1024.0, hwm as f64 / 1024.0))
}

/// Clock ticks per second for `/proc/PID/stat`.
fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds a process has used so far (utime + stime of `/proc/PID/stat`).
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    // After the command: state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    // cmajflt utime stime …; the state is not a number, so utime is the 11th number.
    let f: Vec<f64> = after
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    (f.get(10).copied().unwrap_or(0.0) + f.get(11).copied().unwrap_or(0.0)) / clk_tck()
}

/// Waits until a process has been nearly idle (under 5% of a core) for 300 ms, at most
/// `bound`: a measurement of the next change should not pay for the last one.
pub async fn settle(pid: u32, bound: Duration) {
    let start = Instant::now();
    let mut last = cpu_secs(pid);
    while start.elapsed() < bound {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = cpu_secs(pid);
        if now - last < 0.015 {
            return;
        }
        last = now;
    }
}

/// The machine's CPU ticks so far in all and those the hypervisor gave to other guests
/// (steal), from the first line of `/proc/stat`: a run with much steal measured a machine that
/// was not all its own.
pub fn steal_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    (f.iter().take(8).sum(), f.get(7).copied().unwrap_or(0.0))
}

/// The 1, 5 and 15-minute load averages, as `/proc/loadavg` has them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
