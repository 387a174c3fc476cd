//! The LLM gateway: an HTTP/1.1 server on overlay streams (no listening port), where the caller
//! is the identity the router verified, its grants decide models, budget and rate, and the
//! provider's key is added here and nowhere else.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use umbra_policies::{Name, Timestamp};
use umbra_proto::api::HostedGrant;
use umbra_sdk::{Caller, Context, SdkError};

use crate::config::{Config, Model, Provider, ProviderKind};
use crate::errors::{self, Kind};
use crate::grants::{Grants, RateWindows};
use crate::ledger::{Bucket, Ledger, Record, Reservation};
use crate::meter::{self, Format, StreamMeter, Usage, Verdict};
use crate::sse;
use crate::upstream::Upstream;
use crate::Body;

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

struct Shared {
    cfg: Config,
    ledger: Ledger,
    grants: watch::Receiver<Arc<Grants>>,
    rate: RateWindows,
    upstream: Upstream,
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

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
        (Method::POST, "/v1/chat/completions") => complete(s, caller, req, Format::Chat).await,
        (Method::POST, "/v1/responses") => complete(s, caller, req, Format::Responses).await,
        (Method::POST, "/v1/messages") => complete(s, caller, req, Format::Messages).await,
        _ => errors::response(
            Format::Chat,
            Kind::NotFound,
            Some(StatusCode::NOT_FOUND),
            &format!("no route for {} {path}", req.method()),
            None,
        ),
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
        .filter(|m| {
            grants
                .iter()
                .any(|g| g.models.as_ref().is_none_or(|p| p.matches(&m.name)))
        })
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
    anthropic_version: Option<HeaderValue>,
    anthropic_beta: Option<HeaderValue>,
}

fn record(caller: &Caller, ask_model: &str, endpoint: &str, stream: bool) -> Record {
    Record {
        at: now_secs(),
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
    let anthropic_version = req.headers().get("anthropic-version").cloned();
    let anthropic_beta = req.headers().get("anthropic-beta").cloned();
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
        anthropic_version,
        anthropic_beta,
    })
}

/// The grant chosen for a request, and what it holds.
struct Admission {
    grant: HostedGrant,
    reservation: Reservation,
    /// The output cap sent upstream, if the gateway set one.
    max_out: Option<u64>,
    /// The budget of the chosen grant (for growing the reservation mid-stream).
    budget: Option<u64>,
}

/// Chooses a grant that allows the model and has room: unlimited grants first, then the one
/// with most tokens left.
fn admit(
    s: &Shared,
    caller: &Caller,
    candidates: &[&HostedGrant],
    input_estimate: u64,
    asked_max: Option<u64>,
) -> Result<Admission, (Kind, u64)> {
    let now = Timestamp(now_secs());
    let instant = Instant::now();
    let mut ordered: Vec<(&HostedGrant, u64)> = candidates
        .iter()
        .map(|g| {
            let left = match g.tokens {
                None => u64::MAX,
                Some(b) => {
                    let bucket = Bucket::new(caller.id.as_str(), g.policy.as_str(), b.period, now);
                    match s.ledger.used(&bucket) {
                        Ok((spent, held)) => b.amount.saturating_sub(spent).saturating_sub(held),
                        Err(_) => 0,
                    }
                }
            };
            (*g, left)
        })
        .collect();
    ordered.sort_by_key(|g| std::cmp::Reverse(g.1));
    let mut refusal: Option<(Kind, u64)> = None;
    for (g, _) in ordered {
        if let Some(rpm) = g.rpm {
            if let Err(wait) = s.rate.has_room(&caller.id, g.policy.as_str(), rpm, instant) {
                let secs = wait.as_secs().max(1);
                if refusal.is_none() {
                    refusal = Some((Kind::RateLimited, secs));
                }
                continue;
            }
        }
        let (reservation, max_out, budget) = match g.tokens {
            None => (
                Reservation {
                    bucket: None,
                    amount: 0,
                },
                None,
                None,
            ),
            Some(b) => {
                let bucket = Bucket::new(caller.id.as_str(), g.policy.as_str(), b.period, now);
                let want_out = asked_max.unwrap_or(s.cfg.default_max_tokens).max(1);
                match s.ledger.reserve(
                    &bucket,
                    b.amount,
                    input_estimate + 1,
                    input_estimate + want_out,
                ) {
                    Ok(Ok(r)) => {
                        let out = r.amount.saturating_sub(input_estimate).max(1);
                        (r, Some(out), Some(b.amount))
                    }
                    Ok(Err(_)) | Err(_) => {
                        let retry = b.period.next(now).0.saturating_sub(now.0);
                        refusal = Some((Kind::Budget, retry));
                        continue;
                    }
                }
            }
        };
        if let Some(rpm) = g.rpm {
            if let Err(wait) = s.rate.take(&caller.id, g.policy.as_str(), rpm, instant) {
                // Another request took the last slot meanwhile.
                let _ = s.ledger.settle(reservation, &Record::default());
                refusal = Some((Kind::RateLimited, wait.as_secs().max(1)));
                continue;
            }
        }
        return Ok(Admission {
            grant: g.clone(),
            reservation,
            max_out,
            budget,
        });
    }
    Err(refusal.unwrap_or((Kind::NotFound, 0)))
}

fn cost_micros(m: &Model, u: &Usage) -> u64 {
    let dollars = (u.input as f64) * m.price.0 / 1e6 + (u.output as f64) * m.price.1 / 1e6;
    (dollars * 1e6).round().max(0.0) as u64
}

fn settle(s: &Shared, adm: Admission, mut rec: Record, model: &Model, usage: Usage, reason: &str) {
    rec.policy = adm.grant.policy.to_string();
    rec.usage = usage;
    rec.cost_micros = cost_micros(model, &usage);
    rec.decision = "allowed";
    rec.reason = reason.to_string();
    tracing::info!(
        identity = %rec.name, model = %rec.model, policy = %rec.policy,
        input = usage.input, output = usage.output, estimated = usage.estimated, reason,
        "llm request"
    );
    if let Err(e) = s.ledger.settle(adm.reservation, &rec) {
        tracing::warn!(error = %e, "cannot record a request");
    }
}

fn upstream_request(p: &Provider, ask: &Ask, body: &Value) -> Result<Request<Full<Bytes>>, String> {
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
            b = b.header(
                "anthropic-version",
                ask.anthropic_version
                    .clone()
                    .unwrap_or(HeaderValue::from_static("2023-06-01")),
            );
            if let Some(beta) = &ask.anthropic_beta {
                b = b.header("anthropic-beta", beta.clone());
            }
        }
    }
    b.body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())
}

/// The message inside a provider's error body, if it has one.
fn upstream_message(bytes: &[u8]) -> String {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned())
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
    let rec = record(&caller, &ask.model, &ask.endpoint, ask.stream);
    let grants = grants_of(&s, &caller).await;
    let candidates: Vec<&HostedGrant> = grants
        .iter()
        .filter(|g| g.models.as_ref().is_none_or(|p| p.matches(&ask.model)))
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
    let input_estimate = meter::estimate_input(format, &body_value);
    let max_field = meter::max_tokens_field(format, &body_value);
    let asked_max = ask.body.get(max_field).and_then(Value::as_u64);
    let adm = match admit(&s, &caller, &candidates, input_estimate, asked_max) {
        Ok(a) => a,
        Err((kind, retry)) => {
            let (why, msg) = match kind {
                Kind::RateLimited => ("rate limit", "Rate limit reached for requests per minute."),
                _ => (
                    "token budget exhausted",
                    "Token budget exhausted for this period.",
                ),
            };
            deny(&s, rec, why);
            return errors::response(format, kind, None, msg, Some(retry));
        }
    };

    // The request as the provider gets it.
    let mut out = ask.body.clone();
    out.insert("model".into(), Value::String(model.upstream.clone()));
    if let Some(cap) = adm.max_out {
        if asked_max.is_none_or(|m| m > cap) {
            out.insert(max_field.into(), json!(cap));
        }
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
    let resp = match s.upstream.send(&provider, upstream_req).await {
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

#[allow(clippy::too_many_arguments)]
fn relay(
    s: Arc<Shared>,
    mut adm: Admission,
    rec: Record,
    model: Model,
    format: Format,
    input_estimate: u64,
    client_wants_usage: bool,
    resp: Response<Incoming>,
) -> Response<Body> {
    // A small queue: a slow client slows the relay, which slows the provider (backpressure).
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    tokio::spawn(async move {
        let mut upstream = resp.into_body();
        let mut parser = sse::Parser::new(MAX_EVENT);
        let mut meter = StreamMeter::new(format, input_estimate, client_wants_usage);
        let mut delivered = meter.so_far();
        let mut seq = 0u64;
        let reason: &str;
        'outer: loop {
            let frame = tokio::select! {
                f = upstream.frame() => f,
                _ = tx.closed() => { reason = "client disconnected"; break 'outer; }
            };
            let data = match frame {
                None => {
                    reason = if meter.finished() {
                        "completed"
                    } else {
                        "upstream ended early"
                    };
                    break;
                }
                Some(Err(_)) => {
                    reason = "upstream failed mid-stream";
                    break;
                }
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
            };
            let items = match parser.push(&data) {
                Ok(items) => items,
                Err(e) => {
                    let ev = errors::stream_event(format, Kind::Upstream, &e.to_string(), seq);
                    let _ = tx.send(sse::encode(&ev)).await;
                    reason = "upstream stream malformed";
                    break;
                }
            };
            for item in items {
                let bytes = match item {
                    sse::Item::Comment(c) => sse::encode_comment(&c),
                    sse::Item::Event(ev) => {
                        if meter.observe(&ev) == Verdict::Drop {
                            continue;
                        }
                        // More spent than held (the prompt was longer than estimated, or the
                        // provider overran the cap): hold more, or end the stream here.
                        let now = meter.so_far().total();
                        if let Some(budget) = adm.budget {
                            if now > adm.reservation.amount {
                                let extra = now - adm.reservation.amount;
                                if !s
                                    .ledger
                                    .grow(&mut adm.reservation, budget, extra)
                                    .unwrap_or(false)
                                {
                                    let ev = errors::stream_event(
                                        format,
                                        Kind::Budget,
                                        "Token budget exhausted for this period.",
                                        seq,
                                    );
                                    let _ = tx.send(sse::encode(&ev)).await;
                                    reason = "budget exhausted mid-stream";
                                    break 'outer;
                                }
                            }
                        }
                        seq += 1;
                        sse::encode(&ev)
                    }
                };
                if tx.send(bytes).await.is_err() {
                    reason = "client disconnected";
                    break 'outer;
                }
                delivered = meter.so_far();
            }
        }
        // Dropping the upstream body closes its connection: the provider stops generating.
        drop(upstream);
        let usage = if reason == "completed" {
            meter.charge()
        } else {
            delivered
        };
        settle(&s, adm, rec, &model, usage, reason);
    });
    crate::sse_response(rx)
}
