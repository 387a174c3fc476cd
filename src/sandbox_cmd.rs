//! `umbra run` and `umbra verify`: glue between the command line and the launcher
//! (`umbra_launcher::run`, `umbra_launcher::verify`). Exit codes are the agent's, or
//! `umbra_sandbox::exit`'s own.

use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use http::Method;
use umbra_launcher::verify::VerifyOptions;
use umbra_launcher::RunOptions;
use umbra_pki::IdentityFile;
use umbra_policies::Name;
use umbra_proto::api::{CreateIdentityRequest, TokenResponse};
use umbra_sandbox::events::EventSink;
use umbra_sandbox::probe::Attempt;
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
    let (to_controller, upload) = umbra_launcher::report::to_controller(ctx.controller());
    let metrics = crate::metrics::start(&args.metrics).await?;
    let registry = metrics.as_ref().map(|(r, _)| r.clone());
    let forward = umbra_launcher::metrics::counting(registry.as_ref(), to_controller);
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
        .forward(forward);
    let opts = RunOptions {
        sandbox: cfg,
        events,
        timeout: args.timeout,
        keep_on_revoke: args.keep_on_revoke,
        tunnel: TunnelerConfig {
            controller,
            metrics: registry,
            ..Default::default()
        },
    };
    let outcome = umbra_launcher::run(ctx, opts).await;
    // The sink (and with it the queue's sender) is gone with the options: the upload sends
    // what is left and ends.
    upload.finish(Duration::from_secs(3)).await;
    Ok(outcome?.code)
}

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

/// The escape suite as `file` (`umbra_launcher::verify`), with the sandbox `umbra run` would
/// make for the same arguments.
async fn verify_with(
    file: &IdentityFile,
    path: Option<&Path>,
    admin: &Option<PathBuf>,
    controller: Option<String>,
    args: &VerifyArgs,
) -> anyhow::Result<Vec<Attempt>> {
    let ctx = Context::with_controller(file.clone(), controller.as_deref())?;
    let mut secrets: Vec<PathBuf> = path
        .and_then(|p| std::fs::canonicalize(p).ok())
        .into_iter()
        .collect();
    let admin_file = crate::admin::admin_path(admin);
    if let Ok(a) = std::fs::canonicalize(&admin_file) {
        secrets.push(a);
    }
    let base = sandbox_config(&args.sandbox, Vec::new(), &[])?;
    if let Some(p) = path {
        ctx.set_identity_path(&renewal_path(p, &base)?);
    }
    let opts = VerifyOptions {
        base,
        identity: file.name.as_str().to_owned(),
        secrets,
        test_hosts: args.test_hosts.clone(),
        skip_limits: args.skip_limits,
    };
    Ok(umbra_launcher::verify::verify(&ctx, opts).await?)
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
