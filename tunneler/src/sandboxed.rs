//! `umbra run`: an agent in a sealed sandbox whose only network is this tunneler.
//!
//! The tunneler stays outside the sandbox and makes its listeners inside the sandbox's network
//! namespace, where nothing but `lo` exists. Names resolve through the sandbox's `/etc/hosts`
//! and a DNS responder inside, both fed from the same mappings the listeners come from, so a
//! grant or a revocation changes listeners, hosts and DNS together, live.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use umbra_sandbox::dns::{self, Outcome};
use umbra_sandbox::events::{EventKind, EventSink};
use umbra_sandbox::{exit, Prepared, SandboxConfig, SandboxError};
use umbra_sdk::Context;

use crate::plan::Mapping;
use crate::run::{Tunneler, TunnelerConfig};

/// Where the DNS responder listens inside the sandbox.
pub const DNS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)), 53);

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

/// The names the sandbox resolves, shared by the hosts writer and the DNS responder.
type Names = Arc<RwLock<HashMap<String, Ipv4Addr>>>;

fn names_of(list: &[Mapping]) -> Vec<(String, IpAddr)> {
    let mut out: Vec<(String, IpAddr)> = list
        .iter()
        .filter(|m| m.intercept.ip().is_none())
        .map(|m| (m.intercept.host().to_ascii_lowercase(), m.listen.ip()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Runs the agent to its end. Every path out of here has killed the sandbox's processes and
/// removed its cgroup and state.
pub async fn run(ctx: Context, opts: RunOptions) -> Result<RunOutcome, RunError> {
    let id = opts.sandbox.id.clone();
    let command = opts.sandbox.argv.first().cloned().unwrap_or_default();
    let prepared = Prepared::new(opts.sandbox).await?;
    let netns = prepared.netns().clone();
    let hosts_path = prepared.hosts_path().to_path_buf();

    let mut tcfg = opts.tunnel;
    let ns = netns.clone();
    tcfg.listen = Some(Arc::new(move |addr| ns.listen_tcp(addr)));
    let events = opts.events.clone();
    tcfg.on_denied = Some(Arc::new(move |service, e| {
        events.emit(EventKind::DialDenied {
            service: service.to_string(),
            reason: e.to_string(),
        })
    }));
    tcfg.hosts_file = None;
    let tunneler = Tunneler::start(ctx, tcfg)
        .await
        .map_err(|e| RunError::Tunnel(e.to_string()))?;
    let mut mappings = tunneler.mappings();
    let mut refused = tunneler.refused();

    // The agent starts only once the tunneler knows what it may reach.
    let first = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if *refused.borrow() {
                return Err("the controller refused this identity".to_string());
            }
            tokio::select! {
                r = mappings.changed() => {
                    r.map_err(|_| "the tunneler stopped".to_string())?;
                    return Ok(());
                }
                r = refused.changed() => {
                    r.map_err(|_| "the tunneler stopped".to_string())?;
                }
            }
        }
    })
    .await;
    match first {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tunneler.shutdown().await;
            return Err(RunError::Tunnel(e));
        }
        Err(_) => {
            tunneler.shutdown().await;
            return Err(RunError::Tunnel(
                "no answer from the controller within 15 s".into(),
            ));
        }
    }

    let names: Names = Arc::default();
    publish_names(&id, &hosts_path, &names, &mappings.borrow_and_update());
    let dns_socket = netns
        .bind_udp(DNS_ADDR)
        .and_then(|s| {
            s.set_nonblocking(true)?;
            UdpSocket::from_std(s)
        })
        .map_err(|e| RunError::Tunnel(format!("cannot start the sandbox's DNS responder: {e}")))?;
    let dns_task = tokio::spawn(serve_dns(dns_socket, names.clone(), opts.events.clone()));
    let names_task = {
        let (id, hosts_path, names) = (id.clone(), hosts_path.clone(), names.clone());
        let mut mappings = mappings.clone();
        tokio::spawn(async move {
            while mappings.changed().await.is_ok() {
                let list = mappings.borrow_and_update().clone();
                publish_names(&id, &hosts_path, &names, &list);
            }
        })
    };

    let started = Instant::now();
    let mut running = match prepared.start().await {
        Ok(r) => r,
        Err(e) => {
            dns_task.abort();
            names_task.abort();
            tunneler.shutdown().await;
            return Err(e.into());
        }
    };
    opts.events.emit(EventKind::Started { command });
    let stdout = running.take_stdout().map(|mut out| {
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = Vec::new();
            let _ = (&mut out).take(16 << 20).read_to_end(&mut buf).await;
            buf
        })
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
    opts.events.emit(EventKind::Exited { code });
    dns_task.abort();
    names_task.abort();
    tunneler.shutdown().await;
    drop(running);
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

fn publish_names(id: &str, hosts_path: &std::path::Path, names: &Names, list: &[Mapping]) {
    let pairs = names_of(list);
    if let Ok(mut n) = names.write() {
        n.clear();
        for (name, ip) in &pairs {
            if let IpAddr::V4(v4) = ip {
                n.insert(name.clone(), *v4);
            }
        }
    }
    // Written in place: the file is bind-mounted into the sandbox, so its inode must stay.
    if let Err(e) = std::fs::write(hosts_path, umbra_sandbox::hosts_file(id, &pairs)) {
        tracing::warn!(error = %e, "cannot update the sandbox's hosts file");
    }
}

/// Answers the sandbox's DNS queries from `names`; never forwards anything.
async fn serve_dns(socket: UdpSocket, names: Names, events: EventSink) {
    let mut buf = [0u8; 1500];
    // A burst of refused names becomes a bounded number of events, one per name per second
    // (a resolver asks for A and AAAA, and retries).
    let mut window = (Instant::now(), std::collections::HashSet::<String>::new());
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let lookup = |name: &str| names.read().ok().and_then(|m| m.get(name).copied());
        let Some((reply, outcome)) = dns::answer(&buf[..n], lookup) else {
            continue;
        };
        let _ = socket.send_to(&reply, peer).await;
        if let Outcome::Refused(name) = outcome {
            if window.0.elapsed() > Duration::from_secs(1) {
                window = (Instant::now(), Default::default());
            }
            if window.1.len() < 50 && window.1.insert(name.clone()) {
                events.emit(EventKind::DnsRefused { name });
            }
        }
    }
}
