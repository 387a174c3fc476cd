//! Prometheus metrics end to end: the real controller, router and agents, scraped over HTTP and
//! parsed as the exposition format (`umbra_tests::exposition`), never grepped.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_metrics::{serve, Registry, ServeOptions};
use umbra_policies::Action;
use umbra_sdk::{Context, SdkError};
use umbra_tests::dataplane::*;
use umbra_tests::exposition::{scrape, Exposition};
use umbra_tests::{eventually, TestController};

/// The bound on anything a test waits for.
const BOUND: Duration = Duration::from_secs(15);

async fn round_trip(s: &mut umbra_sdk::Stream, msg: &[u8]) -> Result<Vec<u8>, SdkError> {
    s.write_all(msg).await.map_err(SdkError::from_io)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.map_err(SdkError::from_io)?;
    Ok(back)
}

async fn endpoint(registry: &Registry) -> umbra_metrics::MetricsServer {
    let addr = "127.0.0.1:0".parse().expect("addr");
    serve(addr, registry.clone(), ServeOptions::default())
        .await
        .expect("metrics endpoint")
}

#[tokio::test]
async fn router_counts_decisions_bytes_revocations_and_control_lag() {
    let registry = Registry::new();
    let r = registry.clone();
    let t = TestController::start_with(move |c| c.metrics = Some(r)).await;
    let server = endpoint(&registry).await;
    let router = start_router(&t, "r1", |c| c.metrics = Some(registry.clone())).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    service(&t, "echo-b", echo.hosting()).await;
    grant(&t, "pb", Action::Dial, "agent-1", "echo-b").await;
    service(&t, "secret", echo.hosting()).await;
    let ctx = Context::new(a).expect("context");

    // Allowed, and ended normally after 100,000 bytes each way.
    let payload = vec![7u8; 100_000];
    let mut s = ctx.dial("echo").await.expect("dial echo");
    assert_eq!(round_trip(&mut s, &payload).await.expect("echo"), payload);
    s.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    tokio::time::timeout(BOUND, s.read_to_end(&mut rest))
        .await
        .expect("timely")
        .expect("end");
    // Denied: an existing service not granted, and one that does not exist.
    let e = ctx.dial("secret").await.expect_err("secret is not granted");
    assert!(matches!(e, SdkError::Denied { .. }), "{e}");
    let e = ctx.dial("made-up-1").await.expect_err("no such service");
    assert!(matches!(e, SdkError::Denied { .. }), "{e}");
    // A live stream cut by revoking its grant.
    let mut sb = ctx.dial("echo-b").await.expect("dial echo-b");
    assert_eq!(round_trip(&mut sb, b"b").await.expect("echo"), b"b");
    revoke_policy(&t, "pb").await;
    let cut = tokio::time::timeout(BOUND, async {
        loop {
            if let Err(e) = round_trip(&mut sb, b"ping").await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("cut within the bound");
    assert!(matches!(cut, SdkError::Revoked), "{cut}");

    // The bytes are counted when the router sees the stream end; wait for that.
    let done = eventually(BOUND, || (echo.open() == 0).then_some(())).await;
    assert!(done.is_some(), "the service connections closed");
    let m = scrape(server.local_addr()).await.expect("scrape");
    let streams = "umbra_router_streams_total";
    let allowed = [
        ("action", "dial"),
        ("outcome", "allowed"),
        ("service", "echo"),
    ];
    assert_eq!(m.value(streams, &allowed), Some(1.0));
    let denied = [
        ("outcome", "denied"),
        ("service", "secret"),
        ("reason", "not_granted"),
    ];
    assert_eq!(m.value(streams, &denied), Some(1.0));
    // A made-up name is not a label value: the refusal is counted without it.
    let unnamed = [
        ("outcome", "denied"),
        ("service", ""),
        ("reason", "not_granted"),
    ];
    assert_eq!(m.value(streams, &unnamed), Some(1.0));
    assert!(m
        .matching(streams, &[("service", "made-up-1")])
        .next()
        .is_none());
    let cut = [
        ("outcome", "terminated"),
        ("service", "echo-b"),
        ("reason", "not_granted"),
    ];
    assert_eq!(m.value(streams, &cut), Some(1.0));
    let bytes = "umbra_router_service_bytes_total";
    for direction in ["up", "down"] {
        let sent = m.value(bytes, &[("service", "echo"), ("direction", direction)]);
        assert!(
            sent.is_some_and(|b| b >= 100_000.0),
            "{direction}: {sent:?}"
        );
    }
    let revocations = "umbra_router_revocation_cut_seconds";
    assert_eq!(m.value(&format!("{revocations}_count"), &[]), Some(1.0));
    let took = m
        .value(&format!("{revocations}_sum"), &[])
        .unwrap_or(f64::NAN);
    assert!((0.0..1.0).contains(&took), "revocation to cut: {took} s");
    assert_eq!(
        m.value("umbra_router_connections_total", &[("outcome", "admitted")]),
        Some(1.0)
    );
    assert!(m.value("umbra_router_handshake_seconds_count", &[]) >= Some(1.0));
    assert_eq!(
        m.value("umbra_router_policy_check_seconds_count", &[]),
        Some(4.0)
    );
    assert!(m.value("umbra_router_policy_compile_seconds_count", &[]) >= Some(1.0));
    assert_eq!(
        m.value("umbra_router_control_failing_closed", &[]),
        Some(0.0)
    );
    assert_eq!(m.value("umbra_router_control_lag", &[]), Some(0.0));
    let applied = m.value("umbra_router_control_applied_seq", &[]);
    assert_eq!(
        applied,
        router.policy().borrow().as_ref().map(|p| p.seq as f64)
    );
    let stale = m
        .value("umbra_router_control_staleness_seconds", &[])
        .unwrap_or(f64::NAN);
    assert!((0.0..5.0).contains(&stale), "staleness {stale}");
    assert_eq!(m.value("umbra_router_held_connections", &[]), Some(1.0));
    println!(
        "revocation to cut {:.1} ms, staleness {stale:.2} s",
        took * 1e3
    );
    router.shutdown().await;
}

#[tokio::test]
async fn idle_connections_do_not_block_a_scrape() {
    let registry = Registry::new();
    let server = endpoint(&registry).await;
    // Far more idle connections than the endpoint holds.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(
            tokio::net::TcpStream::connect(server.local_addr())
                .await
                .expect("connect"),
        );
    }
    let started = Instant::now();
    let m = tokio::time::timeout(Duration::from_secs(2), scrape(server.local_addr()))
        .await
        .expect("a scrape is answered at once")
        .expect("scrape");
    let took = started.elapsed();
    assert!(m.samples.is_empty());
    let held = server.connections();
    assert!(held <= ServeOptions::default().max_connections, "{held}");
    println!("scrape behind 100 idle connections: {took:?}, {held} held");
}

#[tokio::test]
async fn a_non_loopback_address_needs_consent() {
    let addr = "0.0.0.0:0".parse().expect("addr");
    let refused = serve(addr, Registry::new(), ServeOptions::default()).await;
    assert!(matches!(
        refused,
        Err(umbra_metrics::ServeError::NotLoopback(_))
    ));
}

#[test]
fn an_exposition_without_eof_is_refused() {
    assert!(Exposition::parse("# TYPE x gauge\nx 1\n").is_err());
}

/// A free loopback port (bound and released: the process under test binds it next).
fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Kills the child when dropped, however the test ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn umbra_tunnel_serves_its_metrics() {
    use std::io::BufRead;
    let t = TestController::start().await;
    let _router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo-metrics", "agent-1").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("agent.json");
    a.save(&file).expect("save");
    let metrics = free_port();
    let mut child = std::process::Command::new(umbra_tests::umbra_bin());
    child
        .args(["--controller", &t.addr(), "tunnel", "--identity"])
        .arg(&file)
        .args(["--metrics", &metrics.to_string()])
        .env("UMBRA_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = Child(child.spawn().expect("umbra tunnel"));
    // `  + echo-metrics.umbra:443 -> 127.x.y.z:443 (echo-metrics)`
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(addr) = line.split(" -> ").nth(1).and_then(|r| r.split(' ').next()) {
                let _ = tx.send(addr.to_owned());
            }
        }
    });
    let listen: std::net::SocketAddr = rx
        .recv_timeout(BOUND)
        .expect("a listener is printed")
        .parse()
        .expect("an address");
    let payload = vec![3u8; 10_000];
    let mut s = tokio::net::TcpStream::connect(listen)
        .await
        .expect("connect");
    s.write_all(&payload).await.expect("send");
    s.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.expect("echo");
    assert_eq!(back, payload);
    drop(s);

    let carried = [("service", "echo-metrics"), ("outcome", "carried")];
    let mut m = Exposition::default();
    let deadline = Instant::now() + BOUND;
    while Instant::now() < deadline {
        m = scrape(metrics).await.unwrap_or_default();
        if m.value("umbra_tunneler_connections_total", &carried) == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        m.value("umbra_tunneler_connections_total", &carried),
        Some(1.0)
    );
    let up = [("service", "echo-metrics"), ("direction", "up")];
    let sent = m.value("umbra_tunneler_service_bytes_total", &up);
    assert!(sent >= Some(10_000.0), "{sent:?}");
    assert_eq!(m.value("umbra_tunneler_listeners", &[]), Some(1.0));
}

/// Sends one HTTP/1.1 POST over an overlay stream; returns the status.
async fn post_over(
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
async fn llm_gateway(
    t: &TestController,
    registry: &Registry,
) -> (
    umbra_gateway::Gateway,
    Context,
    umbra_tests::fake_llm::FakeLlm,
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
    let fake = umbra_tests::fake_llm::FakeLlm::start().await;
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

#[tokio::test]
async fn llm_gateway_counts_requests_and_tokens_by_configured_model() {
    let t = TestController::start().await;
    let _router = start_router(&t, "r1", |_| {}).await;
    let registry = Registry::new();
    let server = endpoint(&registry).await;
    let (_gateway, ctx, _fake, _dir) = llm_gateway(&t, &registry).await;
    let ask = |model: &str| serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let dial = || async {
        let deadline = Instant::now() + BOUND;
        loop {
            match ctx.dial("llm").await {
                Ok(s) => return s,
                Err(e) if Instant::now() > deadline => panic!("dial llm: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    let path = "/v1/chat/completions";
    assert_eq!(
        post_over(dial().await, path, ask("gpt-4o-mini"), &[]).await,
        200
    );
    assert_eq!(
        post_over(dial().await, path, ask("made-up-model"), &[]).await,
        404
    );

    let m = scrape(server.local_addr()).await.expect("scrape");
    let requests = "umbra_llm_requests_total";
    let ok = [
        ("model", "gpt-4o-mini"),
        ("decision", "allowed"),
        ("reason", "completed"),
    ];
    assert_eq!(m.value(requests, &ok), Some(1.0));
    let refused = [
        ("model", ""),
        ("decision", "denied"),
        ("reason", "unknown_model"),
    ];
    assert_eq!(m.value(requests, &refused), Some(1.0));
    assert!(m
        .matching(requests, &[("model", "made-up-model")])
        .next()
        .is_none());
    for direction in ["input", "output"] {
        let tokens = [("model", "gpt-4o-mini"), ("direction", direction)];
        let n = m.value("umbra_llm_tokens_total", &tokens);
        assert!(n > Some(0.0), "{direction}: {n:?}");
    }
    assert_eq!(m.value("umbra_llm_upstream_seconds_count", &[]), Some(1.0));
}

/// The metric families a dashboard expression reads: every `umbra_...` name in it, less the
/// suffixes the exposition adds to a family's name.
fn families_in(expr: &str) -> Vec<String> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_reads_only_metrics_the_processes_expose() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/umbra.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("JSON");

    // Every component, each registering into one registry as its process would its own.
    let registry = Registry::new();
    let r = registry.clone();
    let t = TestController::start_with(move |c| c.metrics = Some(r)).await;
    let _router = start_router(&t, "r1", |c| c.metrics = Some(registry.clone())).await;
    let server = endpoint(&registry).await;
    let (_llm, ctx, _fake, _dir) = llm_gateway(&t, &registry).await;
    let tunnel = umbra_tunneler::TunnelerConfig {
        name_base: "127.93.0.1".parse().expect("base"),
        metrics: Some(registry.clone()),
        ..Default::default()
    };
    let _tunneler = umbra_tunneler::Tunneler::start(ctx.clone(), tunnel)
        .await
        .expect("tunneler");
    let mcp_yaml = "service: mcp\nservers:\n  notes:\n    url: \"http://127.0.0.1:9/mcp\"\n";
    let mut mcp =
        umbra_gateway::mcp::McpConfig::parse(mcp_yaml, std::path::Path::new("."), |_| None)
            .expect("mcp config");
    mcp.metrics = Some(registry.clone());
    umbra_tests::dataplane::sdk_service(&t, "mcp", "gateway", "agent-1").await;
    let gw = umbra_sdk::Context::with_controller(agent(&t, "mcp-gw").await, Some(&t.addr()))
        .expect("context");
    grant(&t, "mcp-gw-binds", Action::Bind, "mcp-gw", "mcp").await;
    let _mcp = umbra_gateway::mcp::McpGateway::start(gw, mcp)
        .await
        .expect("mcp gateway");
    // A call of a tool nobody offers (stateless MCP): refused, and counted without its name.
    let call = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "notes__exfiltrate", "arguments": {}}});
    let headers = [
        (
            "mcp-protocol-version",
            umbra_gateway::mcp::server::STATELESS_VERSION,
        ),
        ("mcp-method", "tools/call"),
        ("mcp-name", "notes__exfiltrate"),
    ];
    let deadline = Instant::now() + BOUND;
    let stream = loop {
        match ctx.dial("mcp").await {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("dial mcp: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(post_over(stream, "/mcp", call, &headers).await, 200);
    // `umbra run` counts its sandbox's events so.
    let count = umbra_launcher::metrics::sandbox_events(&registry);
    count(&umbra_sandbox::events::Event {
        at: String::new(),
        sandbox: "s1".into(),
        identity: "agent-1".into(),
        kind: umbra_sandbox::events::EventKind::DnsRefused {
            name: "exfil.example".into(),
        },
    });

    let m = scrape(server.local_addr()).await.expect("scrape");
    let refused = [("kind", "tools"), ("name", ""), ("decision", "denied")];
    assert_eq!(m.value("umbra_mcp_calls_total", &refused), Some(1.0));
    assert!(m
        .matching("umbra_mcp_calls_total", &[("name", "notes__exfiltrate")])
        .next()
        .is_none());
    let dns = [("kind", "dns_refused")];
    assert_eq!(m.value("umbra_sandbox_events_total", &dns), Some(1.0));
    assert!(m
        .samples
        .iter()
        .all(|s| !s.labels.values().any(|v| v == "exfil.example")));

    // The data source is a variable, so the dashboard imports into any Grafana.
    let vars = dash["templating"]["list"].as_array().expect("variables");
    assert!(vars
        .iter()
        .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"));
    let panels = dash["panels"].as_array().expect("panels");
    let mut queried = std::collections::BTreeSet::new();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", p["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            let names = families_in(expr);
            assert!(!names.is_empty(), "{expr}");
            queried.extend(names);
        }
    }
    let missing: Vec<_> = queried.iter().filter(|n| !m.has_family(n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard reads metrics nothing exposes: {missing:?}"
    );
    // And it shows every family the components expose.
    let unshown: Vec<_> = (m.families.keys())
        .filter(|f| !queried.contains(*f))
        .collect();
    assert!(
        unshown.is_empty(),
        "families the dashboard does not show: {unshown:?}"
    );
    println!("{} panels, {} families", panels.len(), queried.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn umbra_run_counts_its_sandboxs_refusals() {
    let t = TestController::start().await;
    let _router = start_router(&t, "r1", |_| {}).await;
    let echo = Echo::start().await;
    let a = agent(&t, "agent-1").await;
    echo_service(&t, &echo, "echo", "agent-1").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("agent.json");
    a.save(&file).expect("save");
    let workspace = tempfile::Builder::new()
        .prefix("umbra-ws-")
        .tempdir()
        .expect("workspace");
    let metrics = free_port();
    // One refused name, then the agent waits to be stopped.
    let script = "getent hosts exfil.example; getent hosts echo.umbra; exec sleep 60";
    let mut cmd = std::process::Command::new(umbra_tests::umbra_bin());
    cmd.arg("run")
        .arg("--identity")
        .arg(&file)
        .arg("--workspace")
        .arg(workspace.path())
        .args([
            "--metrics",
            &metrics.to_string(),
            "--",
            "/bin/sh",
            "-c",
            script,
        ])
        .env("UMBRA_CONTROLLER", t.addr())
        .env("UMBRA_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = Child(cmd.spawn().expect("umbra run"));

    let refused = [("kind", "dns_refused")];
    let mut m = Exposition::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        m = scrape(metrics).await.unwrap_or_default();
        if m.value("umbra_sandbox_events_total", &refused) == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(m.value("umbra_sandbox_events_total", &refused), Some(1.0));
    assert_eq!(
        m.value("umbra_sandbox_events_total", &[("kind", "started")]),
        Some(1.0)
    );
    assert_eq!(m.value("umbra_tunneler_listeners", &[]), Some(1.0));
    assert!(m
        .samples
        .iter()
        .all(|s| !s.labels.values().any(|v| v.contains("exfil"))));
    // Interrupted, `umbra run` removes its sandbox before it exits.
    let pid = rustix::process::Pid::from_raw(child.0.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("interrupt");
    let mut child = child;
    let deadline = Instant::now() + BOUND;
    while child.0.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "umbra run ends when interrupted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn umbra_controller_run_and_router_run_serve_their_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("ctrl");
    let listen = free_port();
    let o = umbra_tests::umbra_cmd(
        &[
            "controller",
            "init",
            "--dir",
            &d.display().to_string(),
            "--address",
            &listen.to_string(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", umbra_tests::stderr(&o));
    let metrics = free_port();
    let mut cmd = std::process::Command::new(umbra_tests::umbra_bin());
    cmd.args(["controller", "run", "--dir", &d.display().to_string()])
        .args([
            "--listen",
            &listen.to_string(),
            "--metrics",
            &metrics.to_string(),
        ])
        .env("UMBRA_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _child = Child(cmd.spawn().expect("umbra controller run"));
    let admin = d.join("admin.json").display().to_string();
    let listed = eventually(BOUND, || {
        let o = umbra_tests::umbra_cmd(&["--admin", &admin, "identity", "list"], &[]);
        o.status.success().then_some(())
    })
    .await;
    assert!(listed.is_some(), "the controller answers");
    let m = scrape(metrics).await.expect("scrape");
    let list = [
        ("route", "/v1/identities"),
        ("method", "GET"),
        ("status", "200"),
    ];
    assert!(m.value("umbra_controller_requests_total", &list) >= Some(1.0));
    assert_eq!(m.value("umbra_controller_store_in_touch", &[]), Some(1.0));
    assert_eq!(m.value("umbra_controller_store_shared", &[]), Some(0.0));

    // A router enrolled and run from the command line, following that controller.
    let token = dir.path().join("router.token").display().to_string();
    let o = umbra_tests::umbra_cmd(
        &["--admin", &admin, "router", "create", "r1", "-o", &token],
        &[],
    );
    assert!(o.status.success(), "{}", umbra_tests::stderr(&o));
    let rdir = dir.path().join("router").display().to_string();
    let ctrl = listen.to_string();
    let o = umbra_tests::umbra_cmd(
        &[
            "--controller",
            &ctrl,
            "router",
            "enroll",
            &token,
            "--dir",
            &rdir,
        ],
        &[],
    );
    assert!(o.status.success(), "{}", umbra_tests::stderr(&o));
    let router_metrics = free_port();
    let mut cmd = std::process::Command::new(umbra_tests::umbra_bin());
    cmd.args(["--controller", &ctrl, "router", "run", "--dir", &rdir])
        .args(["--listen", "127.0.0.1:0", "--lanes", "1"])
        .args(["--metrics", &router_metrics.to_string()])
        .env("UMBRA_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _router = Child(cmd.spawn().expect("umbra router run"));
    let mut m = Exposition::default();
    let deadline = Instant::now() + BOUND;
    while Instant::now() < deadline {
        m = scrape(router_metrics).await.unwrap_or_default();
        if m.value("umbra_router_control_failing_closed", &[]) == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        m.value("umbra_router_control_failing_closed", &[]),
        Some(0.0)
    );
    assert_eq!(m.value("umbra_router_control_lag", &[]), Some(0.0));
    let stale = m.value("umbra_router_control_staleness_seconds", &[]);
    assert!(stale < Some(5.0), "{stale:?}");
}
