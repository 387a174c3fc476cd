//! `umbra run`: an agent in a sealed sandbox whose only network is this tunneler.
//!
//! The tunneler stays outside the sandbox and makes its listeners inside the sandbox's network
//! namespace, where nothing but `lo` exists. Names resolve through the sandbox's `/etc/hosts`
//! and a DNS responder inside, both fed from the same mappings the listeners come from, so a
//! grant or a revocation changes listeners, hosts and DNS together, live.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::task::AbortOnDropHandle;
use umbra_sandbox::events::{EventKind, EventSink};
use umbra_sandbox::{exit, Prepared, SandboxConfig, SandboxError};
use umbra_sdk::Context;
use umbra_tunneler::TunnelerConfig;

use crate::inside::{start_tunneler, HostsWriter, NameService, Namespace};

/// Connections the tunneler carries for one sandbox at once. Each costs the launcher a
/// descriptor and buffers; over the bound, the agent's connections wait in the kernel's backlog.
pub const SANDBOX_CONNECTIONS: usize = 512;

/// How to run one agent.
#[derive(Debug)]
pub struct RunOptions {
    /// The sandbox.
    pub sandbox: SandboxConfig,
    /// Where events go.
    pub events: EventSink,
    /// Kill the agent (and everything it started) after this long.
    pub timeout: Option<Duration>,
    /// Keep the agent running (without network) when its identity is revoked.
    pub keep_on_revoke: bool,
    /// The tunneler's settings (its `listen` and `on_denied` are set here).
    pub tunnel: TunnelerConfig,
}

/// How the agent's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The agent exited (or was killed by a signal it did not get from us).
    Exited,
    /// `--timeout` passed.
    Timeout,
    /// The identity was revoked (kill switch).
    Revoked,
    /// The memory limit was exceeded.
    MemoryLimit,
    /// `umbra run` was interrupted (SIGINT or SIGTERM).
    Interrupted,
}

/// The result of [`run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// `umbra run`'s exit code.
    pub code: i32,
    /// Why.
    pub ending: Ending,
    /// The agent's standard output (at most 16 MiB), when it was captured.
    pub stdout: Option<Vec<u8>>,
    /// How long the agent ran.
    pub elapsed: Duration,
}

/// Why `umbra run` could not run the agent at all.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The sandbox could not be built.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The tunneler could not start or never heard from the controller.
    #[error("{0}")]
    Tunnel(String),
}

/// Runs the agent to its end. Every path out of here has killed the sandbox's processes and
/// removed its cgroup and state.
pub async fn run(ctx: Context, opts: RunOptions) -> Result<RunOutcome, RunError> {
    let id = opts.sandbox.id.clone();
    let command = opts.sandbox.argv.first().cloned().unwrap_or_default();
    let prepared = Prepared::new(opts.sandbox).await?;
    // The agent's connections are the launcher's descriptors. The sandbox's first process is
    // already running with the limit we were given, which is what the agent inherits; from
    // here on the launcher may use all the hard limit allows.
    match umbra_sandbox::nofile::raise() {
        Ok(n) => tracing::debug!(soft = n, "descriptor limit raised"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor limit"),
    }
    let netns = prepared.netns().clone();
    let hosts_path = prepared.hosts_path().to_path_buf();

    let ns: Arc<dyn Namespace> = Arc::new(netns.clone());
    // On the early returns from here on, the tunneler and the sandbox are stopped by their
    // owners' `Drop`.
    let tunneler = start_tunneler(
        ctx,
        opts.tunnel,
        ns.clone(),
        &opts.events,
        SANDBOX_CONNECTIONS,
    )
    .await
    .map_err(RunError::Tunnel)?;
    let mut refused = tunneler.refused();
    // The file is bind-mounted into the sandbox: written in place, so its inode stays.
    let write: HostsWriter = {
        let id = id.clone();
        Box::new(move |pairs| {
            if let Err(e) = std::fs::write(&hosts_path, umbra_sandbox::hosts_file(&id, pairs)) {
                tracing::warn!(error = %e, "cannot update the sandbox's hosts file");
            }
        })
    };
    // Owned here: whichever way this function returns, the responder and the hosts writer end
    // with it (the tunneler and the sandbox own theirs likewise).
    let names = NameService::start(tunneler.mappings(), &*ns, opts.events.clone(), write)
        .map_err(|e| RunError::Tunnel(format!("cannot start the sandbox's DNS responder: {e}")))?;

    let started = Instant::now();
    let mut running = prepared.start().await?;
    opts.events.emit(EventKind::Started { command });
    let stdout = running.take_stdout().map(|mut out| {
        AbortOnDropHandle::new(tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = Vec::new();
            let _ = (&mut out).take(16 << 20).read_to_end(&mut buf).await;
            buf
        }))
    });

    let timeout = async {
        match opts.timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let revoked = async {
        loop {
            if *refused.borrow_and_update() {
                return;
            }
            if refused.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::pin!(timeout, revoked);
    let mut revoked_seen = false;
    let (code, ending) = loop {
        tokio::select! {
            r = running.wait() => {
                let code = r.unwrap_or(exit::SETUP);
                break if running.cgroup().oom_killed() && code == 128 + SIGKILL {
                    opts.events.emit(EventKind::Limit { limit: "memory".into() });
                    (exit::MEMORY_LIMIT, Ending::MemoryLimit)
                } else {
                    (code, Ending::Exited)
                };
            }
            _ = &mut timeout => {
                running.kill();
                let _ = running.wait().await;
                let after_ms = opts.timeout.map(|t| t.as_millis() as u64).unwrap_or(0);
                opts.events.emit(EventKind::Timeout { after_ms });
                break (exit::TIMEOUT, Ending::Timeout);
            }
            _ = &mut revoked, if !revoked_seen => {
                revoked_seen = true;
                opts.events.emit(EventKind::Revoked { terminated: !opts.keep_on_revoke });
                if !opts.keep_on_revoke {
                    running.kill();
                    let _ = running.wait().await;
                    break (exit::REVOKED, Ending::Revoked);
                }
            }
            _ = interrupted() => {
                running.kill();
                let _ = running.wait().await;
                break (130, Ending::Interrupted);
            }
        }
    };
    if running.cgroup().pids_limit_hit() {
        opts.events.emit(EventKind::Limit {
            limit: "pids".into(),
        });
    }
    let elapsed = started.elapsed();
    running.kill();
    tracing::debug!(?elapsed, code, ?ending, "agent ended");
    names.stop();
    opts.events.emit(EventKind::Exited { code });
    tunneler.shutdown().await;
    running.shutdown().await;
    let stdout = match stdout {
        Some(task) => tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .ok()
            .and_then(Result::ok),
        None => None,
    };
    Ok(RunOutcome {
        code,
        ending,
        stdout,
        elapsed,
    })
}

/// The signal the kernel's OOM killer sends.
const SIGKILL: i32 = 9;

/// Waits for SIGINT or SIGTERM.
pub async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
