//! `umbra run` and `umbra verify`: glue between the command line and the tunneler's sandbox
//! runner. Exit codes are the agent's, or `umbra_sandbox::exit`'s own.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use http::Method;
use umbra_pki::IdentityFile;
use umbra_policies::Name;
use umbra_proto::api::{CreateIdentityRequest, TokenResponse};
use umbra_sandbox::events::EventSink;
use umbra_sandbox::{Limits, SandboxConfig};
use umbra_sdk::{Context, ControllerClient};
use umbra_tunneler::sandboxed::{self, RunOptions};
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
        let r: Result<serde_json::Value, _> =
            self.admin.call(Method::DELETE, &path, none).await;
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
    admin: &Option<PathBuf>,
    identity_path: Option<&Path>,
    argv: Vec<String>,
    extra_env: &[String],
) -> anyhow::Result<SandboxConfig> {
    let workspace = match &args.workspace {
        Some(w) => w.clone(),
        None => std::env::current_dir().context("the current directory")?,
    };
    let id = format!("umbra-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let mut hide: Vec<PathBuf> = args.hide.clone();
    hide.extend(identity_path.map(Path::to_path_buf));
    let admin_file = crate::admin::admin_path(admin);
    if admin_file.exists() {
        hide.push(admin_file);
    }
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
    })
}

/// `umbra run`: returns the exit code.
pub async fn run(
    admin: &Option<PathBuf>,
    controller: Option<String>,
    args: RunArgs,
) -> anyhow::Result<i32> {
    let (file, path, ephemeral) = identity(&args.sandbox, admin, controller.as_deref()).await?;
    let result = run_with(&file, path.as_deref(), admin, controller, &args).await;
    if let Some(e) = ephemeral {
        e.delete().await;
    }
    result
}

async fn run_with(
    file: &IdentityFile,
    path: Option<&Path>,
    admin: &Option<PathBuf>,
    controller: Option<String>,
    args: &RunArgs,
) -> anyhow::Result<i32> {
    let cfg = sandbox_config(
        &args.sandbox,
        admin,
        path,
        args.command.clone(),
        &args.env,
    )?;
    let events = EventSink::new(&cfg.id, file.name.as_str(), args.events.as_deref())
        .with_context(|| "opening the events file")?;
    let ctx = Context::with_controller(file.clone(), controller.as_deref())?;
    if let Some(p) = path {
        ctx.set_identity_path(p);
    }
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
    let outcome = sandboxed::run(ctx, opts).await?;
    Ok(outcome.code)
}

/// `umbra verify`: returns the exit code (0: nothing escaped).
pub async fn verify(
    admin: &Option<PathBuf>,
    controller: Option<String>,
    json: bool,
    args: VerifyArgs,
) -> anyhow::Result<i32> {
    let _ = (admin, controller, json, args);
    anyhow::bail!("not yet")
}
