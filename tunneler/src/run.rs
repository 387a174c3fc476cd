//! The running tunneler: follow the view, reconcile listeners, carry connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::AbortOnDropHandle;
use umbra_proto::api::EdgeView;
use umbra_proto::edge::EdgeWatchDecoder;
use umbra_proto::follow::{WatchEnd, WatchFollower};
use umbra_sdk::{Context, ControllerClient, Early, Meter, SdkError};

use crate::accept::{accept_with_backoff, AcceptBackoff};
use crate::addresses::AddressBook;
use crate::lanes::Lanes;
use crate::metrics::ByteMeter;
use crate::plan::{desired, Mapping};

/// How the tunneler runs.
#[derive(Clone)]
pub struct TunnelerConfig {
    /// Controller addresses (one `host:port` or a comma-separated list), if not the identity
    /// file's. Informational: the tunneler talks to the controllers its [`Context`] was made
    /// with (`Context::with_controller`).
    pub controller: Option<String>,
    /// Keep this file updated with `/etc/hosts` lines for the names it serves.
    pub hosts_file: Option<PathBuf>,
    /// Connections carried at once, over all listeners; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// First loopback address for intercept names.
    pub name_base: std::net::Ipv4Addr,
    /// Makes the listening sockets; `None` binds in this process's own network namespace. The
    /// sandbox passes one that creates them inside the agent's namespace.
    pub listen: Option<ListenFn>,
    /// Told of every connection the router refused (denied or revoked), for audit.
    pub on_denied: Option<DeniedFn>,
    /// Lanes: threads, each with its own connection to each router (see
    /// [`Context::on_runtime`]). A new TCP connection goes to the lane carrying the fewest, so an
    /// interactive connection opened while a bulk transfer runs gets a thread of its own, on
    /// the tunneler and on the router, instead of waiting behind it. The first lane is the
    /// tunneler's own runtime. 1 disables them.
    pub lanes: usize,
    /// How long a lane keeps polling after it last moved bytes before its thread sleeps (see
    /// `umbra_transport::busy_poll`; only lanes on current-thread runtimes poll). Zero turns it off.
    pub busy_poll: std::time::Duration,
    /// Where to register the tunneler's metrics (see `umbra_metrics`); `None` counts nothing.
    pub metrics: Option<umbra_metrics::Registry>,
}

/// See [`TunnelerConfig::on_denied`]: the service and the SDK's error.
pub type DeniedFn = std::sync::Arc<dyn Fn(&str, &SdkError) + Send + Sync>;

/// Makes a listening socket at an address (see [`TunnelerConfig::listen`]).
pub type ListenFn =
    std::sync::Arc<dyn Fn(SocketAddr) -> std::io::Result<std::net::TcpListener> + Send + Sync>;

impl Default for TunnelerConfig {
    fn default() -> Self {
        TunnelerConfig {
            controller: None,
            hosts_file: None,
            max_connections: 4096,
            name_base: crate::addresses::NAME_BASE,
            listen: None,
            on_denied: None,
            lanes: 2,
            busy_poll: umbra_transport::busy_poll::DEFAULT_WINDOW,
            metrics: None,
        }
    }
}

impl std::fmt::Debug for TunnelerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelerConfig")
            .field("controller", &self.controller)
            .field("hosts_file", &self.hosts_file)
            .field("max_connections", &self.max_connections)
            .field("name_base", &self.name_base)
            .field("listen", &self.listen.as_ref().map(|_| "custom"))
            .field("lanes", &self.lanes)
            .field("busy_poll", &self.busy_poll)
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

/// Why the tunneler could not start.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// Talking to the controller failed at start-up.
    #[error(transparent)]
    Sdk(#[from] SdkError),
}

/// A running tunneler: the owner of its task. Dropping it stops the task (and so every
/// listener, carried connection and lane) at once, so an early return in its caller cannot leave
/// a tunneler running; [`Tunneler::shutdown`] does the same and waits until it is done.
#[derive(Debug)]
pub struct Tunneler {
    mappings: watch::Receiver<Vec<Mapping>>,
    refused: watch::Receiver<bool>,
    shutdown: CancellationToken,
    task: AbortOnDropHandle<()>,
}

impl Tunneler {
    /// Starts following the identity's view and serving its services.
    pub async fn start(ctx: Context, cfg: TunnelerConfig) -> Result<Tunneler, TunnelError> {
        // The context's client presents the newest certificate as the context renews it.
        let client = ctx.controller();
        let (tx, mappings) = watch::channel(Vec::new());
        let metrics = crate::metrics::Metrics::new(cfg.metrics.as_ref(), mappings.clone());
        let (refused_tx, refused) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let lanes_stop = CancellationToken::new();
        let lanes = Lanes::start(&ctx, cfg.lanes, cfg.busy_poll, &lanes_stop);
        let task = AbortOnDropHandle::new(tokio::spawn(async move {
            // The lanes' threads end with this task, however it ends.
            let _lanes = lanes_stop.drop_guard();
            let mut state = Listeners {
                lanes,
                book: AddressBook::with_base(cfg.name_base),
                active: BTreeMap::new(),
                limit: std::sync::Arc::new(Semaphore::new(cfg.max_connections)),
                tx,
                hosts_file: cfg.hosts_file,
                listen: cfg.listen,
                on_denied: cfg.on_denied,
                refused: refused_tx,
                metrics,
            };
            tokio::select! {
                _ = follow(client, &mut state) => {}
                _ = token.cancelled() => {}
            }
            state.clear().await;
        }));
        Ok(Tunneler {
            mappings,
            refused,
            shutdown,
            task,
        })
    }

    /// The current listeners; changes as grants change.
    pub fn mappings(&self) -> watch::Receiver<Vec<Mapping>> {
        self.mappings.clone()
    }

    /// Becomes `true` when the controller refuses this identity (revoked, disabled or deleted):
    /// every listener is gone by then. The sandbox's kill switch watches it.
    pub fn refused(&self) -> watch::Receiver<bool> {
        self.refused.clone()
    }

    /// Closes every listener and carried connection, and returns once they are closed.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Tunneler {
    fn drop(&mut self) {
        // The task is aborted by its handle; cancelling first lets a task that is between two
        // polls see the same ending either way.
        self.shutdown.cancel();
    }
}

/// One listener: dropping it cancels its token (ending the connections it carries, which watch
/// it) and aborts its accept loop, which owns the socket.
struct Active {
    mapping: Mapping,
    _cancel: DropGuard,
    task: AbortOnDropHandle<()>,
}

impl Active {
    /// Stops the listener and waits until its socket is closed.
    async fn close(self) -> Mapping {
        let Active {
            mapping,
            _cancel,
            mut task,
        } = self;
        drop(_cancel);
        // The accept loop owns the socket: once it has returned, nothing listens.
        let _ = (&mut task).await;
        mapping
    }
}

struct Listeners {
    lanes: Arc<Lanes>,
    book: AddressBook,
    active: BTreeMap<SocketAddr, Active>,
    limit: std::sync::Arc<Semaphore>,
    tx: watch::Sender<Vec<Mapping>>,
    hosts_file: Option<PathBuf>,
    listen: Option<ListenFn>,
    on_denied: Option<DeniedFn>,
    refused: watch::Sender<bool>,
    metrics: crate::metrics::Metrics,
}

impl Listeners {
    /// Makes the listeners match a view.
    async fn reconcile(&mut self, view: &EdgeView) {
        let (want, errors) = desired(view, &mut self.book);
        for e in errors {
            tracing::warn!(error = %e, "intercept not served");
        }
        let stale: Vec<SocketAddr> = self
            .active
            .iter()
            .filter(|(addr, a)| want.get(addr) != Some(&a.mapping))
            .map(|(addr, _)| *addr)
            .collect();
        for addr in stale {
            if let Some(active) = self.active.remove(&addr) {
                let m = active.close().await;
                tracing::info!(service = %m.service, listen = %m.listen, "listener removed");
            }
        }
        for (addr, m) in want {
            if self.active.contains_key(&addr) {
                continue;
            }
            let bound = match &self.listen {
                None => TcpListener::bind(addr).await,
                Some(f) => f(addr).and_then(|l| {
                    l.set_nonblocking(true)?;
                    TcpListener::from_std(l)
                }),
            };
            match bound {
                Ok(listener) => {
                    let token = CancellationToken::new();
                    tracing::info!(service = %m.service, intercept = %m.intercept, listen = %m.listen, "listening");
                    let task = AbortOnDropHandle::new(tokio::spawn(accept_loop(
                        listener,
                        m.clone(),
                        Arc::clone(&self.lanes),
                        self.limit.clone(),
                        token.clone(),
                        (self.on_denied.clone(), self.metrics.clone()),
                    )));
                    let active = Active {
                        mapping: m,
                        _cancel: token.drop_guard(),
                        task,
                    };
                    self.active.insert(addr, active);
                }
                Err(e) => {
                    tracing::warn!(service = %m.service, listen = %addr, error = %e, "cannot listen")
                }
            }
        }
        self.publish();
    }

    fn publish(&self) {
        let list: Vec<Mapping> = self.active.values().map(|a| a.mapping.clone()).collect();
        if let Some(path) = &self.hosts_file {
            // Public data (names and loopback addresses), so 0644; replaced atomically so a
            // reader never sees half a file, and written in place if it is a FIFO or device.
            if let Err(e) = umbra_pki::write_file(path, self.book.hosts_snippet().as_bytes(), 0o644)
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the hosts snippet");
            }
        }
        self.tx.send_replace(list);
    }

    /// Removes every listener: access is gone or the tunneler is stopping.
    async fn clear(&mut self) {
        for (_, active) in std::mem::take(&mut self.active) {
            active.close().await;
        }
        self.publish();
    }
}

/// Follows `/v1/edge/watch` for as long as the tunneler runs, reconnecting with backoff; when a
/// watch counts as dead and what follows its end are decided by `WatchFollower`. A watch that
/// failed or fell silent sends the next one to another controller first (the client's
/// rotation), after the shortest backoff (100 ms): each attempt walks every controller
/// address, so the backoff grows only once all of them failed.
async fn follow(client: ControllerClient, state: &mut Listeners) {
    let mut machine = WatchFollower::new(umbra_proto::follow::DEFAULT_HEARTBEAT);
    loop {
        let end = match watch_once(&client, state, &mut machine).await {
            // The controller refused our certificate: revoked or disabled. Nothing may stay.
            Err(e @ SdkError::Handshake { .. }) | Err(e @ SdkError::Api { status: 403, .. }) => {
                tracing::warn!(error = %e, "the controller refused this identity; closing every listener");
                WatchEnd::Refused
            }
            Err(e) => {
                tracing::warn!(error = %e, "lost the controller; keeping listeners, the router still authorizes");
                WatchEnd::Failed
            }
            Ok(()) => {
                tracing::info!("the controller ended the view stream");
                WatchEnd::Ended
            }
        };
        let next = machine.ended(end, jitter());
        if next.clear {
            // Refused first: whoever wakes on the emptied list must already see why it emptied.
            state.refused.send_replace(true);
            state.clear().await;
        }
        tokio::time::sleep(next.pause).await;
    }
}

/// A number in 0..1000 that differs between processes and attempts.
fn jitter() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    (RandomState::new().hash_one(std::time::Instant::now()) % 1000) as u16
}

async fn watch_once(
    client: &ControllerClient,
    state: &mut Listeners,
    machine: &mut WatchFollower,
) -> Result<(), SdkError> {
    // The controller sends a keepalive on an idle watch; three missed ones mean a dead
    // connection (half-open TCP never ends by itself), so a new one is opened.
    let silence = machine.silence();
    let silent = move || SdkError::Protocol(format!("no word from the controller for {silence:?}"));
    machine.started(std::time::Instant::now());
    let mut stream = timeout_at(machine.deadline(), client.stream("/v1/edge/watch"))
        .await
        .ok_or_else(silent)??;
    // Whole view first, then diffs; a diff that does not fit ends this watch (never a wrong
    // view), and the next one starts from a whole view again.
    let mut decoder = EdgeWatchDecoder::new(16 * 1024 * 1024);
    loop {
        while let Some(view) = decoder
            .next()
            .map_err(|e| SdkError::Protocol(e.to_string()))?
        {
            state.reconcile(view).await;
        }
        let Some(chunk) = timeout_at(machine.deadline(), stream.chunk()).await else {
            // The next watch tries another controller first, if there is one.
            stream.mark_dead();
            return Err(silent());
        };
        match chunk? {
            Some(bytes) => {
                machine.bytes_received(std::time::Instant::now());
                decoder.push(&bytes)
            }
            None => return Ok(()),
        }
    }
}

/// `fut`, or `None` if `deadline` passes first.
async fn timeout_at<F: std::future::Future>(
    deadline: Option<std::time::Instant>,
    fut: F,
) -> Option<F::Output> {
    match deadline {
        Some(at) => tokio::time::timeout_at(tokio::time::Instant::from_std(at), fut)
            .await
            .ok(),
        None => Some(fut.await),
    }
}

async fn accept_loop(
    listener: TcpListener,
    m: Mapping,
    lanes: Arc<Lanes>,
    limit: std::sync::Arc<Semaphore>,
    token: CancellationToken,
    (on_denied, metrics): (Option<DeniedFn>, crate::metrics::Metrics),
) {
    let mut backoff = AcceptBackoff::new();
    let what = m.listen.to_string();
    // The connections this listener carries, on whichever lane: they end with the loop, however
    // it ends (a cancelled token, or this task aborted with its owner).
    let mut carrying = tokio::task::JoinSet::new();
    loop {
        while carrying.try_join_next().is_some() {}
        // `accept`, then a slot. Over the bound a listener holds the one connection it took,
        // unread, and takes no other: the rest wait in the kernel's backlog, so the agent can
        // make the tunneler hold at most one descriptor per listener beyond the bound, and an
        // idle listener holds no slot (an agent granted thousands of services has thousands of
        // listeners, far more than slots; a slot taken before `accept` left all but the first
        // few thousand listeners unable to accept at all).
        let (tcp, peer) = tokio::select! {
            x = accept_with_backoff(&mut backoff, &what, || listener.accept()) => x,
            _ = token.cancelled() => return,
        };
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = token.cancelled() => return,
        };
        let (service, token) = (m.service.clone(), token.clone());
        let (on_denied, metrics) = (on_denied.clone(), metrics.clone());
        let (lane, busy) = lanes.pick();
        let ctx = lane.ctx.clone();
        // A socket moving to another lane leaves this runtime's reactor for the lane's, so
        // that its readiness wakes the lane's thread directly.
        let tcp = match lane.runtime {
            None => Accepted::Here(tcp),
            Some(_) => match tcp.into_std() {
                Ok(s) => Accepted::Moved(s),
                Err(e) => {
                    tracing::warn!(%service, %peer, error = %e, "cannot move the connection to its lane");
                    continue;
                }
            },
        };
        let carried = async move {
            let _permit = permit;
            let _busy = busy;
            let tcp = match tcp {
                Accepted::Here(tcp) => tcp,
                Accepted::Moved(s) => match TcpStream::from_std(s) {
                    Ok(tcp) => tcp,
                    Err(e) => {
                        tracing::warn!(%service, %peer, error = %e, "cannot move the connection to its lane");
                        return;
                    }
                },
            };
            tokio::select! {
                r = carry(tcp, &ctx, service.as_str(), metrics.meters(service.as_str())) => {
                    metrics.carried(service.as_str(), &r);
                    if let Err(e) = r {
                        tracing::info!(%service, %peer, error = %e, "connection ended");
                        if let (Some(f), SdkError::Denied { .. } | SdkError::Revoked) = (&on_denied, &e) {
                            f(service.as_str(), &e);
                        }
                    }
                }
                _ = token.cancelled() => {}
            }
        };
        match lane.runtime.as_ref() {
            None => drop(carrying.spawn(carried)),
            Some(runtime) => drop(carrying.spawn_on(carried, runtime)),
        }
    }
}

/// A TCP connection accepted on this runtime, to be carried here or on another lane's.
enum Accepted {
    Here(TcpStream),
    Moved(std::net::TcpStream),
}

/// Carries one TCP connection as one overlay stream, both directions, with half-close, without
/// copying bytes through user space more than the kernel requires.
async fn carry(
    tcp: TcpStream,
    ctx: &Context,
    service: &str,
    (up, down): (ByteMeter, ByteMeter),
) -> Result<(u64, u64), SdkError> {
    let _ = tcp.set_nodelay(true);
    // What the client sends while the router decides travels with the request: a round trip
    // less for protocols in which the client speaks first.
    let mut early = Early::new(first_bytes(&tcp));
    let stream = dial(ctx, service, &mut early).await?;
    // Bytes sent with the request count as carried up.
    let sent = early.taken().map_or(0, |b| b.len() as u64);
    drop(early);
    up.moved(sent);
    let (n_up, n_down) = umbra_sdk::splice_metered(tcp, stream, (&up, &down)).await?;
    Ok((n_up + sent, n_down))
}

/// How much of a client's first flight may travel with the dial request.
const EARLY_BYTES: usize = 8 * 1024;

/// The client's first bytes, as soon as there are any (empty at end of file or on an error,
/// which the splice then meets again). Dropping it unfinished loses nothing.
async fn first_bytes(tcp: &TcpStream) -> Bytes {
    let mut buf = vec![0u8; EARLY_BYTES];
    // Most clients have written by the time the connection is accepted: read straight from the
    // socket first. A socket just registered has no readiness yet, so tokio's `try_read` would
    // not even try, and `readable` would wait a turn of the event loop to learn what is there.
    {
        use std::io::Read;
        match (&*socket2::SockRef::from(tcp)).read(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Bytes::from(buf);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Bytes::new(),
        }
    }
    loop {
        if tcp.readable().await.is_err() {
            return Bytes::new();
        }
        match tcp.try_read(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Bytes::from(buf);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return Bytes::new(),
        }
    }
}

/// Dials a service the controller's view says this identity may use. The routers learn of a new
/// grant a moment after the controller has told us, so a refusal is retried briefly (bounded);
/// a service that was really revoked loses its listener at the same moment anyway.
async fn dial(
    ctx: &Context,
    service: &str,
    early: &mut Early<'_>,
) -> Result<umbra_sdk::Stream, SdkError> {
    const RETRIES: u32 = 10;
    let mut attempt = 0;
    loop {
        match ctx.dial_early(service, early).await {
            Err(SdkError::Denied { .. }) if attempt < RETRIES => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => return r,
        }
    }
}
