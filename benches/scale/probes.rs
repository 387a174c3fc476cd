//! What the bench measures, as a user would see it: an echoed byte through a tunneler's
//! listener, a live TCP connection cut by a revocation, a listener appearing after a grant,
//! and every watcher's view changing after one policy. The admin's calls go through the
//! management API the CLI uses, from this process, so that a timer starts when the request
//! is sent rather than when a CLI process has started.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use umbra_pki::IdentityFile;
use umbra_policies::{IdentityKind, Name};
use umbra_proto::api::{CreateIdentityRequest, TokenResponse};
use umbra_sdk::ControllerClient;

use crate::procs::{self, Deployment, Proc};

/// How often the probes try again: the resolution of the grant and tunnel-start figures.
const POLL: Duration = Duration::from_millis(1);

/// An echo server on loopback, in this process: every service of the document points here.
pub async fn echo_server() -> Result<SocketAddr, String> {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("echo bind: {e}"))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// One byte through `addr` and back, within 5 s; the connection, still open, if it came back.
async fn echo_once(addr: SocketAddr) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let _ = s.set_nodelay(true);
    s.write_all(b"x").await.ok()?;
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
        Ok(Ok(1)) => Some(s),
        _ => None,
    }
}

/// Tries [`echo_once`] every millisecond until it succeeds or `bound` passes; when it
/// succeeded, and the open connection.
pub async fn until_echo(addr: SocketAddr, bound: Duration) -> Option<(Instant, TcpStream)> {
    let start = Instant::now();
    while start.elapsed() < bound {
        if let Some(s) = echo_once(addr).await {
            return Some((Instant::now(), s));
        }
        tokio::time::sleep(POLL).await;
    }
    None
}

/// The admin's management client.
pub struct Admin {
    client: ControllerClient,
    addr: String,
}

impl Admin {
    /// A client for the deployment's first admin.
    pub fn new(dep: &Deployment) -> Result<Admin, String> {
        let file = IdentityFile::load(&dep.admin).map_err(|e| format!("admin.json: {e}"))?;
        let client = ControllerClient::for_identity(&file, Some(&dep.ctrl_addr))
            .map_err(|e| format!("admin client: {e}"))?;
        Ok(Admin {
            client,
            addr: dep.ctrl_addr.clone(),
        })
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> Result<(), String> {
        self.client
            .call::<serde_json::Value>(Method::POST, path, Some(&body))
            .await
            .map(|_| ())
            .map_err(|e| format!("POST {path}: {e}"))
    }

    /// Creates an agent with `roles`; its enrollment token.
    pub async fn create_agent(&self, name: &str, roles: &[&str]) -> Result<String, String> {
        let name_of = |s: &str| Name::new(s).map_err(|e| e.to_string());
        let req = CreateIdentityRequest {
            name: name_of(name)?,
            kind: IdentityKind::Agent,
            roles: roles.iter().map(|r| name_of(r)).collect::<Result<_, _>>()?,
            token_ttl_secs: None,
        };
        let tok: TokenResponse = self
            .client
            .call(Method::POST, "/v1/identities", Some(&req))
            .await
            .map_err(|e| format!("create {name}: {e}"))?;
        Ok(tok.token)
    }

    /// A new enrollment token for an identity the document created.
    pub async fn token(&self, name: &str) -> Result<String, String> {
        let tok: TokenResponse = self
            .client
            .call(
                Method::POST,
                &format!("/v1/identities/{name}/token"),
                Some(&serde_json::json!({ "token_ttl_secs": 7200 })),
            )
            .await
            .map_err(|e| format!("token for {name}: {e}"))?;
        Ok(tok.token)
    }

    /// Enrolls `name` with a fresh token; the identity file, also written to the scratch
    /// directory for a tunneler.
    pub async fn enroll(&self, name: &str, dir: &std::path::Path) -> Result<Enrolled, String> {
        let token = self.token(name).await?;
        self.enroll_with(name, &token, dir).await
    }

    /// Enrolls with a token in hand.
    pub async fn enroll_with(
        &self,
        name: &str,
        token: &str,
        dir: &std::path::Path,
    ) -> Result<Enrolled, String> {
        let file = umbra_sdk::enroll(token, Some(&self.addr))
            .await
            .map_err(|e| format!("enroll {name}: {e}"))?;
        let path = dir.join(format!("{name}.json"));
        file.save(&path).map_err(|e| format!("save {name}: {e}"))?;
        Ok(Enrolled {
            name: name.to_owned(),
            path,
            file,
        })
    }

    /// Waits until an identity named `name` exists, checking every second, within `bound`.
    pub async fn wait_for(&self, name: &str, bound: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < bound {
            let r = self
                .client
                .call::<serde_json::Value>(
                    Method::GET,
                    &format!("/v1/identities/{name}"),
                    None::<&()>,
                )
                .await;
            if r.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        false
    }

    /// Revokes an identity.
    pub async fn revoke(&self, name: &str) -> Result<(), String> {
        let path = format!("/v1/identities/{name}/revoke");
        self.client
            .call::<serde_json::Value>(Method::POST, &path, None::<&()>)
            .await
            .map(|_| ())
            .map_err(|e| format!("POST {path}: {e}"))
    }

    /// Deletes an identity.
    pub async fn delete(&self, name: &str) -> Result<(), String> {
        self.client
            .call::<serde_json::Value>(
                Method::DELETE,
                &format!("/v1/identities/{name}"),
                None::<&()>,
            )
            .await
            .map(|_| ())
            .map_err(|e| format!("delete {name}: {e}"))
    }

    /// A Dial policy `name` from one identity selector to one service selector.
    pub async fn grant(&self, name: &str, identity: &str, service: &str) -> Result<(), String> {
        self.post(
            "/v1/policies",
            serde_json::json!({ "name": name, "identities": [identity], "services": [service] }),
        )
        .await
    }

    /// Enrolls every name, `concurrency` at a time, in order.
    pub async fn enroll_many(
        self: &Arc<Self>,
        names: Vec<String>,
        dir: &std::path::Path,
        concurrency: usize,
    ) -> Vec<Result<Enrolled, String>> {
        let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let tasks: Vec<_> = names
            .into_iter()
            .map(|name| {
                let (admin, sem, dir) = (self.clone(), sem.clone(), dir.to_owned());
                tokio::spawn(async move {
                    let _permit = sem.acquire().await.map_err(|e| e.to_string())?;
                    admin.enroll(&name, &dir).await
                })
            })
            .collect();
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.map_err(|e| e.to_string()).and_then(|r| r));
        }
        out
    }
}

/// An enrolled identity.
pub struct Enrolled {
    /// Its name.
    pub name: String,
    /// Its identity file on disk.
    pub path: PathBuf,
    /// The same, in memory.
    pub file: IdentityFile,
}

/// One revocation run: a tunneler started for a fresh agent, a TCP connection through it, the
/// agent revoked.
pub struct Revocation {
    /// `umbra tunnel` spawned → first byte echoed through its listener.
    pub start: Duration,
    /// Revoke request sent → the connection reads end of stream or an error.
    pub cut: Duration,
    /// Revoke request sent → its answer received.
    pub answered: Duration,
    /// Answer received → the connection ended (zero if it ended first).
    pub after_answer: Duration,
}

/// Starts a tunneler for `agent`, waits for a byte echoed through `intercept` (the tunnel
/// start figure), holds that connection, revokes the agent and times the connection's end.
///
/// One tunneler at a time: each agent is revoked once, so each needs a tunneler of its own,
/// and that start is the tunnel-start sample; a hundred tunnelers at once would measure
/// a crowded machine instead.
pub async fn revoke_once(
    dep: &Deployment,
    admin: &Admin,
    agent: &Enrolled,
    intercept: SocketAddr,
) -> Result<Revocation, String> {
    let spawned = Instant::now();
    let tunnel: Proc = dep.tunnel(&agent.path, &agent.name)?;
    let (served, mut conn) = until_echo(intercept, Duration::from_secs(30))
        .await
        .ok_or_else(|| format!("{}: no echo through the tunneler within 30 s", agent.name))?;
    let start = served - spawned;
    // The first echo comes as soon as that one listener is up; an agent granted thousands of
    // services is still binding the rest, on the same two cores. The revocation is timed once
    // the tunneler has set up its whole view (it prints its count then), so that the figure is
    // the revocation's and not the neighbour's start-up.
    settled(&dep.tunnel_log(&agent.name), Duration::from_secs(30)).await;
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    });
    let sent = Instant::now();
    admin.revoke(&agent.name).await?;
    let answered_at = Instant::now();
    let cut = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .map_err(|_| format!("{}: the connection was still open 10 s after", agent.name))?
        .map_err(|e| e.to_string())?;
    drop(tunnel);
    Ok(Revocation {
        start,
        cut: cut - sent,
        answered: answered_at - sent,
        after_answer: cut.saturating_duration_since(answered_at),
    })
}

/// Waits (at most `limit`) until a tunneler's output says it serves its whole view.
async fn settled(log: &std::path::Path, limit: Duration) {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        let text = tokio::fs::read_to_string(log).await.unwrap_or_default();
        if text.lines().any(|l| l.starts_with("services: ")) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Grants `GRANT_AGENT` (whose tunneler is running) service `service`; from the request sent
/// to a byte echoed through the new listener at `intercept`.
pub async fn grant_once(
    admin: &Admin,
    policy: &str,
    service: &str,
    intercept: SocketAddr,
) -> Result<Duration, String> {
    let poll = tokio::spawn(until_echo(intercept, Duration::from_secs(20)));
    let sent = Instant::now();
    admin
        .grant(
            policy,
            &format!("@{}", crate::doc::GRANT_AGENT),
            &format!("@{service}"),
        )
        .await?;
    let served = poll
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{service}: no echo within 20 s of the grant"))?;
    Ok(served.0.saturating_duration_since(sent))
}

/// What the fan-out measured.
pub struct FanOut {
    /// Watchers asked for.
    pub asked: usize,
    /// Watchers whose watch opened and delivered a first view.
    pub watching: usize,
    /// Why the first watcher that could not watch could not, if any.
    pub refused: Option<String>,
    /// Watchers that saw the new service.
    pub updated: usize,
    /// Grant sent → the last watching watcher saw the new service (if all did).
    pub all: Option<Duration>,
    /// The median watcher's time.
    pub p50: Option<Duration>,
    /// The controller's CPU seconds from the grant until the last watcher saw it (or gave up).
    pub cpu: f64,
    /// The controller's memory (RSS, peak) with every watch open.
    pub controller: Option<(f64, f64)>,
}

/// Opens an edge-view watch for each identity (an SDK context each, in this process), then
/// grants their common role [`crate::doc::FAN_SERVICE`] and times every view's update.
pub async fn fan_out(admin: &Admin, ctrl_pid: u32, identities: Vec<IdentityFile>) -> FanOut {
    enum Event {
        Ready(Result<(), String>),
        Seen(Instant),
    }
    let asked = identities.len();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let open = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for file in identities {
        let (tx, open) = (tx.clone(), open.clone());
        tasks.spawn(async move {
            let ctx = match umbra_sdk::Context::new(file) {
                Ok(c) => c,
                Err(e) => return drop(tx.send(Event::Ready(Err(e.to_string())))),
            };
            let permit = open.acquire_owned().await;
            let opened = async {
                let mut w = ctx.watch_edge().await.map_err(|e| e.to_string())?;
                match w.next().await {
                    Ok(Some(_)) => Ok(w),
                    Ok(None) => Err("the watch ended before its first view".to_owned()),
                    Err(e) => Err(e.to_string()),
                }
            };
            let opened = tokio::time::timeout(Duration::from_secs(30), opened)
                .await
                .unwrap_or_else(|_| Err("no first view within 30 s".to_owned()));
            drop(permit);
            let mut w = match opened {
                Ok(w) => w,
                Err(e) => return drop(tx.send(Event::Ready(Err(e)))),
            };
            let _ = tx.send(Event::Ready(Ok(())));
            while let Ok(Some(view)) = w.next().await {
                if view
                    .services
                    .iter()
                    .any(|s| s.name.as_str() == crate::doc::FAN_SERVICE)
                {
                    let _ = tx.send(Event::Seen(Instant::now()));
                    break;
                }
            }
            // Keep the context (and its watch) until the bench is done with every watcher.
            std::future::pending::<()>().await;
        });
    }
    drop(tx);
    let mut out = FanOut {
        asked,
        watching: 0,
        refused: None,
        updated: 0,
        all: None,
        p50: None,
        cpu: 0.0,
        controller: None,
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut answered = 0;
    while answered < asked {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(Event::Ready(Ok(())))) => out.watching += 1,
            Ok(Some(Event::Ready(Err(e)))) => {
                out.refused.get_or_insert(e);
            }
            Ok(Some(Event::Seen(_))) => {}
            Ok(None) | Err(_) => break,
        }
        answered += 1;
    }
    procs::settle(ctrl_pid, Duration::from_secs(60)).await;
    let cpu0 = procs::cpu_secs(ctrl_pid);
    let sent = Instant::now();
    if let Err(e) = admin
        .grant(
            "fan-grant",
            &format!("#{}", crate::doc::FAN_ROLE),
            &format!("@{}", crate::doc::FAN_SERVICE),
        )
        .await
    {
        out.refused.get_or_insert(e);
        return out;
    }
    let mut seen = Vec::with_capacity(out.watching);
    let deadline = sent + Duration::from_secs(60);
    while seen.len() < out.watching {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(Event::Seen(at))) => seen.push(at - sent),
            Ok(Some(Event::Ready(_))) => {}
            Ok(None) | Err(_) => break,
        }
    }
    out.cpu = procs::cpu_secs(ctrl_pid) - cpu0;
    out.controller = procs::memory_mib(ctrl_pid);
    out.updated = seen.len();
    seen.sort();
    out.p50 = seen.get(seen.len() / 2).copied();
    if out.watching > 0 && seen.len() == out.watching {
        out.all = seen.last().copied();
    }
    tasks.shutdown().await;
    out
}
