//! MCP gateway latency: `tools/call` through the overlay and the gateway against the same
//! upstream server called directly, in one run; and `tools/list` (every page) over 1,000+ tools
//! from 10 upstream servers. Upstreams are real MCP servers written with the official Python SDK
//! (tests/mcp/upstream.py; `python3 -m pip install mcp==2.3.0`). Requests use the stateless
//! revision (2026-07-28) so that each is one HTTP exchange on both paths.
//!
//! Target: under 1 ms added at p50 on top of the overlay path. Environment: `BENCH_CALLS`
//! (default 300).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use umbra_gateway::mcp::{McpConfig, McpGateway};
use umbra_policies::{Action, Hosting, Service};
use umbra_sdk::Context;
use umbra_tests::dataplane::*;
use umbra_tests::TestController;
use umbra_tunneler::{Tunneler, TunnelerConfig};

const SERVERS: usize = 10;
const TOOLS_EACH: usize = 100;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).ok();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

fn meta() -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    })
}

/// One stateless request; returns its result and how long it took.
async fn rpc(
    s: &mut Sender,
    host: &str,
    method: &str,
    name: Option<&str>,
    params: Value,
) -> (Value, Duration) {
    let mut p = params;
    p["_meta"] = meta();
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": p});
    let mut b = http::Request::builder()
        .method(Method::POST)
        .uri("/mcp")
        .header("host", host)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", method);
    if let Some(n) = name {
        b = b.header("mcp-name", n);
    }
    let req = b
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    s.ready().await.expect("ready");
    let t0 = Instant::now();
    let resp = s.send_request(req).await.expect("response");
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let took = t0.elapsed();
    // The SDK server may answer as SSE: the response is the last data line.
    let text = String::from_utf8_lossy(&bytes);
    let json_text = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap_or(&text)
        .to_string();
    let v: Value = serde_json::from_str(&json_text).unwrap_or(Value::Null);
    (v, took)
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e6
}

fn python() -> String {
    let o = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn main() {
    let n: usize = std::env::var("BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let upstream_py = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/upstream.py");
    let py = python();
    let mut procs = Vec::new();
    let mut ports = Vec::new();
    for i in 0..SERVERS {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("port")
            .local_addr()
            .expect("addr")
            .port();
        let child = Command::new(&py)
            .arg(upstream_py)
            .args(["http", &format!("up{i}"), &port.to_string()])
            .env("MCP_TOOL_COUNT", TOOLS_EACH.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("upstream (python3 -m pip install mcp==2.3.0)");
        procs.push(Proc(child));
        ports.push(port);
    }
    for p in &ports {
        let addr: SocketAddr = format!("127.0.0.1:{p}").parse().expect("addr");
        let mut up = false;
        for _ in 0..300 {
            if std::net::TcpStream::connect(addr).is_ok() {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(up, "upstream on {p} did not start");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let t = TestController::start().await;
        let _router = start_router(&t, "router-1", |_| {}).await;
        let svc = Service {
            name: name("mcp"),
            roles: Default::default(),
            hosting: Hosting::Sdk,
            intercepts: vec!["mcp.umbra:8080".parse().expect("intercept")],
            proxy_protocol: false,
        };
        let _: Value = t
            .admin_client()
            .call(Method::POST, "/v1/services", Some(&svc))
            .await
            .expect("service");
        // The overlay alone: a router-hosted service straight to the first upstream.
        let raw = Service {
            name: name("raw"),
            roles: Default::default(),
            hosting: Hosting::Address(format!("127.0.0.1:{}", ports[0]).parse().expect("hostport")),
            intercepts: vec!["raw.umbra:8080".parse().expect("intercept")],
            proxy_protocol: false,
        };
        let _: Value = t
            .admin_client()
            .call(Method::POST, "/v1/services", Some(&raw))
            .await
            .expect("service");
        let gw = agent(&t, "mcp-gw").await;
        grant(&t, "gw-bind", Action::Bind, "mcp-gw", "mcp").await;
        let a = agent(&t, "agent-1").await;
        grant(&t, "a-mcp", Action::Dial, "agent-1", "mcp").await;
        grant(&t, "a-raw", Action::Dial, "agent-1", "raw").await;
        let mut yaml = String::from("page_size: 100\nservers:\n");
        for (i, p) in ports.iter().enumerate() {
            yaml.push_str(&format!("  up{i}: {{ url: \"http://127.0.0.1:{p}/mcp\" }}\n"));
        }
        let dir = tempfile::tempdir().expect("dir");
        let cfg = McpConfig::parse(&yaml, dir.path(), |_| None).expect("config");
        let _gateway = McpGateway::start(
            Context::with_controller(gw, Some(&t.addr())).expect("ctx"),
            cfg,
        )
        .await
        .expect("gateway");
        let tun = Tunneler::start(
            Context::with_controller(a, Some(&t.addr())).expect("ctx"),
            TunnelerConfig::default(),
        )
        .await
        .expect("tunneler");
        let mut m = tun.mappings();
        let maps = loop {
            let v = m.borrow_and_update().clone();
            if v.len() == 2 {
                break v;
            }
            m.changed().await.expect("mappings");
        };
        let addr_of = |svc: &str| {
            maps.iter()
                .find(|x| x.service.as_str() == svc)
                .map(|x| x.listen)
                .expect("listener")
        };
        let listen = addr_of("mcp");

        // tools/list over every page, cold (the gateway opens ten upstream sessions) and warm.
        let mut gw = connect(listen).await;
        let host = listen.to_string();
        let mut list_times = Vec::new();
        let mut total_tools = 0;
        for round in 0..6 {
            let t0 = Instant::now();
            let mut cursor: Option<String> = None;
            let mut count = 0;
            loop {
                let params = match &cursor {
                    Some(c) => json!({"cursor": c}),
                    None => json!({}),
                };
                let (v, _) = rpc(&mut gw, &host, "tools/list", None, params).await;
                count += v["result"]["tools"].as_array().map_or(0, Vec::len);
                match v["result"]["nextCursor"].as_str() {
                    Some(c) => cursor = Some(c.to_string()),
                    None => break,
                }
            }
            total_tools = count;
            if round == 0 {
                println!("tools/list, cold (opens {SERVERS} upstream sessions): {:.1} ms for {count} tools", t0.elapsed().as_secs_f64() * 1e3);
            } else {
                list_times.push(t0.elapsed());
            }
        }
        let mut direct = connect(format!("127.0.0.1:{}", ports[0]).parse().expect("addr")).await;
        let direct_host = format!("127.0.0.1:{}", ports[0]);
        let args = json!({"name": "echo", "arguments": {"text": "hi"}});
        let gargs = json!({"name": "up0__echo", "arguments": {"text": "hi"}});
        let raw_addr = addr_of("raw");
        let raw_host = raw_addr.to_string();
        let mut overlay = connect(raw_addr).await;
        for _ in 0..20 {
            rpc(&mut overlay, &raw_host, "tools/call", Some("echo"), args.clone()).await;
            rpc(&mut direct, &direct_host, "tools/call", Some("echo"), args.clone()).await;
            rpc(&mut gw, &host, "tools/call", Some("up0__echo"), gargs.clone()).await;
        }
        let (mut d, mut g, mut o) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            o.push(rpc(&mut overlay, &raw_host, "tools/call", Some("echo"), args.clone()).await.1);
            d.push(rpc(&mut direct, &direct_host, "tools/call", Some("echo"), args.clone()).await.1);
            let (v, took) = rpc(&mut gw, &host, "tools/call", Some("up0__echo"), gargs.clone()).await;
            assert_eq!(v["result"]["isError"], false, "{v}");
            g.push(took);
        }
        println!("\nMCP gateway, {n} calls per row (µs)");
        println!("{:<44} {:>10} {:>10}", "path", "p50", "p99");
        let (d50, d99) = (pct(&mut d, 0.5), pct(&mut d, 0.99));
        let (g50, g99) = (pct(&mut g, 0.5), pct(&mut g, 0.99));
        let (o50, o99) = (pct(&mut o, 0.5), pct(&mut o, 0.99));
        println!("{:<44} {d50:>10.0} {d99:>10.0}", "tools/call, upstream direct");
        println!("{:<44} {o50:>10.0} {o99:>10.0}", "tools/call, overlay only (router dials it)");
        println!("{:<44} {g50:>10.0} {g99:>10.0}", "tools/call, overlay + gateway");
        let (l50, l99) = (pct(&mut list_times, 0.5), pct(&mut list_times, 0.99));
        println!(
            "{:<44} {l50:>10.0} {l99:>10.0}",
            format!("tools/list, all {total_tools} tools, warm")
        );
        let added = g50 - o50;
        println!(
            "\ngateway adds {added:.0} µs at p50 on top of the overlay path (target < 1000 µs): {}",
            if added < 1000.0 { "met" } else { "NOT met" }
        );
        drop(tun);
    });
    drop(procs);
}
