//! A small HTTPS client for the controller's API: one TLS connection per call, HTTP/1.1, JSON.
//!
//! The TLS configuration decides whom we trust and who we are: pinned to a CA fingerprint for
//! enrollment, or the identity file's CA and certificate for everything else.

use std::sync::Arc;
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
use tokio_rustls::TlsConnector;
use umbra_pki::{IdentityFile, CONTROLLER_SERVER_NAME};
use umbra_proto::api::ErrorBody;

use crate::credentials::Credentials;
use crate::error::SdkError;

/// The largest response body read into memory.
const MAX_RESPONSE: usize = 64 * 1024 * 1024;
/// Connect plus handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A client bound to one controller address and one TLS identity.
#[derive(Clone)]
pub struct ControllerClient {
    addr: String,
    server_name: &'static str,
    tls: Tls,
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
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A streaming response body (the control channel).
pub struct ResponseStream {
    body: Incoming,
}

impl ResponseStream {
    /// The next chunk of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, SdkError> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(SdkError::Protocol(e.to_string())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

impl ControllerClient {
    /// A client with an explicit TLS configuration and server name.
    pub fn new(
        addr: impl Into<String>,
        server_name: &'static str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        ControllerClient {
            addr: addr.into(),
            server_name,
            tls: Tls::Fixed(tls),
        }
    }

    /// A client that authenticates with whatever certificate `credentials` holds when each
    /// connection is made (see [`crate::RenewingIdentity::controller`]).
    pub(crate) fn live(addr: String, credentials: watch::Receiver<Arc<Credentials>>) -> Self {
        ControllerClient {
            addr,
            server_name: CONTROLLER_SERVER_NAME,
            tls: Tls::Live(credentials),
        }
    }

    /// A client that authenticates as `identity` to the controller its file names (or `addr`).
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
        let tls = umbra_pki::client_config_with_clock(identity, &[b"http/1.1"], clock)?;
        Ok(ControllerClient::new(
            addr.unwrap_or(&identity.controller),
            CONTROLLER_SERVER_NAME,
            tls,
        ))
    }

    /// The controller address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, SdkError> {
        let body = Bytes::from(body.unwrap_or_default());
        self.send_with(method, path, "application/json", body, REQUEST_TIMEOUT)
            .await
    }

    async fn send_with(
        &self,
        method: Method,
        path: &str,
        content_type: &'static str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<hyper::Response<Incoming>, SdkError> {
        let addr = self.addr.clone();
        let connect = async {
            let tcp = TcpStream::connect(&addr)
                .await
                .map_err(|source| SdkError::Unreachable {
                    addr: addr.clone(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(self.server_name)
                .map_err(|e| SdkError::Protocol(e.to_string()))?;
            TlsConnector::from(self.tls.current())
                .connect(name, tcp)
                .await
                .map_err(|source| SdkError::Handshake {
                    addr: addr.clone(),
                    source,
                })
        };
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| SdkError::Timeout(addr.clone()))??;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| SdkError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "controller connection ended");
            }
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.server_name)
            .header("content-type", content_type)
            .body(Full::new(body))
            .map_err(|e| SdkError::Protocol(e.to_string()))?;
        let resp = tokio::time::timeout(timeout, sender.send_request(req))
            .await
            .map_err(|_| SdkError::Timeout(addr.clone()))?
            .map_err(|e| match tls_refusal(&e) {
                // In TLS 1.3 the server judges the client's certificate after the client
                // considers the handshake done, so a refusal arrives as an alert on first read.
                Some(reason) => SdkError::Handshake {
                    addr: addr.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, reason),
                },
                None => SdkError::Protocol(e.to_string()),
            })?;
        Ok(resp)
    }

    /// Sends a request and decodes the JSON answer; non-2xx answers become [`SdkError::Api`].
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, SdkError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| SdkError::Protocol(e.to_string()))?;
        let resp = self.send(method, path, body).await?;
        self.answer(resp, REQUEST_TIMEOUT).await
    }

    /// Sends a declarative document as it is (`application/yaml`, not wrapped in JSON, so that
    /// neither end holds it twice) and decodes the JSON answer. A large document takes the
    /// controller a while to plan and commit, hence the caller's `timeout`.
    pub async fn send_document<T: DeserializeOwned>(
        &self,
        path: &str,
        document: Bytes,
        timeout: Duration,
    ) -> Result<T, SdkError> {
        let resp =
            (self.send_with(Method::POST, path, "application/yaml", document, timeout)).await?;
        self.answer(resp, timeout).await
    }

    async fn answer<T: DeserializeOwned>(
        &self,
        resp: hyper::Response<Incoming>,
        timeout: Duration,
    ) -> Result<T, SdkError> {
        let status = resp.status();
        let bytes = tokio::time::timeout(
            timeout,
            Limited::new(resp.into_body(), MAX_RESPONSE).collect(),
        )
        .await
        .map_err(|_| SdkError::Timeout(self.addr.clone()))?
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

    /// Sends a GET whose answer is a long-lived stream.
    pub async fn stream(&self, path: &str) -> Result<ResponseStream, SdkError> {
        let resp = self.send(Method::GET, path, None).await?;
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
        })
    }
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
