//! Test hosts of their own: the real `umbra` binary and PostgreSQL as Docker containers on a
//! private network per test, so that a test can cut one host off (`docker network disconnect`)
//! and heal it, which loopback processes cannot show.
//!
//! The machines these tests run on have a Docker engine but no registry, so nothing is pulled:
//! each image is a small root filesystem assembled here from files of this machine (the
//! `umbra` binary this test run uses, the PostgreSQL binaries of Debian's `postgresql-15`, the
//! shared libraries `ldd` lists for them, Debian's `/bin/sh`) and loaded with `docker import`.
//! An image is tagged with a hash of everything put in it, so a second run (or another test of
//! the same run) finds it and builds nothing.
//!
//! Everything a test makes carries the labels [`LABEL_SCOPE`] (one per [`TestNet`]) and
//! [`LABEL_OWNER`] (the test process: host, pid and start time). Dropping the [`TestNet`], on
//! success or during a panic's unwinding, removes its containers and its networks; objects left
//! by a test process that died without unwinding (SIGKILL) are removed by the next
//! [`TestNet::create`].
//!
//! Parts: `cmd` runs commands with a time bound; `image` assembles and imports the images;
//! `net` holds networks ([`TestNet`], [`Segment`]), containers ([`Container`]) and the reaping.
//!
//! Traffic stays on the networks made here: they are `--internal` (no route out of the host)
//! and their subnet is one that no route of the host already covers.
//!
//! Set `UMBRA_DOCKER_TESTS=skip` to skip the Docker tests on a machine without an engine
//! ([`skip_requested`]); otherwise an unreachable engine fails them with one clear message.

use std::fmt;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

mod cmd;
mod image;
mod isolated;
mod net;
pub mod probe;

pub use image::{client_image, postgres_image, umbra_binary, umbra_image, Image, CLIENT_REPO};
pub use isolated::Isolated;
pub use net::{owner_label, Container, RunSpec, Segment, TestNet};

use cmd::output_bounded;

/// The label every container and network made here carries: the [`TestNet`] that owns it.
pub const LABEL_SCOPE: &str = "umbra-test.scope";
/// The label that names the test process that made an object ([`owner_label`]), so that the
/// leftovers of a process that died without unwinding can be told from those of one still
/// running.
pub const LABEL_OWNER: &str = "umbra-test.owner";

/// The repository of the `umbra` image.
pub const UMBRA_REPO: &str = "umbra-test";
/// The repository of the PostgreSQL image.
pub const POSTGRES_REPO: &str = "umbra-test-postgres";
/// Where the `umbra` binary is inside the `umbra` image (on `PATH`).
pub const UMBRA_IN_IMAGE: &str = "/usr/local/bin/umbra";
/// The PostgreSQL binaries' directory, in this machine's Debian package and in the image.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The port PostgreSQL listens on in its container.
pub const PG_PORT: u16 = 5432;
/// The uid and gid of the `postgres` user inside the PostgreSQL image (postgres refuses root).
pub const PG_UID: u32 = 999;

/// What went wrong talking to Docker or assembling an image.
#[derive(Debug)]
pub enum DockerError {
    /// The `docker` CLI is missing or the engine does not answer; the message says what to do.
    Unreachable(String),
    /// A docker (or helper) command exited with an error.
    Failed {
        /// The command line.
        command: String,
        /// Its exit code (`None`: killed by a signal).
        code: Option<i32>,
        /// What it printed on standard error.
        stderr: String,
    },
    /// A command did not finish in its time bound (it was killed).
    Timeout {
        /// The command line.
        command: String,
        /// The bound.
        after: Duration,
    },
    /// A file an image needs is not on this machine; the message says how to get it.
    Missing(String),
    /// Reading or writing a local file failed.
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A condition a caller waited for did not come in time.
    NotReady(String),
}

impl fmt::Display for DockerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DockerError::Unreachable(m) => write!(f, "the Docker engine is not reachable: {m}"),
            DockerError::Failed {
                command,
                code,
                stderr,
            } => write!(
                f,
                "`{command}` failed ({}): {}",
                code.map_or_else(|| "killed".to_owned(), |c| format!("exit {c}")),
                stderr.trim()
            ),
            DockerError::Timeout { command, after } => {
                write!(f, "`{command}` did not finish within {after:?}")
            }
            DockerError::Missing(m) => write!(f, "cannot build the test image: {m}"),
            DockerError::Io { what, source } => write!(f, "{what}: {source}"),
            DockerError::NotReady(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for DockerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DockerError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The result of everything here.
pub type Result<T> = std::result::Result<T, DockerError>;

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DockerError {
    let what = what.into();
    move |source| DockerError::Io { what, source }
}

/// Whether the Docker tests were asked to be skipped (`UMBRA_DOCKER_TESTS=skip`), for a
/// developer's machine without an engine. CI does not set it: there they must run.
pub fn skip_requested() -> bool {
    std::env::var("UMBRA_DOCKER_TESTS").is_ok_and(|v| v == "skip")
}

/// Asks the engine behind `docker` (as `cmd` is set up) for its version; the reason if it
/// does not answer.
fn probe_engine(mut cmd: Command) -> std::result::Result<String, String> {
    cmd.args(["version", "--format", "{{.Server.Version}}"]);
    match output_bounded(cmd, Duration::from_secs(20)) {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().into()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// The error for an engine that did not answer, saying what to do about it.
fn unreachable(why: &str) -> DockerError {
    let why = why.lines().next().unwrap_or("no answer");
    DockerError::Unreachable(format!(
        "{why} (start the engine: `systemctl start docker`, or `dockerd &`; or point \
         DOCKER_HOST at one; UMBRA_DOCKER_TESTS=skip skips these tests)"
    ))
}

/// Checks, once per process, that the engine answers; the same error every time if it does not.
pub fn ensure_engine() -> Result<()> {
    static ENGINE: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    match ENGINE.get_or_init(|| probe_engine(Command::new("docker"))) {
        Ok(_) => Ok(()),
        Err(why) => Err(unreachable(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_engine_is_reported_in_one_line_that_says_what_to_do() {
        let mut cmd = Command::new("docker");
        cmd.env("DOCKER_HOST", "unix:///nonexistent/umbra-test-docker.sock");
        let why = probe_engine(cmd).expect_err("no engine there");
        let e = unreachable(&why).to_string();
        assert!(e.starts_with("the Docker engine is not reachable: "), "{e}");
        assert!(e.contains("UMBRA_DOCKER_TESTS=skip"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}
