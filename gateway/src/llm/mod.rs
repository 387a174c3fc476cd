//! The LLM gateway: an HTTP/1.1 server on overlay streams (no listening port), where the caller
//! is the identity the router verified, its grants decide models, budget and rate, and the
//! provider's key is added here and nowhere else.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::watch;
use umbra_policies::Name;
use umbra_proto::api::HostedGrant;
use umbra_sdk::{Caller, Context, SdkError};

use crate::config::{Config, Model, ProviderKind};
use crate::errors::{self, Kind};
use crate::grants::{Grants, RateWindows};
use crate::ledger::{Ledger, Record};
use crate::meter::{self, Format, Usage};
use crate::upstream::Upstream;
use crate::Body;

mod admit;
pub mod bound;
pub mod headers;
mod relay;
mod request;

use admit::{admit, settle};
use relay::relay;
use request::{upstream_message, upstream_request};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Binding the service or watching the view failed.
    #[error(transparent)]
    Sdk(#[from] SdkError),
    /// The ledger could not be opened.
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    /// The service name is not a valid name.
    #[error("invalid service name: {0}")]
    Service(String),
}

/// Largest upstream response read whole (non-streamed).
const MAX_UPSTREAM_BODY: usize = 64 << 20;
/// Largest single SSE event relayed.
const MAX_EVENT: usize = 4 << 20;
/// How long a caller the router admitted may be missing from our view (a fresh grant) before
/// the gateway refuses it.
const VIEW_GRACE: Duration = Duration::from_millis(1500);

/// What every request of a running gateway shares.
struct Shared {
    cfg: Config,
    ledger: Ledger,
    grants: watch::Receiver<Arc<Grants>>,
    rate: RateWindows,
    upstream: Upstream,
    metrics: crate::metrics::LlmMetrics,
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    watcher: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("service", &self.shared.cfg.service)
            .finish()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
        self.watcher.abort();
    }
}

impl Gateway {
    /// Binds the configured service and serves it until dropped.
    pub async fn start(ctx: Context, cfg: Config) -> Result<Gateway, GatewayError> {
        let service =
            Name::new(cfg.service.as_str()).map_err(|e| GatewayError::Service(e.to_string()))?;
        let ledger = Ledger::open(&cfg.ledger)?;
        let (grants, watcher) = crate::grants::follow(ctx.clone(), service.as_str()).await?;
        let listener = ctx.bind(service.as_str()).await?;
        let shared = Arc::new(Shared {
            metrics: crate::metrics::LlmMetrics::new(cfg.metrics.as_ref()),
            cfg,
            ledger,
            grants,
            rate: RateWindows::default(),
            upstream: Upstream::new(),
        });
        let task = crate::serve(listener, shared.clone(), handle);
        Ok(Gateway {
            shared,
            task,
            watcher,
        })
    }

    /// The newest audit records of the ledger.
    pub fn recent(&self, limit: u32) -> Vec<Value> {
        self.shared.ledger.recent(limit).unwrap_or_default()
    }
}

/// The caller's grants, waiting briefly if the router admitted a caller our view does not list
/// yet (a grant made a moment ago).
async fn grants_of(s: &Shared, caller: &Caller) -> Vec<HostedGrant> {
    let mut rx = s.grants.clone();
    let deadline = tokio::time::Instant::now() + VIEW_GRACE;
    loop {
        let g = rx.borrow_and_update().of(&caller.id).to_vec();
        if !g.is_empty() {
            return g;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => return Vec::new(),
        }
    }
}

async fn handle(s: Arc<Shared>, caller: Arc<Caller>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/v1/models") => models(&s, &caller, &req).await,
        (Method::POST, "/v1/chat/completions") => detached(s, caller, req, Format::Chat).await,
        (Method::POST, "/v1/responses") => detached(s, caller, req, Format::Responses).await,
        (Method::POST, "/v1/messages") => detached(s, caller, req, Format::Messages).await,
        _ => errors::response(
            Format::Chat,
            Kind::NotFound,
            Some(StatusCode::NOT_FOUND),
            &format!("no route for {} {path}", req.method()),
            None,
        ),
    }
}

/// Runs a completion in a task of its own: a client that goes away drops this future, not the
/// request, which the provider bills anyway; it completes and is settled with what it spent,
/// instead of leaving its hold behind to shrink the budget until the next restart.
async fn detached(
    s: Arc<Shared>,
    caller: Arc<Caller>,
    req: Request<Incoming>,
    format: Format,
) -> Response<Body> {
    match tokio::spawn(complete(s, caller, req, format)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "a completion task failed");
            errors::response(format, Kind::Upstream, None, "internal error", None)
        }
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(v.to_string()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `GET /v1/models`: only what this caller may use (OpenAI's shape, or Anthropic's when the
/// request carries `anthropic-version`).
async fn models(s: &Shared, caller: &Caller, req: &Request<Incoming>) -> Response<Body> {
    let grants = grants_of(s, caller).await;
    let allowed: Vec<&Model> = s
        .cfg
        .models
        .values()
        .filter(|m| grants.iter().any(|g| g.limits.allows_model(&m.name)))
        .collect();
    let body = if req.headers().contains_key("anthropic-version") {
        let data: Vec<Value> = allowed
            .iter()
            .map(|m| json!({"type": "model", "id": m.name, "display_name": m.name, "created_at": "1970-01-01T00:00:00Z"}))
            .collect();
        json!({
            "data": data,
            "has_more": false,
            "first_id": allowed.first().map(|m| m.name.clone()),
            "last_id": allowed.last().map(|m| m.name.clone()),
        })
    } else {
        let data: Vec<Value> = allowed
            .iter()
            .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": m.provider}))
            .collect();
        json!({"object": "list", "data": data})
    };
    let mut r = json_response(StatusCode::OK, &body);
    // The list is the caller's own.
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    r
}

/// What a request is, once read.
struct Ask {
    endpoint: String,
    body: serde_json::Map<String, Value>,
    model: String,
    stream: bool,
    /// The client's headers: only what a provider's `forward_headers` allows goes upstream.
    headers: http::HeaderMap,
}

fn record(s: &Shared, caller: &Caller, ask_model: &str, endpoint: &str, stream: bool) -> Record {
    Record {
        at: s.cfg.clock.timestamp().0,
        identity: caller.id.as_str().to_string(),
        name: caller.name.to_string(),
        model: ask_model.to_string(),
        endpoint: endpoint.to_string(),
        stream,
        decision: "denied",
        ..Default::default()
    }
}

fn deny(s: &Shared, mut rec: Record, reason: &str) {
    rec.decision = "denied";
    rec.reason = reason.to_string();
    tracing::info!(identity = %rec.name, model = %rec.model, reason, "llm request denied");
    (s.metrics).record(&rec, s.cfg.models.contains_key(&rec.model));
    if let Err(e) = s.ledger.insert(&rec) {
        tracing::warn!(error = %e, "cannot record a request");
    }
}

async fn read_ask(
    s: &Shared,
    req: Request<Incoming>,
    format: Format,
) -> Result<Ask, Response<Body>> {
    let endpoint = req.uri().path().to_string();
    let headers = req.headers().clone();
    let bytes = match Limited::new(req.into_body(), s.cfg.max_request_bytes)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let too_large = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return Err(if too_large {
                errors::response(
                    format,
                    Kind::TooLarge,
                    None,
                    "the request body is too large",
                    None,
                )
            } else {
                errors::response(format, Kind::Invalid, None, "could not read the body", None)
            });
        }
    };
    let body: serde_json::Map<String, Value> = match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => m,
        _ => {
            return Err(errors::response(
                format,
                Kind::Invalid,
                None,
                "the body must be a JSON object",
                None,
            ))
        }
    };
    let Some(model) = body.get("model").and_then(Value::as_str).map(String::from) else {
        return Err(errors::response(
            format,
            Kind::Invalid,
            None,
            "`model` is required",
            None,
        ));
    };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    Ok(Ask {
        endpoint,
        body,
        model,
        stream,
        headers,
    })
}

async fn complete(
    s: Arc<Shared>,
    caller: Arc<Caller>,
    req: Request<Incoming>,
    format: Format,
) -> Response<Body> {
    let ask = match read_ask(&s, req, format).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let rec = record(&s, &caller, &ask.model, &ask.endpoint, ask.stream);
    let grants = grants_of(&s, &caller).await;
    let candidates: Vec<&HostedGrant> = grants
        .iter()
        .filter(|g| g.limits.allows_model(&ask.model))
        .collect();
    // A model that does not exist and one the caller may not use look the same: 404.
    let not_found = || {
        errors::response(
            format,
            Kind::NotFound,
            None,
            &format!(
                "The model `{}` does not exist or you do not have access to it.",
                ask.model
            ),
            None,
        )
    };
    let Some(model) = s.cfg.models.get(&ask.model).cloned() else {
        deny(&s, rec, "unknown model");
        return not_found();
    };
    if candidates.is_empty() {
        deny(&s, rec, "model not granted");
        return not_found();
    }
    let Some(provider) = s.cfg.providers.get(&model.provider).cloned() else {
        deny(&s, rec, "model without provider");
        return not_found();
    };
    let fits = matches!(
        (provider.kind, format),
        (ProviderKind::Openai, Format::Chat | Format::Responses)
            | (ProviderKind::Anthropic, Format::Messages)
    );
    if !fits {
        deny(&s, rec, "wrong endpoint for the model");
        return errors::response(
            format,
            Kind::Invalid,
            None,
            &format!(
                "the model `{}` is not served on {}",
                ask.model, ask.endpoint
            ),
            None,
        );
    }
    let body_value = Value::Object(ask.body.clone());
    let cost_bound = bound::bound(format, &ask.body);
    // What a silent provider is charged for input: the bound where there is one.
    let input_estimate = match &cost_bound {
        Ok(b) => b.input,
        Err(_) => meter::estimate_input(format, &body_value),
    };
    let max_field = meter::max_tokens_field(format, &body_value);
    let asked_max = ask.body.get(max_field).and_then(Value::as_u64);
    let adm = match admit(&s, &caller, &candidates, &cost_bound, asked_max) {
        Ok(a) => a,
        Err(refusal) => {
            let why = match refusal.kind {
                Kind::RateLimited => "rate limit",
                Kind::Invalid => "cost cannot be bounded",
                _ => "token budget exhausted",
            };
            deny(&s, rec, why);
            let retry = (refusal.kind != Kind::Invalid).then_some(refusal.retry);
            return errors::response(format, refusal.kind, None, &refusal.message, retry);
        }
    };

    // The request as the provider gets it.
    let mut out = ask.body.clone();
    out.insert("model".into(), Value::String(model.upstream.clone()));
    if let Some(cap) = adm.max_out {
        bound::cap_output(format, &mut out, cap);
    }
    let client_wants_usage = out
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if format == Format::Chat && ask.stream {
        let opts = out.entry("stream_options").or_insert_with(|| json!({}));
        if let Value::Object(o) = opts {
            o.insert("include_usage".into(), Value::Bool(true));
        } else {
            *opts = json!({"include_usage": true});
        }
    }
    let upstream_req = match upstream_request(&provider, &ask, &Value::Object(out)) {
        Ok(r) => r,
        Err(e) => {
            settle(
                &s,
                adm,
                rec,
                &model,
                Usage::default(),
                "bad upstream request",
            );
            return errors::response(format, Kind::Upstream, None, &e, None);
        }
    };
    let resp = match s
        .metrics
        .upstream(s.upstream.send(&provider, upstream_req))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            settle(
                &s,
                adm,
                rec,
                &model,
                Usage::default(),
                "upstream unreachable",
            );
            return errors::response(format, Kind::Upstream, None, &e.to_string(), None);
        }
    };
    let status = resp.status();
    if !status.is_success() {
        let bytes = Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        settle(&s, adm, rec, &model, Usage::default(), "upstream error");
        return errors::response(
            format,
            Kind::Upstream,
            Some(status),
            &format!("upstream returned {status}: {}", upstream_message(&bytes)),
            None,
        );
    }
    let is_sse = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if ask.stream && is_sse {
        return relay(
            s,
            adm,
            rec,
            model,
            format,
            input_estimate,
            client_wants_usage,
            resp,
        );
    }
    let bytes = match Limited::new(resp.into_body(), MAX_UPSTREAM_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            settle(
                &s,
                adm,
                rec,
                &model,
                Usage::default(),
                "upstream body failed",
            );
            return errors::response(format, Kind::Upstream, None, &e.to_string(), None);
        }
    };
    let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let usage = meter::usage_of_body(format, &value).unwrap_or_else(|| Usage {
        input: input_estimate,
        output: meter::estimate_output_of_body(&value),
        estimated: true,
    });
    settle(&s, adm, rec, &model, usage, "completed");
    let mut r = Response::new(Full::new(bytes).map_err(|e| match e {}).boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
