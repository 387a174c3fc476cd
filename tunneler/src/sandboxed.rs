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

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use umbra_sandbox::dns::{self, Outcome};
use umbra_sandbox::events::{EventKind, EventSink, EventWindow};
use umbra_sandbox::{exit, Prepared, SandboxConfig, SandboxError};
use umbra_sdk::Context;

use crate::accept::{accept_with_backoff, AcceptBackoff};
use crate::plan::Mapping;
use crate::run::{Tunneler, TunnelerConfig};

/// Where the DNS responder listens inside the sandbox.
pub const DNS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)), 53);

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
    // The agent's connections are the launcher's descriptors. The sandbox's first process is
    // already running with the limit we were given, which is what the agent inherits; from
    // here on the launcher may use all the hard limit allows.
    match umbra_sandbox::nofile::raise() {
        Ok(n) => tracing::debug!(soft = n, "descriptor limit raised"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor limit"),
    }
    let netns = prepared.netns().clone();
    let hosts_path = prepared.hosts_path().to_path_buf();

    let mut tcfg = opts.tunnel;
    tcfg.max_connections = tcfg.max_connections.min(SANDBOX_CONNECTIONS);
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
    let dns_tcp = netns
        .listen_tcp(DNS_ADDR)
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|e| RunError::Tunnel(format!("cannot start the sandbox's DNS responder: {e}")))?;
    let refused_names = Arc::new(DnsAudit::new(opts.events.clone()));
    let dns_task = {
        let udp = serve_dns(dns_socket, names.clone(), refused_names.clone());
        let tcp = serve_dns_tcp(dns_tcp, names.clone(), refused_names.clone());
        tokio::spawn(async move {
            tokio::join!(udp, tcp);
        })
    };
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
    dns_task.abort();
    refused_names.flush();
    opts.events.emit(EventKind::Exited { code });
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

/// Refused and malformed queries become events, a bounded number of them: one per name (as
/// asked) per second, at most 50 a second (a resolver asks for A and AAAA, and retries, over UDP
/// and TCP; an agent encoding data in names asks as fast as it can).
struct DnsAudit {
    events: EventSink,
    window: std::sync::Mutex<EventWindow>,
}

impl DnsAudit {
    fn new(events: EventSink) -> DnsAudit {
        DnsAudit {
            events,
            window: std::sync::Mutex::new(EventWindow::new(Duration::from_secs(1), 50)),
        }
    }

    fn report(&self, outcome: Outcome) {
        let (key, kind) = match outcome {
            Outcome::Refused(name) => (format!("refused {name}"), EventKind::DnsRefused { name }),
            Outcome::Malformed { reason, name } => (
                format!("malformed {reason} {}", name.as_deref().unwrap_or("")),
                EventKind::DnsMalformed {
                    reason: reason.to_string(),
                    name,
                },
            ),
            Outcome::Answered(_) | Outcome::NoData(_) => return,
        };
        let now = Instant::now();
        let (admitted, summary) = match self.window.lock() {
            Ok(mut w) => {
                let admitted = w.admit(now, &key);
                (admitted, w.summary(now, false))
            }
            Err(_) => (false, None),
        };
        self.summarise(summary);
        if admitted {
            self.events.emit(kind);
        }
    }

    /// Writes how many events were suppressed, if any: a flood of refused names stays visible
    /// as a count even where its names are not all written.
    fn summarise(&self, count: Option<u64>) {
        if let Some(count) = count {
            self.events.emit(EventKind::Suppressed {
                what: "dns".into(),
                count,
            });
        }
    }

    /// At the end of the sandbox: says what is left to say.
    fn flush(&self) {
        let count = match self.window.lock() {
            Ok(mut w) => w.summary(Instant::now(), true),
            Err(_) => None,
        };
        self.summarise(count);
    }
}

/// Answers one query from `names`: `None` for input that is not DNS at all.
fn answer_from(names: &Names, query: &[u8]) -> Option<(Vec<u8>, Outcome)> {
    let lookup = |name: &str| names.read().ok().and_then(|m| m.get(name).copied());
    dns::answer(query, lookup)
}

/// Answers the sandbox's DNS queries over UDP from `names`; never forwards anything.
async fn serve_dns(socket: UdpSocket, names: Names, refused: Arc<DnsAudit>) {
    let mut buf = [0u8; 1500];
    let mut backoff = AcceptBackoff::new();
    loop {
        // A failing socket must not spin the launcher on the agent's behalf.
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => {
                backoff.succeeded();
                x
            }
            Err(e) => {
                tokio::time::sleep(backoff.failed(&e)).await;
                continue;
            }
        };
        let Some((reply, outcome)) = answer_from(&names, &buf[..n]) else {
            continue;
        };
        let _ = socket.send_to(&reply, peer).await;
        refused.report(outcome);
    }
}

/// Connections the agent may hold open to the TCP side of its DNS responder at once.
const DNS_TCP_CONNECTIONS: usize = 16;
/// How long a DNS-over-TCP connection may sit without a complete query (a stub resolver sends
/// its query at once; one that does not is holding a slot).
const DNS_TCP_IDLE: Duration = Duration::from_secs(5);
/// How long one DNS-over-TCP connection may live, however busy: a slot is lent, not given.
const DNS_TCP_LIFETIME: Duration = Duration::from_secs(30);
/// The largest query taken over TCP (a query names one host; anything longer is not one).
const DNS_TCP_MAX_QUERY: usize = 1500;

/// The same answers over TCP (RFC 7766: two-byte length, then the message), for resolvers that
/// use it (`options use-vc`, `dig +tcp`, retries after truncation). Bounded in connections, idle
/// time, lifetime and query size, since the agent drives it. A slot is taken before `accept`:
/// over the bound, connections wait in the kernel's backlog, so a flood of half-open connections
/// costs the launcher nothing (closing the newest at once instead let the agent make the
/// launcher accept and close as fast as it could reconnect).
async fn serve_dns_tcp(listener: tokio::net::TcpListener, names: Names, refused: Arc<DnsAudit>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(DNS_TCP_CONNECTIONS));
    let mut backoff = AcceptBackoff::new();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (conn, _) = accept_with_backoff(&mut backoff, "dns/tcp", || listener.accept()).await;
        let (names, refused) = (names.clone(), refused.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(DNS_TCP_LIFETIME, serve_dns_conn(conn, &names, &refused))
                .await;
        });
    }
}

/// Answers the queries of one DNS-over-TCP connection until it is idle, ends or errs.
async fn serve_dns_conn(mut conn: tokio::net::TcpStream, names: &Names, refused: &DnsAudit) {
    let mut buf = vec![0u8; DNS_TCP_MAX_QUERY];
    loop {
        let query = async {
            let mut len = [0u8; 2];
            conn.read_exact(&mut len).await?;
            let len = usize::from(u16::from_be_bytes(len));
            if len > DNS_TCP_MAX_QUERY {
                return Err(std::io::ErrorKind::InvalidData.into());
            }
            conn.read_exact(&mut buf[..len]).await?;
            Ok::<usize, std::io::Error>(len)
        };
        let Ok(Ok(len)) = tokio::time::timeout(DNS_TCP_IDLE, query).await else {
            return;
        };
        let Some((reply, outcome)) = answer_from(names, &buf[..len]) else {
            return;
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(2 + reply.len());
        framed.extend_from_slice(&n.to_be_bytes());
        framed.extend_from_slice(&reply);
        if conn.write_all(&framed).await.is_err() {
            return;
        }
        refused.report(outcome);
    }
}
