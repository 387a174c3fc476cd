//! The data-plane client: an identity's connections to routers, and dialing and hosting services
//! through them.
//!
//! Routers are learned from the controller (`GET /v1/edge`); one QUIC connection per router is
//! kept and reused for every stream. A dial tries the connected routers first, then the others
//! the controller lists, so one router going away costs a retry, not an outage.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, VarInt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use umbra_pki::{ExpectedServer, IdentityFile};
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
    identity: IdentityFile,
    controller: ControllerClient,
    quic: quinn::ClientConfig,
    endpoints: Mutex<(Option<Endpoint>, Option<Endpoint>)>,
    conns: Mutex<HashMap<String, Connection>>,
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
            .field("identity", &self.inner.identity.spiffe().to_string())
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
    pub fn with_controller(
        identity: IdentityFile,
        controller: Option<&str>,
    ) -> Result<Context, SdkError> {
        let controller = ControllerClient::for_identity(&identity, controller)?;
        let tls = umbra_pki::client_config_spiffe(
            &identity,
            ExpectedServer::AnyOfKind(IdentityKind::Router),
            &[ALPN],
        )?;
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| SdkError::Protocol(e.to_string()))?;
        let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(Duration::from_secs(10)))
            .max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(30)).ok())
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .max_concurrent_bidi_streams(VarInt::from_u32(256))
            .stream_receive_window(VarInt::from_u32(2 * 1024 * 1024))
            .receive_window(VarInt::from_u32(16 * 1024 * 1024));
        quic.transport_config(Arc::new(transport));
        Ok(Context {
            inner: Arc::new(Inner {
                identity,
                controller,
                quic,
                endpoints: Mutex::new((None, None)),
                conns: Mutex::new(HashMap::new()),
                routers: Mutex::new(Vec::new()),
                listeners: Arc::new(Mutex::new(HashMap::new())),
                cancel: CancellationToken::new(),
            }),
        })
    }

    /// The identity this context acts as.
    pub fn identity(&self) -> &IdentityFile {
        &self.inner.identity
    }

    /// What this identity may use and where the routers are (`GET /v1/edge`).
    pub async fn edge(&self) -> Result<EdgeView, SdkError> {
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
                // Routers we are connected to first: no handshake, and known to be up.
                let conns = lock(&self.inner.conns);
                routers.sort_by_key(|a| conns.get(a).is_none_or(|c| c.close_reason().is_some()));
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
                lock(&self.inner.conns).remove(router);
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
        match crate::listener::bind_all(self, &name, &HashSet::new()).await {
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

    /// The live connection to a router, connecting if there is none.
    pub(crate) async fn connection(&self, router: &str) -> Result<Connection, SdkError> {
        if let Some(c) = lock(&self.inner.conns).get(router) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(router))
            .await
            .map_err(|_| SdkError::Timeout(router.to_owned()))??;
        lock(&self.inner.conns).insert(router.to_owned(), conn.clone());
        let listeners = Arc::clone(&self.inner.listeners);
        tokio::spawn(accept_incoming(
            conn.clone(),
            listeners,
            self.inner.cancel.clone(),
        ));
        Ok(conn)
    }

    async fn connect(&self, router: &str) -> Result<Connection, SdkError> {
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
            .connect_with(self.inner.quic.clone(), addr, ROUTER_SERVER_NAME)
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
