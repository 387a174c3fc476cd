//! The request the provider gets, built from scratch: never the client's headers, only the
//! gateway's key and the headers the configuration allows.

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use serde_json::Value;

use super::headers::{self, DEFAULT_ANTHROPIC_VERSION};
use super::Ask;
use crate::config::{Provider, ProviderKind};

/// The provider's request for `ask`, with `body` as rewritten by the gateway.
pub(super) fn upstream_request(
    p: &Provider,
    ask: &Ask,
    body: &Value,
) -> Result<Request<Full<Bytes>>, String> {
    let suffix = ask.endpoint.strip_prefix("/v1").unwrap_or(&ask.endpoint);
    let uri = format!("{}{}", p.prefix, suffix);
    let host = if (p.tls && p.port == 443) || (!p.tls && p.port == 80) {
        p.host.clone()
    } else {
        format!("{}:{}", p.host, p.port)
    };
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(http::header::HOST, host)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "umbra-gateway");
    if ask.stream {
        b = b.header(http::header::ACCEPT, "text/event-stream");
    }
    // Only the gateway's key goes upstream; whatever the agent sent was never copied.
    match p.kind {
        ProviderKind::Openai => {
            if let Some(k) = &p.key {
                b = b.header(
                    http::header::AUTHORIZATION,
                    format!("Bearer {}", k.expose()),
                );
            }
        }
        ProviderKind::Anthropic => {
            if let Some(k) = &p.key {
                b = b.header("x-api-key", k.expose());
            }
        }
    }
    // Client headers only as allowed, item by item; anything that enables a provider feature
    // under the organization's key is the configuration's decision, not the agent's.
    let forwarded = headers::forwarded(&p.forward_headers, &ask.headers);
    if p.kind == ProviderKind::Anthropic && !forwarded.iter().any(|(k, _)| k == "anthropic-version")
    {
        b = b.header("anthropic-version", DEFAULT_ANTHROPIC_VERSION);
    }
    for (k, v) in forwarded {
        b = b.header(k, v);
    }
    b.body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())
}

/// The message inside a provider's error body, if it has one.
pub(super) fn upstream_message(bytes: &[u8]) -> String {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned())
}
