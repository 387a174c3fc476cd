//! LLM gateway latency: what the gateway adds to a request, against the same fake provider
//! reached directly and through the overlay alone (a router-hosted service pointing at the fake),
//! and against LiteLLM's proxy in config-only mode when it is installed
//! (`python3 -m venv /tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]==1.106.12'`,
//! then `BENCH_LITELLM=/tmp/litellm/bin/litellm`), all in one run.
//!
//! Rows: non-streamed chat completion (16 tokens), and a streamed one (time to first token and
//! to the last). Target: the gateway adds under 1 ms at p50 on top of the overlay path.
//! Environment: `BENCH_REQUESTS` (default 300 per row).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use umbra_gateway::{Config, Gateway};
use umbra_policies::{Action, Hosting, Service};
use umbra_sdk::Context;
use umbra_tests::dataplane::*;
use umbra_tests::fake_llm::FakeLlm;
use umbra_tests::TestController;
use umbra_tunneler::{Tunneler, TunnelerConfig};

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

/// One request; returns (time to the first body byte, time to the end).
async fn once(s: &mut Sender, host: &str, path: &str, body: &Value) -> (Duration, Duration) {
    let req = http::Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    s.ready().await.expect("ready");
    let t0 = Instant::now();
    let resp = s.send_request(req).await.expect("response");
    assert!(resp.status().is_success(), "status {}", resp.status());
    let mut b = resp.into_body();
    let mut first = None;
    while let Some(f) = b.frame().await {
        let f = f.expect("frame");
        if f.data_ref().is_some_and(|d| !d.is_empty()) && first.is_none() {
            first = Some(t0.elapsed());
        }
    }
    let total = t0.elapsed();
    (first.unwrap_or(total), total)
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e6
}

struct Row {
    name: String,
    plain: Vec<Duration>,
    ttft: Vec<Duration>,
    last: Vec<Duration>,
}

async fn measure(name: &str, addr: SocketAddr, prefix: &str, n: usize) -> Row {
    let mut s = connect(addr).await;
    let host = addr.to_string();
    let plain = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16});
    let stream = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16, "stream": true});
    let path = format!("{prefix}/chat/completions");
    for _ in 0..20 {
        once(&mut s, &host, &path, &plain).await;
    }
    let mut row = Row {
        name: name.into(),
        plain: Vec::new(),
        ttft: Vec::new(),
        last: Vec::new(),
    };
    for _ in 0..n {
        row.plain.push(once(&mut s, &host, &path, &plain).await.1);
        let (f, l) = once(&mut s, &host, &path, &stream).await;
        row.ttft.push(f);
        row.last.push(l);
    }
    row
}

fn litellm(fake: &FakeLlm, dir: &std::path::Path) -> Option<(Proc, SocketAddr)> {
    // LiteLLM pins its own openai version: install it in a virtual environment and point
    // BENCH_LITELLM at that environment's `litellm` command.
    let cli = std::env::var("BENCH_LITELLM").unwrap_or_else(|_| "litellm".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let cfg = dir.join("litellm.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n      model: openai/gpt-4o-mini\n      api_base: {}/v1\n      api_key: sk-upstream\n",
            fake.base_url()
        ),
    )
    .ok()?;
    // Config-only mode: no database, no master key, the bundled price map (no network).
    let child = Command::new(&cli)
        .arg("--config")
        .arg(&cfg)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .env(
            "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY",
            "true",
        )
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let child = Proc(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().ok()?;
    for _ in 0..600 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Some((child, addr));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn main() {
    let n: usize = std::env::var("BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let fake = FakeLlm::start().await;
        let t = TestController::start().await;
        let _router = start_router(&t, "router-1", |_| {}).await;
        let dir = tempfile::tempdir().expect("dir");
        // The gateway's service, and a plain router-hosted service straight to the fake.
        for (svc, hosting, intercept) in [
            ("llm", Hosting::Sdk, "llm.umbra:8080"),
            (
                "raw",
                Hosting::Address(fake.addr.to_string().parse().expect("hostport")),
                "raw.umbra:8080",
            ),
        ] {
            let s = Service {
                name: name(svc),
                roles: Default::default(),
                hosting,
                intercepts: vec![intercept.parse().expect("intercept")],
                proxy_protocol: false,
            };
            let _: Value = t
                .admin_client()
                .call(Method::POST, "/v1/services", Some(&s))
                .await
                .expect("service");
        }
        let gw = agent(&t, "gateway").await;
        grant(&t, "gw-bind", Action::Bind, "gateway", "llm").await;
        let a = agent(&t, "agent-1").await;
        grant(&t, "a-llm", Action::Dial, "agent-1", "llm").await;
        grant(&t, "a-raw", Action::Dial, "agent-1", "raw").await;
        let yaml = format!(
            "providers:\n  openai: {{ kind: openai, base_url: \"{}/v1\", api_key_env: K }}\nmodels:\n  - {{ name: gpt-4o-mini, provider: openai }}\n",
            fake.base_url()
        );
        let mut cfg = Config::parse(&yaml, dir.path(), |_| Some("sk-upstream".into()))
            .expect("config");
        cfg.ledger = dir.path().join("ledger.db");
        let _gateway = Gateway::start(
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
        let mut rows = vec![
            measure("fake provider, direct", fake.addr, "/v1", n).await,
            measure("overlay only (router dials the fake)", addr_of("raw"), "/v1", n).await,
            measure("umbra gateway via the overlay", addr_of("llm"), "/v1", n).await,
        ];
        let lite = litellm(&fake, dir.path());
        match &lite {
            Some((_, addr)) => rows.push(measure("LiteLLM proxy 1.106.12, direct", *addr, "/v1", n).await),
            None => println!("LiteLLM: not installed (see this bench's header)"),
        }
        println!("\nLLM gateway latency, {n} requests per row (µs)");
        println!(
            "{:<40} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "path", "plain p50", "plain p99", "ttft p50", "ttft p99", "last p50", "last p99"
        );
        let mut p50 = Vec::new();
        for r in rows.iter_mut() {
            let v = [
                pct(&mut r.plain, 0.5),
                pct(&mut r.plain, 0.99),
                pct(&mut r.ttft, 0.5),
                pct(&mut r.ttft, 0.99),
                pct(&mut r.last, 0.5),
                pct(&mut r.last, 0.99),
            ];
            p50.push(v[0]);
            println!(
                "{:<40} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>10.0}",
                r.name, v[0], v[1], v[2], v[3], v[4], v[5]
            );
        }
        let added = p50[2] - p50[1];
        println!(
            "\ngateway adds {:.0} µs at p50 over the overlay path (target < 1000 µs): {}",
            added,
            if added < 1000.0 { "met" } else { "NOT met" }
        );
        if p50.len() > 3 {
            println!("LiteLLM adds {:.0} µs at p50 over direct", p50[3] - p50[0]);
        }
        drop(lite);
    });
}
