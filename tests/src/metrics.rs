//! Helpers for the metrics tests: processes killed when dropped, free loopback ports, HTTP over
//! an overlay stream, and the LLM gateway set up on a test controller.

use std::time::{Duration, Instant};

use umbra_metrics::{serve, Registry, ServeOptions};
use umbra_policies::Action;
use umbra_sdk::Context;

use crate::dataplane::{agent, grant, name};
use crate::TestController;

/// A scrape endpoint on `127.0.0.1:0` for `registry`, with the default bounds.
pub async fn endpoint(registry: &Registry) -> umbra_metrics::MetricsServer {
    let addr = "127.0.0.1:0".parse().expect("addr");
    serve(addr, registry.clone(), ServeOptions::default())
        .await
        .expect("metrics endpoint")
}

/// A free loopback port (bound and released: the process under test binds it next).
pub fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A child process, killed when dropped however the test ends.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Dials `service`, retrying while the routers have not learned of a fresh grant or host.
pub async fn dial_retrying(ctx: &Context, service: &str, within: Duration) -> umbra_sdk::Stream {
    let deadline = Instant::now() + within;
    loop {
        match ctx.dial(service).await {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("dial {service}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Sends one HTTP/1.1 POST over an overlay stream; returns the status.
pub async fn post_over(
    stream: umbra_sdk::Stream,
    path: &str,
    body: serde_json::Value,
    headers: &[(&str, &str)],
) -> u16 {
    use http_body_util::BodyExt;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let mut req = http::Request::post(path)
        .header(http::header::HOST, "llm.umbra")
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json, text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// The LLM gateway hosting `llm` for `agent-1`, reporting to `registry`, with a fake provider
/// offering one model. Returns the gateway, the caller's context and what must outlive them.
pub async fn llm_gateway(
    t: &TestController,
    registry: &Registry,
) -> (
    umbra_gateway::Gateway,
    Context,
    crate::fake_llm::FakeLlm,
    tempfile::TempDir,
) {
    use umbra_policies::{Hosting, Service};
    let svc = Service {
        name: name("llm"),
        roles: Default::default(),
        hosting: Hosting::Sdk,
        intercepts: vec!["llm.umbra:8080".parse().expect("intercept")],
        proxy_protocol: false,
    };
    let _: serde_json::Value = t
        .admin_client()
        .call(http::Method::POST, "/v1/services", Some(&svc))
        .await
        .expect("service");
    let gw = agent(t, "gateway").await;
    grant(t, "gateway-binds-llm", Action::Bind, "gateway", "llm").await;
    let caller = agent(t, "agent-1").await;
    grant(t, "agent-1-llm", Action::Dial, "agent-1", "llm").await;
    let fake = crate::fake_llm::FakeLlm::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "service: llm\ndefault_max_tokens: 40\nproviders:\n  openai: {{ kind: openai, base_url: \"{}/v1\", api_key_env: KEY }}\nmodels:\n  - {{ name: gpt-4o-mini, provider: openai }}\n",
        fake.base_url()
    );
    let mut cfg = umbra_gateway::Config::parse(&yaml, std::path::Path::new("."), |k| {
        (k == "KEY").then(|| "sk-test".to_owned())
    })
    .expect("config");
    cfg.ledger = dir.path().join("ledger.db");
    cfg.metrics = Some(registry.clone());
    let gw_ctx = Context::with_controller(gw, Some(&t.addr())).expect("context");
    let gateway = umbra_gateway::Gateway::start(gw_ctx, cfg)
        .await
        .expect("gateway");
    let ctx = Context::with_controller(caller, Some(&t.addr())).expect("context");
    (gateway, ctx, fake, dir)
}

/// The metric families a dashboard expression reads: every `umbra_...` name in it, less the
/// suffixes the exposition adds to a family's name.
pub fn families_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("umbra_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_total", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.push(family.to_owned());
        rest = &tail[end..];
    }
    out
}
