//! Running `docker` and helper commands with a time bound, their output kept.

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{ensure_engine, io, DockerError, Result};

/// A docker command that manages objects (run, rm, network): answered in well under this.
pub(super) const QUICK: Duration = Duration::from_secs(60);
/// Building and importing an image.
pub(super) const SLOW: Duration = Duration::from_secs(300);

pub(super) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    // Enrollment tokens and such can be long: the start says which command it was.
    if s.len() > 300 {
        s.truncate(300);
        s.push('…');
    }
    s
}

/// Waits for `child` (whose stdout and stderr are piped) for at most `bound`, reading both
/// pipes meanwhile; kills it at the bound.
pub(super) fn wait_bounded(mut child: Child, what: String, bound: Duration) -> Result<Output> {
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    });
    let start = Instant::now();
    let status = loop {
        match child
            .try_wait()
            .map_err(io(format!("waiting for `{what}`")))?
        {
            Some(status) => break status,
            None if start.elapsed() >= bound => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(DockerError::Timeout {
                    command: what,
                    after: bound,
                });
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs `cmd` to completion within `bound`; its output whatever its exit status.
pub(super) fn output_bounded(mut cmd: Command, bound: Duration) -> Result<Output> {
    let what = describe(&cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DockerError::Unreachable(format!(
                    "`{}` is not installed",
                    cmd.get_program().to_string_lossy()
                ))
            } else {
                DockerError::Io {
                    what: format!("starting `{what}`"),
                    source: e,
                }
            }
        })?;
    wait_bounded(child, what, bound)
}

/// Runs `cmd` within `bound`; its standard output if it succeeded.
pub(super) fn checked(cmd: Command, bound: Duration) -> Result<String> {
    let what = describe(&cmd);
    let o = output_bounded(cmd, bound)?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(DockerError::Failed {
            command: what,
            code: o.status.code(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        })
    }
}

pub(super) fn docker_cmd<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new("docker");
    c.args(args);
    c
}

/// `docker ARGS` within the quick bound; its trimmed standard output.
pub(super) fn docker<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    ensure_engine()?;
    checked(docker_cmd(args), QUICK).map(|s| s.trim().to_owned())
}
