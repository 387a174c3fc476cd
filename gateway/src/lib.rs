//! Umbra's gateways, hosted on the overlay through the SDK: they have no listening port, and
//! each request's caller is the identity the router verified.
//!
//! The LLM gateway ([`llm::Gateway`]) relays OpenAI Chat Completions and Responses and Anthropic
//! Messages to the configured providers, adding the provider's key itself; the caller's grants
//! (from the controller's policy) decide which models it may use, how many tokens per period and
//! how many requests per minute. Every request is metered from the provider's own usage reports
//! and recorded in a ledger that survives restarts.

pub mod config;
pub mod errors;
pub mod grants;
pub mod ledger;
pub mod llm;
pub mod mcp;
pub mod meter;
mod metrics;
pub mod sse;
pub mod upstream;

/// The response body type of the gateway's HTTP server.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

/// Serves HTTP/1.1 on every stream the listener accepts, each request handled with the caller
/// the router verified for its stream. Ends when the listener does.
pub(crate) fn serve<S, F, Fut>(
    mut listener: umbra_sdk::Listener,
    state: std::sync::Arc<S>,
    handler: F,
) -> tokio::task::JoinHandle<()>
where
    S: Send + Sync + 'static,
    F: Fn(
            std::sync::Arc<S>,
            std::sync::Arc<umbra_sdk::Caller>,
            http::Request<hyper::body::Incoming>,
        ) -> Fut
        + Copy
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = http::Response<Body>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let (stream, caller) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, service = %listener.service(), "the gateway's listener ended");
                    return;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let caller = std::sync::Arc::new(caller);
                let svc = hyper::service::service_fn(move |req| {
                    let (state, caller) = (state.clone(), caller.clone());
                    async move { Ok::<_, std::convert::Infallible>(handler(state, caller, req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(error = %e, "gateway connection ended");
                }
            });
        }
    })
}

pub use config::{Config, ConfigError};
pub use llm::{Gateway, GatewayError};

/// A response body fed from a channel: each chunk is written as soon as it is sent.
struct ChannelBody(tokio::sync::mpsc::Receiver<bytes::Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// An event-stream response whose body is whatever is sent on `rx`, unbuffered.
pub(crate) fn sse_response(rx: tokio::sync::mpsc::Receiver<bytes::Bytes>) -> http::Response<Body> {
    use http_body_util::BodyExt;
    let mut r = http::Response::new(ChannelBody(rx).boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    r
}
