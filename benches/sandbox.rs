//! Sandbox start-up benchmark: the time from starting `umbra run ... -- true` to its exit, against
//! `unshare -rn true` (a bare user and network namespace, what every sandbox pays) and plain
//! `true`, all measured in the same run. Umbra's number includes everything `umbra run` does
//! before the agent starts: the controller's view, the listeners and DNS responder inside the
//! namespace, the cgroup, the pivoted root, Landlock and seccomp, and the teardown.
//!
//! Target: under 50 ms added over `unshare -rn true` at p50. Environment: `BENCH_RUNS` (default
//! 50).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use umbra_tests::dataplane::*;
use umbra_tests::TestController;

fn umbra_bin() -> String {
    std::env::var("BENCH_UMBRA").unwrap_or_else(|_| env!("CARGO_BIN_EXE_umbra").to_owned())
}

fn time(cmd: &mut Command, runs: usize) -> Option<Vec<Duration>> {
    let mut out = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        let status = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()?;
        if !status.success() {
            return None;
        }
        out.push(t0.elapsed());
    }
    out.sort();
    Some(out)
}

fn pct(v: &[Duration], p: f64) -> f64 {
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (_t, _router, _echo, dir, identity) = rt.block_on(async {
        let t = TestController::start().await;
        let router = start_router(&t, "router-1", |_| {}).await;
        let echo = Echo::start().await;
        let file = agent(&t, "agent-1").await;
        echo_service(&t, &echo, "echo", "agent-1").await;
        let dir = tempfile::tempdir().expect("dir");
        let identity = dir.path().join("agent-1.json");
        file.save(&identity).expect("save");
        let addr = t.addr();
        (t, router, echo, dir, (identity, addr))
    });
    let (identity, controller) = identity;
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).expect("workspace");

    let mut rows: Vec<(String, Option<Vec<Duration>>)> = Vec::new();
    rows.push(("true".into(), time(&mut Command::new("true"), runs)));
    rows.push((
        "unshare -rn true".into(),
        time(Command::new("unshare").args(["-rn", "true"]), runs),
    ));
    let mut umbra = Command::new(umbra_bin());
    umbra
        .arg("run")
        .arg("--identity")
        .arg(&identity)
        .arg("--workspace")
        .arg(&ws)
        .args(["--", "true"])
        .env("UMBRA_CONTROLLER", &controller)
        .env("UMBRA_LOG", "error");
    // One warm-up run (page cache, first cgroup).
    let _ = umbra.status();
    rows.push(("umbra run -- true".into(), time(&mut umbra, runs)));

    println!("sandbox start-up to exit, {runs} runs each");
    println!(
        "{:<22} {:>9} {:>9} {:>9}",
        "command", "p50 ms", "p95 ms", "max ms"
    );
    for (name, v) in &rows {
        match v {
            Some(v) => println!(
                "{name:<22} {:>9.1} {:>9.1} {:>9.1}",
                pct(v, 0.5),
                pct(v, 0.95),
                pct(v, 1.0)
            ),
            None => println!("{name:<22} {:>9}", "failed"),
        }
    }
    if let (Some(base), Some(u)) = (&rows[1].1, &rows[2].1) {
        let added = pct(u, 0.5) - pct(base, 0.5);
        println!(
            "umbra adds {added:.1} ms at p50 over unshare -rn (target < 50 ms): {}",
            if added < 50.0 { "met" } else { "NOT met" }
        );
    }
}
