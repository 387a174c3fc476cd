//! Prometheus metrics end to end, agents' side: `umbra tunnel` and `umbra run` with `--metrics`,
//! the LLM and MCP gateways, and the Grafana dashboard checked against what every component
//! exposes. Scrapes are parsed as the exposition format, never grepped.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_metrics::Registry;
use umbra_policies::Action;
use umbra_tests::dataplane::*;
use umbra_tests::exposition::{scrape, Exposition};
use umbra_tests::metrics::*;
use umbra_tests::TestController;

/// The bound on anything a test waits for.
const BOUND: Duration = Duration::from_secs(15);

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
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).await.expect("echo");
    assert_eq!(back, payload);
    // Counted as the bytes move: the connection is still open.
    let up = [("service", "echo-metrics"), ("direction", "up")];
    let live = scrape(metrics).await.expect("scrape");
    let counted = live.value("umbra_tunneler_service_bytes_total", &up);
    assert!(
        counted >= Some(10_000.0),
        "an open connection's bytes: {counted:?}"
    );
    s.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.expect("end");
    assert!(rest.is_empty());
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
    let sent = m.value("umbra_tunneler_service_bytes_total", &up);
    assert!(sent >= Some(10_000.0), "{sent:?}");
    assert_eq!(m.value("umbra_tunneler_listeners", &[]), Some(1.0));
}

#[tokio::test]
async fn llm_gateway_counts_requests_and_tokens_by_configured_model() {
    let t = TestController::start().await;
    let _router = start_router(&t, "r1", |_| {}).await;
    let registry = Registry::new();
    let server = endpoint(&registry).await;
    let (_gateway, ctx, _fake, _dir) = llm_gateway(&t, &registry).await;
    let ask = |model: &str| serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let dial = || dial_retrying(&ctx, "llm", BOUND);
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
    let stream = dial_retrying(&ctx, "mcp", BOUND).await;
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
