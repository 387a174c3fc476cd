//! A container with no network of its own (`docker run --network none`): what an agent
//! already running in a container looks like to `umbra tunnel --pid`, which serves it from
//! the host. Removed when dropped.

use std::time::Duration;

use super::cmd::{checked, docker, docker_cmd, QUICK};
use super::{
    ensure_engine, net::owner_label, DockerError, Image, Result, LABEL_OWNER, LABEL_SCOPE,
};

/// A running `--network none` container (its command: `sleep`), removed on drop.
#[derive(Debug)]
pub struct Isolated {
    name: String,
    pid: u32,
}

impl Isolated {
    /// Starts `image` as `--network none`, sleeping for at most `life` (so a container
    /// survives no test process for long even if nothing removes it).
    pub fn start(test: &str, image: &Image, life: Duration) -> Result<Isolated> {
        Self::start_with(test, image, life, &[])
    }

    /// Like [`Isolated::start`], with more `docker run` options (`--cap-add`, `-v`...).
    pub fn start_with(
        test: &str,
        image: &Image,
        life: Duration,
        options: &[&str],
    ) -> Result<Isolated> {
        ensure_engine()?;
        let name = format!(
            "umbra-iso-{}-{}",
            test.chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .take(20)
                .collect::<String>()
                .to_ascii_lowercase(),
            std::process::id()
        );
        let _ = docker(["rm", "-f", &name]);
        let (scope, owner) = (
            format!("{LABEL_SCOPE}={name}"),
            format!("{LABEL_OWNER}={}", owner_label()),
        );
        let life = life.as_secs().to_string();
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "none",
            "--label",
            &scope,
            "--label",
            &owner,
        ];
        args.extend_from_slice(options);
        args.extend_from_slice(&[image.tag(), "/bin/sleep", &life]);
        docker(&args)?;
        // Owned from here: a failure below removes it.
        let mut c = Isolated { name, pid: 0 };
        let pid = docker(["inspect", "-f", "{{.State.Pid}}", &c.name])?;
        c.pid = pid
            .trim()
            .parse()
            .map_err(|_| DockerError::NotReady(format!("container pid {pid:?}")))?;
        Ok(c)
    }

    /// The container's first process, as the host sees it.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Runs `script` with `bash -c` inside; its standard output (an error if it failed).
    pub fn exec(&self, script: &str) -> Result<String> {
        let mut c = docker_cmd(["exec"]);
        c.arg(&self.name).arg("/bin/bash").arg("-c").arg(script);
        checked(c, QUICK)
    }

    /// Like [`Isolated::exec`], started in the background, its output piped.
    pub fn spawn(&self, script: &str) -> std::io::Result<std::process::Child> {
        let mut c = docker_cmd(["exec", "-i"]);
        c.arg(&self.name)
            .arg("/bin/bash")
            .arg("-c")
            .arg(script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.spawn()
    }

    /// Stops the container (its first process exits), keeping it for inspection until dropped.
    pub fn kill(&self) -> Result<()> {
        docker(["kill", &self.name]).map(|_| ())
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        let _ = docker(["rm", "-f", "-v", &self.name]);
    }
}
