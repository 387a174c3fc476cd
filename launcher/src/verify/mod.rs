//! `umbra verify`: the escape suite. The escape probe (`umbra_sandbox::probe`) runs inside a
//! real sandbox, tunneler included, and tries every way out it knows; what it cannot see from
//! inside is judged here from the host (canary listeners, the host's /tmp and homes, the hidden
//! directory, set-id bits), and the limit attempts run in sandboxes of their own
//! (`limits`). The binary only parses arguments and prints the attempts.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use umbra_sandbox::events::{EventKind, EventSink};
use umbra_sandbox::probe::{Attempt, ProbeConfig};
use umbra_sandbox::{Limits, SandboxConfig};
use umbra_sdk::{Context, SdkError};
use umbra_tunneler::TunnelerConfig;

use crate::run::{RunError, RunOptions, RunOutcome};

mod canary;
mod limits;

use canary::{setid_on_host, Canary, HideCanary};

/// What one `umbra verify` run checks.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The sandbox the probe runs in, as `umbra run` would make it for the same arguments.
    pub base: SandboxConfig,
    /// The identity's name (for the events).
    pub identity: String,
    /// Host files the probe must not be able to read (the identity file, the admin's).
    pub secrets: Vec<PathBuf>,
    /// Hosts on test networks the probe tries to reach directly.
    pub test_hosts: Vec<std::net::SocketAddr>,
    /// Leave out the limit attempts (fork bomb, memory, CPU, sockets, connections).
    pub skip_limits: bool,
}

/// Why the escape suite could not run (an escape is not an error: it is an [`Attempt`]).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Talking to the controller failed.
    #[error(transparent)]
    Sdk(#[from] SdkError),
    /// A probe's sandbox could not be run.
    #[error(transparent)]
    Run(#[from] RunError),
    /// Something on the host the suite needs.
    #[error("{what}: {source}")]
    Io {
        /// What was being made or read.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The probe's configuration could not be encoded.
    #[error("encoding the probe's configuration: {0}")]
    Json(#[from] serde_json::Error),
    /// The thread that watches the launcher's own use panicked.
    #[error("the launcher watcher panicked")]
    Watcher,
}

impl VerifyError {
    fn io(what: impl Into<String>, source: std::io::Error) -> VerifyError {
        VerifyError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Runs the escape suite as `ctx`: every attempt, held or escaped.
pub async fn verify(ctx: &Context, opts: VerifyOptions) -> Result<Vec<Attempt>, VerifyError> {
    let mut base = opts.base;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let canary = Canary::start(&run).map_err(|e| VerifyError::io("the host canary", e))?;
    let host_tmp = tempfile::Builder::new()
        .prefix("umbra-verify-")
        .tempdir_in(std::env::temp_dir())
        .map_err(|e| VerifyError::io("a temporary directory", e))?;
    // The listeners the tunneler will make, laid out as it lays them out.
    let view = ctx.edge().await?;
    let (want, _) = umbra_tunneler::desired(&view, &mut umbra_tunneler::AddressBook::new());
    let granted: Vec<std::net::SocketAddr> = want.keys().copied().collect();
    let workspace = std::fs::canonicalize(&base.workspace)
        .map_err(|e| VerifyError::io(format!("workspace {}", base.workspace.display()), e))?;
    // A hidden directory of the run's own, which the probe tries to read and to rename away.
    let hidden = HideCanary::make(&workspace)?;
    base.hide.push(hidden.dir.clone());
    let refused_name = "umbra-verify-refused.example".to_string();
    let probe = ProbeConfig {
        mode: "escape".into(),
        run,
        tag: uuid::Uuid::new_v4().simple().to_string(),
        workspace,
        secrets: opts.secrets,
        ro: base
            .ro
            .iter()
            .filter_map(|p| std::fs::canonicalize(p).ok())
            .collect(),
        home: std::env::var_os("HOME").and_then(|h| std::fs::canonicalize(h).ok()),
        host_tmp_dir: Some(host_tmp.path().to_path_buf()),
        host_tcp: Some(canary.addr()),
        test_hosts: opts.test_hosts,
        refused_name: refused_name.clone(),
        granted,
        tunneler_pid: i32::try_from(std::process::id()).ok(),
        hidden: Some(hidden.dir.clone()),
    };
    let dns_seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = dns_seen.clone();
    let events = EventSink::new(&base.id, &opts.identity, None)
        .map_err(|e| VerifyError::io("the event sink", e))?
        .forward(move |e| {
            if let EventKind::DnsRefused { name } = &e.kind {
                if let Ok(mut v) = seen.lock() {
                    v.push(name.clone());
                }
            }
        });
    let out = run_probe(
        ctx,
        &base,
        &probe,
        events.clone(),
        None,
        Duration::from_secs(180),
    )
    .await?;
    let mut attempts: Vec<Attempt> = match out
        .stdout
        .as_deref()
        .and_then(|s| serde_json::from_slice(s).ok())
    {
        Some(a) => a,
        None => vec![held(
            "run the escape probe",
            "a report",
            format!("no report (exit code {})", out.code),
            true,
        )],
    };
    attempts.extend(hidden.check());
    attempts.push(setid_on_host(&probe.workspace));
    let n = canary.hits();
    attempts.push(held(
        "reach the host's loopback listener (seen from the host)",
        "nothing arrives",
        format!("{n} connection(s) or datagram(s) arrived"),
        n > 0,
    ));
    let homes: std::collections::BTreeSet<PathBuf> = probe
        .home
        .iter()
        .cloned()
        .chain(std::iter::once(PathBuf::from("/root")))
        .collect();
    for home in &homes {
        let marker = home.join(umbra_sandbox::probe::HOME_MARKER);
        let there = marker.exists();
        if there {
            let _ = std::fs::remove_file(&marker);
        }
        attempts.push(held(
            &format!("write {} (seen from the host)", home.display()),
            "nothing appears",
            if there {
                "the probe's file appeared"
            } else {
                "nothing appeared"
            }
            .into(),
            there,
        ));
    }
    let left = std::fs::read_dir(host_tmp.path())
        .map(|d| d.count())
        .unwrap_or(0);
    attempts.push(held(
        "write the host's /tmp (seen from the host)",
        "host /tmp unchanged",
        format!("{left} file(s) appeared"),
        left > 0,
    ));
    let logged = dns_seen
        .lock()
        .map(|v| v.contains(&refused_name))
        .unwrap_or(false);
    attempts.push(held(
        "audit event for the refused name",
        "recorded",
        if logged { "recorded" } else { "missing" }.into(),
        !logged,
    ));
    if !opts.skip_limits {
        attempts.extend(limits::limit_attempts(ctx, &base, &probe, &events).await?);
    }
    Ok(attempts)
}

/// An attempt as the report lists it.
fn held(attempt: &str, expected: &str, observed: String, escaped: bool) -> Attempt {
    Attempt {
        attempt: attempt.into(),
        expected: expected.into(),
        observed,
        escaped,
    }
}

/// Runs the probe in a sandbox of its own (a fresh id, the `umbra` executable shown inside),
/// and returns how it ended with its report on standard output.
async fn run_probe(
    ctx: &Context,
    base: &SandboxConfig,
    probe: &ProbeConfig,
    events: EventSink,
    limits: Option<Limits>,
    timeout: Duration,
) -> Result<RunOutcome, VerifyError> {
    let mut cfg = base.clone();
    cfg.id = format!("umbra-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let exe = cfg.program.clone();
    let inside = PathBuf::from("/.umbra/umbra");
    cfg.extra = vec![(exe, inside.clone())];
    cfg.argv = vec![
        inside.display().to_string(),
        "__escape-probe".into(),
        probe.tag.clone(),
    ];
    // The configuration holds the canary's token: in the environment, which only the probe's
    // own user can read, never on the command line.
    cfg.env.push((
        umbra_sandbox::probe::CONFIG_ENV.into(),
        serde_json::to_string(probe)?,
    ));
    cfg.capture_stdout = true;
    if let Some(l) = limits {
        cfg.limits = l;
    }
    let opts = RunOptions {
        sandbox: cfg,
        events,
        timeout: Some(timeout),
        keep_on_revoke: false,
        tunnel: TunnelerConfig::default(),
    };
    Ok(crate::run::run(ctx.clone(), opts).await?)
}
