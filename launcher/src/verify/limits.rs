//! `umbra verify`'s limit attempts: each runs the escape probe in a sandbox of its own with small
//! limits, and is judged from outside (exit code, elapsed time, processes left on the host).

use std::time::Duration;

use umbra_sandbox::events::EventSink;
use umbra_sandbox::probe::{Attempt, ProbeConfig};
use umbra_sandbox::{Limits, SandboxConfig};
use umbra_sdk::Context;

use super::{held, run_probe, VerifyError};

/// Host processes still running this run's probes (none may outlive their sandbox).
fn leftover_probes(tag: &str) -> usize {
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
                && !tag.is_empty()
                && c.windows(tag.len()).any(|w| w == tag.as_bytes())
        })
        .count()
}

/// The limit attempts, each in a sandbox of its own, judged from outside.
pub(super) async fn limit_attempts(
    ctx: &Context,
    base: &SandboxConfig,
    probe: &ProbeConfig,
    events: &EventSink,
) -> Result<Vec<Attempt>, VerifyError> {
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
    out.push(socket_balloon(ctx, base, &with_mode("sockmem"), events).await?);
    out.push(connection_hold(ctx, base, &with_mode("connections"), events).await?);
    let left = leftover_probes(&probe.tag);
    out.push(held(
        "processes left on the host after the limit attempts",
        "none",
        left.to_string(),
        left > 0,
    ));
    Ok(out)
}

/// The memory limit the socket balloon runs under.
const SOCKET_BALLOON_MEMORY: u64 = 64 << 20;

/// Loopback TCP buffers under a small `--memory`: the agent is killed, or parks no more than
/// its memory limit (cgroup v1 does not count socket buffers in `memory.limit_in_bytes`; the
/// sandbox bounds them with `memory.kmem.tcp`, v2 counts them in `memory.max`).
async fn socket_balloon(
    ctx: &Context,
    base: &SandboxConfig,
    probe: &ProbeConfig,
    events: &EventSink,
) -> Result<Attempt, VerifyError> {
    let out = run_probe(
        ctx,
        base,
        probe,
        events.clone(),
        Some(Limits {
            memory: Some(SOCKET_BALLOON_MEMORY),
            ..base.limits
        }),
        Duration::from_secs(60),
    )
    .await?;
    let report: Option<serde_json::Value> = out
        .stdout
        .as_deref()
        .and_then(|s| serde_json::from_slice(s).ok());
    let limit_mib = SOCKET_BALLOON_MEMORY >> 20;
    let (observed, escaped) = match (&report, out.code) {
        (_, umbra_sandbox::exit::MEMORY_LIMIT) => ("killed at the memory limit".to_string(), false),
        (Some(r), _) => {
            let mib = r["buffered_mib"].as_u64().unwrap_or(u64::MAX);
            (
                format!(
                    "{mib} MiB parked in {} connection pairs, then {}",
                    r["pairs"],
                    r["stopped"].as_str().unwrap_or("?")
                ),
                mib > limit_mib,
            )
        }
        (None, code) => (format!("no report (exit code {code})"), true),
    };
    Ok(held(
        "socket-buffer balloon under --memory 64M",
        &format!("killed, or at most {limit_mib} MiB parked"),
        observed,
        escaped,
    ))
}

/// What the launcher used while a probe ran: its peak descriptor count and CPU time.
struct LauncherUse {
    fds_before: usize,
    fds_peak: usize,
    cpu: Duration,
    wall: Duration,
}

/// Samples this process (the launcher) from a thread of its own, so that a starved runtime
/// cannot hide what it spends; stops when `stop` is set (and after 5 minutes in any case).
fn watch_launcher(
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<LauncherUse> {
    use std::sync::atomic::Ordering;
    std::thread::spawn(move || {
        let fds = || {
            std::fs::read_dir("/proc/self/fd")
                .map(|d| d.count())
                .unwrap_or(0)
        };
        let started = std::time::Instant::now();
        let cpu0 = cpu_time();
        let fds_before = fds();
        let mut fds_peak = fds_before;
        for _ in 0..6000 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            fds_peak = fds_peak.max(fds());
            std::thread::sleep(Duration::from_millis(50));
        }
        LauncherUse {
            fds_before,
            fds_peak,
            cpu: cpu_time().saturating_sub(cpu0),
            wall: started.elapsed(),
        }
    })
}

/// This process's user and system CPU time, from `/proc/self/stat` (in clock ticks of 10 ms,
/// which is what Linux reports to user space everywhere).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name may hold spaces; the fields after it are plain numbers.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// 1,100 idle connections and a half-open DNS-over-TCP flood against the launcher: it keeps
/// answering, its descriptors stay within the sandbox's connection bound, and it does not spin.
async fn connection_hold(
    ctx: &Context,
    base: &SandboxConfig,
    probe: &ProbeConfig,
    events: &EventSink,
) -> Result<Attempt, VerifyError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let watcher = watch_launcher(stop.clone());
    let out = run_probe(
        ctx,
        base,
        probe,
        events.clone(),
        None,
        Duration::from_secs(90),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let used = watcher.join().map_err(|_| VerifyError::Watcher)?;
    let out = out?;
    let report: Option<serde_json::Value> = out
        .stdout
        .as_deref()
        .and_then(|s| serde_json::from_slice(s).ok());
    // The tunneler's bound, the DNS responder's, and room for the launcher's own (the count
    // starts before the sandbox and its tunneler exist).
    let fd_bound = crate::run::SANDBOX_CONNECTIONS + 16 + 192;
    let grown = used.fds_peak.saturating_sub(used.fds_before);
    let cpu_share = used.cpu.as_secs_f64() / used.wall.as_secs_f64().max(0.001);
    let (observed, escaped) = match &report {
        Some(r) => {
            let answered = r["dns_rcode"].as_u64() == Some(3);
            let dns_ms = r["dns_ms"].as_u64().unwrap_or(u64::MAX);
            (
                format!(
                    "{} held + {} half-open; DNS {} in {dns_ms} ms; launcher +{grown} descriptors, {:.0} % of a CPU",
                    r["held"],
                    r["half_open"],
                    if answered { "answered" } else { "unanswered" },
                    cpu_share * 100.0
                ),
                !answered || dns_ms > 2000 || grown > fd_bound || cpu_share > 0.5,
            )
        }
        None => (format!("no report (exit code {})", out.code), true),
    };
    Ok(held(
        "hold 1,100 connections and half-open DNS-over-TCP against the launcher",
        &format!("DNS answered within 2 s, at most {fd_bound} more descriptors, under half a CPU"),
        observed,
        escaped,
    ))
}
