//! `umbra run` and `umbra verify`: glue between the command line and the tunneler's sandbox
//! runner. Exit codes are the agent's, or `umbra_sandbox::exit`'s own.

use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use http::Method;
use umbra_launcher::RunOptions;
use umbra_pki::IdentityFile;
use umbra_policies::Name;
use umbra_proto::api::{CreateIdentityRequest, ReportEventsRequest, ReportedEvent, TokenResponse};
use umbra_sandbox::events::{EventKind, EventSink};
use umbra_sandbox::probe::{Attempt, ProbeConfig};
use umbra_sandbox::{Limits, SandboxConfig};
use umbra_sdk::{Context, ControllerClient};
use umbra_tunneler::TunnelerConfig;

use crate::cli::{SandboxArgs, SandboxRunArgs as RunArgs, VerifyArgs};

/// An identity made for one task; [`Ephemeral::delete`] removes it (and its grants' references)
/// when the task ends, whatever way it ends.
struct Ephemeral {
    admin: ControllerClient,
    name: String,
}

impl Ephemeral {
    async fn create(
        admin_file: &Path,
        controller: Option<&str>,
        roles: &[String],
    ) -> anyhow::Result<(Ephemeral, IdentityFile)> {
        let file = crate::admin::load_renewing(admin_file).await?;
        let admin = ControllerClient::for_identity(&file, controller)?;
        let name = format!("task-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let roles = roles
            .iter()
            .map(|r| Name::new(r.as_str()).with_context(|| format!("invalid role {r:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let req = CreateIdentityRequest {
            name: Name::new(name.as_str())?,
            kind: umbra_policies::IdentityKind::Agent,
            roles,
            token_ttl_secs: Some(60),
        };
        let tok: TokenResponse = admin
            .call(Method::POST, "/v1/identities", Some(&req))
            .await
            .context("creating the ephemeral identity")?;
        let eph = Ephemeral { admin, name };
        match umbra_sdk::enroll(&tok.token, controller).await {
            Ok(file) => Ok((eph, file)),
            Err(e) => {
                eph.delete().await;
                Err(anyhow::Error::new(e).context("enrolling the ephemeral identity"))
            }
        }
    }

    async fn delete(self) {
        let path = format!("/v1/identities/{}?cascade=true", self.name);
        let none: Option<&()> = None;
        let r: Result<serde_json::Value, _> = self.admin.call(Method::DELETE, &path, none).await;
        if let Err(e) = r {
            eprintln!(
                "warning: could not delete the ephemeral identity {}: {e}",
                self.name
            );
        }
    }
}

/// The identity, its file's path (to hide), and the ephemeral guard if one was made.
async fn identity(
    args: &SandboxArgs,
    admin: &Option<PathBuf>,
    controller: Option<&str>,
) -> anyhow::Result<(IdentityFile, Option<PathBuf>, Option<Ephemeral>)> {
    if args.ephemeral {
        let admin_file = crate::admin::admin_path(admin);
        let (eph, file) = Ephemeral::create(&admin_file, controller, &args.roles).await?;
        return Ok((file, None, Some(eph)));
    }
    let path = args
        .identity
        .clone()
        .context("--identity is required (or --ephemeral)")?;
    let file = IdentityFile::load(&path).with_context(|| format!("identity {}", path.display()))?;
    Ok((file, Some(path), None))
}

fn sandbox_config(
    args: &SandboxArgs,
    argv: Vec<String>,
    extra_env: &[String],
) -> anyhow::Result<SandboxConfig> {
    let workspace = match &args.workspace {
        Some(w) => w.clone(),
        None => std::env::current_dir().context("the current directory")?,
    };
    let id = format!("umbra-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    // Nothing is hidden behind the user's back: a workspace that holds a controller's
    // directory, an identity or a key is refused by the sandbox unless the user hides the
    // directory that holds it.
    let hide: Vec<PathBuf> = args.hide.clone();
    let limits = Limits {
        memory: Some(umbra_sandbox::cgroup::parse_size(&args.memory).map_err(anyhow::Error::msg)?),
        cpu_millis: args
            .cpus
            .as_deref()
            .map(umbra_sandbox::cgroup::parse_cpus)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        pids: Some(args.pids).filter(|p| *p > 0),
    };
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), "/tmp".into()),
        ("USER".into(), "agent".into()),
        ("LOGNAME".into(), "agent".into()),
        ("SHELL".into(), "/bin/sh".into()),
        ("UMBRA_SANDBOX".into(), id.clone()),
    ];
    for key in ["TERM", "LANG", "LC_ALL", "TZ"] {
        if let Ok(v) = std::env::var(key) {
            env.push((key.into(), v));
        }
    }
    for e in extra_env {
        let (k, v) = match e.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (
                e.clone(),
                std::env::var(e).with_context(|| format!("--env {e}: not set here"))?,
            ),
        };
        anyhow::ensure!(
            !k.is_empty() && !k.contains('\0') && !v.contains('\0'),
            "--env {e}: not KEY=VALUE"
        );
        env.retain(|(old, _)| *old != k);
        env.push((k, v));
    }
    Ok(SandboxConfig {
        program: std::env::current_exe().context("locating the umbra executable")?,
        id,
        workspace,
        ro: args.ro.clone(),
        hide,
        extra: Vec::new(),
        argv,
        env,
        limits,
        allow_degraded: args.allow_degraded,
        capture_stdout: false,
    })
}

/// `umbra run`: returns the exit code.
pub async fn run(
    admin: &Option<PathBuf>,
    controller: Option<String>,
    args: RunArgs,
) -> anyhow::Result<i32> {
    let (file, path, ephemeral) = identity(&args.sandbox, admin, controller.as_deref()).await?;
    // An interruption anywhere (even while the sandbox is being built) still ends here, so an
    // ephemeral identity is deleted whatever way the task ends; dropping the run kills the
    // sandbox and removes its cgroup and state.
    let result = tokio::select! {
        r = run_with(&file, path.as_deref(), controller, &args) => r,
        _ = umbra_launcher::interrupted() => Ok(130),
    };
    if let Some(e) = ephemeral {
        e.delete().await;
    }
    result
}

async fn run_with(
    file: &IdentityFile,
    path: Option<&Path>,
    controller: Option<String>,
    args: &RunArgs,
) -> anyhow::Result<i32> {
    let cfg = sandbox_config(&args.sandbox, args.command.clone(), &args.env)?;
    let renew_at = path.map(|p| renewal_path(p, &cfg)).transpose()?;
    let ctx = Context::with_controller(file.clone(), controller.as_deref())?;
    if let Some(p) = &renew_at {
        ctx.set_identity_path(p);
    }
    let events_at = match &args.events {
        Some(ev) => Some(events_file(ev, &cfg)?),
        None => None,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<ReportedEvent>(1024);
    let sink = EventSink::new(
        &cfg.id,
        file.name.as_str(),
        events_at.as_ref().map(|(_, at)| at.as_path()),
    );
    // The directory's descriptor is needed only to open the file.
    drop(events_at);
    let events = sink
        .map_err(|e| {
            let shown = args.events.as_deref().unwrap_or(Path::new(""));
            anyhow::anyhow!("opening the events file {}: {e}", shown.display())
        })?
        .forward(move |ev| {
            if let Some(r) = reported(ev) {
                // A full queue drops the event for the controller; the file still has it.
                let _ = tx.try_send(r);
            }
        });
    let uploader = tokio::spawn(upload_events(ctx.controller(), rx));
    let opts = RunOptions {
        sandbox: cfg,
        events,
        timeout: args.timeout,
        keep_on_revoke: args.keep_on_revoke,
        tunnel: TunnelerConfig {
            controller,
            ..Default::default()
        },
    };
    let outcome = umbra_launcher::run(ctx, opts).await;
    // The sink (and with it the queue's sender) is gone with the options: the uploader drains
    // what is left and ends.
    let _ = tokio::time::timeout(Duration::from_secs(3), uploader).await;
    Ok(outcome?.code)
}

/// An event as the controller's audit log takes it.
/// Where the identity's renewals are written while the sandbox runs: its real path, resolved
/// once now, never the path as given. A path through a link or a `..` in the workspace could be
/// re-aimed by the agent between renewals (into the workspace, where it would read its own key,
/// or anywhere on the host, where the launcher would overwrite a file); a real path has no link
/// left to change, and its directories are either out of the agent's reach or, inside a hidden
/// directory, pinned and covered. A path that reaches a shown file through a link is refused.
fn renewal_path(identity: &Path, cfg: &SandboxConfig) -> anyhow::Result<PathBuf> {
    use umbra_sandbox::exposure;
    let canon = |p: &PathBuf| std::fs::canonicalize(p).ok();
    let shown: Vec<PathBuf> = std::iter::once(&cfg.workspace)
        .chain(cfg.ro.iter())
        .filter_map(canon)
        .collect();
    let hidden: Vec<PathBuf> = cfg.hide.iter().filter_map(canon).collect();
    let real = std::fs::canonicalize(identity)
        .with_context(|| format!("identity {}", identity.display()))?;
    // A path with no link or `..` that is shown holds the key: the sandbox's scan refuses it, in
    // terms of the workspace, after the workspace itself has been judged.
    let as_given = std::path::absolute(identity)?;
    if real != as_given && exposure::shows(&real, &shown, &hidden) {
        anyhow::bail!(
            "the identity file {} is {}, which the sandbox shows; its renewals would be readable inside. Keep it outside the workspace, or --hide the directory that holds it",
            identity.display(),
            real.display()
        );
    }
    Ok(real)
}

/// Opens the directory of the events file, which the launcher writes (as root, perhaps), and
/// refuses it inside a path the sandbox shows: an agent could replace the file with a link or a
/// FIFO and aim the launcher's writes anywhere. The directory is opened once, refusing a
/// symbolic link anywhere on its path (an agent could have made one in an earlier run, or make
/// one in a sandbox that shows a parent, to switch the directory after the check); the file is
/// then opened through that descriptor. Returns the descriptor (kept open until the file is) and
/// the path to open the file by.
fn events_file(file: &Path, cfg: &SandboxConfig) -> anyhow::Result<(OwnedFd, PathBuf)> {
    let name = file
        .file_name()
        .filter(|n| *n != "." && *n != "..")
        .with_context(|| format!("the events file {} names no file", file.display()))?;
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let parent = std::path::absolute(&parent)
        .with_context(|| format!("the directory of {}", file.display()))?;
    let dir = umbra_sandbox::idmap::open_exact(&parent)
        .with_context(|| format!("the directory of the events file {}", file.display()))?;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .with_context(|| format!("the directory of {}", file.display()))?;
    for shown in std::iter::once(&cfg.workspace).chain(cfg.ro.iter()) {
        if let Ok(shown) = std::fs::canonicalize(shown) {
            if real.starts_with(&shown) {
                anyhow::bail!(
                    "the events file {} is inside {}, which the sandbox shows (the agent could replace it); write it elsewhere",
                    file.display(),
                    shown.display()
                );
            }
        }
    }
    let at = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    // The file itself may not be a link either: it could lead into what is shown.
    if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
        anyhow::bail!(
            "the events file {} is a symbolic link; give the path of the file itself",
            file.display()
        );
    }
    Ok((dir, at))
}

fn reported(ev: &umbra_sandbox::events::Event) -> Option<ReportedEvent> {
    let mut v = serde_json::to_value(ev).ok()?;
    let obj = v.as_object_mut()?;
    let kind = obj.remove("kind")?.as_str()?.to_string();
    for k in ["at", "sandbox", "identity"] {
        obj.remove(k);
    }
    Some(ReportedEvent {
        kind,
        sandbox: ev.sandbox.clone(),
        at: ev.at.clone(),
        detail: v,
    })
}

/// Sends events to the controller's audit log as they come, a batch at a time. Failures are
/// logged once; a revoked identity cannot report, and the controller recorded the revocation.
async fn upload_events(
    client: ControllerClient,
    mut rx: tokio::sync::mpsc::Receiver<ReportedEvent>,
) {
    let mut warned = false;
    while let Some(first) = rx.recv().await {
        let mut events = vec![first];
        while events.len() < umbra_proto::api::MAX_REPORTED_EVENTS {
            match rx.try_recv() {
                Ok(e) => events.push(e),
                Err(_) => break,
            }
        }
        let req = ReportEventsRequest { events };
        let r: Result<serde_json::Value, _> = tokio::time::timeout(
            Duration::from_secs(2),
            client.call(Method::POST, "/v1/audit/events", Some(&req)),
        )
        .await
        .unwrap_or_else(|_| Err(umbra_sdk::SdkError::Timeout("the controller".into())));
        if let Err(e) = r {
            if !warned {
                tracing::warn!(error = %e, "could not send sandbox events to the controller");
                warned = true;
            }
        }
    }
}

/// `umbra verify`: returns the exit code (0: nothing escaped, 1: something did).
pub async fn verify(
    admin: &Option<PathBuf>,
    controller: Option<String>,
    json: bool,
    args: VerifyArgs,
) -> anyhow::Result<i32> {
    let (file, path, ephemeral) = identity(&args.sandbox, admin, controller.as_deref()).await?;
    let result = verify_with(&file, path.as_deref(), admin, controller, &args).await;
    if let Some(e) = ephemeral {
        e.delete().await;
    }
    let attempts = result?;
    let escaped = attempts.iter().filter(|a| a.escaped).count();
    if json {
        println!("{}", serde_json::to_string_pretty(&attempts)?);
    } else {
        let rows: Vec<Vec<String>> = attempts
            .iter()
            .map(|a| {
                vec![
                    a.attempt.clone(),
                    a.expected.clone(),
                    a.observed.clone(),
                    if a.escaped { "ESCAPED" } else { "held" }.to_string(),
                ]
            })
            .collect();
        crate::output::table(&["ATTEMPT", "EXPECTED", "OBSERVED", "RESULT"], rows);
        println!("{} attempts, {} escaped", attempts.len(), escaped);
    }
    Ok(if escaped == 0 { 0 } else { 1 })
}

/// Connections the canary reads at once.
const CANARY_READERS: usize = 256;

/// Counts what reaches a canary listener on the host's loopback carrying `token` (the run's
/// secret, which only the probe knows): an unrelated host process that happens to connect is
/// not mistaken for an escape.
fn canary(token: &str) -> anyhow::Result<(std::net::SocketAddr, Arc<AtomicUsize>)> {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
    tcp.set_nonblocking(true)?;
    let addr = tcp.local_addr()?;
    let hits = Arc::new(AtomicUsize::new(0));
    let tcp = tokio::net::TcpListener::from_std(tcp)?;
    let h = hits.clone();
    let want = token.as_bytes().to_vec();
    // Every connection is read (for a bounded time), a bounded number at once: when all readers
    // are busy the loop waits before accepting more, and the kernel's backlog holds the rest.
    // None is dropped unread, so a flood from some other host process cannot hide the probe's
    // own connection among dropped ones.
    let readers = Arc::new(tokio::sync::Semaphore::new(CANARY_READERS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = readers.clone().acquire_owned().await else {
                return;
            };
            let Ok((mut s, _)) = tcp.accept().await else {
                return;
            };
            let (h, want) = (h.clone(), want.clone());
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt as _;
                let mut got = vec![0u8; want.len()];
                let read = tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut got));
                if matches!(read.await, Ok(Ok(_))) && got == want {
                    h.fetch_add(1, Ordering::SeqCst);
                }
                drop(permit);
            });
        }
    });
    if let Ok(udp) = std::net::UdpSocket::bind(addr) {
        udp.set_nonblocking(true)?;
        let udp = tokio::net::UdpSocket::from_std(udp)?;
        let h = hits.clone();
        let want = token.as_bytes().to_vec();
        tokio::spawn(async move {
            let mut b = [0u8; 512];
            while let Ok((n, _)) = udp.recv_from(&mut b).await {
                if b[..n] == want[..] {
                    h.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
    }
    Ok((addr, hits))
}

pub(crate) fn held(attempt: &str, expected: &str, observed: String, escaped: bool) -> Attempt {
    Attempt {
        attempt: attempt.into(),
        expected: expected.into(),
        observed,
        escaped,
    }
}

async fn verify_with(
    file: &IdentityFile,
    path: Option<&Path>,
    admin: &Option<PathBuf>,
    controller: Option<String>,
    args: &VerifyArgs,
) -> anyhow::Result<Vec<Attempt>> {
    let ctx = Context::with_controller(file.clone(), controller.as_deref())?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let (host_addr, hits) = canary(&run)?;
    let host_tmp = tempfile::Builder::new()
        .prefix("umbra-verify-")
        .tempdir_in(std::env::temp_dir())?;
    // The listeners the tunneler will make, laid out as it lays them out.
    let view = ctx.edge().await?;
    let (want, _) = umbra_tunneler::desired(&view, &mut umbra_tunneler::AddressBook::new());
    let granted: Vec<std::net::SocketAddr> = want.keys().copied().collect();
    let mut secrets: Vec<PathBuf> = path
        .and_then(|p| std::fs::canonicalize(p).ok())
        .into_iter()
        .collect();
    let admin_file = crate::admin::admin_path(admin);
    if let Ok(a) = std::fs::canonicalize(&admin_file) {
        secrets.push(a);
    }
    let mut base = sandbox_config(&args.sandbox, Vec::new(), &[])?;
    if let Some(p) = path {
        ctx.set_identity_path(&renewal_path(p, &base)?);
    }
    let workspace = std::fs::canonicalize(&base.workspace)
        .with_context(|| format!("workspace {}", base.workspace.display()))?;
    // A hidden directory of the run's own, which the probe tries to read and to rename away.
    let hidden = HideCanary::make(&workspace)?;
    base.hide.push(hidden.dir.clone());
    let refused_name = "umbra-verify-refused.example".to_string();
    let probe = ProbeConfig {
        mode: "escape".into(),
        run,
        tag: uuid::Uuid::new_v4().simple().to_string(),
        workspace,
        secrets,
        ro: args
            .sandbox
            .ro
            .iter()
            .filter_map(|p| std::fs::canonicalize(p).ok())
            .collect(),
        home: std::env::var_os("HOME").and_then(|h| std::fs::canonicalize(h).ok()),
        host_tmp_dir: Some(host_tmp.path().to_path_buf()),
        host_tcp: Some(host_addr),
        test_hosts: args.test_hosts.clone(),
        refused_name: refused_name.clone(),
        granted,
        tunneler_pid: i32::try_from(std::process::id()).ok(),
        hidden: Some(hidden.dir.clone()),
    };
    let dns_seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = dns_seen.clone();
    let events = EventSink::new(&base.id, file.name.as_str(), None)?.forward(move |e| {
        if let EventKind::DnsRefused { name } = &e.kind {
            if let Ok(mut v) = seen.lock() {
                v.push(name.clone());
            }
        }
    });
    let out = run_probe(
        &ctx,
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
    let n = hits.load(Ordering::SeqCst);
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
    if !args.skip_limits {
        attempts.extend(crate::verify_limits::limit_attempts(&ctx, &base, &probe, &events).await?);
    }
    Ok(attempts)
}

/// The `--hide` canary: `HIDDEN_DIR/secret` below the workspace, removed when dropped.
struct HideCanary {
    top: PathBuf,
    dir: PathBuf,
}

impl HideCanary {
    fn make(workspace: &Path) -> anyhow::Result<HideCanary> {
        use umbra_sandbox::probe::privilege::{HIDDEN_DIR, HIDDEN_SECRET};
        let dir = workspace.join(HIDDEN_DIR);
        let top = workspace.join(
            Path::new(HIDDEN_DIR)
                .components()
                .next()
                .map(|c| c.as_os_str().to_owned())
                .unwrap_or_default(),
        );
        let _ = std::fs::remove_dir_all(&top);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("making {} in the workspace", dir.display()))?;
        std::fs::write(dir.join(HIDDEN_SECRET), b"umbra verify: hidden canary\n")
            .context("writing the hidden canary")?;
        Ok(HideCanary { top, dir })
    }

    /// On the host: the hidden file is still where it was (no rename carried it out).
    fn check(&self) -> Vec<Attempt> {
        use umbra_sandbox::probe::privilege::HIDDEN_SECRET;
        let there = self.dir.join(HIDDEN_SECRET).is_file();
        let strays: Vec<String> = std::fs::read_dir(&self.top)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| Some(n.as_str()) != self.dir.file_name().and_then(|f| f.to_str()))
                    .collect()
            })
            .unwrap_or_default();
        let ok = there && strays.is_empty();
        vec![held(
            "carry a --hide path out from under its cover (seen from the host)",
            "still in place",
            if ok {
                "in place".into()
            } else {
                format!(
                    "in place: {there}; new entries beside it: [{}]",
                    strays.join(" ")
                )
            },
            !ok,
        )]
    }
}

impl Drop for HideCanary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.top);
    }
}

/// On the host: the probe's file in the workspace carries no set-id bit; removed afterwards.
fn setid_on_host(workspace: &Path) -> Attempt {
    use std::os::unix::fs::MetadataExt as _;
    let file = workspace.join(umbra_sandbox::probe::privilege::SETID_FILE);
    let meta = std::fs::symlink_metadata(&file);
    let _ = std::fs::remove_file(&file);
    let (observed, escaped) = match meta {
        Ok(m) if m.mode() & 0o6000 != 0 => (
            format!("mode {:o}, owner {}", m.mode() & 0o7777, m.uid()),
            true,
        ),
        Ok(m) => (
            format!("mode {:o}, owner {}", m.mode() & 0o7777, m.uid()),
            false,
        ),
        Err(_) => ("no file".into(), false),
    };
    held(
        "a set-id file in the workspace (seen from the host)",
        "no set-id bit",
        observed,
        escaped,
    )
}

pub(crate) async fn run_probe(
    ctx: &Context,
    base: &SandboxConfig,
    probe: &ProbeConfig,
    events: EventSink,
    limits: Option<Limits>,
    timeout: Duration,
) -> anyhow::Result<umbra_launcher::RunOutcome> {
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
    Ok(umbra_launcher::run(ctx.clone(), opts).await?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_sandbox_knows_the_controllers_database_by_its_name() {
        // The sandbox cannot depend on the controller; the scan for controller directories
        // must still look for the file the controller writes.
        assert_eq!(umbra_sandbox::CONTROLLER_DB, umbra_controller::files::DB);
    }
}
