//! The MCP gateway's server: streamable HTTP on overlay streams (no listening port).
//!
//! Sessions (protocol 2025-06-18 and 2025-11-25) are bound to the identity that opened them:
//! another identity presenting a session id gets the same 404 as an unknown or expired one.
//! The stateless revision (2026-07-28) needs no session: each request names its method (and
//! tool, resource or prompt) in headers that must match the body. Every list is the caller's
//! own: filtered before paging, sorted, paged with identity-bound cursors, marked private.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use umbra_policies::{IdentityId, Name};
use umbra_proto::api::HostedGrant;
use umbra_sdk::{Caller, Context, SdkError};

use super::catalog::{self, Catalog, Kind};
use super::config::McpConfig;
use super::cursor::Cursors;
use super::pool::{OnChange, Pool};
use super::upstream::{RpcError, Session};
use crate::grants::Grants;
use crate::upstream::Upstream;
use crate::Body;

/// Versions with sessions, newest first.
pub const SESSION_VERSIONS: [&str; 2] = ["2025-11-25", "2025-06-18"];
/// The stateless version.
pub const STATELESS_VERSION: &str = "2026-07-28";

const PARSE_ERROR: i64 = -32700;
/// How much of an oversized body is read (and dropped) before answering 413.
const DRAIN_LIMIT: usize = 64 << 20;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const INTERNAL_ERROR: i64 = -32603;
/// The code the streamable-HTTP transport uses for session and origin problems.
const TRANSPORT_ERROR: i64 = -32000;
/// The stateless revision's code for routing headers that disagree with the body.
const HEADER_MISMATCH: i64 = -32020;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// Binding the service or watching the view failed.
    #[error(transparent)]
    Sdk(#[from] SdkError),
    /// The service name is invalid.
    #[error("invalid service name: {0}")]
    Service(String),
    /// The audit file could not be opened, or names something a log must not be written to.
    #[error("audit log: {0}")]
    Audit(umbra_pki::OutFileError),
}

struct ClientSession {
    identity: IdentityId,
    version: String,
    /// When the client last used the session, on the gateway's clock (a wall-clock time, so
    /// that a test moves the clock instead of waiting for the idle expiry).
    last_seen: SystemTime,
    /// The GET stream's sender, when the client holds one open.
    events: Option<mpsc::Sender<Bytes>>,
    /// What the caller saw of each kind when last told.
    seen: HashMap<Kind, u64>,
    /// For a stateless `subscriptions/listen` stream: its request id and which kinds it wants.
    subscription: Option<(Value, [bool; 3])>,
}

/// Keys of listen streams in the session table; never valid as an `Mcp-Session-Id`.
const LISTEN_PREFIX: &str = "listen:";
/// Most sessions and listen streams one identity holds at once; opening more ends its oldest.
const MAX_SESSIONS_PER_IDENTITY: usize = 64;

/// Makes room for one more session of `who`: a peer cannot grow the table without bound.
fn evict_oldest(m: &mut HashMap<String, ClientSession>, who: &IdentityId) {
    let mut mine: Vec<(SystemTime, String)> = m
        .iter()
        .filter(|(_, c)| &c.identity == who)
        .map(|(k, c)| (c.last_seen, k.clone()))
        .collect();
    if mine.len() < MAX_SESSIONS_PER_IDENTITY {
        return;
    }
    mine.sort();
    for (_, k) in mine.iter().take(mine.len() + 1 - MAX_SESSIONS_PER_IDENTITY) {
        m.remove(k);
    }
}
const SUBSCRIPTION_ID: &str = "io.modelcontextprotocol/subscriptionId";

struct Shared {
    cfg: McpConfig,
    grants: watch::Receiver<Arc<Grants>>,
    upstream: Upstream,
    /// Each identity's upstream sessions.
    pool: Pool,
    catalogs: Mutex<HashMap<IdentityId, Arc<Catalog>>>,
    sessions: Mutex<HashMap<String, ClientSession>>,
    cursors: Cursors,
    audit: Option<Mutex<std::fs::File>>,
    metrics: crate::metrics::McpMetrics,
    /// Woken when an upstream's lists changed; a task then tells the sessions concerned.
    changes: tokio::sync::Notify,
}

/// A running MCP gateway.
pub struct McpGateway {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for McpGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("McpGateway")
    }
}

impl Drop for McpGateway {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The time `clock` shows, as an RFC 3339 string in UTC (`2026-12-06T04:42:43.5Z`), as the
/// audit records' `at` field promises.
fn now_rfc3339(clock: &umbra_clock::Clock) -> String {
    let at = time::OffsetDateTime::from(clock.now());
    at.format(&time::format_description::well_known::Rfc3339)
        // Only years outside 0..=9999 cannot be written; fall back to the epoch seconds.
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl McpGateway {
    /// Binds the configured service and serves it until dropped.
    pub async fn start(ctx: Context, cfg: McpConfig) -> Result<McpGateway, McpError> {
        let service =
            Name::new(cfg.service.as_str()).map_err(|e| McpError::Service(e.to_string()))?;
        let audit = match &cfg.audit {
            // 0600 from creation: the audit names identities, tools and arguments.
            Some(p) => Some(Mutex::new(
                umbra_pki::open_append(p, 0o600).map_err(McpError::Audit)?,
            )),
            None => None,
        };
        let (grants, follower) = crate::grants::follow(ctx.clone(), service.as_str()).await?;
        let shared = Arc::new_cyclic(|weak: &std::sync::Weak<Shared>| {
            // An upstream's lists changed: that identity's catalog is rebuilt on next use and
            // its sessions are told.
            let weak = weak.clone();
            let on_change: OnChange = Arc::new(move |who: &IdentityId| {
                if let Some(s) = weak.upgrade() {
                    if let Ok(mut m) = s.catalogs.lock() {
                        m.remove(who);
                    }
                    s.changes.notify_one();
                }
            });
            Shared {
                metrics: crate::metrics::McpMetrics::new(cfg.metrics.as_ref()),
                cfg,
                grants,
                upstream: Upstream::new(),
                pool: Pool::new(on_change),
                catalogs: Default::default(),
                sessions: Default::default(),
                cursors: Cursors::new(),
                audit,
                changes: tokio::sync::Notify::new(),
            }
        });
        // Each change of the grants is told to the sessions it concerns.
        let (s, mut rx) = (shared.clone(), shared.grants.clone());
        let watcher = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                notify_changes(&s).await;
            }
        });
        let listener = ctx.bind(service.as_str()).await?;
        let server = crate::serve(listener, shared.clone(), handle);
        let s = shared.clone();
        let reaper = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let ttl = s.cfg.session_ttl;
                if let Ok(mut m) = s.sessions.lock() {
                    m.retain(|_, c| match &c.subscription {
                        // A listen stream lives as long as its client holds it.
                        Some(_) => c.events.as_ref().is_some_and(|t| !t.is_closed()),
                        None => idle(&s.cfg.clock, c) < ttl,
                    });
                }
            }
        });
        let s = shared.clone();
        let upstream_changes = tokio::spawn(async move {
            loop {
                s.changes.notified().await;
                notify_changes(&s).await;
            }
        });
        Ok(McpGateway {
            tasks: vec![follower, watcher, server, reaper, upstream_changes],
        })
    }
}

fn rpc_error(id: &Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn respond(status: StatusCode, body: &Value, private: bool) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if private {
        r.headers_mut().insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("private, no-store"),
        );
    }
    r
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

async fn handle(s: Arc<Shared>, caller: Arc<Caller>, req: Request<Incoming>) -> Response<Body> {
    // A browser page must not drive an agent's tools: a foreign Origin is refused.
    if let Some(origin) = header(req.headers(), "origin") {
        if !s.cfg.allowed_origins.iter().any(|o| o == origin) {
            return respond(
                StatusCode::FORBIDDEN,
                &rpc_error(&Value::Null, TRANSPORT_ERROR, "Forbidden: invalid Origin"),
                false,
            );
        }
    }
    match *req.method() {
        Method::POST => post(s, caller, req).await,
        Method::GET => get_stream(&s, &caller, req.headers()),
        Method::DELETE => {
            let sid = header(req.headers(), "mcp-session-id").map(String::from);
            match sid.and_then(|sid| take_session(&s, &caller, &sid)) {
                Some(()) => empty(StatusCode::OK),
                None => session_not_found(),
            }
        }
        _ => empty(StatusCode::METHOD_NOT_ALLOWED),
    }
}

fn session_not_found() -> Response<Body> {
    respond(
        StatusCode::NOT_FOUND,
        &rpc_error(&Value::Null, INVALID_REQUEST, "Session not found"),
        false,
    )
}

fn take_session(s: &Shared, caller: &Caller, sid: &str) -> Option<()> {
    let mut m = s.sessions.lock().ok()?;
    match m.get(sid) {
        Some(c) if c.identity == caller.id => {
            m.remove(sid);
            Some(())
        }
        _ => None,
    }
}

/// How long a session has been idle (none if the clock was stepped back past its last use).
fn idle(clock: &umbra_clock::Clock, c: &ClientSession) -> Duration {
    clock.now().duration_since(c.last_seen).unwrap_or_default()
}

/// The session's version, refreshing its idle timer, if it belongs to the caller.
fn touch(s: &Shared, caller: &Caller, sid: &str) -> Option<String> {
    if sid.starts_with(LISTEN_PREFIX) {
        return None;
    }
    let mut m = s.sessions.lock().ok()?;
    let c = m.get_mut(sid)?;
    if c.identity != caller.id || idle(&s.cfg.clock, c) >= s.cfg.session_ttl {
        return None;
    }
    c.last_seen = s.cfg.clock.now();
    Some(c.version.clone())
}

fn get_stream(s: &Shared, caller: &Caller, h: &HeaderMap) -> Response<Body> {
    let Some(sid) = header(h, "mcp-session-id") else {
        return empty(StatusCode::METHOD_NOT_ALLOWED);
    };
    if touch(s, caller, sid).is_none() {
        return session_not_found();
    }
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    if let Ok(mut m) = s.sessions.lock() {
        if let Some(c) = m.get_mut(sid) {
            c.events = Some(tx.clone());
        }
    }
    // Comments keep idle proxies from closing the stream.
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(15)).await;
            if tx
                .send(Bytes::from_static(b": keep-alive\n\n"))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    crate::sse_response(rx)
}

async fn post(s: Arc<Shared>, caller: Arc<Caller>, req: Request<Incoming>) -> Response<Body> {
    let headers = req.headers().clone();
    let mut body = req.into_body();
    let mut buf = Vec::new();
    let mut too_large = false;
    let mut seen = 0usize;
    // Read to the end even past the limit (bounded), so the client, still writing, gets the
    // answer instead of a reset connection.
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(d) = frame.into_data() {
            seen += d.len();
            if seen > s.cfg.max_request_bytes {
                too_large = true;
                if seen > DRAIN_LIMIT {
                    break;
                }
            } else {
                buf.extend_from_slice(&d);
            }
        }
    }
    if too_large {
        return respond(
            StatusCode::PAYLOAD_TOO_LARGE,
            &rpc_error(&Value::Null, INVALID_REQUEST, "Request body too large"),
            false,
        );
    }
    let bytes = Bytes::from(buf);
    let msg: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(_) => {
            return respond(
                StatusCode::BAD_REQUEST,
                &rpc_error(&Value::Null, PARSE_ERROR, "Parse error"),
                false,
            )
        }
    };
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let valid_id = matches!(id, Value::Null | Value::String(_) | Value::Number(_));
    let method = msg.get("method").and_then(Value::as_str).map(String::from);
    if !msg.is_object() || msg.get("jsonrpc") != Some(&json!("2.0")) || !valid_id {
        return respond(
            StatusCode::BAD_REQUEST,
            &rpc_error(&Value::Null, INVALID_REQUEST, "Invalid Request"),
            false,
        );
    }
    let Some(method) = method else {
        // A response from the client (to a request we never send): accepted and ignored.
        return empty(StatusCode::ACCEPTED);
    };
    let params = msg.get("params").cloned().unwrap_or_else(|| json!({}));
    if !params.is_object() {
        return respond(
            StatusCode::OK,
            &rpc_error(&id, INVALID_PARAMS, "params must be an object"),
            false,
        );
    }
    let version_header = header(&headers, "mcp-protocol-version").map(String::from);
    let stateless = version_header.as_deref() == Some(STATELESS_VERSION);
    if stateless {
        // The routing headers must say what the body says.
        let want_name = match method.as_str() {
            "tools/call" | "prompts/get" => params.get("name").and_then(Value::as_str),
            "resources/read" => params.get("uri").and_then(Value::as_str),
            _ => None,
        };
        let hm = header(&headers, "mcp-method");
        let hn = header(&headers, "mcp-name").and_then(super::routing_header::decode);
        let mismatch = if hm != Some(method.as_str()) {
            Some("Mcp-Method header does not match the request body's method")
        } else if want_name.is_some() && hn.as_deref() != want_name {
            Some("Mcp-Name header does not match the request body")
        } else {
            None
        };
        if let Some(m) = mismatch {
            return respond(
                StatusCode::BAD_REQUEST,
                &rpc_error(&id, HEADER_MISMATCH, m),
                false,
            );
        }
    } else if method != "initialize" {
        let Some(sid) = header(&headers, "mcp-session-id") else {
            return respond(
                StatusCode::BAD_REQUEST,
                &rpc_error(&id, INVALID_REQUEST, "Bad Request: Missing session ID"),
                false,
            );
        };
        let Some(version) = touch(&s, &caller, sid) else {
            return session_not_found();
        };
        if let Some(v) = &version_header {
            if *v != version && !SESSION_VERSIONS.contains(&v.as_str()) {
                return respond(
                    StatusCode::BAD_REQUEST,
                    &rpc_error(
                        &id,
                        TRANSPORT_ERROR,
                        &format!("Bad Request: Unsupported protocol version: {v}"),
                    ),
                    false,
                );
            }
        }
    }
    if msg.get("id").is_none() {
        // A notification: nothing to answer.
        return empty(StatusCode::ACCEPTED);
    }
    let grants = s.grants.borrow().of(&caller.id).to_vec();
    match method.as_str() {
        "initialize" if !stateless => initialize(&s, &caller, &id, &params, &grants).await,
        "server/discover" => respond(StatusCode::OK, &discover(&id), true),
        "subscriptions/listen" if stateless => {
            listen(&s, &caller, &id, &params, &headers, &grants).await
        }
        "ping" => respond(
            StatusCode::OK,
            &json!({"jsonrpc": "2.0", "id": id, "result": {}}),
            false,
        ),
        "tools/list" => list(&s, &caller, &grants, &id, &params, Kind::Tools, stateless).await,
        "resources/list" => {
            list(
                &s,
                &caller,
                &grants,
                &id,
                &params,
                Kind::Resources,
                stateless,
            )
            .await
        }
        "prompts/list" => list(&s, &caller, &grants, &id, &params, Kind::Prompts, stateless).await,
        "resources/templates/list" => {
            let mut result = json!({"resourceTemplates": []});
            if stateless {
                stateless_fields(&mut result, true);
            }
            respond(
                StatusCode::OK,
                &json!({"jsonrpc": "2.0", "id": id, "result": result}),
                true,
            )
        }
        "tools/call" => call(&s, &caller, &grants, &id, &params, Kind::Tools, stateless).await,
        "resources/read" => {
            call(
                &s,
                &caller,
                &grants,
                &id,
                &params,
                Kind::Resources,
                stateless,
            )
            .await
        }
        "prompts/get" => call(&s, &caller, &grants, &id, &params, Kind::Prompts, stateless).await,
        _ => respond(
            StatusCode::OK,
            &rpc_error(&id, METHOD_NOT_FOUND, "Method not found"),
            false,
        ),
    }
}

fn capabilities() -> Value {
    json!({
        "tools": {"listChanged": true},
        "resources": {"listChanged": true},
        "prompts": {"listChanged": true},
    })
}

fn server_info() -> Value {
    json!({"name": "umbra-mcp-gateway", "version": env!("CARGO_PKG_VERSION")})
}

fn discover(id: &Value) -> Value {
    let mut versions = vec![STATELESS_VERSION];
    versions.extend(SESSION_VERSIONS);
    json!({"jsonrpc": "2.0", "id": id, "result": {
        "supportedVersions": versions,
        "capabilities": capabilities(),
        "serverInfo": server_info(),
        "resultType": "complete",
        "ttlMs": 0,
        "cacheScope": "private",
    }})
}

/// The fields the stateless revision requires on results: `resultType`, and on lists the
/// caching directives. A caller's lists are its own: never cached for anyone else.
fn stateless_fields(result: &mut Value, cacheable: bool) {
    if let Some(o) = result.as_object_mut() {
        o.entry("resultType").or_insert_with(|| json!("complete"));
        if cacheable {
            o.insert("ttlMs".into(), json!(0));
            o.insert("cacheScope".into(), json!("private"));
        }
    }
}

async fn initialize(
    s: &Arc<Shared>,
    caller: &Caller,
    id: &Value,
    params: &Value,
    grants: &[HostedGrant],
) -> Response<Body> {
    let asked = params.get("protocolVersion").and_then(Value::as_str);
    let version = asked
        .filter(|v| SESSION_VERSIONS.contains(v))
        .unwrap_or(SESSION_VERSIONS[0])
        .to_string();
    let sid = random_id();
    // What the caller sees now, so that a later change can be told to it alone.
    let cat = catalog_for(s, &caller.id).await;
    let seen = Kind::ALL
        .iter()
        .map(|k| (*k, catalog::fingerprint(&cat, grants, *k)))
        .collect();
    if let Ok(mut m) = s.sessions.lock() {
        evict_oldest(&mut m, &caller.id);
        m.insert(
            sid.clone(),
            ClientSession {
                identity: caller.id.clone(),
                version: version.clone(),
                last_seen: s.cfg.clock.now(),
                events: None,
                seen,
                subscription: None,
            },
        );
    }
    let mut r = respond(
        StatusCode::OK,
        &json!({"jsonrpc": "2.0", "id": id, "result": {
            "protocolVersion": version,
            "capabilities": capabilities(),
            "serverInfo": server_info(),
        }}),
        false,
    );
    if let Ok(v) = HeaderValue::from_str(&sid) {
        r.headers_mut().insert("mcp-session-id", v);
    }
    r
}

/// The caller's upstream session with `server`, started (or restarted) as needed; a slow start
/// delays only this (identity, server).
async fn session_for(s: &Shared, who: &IdentityId, server: &str) -> Result<Arc<Session>, RpcError> {
    let cfg = s
        .cfg
        .servers
        .get(server)
        .ok_or_else(|| RpcError::transport("unknown server"))?;
    s.pool
        .session(who, server, &cfg.transport, &s.upstream)
        .await
}

/// Every page of an upstream list.
async fn fetch_all(sess: &Session, kind: Kind) -> Result<Vec<Value>, RpcError> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let params = match &cursor {
            Some(c) => json!({"cursor": c}),
            None => json!({}),
        };
        let r = sess
            .request(&format!("{}/list", kind.key()), params)
            .await?;
        if let Some(items) = r.get(kind.key()).and_then(Value::as_array) {
            out.extend(items.iter().cloned());
        }
        match r.get("nextCursor").and_then(Value::as_str) {
            Some(c) if !c.is_empty() => cursor = Some(c.to_string()),
            _ => break,
        }
    }
    Ok(out)
}

/// The identity's catalog, from cache or from its upstream sessions. A server that cannot be
/// reached contributes nothing until it can.
async fn catalog_for(s: &Arc<Shared>, who: &IdentityId) -> Arc<Catalog> {
    if let Some(c) = s.catalogs.lock().ok().and_then(|m| m.get(who).cloned()) {
        return c;
    }
    let mut cat = Catalog::default();
    let mut complete = true;
    for (name, _) in s.cfg.servers.iter() {
        let sess = match session_for(s, who, name).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(server = %name, error = %e.message, "upstream unavailable");
                complete = false;
                continue;
            }
        };
        for kind in Kind::ALL {
            match fetch_all(&sess, kind).await {
                Ok(items) => cat.add(kind, name, &s.cfg.separator, items),
                // A server without resources or prompts answers method-not-found.
                Err(e) if e.code == METHOD_NOT_FOUND => {}
                Err(e) => {
                    tracing::warn!(server = %name, error = %e.message, "upstream list failed");
                    complete = false;
                }
            }
        }
        // Its list changes reach the catalog through the pool's one watcher per session.
    }
    cat.seal();
    let cat = Arc::new(cat);
    if complete {
        if let Ok(mut m) = s.catalogs.lock() {
            m.insert(who.clone(), cat.clone());
        }
    }
    cat
}

/// Tells each session whose visible lists changed (and only those) that they did.
async fn notify_changes(s: &Arc<Shared>) {
    let ids: Vec<(String, IdentityId)> = match s.sessions.lock() {
        Ok(m) => m
            .iter()
            .map(|(k, c)| (k.clone(), c.identity.clone()))
            .collect(),
        Err(_) => return,
    };
    for (sid, who) in ids {
        let grants = s.grants.borrow().of(&who).to_vec();
        let cat = catalog_for(s, &who).await;
        let mut to_send = Vec::new();
        if let Ok(mut m) = s.sessions.lock() {
            let Some(c) = m.get_mut(&sid) else {
                continue;
            };
            for (i, kind) in Kind::ALL.into_iter().enumerate() {
                let fp = catalog::fingerprint(&cat, &grants, kind);
                if c.seen.get(&kind) != Some(&fp) {
                    c.seen.insert(kind, fp);
                    let wanted = c.subscription.as_ref().is_none_or(|(_, f)| f[i]);
                    if let (Some(tx), true) = (&c.events, wanted) {
                        let sub = c.subscription.as_ref().map(|(id, _)| id.clone());
                        to_send.push((tx.clone(), kind, sub));
                    }
                }
            }
        }
        for (tx, kind, sub) in to_send {
            let msg = match sub {
                Some(id) => json!({"jsonrpc": "2.0", "method": kind.changed_method(),
                    "params": {"_meta": {SUBSCRIPTION_ID: id}}}),
                None => json!({"jsonrpc": "2.0", "method": kind.changed_method()}),
            };
            let ev = format!("event: message\ndata: {msg}\n\n");
            let _ = tx.send(Bytes::from(ev)).await;
        }
    }
}

/// `subscriptions/listen` (stateless revision): an SSE stream that acknowledges the filter and
/// then carries the list-changed notifications the caller asked for, tagged with its id.
async fn listen(
    s: &Arc<Shared>,
    caller: &Caller,
    id: &Value,
    params: &Value,
    headers: &HeaderMap,
    grants: &[HostedGrant],
) -> Response<Body> {
    if !header(headers, "accept").is_some_and(|a| a.contains("text/event-stream")) {
        return respond(
            StatusCode::NOT_ACCEPTABLE,
            &rpc_error(
                id,
                INVALID_REQUEST,
                "Not Acceptable: text/event-stream required",
            ),
            false,
        );
    }
    let want = &params["notifications"];
    let filter = [
        want["toolsListChanged"].as_bool().unwrap_or(false),
        want["resourcesListChanged"].as_bool().unwrap_or(false),
        want["promptsListChanged"].as_bool().unwrap_or(false),
    ];
    let cat = catalog_for(s, &caller.id).await;
    let seen = Kind::ALL
        .iter()
        .map(|k| (*k, catalog::fingerprint(&cat, grants, *k)))
        .collect();
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    let ack = json!({"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
    "params": {"_meta": {SUBSCRIPTION_ID: id}, "notifications": {
        "toolsListChanged": filter[0],
        "resourcesListChanged": filter[1],
        "promptsListChanged": filter[2],
    }}});
    let _ = tx.try_send(Bytes::from(format!("event: message\ndata: {ack}\n\n")));
    if let Ok(mut m) = s.sessions.lock() {
        evict_oldest(&mut m, &caller.id);
        m.insert(
            format!("{LISTEN_PREFIX}{}", random_id()),
            ClientSession {
                identity: caller.id.clone(),
                version: STATELESS_VERSION.into(),
                last_seen: s.cfg.clock.now(),
                events: Some(tx.clone()),
                seen,
                subscription: Some((id.clone(), filter)),
            },
        );
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(15)).await;
            if tx.send(Bytes::from_static(b": ping\n\n")).await.is_err() {
                return;
            }
        }
    });
    crate::sse_response(rx)
}

async fn list(
    s: &Arc<Shared>,
    caller: &Caller,
    grants: &[HostedGrant],
    id: &Value,
    params: &Value,
    kind: Kind,
    stateless: bool,
) -> Response<Body> {
    let offset = match params.get("cursor") {
        None | Some(Value::Null) => 0,
        Some(Value::String(c)) => match s.cursors.open(kind.key(), caller.id.as_str(), c) {
            Some(o) => o as usize,
            None => {
                return respond(
                    StatusCode::OK,
                    &rpc_error(id, INVALID_PARAMS, "Invalid cursor"),
                    false,
                )
            }
        },
        Some(_) => {
            return respond(
                StatusCode::OK,
                &rpc_error(id, INVALID_PARAMS, "Invalid cursor"),
                false,
            )
        }
    };
    let cat = catalog_for(s, &caller.id).await;
    let visible = catalog::visible_list(&cat, grants, kind);
    let page: Vec<Value> = visible
        .iter()
        .skip(offset)
        .take(s.cfg.page_size)
        .map(|e| e.item.clone())
        .collect();
    let mut result = json!({ kind.key(): page });
    if offset + s.cfg.page_size < visible.len() {
        result["nextCursor"] = json!(s.cursors.issue(
            kind.key(),
            caller.id.as_str(),
            (offset + s.cfg.page_size) as u64
        ));
    }
    if stateless {
        stateless_fields(&mut result, true);
    }
    respond(
        StatusCode::OK,
        &json!({"jsonrpc": "2.0", "id": id, "result": result}),
        true,
    )
}

/// How a call ended, for the audit log.
struct Outcome<'a> {
    decision: &'a str,
    took: Duration,
    result_bytes: usize,
}

fn audit(s: &Shared, caller: &Caller, kind: Kind, name: &str, out: Outcome<'_>, params: &Value) {
    let args = params.get("arguments").cloned().unwrap_or(Value::Null);
    let args_field = if s.cfg.log_arguments {
        json!({"arguments": args})
    } else {
        let digest = ring::digest::digest(&ring::digest::SHA256, args.to_string().as_bytes());
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        json!({"arguments_sha256": hex})
    };
    let mut ev = json!({
        "at": now_rfc3339(&s.cfg.clock),
        "identity": caller.name.as_str(),
        "kind": kind.key(),
        "name": name,
        "decision": out.decision,
        "duration_ms": out.took.as_secs_f64() * 1000.0,
        "result_bytes": out.result_bytes,
    });
    if let (Some(o), Some(a)) = (ev.as_object_mut(), args_field.as_object()) {
        for (k, v) in a {
            o.insert(k.clone(), v.clone());
        }
    }
    tracing::info!(identity = %caller.name, %name, decision = out.decision, "mcp call");
    (s.metrics).call(kind.key(), name, out.decision, out.took);
    if let Some(f) = &s.audit {
        if let Ok(mut f) = f.lock() {
            use std::io::Write;
            let _ = writeln!(f, "{ev}");
        }
    }
}

async fn call(
    s: &Arc<Shared>,
    caller: &Caller,
    grants: &[HostedGrant],
    id: &Value,
    params: &Value,
    kind: Kind,
    stateless: bool,
) -> Response<Body> {
    let t0 = Instant::now();
    let field = kind.name_field();
    let Some(name) = params.get(field).and_then(Value::as_str) else {
        return respond(
            StatusCode::OK,
            &rpc_error(id, INVALID_PARAMS, &format!("`{field}` is required")),
            false,
        );
    };
    let cat = catalog_for(s, &caller.id).await;
    // Exactly one answer for a name that is hidden and one that does not exist: for a tool,
    // the error result an MCP server gives for an unknown tool; for the others, invalid params.
    let Some(entry) = catalog::find(&cat, grants, kind, name).cloned() else {
        let out = Outcome {
            decision: "denied",
            took: t0.elapsed(),
            result_bytes: 0,
        };
        audit(s, caller, kind, name, out, params);
        let body = match kind {
            Kind::Tools => {
                let mut result = json!({
                    "content": [{"type": "text", "text": format!("Unknown tool: {name}")}],
                    "isError": true,
                });
                if stateless {
                    stateless_fields(&mut result, false);
                }
                json!({"jsonrpc": "2.0", "id": id, "result": result})
            }
            Kind::Resources => rpc_error(id, INVALID_PARAMS, &format!("Unknown resource: {name}")),
            Kind::Prompts => rpc_error(id, INVALID_PARAMS, &format!("Unknown prompt: {name}")),
        };
        return respond(StatusCode::OK, &body, false);
    };
    let mut up_params = params.clone();
    if let Some(o) = up_params.as_object_mut() {
        o.insert(field.into(), Value::String(entry.upstream.clone()));
        o.remove("_meta");
    }
    let method = match kind {
        Kind::Tools => "tools/call",
        Kind::Resources => "resources/read",
        Kind::Prompts => "prompts/get",
    };
    let result = match session_for(s, &caller.id, &entry.server).await {
        Ok(sess) => sess.request(method, up_params).await,
        Err(e) => Err(e),
    };
    let body = match result {
        Ok(mut r) => {
            if kind == Kind::Resources {
                // Answered with the URI the client asked for, not the upstream's.
                catalog::answer_uris(&mut r, &entry);
            }
            if stateless {
                stateless_fields(&mut r, false);
            }
            json!({"jsonrpc": "2.0", "id": id, "result": r})
        }
        Err(e) => {
            if e.code == INTERNAL_ERROR {
                // The server is gone: the next call starts it again; its list may differ.
                if let Ok(mut m) = s.catalogs.lock() {
                    m.remove(&caller.id);
                }
            }
            json!({"jsonrpc": "2.0", "id": id, "error": {"code": e.code, "message": e.message}})
        }
    };
    let text = body.to_string();
    let out = Outcome {
        decision: "allowed",
        took: t0.elapsed(),
        result_bytes: text.len(),
    };
    audit(s, caller, kind, name, out, params);
    let mut r = Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod clock_tests {
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn audit_times_are_rfc3339_from_the_injected_clock() {
        // 2026-12-01T12:00:00Z, and half a second later.
        let m = umbra_clock::ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_796_126_400));
        assert_eq!(super::now_rfc3339(&m.clock()), "2026-12-01T12:00:00Z");
        m.advance(Duration::from_millis(500));
        assert_eq!(super::now_rfc3339(&m.clock()), "2026-12-01T12:00:00.5Z");
    }
}
