//! The data-plane client: an identity's connections to routers, and dialing and hosting services
//! through them.
//!
//! Routers are learned from the controller (`GET /v1/edge`); one QUIC connection per router is
//! kept and reused for every stream. A dial tries the connected routers first, then the others
//! the controller lists, so one router going away costs a retry, not an outage. A router that
//! could not be reached is tried again only after a backoff (100 ms doubling to 5 s) unless no
//! other router works, so a dead router is not hammered and does not slow every dial.
//!
//! The context renews its own certificate in the background (see [`crate::RenewingIdentity`]).
//! New connections, to routers and to the controller, present the newest certificate; a
//! connection made with an older one keeps serving its streams until it ends (a router ends it
//! when that certificate expires), while new streams go over a connection made with the new one.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, VarInt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use umbra_pki::{ExpectedServer, IdentityFile, Serial};
use umbra_policies::{IdentityId, IdentityKind, Name};
use umbra_proto::api::{EdgeService, EdgeView};
use umbra_proto::stream::{
    decode_request_header, decode_response, encode_request, encode_response, IncomingRequest, Op,
    ServiceRequest, Status, ALPN,
};
use umbra_proto::FrameDecoder;

use crate::client::{ControllerClient, ResponseStream};
use crate::error::SdkError;
use crate::listener::Listener;
use crate::renewal::{Credentials, RenewingIdentity};
use crate::stream::{connection_error, read_error, write_error, Stream};

/// Connecting to a router, handshake included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Waiting for a router's answer to a request.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a host's answer to an incoming caller may take to arrive.
const INCOMING_TIMEOUT: Duration = Duration::from_secs(5);
/// Callers queued for a listener that is not accepting; more are refused.
const ACCEPT_BACKLOG: usize = 128;
/// The largest edge view accepted on a watch.
const MAX_EDGE_FRAME: usize = 16 * 1024 * 1024;
/// The TLS server name sent to routers (only SNI; routers are checked by SPIFFE id).
const ROUTER_SERVER_NAME: &str = "router.umbra";
/// First and largest pause before connecting again to a router that could not be reached.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Who is calling an SDK-hosted service, as the router's handshake verified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller's identity id.
    pub id: IdentityId,
    /// The caller's name.
    pub name: Name,
    /// The caller's SPIFFE id.
    pub spiffe: String,
}

pub(crate) type Incoming = (Stream, Caller);

/// An identity's handle on the overlay. Cheap to clone; connections are shared.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    /// The identity as given to the context (see [`Context::identity`]).
    original: IdentityFile,
    /// The current credentials and their renewal.
    live: RenewingIdentity,
    /// Whether the renewal task has been spawned (it needs a runtime; see `start_renewal`).
    renewing: AtomicBool,
    controller: ControllerClient,
    transport: Arc<quinn::TransportConfig>,
    /// The QUIC client configuration of the newest credentials, built once per certificate.
    quic: Mutex<Option<(Arc<Credentials>, quinn::ClientConfig)>>,
    endpoints: Mutex<(Option<Endpoint>, Option<Endpoint>)>,
    /// One connection per router, with the serial of the certificate it was made with.
    conns: Mutex<HashMap<String, (Connection, Serial)>>,
    /// Routers that could not be reached: failures in a row, and when to try again.
    backoff: Mutex<HashMap<String, (u32, Instant)>>,
    routers: Mutex<Vec<String>>,
    listeners: Arc<Mutex<HashMap<Name, mpsc::Sender<Incoming>>>>,
    cancel: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Ends the accept tasks; each connection then closes once its last stream is dropped
        // (a `Stream` outlives the context that opened it).
        self.cancel.cancel();
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("identity", &self.inner.original.spiffe().to_string())
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Context {
    /// A context acting as `identity`, talking to the controller its file names.
    pub fn new(identity: IdentityFile) -> Result<Context, SdkError> {
        Self::with_controller(identity, None)
    }

    /// Like [`Context::new`], with another controller address.
    ///
    /// The context renews its certificate in the background from then on (from the first
    /// async call if it is created outside a Tokio runtime); see
    /// [`Context::set_identity_path`] to persist renewals.
    pub fn with_controller(
        identity: IdentityFile,
        controller: Option<&str>,
    ) -> Result<Context, SdkError> {
        let live = RenewingIdentity::new(identity.clone(), controller)?;
        let controller = live.controller();
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(Duration::from_secs(10)))
            .max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(30)).ok())
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .max_concurrent_bidi_streams(VarInt::from_u32(256))
            .stream_receive_window(VarInt::from_u32(2 * 1024 * 1024))
            .receive_window(VarInt::from_u32(16 * 1024 * 1024));
        let ctx = Context {
            inner: Arc::new(Inner {
                original: identity,
                live,
                renewing: AtomicBool::new(false),
                controller,
                transport: Arc::new(transport),
                quic: Mutex::new(None),
                endpoints: Mutex::new((None, None)),
                conns: Mutex::new(HashMap::new()),
                backoff: Mutex::new(HashMap::new()),
                routers: Mutex::new(Vec::new()),
                listeners: Arc::new(Mutex::new(HashMap::new())),
                cancel: CancellationToken::new(),
            }),
        };
        // Fail now, not at the first dial, if the identity cannot make a router configuration.
        ctx.quic_config()?;
        ctx.start_renewal();
        Ok(ctx)
    }

    /// Spawns the renewal task once, if a Tokio runtime is available. The task holds the
    /// renewal state, not the context, and ends when the context is dropped.
    fn start_renewal(&self) {
        if self.inner.renewing.load(Ordering::Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.inner.renewing.swap(true, Ordering::AcqRel) {
            rt.spawn(self.inner.live.clone().run(self.inner.cancel.child_token()));
        }
    }

    /// The identity this context was created with. Its id, name, kind, trust domain, CA and
    /// controller never change, but its certificate and key are the original ones: for the
    /// newest, see [`Context::current_identity`].
    pub fn identity(&self) -> &IdentityFile {
        &self.inner.original
    }

    /// The identity with the newest certificate and key.
    pub fn current_identity(&self) -> Arc<IdentityFile> {
        self.inner.live.identity()
    }

    /// A receiver of this context's credentials, which sees every renewal.
    pub fn watch_identity(&self) -> watch::Receiver<Arc<Credentials>> {
        self.inner.live.subscribe()
    }

    /// Saves every renewal to `path` (atomically, mode 0600), normally the file the identity
    /// was loaded from, so that a restarted process starts from a valid certificate.
    pub fn set_identity_path(&self, path: impl Into<PathBuf>) {
        self.inner.live.set_path(Some(path.into()));
    }

    /// Renews the certificate now instead of on schedule.
    pub async fn renew_now(&self) -> Result<Arc<Credentials>, SdkError> {
        self.start_renewal();
        self.inner.live.renew_now().await
    }

    /// A controller client that always presents this context's newest certificate (build
    /// long-lived controller clients with this, not from [`Context::identity`]).
    pub fn controller(&self) -> ControllerClient {
        self.start_renewal();
        self.inner.controller.clone()
    }

    /// The QUIC client configuration for the newest credentials.
    fn quic_config(&self) -> Result<(Serial, quinn::ClientConfig), SdkError> {
        let creds = self.inner.live.current();
        let serial = creds.leaf().serial.clone();
        let mut cached = lock(&self.inner.quic);
        if let Some((c, q)) = cached.as_ref() {
            if Arc::ptr_eq(c, &creds) {
                return Ok((serial, q.clone()));
            }
        }
        let tls = umbra_pki::client_config_spiffe(
            creds.identity(),
            ExpectedServer::AnyOfKind(IdentityKind::Router),
            &[ALPN],
        )?;
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| SdkError::Protocol(e.to_string()))?;
        let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
        quic.transport_config(Arc::clone(&self.inner.transport));
        *cached = Some((creds, quic.clone()));
        Ok((serial, quic))
    }

    /// What this identity may use and where the routers are (`GET /v1/edge`).
    pub async fn edge(&self) -> Result<EdgeView, SdkError> {
        self.start_renewal();
        self.inner
            .controller
            .call(Method::GET, "/v1/edge", None::<&()>)
            .await
    }

    /// The services this identity may dial, with where a tunneler exposes them.
    pub async fn services(&self) -> Result<Vec<EdgeService>, SdkError> {
        Ok(self
            .edge()
            .await?
            .services
            .into_iter()
            .filter(|s| s.dial)
            .collect())
    }

    /// Follows this identity's view (`GET /v1/edge/watch`): the current one first, then each
    /// change, pushed by the controller. The watch ends when the identity loses its own access.
    pub async fn watch_edge(&self) -> Result<EdgeWatch, SdkError> {
        self.start_renewal();
        let stream = self.inner.controller.stream("/v1/edge/watch").await?;
        Ok(EdgeWatch {
            stream,
            decoder: FrameDecoder::new(MAX_EDGE_FRAME),
        })
    }

    /// Opens a stream to `service` through a router. Refusals by policy are
    /// [`SdkError::Denied`], the same whether or not the service exists.
    pub async fn dial(&self, service: &str) -> Result<Stream, SdkError> {
        let Ok(name) = Name::new(service) else {
            // A name that cannot exist is not granted; say so the same way.
            return Err(SdkError::Denied {
                service: service.to_owned(),
            });
        };
        let mut tried = HashSet::new();
        let mut last = None;
        for refresh in [false, true] {
            let mut routers = self.routers(refresh).await?;
            {
                // Routers we are connected to first (no handshake, and known to be up), then
                // those not known to be down, then those backing off after a failure.
                let conns = lock(&self.inner.conns);
                let backoff = lock(&self.inner.backoff);
                let now = Instant::now();
                routers.sort_by_key(|a| {
                    if conns
                        .get(a)
                        .is_some_and(|(c, _)| c.close_reason().is_none())
                    {
                        (0, None)
                    } else {
                        match backoff.get(a) {
                            Some((_, until)) if *until > now => (2, Some(*until)),
                            _ => (1, None),
                        }
                    }
                });
            }
            for addr in routers {
                if !tried.insert(addr.clone()) {
                    continue;
                }
                match self.dial_via(&addr, name.as_str()).await {
                    Ok(s) => return Ok(s),
                    Err(e) if e.try_another_router() => {
                        tracing::debug!(router = %addr, error = %e, "trying another router");
                        last = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Err(last.unwrap_or_else(|| SdkError::Unavailable("every router".into())))
    }

    /// Opens a stream to `service` through the router at `router` (`host:port`) only.
    pub async fn dial_via(&self, router: &str, service: &str) -> Result<Stream, SdkError> {
        let name = Name::new(service).map_err(|_| SdkError::Denied {
            service: service.to_owned(),
        })?;
        let conn = self.connection(router).await?;
        let result = request(&conn, Op::Dial, &name).await;
        if let Err(e) = &result {
            if e.try_another_router() && conn.close_reason().is_some() {
                let mut conns = lock(&self.inner.conns);
                if conns
                    .get(router)
                    .is_some_and(|(c, _)| c.stable_id() == conn.stable_id())
                {
                    conns.remove(router);
                }
            }
        }
        result.map(|(send, recv)| Stream::new(send, recv, service.to_owned()))
    }

    /// Hosts `service` on every router the controller lists: callers that dial it arrive on the
    /// returned listener, with no listening port here. Needs a Bind grant. The listener keeps
    /// its registrations alive: it binds again after a router connection is lost, and on routers
    /// that appear later. One listener per service per context.
    pub async fn bind(&self, service: &str) -> Result<Listener, SdkError> {
        let name = Name::new(service).map_err(|_| SdkError::Denied {
            service: service.to_owned(),
        })?;
        let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
        lock(&self.inner.listeners).insert(name.clone(), tx);
        match crate::listener::bind_all(self, &name, &HashSet::new(), false).await {
            Ok(binds) if !binds.is_empty() => Ok(Listener::start(self.clone(), name, rx, binds)),
            Ok(_) => {
                lock(&self.inner.listeners).remove(&name);
                Err(SdkError::Unavailable("every router".into()))
            }
            Err(e) => {
                lock(&self.inner.listeners).remove(&name);
                Err(e)
            }
        }
    }

    pub(crate) fn listeners(&self) -> &Arc<Mutex<HashMap<Name, mpsc::Sender<Incoming>>>> {
        &self.inner.listeners
    }

    /// Router addresses: the cached list, or a fresh one from the controller.
    pub(crate) async fn routers(&self, refresh: bool) -> Result<Vec<String>, SdkError> {
        if !refresh {
            let cached = lock(&self.inner.routers).clone();
            if !cached.is_empty() {
                return Ok(cached);
            }
        }
        let view = self.edge().await?;
        let addrs: Vec<String> = view
            .routers
            .into_iter()
            .filter_map(|r| r.advertise)
            .collect();
        *lock(&self.inner.routers) = addrs.clone();
        Ok(addrs)
    }

    /// The live connection to a router made with the current certificate, connecting if there
    /// is none. A connection made with an earlier certificate is left to its streams (and used
    /// only while a new one cannot be made).
    pub(crate) async fn connection(&self, router: &str) -> Result<Connection, SdkError> {
        self.connection_with(router, true).await.map(|(c, _)| c)
    }

    /// Like [`Context::connection`], also saying which certificate (serial) the connection was
    /// made with; with `allow_older` false, only a connection made with the current one.
    pub(crate) async fn connection_with(
        &self,
        router: &str,
        allow_older: bool,
    ) -> Result<(Connection, Serial), SdkError> {
        self.start_renewal();
        let (serial, quic) = self.quic_config()?;
        // A live connection made with an earlier certificate: replaced, but still usable if
        // a new connection cannot be made right now.
        let mut older = None;
        if let Some((c, s)) = lock(&self.inner.conns).get(router) {
            if c.close_reason().is_none() {
                if *s == serial {
                    return Ok((c.clone(), serial));
                }
                if allow_older {
                    older = Some((c.clone(), s.clone()));
                }
            }
        }
        if let Some(c) = &older {
            // Do not pay a failing connection attempt on every stream while backing off.
            let waiting = lock(&self.inner.backoff)
                .get(router)
                .is_some_and(|(_, until)| *until > Instant::now());
            if waiting {
                return Ok(c.clone());
            }
        }
        let result = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(router, quic))
            .await
            .map_err(|_| SdkError::Timeout(router.to_owned()))
            .and_then(|r| r);
        let conn = match result {
            Ok(conn) => {
                lock(&self.inner.backoff).remove(router);
                conn
            }
            Err(e) => {
                if e.try_another_router() {
                    self.back_off(router);
                }
                if let Some(c) = older.filter(|(c, _)| c.close_reason().is_none()) {
                    tracing::debug!(%router, error = %e, "reconnecting with the renewed certificate failed; using the earlier connection");
                    return Ok(c);
                }
                return Err(e);
            }
        };
        lock(&self.inner.conns).insert(router.to_owned(), (conn.clone(), serial.clone()));
        let listeners = Arc::clone(&self.inner.listeners);
        tokio::spawn(accept_incoming(
            conn.clone(),
            listeners,
            self.inner.cancel.clone(),
        ));
        Ok((conn, serial))
    }

    /// Records a failed connection to `router`: it is tried after the others until its backoff
    /// (doubling with each failure in a row) has passed.
    fn back_off(&self, router: &str) {
        let mut backoff = lock(&self.inner.backoff);
        let failures = backoff.get(router).map_or(0, |(n, _)| *n).saturating_add(1);
        let pause = RECONNECT_MIN
            .saturating_mul(1 << failures.saturating_sub(1).min(16))
            .min(RECONNECT_MAX);
        tracing::debug!(%router, failures, ?pause, "router unreachable; backing off");
        backoff.insert(router.to_owned(), (failures, Instant::now() + pause));
    }

    async fn connect(
        &self,
        router: &str,
        quic: quinn::ClientConfig,
    ) -> Result<Connection, SdkError> {
        let unreachable = |source| SdkError::Unreachable {
            addr: router.to_owned(),
            source,
        };
        let addr: SocketAddr = tokio::net::lookup_host(router)
            .await
            .map_err(unreachable)?
            .next()
            .ok_or_else(|| {
                unreachable(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no address",
                ))
            })?;
        let endpoint = self.endpoint(addr)?;
        let connecting = endpoint
            .connect_with(quic, addr, ROUTER_SERVER_NAME)
            .map_err(|e| SdkError::Protocol(e.to_string()))?;
        let conn = connecting.await.map_err(|e| connection_error(&e, router))?;
        tracing::debug!(%router, "connected to router");
        Ok(conn)
    }

    /// The client endpoint for the address family of `addr`, created on first use.
    fn endpoint(&self, addr: SocketAddr) -> Result<Endpoint, SdkError> {
        let mut eps = lock(&self.inner.endpoints);
        let (slot, bind) = if addr.is_ipv4() {
            (&mut eps.0, "0.0.0.0:0")
        } else {
            (&mut eps.1, "[::]:0")
        };
        if let Some(ep) = slot {
            return Ok(ep.clone());
        }
        let bind: SocketAddr = bind
            .parse()
            .map_err(|_| SdkError::Protocol("bind address".into()))?;
        let ep = Endpoint::client(bind).map_err(|source| SdkError::Unreachable {
            addr: addr.to_string(),
            source,
        })?;
        *slot = Some(ep.clone());
        Ok(ep)
    }
}

/// Opens a stream, sends a request and reads the router's answer.
pub(crate) async fn request(
    conn: &Connection,
    op: Op,
    service: &Name,
) -> Result<(quinn::SendStream, quinn::RecvStream), SdkError> {
    let what = service.as_str();
    let frame = encode_request(
        op,
        &ServiceRequest {
            service: service.clone(),
        },
    )
    .map_err(|e| SdkError::Protocol(e.to_string()))?;
    let exchange = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| connection_error(&e, what))?;
        send.write_all(&frame)
            .await
            .map_err(|e| write_error(e, what))?;
        let mut resp = [0u8; 2];
        recv.read_exact(&mut resp).await.map_err(|e| match e {
            quinn::ReadExactError::ReadError(e) => read_error(e, what),
            quinn::ReadExactError::FinishedEarly(_) => {
                SdkError::Protocol("the router closed the stream without an answer".into())
            }
        })?;
        let status = decode_response(resp).map_err(|e| SdkError::Protocol(e.to_string()))?;
        match status {
            Status::Ok => Ok((send, recv)),
            Status::Denied => Err(SdkError::Denied {
                service: what.to_owned(),
            }),
            Status::Unavailable => Err(SdkError::Unavailable(what.to_owned())),
            Status::BadRequest => Err(SdkError::Protocol(
                "the router refused the request as malformed".into(),
            )),
        }
    };
    tokio::time::timeout(RESPONSE_TIMEOUT, exchange)
        .await
        .map_err(|_| SdkError::Timeout(what.to_owned()))?
}

/// Accepts the streams a router opens towards us (callers of services we host) until the
/// connection or the context ends.
async fn accept_incoming(
    conn: Connection,
    listeners: Arc<Mutex<HashMap<Name, mpsc::Sender<Incoming>>>>,
    cancel: CancellationToken,
) {
    loop {
        let (send, recv) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = conn.accept_bi() => match r {
                Ok(pair) => pair,
                Err(_) => return,
            },
        };
        let listeners = Arc::clone(&listeners);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(INCOMING_TIMEOUT, incoming(send, recv, listeners)).await;
        });
    }
}

async fn incoming(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    listeners: Arc<Mutex<HashMap<Name, mpsc::Sender<Incoming>>>>,
) {
    let mut header = [0u8; 4];
    let parsed = async {
        recv.read_exact(&mut header).await.ok()?;
        let (op, len) = decode_request_header(header).ok()?;
        if op != Op::Incoming {
            return None;
        }
        let mut payload = vec![0u8; len];
        recv.read_exact(&mut payload).await.ok()?;
        serde_json::from_slice::<IncomingRequest>(&payload).ok()
    }
    .await;
    let Some(req) = parsed else {
        let _ = send.write_all(&encode_response(Status::BadRequest)).await;
        let _ = send.finish();
        return;
    };
    let tx = lock(&listeners).get(&req.service).cloned();
    let Some(tx) = tx else {
        let _ = send.write_all(&encode_response(Status::Unavailable)).await;
        let _ = send.finish();
        return;
    };
    let Ok(slot) = tx.try_reserve_owned() else {
        let _ = send.write_all(&encode_response(Status::Unavailable)).await;
        let _ = send.finish();
        return;
    };
    if send.write_all(&encode_response(Status::Ok)).await.is_err() {
        return;
    }
    let caller = Caller {
        id: req.caller_id,
        name: req.caller_name,
        spiffe: req.caller_spiffe,
    };
    slot.send((
        Stream::new(send, recv, req.service.as_str().to_owned()),
        caller,
    ));
}

/// Successive views of an identity's services and routers (see [`Context::watch_edge`]).
pub struct EdgeWatch {
    stream: ResponseStream,
    decoder: FrameDecoder,
}

impl std::fmt::Debug for EdgeWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeWatch").finish_non_exhaustive()
    }
}

impl EdgeWatch {
    /// The next view; `None` when the controller ended the watch.
    pub async fn next(&mut self) -> Result<Option<EdgeView>, SdkError> {
        loop {
            if let Some(view) = self
                .decoder
                .next::<EdgeView>()
                .map_err(|e| SdkError::Protocol(e.to_string()))?
            {
                return Ok(Some(view));
            }
            match self.stream.chunk().await? {
                Some(bytes) => self.decoder.push(&bytes),
                None => return Ok(None),
            }
        }
    }
}
