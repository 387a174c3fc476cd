//! The controller's listener: TCP, then TLS 1.3 with the configuration chosen from the client's
//! server name, then HTTP/1.1 into the matching router.
//!
//! A client asking for `enroll.controller.umbra` gets a handshake without client authentication
//! and only the enrollment routes; every other client must present a certificate of this CA at
//! the handshake (no certificate, a foreign, expired or revoked one: the handshake fails).
//! Connections and handshakes are bounded, and every task belongs to the server's `JoinSet`.
//! Until its handshake ends a connection is *pending*, admitted and accounted per source by
//! [`crate::admission`] (the decisions), with the deadlines here (the timers); an enrollment
//! connection, never authenticated, stays accounted there until it closes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use umbra_pki::{ClientAuth, ENROLL_SERVER_NAME};

use crate::admission::{Admission, Admit, ConnId, Limits, Pool, Source};
use crate::api::{self, Peer};
use crate::core::Controller;
use crate::error::ControllerError;
use crate::sessions::AuthBudget;

/// Authenticated connections (client certificate verified) served at once. Anonymous
/// connections are counted apart (see [`crate::admission`]), so they can never use these up.
/// How long an accepted connection may stay silent; a socket that sends nothing is also the
/// first to lose its slot to a newcomer when slots are short.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long, from accept, a client may take to send its whole ClientHello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// How long, from accept, a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to send request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// An enrollment connection's whole life, from accept.
const ENROLL_CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// A request body's whole arrival, from the request's start.
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(15);
/// The controller's own server certificate lifetime; it is re-issued every
/// [`SERVER_CERT_REFRESH`], long before it expires, without a restart.
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often the server certificate is re-issued.
const SERVER_CERT_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// ALPN protocols: HTTP/1.1 only.
pub const ALPN: &[&[u8]] = &[b"http/1.1"];

/// A running server.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds `listen` and starts serving. `advertise` is where clients reach the controllers:
    /// one `host:port`, or the comma-separated addresses of every controller sharing this one's
    /// database, which enrollment tokens and so identity files then carry, so that clients can
    /// fail over among them. If `None`, the bound address is what tokens and identity files
    /// name.
    pub async fn start(
        ctrl: Arc<Controller>,
        listen: SocketAddr,
        advertise: Option<String>,
    ) -> Result<Server, ControllerError> {
        // One address or several (`a:443,b:443`: every controller sharing this one's database),
        // in the canonical form tokens and identity files then carry; refused before binding.
        let advertise = advertise
            .map(|list| {
                list.parse::<umbra_pki::ControllerAddrs>()
                    .map(|l| l.to_string())
                    .map_err(|e| ControllerError::Invalid(format!("--advertise: {e}")))
            })
            .transpose()?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(ControllerError::io(listen.to_string()))?;
        let local_addr = listener
            .local_addr()
            .map_err(ControllerError::io(listen.to_string()))?;
        let advertise = advertise.unwrap_or_else(|| local_addr.to_string());
        // Off the runtime's threads: the store is blocking (PostgreSQL's client would refuse to
        // block inside the runtime).
        let (c, a) = (ctrl.clone(), advertise.clone());
        tokio::task::spawn_blocking(move || c.set_address(&a))
            .await
            .map_err(|e| ControllerError::Setup(format!("recording the address: {e}")))??;

        // With a shared store: learn the other controllers' commits as they happen.
        crate::core::shared::follow(&ctrl);
        let tls = Arc::new(ArcSwap::from_pointee(TlsConfigs::issue(&ctrl)?));
        let metrics = ctrl.metrics.clone();
        crate::metrics::collect(ctrl.config().metrics.as_ref(), &ctrl);
        let enroll_app = metrics.layer(api::enroll_router(ctrl.clone()));
        let main_app = metrics.layer(api::main_router(ctrl.clone()));
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let limits = ctrl.config().connections;
        let mut sinks = crate::sinks::spawn(&ctrl, &shutdown);
        let task = tokio::spawn(async move {
            let admission = Arc::new(Mutex::new(Admission::new(Limits::DEFAULT)));
            let authenticated = Arc::new(Mutex::new(AuthBudget::new(limits)));
            let mut conns = JoinSet::new();
            let mut refresh = tokio::time::interval(SERVER_CERT_REFRESH);
            refresh.tick().await;
            loop {
                let (tcp, remote) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = refresh.tick() => {
                        match TlsConfigs::issue(&ctrl) {
                            Ok(t) => tls.store(Arc::new(t)),
                            Err(e) => tracing::error!(error = %e, "cannot re-issue the server certificate"),
                        }
                        continue;
                    }
                    _ = token.cancelled() => break,
                };
                let shed = token.child_token();
                let Some(pending) = Pending::admit(&admission, remote, shed.clone()) else {
                    continue;
                };
                let (tls, authenticated) = (tls.load_full(), authenticated.clone());
                let (enroll_app, main_app) = (enroll_app.clone(), main_app.clone());
                let metrics = metrics.clone();
                conns.spawn(async move {
                    tokio::select! {
                        r = serve_conn(tcp, pending, &tls, (authenticated, &metrics), enroll_app, main_app) => {
                            if let Err(e) = r {
                                tracing::debug!(%remote, error = %e, "connection ended with an error");
                            }
                        }
                        // Shed for a newcomer, or the server is shutting down.
                        _ = shed.cancelled() => {}
                    }
                });
                while conns.try_join_next().is_some() {}
            }
            conns.shutdown().await;
            while sinks.join_next().await.is_some() {}
        });
        tracing::info!(%local_addr, %advertise, "controller listening");
        Ok(Server {
            local_addr,
            shutdown,
            task,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, ends every connection and waits for the tasks.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Waits until the server stops (it runs until `shutdown`).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// The two TLS configurations, swapped as a pair when the server certificate is re-issued.
struct TlsConfigs {
    enroll: Arc<rustls::ServerConfig>,
    main: Arc<rustls::ServerConfig>,
}

impl TlsConfigs {
    fn issue(ctrl: &Controller) -> Result<TlsConfigs, ControllerError> {
        // Peers check this certificate against their own clocks, so it is dated by the real one.
        let creds = ctrl
            .ca()
            .issue_server(SERVER_CERT_VALIDITY, umbra_clock::Clock::system().now())?;
        // Client certificates, though, are judged by the controller's own clock, like
        // everything else it decides.
        let clock = &ctrl.config().clock;
        let enroll =
            umbra_pki::server_config_with_clock(creds.clone(), ClientAuth::None, ALPN, clock)?;
        let main = umbra_pki::server_config_with_clock(
            creds,
            ClientAuth::Required {
                roots: vec![ctrl.ca().root_der().clone()],
                revoked: ctrl.revoked_serials(),
            },
            ALPN,
            clock,
        )?;
        Ok(TlsConfigs { enroll, main })
    }
}

/// A connection's place in [`Admission`] while it is anonymous; released when dropped, so every
/// way out of a connection task (error, timeout, shed, shutdown) gives the slot back.
struct Pending {
    admission: Arc<Mutex<Admission<CancellationToken>>>,
    id: ConnId,
    accepted: tokio::time::Instant,
}

impl Pending {
    /// Admits a new connection, closing the one it displaces; `None` if it is refused.
    fn admit(
        admission: &Arc<Mutex<Admission<CancellationToken>>>,
        remote: SocketAddr,
        shed: CancellationToken,
    ) -> Option<Pending> {
        let source = Source::of(remote.ip());
        let answer = lock(admission).admit(source, Instant::now(), shed);
        match answer {
            Admit::Accept { id, shed } => {
                if let Some(victim) = shed {
                    tracing::debug!(%remote, "slots short: a silent connection was shed");
                    victim.cancel();
                }
                Some(Pending {
                    admission: admission.clone(),
                    id,
                    accepted: tokio::time::Instant::now(),
                })
            }
            Admit::Refuse(why) => {
                tracing::debug!(%remote, ?why, "connection refused at accept");
                None
            }
        }
    }

    fn spoke(&self) {
        lock(&self.admission).spoke(self.id);
    }

    fn hello(&self, pool: Pool) -> Result<(), crate::admission::Refusal> {
        let shed = lock(&self.admission).hello(self.id, pool)?;
        if let Some(victim) = shed {
            tracing::debug!(
                ?pool,
                "handshakes short: the busiest source's oldest handshake was shed"
            );
            victim.cancel();
        }
        Ok(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        lock(&self.admission).release(self.id);
    }
}

/// The admission lock is held for a few map operations and never across an await; a panic
/// while holding it cannot leave the counts half-updated in a way worse than refusing.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn serve_conn(
    tcp: TcpStream,
    pending: Pending,
    tls: &TlsConfigs,
    (authenticated, metrics): (Arc<Mutex<AuthBudget>>, &crate::metrics::Metrics),
    enroll_app: axum::Router,
    main_app: axum::Router,
) -> Result<(), BoxError> {
    let _ = tcp.set_nodelay(true);
    let accepted = pending.accepted;
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(FIRST_BYTE_TIMEOUT, tcp.peek(&mut first))
        .await
        .map_err(|_| "nothing sent; closed")??;
    if n == 0 {
        return Ok(());
    }
    pending.spoke();
    let start = tokio::time::timeout_at(
        accepted + HELLO_TIMEOUT,
        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp),
    )
    .await
    .map_err(|_| "ClientHello too slow; closed")??;
    let enroll = start.client_hello().server_name() == Some(ENROLL_SERVER_NAME);
    let (pool, config) = if enroll {
        (Pool::Enroll, tls.enroll.clone())
    } else {
        (Pool::Main, tls.main.clone())
    };
    pending
        .hello(pool)
        .map_err(|why| format!("{why:?}; closed"))?;
    let tls = tokio::time::timeout_at(accepted + HANDSHAKE_TIMEOUT, start.into_stream(config))
        .await
        .map_err(|_| "handshake too slow; closed")??;
    // What the connection holds until it ends: an enrollment connection, never authenticated,
    // keeps its anonymous slot; an authenticated one moves to the authenticated budget.
    let (app, _anonymous, _slot): (_, Option<Pending>, Option<AuthSlot>) = if enroll {
        (enroll_app, Some(pending), None)
    } else {
        drop(pending);
        let peer = umbra_pki::peer_identity(tls.get_ref().1)?;
        let slot = AuthSlot::take(authenticated, &peer).map_err(|why| {
            metrics.refused(&why);
            format!("authenticated connections: {why:?}; closed")
        })?;
        (
            main_app.layer(axum::Extension(Peer(Arc::new(peer)))),
            None,
            Some(slot),
        )
    };
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let req = req.map(|b| axum::body::Body::new(Deadline::new(b, BODY_TIMEOUT)));
        app.clone().oneshot(req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(tls), service);
    if enroll {
        // An enrollment is one small request: the connection is closed at its deadline
        // whatever it is doing, so slow bodies cannot hold the anonymous slots.
        tokio::time::timeout_at(accepted + ENROLL_CONNECTION_TIMEOUT, conn)
            .await
            .map_err(|_| "enrollment connection past its deadline; closed")??;
    } else {
        conn.await?;
    }
    Ok(())
}

/// A request body that must have arrived whole within a deadline from the request's start: a
/// body trickled a byte at a time would otherwise hold its connection (and whatever the
/// handler buffered) for as long as the sender likes.
struct Deadline<B> {
    inner: B,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<B> Deadline<B> {
    fn new(inner: B, limit: Duration) -> Self {
        Deadline {
            inner,
            sleep: Box::pin(tokio::time::sleep(limit)),
        }
    }
}

impl<B> hyper::body::Body for Deadline<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, BoxError>>> {
        use std::future::Future;
        let this = self.get_mut();
        if let std::task::Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            return std::task::Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.sleep.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Some(Err(
                "the request body did not arrive in time".into()
            )));
        }
        std::task::Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// An authenticated connection's slot in the [`AuthBudget`], given back when dropped.
struct AuthSlot {
    budget: Arc<Mutex<AuthBudget>>,
    identity: String,
    agent: bool,
}

impl AuthSlot {
    fn take(
        budget: Arc<Mutex<AuthBudget>>,
        peer: &umbra_pki::PeerCert,
    ) -> Result<AuthSlot, crate::sessions::AuthRefusal> {
        let identity = peer.spiffe.to_string();
        let agent = peer.spiffe.kind() == umbra_policies::IdentityKind::Agent;
        lock(&budget).admit(&identity, agent)?;
        Ok(AuthSlot {
            budget,
            identity,
            agent,
        })
    }
}

impl Drop for AuthSlot {
    fn drop(&mut self) {
        lock(&self.budget).release(&self.identity, self.agent);
    }
}
