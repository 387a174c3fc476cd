//! Requests to the providers: one HTTP/1.1 connection per request (TLS with the Web PKI roots
//! for `https`), so that dropping a response cancels the provider's work at once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::Provider;

/// Why a provider could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP or TLS failed, or it took too long.
    #[error("cannot reach {0}: {1}")]
    Connect(String, String),
    /// The HTTP exchange failed.
    #[error("{0}: {1}")]
    Http(String, String),
}

/// The client side of the gateway.
#[derive(Clone)]
pub struct Upstream {
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upstream")
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a provider may take to start answering.
const HEADERS_TIMEOUT: Duration = Duration::from_secs(300);

impl Default for Upstream {
    fn default() -> Self {
        Upstream::new()
    }
}

impl Upstream {
    /// A client that trusts the Web PKI roots.
    pub fn new() -> Upstream {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth())
            .unwrap_or_else(|_| {
                // The ring provider supports the default versions; this branch is unreachable in
                // practice and still yields a working (empty-root) client rather than a panic.
                rustls::ClientConfig::builder()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            });
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Upstream {
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        }
    }

    /// Sends `req` (whose URI is a path) to the provider.
    pub async fn send(
        &self,
        p: &Provider,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.send_to(p.tls, &p.host, p.port, req).await
    }

    /// Sends `req` (whose URI is a path) to `host:port`, over TLS if `tls`, on a connection
    /// of its own.
    pub async fn send_to(
        &self,
        tls: bool,
        host: &str,
        port: u16,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let who = format!("{host}:{port}");
        let mut sender = self.open(tls, host, port).await?;
        tokio::time::timeout(HEADERS_TIMEOUT, sender.send_request(req))
            .await
            .map_err(|_| UpstreamError::Http(who.clone(), "no answer".into()))?
            .map_err(|e| UpstreamError::Http(who, e.to_string()))
    }
}

impl Upstream {
    /// An HTTP/1.1 connection to `host:port` for several requests in turn (a pool keeps it).
    pub async fn open(
        &self,
        tls: bool,
        host: &str,
        port: u16,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, UpstreamError> {
        let who = format!("{host}:{port}");
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
            .await
            .map_err(|_| UpstreamError::Connect(who.clone(), "timed out".into()))?
            .map_err(|e| UpstreamError::Connect(who.clone(), e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        if tls {
            let name = rustls_pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| UpstreamError::Connect(who.clone(), e.to_string()))?;
            let io = tokio::time::timeout(CONNECT_TIMEOUT, self.tls.connect(name, tcp))
                .await
                .map_err(|_| UpstreamError::Connect(who.clone(), "TLS timed out".into()))?
                .map_err(|e| UpstreamError::Connect(who.clone(), e.to_string()))?;
            handshake(io, who).await
        } else {
            handshake(tcp, who).await
        }
    }
}

async fn handshake<I>(
    io: I,
    who: String,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, UpstreamError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| UpstreamError::Http(who, e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}
