//! A fake LLM upstream for tests: OpenAI Chat Completions, OpenAI Responses and Anthropic
//! Messages, streamed and not, plus `GET /v1/models`, on `127.0.0.1:0` over plain HTTP/1.1.
//!
//! It exists so that the LLM gateway can be tested end to end, with the official client
//! libraries as clients, without a network and without spending money. Two things matter and
//! everything here serves them:
//!
//! - **Faithful shapes.** Bodies, SSE event names, the order of events, where usage appears and
//!   the error envelopes follow what the real providers send, so that the `openai` and
//!   `anthropic` Python clients parse them and a gateway cannot pass its tests by relying on a
//!   simplification the real APIs do not make.
//! - **Awkward delivery.** Streams are written in many small chunks cut at unfriendly places
//!   (mid-JSON, between `\r` and `\n`, across an event boundary), with `\r\n` and `\n` line ends
//!   mixed and `: keep-alive` comments interleaved. All of it is legal SSE, so real clients still
//!   parse it, but a relay that assumes one event per read breaks.
//!
//! Output is deterministic, so tests can check accounting exactly: the input counts one token per
//! whitespace-separated word of all prompt text (system prompt included), and the output is
//! exactly N tokens, N being the request's token limit or [`DEFAULT_MAX_TOKENS`], token `i`
//! being the text `"tok{i} "`.
//!
//! Chat Completions honour `n` (1 to 128, as OpenAI checks it): `n` choices of N tokens each,
//! billed as `n * N` completion tokens; streamed, each token chunk carries every choice's delta.
//! The other APIs refuse `n` as the real ones refuse an unknown parameter.
//!
//! Special models change behaviour: `fake-framing` counts [`FRAMING_TOKENS`] more input tokens
//! per request, as the real providers count their message framing ("hi" is 11 tokens to one of
//! them), `fake-nousage` never reports usage, `fake-fail` answers 500
//! before any byte of a stream, `fake-slow` waits [`SLOW_TOKEN_GAP`] between tokens, and
//! `fake-midfail` fails after [`MIDFAIL_TOKENS`] tokens with the provider's in-stream error. A
//! model outside [`MODELS`] gets a 404 in the provider's envelope.
//!
//! What it does not imitate: authentication (any key is accepted and only recorded), rate
//! limits, tools, images, and the Responses API's `incomplete` status (a response that stops at
//! `max_output_tokens` is reported as `completed`, which keeps the terminal event fixed).
//! Anthropic's required `max_tokens` defaults to 16 here instead of a 400, like the others.
//!
//! Behaviours of the real APIs kept on purpose, because a gateway must live with them:
//! - A request that names a token limit stops at it, so chat says `finish_reason: "length"` and
//!   Anthropic `stop_reason: "max_tokens"`; the `openai` client's `chat.completions.stream()`
//!   helper raises `LengthFinishReasonError` on that, exactly as against OpenAI.
//! - A Responses stream fails with `event: error` and a body with top-level `code` and
//!   `message`, as documented; the `openai` client yields that as an event and does not raise.
//!   Chat's `data: {"error": ...}` and Anthropic's `event: error` do make the clients raise.
//! - Non-streamed, `fake-midfail` has no middle to fail in: it is a plain 500.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Sleep;

/// The models the fake serves, on every endpoint, in `GET /v1/models` order.
pub const MODELS: &[&str] = &[
    "gpt-4o-mini",
    "gpt-4o",
    "claude-3-5-haiku-latest",
    "claude-sonnet-4",
    "fake-nousage",
    "fake-fail",
    "fake-slow",
    "fake-midfail",
    "fake-framing",
];

/// Input tokens `fake-framing` adds to every request for the framing of its messages.
pub const FRAMING_TOKENS: u64 = 10;

/// The largest `n` a chat completion accepts.
pub const MAX_CHOICES: u64 = 128;

/// Output tokens when the request names no limit.
pub const DEFAULT_MAX_TOKENS: u64 = 16;

/// The pause `fake-slow` makes between tokens: long enough for a test to disconnect mid-stream.
pub const SLOW_TOKEN_GAP: Duration = Duration::from_millis(30);

/// Tokens `fake-midfail` sends before its in-stream error.
pub const MIDFAIL_TOKENS: u64 = 3;

/// The largest token limit accepted; above it the request is refused as the real APIs refuse
/// an over-large limit, which also bounds what one request can make the fake produce.
pub const MAX_OUTPUT_TOKENS: u64 = 1_000_000;

/// Request bodies above this are refused: a peer must not grow our memory without bound.
const MAX_BODY: usize = 8 << 20;

/// A request as the fake saw it, for tests that check what a gateway forwarded.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// Every header in arrival order, names lower-case.
    pub headers: Vec<(String, String)>,
    /// The body as JSON; `Null` when it was empty or not JSON.
    pub body: Value,
}

impl SeenRequest {
    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// State shared by the server's tasks and the test that owns the fake.
#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<SeenRequest>>,
    cancelled: AtomicUsize,
    completed: AtomicUsize,
    next_id: AtomicU64,
    chunk_gap: Duration,
}

impl Shared {
    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// A running fake upstream. Dropping it stops the server and every connection it holds.
pub struct FakeLlm {
    /// The address it listens on.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl FakeLlm {
    /// Starts a fake on an ephemeral loopback port. Stream chunks are flushed one by one with no
    /// pause between them.
    pub async fn start() -> FakeLlm {
        Self::start_with_chunk_gap(Duration::ZERO).await
    }

    /// Like [`FakeLlm::start`], but sleeps `gap` after each stream chunk. Without a gap each
    /// chunk is still a separate write, but a slow reader may receive several in one read; a
    /// gap of a millisecond makes separate reads all but certain, at the price of latency.
    pub async fn start_with_chunk_gap(gap: Duration) -> FakeLlm {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake LLM upstream");
        let addr = listener.local_addr().expect("fake LLM address");
        let shared = Arc::new(Shared {
            chunk_gap: gap,
            ..Shared::default()
        });
        let server = tokio::spawn(serve(listener, shared.clone()));
        FakeLlm {
            addr,
            shared,
            server,
        }
    }

    /// `http://127.0.0.1:port`, without a trailing slash or `/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.shared
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Streams whose client went away before the last event was written. Counted when the
    /// server notices, which is after the client left: wait for it with a bound.
    pub fn streams_cancelled(&self) -> usize {
        self.shared.cancelled.load(Ordering::SeqCst)
    }

    /// Streams whose last chunk was handed to the connection. Counted before the client can
    /// read that chunk, so a test that has read the whole stream sees it at once.
    pub fn streams_completed(&self) -> usize {
        self.shared.completed.load(Ordering::SeqCst)
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        // The accept task owns the connections' JoinSet: aborting it aborts them all.
        self.server.abort();
    }
}

type RespBody = UnsyncBoxBody<Bytes, Infallible>;

/// Accepts connections until the owning [`FakeLlm`] is dropped. Connections live in a
/// `JoinSet` owned by this task, so aborting the task ends them too.
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // As providers' front ends do: each event leaves at once, not after an ACK.
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(req, &shared).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Which API a path belongs to; decides the error envelope and the wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    Chat,
    Responses,
    Anthropic,
}

impl Api {
    fn of(path: &str) -> Option<Api> {
        match path {
            "/v1/chat/completions" => Some(Api::Chat),
            "/v1/responses" => Some(Api::Responses),
            "/v1/messages" => Some(Api::Anthropic),
            _ => None,
        }
    }
}

/// Records the request (even one that will be refused: a test may want to see what a gateway
/// forwarded) and routes it.
async fn handle(req: Request<Incoming>, shared: &Arc<Shared>) -> Response<RespBody> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let anthropic_client = req.headers().contains_key("anthropic-version");
    let parsed: Result<Value, String> =
        match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(c) => {
                let b = c.to_bytes();
                if b.is_empty() {
                    Ok(Value::Null)
                } else {
                    serde_json::from_slice(&b).map_err(|e| {
                        format!("We could not parse the JSON body of your request: {e}")
                    })
                }
            }
            Err(e) => Err(format!("The request body could not be read: {e}")),
        };
    if let Ok(mut r) = shared.requests.lock() {
        r.push(SeenRequest {
            method: method.to_string(),
            path: path.clone(),
            headers,
            body: parsed.clone().unwrap_or(Value::Null),
        });
    }
    let api = Api::of(&path);
    // Errors on unknown paths use the envelope of whoever is likely asking.
    let flavour = api.unwrap_or(if anthropic_client {
        Api::Anthropic
    } else {
        Api::Chat
    });
    match (method, api, path.as_str()) {
        (Method::GET, None, "/v1/models") => models(shared, anthropic_client),
        (Method::POST, Some(api), _) => match parsed {
            Ok(body) => generate(api, &body, shared).await,
            Err(msg) => error(
                shared,
                api,
                StatusCode::BAD_REQUEST,
                ErrorKind::Invalid,
                &msg,
            ),
        },
        (_, Some(_), _) | (_, None, "/v1/models") => error(
            shared,
            flavour,
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::Invalid,
            "Method not allowed",
        ),
        _ => error(
            shared,
            flavour,
            StatusCode::NOT_FOUND,
            ErrorKind::NotFound,
            &format!("Invalid URL ({path})"),
        ),
    }
}

/// The kinds of error the fake produces; each maps to the provider's own `type`.
#[derive(Clone, Copy)]
enum ErrorKind {
    Invalid,
    NotFound,
    ModelNotFound,
    Server,
}

fn error_envelope(api: Api, kind: ErrorKind, message: &str, request_id: &str) -> Value {
    match api {
        Api::Chat | Api::Responses => {
            let (ty, code) = match kind {
                ErrorKind::Invalid => ("invalid_request_error", Value::Null),
                ErrorKind::NotFound => ("invalid_request_error", Value::Null),
                ErrorKind::ModelNotFound => ("invalid_request_error", json!("model_not_found")),
                ErrorKind::Server => ("server_error", Value::Null),
            };
            json!({"error": {"message": message, "type": ty, "param": Value::Null, "code": code}})
        }
        Api::Anthropic => {
            let ty = match kind {
                ErrorKind::Invalid => "invalid_request_error",
                ErrorKind::NotFound | ErrorKind::ModelNotFound => "not_found_error",
                ErrorKind::Server => "api_error",
            };
            json!({"type": "error", "error": {"type": ty, "message": message}, "request_id": request_id})
        }
    }
}

/// An error response in `api`'s envelope, with a fresh request id in the provider's header.
fn error(
    shared: &Shared,
    api: Api,
    status: StatusCode,
    kind: ErrorKind,
    message: &str,
) -> Response<RespBody> {
    let rid = format!("req_fake{}", shared.id());
    json_response(api, status, &rid, &error_envelope(api, kind, message, &rid))
}

fn json_response(
    api: Api,
    status: StatusCode,
    request_id: &str,
    body: &Value,
) -> Response<RespBody> {
    let b = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    let b = match api {
        Api::Anthropic => b.header("request-id", request_id),
        Api::Chat | Api::Responses => b
            .header("x-request-id", request_id)
            .header("openai-processing-ms", "1"),
    };
    b.body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed_unsync()))
}

/// `GET /v1/models`. Both providers use this path with different shapes; the `anthropic` client
/// always sends `anthropic-version`, so that header picks Anthropic's.
fn models(shared: &Shared, anthropic: bool) -> Response<RespBody> {
    let rid = format!("req_fake{}", shared.id());
    if anthropic {
        let data: Vec<Value> = MODELS
            .iter()
            .map(|m| json!({"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}))
            .collect();
        let body = json!({"data": data, "has_more": false, "first_id": MODELS.first(), "last_id": MODELS.last()});
        return json_response(Api::Anthropic, StatusCode::OK, &rid, &body);
    }
    let data: Vec<Value> = MODELS
        .iter()
        .map(|m| {
            let owner = if m.starts_with("claude") {
                "anthropic"
            } else {
                "openai"
            };
            json!({"id": m, "object": "model", "created": 1_700_000_000u64, "owned_by": owner})
        })
        .collect();
    json_response(
        Api::Chat,
        StatusCode::OK,
        &rid,
        &json!({"object": "list", "data": data}),
    )
}

/// Whitespace-separated words in prompt text: strings, arrays of them, content parts with a
/// `text`, and messages with a `content`. Anything else (images, tool calls) counts nothing.
fn words(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(a) => a.iter().map(words).sum(),
        Value::Object(o) => match o.get("text") {
            Some(Value::String(t)) => t.split_whitespace().count() as u64,
            _ => o.get("content").map(words).unwrap_or(0),
        },
        _ => 0,
    }
}

/// One generation, everything the response depends on.
struct Job {
    api: Api,
    model: String,
    id: String,
    item_id: String,
    created: u64,
    input: u64,
    /// Tokens asked for (per choice).
    n: u64,
    /// Chat: how many choices (`n`).
    choices: u64,
    /// Whether the request named a limit (then the stop reason says the limit was hit).
    limited: bool,
    usage: bool,
    /// Chat streams only: `stream_options.include_usage`.
    include_usage: bool,
    slow: bool,
    midfail: bool,
}

/// Validates a generation request as the provider would (model, token limit, `stream`) and
/// answers it whole or as a stream.
async fn generate(api: Api, body: &Value, shared: &Arc<Shared>) -> Response<RespBody> {
    let bad = |msg: &str| {
        error(
            shared,
            api,
            StatusCode::BAD_REQUEST,
            ErrorKind::Invalid,
            msg,
        )
    };
    if !body.is_object() {
        return bad("The request body must be a JSON object.");
    }
    let Some(model) = body.get("model").and_then(Value::as_str) else {
        return bad("you must provide a model parameter");
    };
    if !MODELS.contains(&model) {
        let msg = match api {
            Api::Anthropic => format!("model: {model}"),
            _ => format!("The model `{model}` does not exist or you do not have access to it."),
        };
        return error(
            shared,
            api,
            StatusCode::NOT_FOUND,
            ErrorKind::ModelNotFound,
            &msg,
        );
    }
    if model == "fake-fail" {
        return server_error(shared, api);
    }
    let keys: &[&str] = match api {
        Api::Chat => &["max_completion_tokens", "max_tokens"],
        Api::Responses => &["max_output_tokens"],
        Api::Anthropic => &["max_tokens"],
    };
    let mut requested = None;
    for k in keys {
        match body.get(*k) {
            None | Some(Value::Null) => {}
            Some(v) => match v.as_u64() {
                Some(n) if (1..=MAX_OUTPUT_TOKENS).contains(&n) => {
                    requested = Some(n);
                    break;
                }
                _ => {
                    return bad(&format!(
                        "Invalid '{k}': expected an integer between 1 and {MAX_OUTPUT_TOKENS}."
                    ))
                }
            },
        }
    }
    let choices = match (api, body.get("n")) {
        (_, None | Some(Value::Null)) => 1,
        (Api::Chat, Some(v)) => match v.as_u64() {
            Some(n) if (1..=MAX_CHOICES).contains(&n) => n,
            _ => {
                return bad(&format!(
                    "Invalid 'n': expected an integer between 1 and {MAX_CHOICES}."
                ))
            }
        },
        (Api::Responses, Some(_)) => return bad("Unsupported parameter: 'n'."),
        (Api::Anthropic, Some(_)) => return bad("n: Extra inputs are not permitted"),
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return bad("Invalid 'stream': expected a boolean."),
    };
    let input = match api {
        Api::Chat => body.get("messages").map(words).unwrap_or(0),
        Api::Responses => {
            body.get("instructions").map(words).unwrap_or(0)
                + body.get("input").map(words).unwrap_or(0)
        }
        Api::Anthropic => {
            body.get("system").map(words).unwrap_or(0)
                + body.get("messages").map(words).unwrap_or(0)
        }
    };
    let input = if model == "fake-framing" {
        input + FRAMING_TOKENS
    } else {
        input
    };
    let n = shared.id();
    let (id, item_id) = match api {
        Api::Chat => (format!("chatcmpl-fake{n}"), String::new()),
        Api::Responses => (format!("resp_fake{n}"), format!("msg_fake{n}")),
        Api::Anthropic => (format!("msg_fake{n}"), String::new()),
    };
    let job = Job {
        api,
        model: model.to_string(),
        id,
        item_id,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        input,
        n: requested.unwrap_or(DEFAULT_MAX_TOKENS),
        choices,
        limited: requested.is_some(),
        usage: model != "fake-nousage",
        include_usage: api == Api::Chat
            && body.pointer("/stream_options/include_usage") == Some(&Value::Bool(true)),
        slow: model == "fake-slow",
        midfail: model == "fake-midfail",
    };
    let rid = format!("req_fake{}", shared.id());
    if stream {
        return sse_response(job, shared, &rid);
    }
    if job.slow {
        tokio::time::sleep(SLOW_TOKEN_GAP * job.n.min(u32::MAX as u64) as u32).await;
    }
    if job.midfail {
        // Without a stream there is nowhere to fail "in the middle": it is a plain 500.
        return server_error(shared, api);
    }
    json_response(api, StatusCode::OK, &rid, &job.whole())
}

fn server_error(shared: &Shared, api: Api) -> Response<RespBody> {
    let msg = match api {
        Api::Anthropic => "Internal server error",
        _ => "The server had an error while processing your request. Sorry about that!",
    };
    error(
        shared,
        api,
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Server,
        msg,
    )
}

fn sse_response(job: Job, shared: &Arc<Shared>, request_id: &str) -> Response<RespBody> {
    let api = job.api;
    let body = SseBody {
        job,
        next: 0,
        pending: VecDeque::new(),
        carry: Vec::new(),
        sleep: None,
        yield_next: false,
        done: false,
        gap: shared.chunk_gap,
        shared: shared.clone(),
    };
    let b = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream; charset=utf-8")
        .header("cache-control", "no-cache");
    let b = match api {
        Api::Anthropic => b.header("request-id", request_id),
        Api::Chat | Api::Responses => b
            .header("x-request-id", request_id)
            .header("openai-processing-ms", "1"),
    };
    b.body(body.boxed_unsync())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed_unsync()))
}

/// One SSE event before it is cut into chunks.
struct Event {
    name: Option<&'static str>,
    data: String,
    /// Sleep [`SLOW_TOKEN_GAP`] before writing it.
    pause: bool,
}

/// Where an event sits in a stream: before the tokens, the `i`th token, or after them.
enum Slot {
    Pre(usize),
    Token(u64),
    Post(usize),
}

impl Job {
    /// Tokens actually produced.
    fn produced(&self) -> u64 {
        if self.midfail {
            self.n.min(MIDFAIL_TOKENS)
        } else {
            self.n
        }
    }

    fn text(&self) -> String {
        (0..self.produced()).map(|i| format!("tok{i} ")).collect()
    }

    fn pre_count(&self) -> usize {
        match self.api {
            Api::Chat => 1,
            Api::Responses => 4,
            Api::Anthropic => 3,
        }
    }

    fn post_count(&self) -> usize {
        if self.midfail {
            return 1;
        }
        match self.api {
            Api::Chat => 2 + usize::from(self.include_usage && self.usage),
            Api::Responses => 4,
            Api::Anthropic => 3,
        }
    }

    fn event_count(&self) -> usize {
        self.pre_count() + self.produced() as usize + self.post_count()
    }

    fn slot(&self, k: usize) -> Option<Slot> {
        let pre = self.pre_count();
        let toks = self.produced() as usize;
        if k < pre {
            Some(Slot::Pre(k))
        } else if k < pre + toks {
            Some(Slot::Token((k - pre) as u64))
        } else if k < pre + toks + self.post_count() {
            Some(Slot::Post(k - pre - toks))
        } else {
            None
        }
    }

    fn stop_reason(&self) -> &'static str {
        match (self.api, self.limited) {
            (Api::Chat, true) => "length",
            (Api::Chat, false) => "stop",
            (_, true) => "max_tokens",
            (_, false) => "end_turn",
        }
    }

    fn chat_usage(&self) -> Value {
        let out = self.n * self.choices;
        json!({
            "prompt_tokens": self.input,
            "completion_tokens": out,
            "total_tokens": self.input + out,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0
            }
        })
    }

    fn anthropic_usage(&self, output: u64) -> Value {
        json!({
            "input_tokens": self.input,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output,
            "service_tier": "standard"
        })
    }

    fn output_item(&self, done: bool) -> Value {
        let content = if done {
            json!([{"type": "output_text", "annotations": [], "logprobs": [], "text": self.text()}])
        } else {
            json!([])
        };
        json!({
            "id": self.item_id, "type": "message",
            "status": if done { "completed" } else { "in_progress" },
            "content": content, "role": "assistant"
        })
    }

    /// The Responses API's `response` object; `done` fills the output and the usage.
    fn response_object(&self, done: bool) -> Value {
        let mut r = json!({
            "id": self.id, "object": "response", "created_at": self.created,
            "status": if done { "completed" } else { "in_progress" },
            "background": false, "error": Value::Null, "incomplete_details": Value::Null,
            "instructions": Value::Null,
            "max_output_tokens": if self.limited { json!(self.n) } else { Value::Null },
            "model": self.model,
            "output": if done { json!([self.output_item(true)]) } else { json!([]) },
            "parallel_tool_calls": true, "previous_response_id": Value::Null,
            "reasoning": {"effort": Value::Null, "summary": Value::Null},
            "service_tier": "default", "store": true, "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
            "usage": Value::Null, "user": Value::Null, "metadata": {}
        });
        if let Some(o) = r.as_object_mut() {
            if done && self.usage {
                o.insert(
                    "usage".into(),
                    json!({
                        "input_tokens": self.input,
                        "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens": self.n,
                        "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": self.input + self.n
                    }),
                );
            } else if !self.usage {
                o.remove("usage");
            }
        }
        r
    }

    /// The non-streamed answer.
    fn whole(&self) -> Value {
        match self.api {
            Api::Chat => {
                let mut r = json!({
                    "id": self.id, "object": "chat.completion", "created": self.created,
                    "model": self.model,
                    "choices": (0..self.choices).map(|i| json!({
                        "index": i,
                        "message": {"role": "assistant", "content": self.text(), "refusal": Value::Null, "annotations": []},
                        "logprobs": Value::Null,
                        "finish_reason": self.stop_reason()
                    })).collect::<Vec<_>>(),
                    "usage": self.chat_usage(),
                    "service_tier": "default",
                    "system_fingerprint": "fp_fake"
                });
                if !self.usage {
                    if let Some(o) = r.as_object_mut() {
                        o.remove("usage");
                    }
                }
                r
            }
            Api::Responses => self.response_object(true),
            Api::Anthropic => {
                let mut r = json!({
                    "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                    "content": [{"type": "text", "text": self.text()}],
                    "stop_reason": self.stop_reason(), "stop_sequence": Value::Null,
                    "usage": self.anthropic_usage(self.n)
                });
                if !self.usage {
                    if let Some(o) = r.as_object_mut() {
                        o.remove("usage");
                    }
                }
                r
            }
        }
    }

    fn chat_chunk(&self, delta: Value, finish: Value) -> Value {
        let mut c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "service_tier": "default", "system_fingerprint": "fp_fake",
            "choices": (0..self.choices)
                .map(|i| json!({"index": i, "delta": delta, "logprobs": Value::Null, "finish_reason": finish}))
                .collect::<Vec<_>>()
        });
        // With include_usage, OpenAI puts `"usage": null` on every chunk but the last.
        if self.include_usage && self.usage {
            if let Some(o) = c.as_object_mut() {
                o.insert("usage".into(), Value::Null);
            }
        }
        c
    }

    /// The `k`th event of the stream, or `None` past the end.
    fn event(&self, k: usize) -> Option<Event> {
        let slot = self.slot(k)?;
        let pause = self.slow && matches!(slot, Slot::Token(i) if i > 0);
        let (name, data): (Option<&'static str>, Value) = match (self.api, slot) {
            (Api::Chat, Slot::Pre(_)) => (
                None,
                self.chat_chunk(
                    json!({"role": "assistant", "content": "", "refusal": Value::Null}),
                    Value::Null,
                ),
            ),
            (Api::Chat, Slot::Token(i)) => (
                None,
                self.chat_chunk(json!({"content": format!("tok{i} ")}), Value::Null),
            ),
            (Api::Chat, Slot::Post(_)) if self.midfail => (
                None,
                error_envelope(
                    Api::Chat,
                    ErrorKind::Server,
                    "The server had an error while processing your request. Sorry about that!",
                    "",
                ),
            ),
            (Api::Chat, Slot::Post(0)) => {
                (None, self.chat_chunk(json!({}), json!(self.stop_reason())))
            }
            (Api::Chat, Slot::Post(p)) if p == self.post_count() - 1 => {
                return Some(Event {
                    name: None,
                    data: "[DONE]".into(),
                    pause,
                })
            }
            (Api::Chat, Slot::Post(_)) => {
                let mut c = self.chat_chunk(json!({}), Value::Null);
                if let Some(o) = c.as_object_mut() {
                    o.insert("choices".into(), json!([]));
                    o.insert("usage".into(), self.chat_usage());
                }
                (None, c)
            }
            (Api::Responses, Slot::Pre(0)) => (
                Some("response.created"),
                json!({"type": "response.created", "response": self.response_object(false)}),
            ),
            (Api::Responses, Slot::Pre(1)) => (
                Some("response.in_progress"),
                json!({"type": "response.in_progress", "response": self.response_object(false)}),
            ),
            (Api::Responses, Slot::Pre(2)) => (
                Some("response.output_item.added"),
                json!({"type": "response.output_item.added", "output_index": 0, "item": self.output_item(false)}),
            ),
            (Api::Responses, Slot::Pre(_)) => (
                Some("response.content_part.added"),
                json!({"type": "response.content_part.added", "item_id": self.item_id, "output_index": 0,
                       "content_index": 0, "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}}),
            ),
            (Api::Responses, Slot::Token(i)) => (
                Some("response.output_text.delta"),
                json!({"type": "response.output_text.delta", "item_id": self.item_id, "output_index": 0,
                       "content_index": 0, "delta": format!("tok{i} "), "logprobs": []}),
            ),
            (Api::Responses, Slot::Post(_)) if self.midfail => (
                Some("error"),
                json!({"type": "error", "code": "server_error",
                       "message": "The server had an error while processing your request. Sorry about that!",
                       "param": Value::Null}),
            ),
            (Api::Responses, Slot::Post(0)) => (
                Some("response.output_text.done"),
                json!({"type": "response.output_text.done", "item_id": self.item_id, "output_index": 0,
                       "content_index": 0, "text": self.text(), "logprobs": []}),
            ),
            (Api::Responses, Slot::Post(1)) => (
                Some("response.content_part.done"),
                json!({"type": "response.content_part.done", "item_id": self.item_id, "output_index": 0,
                       "content_index": 0, "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": self.text()}}),
            ),
            (Api::Responses, Slot::Post(2)) => (
                Some("response.output_item.done"),
                json!({"type": "response.output_item.done", "output_index": 0, "item": self.output_item(true)}),
            ),
            (Api::Responses, Slot::Post(_)) => (
                Some("response.completed"),
                json!({"type": "response.completed", "response": self.response_object(true)}),
            ),
            (Api::Anthropic, Slot::Pre(0)) => {
                let mut m = json!({
                    "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                    "content": [], "stop_reason": Value::Null, "stop_sequence": Value::Null,
                    "usage": self.anthropic_usage(1)
                });
                if !self.usage {
                    if let Some(o) = m.as_object_mut() {
                        o.remove("usage");
                    }
                }
                (
                    Some("message_start"),
                    json!({"type": "message_start", "message": m}),
                )
            }
            (Api::Anthropic, Slot::Pre(1)) => (
                Some("content_block_start"),
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            (Api::Anthropic, Slot::Pre(_)) => (Some("ping"), json!({"type": "ping"})),
            (Api::Anthropic, Slot::Token(i)) => (
                Some("content_block_delta"),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": format!("tok{i} ")}}),
            ),
            (Api::Anthropic, Slot::Post(_)) if self.midfail => (
                Some("error"),
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            ),
            (Api::Anthropic, Slot::Post(0)) => (
                Some("content_block_stop"),
                json!({"type": "content_block_stop", "index": 0}),
            ),
            (Api::Anthropic, Slot::Post(1)) => {
                let mut d = json!({"type": "message_delta",
                       "delta": {"stop_reason": self.stop_reason(), "stop_sequence": Value::Null},
                       "usage": {"output_tokens": self.n}});
                if !self.usage {
                    if let Some(o) = d.as_object_mut() {
                        o.remove("usage");
                    }
                }
                (Some("message_delta"), d)
            }
            (Api::Anthropic, Slot::Post(_)) => {
                (Some("message_stop"), json!({"type": "message_stop"}))
            }
        };
        let mut data = data;
        if self.api == Api::Responses {
            // Every Responses event carries its position in the stream.
            if let Some(o) = data.as_object_mut() {
                o.insert("sequence_number".into(), json!(k));
            }
        }
        Some(Event {
            name,
            data: data.to_string(),
            pause,
        })
    }
}

/// A streamed response body that produces its events lazily and cuts them into awkward chunks.
///
/// Between two chunks it returns `Pending` once (waking itself at once), which makes hyper flush
/// what it holds: each chunk goes out in its own write instead of being coalesced.
struct SseBody {
    job: Job,
    /// The next event to produce.
    next: usize,
    pending: VecDeque<Bytes>,
    /// The tail of an event held back to travel with the start of the next one.
    carry: Vec<u8>,
    sleep: Option<Pin<Box<Sleep>>>,
    yield_next: bool,
    done: bool,
    gap: Duration,
    /// Where the stream is counted as completed or cancelled, exactly once.
    shared: Arc<Shared>,
}

impl SseBody {
    /// Appends event `k` to `pending`, cut at unfriendly places. The choices depend only on
    /// `k`, so every run delivers the same bytes in the same chunks.
    fn cut(&mut self, k: usize, ev: &Event) {
        let crlf = k % 2 == 1;
        let eol = if crlf { "\r\n" } else { "\n" };
        let mut text = String::new();
        match k % 4 {
            // A comment on its own: a block that dispatches nothing.
            2 => {
                text.push_str(": keep-alive");
                text.push_str(eol);
                text.push_str(eol);
            }
            // A comment line inside the event's own block.
            3 => {
                text.push_str(": keep-alive");
                text.push_str(eol);
            }
            _ => {}
        }
        if let Some(name) = ev.name {
            text.push_str("event: ");
            text.push_str(name);
            text.push_str(eol);
        }
        text.push_str("data: ");
        let json_start = text.len();
        text.push_str(&ev.data);
        let json_end = text.len();
        text.push_str(eol);
        text.push_str(eol);

        let mut bytes = std::mem::take(&mut self.carry);
        let base = bytes.len();
        bytes.extend_from_slice(text.as_bytes());
        let mut cuts = vec![
            // Mid-JSON.
            base + json_start + (json_end - json_start) / 2,
            // Somewhere, pseudo-randomly.
            base + 1 + (k * 7919 + 13) % text.len().max(1),
        ];
        if crlf {
            // Between `\r` and `\n`: after the data line, or in the final blank line.
            let r = if k % 3 == 0 {
                base + json_end
            } else {
                bytes.len() - 2
            };
            cuts.push(r + 1);
        }
        if k % 5 == 4 && k + 1 < self.job.event_count() {
            // The end of this event travels with the start of the next.
            self.carry = bytes.split_off(bytes.len() - 3);
        }
        cuts.retain(|&c| c > 0 && c < bytes.len());
        cuts.sort_unstable();
        cuts.dedup();
        let mut prev = 0;
        for c in cuts {
            self.pending
                .push_back(Bytes::copy_from_slice(&bytes[prev..c]));
            prev = c;
        }
        self.pending
            .push_back(Bytes::copy_from_slice(&bytes[prev..]));
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if let Some(s) = this.sleep.as_mut() {
                if s.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            }
            if this.yield_next {
                this.yield_next = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if let Some(chunk) = this.pending.pop_front() {
                if this.pending.is_empty()
                    && this.carry.is_empty()
                    && this.next >= this.job.event_count()
                    && !this.done
                {
                    this.done = true;
                    this.shared.completed.fetch_add(1, Ordering::SeqCst);
                }
                this.yield_next = true;
                if !this.gap.is_zero() {
                    this.sleep = Some(Box::pin(tokio::time::sleep(this.gap)));
                }
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            let k = this.next;
            let Some(ev) = this.job.event(k) else {
                return Poll::Ready(None);
            };
            this.next += 1;
            if ev.pause {
                this.sleep = Some(Box::pin(tokio::time::sleep(SLOW_TOKEN_GAP)));
            }
            this.cut(k, &ev);
        }
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        if !self.done {
            self.shared.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderMap;
    use tokio::net::TcpStream;

    /// Sends one request on a fresh connection; returns the status, headers and the body's
    /// frames as they arrived.
    async fn call(
        fake: &FakeLlm,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, HeaderMap, Vec<Bytes>) {
        let stream = TcpStream::connect(fake.addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "fake")
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        let resp = sender.send_request(req).await.expect("send");
        let (parts, mut body) = resp.into_parts();
        let mut frames = Vec::new();
        while let Some(f) = body.frame().await {
            if let Ok(d) = f.expect("frame").into_data() {
                frames.push(d);
            }
        }
        (parts.status, parts.headers, frames)
    }

    async fn post(fake: &FakeLlm, path: &str, body: Value) -> (StatusCode, Vec<Bytes>) {
        let (s, _, f) = call(fake, Method::POST, path, &[], &body.to_string()).await;
        (s, f)
    }

    fn json_of(frames: &[Bytes]) -> Value {
        serde_json::from_slice(&frames.concat()).expect("json body")
    }

    /// A small SSE parser after the WHATWG rules: any of `\r\n`, `\r`, `\n` ends a line, a
    /// blank line dispatches, comments are skipped. Returns (event name, data) pairs.
    fn sse(bytes: &[u8]) -> Vec<(Option<String>, String)> {
        let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
        let text = text.replace("\r\n", "\n").replace('\r', "\n");
        let mut out = Vec::new();
        let (mut name, mut data): (Option<String>, Option<String>) = (None, None);
        for line in text.split('\n') {
            if line.is_empty() {
                if let Some(d) = data.take() {
                    out.push((name.take(), d));
                }
                name = None;
            } else if line.starts_with(':') {
            } else if let Some(v) = line.strip_prefix("event: ") {
                name = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = Some(match data.take() {
                    Some(d) => format!("{d}\n{v}"),
                    None => v.to_string(),
                });
            }
        }
        out
    }

    fn datas(events: &[(Option<String>, String)]) -> Vec<Value> {
        events
            .iter()
            .filter(|(_, d)| d != "[DONE]")
            .map(|(_, d)| serde_json::from_str(d).expect("event json"))
            .collect()
    }

    fn toks(n: u64) -> String {
        (0..n).map(|i| format!("tok{i} ")).collect()
    }

    fn chat_body(model: &str, extra: Value) -> Value {
        let mut b = json!({
            "model": model,
            "messages": [
                {"role": "system", "content": "You are  terse."},
                {"role": "user", "content": [{"type": "text", "text": "hello there world"}]}
            ]
        });
        if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        b
    }

    #[tokio::test]
    async fn chat_completion_counts_words_and_max_tokens() {
        let fake = FakeLlm::start().await;
        let (s, f) = post(
            &fake,
            "/v1/chat/completions",
            chat_body("gpt-4o-mini", json!({"max_tokens": 5})),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let v = json_of(&f);
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], toks(5));
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["prompt_tokens"], 6);
        assert_eq!(v["usage"]["completion_tokens"], 5);
        assert_eq!(v["usage"]["total_tokens"], 11);
        // No limit: the default, and a natural stop.
        let (_, f) = post(
            &fake,
            "/v1/chat/completions",
            chat_body("gpt-4o", json!({})),
        )
        .await;
        let v = json_of(&f);
        assert_eq!(v["usage"]["completion_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let seen = fake.requests();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].path, "/v1/chat/completions");
        assert_eq!(seen[0].method, "POST");
        assert_eq!(seen[0].header("content-type"), Some("application/json"));
        assert_eq!(seen[0].body["max_tokens"], 5);
    }

    #[tokio::test]
    async fn n_multiplies_chat_output_and_framing_adds_input() {
        let fake = FakeLlm::start().await;
        let (s, f) = post(
            &fake,
            "/v1/chat/completions",
            chat_body("gpt-4o-mini", json!({"max_tokens": 3, "n": 4})),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let v = json_of(&f);
        assert_eq!(v["choices"].as_array().map(Vec::len), Some(4));
        assert_eq!(v["choices"][3]["index"], 3);
        assert_eq!(
            v["usage"]["completion_tokens"], 12,
            "every choice is billed"
        );
        // Streamed: every token chunk carries every choice, usage bills them all.
        let (_, f) = post(
            &fake,
            "/v1/chat/completions",
            chat_body(
                "gpt-4o-mini",
                json!({"max_tokens": 2, "n": 3, "stream": true, "stream_options": {"include_usage": true}}),
            ),
        )
        .await;
        let bytes: Vec<u8> = f.iter().flat_map(|b| b.to_vec()).collect();
        let data = datas(&sse(&bytes));
        assert_eq!(data[1]["choices"].as_array().map(Vec::len), Some(3));
        let last = data.iter().rev().find(|d| d["usage"].is_object()).unwrap();
        assert_eq!(last["usage"]["completion_tokens"], 6);
        for bad in [json!(0), json!("2"), json!(129)] {
            let (s, _) = post(
                &fake,
                "/v1/chat/completions",
                chat_body("gpt-4o-mini", json!({"n": bad})),
            )
            .await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "n = {bad}");
        }
        let (s, _) = post(
            &fake,
            "/v1/messages",
            json!({"model": "claude-3-5-haiku-latest", "max_tokens": 2, "n": 2, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "Anthropic has no n");
        let (_, f) = post(
            &fake,
            "/v1/chat/completions",
            json!({"model": "fake-framing", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(json_of(&f)["usage"]["prompt_tokens"], 1 + FRAMING_TOKENS);
    }

    #[tokio::test]
    async fn chat_stream_sends_usage_only_when_asked() {
        let fake = FakeLlm::start().await;
        for include in [false, true] {
            let extra = if include {
                json!({"stream": true, "max_completion_tokens": 7, "stream_options": {"include_usage": true}})
            } else {
                json!({"stream": true, "max_completion_tokens": 7})
            };
            let (s, f) = post(
                &fake,
                "/v1/chat/completions",
                chat_body("gpt-4o-mini", extra),
            )
            .await;
            assert_eq!(s, StatusCode::OK);
            let events = sse(&f.concat());
            assert_eq!(events.last().map(|e| e.1.as_str()), Some("[DONE]"));
            let chunks = datas(&events);
            // Role, 7 tokens, finish, and the usage chunk if asked.
            assert_eq!(chunks.len(), 9 + usize::from(include));
            let text: String = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                .collect();
            assert_eq!(text, toks(7));
            assert_eq!(chunks[8]["choices"][0]["finish_reason"], "length");
            let with_usage: Vec<&Value> =
                chunks.iter().filter(|c| c["usage"].is_object()).collect();
            if include {
                assert_eq!(with_usage.len(), 1);
                let last = chunks.last().expect("last");
                assert_eq!(last["choices"], json!([]));
                assert_eq!(last["usage"]["prompt_tokens"], 6);
                assert_eq!(last["usage"]["completion_tokens"], 7);
                assert_eq!(last["usage"]["total_tokens"], 13);
                assert!(chunks[1].get("usage").is_some_and(Value::is_null));
            } else {
                assert!(with_usage.is_empty());
                assert!(chunks.iter().all(|c| c.get("usage").is_none()));
            }
        }
        assert_eq!(fake.streams_completed(), 2);
        assert_eq!(fake.streams_cancelled(), 0);
    }

    #[tokio::test]
    async fn streams_arrive_in_awkward_chunks() {
        let fake = FakeLlm::start().await;
        let (_, f) = post(
            &fake,
            "/v1/chat/completions",
            chat_body("gpt-4o-mini", json!({"stream": true})),
        )
        .await;
        let events = sse(&f.concat());
        assert!(
            f.len() > 2 * events.len(),
            "{} frames for {} events",
            f.len(),
            events.len()
        );
        // A chunk that ends between `\r` and `\n`.
        assert!(f.iter().any(|c| c.ends_with(b"\r")));
        // A chunk that ends mid-JSON.
        assert!(f.iter().any(|c| {
            let s = String::from_utf8_lossy(c);
            s.contains("data: {") && !s.contains('}')
        }));
        // A chunk holding the end of one event and the start of the next.
        assert!(f.iter().any(|c| {
            let s = String::from_utf8_lossy(c);
            (s.contains("}\n\n") || s.contains("}\r\n\r\n"))
                && s.trim_end().len() > s.find('}').unwrap_or(0) + 1
        }));
        let all = f.concat();
        let all = String::from_utf8_lossy(&all);
        assert!(all.contains(": keep-alive\n\n") && all.contains(": keep-alive\r\n"));
        assert!(all.contains("}\n\ndata: ") && all.contains("}\r\n\r\n"));
        // Same request, same bytes, same cuts.
        let (_, g) = post(
            &fake,
            "/v1/chat/completions",
            chat_body("gpt-4o-mini", json!({"stream": true})),
        )
        .await;
        assert_eq!(f.len(), g.len());
    }

    #[tokio::test]
    async fn responses_plain_and_streamed() {
        let fake = FakeLlm::start().await;
        let body = json!({
            "model": "gpt-4o-mini", "instructions": "be terse", "max_output_tokens": 4,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "one two three"}]}]
        });
        let (s, f) = post(&fake, "/v1/responses", body.clone()).await;
        assert_eq!(s, StatusCode::OK);
        let v = json_of(&f);
        assert_eq!(v["object"], "response");
        assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
        assert_eq!(v["output"][0]["content"][0]["text"], toks(4));
        assert_eq!(
            v["usage"],
            json!({"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 9})
        );

        let mut body = body;
        body["stream"] = json!(true);
        let (_, f) = post(&fake, "/v1/responses", body).await;
        let events = sse(&f.concat());
        let names: Vec<&str> = events.iter().filter_map(|e| e.0.as_deref()).collect();
        let mut expected = vec![
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ];
        expected.extend(["response.output_text.delta"; 4]);
        expected.extend([
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]);
        assert_eq!(names, expected);
        let data = datas(&events);
        for (i, (d, (name, _))) in data.iter().zip(&events).enumerate() {
            assert_eq!(d["sequence_number"], i);
            assert_eq!(d["type"].as_str(), name.as_deref());
        }
        assert_eq!(data[8]["text"], toks(4));
        let done = &data[11]["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["usage"]["input_tokens"], 5);
        assert_eq!(done["usage"]["output_tokens"], 4);
        assert_eq!(done["usage"]["total_tokens"], 9);
        assert!(data[0]["response"]["usage"].is_null());
    }

    #[tokio::test]
    async fn anthropic_plain_and_streamed() {
        let fake = FakeLlm::start().await;
        let body = json!({
            "model": "claude-3-5-haiku-latest", "max_tokens": 3,
            "system": [{"type": "text", "text": "be terse"}],
            "messages": [{"role": "user", "content": "hi you"}]
        });
        let (s, f) = post(&fake, "/v1/messages", body.clone()).await;
        assert_eq!(s, StatusCode::OK);
        let v = json_of(&f);
        assert_eq!(v["type"], "message");
        assert_eq!(v["content"][0]["text"], toks(3));
        assert_eq!(v["stop_reason"], "max_tokens");
        assert_eq!(v["usage"]["input_tokens"], 4);
        assert_eq!(v["usage"]["output_tokens"], 3);

        let mut body = body;
        body["stream"] = json!(true);
        let (_, f) = post(&fake, "/v1/messages", body).await;
        let events = sse(&f.concat());
        let names: Vec<&str> = events.iter().filter_map(|e| e.0.as_deref()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let data = datas(&events);
        assert_eq!(data[0]["message"]["usage"]["input_tokens"], 4);
        assert_eq!(data[0]["message"]["usage"]["output_tokens"], 1);
        assert_eq!(
            data[4]["delta"],
            json!({"type": "text_delta", "text": "tok1 "})
        );
        assert_eq!(data[7]["usage"]["output_tokens"], 3);
        assert_eq!(data[7]["delta"]["stop_reason"], "max_tokens");
    }

    #[tokio::test]
    async fn models_in_both_shapes() {
        let fake = FakeLlm::start().await;
        let (s, _, f) = call(&fake, Method::GET, "/v1/models", &[], "").await;
        assert_eq!(s, StatusCode::OK);
        let v = json_of(&f);
        assert_eq!(v["object"], "list");
        let ids: Vec<&str> = v["data"]
            .as_array()
            .expect("data")
            .iter()
            .filter_map(|m| m["id"].as_str())
            .collect();
        assert_eq!(ids, MODELS);
        let (_, _, f) = call(
            &fake,
            Method::GET,
            "/v1/models",
            &[("anthropic-version", "2023-06-01")],
            "",
        )
        .await;
        let v = json_of(&f);
        assert_eq!(v["data"][0]["type"], "model");
        assert_eq!(v["has_more"], false);
    }

    #[tokio::test]
    async fn errors_use_each_providers_envelope() {
        let fake = FakeLlm::start().await;
        let anth = |model: &str, stream: bool| json!({"model": model, "max_tokens": 5, "stream": stream, "messages": [{"role": "user", "content": "x"}]});
        // Failure before the first byte, streamed or not.
        for stream in [false, true] {
            let (s, f) = post(
                &fake,
                "/v1/chat/completions",
                chat_body("fake-fail", json!({"stream": stream})),
            )
            .await;
            assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(json_of(&f)["error"]["type"], "server_error");
            let (s, f) = post(&fake, "/v1/messages", anth("fake-fail", stream)).await;
            assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
            let v = json_of(&f);
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], "api_error");
        }
        let (s, f) = post(
            &fake,
            "/v1/responses",
            json!({"model": "nope", "input": "x"}),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(json_of(&f)["error"]["code"], "model_not_found");
        let (s, f) = post(&fake, "/v1/messages", anth("nope", false)).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(json_of(&f)["error"]["type"], "not_found_error");
        // Bad JSON and bad fields are 400s, never a panic.
        for body in [
            "{not json",
            "[1,2]",
            r#"{"model": 3}"#,
            r#"{"model":"gpt-4o","max_tokens":-1}"#,
            r#"{"model":"gpt-4o","stream":"yes"}"#,
        ] {
            let (s, _, f) = call(&fake, Method::POST, "/v1/chat/completions", &[], body).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(json_of(&f)["error"]["type"], "invalid_request_error");
            let (s, _, f) = call(&fake, Method::POST, "/v1/messages", &[], body).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(json_of(&f)["error"]["type"], "invalid_request_error");
        }
        let (s, _, _) = call(&fake, Method::GET, "/v1/chat/completions", &[], "").await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        let (s, _, _) = call(&fake, Method::GET, "/nowhere", &[], "").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        // Streams that failed never started.
        assert_eq!(fake.streams_completed() + fake.streams_cancelled(), 0);
    }

    #[tokio::test]
    async fn midfail_ends_with_an_in_stream_error() {
        let fake = FakeLlm::start().await;
        let (s, f) = post(
            &fake,
            "/v1/chat/completions",
            chat_body("fake-midfail", json!({"stream": true})),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let events = sse(&f.concat());
        assert_eq!(events.len(), 1 + MIDFAIL_TOKENS as usize + 1);
        let last = datas(&events).pop().expect("last");
        assert_eq!(last["error"]["type"], "server_error");
        let (_, f) = post(
            &fake,
            "/v1/messages",
            json!({"model": "fake-midfail", "max_tokens": 10, "stream": true,
            "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
        let events = sse(&f.concat());
        let (name, data) = events.last().expect("last");
        assert_eq!(name.as_deref(), Some("error"));
        assert!(data.contains("overloaded_error"));
        let (_, f) = post(
            &fake,
            "/v1/responses",
            json!({"model": "fake-midfail", "stream": true, "input": "x"}),
        )
        .await;
        let events = sse(&f.concat());
        assert_eq!(events.last().and_then(|e| e.0.as_deref()), Some("error"));
        assert_eq!(fake.streams_completed(), 3);
    }

    #[tokio::test]
    async fn nousage_reports_no_usage_anywhere() {
        let fake = FakeLlm::start().await;
        let (_, f) = post(
            &fake,
            "/v1/chat/completions",
            chat_body(
                "fake-nousage",
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            ),
        )
        .await;
        assert!(!String::from_utf8_lossy(&f.concat()).contains("\"usage\""));
        let (_, f) = post(
            &fake,
            "/v1/chat/completions",
            chat_body("fake-nousage", json!({})),
        )
        .await;
        assert!(!String::from_utf8_lossy(&f.concat()).contains("\"usage\""));
        for stream in [false, true] {
            let (_, f) = post(
                &fake,
                "/v1/responses",
                json!({"model": "fake-nousage", "stream": stream, "input": "x"}),
            )
            .await;
            assert!(!String::from_utf8_lossy(&f.concat()).contains("\"usage\""));
            let (_, f) = post(
                &fake,
                "/v1/messages",
                json!({"model": "fake-nousage", "max_tokens": 2, "stream": stream,
                "messages": [{"role": "user", "content": "x"}]}),
            )
            .await;
            assert!(!String::from_utf8_lossy(&f.concat()).contains("\"usage\""));
        }
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_stream_is_counted() {
        let fake = FakeLlm::start().await;
        let stream = TcpStream::connect(fake.addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        let conn = tokio::spawn(conn);
        let body = chat_body("fake-slow", json!({"stream": true, "max_tokens": 100}));
        let req = Request::builder()
            .method(Method::POST)
            .uri("/v1/chat/completions")
            .header("host", "fake")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        let started = tokio::time::Instant::now();
        let resp = sender.send_request(req).await.expect("send");
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while got.len() < 10 {
            let f = body.frame().await.expect("frame").expect("ok");
            if let Ok(d) = f.into_data() {
                got.push(d);
            }
        }
        // Some tokens came, paced: the slow model waits between them.
        let text = String::from_utf8_lossy(&got.concat()).into_owned();
        assert!(text.contains("tok1 "), "{text}");
        assert!(started.elapsed() >= SLOW_TOKEN_GAP);
        drop(body);
        drop(sender);
        conn.abort();
        let n = crate::eventually(Duration::from_secs(5), || {
            (fake.streams_cancelled() == 1).then_some(())
        })
        .await;
        assert!(n.is_some(), "cancelled = {}", fake.streams_cancelled());
        assert_eq!(fake.streams_completed(), 0);
    }

    #[tokio::test]
    async fn dropping_the_fake_stops_it() {
        let fake = FakeLlm::start().await;
        let addr = fake.addr;
        assert!(fake.base_url().starts_with("http://127.0.0.1:"));
        drop(fake);
        let refused = crate::eventually(Duration::from_secs(5), || {
            std::net::TcpStream::connect(addr).is_err().then_some(())
        })
        .await;
        assert!(refused.is_some());
    }
}
