//! The scrape endpoint: `GET /metrics` over plain HTTP/1.1.
//!
//! Bounded so that whoever can reach it cannot make it hold anything: at most
//! [`ServeOptions::max_connections`] connections at once, the oldest shed when another
//! arrives (a scrape takes milliseconds, so the oldest is one that sent nothing); each
//! connection serves one request within [`ServeOptions::request_timeout`], with headers of at
//! most hyper's smallest read buffer; nothing but `GET /metrics` is answered with data.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Registry;

/// The content type of the OpenMetrics text format `prometheus-client` writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How the endpoint is served.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Allow binding an address other than loopback. The exposition names services, models,
    /// tools and some identities, so by default only the host itself may read it.
    pub allow_non_loopback: bool,
    /// Connections held at once; another one sheds the oldest.
    pub max_connections: usize,
    /// How long a connection has to send its request and receive the answer.
    pub request_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            allow_non_loopback: false,
            max_connections: 16,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address is not a loopback one and the operator did not allow that.
    #[error("refusing to serve metrics on {0}, which is not a loopback address (the metrics name services, models and tools); allow it explicitly")]
    NotLoopback(SocketAddr),
    /// Binding failed.
    #[error("binding the metrics endpoint on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running scrape endpoint; dropping it (or [`MetricsServer::shutdown`]) stops it.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    cancel: CancellationToken,
    open: Arc<Mutex<VecDeque<(u64, CancellationToken)>>>,
}

impl MetricsServer {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections held now (never more than [`ServeOptions::max_connections`]).
    pub fn connections(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Stops accepting and ends every connection.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Binds `addr` and serves `registry` there until the returned server is dropped.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    opts: ServeOptions,
) -> Result<MetricsServer, ServeError> {
    if !addr.ip().is_loopback() && !opts.allow_non_loopback {
        return Err(ServeError::NotLoopback(addr));
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    let cancel = CancellationToken::new();
    let open = Arc::new(Mutex::new(VecDeque::new()));
    tokio::spawn(accept_loop(
        listener,
        registry,
        opts,
        cancel.clone(),
        Arc::clone(&open),
    ));
    tracing::info!(%local_addr, "serving metrics on /metrics");
    Ok(MetricsServer {
        local_addr,
        cancel,
        open,
    })
}

type Open = Arc<Mutex<VecDeque<(u64, CancellationToken)>>>;

async fn accept_loop(
    listener: TcpListener,
    registry: Registry,
    opts: ServeOptions,
    cancel: CancellationToken,
    open: Open,
) {
    let max = opts.max_connections.max(1);
    let mut next_id = 0u64;
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors, typically: wait rather than spin.
                    tracing::debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let id = next_id;
        next_id += 1;
        let conn_cancel = cancel.child_token();
        {
            let mut held = open.lock().unwrap_or_else(PoisonError::into_inner);
            while held.len() >= max {
                if let Some((_, oldest)) = held.pop_front() {
                    oldest.cancel();
                }
            }
            held.push_back((id, conn_cancel.clone()));
        }
        let (registry, open, timeout) = (registry.clone(), Arc::clone(&open), opts.request_timeout);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(answer(&registry, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .max_buf_size(8192)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn_cancel.cancelled() => {}
                _ = tokio::time::sleep(timeout) => {}
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "metrics connection ended");
                },
            }
            open.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|(i, _)| *i != id);
        });
    }
}

fn answer<B>(registry: &Registry, req: &http::Request<B>) -> Response<Full<Bytes>> {
    let (status, body, content_type) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, registry.encode(), CONTENT_TYPE),
        (&Method::GET, _) => (StatusCode::NOT_FOUND, String::new(), "text/plain"),
        _ => (StatusCode::METHOD_NOT_ALLOWED, String::new(), "text/plain"),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}
