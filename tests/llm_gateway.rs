//! The LLM gateway end to end: a real controller and router on loopback, the gateway hosting
//! `llm` through the SDK (no listening port), a tunneler per agent, a faithful fake of the
//! providers' wire formats, and the official `openai` and `anthropic` Python clients as the
//! agents' code. Needs `python3 -m pip install openai anthropic` (`.ci/run` does it).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use umbra_clock::ManualClock;

use http::Method;
use serde_json::Value;
use umbra_gateway::{Config, Gateway};
use umbra_policies::{Action, Hosting, Selector, Semantic, Service};
use umbra_proto::api::GrantRequest;
use umbra_sdk::Context;
use umbra_tests::dataplane::*;
use umbra_tests::fake_llm::FakeLlm;
use umbra_tests::*;
use umbra_tunneler::{Tunneler, TunnelerConfig};

const UPSTREAM_KEY: &str = "sk-upstream-secret-0123";

struct World {
    t: TestController,
    _router: umbra_edge_router::RouterHandle,
    fake: FakeLlm,
    gateway: Option<Gateway>,
    gw_ctx: Context,
    dir: tempfile::TempDir,
    tunnelers: Vec<Tunneler>,
    /// The gateway's clock: budget periods and ledger times follow it, not the real time.
    clock: ManualClock,
}

/// Where the gateway's clock starts: 2026-12-01T12:00:00Z, twelve hours before a new day.
fn start_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_796_126_400)
}

fn config(fake: &FakeLlm, ledger: PathBuf, clock: &ManualClock) -> Config {
    let yaml = format!(
        r#"
service: llm
default_max_tokens: 40
providers:
  openai: {{ kind: openai, base_url: "{base}/v1", api_key_env: UPSTREAM_KEY }}
  anthropic:
    kind: anthropic
    base_url: "{base}/v1"
    api_key_env: UPSTREAM_KEY
    forward_headers: {{ anthropic-beta: [prompt-caching-2024-07-31], anthropic-version: ["2023-06-01"] }}
models:
  - {{ name: gpt-4o-mini, provider: openai, input_per_mtok: 0.15, output_per_mtok: 0.6 }}
  - {{ name: gpt-4o, provider: openai }}
  - {{ name: fake-nousage, provider: openai }}
  - {{ name: fake-slow, provider: openai }}
  - {{ name: fake-fail, provider: openai }}
  - {{ name: fake-midfail, provider: openai }}
  - {{ name: fake-framing, provider: openai }}
  - {{ name: claude-3-5-haiku-latest, provider: anthropic }}
  - {{ name: claude-opus-4, provider: anthropic }}
"#,
        base = fake.base_url()
    );
    let mut c = Config::parse(&yaml, std::path::Path::new("."), |k| {
        (k == "UPSTREAM_KEY").then(|| UPSTREAM_KEY.to_string())
    })
    .expect("gateway config");
    c.ledger = ledger;
    c.clock = clock.clock();
    c
}

async fn grant_with(
    t: &TestController,
    policy: &str,
    who: &str,
    models: Option<&str>,
    tokens: Option<&str>,
    rpm: Option<u32>,
) {
    let req = GrantRequest {
        name: Some(name(policy)),
        action: Action::Dial,
        identities: vec![format!("@{who}").parse::<Selector>().unwrap()],
        services: vec!["@llm".parse::<Selector>().unwrap()],
        semantic: Semantic::AnyOf,
        limits: umbra_policies::GrantLimits {
            models: models.map(|m| m.parse().unwrap()),
            tokens: tokens.map(|t| t.parse().unwrap()),
            rpm: rpm.map(|r| umbra_policies::Rpm::try_from(r).unwrap()),
            ..Default::default()
        },
    };
    let _: Value = t
        .admin_client()
        .call(Method::POST, "/v1/policies", Some(&req))
        .await
        .expect("grant");
}

async fn world() -> World {
    let t = TestController::start().await;
    let router = start_router(&t, "router-1", |_| {}).await;
    let svc = Service {
        name: name("llm"),
        roles: Default::default(),
        hosting: Hosting::Sdk,
        intercepts: vec!["llm.umbra:8080".parse().unwrap()],
        proxy_protocol: false,
    };
    let _: Value = t
        .admin_client()
        .call(Method::POST, "/v1/services", Some(&svc))
        .await
        .expect("service");
    let gw = agent(&t, "gateway").await;
    grant(&t, "gateway-binds-llm", Action::Bind, "gateway", "llm").await;
    let fake = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw_ctx = Context::with_controller(gw, Some(&t.addr())).unwrap();
    let clock = ManualClock::new(start_time());
    let gateway = Gateway::start(
        gw_ctx.clone(),
        config(&fake, dir.path().join("ledger.db"), &clock),
    )
    .await
    .expect("gateway starts");
    World {
        t,
        _router: router,
        fake,
        gateway: Some(gateway),
        gw_ctx,
        dir,
        tunnelers: Vec::new(),
        clock,
    }
}

impl World {
    /// Enrolls `who`, grants it `llm` with the given limits, and starts its tunneler; returns
    /// the base URL its clients use.
    async fn agent(
        &mut self,
        who: &str,
        models: Option<&str>,
        tokens: Option<&str>,
        rpm: Option<u32>,
    ) -> String {
        let file = agent(&self.t, who).await;
        grant_with(&self.t, &format!("{who}-llm"), who, models, tokens, rpm).await;
        let ctx = Context::with_controller(file, Some(&self.t.addr())).unwrap();
        // Tests run in parallel in one process: every tunneler gets loopback addresses of its own.
        static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let base = Ipv4Addr::new(127, 78, n, 1);
        let tun = Tunneler::start(
            ctx,
            TunnelerConfig {
                name_base: base,
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
        .expect("the tunneler listens for llm");
        self.tunnelers.push(tun);
        url(listen)
    }

    fn ledger(&self) -> Vec<Value> {
        self.gateway.as_ref().unwrap().recent(1000)
    }
}

fn url(a: SocketAddr) -> String {
    format!("http://{a}")
}

async fn py(case: &str, base: &str) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/llm/client.py");
    let o = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("python3")
            .arg(script)
            .arg(case)
            .arg(base)
            .output(),
    )
    .await
    .expect("python finishes")
    .expect("python3 runs");
    assert!(
        o.status.success(),
        "{case}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{case}: {e}: {}", String::from_utf8_lossy(&o.stdout)))
}

fn records_for<'a>(ledger: &'a [Value], who: &str) -> Vec<&'a Value> {
    ledger.iter().filter(|r| r["identity"] == who).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_keys_and_usage_follow_the_identity() {
    let mut w = world().await;
    let base = w
        .agent("agent-1", Some("gpt-4o-mini,claude-3-*,fake-*"), None, None)
        .await;

    let r = py("chat", &base).await;
    assert_eq!(r["text"], "tok0 tok1 tok2 tok3 tok4 ");
    assert_eq!(r["usage"]["completion_tokens"], 5);
    // The provider saw the gateway's key and never the agent's.
    let seen = w.fake.requests();
    let last = seen.last().unwrap();
    assert_eq!(
        last.header("authorization"),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
    assert!(seen.iter().all(|r| r
        .headers
        .iter()
        .all(|(_, v)| !v.contains("sk-agent-must-not-leak"))));

    // Not allowed and nonexistent look the same, in each API's envelope, and nothing goes up.
    let before = w.fake.requests().len();
    let r = py("denied", &base).await;
    assert_eq!(r["gpt-4o"]["raised"], "NotFoundError");
    assert_eq!(r["no-such-model"]["raised"], "NotFoundError");
    assert_eq!(r["gpt-4o"]["status"], r["no-such-model"]["status"]);
    assert_eq!(
        r["gpt-4o"]["body"]["code"],
        r["no-such-model"]["body"]["code"]
    );
    assert_eq!(r["anthropic"]["raised"], "NotFoundError");
    assert_eq!(
        w.fake.requests().len(),
        before,
        "no upstream call for a refusal"
    );

    let r = py("models", &base).await;
    let ids: Vec<&str> = r["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "claude-3-5-haiku-latest",
            "fake-fail",
            "fake-framing",
            "fake-midfail",
            "fake-nousage",
            "fake-slow",
            "gpt-4o-mini"
        ]
    );

    // Streams: the usage chunk is forced on upstream, hidden from a client that did not ask,
    // shown to one that did, and the ledger holds the provider's numbers.
    let r = py("chat_stream", &base).await;
    assert_eq!(r["text"], "tok0 tok1 tok2 tok3 tok4 tok5 tok6 ");
    assert!(
        r["usage"].is_null(),
        "the client did not ask for usage: {r}"
    );
    let last = w.fake.requests().last().cloned().unwrap();
    assert_eq!(last.body["stream_options"]["include_usage"], true);
    let r = py("chat_stream_usage", &base).await;
    let ledger = w.ledger();
    let rec = records_for(&ledger, "agent-1")
        .last()
        .cloned()
        .cloned()
        .unwrap();
    assert_eq!(rec["output"], 6);
    assert_eq!(r["usage"]["completion_tokens"], 6);
    assert_eq!(rec["input"], r["usage"]["prompt_tokens"]);
    assert_eq!(rec["estimated"], false);

    let r = py("responses", &base).await;
    assert_eq!(r["text"], "tok0 tok1 tok2 tok3 ");
    assert_eq!(r["stream_text"], "tok0 tok1 tok2 ");
    assert_eq!(r["stream_usage"]["output_tokens"], 3);
    let r = py("messages", &base).await;
    assert_eq!(r["text"], "tok0 tok1 tok2 tok3 ");
    assert_eq!(r["stream_text"], "tok0 tok1 tok2 ");
    assert_eq!(r["stream_usage"]["output_tokens"], 3);
    let ledger = w.ledger();
    let rec = records_for(&ledger, "agent-1")
        .last()
        .cloned()
        .cloned()
        .unwrap();
    assert_eq!(rec["output"], 3);
    assert_eq!(rec["input"], r["stream_usage"]["input_tokens"]);
    assert_eq!(rec["endpoint"], "/v1/messages");

    // A provider that reports no usage is charged an estimate, marked as such.
    let r = py("nousage", &base).await;
    assert!(r["text"].as_str().unwrap().starts_with("tok0"));
    let ledger = w.ledger();
    let rec = records_for(&ledger, "agent-1")
        .last()
        .cloned()
        .cloned()
        .unwrap();
    assert_eq!(rec["estimated"], true);
    assert!(rec["output"].as_u64().unwrap() > 0);

    // Upstream failure before the first byte: its status in our envelope; after: in-stream.
    let r = py("upstream_fail", &base).await;
    assert_eq!(r["before"]["raised"], "InternalServerError");
    assert_eq!(r["before"]["status"], 500);
    assert_eq!(r["during"]["raised"], "APIError", "{r}");
    assert_eq!(r["during"]["text"], "tok0 tok1 tok2 ");
    // Every request is an audit record, allowed or denied, with why.
    let ledger = w.ledger();
    let mine = records_for(&ledger, "agent-1");
    assert!(mine
        .iter()
        .any(|r| r["decision"] == "denied" && r["reason"] == "model not granted"));
    assert!(mine
        .iter()
        .any(|r| r["decision"] == "denied" && r["reason"] == "unknown model"));
    assert!(mine
        .iter()
        .any(|r| r["model"] == "gpt-4o-mini" && r["cost_micros"].as_u64().unwrap() > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_hold_before_during_and_across_a_restart() {
    let mut w = world().await;
    // Each request holds its worst case (124 to 133 tokens: the body's 107 bytes, the framing
    // allowance and 10 of output) and is charged the provider's 14: six fit in 200, the seventh
    // does not.
    let small = w.agent("small", None, Some("200/day"), None).await;
    let r = py("budget", &small).await;
    let res = r["results"].as_array().unwrap();
    assert!(res[0]["ok"].is_u64(), "{r}");
    let refused: Vec<&Value> = res
        .iter()
        .filter(|x| x["raised"] == "RateLimitError")
        .collect();
    assert!(!refused.is_empty(), "the budget must run out: {r}");
    assert_eq!(refused[0]["status"], 429);
    // Retry when the day the budget counts in ends, on the gateway's clock: at midnight.
    assert_eq!(refused[0]["retry_after"], "43200", "{r}");
    let spent: u64 = records_for(&w.ledger(), "small")
        .iter()
        .filter(|r| r["decision"] == "allowed")
        .map(|r| r["input"].as_u64().unwrap() + r["output"].as_u64().unwrap())
        .sum();
    assert!(spent <= 200, "spent {spent} of 200");
    assert_eq!(
        res.iter().filter(|x| x["ok"].is_u64()).count(),
        6,
        "refused only once the worst case no longer fits: {r}"
    );

    // A stream whose worst case (its prompt and 50 tokens) does not fit in what is left is
    // refused before anything goes upstream, rather than cut off once the provider has spent.
    let mid = w.agent("mid", None, Some("70/day"), None).await;
    let before = w.fake.requests().len();
    let r = py("budget_midstream", &mid).await;
    assert_eq!(r["raised"], "RateLimitError", "{r}");
    assert_eq!(r["status"], 429, "{r}");
    assert_eq!(w.fake.requests().len(), before, "nothing went upstream");
    let ledger = w.ledger();
    let rec = records_for(&ledger, "mid")
        .last()
        .cloned()
        .cloned()
        .unwrap();
    assert_eq!(rec["reason"], "token budget exhausted", "{rec}");

    // Concurrent requests never spend more than the budget: each holds its worst case.
    let conc = w.agent("conc", None, Some("400/day"), None).await;
    let r = py("concurrent", &conc).await;
    let res = r["results"].as_array().unwrap();
    assert_eq!(res.len(), 8);
    assert!(res.iter().any(|x| x["ok"].is_u64()), "{r}");
    assert!(res.iter().any(|x| x["raised"] == "RateLimitError"), "{r}");
    let spent: u64 = records_for(&w.ledger(), "conc")
        .iter()
        .map(|r| r["input"].as_u64().unwrap() + r["output"].as_u64().unwrap())
        .sum();
    assert!(spent <= 400, "spent {spent} of 400");

    // A restart keeps the ledger: the small budget is still spent.
    drop(w.gateway.take());
    let gateway = Gateway::start(
        w.gw_ctx.clone(),
        config(&w.fake, w.dir.path().join("ledger.db"), &w.clock),
    )
    .await
    .unwrap();
    w.gateway = Some(gateway);
    let r = eventually_py("budget", &small, |r| {
        r["results"][0]["raised"] == "RateLimitError"
    })
    .await;
    assert_eq!(r["results"][0]["status"], 429, "{r}");

    // A second before midnight the day's budget is still spent; at midnight a new one begins.
    w.clock.advance(Duration::from_secs(43_199));
    let r = py("budget", &small).await;
    assert_eq!(r["results"][0]["status"], 429, "{r}");
    assert_eq!(r["results"][0]["retry_after"], "1", "{r}");
    w.clock.advance(Duration::from_secs(1));
    let r = py("budget", &small).await;
    assert!(
        r["results"][0]["ok"].is_u64(),
        "a new day, a new budget: {r}"
    );
}

/// Sum of what the ledger charged `who`.
fn spent_by(ledger: &[Value], who: &str) -> u64 {
    records_for(ledger, who)
        .iter()
        .map(|r| r["input"].as_u64().unwrap_or(0) + r["output"].as_u64().unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_multipliers_and_provider_framing_stay_within_the_budget() {
    let mut w = world().await;
    // n: 50 with max_tokens: 100 is up to 5,000 tokens of output. Against 1,000 the gateway
    // holds all of it and lowers the per-choice cap so that fifty choices fit.
    let multi = w.agent("multi", None, Some("1000/day"), None).await;
    let before = w.fake.requests().len();
    let r = py("n", &multi).await;
    let first = &r["results"][0];
    assert_eq!(first["choices"], 50, "{r}");
    let sent = w.fake.requests()[before].body.clone();
    assert_eq!(sent["n"], 50);
    let cap = sent["max_tokens"].as_u64().unwrap();
    assert!(cap * 50 < 1000, "the cap sent upstream was {cap} a choice");
    assert_eq!(first["usage"]["completion_tokens"], cap * 50);
    // The second does not fit in what is left: refused, nothing sent.
    assert_eq!(r["results"][1]["raised"], "RateLimitError", "{r}");
    let spent = spent_by(&w.ledger(), "multi");
    assert!(spent <= 1000, "spent {spent} of 1000");
    assert_eq!(spent, first["usage"]["total_tokens"].as_u64().unwrap());
    // A multiplier that cannot be bounded, and an image the provider would fetch, are refused
    // under a budget without reaching the provider.
    for odd in ["string", "fraction", "huge", "image_url"] {
        assert_eq!(r["odd"][odd]["status"], 400, "{odd}: {r}");
    }
    assert_eq!(
        w.fake.requests().len(),
        before + 1,
        "only the first request went upstream"
    );
    assert!(records_for(&w.ledger(), "multi")
        .iter()
        .any(|r| r["reason"] == "cost cannot be bounded"));

    // The provider counts "hi" as 11 tokens (its framing); the gateway's reservation covers
    // that, so the budget is never overspent whatever the provider adds.
    let framing = w.agent("framing", None, Some("200/day"), None).await;
    let r = py("framing", &framing).await;
    let res = r["results"].as_array().unwrap();
    assert_eq!(res.last().unwrap()["raised"], "RateLimitError", "{r}");
    assert!(res.len() > 1, "at least one fits: {r}");
    let ledger = w.ledger();
    for rec in records_for(&ledger, "framing")
        .iter()
        .filter(|r| r["decision"] == "allowed")
    {
        assert_eq!(rec["input"], 11, "the provider's count is charged: {rec}");
    }
    let spent = spent_by(&ledger, "framing");
    assert!(spent <= 200, "spent {spent} of 200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_feature_headers_pass_only_when_allowlisted() {
    let mut w = world().await;
    let base = w.agent("hdr", None, None, None).await;
    let before = w.fake.requests().len();
    let r = py("headers", &base).await;
    assert!(r["text"].is_string(), "{r}");
    let seen = w.fake.requests();
    let mine = &seen[before..];
    assert_eq!(mine.len(), 3);
    // Only the allowlisted beta goes up; the Files API and the MCP connector do not; a
    // version the configuration does not name is replaced by the gateway's.
    assert_eq!(
        mine[0].header("anthropic-beta"),
        Some("prompt-caching-2024-07-31")
    );
    assert_eq!(mine[0].header("anthropic-version"), Some("2023-06-01"));
    assert!(
        mine[1].header("openai-beta").is_none(),
        "{:?}",
        mine[1].headers
    );
    assert!(mine[2].header("anthropic-beta").is_none());
    assert_eq!(mine[2].header("anthropic-version"), Some("2023-06-01"));
}

/// Runs a case until `ok` holds (a restarted gateway takes a moment to bind again).
async fn eventually_py(case: &str, base: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..20 {
        let o = tokio::process::Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/llm/client.py"))
            .arg(case)
            .arg(base)
            .output()
            .await
            .unwrap();
        if let Ok(v) = serde_json::from_slice::<Value>(&o.stdout) {
            if ok(&v) {
                return v;
            }
            last = v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{case} never held: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_disconnects_and_live_grant_changes() {
    let mut w = world().await;
    let rpm = w.agent("rpm", None, None, Some(2)).await;
    let r = py("rpm", &rpm).await;
    let res = r["results"].as_array().unwrap();
    assert_eq!(res[0]["ok"], true);
    assert_eq!(res[1]["ok"], true);
    assert_eq!(res[2]["raised"], "RateLimitError", "{r}");
    assert!(res[2]["retry_after"].as_str().is_some());

    // A client that goes away mid-stream: the upstream request is cancelled and only what was
    // delivered is charged.
    let slow = w.agent("slow", None, None, None).await;
    let cancelled = w.fake.streams_cancelled();
    let r = py("disconnect", &slow).await;
    assert_eq!(r["got"], 3);
    let gone = eventually(Duration::from_secs(10), || {
        (w.fake.streams_cancelled() > cancelled).then_some(())
    })
    .await;
    assert!(gone.is_some(), "the upstream stream was not cancelled");
    let rec = eventually(Duration::from_secs(10), || {
        records_for(&w.ledger(), "slow")
            .last()
            .map(|r| (*r).clone())
            .filter(|r| r["reason"] == "client disconnected")
    })
    .await
    .expect("the disconnect is recorded");
    assert!(rec["output"].as_u64().unwrap() < 60, "{rec}");

    // A grant narrowed while running takes effect without a restart.
    let base = w.agent("live", Some("gpt-4o-mini"), None, None).await;
    assert!(py("chat", &base).await["text"].is_string());
    let _: Value =
        w.t.admin_client()
            .call(Method::DELETE, "/v1/policies/live-llm", None::<&()>)
            .await
            .unwrap();
    grant_with(&w.t, "live-llm-2", "live", Some("claude-*"), None, None).await;
    let r = eventually_py("denied", &base, |r| {
        r["gpt-4o"]["raised"] == "NotFoundError"
    })
    .await;
    assert_eq!(r["gpt-4o"]["raised"], "NotFoundError");
    let r = eventually_py("models", &base, |r| {
        r["ids"] == serde_json::json!(["claude-3-5-haiku-latest", "claude-opus-4"])
    })
    .await;
    assert_eq!(r["ids"][0], "claude-3-5-haiku-latest");
}

/// A client that goes away before a non-streamed answer arrives: the request still completes
/// upstream (the provider bills it) and is settled with what it spent, so its hold is not left
/// behind to shrink the budget until the next restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_before_the_answer_leaves_no_hold() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut w = world().await;
    let base = w.agent("leaver", None, Some("400/day"), None).await;
    let addr = base.trim_start_matches("http://").to_string();
    let request = |model: &str| {
        let body = serde_json::json!({
            "model": model,
            "max_tokens": 40,
            "messages": [{"role": "user", "content": "hi"}],
        })
        .to_string();
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: llm.umbra\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    // `fake-slow` answers after 1.2 s; the client leaves after 200 ms.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(request("fake-slow").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(tcp);
    let rec = eventually(Duration::from_secs(10), || {
        records_for(&w.ledger(), "leaver")
            .last()
            .map(|r| (*r).clone())
    })
    .await
    .expect("the abandoned request is settled and recorded");
    assert_eq!(rec["decision"], "allowed", "{rec}");
    assert!(rec["output"].as_u64().unwrap() <= 40, "{rec}");
    // Its hold is gone: the rest of the budget serves two more such requests.
    for _ in 0..2 {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(request("gpt-4o-mini").as_bytes())
            .await
            .unwrap();
        let mut head = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut head))
            .await
            .expect("an answer")
            .unwrap();
        let status = String::from_utf8_lossy(&head[..n]);
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    }
}
