//! `umbra verify`'s limit attempts: each runs the escape probe in a sandbox of its own with small
//! limits, and is judged from outside (exit code, elapsed time, processes left on the host).

use std::time::Duration;

use umbra_sandbox::events::EventSink;
use umbra_sandbox::probe::{Attempt, ProbeConfig};
use umbra_sandbox::{Limits, SandboxConfig};
use umbra_sdk::Context;

use crate::sandbox_cmd::{held, run_probe};

/// Host processes still running this run's probes (none may outlive their sandbox).
fn leftover_probes(run: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| {
            c.windows(14).any(|w| w == b"__escape-probe")
                && c.windows(run.len()).any(|w| w == run.as_bytes())
        })
        .count()
}

pub(crate) async fn limit_attempts(
    ctx: &Context,
    base: &SandboxConfig,
    probe: &ProbeConfig,
    events: &EventSink,
) -> anyhow::Result<Vec<Attempt>> {
    let mut out = Vec::new();
    let with_mode = |mode: &str| ProbeConfig {
        mode: mode.into(),
        ..probe.clone()
    };
    const PIDS: u64 = 32;
    let fork = run_probe(
        ctx,
        base,
        &with_mode("fork"),
        events.clone(),
        Some(Limits {
            pids: Some(PIDS),
            ..base.limits
        }),
        Duration::from_secs(60),
    )
    .await?;
    let report: Option<serde_json::Value> = fork
        .stdout
        .as_deref()
        .and_then(|s| serde_json::from_slice(s).ok());
    let forked = report
        .as_ref()
        .and_then(|r| r["forked"].as_u64())
        .unwrap_or(u64::MAX);
    out.push(held(
        "fork bomb",
        &format!("stops below {PIDS} processes"),
        match &report {
            Some(r) => format!(
                "{forked} forks, then {}",
                r["refused"].as_str().unwrap_or("?")
            ),
            None => format!("no report (exit code {})", fork.code),
        },
        forked >= PIDS,
    ));
    let memory = run_probe(
        ctx,
        base,
        &with_mode("memory"),
        events.clone(),
        Some(Limits {
            memory: Some(64 << 20),
            ..base.limits
        }),
        Duration::from_secs(60),
    )
    .await?;
    out.push(held(
        "memory balloon",
        "killed at the 64 MiB limit (exit 121)",
        format!("exit code {}", memory.code),
        memory.code != umbra_sandbox::exit::MEMORY_LIMIT,
    ));
    let busy = run_probe(
        ctx,
        base,
        &with_mode("busy"),
        events.clone(),
        None,
        Duration::from_secs(1),
    )
    .await?;
    out.push(held(
        "busy loop",
        "killed at the 1 s timeout (exit 124)",
        format!(
            "exit code {} after {} ms",
            busy.code,
            busy.elapsed.as_millis()
        ),
        busy.code != umbra_sandbox::exit::TIMEOUT || busy.elapsed > Duration::from_secs(5),
    ));
    let left = leftover_probes(&probe.run);
    out.push(held(
        "processes left on the host after the limit attempts",
        "none",
        left.to_string(),
        left > 0,
    ));
    Ok(out)
}
