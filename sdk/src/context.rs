//! The data-plane client: an identity's connections to routers, and dialing and hosting services
//! through them.
//!
//! Routers are learned from the controller (`GET /v1/edge`); one QUIC connection per router is
//! kept and reused for every stream. A dial tries the connected routers first, then the others
//! the controller lists, so one router going away costs a retry, not an outage. A router that
//! could not be reached is tried again only after a backoff (100 ms doubling to 5 s) unless no
//! other router works, so a dead router is not hammered and does not slow every dial.
//!
//! Each router is authenticated as exactly the router the controller lists at the address being
//! dialed: the QUIC handshake requires the SPIFFE id `spiffe://TD/router/NAME` of the router that
//! the edge view (`GET /v1/edge`) names for that address, not just any router certificate of the
//! trust domain. So a holder of some other router's key (a deleted router's, say, until its
//! certificate expires) who takes over a listed router's address can neither read the streams
//! meant for that router nor pose as it to hosts. The one exception is [`Context::dial_via`] with
//! an address that is not in the view: it accepts any router of the trust domain (see there).
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
use umbra_pki::{ExpectedServer, IdentityFile, Serial, SpiffeId};
use umbra_policies::{IdentityId, IdentityKind, Name};
use umbra_proto::api::{EdgeService, EdgeView};
use umbra_proto::edge::EdgeWatchDecoder;
use umbra_proto::stream::{
    decode_request_header, decode_response, encode_request, encode_response, IncomingRequest, Op,
    ServiceRequest, Status, ALPN,
};
use umbra_proto::RouterInfo;

use crate::client::{ControllerClient, ResponseStream};
use crate::credentials::Credentials;
use crate::error::SdkError;
use crate::renewal::RenewingIdentity;
use crate::stream::{connection_error, read_error, write_error, Stream};
use crate::sync::lock;

/// Connecting to a router, handshake included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Waiting for a router's answer to a request.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a host's answer to an incoming caller may take to arrive.
const INCOMING_TIMEOUT: Duration = Duration::from_secs(5);
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

/// QUIC client configurations by the router they accept (`None`: any router).
type RouterConfigs = HashMap<Option<Name>, quinn::ClientConfig>;

/// A router as the SDK connects to it: an address, and the router that must answer there.
///
/// `name` is the router's name from the edge view; the handshake then requires exactly that
/// router's SPIFFE id. `None` (only for [`Context::dial_via`] with an address the view does not
/// list) accepts any router of the trust domain. Connections and backoffs are kept per target, so
/// a connection verified for one router is never reused for another listed at the same address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RouterTarget {
    pub(crate) addr: String,
    pub(crate) name: Option<Name>,
}

impl std::fmt::Display for RouterTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(n) => write!(f, "{n}@{}", self.addr),
            None => write!(f, "{} (any router)", self.addr),
        }
    }
}

/// The routers of an edge view that have an address, each pinned to its own name.
fn targets(routers: Vec<RouterInfo>) -> Vec<RouterTarget> {
    routers
        .into_iter()
        .filter_map(|r| {
            r.advertise.map(|addr| RouterTarget {
                addr,
                name: Some(r.name),
            })
        })
        .collect()
}

/// The targets for a bare address: every listed router advertising exactly `addr` (each pinned
/// to its name), or, when none does, `addr` accepting any router of the trust domain.
fn targets_for(addr: &str, known: &[RouterTarget]) -> Vec<RouterTarget> {
    let listed: Vec<RouterTarget> = known.iter().filter(|t| t.addr == addr).cloned().collect();
    if listed.is_empty() {
        vec![RouterTarget {
            addr: addr.to_owned(),
            name: None,
        }]
    } else {
        listed
    }
}

/// An identity's handle on the overlay. Cheap to clone; connections are shared.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
    /// The lane this handle dials on (see [`Context::on_runtime`]); `None` is the default lane,
    /// whose connections live on the runtime that made them.
    lane: Option<Arc<Lane>>,
}

/// A runtime on which a context keeps connections of their own, one per router.
struct Lane {
    id: u32,
    runtime: tokio::runtime::Handle,
    inner: std::sync::Weak<Inner>,
    /// Ends the lane's tasks (a child of the context's).
    cancel: CancellationToken,
}

impl Drop for Lane {
    /// The lane's endpoint and connections are forgotten with its last handle; as with a
    /// dropped context, each connection closes once its last stream is dropped.
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(inner) = self.inner.upgrade() {
            lock(&inner.conns).retain(|(_, lane), _| *lane != self.id);
            lock(&inner.endpoints).retain(|(_, lane), _| *lane != self.id);
        }
    }
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
    /// The QUIC client configurations of the newest credentials, one per expected router (by
    /// name; `None` for any router), built once per certificate.
    quic: Mutex<Option<(Arc<Credentials>, RouterConfigs)>>,
    /// The client endpoints, by address family (IPv4 or not) and lane: a lane's endpoint lives
    /// on the lane's runtime.
    endpoints: Mutex<HashMap<(bool, u32), Endpoint>>,
    /// One connection per router and lane, with the serial of the certificate it was made with.
    conns: Mutex<HashMap<(RouterTarget, u32), (Connection, Serial)>>,
    /// One connection attempt at a time per router and lane, holding when the last one failed:
    /// dials that arrive together wait for one attempt and share its connection.
    connecting: Mutex<HashMap<(RouterTarget, u32), Arc<ConnectGate>>>,
    /// Router-list refreshes, one at a time, holding when the last one ended: the dials of a
    /// burst that all failed over ask the controller once, not once each (it refuses an
    /// identity's connections past its bound, the tunneler's watch among them).
    refreshed: tokio::sync::Mutex<Option<Instant>>,
    /// The last lane id given out (lane 0 is the default lane).
    lanes: std::sync::atomic::AtomicU32,
    /// Random: the first byte of the initial connection ID of lane 0's connections; lane `n`
    /// uses the next `n`th, so a context's lanes start on different router lanes.
    slot_base: u8,
    /// Routers that could not be reached: failures in a row, and when to try again.
    backoff: Mutex<HashMap<RouterTarget, (u32, Instant)>>,
    /// The routers of the last edge view, each with the name it must prove; `None` until a view
    /// was fetched.
    routers: Mutex<Option<Vec<RouterTarget>>>,
    listeners: Arc<Mutex<HashMap<Name, mpsc::Sender<Incoming>>>>,
    cancel: CancellationToken,
}

/// Held while connecting to one router on one lane; holds when the last attempt failed.
type ConnectGate = tokio::sync::Mutex<Option<Instant>>;

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

impl Context {
    /// A context acting as `identity`, talking to the controller its file names.
    pub fn new(identity: IdentityFile) -> Result<Context, SdkError> {
        Self::with_controller(identity, None)
    }

    /// Like [`Context::new`], with other controllers: `controller` is one `host:port` or
    /// several separated by commas (`a:443,b:443`), tried as [`ControllerClient`] says (the
    /// one that answered last first, a dead one given up within about a second).
    ///
    /// The context renews its certificate in the background from then on (from the first
    /// async call if it is created outside a Tokio runtime); see
    /// [`Context::set_identity_path`] to persist renewals.
    pub fn with_controller(
        identity: IdentityFile,
        controller: Option<&str>,
    ) -> Result<Context, SdkError> {
        Self::with_clock(identity, controller, umbra_clock::Clock::system())
    }

    /// Like [`Context::with_controller`], renewing on the schedule `clock` tells: a test hands
    /// in a manual clock to make the certificate age without waiting.
    pub fn with_clock(
        identity: IdentityFile,
        controller: Option<&str>,
        clock: umbra_clock::Clock,
    ) -> Result<Context, SdkError> {
        let live = RenewingIdentity::new(identity.clone(), controller, clock)?;
        let controller = live.controller();
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(Duration::from_secs(10)))
            .max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(30)).ok())
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .max_concurrent_bidi_streams(VarInt::from_u32(256))
            .stream_receive_window(VarInt::from_u32(2 * 1024 * 1024))
            .receive_window(VarInt::from_u32(16 * 1024 * 1024));
        umbra_transport::quic::tune(
            &mut transport,
            Some(umbra_transport::congestion::DEFAULT_QUEUE_FLOOR),
        );
        let ctx = Context {
            inner: Arc::new(Inner {
                original: identity,
                live,
                renewing: AtomicBool::new(false),
                controller,
                transport: Arc::new(transport),
                quic: Mutex::new(None),
                endpoints: Mutex::new(HashMap::new()),
                conns: Mutex::new(HashMap::new()),
                connecting: Mutex::new(HashMap::new()),
                refreshed: tokio::sync::Mutex::new(None),
                lanes: std::sync::atomic::AtomicU32::new(0),
                slot_base: umbra_transport::quic::initial_cid(0)[1],
                backoff: Mutex::new(HashMap::new()),
                routers: Mutex::new(None),
                listeners: Arc::new(Mutex::new(HashMap::new())),
                cancel: CancellationToken::new(),
            }),
            lane: None,
        };
        // Fail now, not at the first dial, if the identity cannot make a router configuration.
        ctx.quic_config(None)?;
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

    /// A handle on this context whose dials go over connections of their own (one per router),
    /// made and driven on `runtime`: streams dialed through it and served on that runtime
    /// never wait for the threads of other lanes, nor they for it. A tunneler gives bulk and
    /// interactive connections different lanes this way, each lane a thread; routers with
    /// several lanes of their own take each of a context's lanes (up to theirs) on a
    /// different thread. Identity, renewal, routers and listeners stay shared. `runtime` must
    /// outlive the use of the returned handle: its connections are driven there.
    pub fn on_runtime(&self, runtime: tokio::runtime::Handle) -> Context {
        let id = self
            .inner
            .lanes
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        Context {
            inner: Arc::clone(&self.inner),
            lane: Some(Arc::new(Lane {
                id,
                runtime,
                inner: Arc::downgrade(&self.inner),
                cancel: self.inner.cancel.child_token(),
            })),
        }
    }

    fn lane_id(&self) -> u32 {
        self.lane.as_ref().map_or(0, |l| l.id)
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

    /// The QUIC client configuration for the newest credentials that accepts only the router
    /// named `router` (`spiffe://TD/router/NAME` in this identity's trust domain), or, with
    /// `None`, any router of the trust domain.
    fn quic_config(
        &self,
        router: Option<&Name>,
    ) -> Result<(Serial, quinn::ClientConfig), SdkError> {
        let creds = self.inner.live.current();
        let serial = creds.leaf().serial.clone();
        let mut cached = lock(&self.inner.quic);
        let configs = match cached.as_mut() {
            Some((c, configs)) if Arc::ptr_eq(c, &creds) => configs,
            // New credentials: every configuration is rebuilt with the new certificate.
            _ => &mut cached.insert((Arc::clone(&creds), HashMap::new())).1,
        };
        let key = router.cloned();
        if let Some(q) = configs.get(&key) {
            return Ok((serial, q.clone()));
        }
        let identity = creds.identity();
        let expected = match router {
            Some(name) => ExpectedServer::Exact(SpiffeId::new(
                &identity.trust_domain,
                IdentityKind::Router,
                name,
            )),
            None => ExpectedServer::AnyOfKind(IdentityKind::Router),
        };
        let tls =
            umbra_pki::client_config_spiffe_with_clock(identity, expected, &[ALPN], creds.clock())?;
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| SdkError::Protocol(e.to_string()))?;
        let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
        quic.transport_config(Arc::clone(&self.inner.transport));
        configs.insert(key, quic.clone());
        Ok((serial, quic))
    }

    /// What this identity may use and where the routers are (`GET /v1/edge`). The routers it
    /// lists become the ones this context dials, each pinned to its name.
    pub async fn edge(&self) -> Result<EdgeView, SdkError> {
        self.start_renewal();
        let view: EdgeView = self
            .inner
            .controller
            .call(Method::GET, "/v1/edge", None::<&()>)
            .await?;
        *lock(&self.inner.routers) = Some(targets(view.routers.clone()));
        Ok(view)
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
    /// When a watch fails, the controller it came from goes to the back of the context's order,
    /// so the next `watch_edge` goes to another controller first, if there are several.
    pub async fn watch_edge(&self) -> Result<EdgeWatch, SdkError> {
        self.start_renewal();
        let stream = self.inner.controller.stream("/v1/edge/watch").await?;
        Ok(EdgeWatch {
            stream,
            decoder: EdgeWatchDecoder::new(MAX_EDGE_FRAME),
        })
    }

    /// Opens a stream to `service` through a router. Refusals by policy are
    /// [`SdkError::Denied`], the same whether or not the service exists.
    pub async fn dial(&self, service: &str) -> Result<Stream, SdkError> {
        self.dial_early(service, &mut Early::none()).await
    }

    /// [`Context::dial`], sending `early` (a connection's first bytes, say) right behind the
    /// request instead of after the router's answer: one round trip less for protocols in
    /// which the client speaks first (TLS, HTTP). A router forwards nothing before it has
    /// authorized the stream and reached the service, so bytes sent to a router that refuses
    /// are never delivered, and the same bytes go to the next router tried, or the next call
    /// with the same `early`.
    pub async fn dial_early(
        &self,
        service: &str,
        early: &mut Early<'_>,
    ) -> Result<Stream, SdkError> {
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
                let lane = self.lane_id();
                routers.sort_by_key(|a| {
                    if conns
                        .get(&(a.clone(), lane))
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
            for target in routers {
                if !tried.insert(target.clone()) {
                    continue;
                }
                match self.dial_target(&target, &name, early).await {
                    Ok(s) => return Ok(s),
                    Err(e) if e.try_another_router() => {
                        tracing::debug!(router = %target, error = %e, "trying another router");
                        last = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Err(last.unwrap_or_else(|| SdkError::Unavailable("every router".into())))
    }

    /// Opens a stream to `service` through the router at `router` (`host:port`) only.
    ///
    /// The router must prove that it is the router the edge view lists at that address (the
    /// view is fetched first if this context has none yet; if several routers are listed there,
    /// each is tried). An address the view does not list (or, with no view obtainable, any
    /// address) is trusted less: any router certificate of this identity's trust domain is
    /// accepted there, so use this with addresses from a trusted source, or use
    /// [`Context::dial`], which only dials listed routers, each pinned to its name.
    pub async fn dial_via(&self, router: &str, service: &str) -> Result<Stream, SdkError> {
        let name = Name::new(service).map_err(|_| SdkError::Denied {
            service: service.to_owned(),
        })?;
        let (known, mut fresh) = self.known_routers().await;
        let mut targets = targets_for(router, &known);
        let mut last = None;
        loop {
            for target in &targets {
                match self.dial_target(target, &name, &mut Early::none()).await {
                    Ok(s) => return Ok(s),
                    Err(e) if e.try_another_router() => last = Some(e),
                    Err(e) => return Err(e),
                }
            }
            // A refused handshake with a view that may be stale (the address may belong to
            // another router now): ask the controller once, and try again if the answer differs.
            let refused = matches!(last, Some(SdkError::Handshake { .. }));
            if fresh || !refused {
                break;
            }
            fresh = true;
            let Some(known) = self.fetch_routers().await else {
                break;
            };
            let again = targets_for(router, &known);
            if again == targets {
                break;
            }
            targets = again;
        }
        Err(last.unwrap_or_else(|| SdkError::Unavailable(router.to_owned())))
    }

    /// The routers of the last edge view, fetching one if there is none yet (an empty list if
    /// the controller cannot be asked), and whether it was just fetched.
    async fn known_routers(&self) -> (Vec<RouterTarget>, bool) {
        if let Some(known) = lock(&self.inner.routers).clone() {
            return (known, false);
        }
        (self.fetch_routers().await.unwrap_or_default(), true)
    }

    /// A fresh list of routers from the controller, within [`CONNECT_TIMEOUT`]; `None` if the
    /// controller cannot be asked.
    async fn fetch_routers(&self) -> Option<Vec<RouterTarget>> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.routers(true)).await {
            Ok(Ok(known)) => Some(known),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "no edge view; an unlisted router address is not pinned");
                None
            }
            Err(_) => {
                tracing::debug!("no edge view in time; an unlisted router address is not pinned");
                None
            }
        }
    }

    /// Opens a stream to `service` through one router.
    async fn dial_target(
        &self,
        target: &RouterTarget,
        name: &Name,
        early: &mut Early<'_>,
    ) -> Result<Stream, SdkError> {
        let conn = self.connection(target).await?;
        let result = request(&conn, Op::Dial, name, early).await;
        if let Err(e) = &result {
            if e.try_another_router() && conn.close_reason().is_some() {
                let mut conns = lock(&self.inner.conns);
                let key = (target.clone(), self.lane_id());
                if conns
                    .get(&key)
                    .is_some_and(|(c, _)| c.stable_id() == conn.stable_id())
                {
                    conns.remove(&key);
                }
            }
        }
        result.map(|(send, recv)| Stream::new(send, recv, name.as_str().to_owned()))
    }

    pub(crate) fn listeners(&self) -> &Arc<Mutex<HashMap<Name, mpsc::Sender<Incoming>>>> {
        &self.inner.listeners
    }

    /// The listed routers (address and name): the cached list, or a fresh one from the
    /// controller.
    pub(crate) async fn routers(&self, refresh: bool) -> Result<Vec<RouterTarget>, SdkError> {
        let cached = || lock(&self.inner.routers).clone().filter(|c| !c.is_empty());
        if !refresh {
            if let Some(cached) = cached() {
                return Ok(cached);
            }
        }
        let asked = Instant::now();
        let mut refreshed = self.inner.refreshed.lock().await;
        if refreshed.is_some_and(|at| at >= asked) {
            // A refresh ended while this one waited for its turn: its answer is as fresh.
            if let Some(cached) = cached() {
                return Ok(cached);
            }
        }
        // `edge` caches the list.
        let view = self.edge().await;
        *refreshed = Some(Instant::now());
        Ok(targets(view?.routers))
    }

    /// The live connection to a router made with the current certificate, connecting if there
    /// is none. A connection made with an earlier certificate is left to its streams (and used
    /// only while a new one cannot be made).
    pub(crate) async fn connection(&self, router: &RouterTarget) -> Result<Connection, SdkError> {
        self.connection_with(router, true).await.map(|(c, _)| c)
    }

    /// Like [`Context::connection`], also saying which certificate (serial) the connection was
    /// made with; with `allow_older` false, only a connection made with the current one.
    pub(crate) async fn connection_with(
        &self,
        router: &RouterTarget,
        allow_older: bool,
    ) -> Result<(Connection, Serial), SdkError> {
        self.start_renewal();
        let (serial, quic) = self.quic_config(router.name.as_ref())?;
        let key = (router.clone(), self.lane_id());
        let live = |allow_older: bool| {
            let conns = lock(&self.inner.conns);
            let (c, s) = conns
                .get(&key)
                .filter(|(c, _)| c.close_reason().is_none())?;
            (*s == serial || allow_older).then(|| (c.clone(), s.clone()))
        };
        if let Some(current) = live(false) {
            return Ok(current);
        }
        // A burst of dials with no connection (an agent's connections arriving together at a
        // tunneler) makes one attempt, not one each: the router refuses an identity's
        // connections past its bound, and each refused one cost its dial a backoff.
        let started = Instant::now();
        let gate = Arc::clone(lock(&self.inner.connecting).entry(key.clone()).or_default());
        let mut last_failure = gate.lock().await;
        if let Some(current) = live(false) {
            return Ok(current);
        }
        // A live connection made with an earlier certificate: replaced, but still usable if
        // a new connection cannot be made right now.
        let older = live(allow_older);
        if last_failure.is_some_and(|failed| failed >= started) {
            // The attempt this dial waited for failed: no second one for the same burst.
            return older.ok_or_else(|| SdkError::Unavailable(router.addr.clone()));
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
        let result = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(&router.addr, quic))
            .await
            .map_err(|_| SdkError::Timeout(router.addr.clone()))
            .and_then(|r| r);
        let conn = match result {
            Ok(conn) => {
                lock(&self.inner.backoff).remove(router);
                conn
            }
            Err(e) => {
                *last_failure = Some(Instant::now());
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
        lock(&self.inner.conns).insert(key, (conn.clone(), serial.clone()));
        let listeners = Arc::clone(&self.inner.listeners);
        match &self.lane {
            Some(lane) => drop(lane.runtime.spawn(accept_incoming(
                conn.clone(),
                listeners,
                lane.cancel.clone(),
            ))),
            None => drop(tokio::spawn(accept_incoming(
                conn.clone(),
                listeners,
                self.inner.cancel.clone(),
            ))),
        }
        Ok((conn, serial))
    }

    /// Records a failed connection to `router`: it is tried after the others until its backoff
    /// (doubling with each failure in a row) has passed.
    fn back_off(&self, router: &RouterTarget) {
        let mut backoff = lock(&self.inner.backoff);
        let failures = backoff.get(router).map_or(0, |(n, _)| *n).saturating_add(1);
        let pause = RECONNECT_MIN
            .saturating_mul(1 << failures.saturating_sub(1).min(16))
            .min(RECONNECT_MAX);
        tracing::debug!(%router, failures, ?pause, "router unreachable; backing off");
        backoff.insert(router.clone(), (failures, Instant::now() + pause));
    }

    async fn connect(
        &self,
        router: &str,
        mut quic: quinn::ClientConfig,
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
        // Only the low byte matters: it is a hint for spreading, not a name.
        let slot = self.inner.slot_base.wrapping_add(self.lane_id() as u8);
        quic.initial_dst_cid_provider(Arc::new(move || umbra_transport::quic::initial_cid(slot)));
        let connecting = {
            // The connection's driver is spawned here: on the lane's runtime for a lane.
            let _on_lane = self.lane.as_ref().map(|l| l.runtime.enter());
            endpoint
                .connect_with(quic, addr, ROUTER_SERVER_NAME)
                .map_err(|e| SdkError::Protocol(e.to_string()))?
        };
        let conn = connecting.await.map_err(|e| connection_error(&e, router))?;
        tracing::debug!(%router, "connected to router");
        Ok(conn)
    }

    /// The client endpoint for the address family of `addr` and this handle's lane, created on
    /// first use (on the lane's runtime).
    fn endpoint(&self, addr: SocketAddr) -> Result<Endpoint, SdkError> {
        let mut eps = lock(&self.inner.endpoints);
        let key = (addr.is_ipv4(), self.lane_id());
        let bind = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        if let Some(ep) = eps.get(&key) {
            return Ok(ep.clone());
        }
        let bind: SocketAddr = bind
            .parse()
            .map_err(|_| SdkError::Protocol("bind address".into()))?;
        let unreachable = |source| SdkError::Unreachable {
            addr: addr.to_string(),
            source,
        };
        let socket = std::net::UdpSocket::bind(bind).map_err(unreachable)?;
        if let Some(got) =
            umbra_transport::quic::size_buffers(&socket, umbra_transport::quic::SOCKET_BUFFER)
        {
            tracing::debug!(got, "UDP receive buffer smaller than asked");
        }
        // The socket's registration and the endpoint's driver belong to the lane's runtime.
        let _on_lane = self.lane.as_ref().map(|l| l.runtime.enter());
        let runtime = quinn::default_runtime()
            .ok_or_else(|| unreachable(std::io::Error::other("no async runtime")))?;
        let ep = Endpoint::new(
            umbra_transport::quic::endpoint_config(),
            None,
            socket,
            runtime,
        )
        .map_err(unreachable)?;
        eps.insert(key, ep.clone());
        Ok(ep)
    }
}

/// Bytes to send before the router has answered a dial (see [`Context::dial_early`]): a
/// future that yields them, raced against the router's answer, and kept once it has yielded.
pub struct Early<'a>(EarlyState<'a>);

enum EarlyState<'a> {
    Nothing,
    Pending(std::pin::Pin<Box<dyn std::future::Future<Output = bytes::Bytes> + Send + 'a>>),
    Ready(bytes::Bytes),
}

impl<'a> Early<'a> {
    /// No early bytes: a plain dial.
    pub fn none() -> Early<'a> {
        Early(EarlyState::Nothing)
    }

    /// Early bytes from `read`, which is polled only while a dial waits for a router's answer
    /// and dropped unfinished if the answer comes first: it must lose nothing when dropped
    /// (`TcpStream::readable` followed by `try_read` is such a read).
    pub fn new(read: impl std::future::Future<Output = bytes::Bytes> + Send + 'a) -> Early<'a> {
        Early(EarlyState::Pending(Box::pin(read)))
    }

    /// The bytes read so far, if the future has yielded (they have then been sent).
    pub fn taken(&self) -> Option<&bytes::Bytes> {
        match &self.0 {
            EarlyState::Ready(b) => Some(b),
            _ => None,
        }
    }
}

impl std::fmt::Debug for Early<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            EarlyState::Nothing => f.write_str("Early::none"),
            EarlyState::Pending(_) => f.write_str("Early::pending"),
            EarlyState::Ready(b) => write!(f, "Early::ready({} bytes)", b.len()),
        }
    }
}

/// Opens a stream, sends a request (and any early bytes) and reads the router's answer.
pub(crate) async fn request(
    conn: &Connection,
    op: Op,
    service: &Name,
    early: &mut Early<'_>,
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
        if let EarlyState::Ready(b) = &early.0 {
            send.write_all(b).await.map_err(|e| write_error(e, what))?;
        }
        let mut resp = [0u8; 2];
        let answered = {
            let answer = recv.read_exact(&mut resp);
            tokio::pin!(answer);
            loop {
                let EarlyState::Pending(read) = &mut early.0 else {
                    break answer.await;
                };
                tokio::select! {
                    biased;
                    r = &mut answer => break r,
                    b = read.as_mut() => {
                        send.write_all(&b).await.map_err(|e| write_error(e, what))?;
                        early.0 = EarlyState::Ready(b);
                    }
                }
            }
        };
        answered.map_err(|e| match e {
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
            Status::Unavailable => Err(unavailable_or_limit(&send, what).await),
            Status::BadRequest => Err(SdkError::Protocol(
                "the router refused the request as malformed".into(),
            )),
        }
    };
    tokio::time::timeout(RESPONSE_TIMEOUT, exchange)
        .await
        .map_err(|_| SdkError::Timeout(what.to_owned()))?
}

/// What an "unavailable" answer meant. The status byte is shared by a router that cannot serve
/// (try another) and a limit of ours (a grant's `connections` or `rate`, or the router's books:
/// another router would only spread the load a limit exists to bound); the router tells them
/// apart with the code it stops our half of the stream with, which arrives with the answer.
async fn unavailable_or_limit(send: &quinn::SendStream, what: &str) -> SdkError {
    match tokio::time::timeout(STOP_CODE_WAIT, send.stopped()).await {
        Ok(Ok(Some(code))) => match SdkError::from_code(code.into_inner(), what) {
            SdkError::Limit => SdkError::Limit,
            _ => SdkError::Unavailable(what.to_owned()),
        },
        _ => SdkError::Unavailable(what.to_owned()),
    }
}

/// How long an "unavailable" answer waits for the stream's stop code (it is sent at once).
const STOP_CODE_WAIT: Duration = Duration::from_millis(100);

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

/// Successive views of an identity's services and routers (see [`Context::watch_edge`]). The
/// controller sends the whole view once and then diffs; each is applied here, so every call
/// still yields a whole view.
pub struct EdgeWatch {
    stream: ResponseStream,
    decoder: EdgeWatchDecoder,
}

impl std::fmt::Debug for EdgeWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeWatch").finish_non_exhaustive()
    }
}

impl EdgeWatch {
    /// The next view; `None` when the controller ended the watch. The controller sends a
    /// keepalive on an idle watch; after three missed ones the connection is taken for dead
    /// (a half-open TCP connection never ends by itself) and this fails, so the caller
    /// reconnects. A diff that does not fit the view fails too (never a wrong view): the
    /// caller watches again and gets a whole view first.
    pub async fn next(&mut self) -> Result<Option<EdgeView>, SdkError> {
        let silence = umbra_proto::follow::session_silence(umbra_proto::follow::DEFAULT_HEARTBEAT);
        loop {
            if let Some(view) = self
                .decoder
                .next()
                .map_err(|e| SdkError::Protocol(e.to_string()))?
            {
                return Ok(Some(view.clone()));
            }
            let chunk = match tokio::time::timeout(silence, self.stream.chunk()).await {
                Ok(c) => c,
                Err(_) => {
                    // The next watch tries another controller first, if there is one.
                    self.stream.mark_dead();
                    return Err(SdkError::Protocol(format!(
                        "no word from the controller for {silence:?}"
                    )));
                }
            };
            match chunk? {
                Some(bytes) => self.decoder.push(&bytes),
                None => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, advertise: Option<&str>) -> RouterInfo {
        RouterInfo {
            id: IdentityId::new(format!("id-{name}")).unwrap(),
            name: Name::new(name).unwrap(),
            advertise: advertise.map(str::to_owned),
        }
    }

    fn pinned(addr: &str, name: &str) -> RouterTarget {
        RouterTarget {
            addr: addr.to_owned(),
            name: Some(Name::new(name).unwrap()),
        }
    }

    #[test]
    fn listed_routers_are_pinned_to_their_names() {
        let t = targets(vec![
            info("r1", Some("10.0.0.1:4433")),
            info("r2", None),
            info("r3", Some("10.0.0.3:4433")),
        ]);
        assert_eq!(
            t,
            vec![pinned("10.0.0.1:4433", "r1"), pinned("10.0.0.3:4433", "r3")]
        );
    }

    #[test]
    fn a_bare_address_is_pinned_when_listed_and_unpinned_only_when_not() {
        let known = vec![
            pinned("10.0.0.1:4433", "r1"),
            pinned("10.0.0.2:4433", "r2"),
            pinned("10.0.0.2:4433", "r3"),
        ];
        assert_eq!(
            targets_for("10.0.0.1:4433", &known),
            vec![pinned("10.0.0.1:4433", "r1")]
        );
        // Two routers listed at one address: each is tried, each pinned to its own name.
        assert_eq!(
            targets_for("10.0.0.2:4433", &known),
            vec![pinned("10.0.0.2:4433", "r2"), pinned("10.0.0.2:4433", "r3")]
        );
        assert_eq!(
            targets_for("10.0.0.9:4433", &known),
            vec![RouterTarget {
                addr: "10.0.0.9:4433".to_owned(),
                name: None,
            }]
        );
    }

    #[test]
    fn targets_for_different_routers_at_one_address_are_distinct() {
        // Connections and backoffs are keyed by target: one verified for r2 is never reused
        // for r3.
        let a = pinned("10.0.0.2:4433", "r2");
        let b = pinned("10.0.0.2:4433", "r3");
        assert_ne!(a, b);
        let mut set = HashSet::new();
        set.insert(a);
        set.insert(b);
        assert_eq!(set.len(), 2);
    }
}
