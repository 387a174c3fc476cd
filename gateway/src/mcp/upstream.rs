//! Sessions with upstream MCP servers: a child process speaking newline-delimited JSON-RPC on
//! stdio, or a streamable-HTTP endpoint. Each caller identity gets sessions of its own, so
//! nothing one agent does upstream (state, subscriptions, a crash it provokes) touches another.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use super::stdio::{read_stdio, Pending, PendingGuard, MAX_MESSAGE};
use crate::sse;
use crate::upstream::Upstream;

/// The session-based protocol version the gateway speaks to upstream servers that do not offer
/// the stateless revision (widely supported).
pub const UPSTREAM_VERSION: &str = "2025-06-18";
/// The stateless revision, preferred with HTTP upstreams that offer it: one exchange per
/// request, answered in JSON, no session to keep.
pub const STATELESS_VERSION: &str = "2026-07-28";
/// How long one upstream request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A JSON-RPC error, or a transport failure expressed as one.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// The JSON-RPC code.
    pub code: i64,
    /// The message.
    pub message: String,
    /// Extra data.
    pub data: Option<Value>,
}

impl RpcError {
    /// A transport failure (the server is gone, timed out or answered garbage).
    pub fn transport(msg: impl Into<String>) -> RpcError {
        RpcError {
            code: -32603,
            message: msg.into(),
            data: None,
        }
    }

    pub(crate) fn from_value(v: &Value) -> RpcError {
        RpcError {
            code: v.get("code").and_then(Value::as_i64).unwrap_or(-32603),
            message: v
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("upstream error")
                .to_string(),
            data: v.get("data").cloned(),
        }
    }
}

/// How an upstream server is reached.
#[derive(Clone)]
pub enum Transport {
    /// A command the gateway starts, one process per caller.
    Stdio {
        /// The program.
        command: String,
        /// Its arguments.
        args: Vec<String>,
        /// Its environment (credentials go here), on top of a minimal one.
        env: BTreeMap<String, String>,
    },
    /// A streamable-HTTP endpoint.
    Http {
        /// `https` or not.
        tls: bool,
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// The endpoint's path.
        path: String,
        /// Headers the gateway adds (credentials); never the client's.
        headers: BTreeMap<String, String>,
    },
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The environment and headers carry credentials: only their names are shown.
        match self {
            Transport::Stdio { command, args, env } => f
                .debug_struct("Stdio")
                .field("command", command)
                .field("args", args)
                .field("env", &env.keys().collect::<Vec<_>>())
                .finish(),
            Transport::Http {
                tls,
                host,
                port,
                path,
                headers,
            } => f
                .debug_struct("Http")
                .field("tls", tls)
                .field("host", host)
                .field("port", port)
                .field("path", path)
                .field("headers", &headers.keys().collect::<Vec<_>>())
                .finish(),
        }
    }
}

/// One live session with one upstream server.
pub struct Session {
    next_id: AtomicU64,
    inner: Inner,
    /// Speaking the stateless revision to this upstream.
    stateless: AtomicBool,
    /// Told when the session is dropped, to end its background listen stream.
    closing: Arc<tokio::sync::Notify>,
    alive: Arc<AtomicBool>,
    /// Set when the server says its tool, resource or prompt lists changed.
    pub changed: Arc<tokio::sync::Notify>,
    /// Dropped with the session: tasks that serve it (its change watcher) end when it goes.
    dropped: tokio::sync::watch::Sender<()>,
    /// How long one request may take.
    timeout: Duration,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("alive", &self.alive.load(Ordering::SeqCst))
            .finish()
    }
}

enum Inner {
    Stdio {
        stdin: tokio::sync::Mutex<tokio::process::ChildStdin>,
        pending: Pending,
        _child: tokio::process::Child,
    },
    Http {
        client: Upstream,
        tls: bool,
        host: String,
        port: u16,
        path: String,
        headers: BTreeMap<String, String>,
        session_id: Mutex<Option<String>>,
        /// Idle connections to the server, reused request after request.
        pool: Mutex<Vec<hyper::client::conn::http1::SendRequest<Full<Bytes>>>>,
    },
}

impl Session {
    /// Starts (stdio) or opens (HTTP) a session and initializes it.
    pub async fn connect(t: &Transport, upstream: &Upstream) -> Result<Session, RpcError> {
        let alive = Arc::new(AtomicBool::new(true));
        let changed = Arc::new(tokio::sync::Notify::new());
        let inner = match t {
            Transport::Stdio { command, args, env } => {
                let mut cmd = tokio::process::Command::new(command);
                cmd.args(args)
                    .env_clear()
                    .env("PATH", std::env::var("PATH").unwrap_or_default())
                    .envs(env)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .kill_on_drop(true);
                let mut child = cmd
                    .spawn()
                    .map_err(|e| RpcError::transport(format!("cannot start {command}: {e}")))?;
                let stdin = child
                    .stdin
                    .take()
                    .ok_or_else(|| RpcError::transport("no stdin"))?;
                let stdout = child
                    .stdout
                    .take()
                    .ok_or_else(|| RpcError::transport("no stdout"))?;
                let pending: Pending = Arc::default();
                tokio::spawn(read_stdio(
                    stdout,
                    pending.clone(),
                    alive.clone(),
                    changed.clone(),
                ));
                Inner::Stdio {
                    stdin: tokio::sync::Mutex::new(stdin),
                    pending,
                    _child: child,
                }
            }
            Transport::Http {
                tls,
                host,
                port,
                path,
                headers,
            } => Inner::Http {
                client: upstream.clone(),
                tls: *tls,
                host: host.clone(),
                port: *port,
                path: path.clone(),
                headers: headers.clone(),
                session_id: Mutex::new(None),
                pool: Mutex::new(Vec::new()),
            },
        };
        let s = Session {
            next_id: AtomicU64::new(1),
            inner,
            stateless: AtomicBool::new(false),
            closing: Arc::new(tokio::sync::Notify::new()),
            alive,
            changed,
            dropped: tokio::sync::watch::channel(()).0,
            timeout: REQUEST_TIMEOUT,
        };
        if matches!(s.inner, Inner::Http { .. }) {
            s.stateless.store(true, Ordering::SeqCst);
            let offered = s
                .request("server/discover", json!({}))
                .await
                .ok()
                .and_then(|r| r.get("supportedVersions").cloned())
                .and_then(|v| v.as_array().cloned())
                .is_some_and(|v| v.iter().any(|x| x == STATELESS_VERSION));
            if offered {
                s.listen_for_changes();
                return Ok(s);
            }
            s.stateless.store(false, Ordering::SeqCst);
        }
        s.request(
            "initialize",
            json!({
                "protocolVersion": UPSTREAM_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "umbra-mcp-gateway", "version": env!("CARGO_PKG_VERSION")},
            }),
        )
        .await?;
        s.notify("notifications/initialized", json!({})).await?;
        Ok(s)
    }

    /// For a stateless upstream: holds a `subscriptions/listen` stream open (reopened while the
    /// session lives) so that its list changes still reach the gateway.
    fn listen_for_changes(&self) {
        let Inner::Http {
            client,
            tls,
            host,
            port,
            path,
            headers,
            ..
        } = &self.inner
        else {
            return;
        };
        let (client, tls, host, port, path, headers) = (
            client.clone(),
            *tls,
            host.clone(),
            *port,
            path.clone(),
            headers.clone(),
        );
        let (alive, changed, closing) = (
            self.alive.clone(),
            self.changed.clone(),
            self.closing.clone(),
        );
        tokio::spawn(async move {
            let run = async {
                while alive.load(Ordering::SeqCst) {
                    let body = json!({"jsonrpc": "2.0", "id": "umbra-listen", "method": "subscriptions/listen",
                    "params": {"notifications": {"toolsListChanged": true, "resourcesListChanged": true,
                        "promptsListChanged": true}, "_meta": stateless_meta()}});
                    let mut b = Request::builder()
                        .method(Method::POST)
                        .uri(path.as_str())
                        .header(http::header::HOST, format!("{host}:{port}"))
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .header(http::header::ACCEPT, "application/json, text/event-stream")
                        .header("mcp-protocol-version", STATELESS_VERSION)
                        .header("mcp-method", "subscriptions/listen");
                    for (k, v) in &headers {
                        b = b.header(k.as_str(), v.as_str());
                    }
                    let Ok(req) = b.body(Full::new(Bytes::from(body.to_string()))) else {
                        return;
                    };
                    if let Ok(resp) = client.send_to(tls, &host, port, req).await {
                        let mut body = resp.into_body();
                        let mut parser = sse::Parser::new(MAX_MESSAGE);
                        while let Some(Ok(frame)) = body.frame().await {
                            let Ok(data) = frame.into_data() else {
                                continue;
                            };
                            let Ok(items) = parser.push(&data) else { break };
                            for item in items {
                                if let sse::Item::Event(ev) = item {
                                    if serde_json::from_str::<Value>(&ev.data)
                                        .is_ok_and(|v| is_list_changed(&v))
                                    {
                                        changed.notify_waiters();
                                    }
                                }
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            };
            tokio::select! {
                _ = run => {}
                _ = closing.notified() => {}
            }
        });
    }

    /// Ends (its `changed()` fails) when this session is dropped, so that a task serving the
    /// session has an owner and does not outlive it.
    pub fn dropped(&self) -> tokio::sync::watch::Receiver<()> {
        self.dropped.subscribe()
    }

    /// Sets how long each request may take (60 s by default).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Requests waiting for an answer (stdio); 0 for HTTP, which keeps no such map.
    pub fn pending(&self) -> usize {
        match &self.inner {
            Inner::Stdio { pending, .. } => pending.lock().map(|p| p.len()).unwrap_or(0),
            Inner::Http { .. } => 0,
        }
    }

    /// Whether the session can still be used (a stdio server that exited cannot).
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Sends a request and waits for its result.
    pub async fn request(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        match &self.inner {
            Inner::Stdio { stdin, pending, .. } => {
                let (tx, rx) = oneshot::channel();
                if let Ok(mut p) = pending.lock() {
                    p.insert(id, tx);
                }
                // Removed however this ends: answer, timeout, write error, or the caller gone.
                let _entry = PendingGuard { pending, id };
                let mut line = msg.to_string().into_bytes();
                line.push(b'\n');
                {
                    let mut w = stdin.lock().await;
                    if let Err(e) = w.write_all(&line).await {
                        self.alive.store(false, Ordering::SeqCst);
                        return Err(RpcError::transport(format!("upstream gone: {e}")));
                    }
                    let _ = w.flush().await;
                }
                match tokio::time::timeout(self.timeout, rx).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err(RpcError::transport("upstream exited")),
                    Err(_) => Err(RpcError::transport("upstream timed out")),
                }
            }
            Inner::Http { .. } => self.http(msg, Some(id)).await,
        }
    }

    /// Sends a notification.
    pub async fn notify(&self, method: &str, params: Value) -> Result<(), RpcError> {
        let msg = json!({"jsonrpc": "2.0", "method": method, "params": params});
        match &self.inner {
            Inner::Stdio { stdin, .. } => {
                let mut line = msg.to_string().into_bytes();
                line.push(b'\n');
                let mut w = stdin.lock().await;
                w.write_all(&line)
                    .await
                    .map_err(|e| RpcError::transport(format!("upstream gone: {e}")))?;
                let _ = w.flush().await;
                Ok(())
            }
            Inner::Http { .. } => self.http(msg, None).await.map(|_| ()),
        }
    }

    async fn http(&self, msg: Value, id: Option<u64>) -> Result<Value, RpcError> {
        let Inner::Http {
            client,
            tls,
            host,
            port,
            path,
            headers,
            session_id,
            pool,
        } = &self.inner
        else {
            return Err(RpcError::transport("not an HTTP session"));
        };
        let stateless = self.stateless.load(Ordering::SeqCst);
        let mut msg = msg;
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(path.as_str())
            .header(http::header::HOST, format!("{host}:{port}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json, text/event-stream");
        if stateless {
            let method = msg["method"].as_str().unwrap_or("").to_string();
            b = b
                .header("mcp-protocol-version", STATELESS_VERSION)
                .header("mcp-method", method.as_str());
            let name_key = match method.as_str() {
                "tools/call" | "prompts/get" => Some("name"),
                "resources/read" => Some("uri"),
                _ => None,
            };
            if let Some(name) = name_key.and_then(|k| msg["params"][k].as_str()) {
                b = b.header("mcp-name", super::routing_header::encode(name));
            }
            if !msg["params"].is_object() {
                msg["params"] = json!({});
            }
            msg["params"]["_meta"] = stateless_meta();
        } else {
            b = b.header("mcp-protocol-version", UPSTREAM_VERSION);
            if let Some(sid) = session_id.lock().ok().and_then(|s| s.clone()) {
                b = b.header("mcp-session-id", sid);
            }
        }
        for (k, v) in headers {
            b = b.header(k.as_str(), v.as_str());
        }
        let req = b
            .body(Full::new(Bytes::from(msg.to_string())))
            .map_err(|e| RpcError::transport(e.to_string()))?;
        // An idle pooled connection if one is still open, else a new one.
        let mut sender = loop {
            let idle = pool.lock().ok().and_then(|mut p| p.pop());
            match idle {
                Some(s) if !s.is_closed() => break s,
                Some(_) => continue,
                None => {
                    break client
                        .open(*tls, host, *port)
                        .await
                        .map_err(|e| RpcError::transport(e.to_string()))?
                }
            }
        };
        let send = async {
            sender
                .ready()
                .await
                .map_err(|e| RpcError::transport(e.to_string()))?;
            sender
                .send_request(req)
                .await
                .map_err(|e| RpcError::transport(e.to_string()))
        };
        let resp = tokio::time::timeout(self.timeout, send)
            .await
            .map_err(|_| RpcError::transport("upstream timed out"))??;
        if let Some(sid) = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
        {
            if let Ok(mut s) = session_id.lock() {
                *s = Some(sid.to_string());
            }
        }
        let status = resp.status();
        if status == http::StatusCode::NOT_FOUND {
            // The upstream forgot the session: it must be opened again.
            self.alive.store(false, Ordering::SeqCst);
        }
        let Some(id) = id else {
            return if status.is_success() {
                Ok(Value::Null)
            } else {
                Err(RpcError::transport(format!("upstream answered {status}")))
            };
        };
        let is_sse = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let mut body = resp.into_body();
        if is_sse {
            let mut parser = sse::Parser::new(MAX_MESSAGE);
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| RpcError::transport(e.to_string()))?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                let items = parser
                    .push(&data)
                    .map_err(|e| RpcError::transport(e.to_string()))?;
                for item in items {
                    if let sse::Item::Event(ev) = item {
                        if let Ok(v) = serde_json::from_str::<Value>(&ev.data) {
                            if let Some(r) = self.response_for(&v, id) {
                                return r;
                            }
                        }
                    }
                }
            }
            return Err(RpcError::transport(
                "upstream stream ended without an answer",
            ));
        }
        let bytes = Limited::new(body, MAX_MESSAGE)
            .collect()
            .await
            .map_err(|e| RpcError::transport(e.to_string()))?
            .to_bytes();
        // The response is read whole: the connection is free for the next request.
        if let Ok(mut p) = pool.lock() {
            if p.len() < 8 {
                p.push(sender);
            }
        }
        if !status.is_success() {
            if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
                if let Some(e) = v.get("error") {
                    return Err(RpcError::from_value(e));
                }
            }
            return Err(RpcError::transport(format!("upstream answered {status}")));
        }
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| RpcError::transport(format!("upstream answered garbage: {e}")))?;
        self.response_for(&v, id)
            .unwrap_or_else(|| Err(RpcError::transport("upstream answered another request")))
    }

    /// The result or error in `v` if it answers `id`; notifications are noted on the way.
    fn response_for(&self, v: &Value, id: u64) -> Option<Result<Value, RpcError>> {
        if is_list_changed(v) {
            self.changed.notify_waiters();
        }
        if v.get("id").and_then(Value::as_u64) != Some(id) {
            return None;
        }
        Some(match (v.get("result"), v.get("error")) {
            (Some(r), _) => Ok(r.clone()),
            (None, Some(e)) => Err(RpcError::from_value(e)),
            _ => Err(RpcError::transport("malformed upstream answer")),
        })
    }
}

/// The per-request envelope of the stateless revision.
fn stateless_meta() -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": STATELESS_VERSION,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "umbra-mcp-gateway", "version": env!("CARGO_PKG_VERSION")},
    })
}

impl Drop for Session {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
        self.closing.notify_one();
    }
}

pub(crate) fn is_list_changed(v: &Value) -> bool {
    matches!(
        v.get("method").and_then(Value::as_str),
        Some(
            "notifications/tools/list_changed"
                | "notifications/resources/list_changed"
                | "notifications/prompts/list_changed"
        )
    )
}
