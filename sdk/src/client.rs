//! A small HTTPS client for the controller's API: one TLS connection per call, HTTP/1.1, JSON.
//!
//! The TLS configuration decides whom we trust and who we are: pinned to a CA fingerprint for
//! enrollment, or the identity file's CA and certificate for everything else.
//!
//! **Several controllers.** A client holds a list of controller addresses (see
//! [`umbra_pki::ControllerAddrs`]) and fails over between them. Each call tries the controller
//! that last answered first, then the others in the list's order, those that failed lately
//! last (see `failover`). Connecting (TCP and TLS) to one address is bounded by
//! [`ADDRESS_TIMEOUT`] while another address remains to be tried, so a dead or black-holed
//! controller costs about a second, and the whole connection phase of a call by
//! [`CONNECT_TIMEOUT`] (the last address tried gets what is left of it).
//!
//! What may be retried on another controller depends on whether the request may have reached
//! the first one:
//! - until the request is written (no connection, no TLS, a connection that closed before
//!   hyper wrote the request), nothing was sent: every call fails over;
//! - once it may have been sent, only calls whose repetition changes nothing are retried
//!   elsewhere: `GET`s (reads, and the long-lived control and edge-view streams) and calls made
//!   with [`ControllerClient::call_idempotent`] (renewal: a second certificate for the same new
//!   key, which never left this machine, harms nothing). Everything else fails with
//!   [`SdkError::Interrupted`] instead of being sent twice: an enrollment may have spent its
//!   one-time token (a retry would only say "token already used" and hide what happened), an
//!   `identity create` may have created the identity and its token (a retry says "name taken"
//!   and the token is lost), a grant, delete or audit report may have been committed.
//! - a controller that answers, even with an error status, or that refuses our certificate in
//!   the TLS handshake, has decided: its answer is returned, not retried elsewhere (the
//!   controllers share one database, so another would decide the same).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::{de::DeserializeOwned, Serialize};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use umbra_pki::{ControllerAddrs, IdentityFile, CONTROLLER_SERVER_NAME};
use umbra_proto::api::ErrorBody;

use crate::credentials::Credentials;
use crate::error::SdkError;
use crate::failover::Rotation;
use crate::sync::lock;

/// The largest response body read into memory.
const MAX_RESPONSE: usize = 64 * 1024 * 1024;
/// Connect plus handshake, over all the addresses one call tries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect plus handshake to one address while others remain to be tried: how long a dead or
/// black-holed controller (one that accepts and never answers TLS) holds up a failover. A
/// controller further than this needs to be the last one tried, which gets the rest of
/// [`CONNECT_TIMEOUT`].
const ADDRESS_TIMEOUT: Duration = Duration::from_secs(1);
/// A whole request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A client of one or several controllers, with one TLS identity. Clones share what they learn
/// about which controller answers.
#[derive(Clone)]
pub struct ControllerClient {
    addrs: Arc<[String]>,
    rotation: Arc<Mutex<Rotation>>,
    server_name: &'static str,
    tls: Tls,
}

/// Whether a request may go to another controller after it may have reached one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Only before it was sent: it changes something (see the module's documentation).
    BeforeSent,
    /// Also after: repeating it changes nothing.
    Always,
}

impl Retry {
    fn for_method(method: &Method) -> Retry {
        if method == Method::GET || method == Method::HEAD {
            Retry::Always
        } else {
            Retry::BeforeSent
        }
    }
}

/// How one attempt at one address failed.
enum Failure {
    /// Nothing reached the controller: try the next address.
    NotSent(SdkError),
    /// The controller refused us (a TLS alert about our certificate): its decision.
    Refused(SdkError),
    /// The request may have reached the controller.
    MaybeSent(SdkError),
}

/// Where a client's TLS configuration comes from.
#[derive(Clone)]
enum Tls {
    /// One configuration for the client's whole life.
    Fixed(Arc<rustls::ClientConfig>),
    /// The current credentials of an identity that renews itself: every new connection
    /// presents the newest certificate, so a long-lived client outlives any one certificate.
    Live(watch::Receiver<Arc<Credentials>>),
}

impl Tls {
    fn current(&self) -> Arc<rustls::ClientConfig> {
        match self {
            Tls::Fixed(c) => Arc::clone(c),
            Tls::Live(rx) => rx.borrow().controller_tls(),
        }
    }
}

impl std::fmt::Debug for ControllerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerClient")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

/// A streaming response body (the control channel, an edge-view watch). It remembers which
/// controller it came from: if it fails, that controller goes to the back of its client's
/// order, so the caller's next attempt tries another one first.
pub struct ResponseStream {
    body: Incoming,
    origin: Origin,
}

/// The controller a stream came from, and the rotation to tell when it fails.
struct Origin {
    index: usize,
    addr: String,
    rotation: Arc<Mutex<Rotation>>,
}

impl Origin {
    fn failed(&self) {
        lock(&self.rotation).failed(self.index);
    }
}

impl ResponseStream {
    /// The next chunk of the body; `None` at its end. An error counts against the controller
    /// the stream came from (see [`ResponseStream`]).
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, SdkError> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => {
                    self.origin.failed();
                    return Err(SdkError::Protocol(e.to_string()));
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// The controller this stream came from.
    pub fn addr(&self) -> &str {
        &self.origin.addr
    }

    /// The caller takes the stream for dead (it fell silent: a half-open connection never ends
    /// by itself): its controller goes to the back of the order, as if the stream had failed.
    /// The caller then drops the stream.
    pub fn mark_dead(&self) {
        self.origin.failed();
    }
}

impl ControllerClient {
    /// A client of the controllers `addrs` with an explicit TLS configuration and server name.
    pub fn new(
        addrs: &ControllerAddrs,
        server_name: &'static str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        Self::with_tls(addrs, server_name, Tls::Fixed(tls))
    }

    fn with_tls(addrs: &ControllerAddrs, server_name: &'static str, tls: Tls) -> Self {
        let addrs: Arc<[String]> = addrs.iter().map(ToString::to_string).collect();
        ControllerClient {
            rotation: Arc::new(Mutex::new(Rotation::new(addrs.len()))),
            addrs,
            server_name,
            tls,
        }
    }

    /// A client that authenticates with whatever certificate `credentials` holds when each
    /// connection is made (see [`crate::RenewingIdentity::controller`]), sharing `rotation`
    /// with the identity's other clients so that all of them go to the controller that answers.
    pub(crate) fn live(
        addrs: Arc<[String]>,
        rotation: Arc<Mutex<Rotation>>,
        credentials: watch::Receiver<Arc<Credentials>>,
    ) -> Self {
        ControllerClient {
            addrs,
            rotation,
            server_name: CONTROLLER_SERVER_NAME,
            tls: Tls::Live(credentials),
        }
    }

    /// A client that authenticates as `identity` to the controllers its file names, or to
    /// `addr` (one `host:port` or a comma-separated list) instead.
    pub fn for_identity(identity: &IdentityFile, addr: Option<&str>) -> Result<Self, SdkError> {
        Self::for_identity_with_clock(identity, addr, &umbra_clock::Clock::system())
    }

    /// [`ControllerClient::for_identity`] judging the controller's certificate at `clock`'s
    /// time (a renewing identity's clock, so that a test's manual clock governs the handshake).
    pub fn for_identity_with_clock(
        identity: &IdentityFile,
        addr: Option<&str>,
        clock: &umbra_clock::Clock,
    ) -> Result<Self, SdkError> {
        let addrs = controllers(identity, addr)?;
        let tls = umbra_pki::client_config_with_clock(identity, &[b"http/1.1"], clock)?;
        Ok(ControllerClient::new(&addrs, CONTROLLER_SERVER_NAME, tls))
    }

    /// The controller that answered last (before any did: the first in the list).
    pub fn addr(&self) -> &str {
        let i = lock(&self.rotation).preferred().unwrap_or(0);
        self.addrs.get(i).map_or("", String::as_str)
    }

    /// Every controller address, in the list's order.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        retry: Retry,
    ) -> Result<(hyper::Response<Incoming>, usize), SdkError> {
        let body = Bytes::from(body.unwrap_or_default());
        self.send_with(
            method,
            path,
            "application/json",
            body,
            REQUEST_TIMEOUT,
            retry,
        )
        .await
    }

    /// Sends the request to the controllers in the rotation's order, by the rules in the
    /// module's documentation; returns the answer and the index of the controller that gave
    /// it.
    async fn send_with(
        &self,
        method: Method,
        path: &str,
        content_type: &'static str,
        body: Bytes,
        timeout: Duration,
        retry: Retry,
    ) -> Result<(hyper::Response<Incoming>, usize), SdkError> {
        let order = lock(&self.rotation).order();
        let started = Instant::now();
        let mut errors = Vec::new();
        for (k, &i) in order.iter().enumerate() {
            let Some(addr) = self.addrs.get(i) else {
                continue;
            };
            let left = CONNECT_TIMEOUT.saturating_sub(started.elapsed());
            if left.is_zero() || (k > 0 && started.elapsed() >= timeout) {
                break;
            }
            let bound = if k + 1 == order.len() {
                left
            } else {
                left.min(ADDRESS_TIMEOUT)
            };
            let attempt = async {
                let tls = tokio::time::timeout(bound, self.connect(addr))
                    .await
                    .map_err(|_| Failure::NotSent(SdkError::Timeout(addr.clone())))?
                    .map_err(Failure::NotSent)?;
                self.request(
                    tls,
                    addr,
                    &method,
                    path,
                    content_type,
                    body.clone(),
                    timeout,
                )
                .await
            };
            match attempt.await {
                Ok(resp) => {
                    lock(&self.rotation).succeeded(i);
                    if k > 0 {
                        tracing::info!(controller = %addr, failed = errors.len(), "failed over to another controller");
                    }
                    return Ok((resp, i));
                }
                Err(Failure::Refused(e)) => return Err(e),
                Err(Failure::NotSent(e)) => {
                    tracing::debug!(controller = %addr, error = %e, "controller unreachable; trying the next");
                    lock(&self.rotation).failed(i);
                    errors.push(e);
                }
                Err(Failure::MaybeSent(e)) => {
                    lock(&self.rotation).failed(i);
                    if retry == Retry::BeforeSent {
                        return Err(e);
                    }
                    tracing::debug!(controller = %addr, error = %e, "request failed; repeating it on the next controller");
                    errors.push(e);
                }
            }
        }
        Err(match errors.len() {
            0 => SdkError::Timeout(self.addrs.join(",")),
            1 => errors.remove(0),
            _ => SdkError::NoController(errors),
        })
    }

    /// TCP, then TLS, to one address.
    async fn connect(&self, addr: &str) -> Result<TlsStream<TcpStream>, SdkError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| SdkError::Unreachable {
                addr: addr.to_owned(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.server_name)
            .map_err(|e| SdkError::Protocol(e.to_string()))?;
        TlsConnector::from(self.tls.current())
            .connect(name, tcp)
            .await
            .map_err(|source| SdkError::Handshake {
                addr: addr.to_owned(),
                source,
            })
    }

    /// One request on a fresh connection; says whether a failure may have reached the
    /// controller.
    #[allow(clippy::too_many_arguments)]
    async fn request(
        &self,
        tls: TlsStream<TcpStream>,
        addr: &str,
        method: &Method,
        path: &str,
        content_type: &'static str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<hyper::Response<Incoming>, Failure> {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| Failure::NotSent(SdkError::Protocol(e.to_string())))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "controller connection ended");
            }
        });
        let req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", self.server_name)
            .header("content-type", content_type)
            .body(Full::new(body))
            .map_err(|e| Failure::NotSent(SdkError::Protocol(e.to_string())))?;
        let resp = tokio::time::timeout(timeout, sender.try_send_request(req))
            .await
            .map_err(|_| Failure::MaybeSent(SdkError::Timeout(addr.to_owned())))?;
        match resp {
            Ok(resp) => Ok(resp),
            Err(mut e) => {
                // hyper hands the request back when it never started writing it.
                let unsent = e.take_message().is_some();
                let e = e.into_error();
                if let Some(reason) = tls_refusal(&e) {
                    // In TLS 1.3 the server judges the client's certificate after the client
                    // considers the handshake done, so a refusal arrives as an alert on first
                    // read. The controller read no request: it refused who we are.
                    return Err(Failure::Refused(SdkError::Handshake {
                        addr: addr.to_owned(),
                        source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, reason),
                    }));
                }
                if unsent {
                    Err(Failure::NotSent(SdkError::Protocol(e.to_string())))
                } else {
                    Err(Failure::MaybeSent(SdkError::Interrupted {
                        addr: addr.to_owned(),
                        reason: e.to_string(),
                    }))
                }
            }
        }
    }

    /// Sends a request and decodes the JSON answer; non-2xx answers become [`SdkError::Api`].
    /// A `GET` fails over to another controller at any point; anything else only until the
    /// request was sent (see the module's documentation).
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, SdkError> {
        let retry = Retry::for_method(&method);
        self.call_with(method, path, body, retry).await
    }

    /// [`ControllerClient::call`] for a request whose repetition changes nothing, even if it
    /// is not a `GET`: it fails over to another controller even after it may have reached
    /// one. The caller vouches for that (renewal does: see the module's documentation).
    pub async fn call_idempotent<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, SdkError> {
        self.call_with(method, path, body, Retry::Always).await
    }

    async fn call_with<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        retry: Retry,
    ) -> Result<T, SdkError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| SdkError::Protocol(e.to_string()))?;
        let (resp, i) = self.send(method, path, body, retry).await?;
        self.answer(resp, i, REQUEST_TIMEOUT).await
    }

    /// Sends a declarative document as it is (`application/yaml`, not wrapped in JSON, so that
    /// neither end holds it twice) and decodes the JSON answer. A large document takes the
    /// controller a while to plan and commit, hence the caller's `timeout`. Not repeated on
    /// another controller once sent.
    pub async fn send_document<T: DeserializeOwned>(
        &self,
        path: &str,
        document: Bytes,
        timeout: Duration,
    ) -> Result<T, SdkError> {
        let (resp, i) = self
            .send_with(
                Method::POST,
                path,
                "application/yaml",
                document,
                timeout,
                Retry::BeforeSent,
            )
            .await?;
        self.answer(resp, i, timeout).await
    }

    async fn answer<T: DeserializeOwned>(
        &self,
        resp: hyper::Response<Incoming>,
        from: usize,
        timeout: Duration,
    ) -> Result<T, SdkError> {
        let addr = self.addrs.get(from).cloned().unwrap_or_default();
        let status = resp.status();
        let bytes = tokio::time::timeout(
            timeout,
            Limited::new(resp.into_body(), MAX_RESPONSE).collect(),
        )
        .await
        .map_err(|_| SdkError::Timeout(addr))?
        .map_err(|e| SdkError::Protocol(format!("reading the response: {e}")))?
        .to_bytes();
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        let bytes = if bytes.is_empty() {
            Bytes::from_static(b"null")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| SdkError::Protocol(format!("unexpected response: {e}")))
    }

    /// Sends a GET whose answer is a long-lived stream, failing over like any `GET`.
    pub async fn stream(&self, path: &str) -> Result<ResponseStream, SdkError> {
        let (resp, i) = self.send(Method::GET, path, None, Retry::Always).await?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = Limited::new(resp.into_body(), 64 * 1024)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            return Err(api_error(status, &bytes));
        }
        Ok(ResponseStream {
            body: resp.into_body(),
            origin: Origin {
                index: i,
                addr: self.addrs.get(i).cloned().unwrap_or_default(),
                rotation: Arc::clone(&self.rotation),
            },
        })
    }
}

/// The controllers a client of `identity` talks to: `addr` if given, else the file's.
pub(crate) fn controllers(
    identity: &IdentityFile,
    addr: Option<&str>,
) -> Result<ControllerAddrs, SdkError> {
    Ok(match addr {
        Some(a) => a.parse()?,
        None => identity.controller.parse()?,
    })
}

/// The TLS alert or certificate error behind a failed request, if that is what ended it.
fn tls_refusal(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(format!("refused by the peer: {tls}"));
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(format!("refused by the peer: {tls}"));
            }
        }
        cur = err.source();
    }
    None
}

fn api_error(status: StatusCode, bytes: &[u8]) -> SdkError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(e) => SdkError::Api {
            status: status.as_u16(),
            code: e.code,
            message: e.message,
        },
        Err(_) => SdkError::Api {
            status: status.as_u16(),
            code: "http".into(),
            message: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
        },
    }
}
