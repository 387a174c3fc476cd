//! The MCP gateway end to end: a real controller and router on loopback, the gateway hosting
//! `mcp` through the SDK (no listening port), real upstream MCP servers written with the
//! official Python SDK (one over stdio, one over streamable HTTP), a tunneler per agent, and the
//! official Python client (tests/mcp/client.py) as the agents' code.
//! Needs `python3 -m pip install mcp==2.3.0` (`.ci/run` does it).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use http::Method;
use serde_json::{json, Value};
use umbra_gateway::mcp::{McpConfig, McpGateway};
use umbra_policies::{Action, Hosting, Selector, Semantic, Service};
use umbra_proto::api::GrantRequest;
use umbra_sdk::Context;
use umbra_tests::dataplane::*;
use umbra_tests::*;
use umbra_tunneler::{Tunneler, TunnelerConfig};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct World {
    t: TestController,
    _router: umbra_edge_router::RouterHandle,
    _gateway: McpGateway,
    _upstream: Proc,
    audit: PathBuf,
    _dir: tempfile::TempDir,
    tunnelers: Vec<Tunneler>,
    /// The gateway's clock: session expiry and audit times follow it, not the real time.
    clock: umbra_clock::ManualClock,
}

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp"))
}

/// The real interpreter behind `python3` (the stdio upstream starts with a bare environment).
fn python() -> String {
    let o = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What the gateway's manual clock shows: 2026-12-01T12:00:00Z.
fn audit_at() -> std::time::SystemTime {
    std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_796_126_400)
}

async fn grant_tools(t: &TestController, policy: &str, who: &str, tools: Option<&str>) {
    grant_mcp(t, policy, who, tools, None, None).await
}

async fn grant_mcp(
    t: &TestController,
    policy: &str,
    who: &str,
    tools: Option<&str>,
    resources: Option<&str>,
    prompts: Option<&str>,
) {
    let req = GrantRequest {
        name: Some(name(policy)),
        action: Action::Dial,
        identities: vec![format!("@{who}").parse::<Selector>().unwrap()],
        services: vec!["@mcp".parse::<Selector>().unwrap()],
        semantic: Semantic::AnyOf,
        limits: umbra_policies::GrantLimits {
            tools: tools.map(|t| t.parse().unwrap()),
            resources: resources.map(|t| t.parse().unwrap()),
            prompts: prompts.map(|t| t.parse().unwrap()),
            ..Default::default()
        },
    };
    let _: Value = t
        .admin_client()
        .call(Method::POST, "/v1/policies", Some(&req))
        .await
        .expect("grant");
}

async fn world(tool_count: usize) -> World {
    world_with(tool_count, 1800).await
}

async fn world_with(tool_count: usize, ttl_secs: u64) -> World {
    let t = TestController::start().await;
    let router = start_router(&t, "router-1", |_| {}).await;
    let svc = Service {
        name: name("mcp"),
        roles: Default::default(),
        hosting: Hosting::Sdk,
        intercepts: vec!["mcp.umbra:8080".parse().unwrap()],
        proxy_protocol: false,
    };
    let _: Value = t
        .admin_client()
        .call(Method::POST, "/v1/services", Some(&svc))
        .await
        .expect("service");
    let gw = agent(&t, "mcp-gw").await;
    grant(&t, "gw-binds-mcp", Action::Bind, "mcp-gw", "mcp").await;

    let port = free_port();
    let up = std::process::Command::new(python())
        .arg(fixtures().join("upstream.py"))
        .args(["http", "notes", &port.to_string()])
        .env("UPSTREAM_TOKEN", "notes-secret")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("http upstream");
    let up = Proc(up);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    eventually(Duration::from_secs(20), || {
        std::net::TcpStream::connect(addr).ok()
    })
    .await
    .expect("the HTTP upstream listens");

    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("mcp-audit.jsonl");
    let yaml = format!(
        r#"
service: mcp
page_size: 100
session_ttl_secs: {ttl_secs}
audit: {audit}
servers:
  github:
    command: {py}
    args: ["{up}", stdio, github]
    env: {{ UPSTREAM_TOKEN: "${{GH_TOKEN}}", MCP_TOOL_COUNT: "{tool_count}" }}
  notes:
    url: "http://127.0.0.1:{port}/mcp"
    headers: {{ Authorization: "Bearer ${{NOTES_TOKEN}}" }}
"#,
        audit = audit.display(),
        py = python(),
        up = fixtures().join("upstream.py").display(),
    );
    let mut cfg = McpConfig::parse(&yaml, dir.path(), |k| match k {
        "GH_TOKEN" => Some("gh-secret".into()),
        "NOTES_TOKEN" => Some("notes-secret".into()),
        _ => None,
    })
    .expect("config");
    // The audit records are stamped by the gateway's clock, not the system's.
    let clock = umbra_clock::ManualClock::new(audit_at());
    cfg.clock = clock.clock();
    let gateway = McpGateway::start(Context::with_controller(gw, Some(&t.addr())).unwrap(), cfg)
        .await
        .expect("gateway");
    World {
        t,
        _router: router,
        _gateway: gateway,
        _upstream: up,
        audit,
        _dir: dir,
        tunnelers: Vec::new(),
        clock,
    }
}

impl World {
    async fn agent(&mut self, who: &str, tools: Option<&str>) -> String {
        let file = agent(&self.t, who).await;
        grant_tools(&self.t, &format!("{who}-mcp"), who, tools).await;
        static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tun = Tunneler::start(
            Context::with_controller(file, Some(&self.t.addr())).unwrap(),
            TunnelerConfig {
                name_base: Ipv4Addr::new(127, 79, n, 1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mut m = tun.mappings();
        let listen = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(x) = m.borrow_and_update().first() {
                    return x.listen;
                }
                m.changed().await.unwrap();
            }
        })
        .await
        .expect("the tunneler listens for mcp");
        self.tunnelers.push(tun);
        format!("http://{listen}/mcp")
    }
}

async fn py(args: &[&str]) -> Value {
    let o = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("python3")
            .arg(fixtures().join("client.py"))
            .args(args)
            .env("MCP_BEARER", "client-must-not-leak")
            .output(),
    )
    .await
    .expect("python finishes")
    .expect("python3 runs");
    let text = String::from_utf8_lossy(&o.stdout);
    let last = text.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "{args:?}: {e}: {text}\n{}",
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn names(v: &Value) -> Vec<String> {
    v["names"]
        .as_array()
        .unwrap_or_else(|| panic!("no names in {v}"))
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_identity_sees_its_own_tools_and_hidden_ones_do_not_exist() {
    let mut w = world(0).await;
    let a = w
        .agent("agent-a", Some("github__*,!github__delete_*"))
        .await;
    let b = w.agent("agent-b", Some("notes__echo,notes__whoami")).await;

    let la = py(&["list_tools", &a]).await;
    let na = names(&la);
    assert!(na.contains(&"github__create_issue".to_string()), "{na:?}");
    assert!(na.iter().all(|n| n.starts_with("github__")), "{na:?}");
    assert!(!na.contains(&"github__delete_repo".to_string()));
    let mut sorted = na.clone();
    sorted.sort();
    assert_eq!(na, sorted, "deterministic order");
    assert_eq!(
        names(&py(&["list_tools", &b]).await),
        ["notes__echo", "notes__whoami"]
    );

    let r = py(&["call", &a, "github__create_issue", r#"{"title": "x"}"#]).await;
    assert!(
        r["text"].as_str().unwrap().contains("created issue: x"),
        "{r}"
    );

    // The gateway's credentials reach the upstream, never the client's.
    let r = py(&["call", &a, "github__whoami", "{}"]).await;
    assert!(r["text"].as_str().unwrap().contains("gh-secret"), "{r}");
    let r = py(&["call", &b, "notes__whoami", "{}"]).await;
    let who = r["text"].as_str().unwrap();
    assert!(
        who.contains("Bearer notes-secret") && !who.contains("client-must-not-leak"),
        "{r}"
    );

    // A hidden tool, in any spelling, answers exactly like a nonexistent one.
    let nonexistent = py(&["call", &a, "github__no_such_tool", "{}"]).await;
    assert_eq!(nonexistent["isError"], true, "{nonexistent}");
    assert_eq!(nonexistent["text"], "Unknown tool: github__no_such_tool");
    for spelling in [
        "github__delete_repo",
        "delete_repo",
        "GITHUB__DELETE_REPO",
        "github__Delete_repo",
        "github\u{FF3F}\u{FF3F}delete_repo",
        "g\u{0456}thub__delete_repo",
        "github__delete\u{200B}_repo",
        " github__delete_repo",
        "notes__echo",
    ] {
        for version in ["2026-07-28", "2025-11-25"] {
            let r = py(&["call", &a, spelling, "{}", version]).await;
            assert_eq!(r["isError"], true, "{spelling:?} {version}: {r}");
            assert_eq!(
                r["text"],
                format!("Unknown tool: {spelling}"),
                "{spelling:?} {version}: {r}"
            );
        }
    }
    // Every call is an audit event; refusals never reached an upstream.
    let audit = std::fs::read_to_string(&w.audit).unwrap();
    let events: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let denied = events.iter().filter(|e| e["decision"] == "denied").count();
    assert!(denied >= 19, "{audit}");
    assert!(
        events.iter().all(|e| e["arguments_sha256"].is_string()),
        "{audit}"
    );
    // RFC 3339 from the injected clock (once epoch seconds under that name).
    assert!(
        events.iter().all(|e| e["at"] == "2026-12-01T12:00:00Z"),
        "{audit}"
    );
    assert!(events
        .iter()
        .any(|e| e["name"] == "github__create_issue" && e["decision"] == "allowed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_sessions_and_protocol_errors() {
    let mut w = world(1000).await;
    let a = w.agent("agent-a", Some("github__tool_*")).await;
    let b = w.agent("agent-b", None).await;

    let r = py(&["list_tools", &a, "2025-11-25"]).await;
    let n = names(&r);
    assert_eq!(n.len(), 1000);
    assert_eq!(r["pages"], 10);
    assert_eq!(n[0], "github__tool_0000");
    assert_eq!(n[999], "github__tool_0999");
    for v in ["2025-06-18", "2026-07-28"] {
        let r = py(&["list_tools", &a, v]).await;
        assert_eq!(names(&r).len(), 1000, "{v}: {r}");
    }

    // A cursor is bound to the identity and tamper-evident.
    let page = py(&[
        "raw",
        &a,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#,
        r#"{"MCP-Protocol-Version":"2026-07-28","Mcp-Method":"tools/list"}"#,
    ])
    .await;
    let cursor = page["body"]["result"]["nextCursor"]
        .as_str()
        .unwrap_or_else(|| panic!("{page}"))
        .to_string();
    let with = |c: &str| {
        json!({"jsonrpc":"2.0","id":2,"method":"tools/list","params":{"cursor": c}}).to_string()
    };
    let hdr = r#"{"MCP-Protocol-Version":"2026-07-28","Mcp-Method":"tools/list"}"#;
    let ok = py(&["raw", &a, &with(&cursor), hdr]).await;
    assert!(ok["body"]["result"]["tools"].is_array(), "{ok}");
    let mut forged = cursor.clone().into_bytes();
    forged[0] = if forged[0] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    for (who, c) in [(&a, forged.as_str()), (&b, cursor.as_str()), (&a, "0")] {
        let r = py(&["raw", who, &with(c), hdr]).await;
        assert_eq!(r["body"]["error"]["code"], -32602, "{r}");
    }

    // A session belongs to the identity that opened it.
    let s = py(&["session", &a, "2025-11-25"]).await;
    let sid = s["session_id"].as_str().unwrap().to_string();
    let mine = py(&["replay", &a, &sid, "2025-11-25"]).await;
    assert_eq!(mine["status"], 200, "{mine}");
    let theirs = py(&["replay", &b, &sid, "2025-11-25"]).await;
    assert_eq!(theirs["status"], 404, "{theirs}");
    let unknown = py(&[
        "replay",
        &b,
        "00000000000000000000000000000000",
        "2025-11-25",
    ])
    .await;
    assert_eq!(unknown["status"], 404);
    assert_eq!(
        theirs["body"], unknown["body"],
        "foreign and unknown look the same"
    );

    // Malformed input gets the spec's errors, and the gateway goes on.
    let r = py(&["raw", &a, "{not json", "{}"]).await;
    assert_eq!(r["status"], 400);
    assert_eq!(r["body"]["error"]["code"], -32700);
    let r = py(&[
        "raw",
        &a,
        r#"{"jsonrpc":"1.0","id":1,"method":"tools/list"}"#,
        "{}",
    ])
    .await;
    assert_eq!(r["body"]["error"]["code"], -32600, "{r}");
    let r = py(&["raw", &a, "@pad:5000000", "{}"]).await;
    assert_eq!(r["status"], 413, "{r}");
    let r = py(&[
        "raw",
        &a,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#,
        r#"{"Origin":"https://evil.example","MCP-Protocol-Version":"2026-07-28","Mcp-Method":"tools/list"}"#,
    ])
    .await;
    assert_eq!(r["status"], 403, "{r}");
    let r = py(&[
        "raw",
        &a,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"github__tool_0001","arguments":{}}}"#,
        r#"{"MCP-Protocol-Version":"2026-07-28","Mcp-Method":"tools/call","Mcp-Name":"github__tool_0002"}"#,
    ])
    .await;
    assert_eq!(r["status"], 400, "{r}");
    assert!(
        names(&py(&["list_tools", &a]).await).len() == 1000,
        "still serving"
    );
}

/// Starts `client.py watch` and returns once it is listening.
async fn watch(url: &str, secs: u32, version: &str) -> tokio::process::Child {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new("python3")
        .arg(fixtures().join("client.py"))
        .args(["watch", url, &secs.to_string(), version])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.starts_with("READY") {
                return;
            }
        }
        panic!("watch ended before it was ready");
    })
    .await
    .expect("watch gets ready");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

async fn finish(child: tokio::process::Child) -> Value {
    let o = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .expect("watch ends")
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_changes_reach_only_the_sessions_they_concern() {
    let mut w = world(0).await;
    let a = w.agent("agent-a", Some("github__echo")).await;
    let b = w.agent("agent-b", Some("github__echo")).await;
    // A second grant widens agent-a's view while both sessions are open. (Deleting the only
    // grant would instead cut agent-a's overlay streams at the router, as revocation does.)
    for (version, policy, tools, want) in [
        (
            "2025-11-25",
            "agent-a-more",
            "github__add",
            vec!["github__add", "github__echo"],
        ),
        (
            "2026-07-28",
            "agent-a-even-more",
            "github__create_issue",
            vec!["github__add", "github__create_issue", "github__echo"],
        ),
    ] {
        let wa = watch(&a, 30, version).await;
        let wb = watch(&b, 6, version).await;
        grant_tools(&w.t, policy, "agent-a", Some(tools)).await;
        let ra = finish(wa).await;
        let rb = finish(wb).await;
        assert_eq!(ra["arrived"], true, "{version}: {ra}");
        assert_eq!(
            rb["arrived"], false,
            "{version}: only the session concerned: {rb}"
        );
        assert_eq!(ra["after"], json!(want), "{version}: {ra}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_prompts_and_an_upstream_crash() {
    let mut w = world(0).await;
    let file = agent(&w.t, "agent-c").await;
    grant_mcp(
        &w.t,
        "agent-c-mcp",
        "agent-c",
        None,
        Some("umbra://notes/file:///readme.txt"),
        Some("github__greet"),
    )
    .await;
    let tun = Tunneler::start(
        Context::with_controller(file, Some(&w.t.addr())).unwrap(),
        TunnelerConfig {
            name_base: Ipv4Addr::new(127, 79, 200, 1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut m = tun.mappings();
    let listen = loop {
        if let Some(x) = m.borrow_and_update().first() {
            break x.listen;
        }
        m.changed().await.unwrap();
    };
    w.tunnelers.push(tun);
    let c = format!("http://{listen}/mcp");
    let r = py(&["resources", &c]).await;
    // A valid URI (strict clients reject `notes__file:///...`), read back under the same URI.
    let uri = "umbra://notes/file:///readme.txt";
    assert_eq!(r["uris"], json!([uri]), "{r}");
    assert_eq!(r["read"][uri], "readme of notes", "{r}");
    assert_eq!(r["read_uris"][uri], json!([uri]), "{r}");
    let r = py(&["prompts", &c]).await;
    assert_eq!(r["names"], json!(["github__greet"]), "{r}");
    let hidden = py(&[
        "raw",
        &c,
        r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"umbra://notes/file:///secret.txt"}}"#,
        r#"{"MCP-Protocol-Version":"2026-07-28","Mcp-Method":"resources/read","Mcp-Name":"umbra://notes/file:///secret.txt"}"#,
    ])
    .await;
    assert_eq!(hidden["body"]["error"]["code"], -32602, "{hidden}");

    // An upstream that crashes is started again for the next call.
    let a = w.agent("agent-a", Some("github__*")).await;
    let r = py(&["call", &a, "github__crash", "{}"]).await;
    assert!(r["isError"] == true || r["error"].is_object(), "{r}");
    let r = eventually_call(&a, "github__echo", r#"{"text":"back"}"#).await;
    assert_eq!(r["text"], "back", "{r}");
}

async fn eventually_call(url: &str, name: &str, args: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..20 {
        let r = py(&["call", url, name, args]).await;
        if r["isError"] == false {
            return r;
        }
        last = r;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{name} never worked again: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_on_delete_and_expire() {
    // Long enough for a loaded machine to start the client twice, short enough to wait out.
    let mut w = world_with(0, 10).await;
    let a = w.agent("agent-a", None).await;
    let s = py(&["session", &a, "2025-06-18"]).await;
    assert_eq!(s["version"], "2025-06-18");
    let sid = s["session_id"].as_str().unwrap().to_string();
    assert_eq!(py(&["replay", &a, &sid, "2025-06-18"]).await["status"], 200);
    let del = py(&[
        "raw",
        &a,
        "",
        &json!({":method": "DELETE", "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-06-18"})
            .to_string(),
    ])
    .await;
    assert_eq!(del["status"], 200, "{del}");
    assert_eq!(py(&["replay", &a, &sid, "2025-06-18"]).await["status"], 404);

    let s = py(&["session", &a, "2025-11-25"]).await;
    let sid = s["session_id"].as_str().unwrap().to_string();
    // Idle for 9 s of the gateway's clock: still there; for 10 s: expired.
    w.clock.advance(Duration::from_secs(9));
    assert_eq!(py(&["replay", &a, &sid, "2025-11-25"]).await["status"], 200);
    w.clock.advance(Duration::from_secs(10));
    let r = py(&["replay", &a, &sid, "2025-11-25"]).await;
    assert_eq!(r["status"], 404, "an expired session: {r}");
}
