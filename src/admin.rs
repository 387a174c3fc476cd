//! Management commands: each is one authenticated call to the controller's API.

use std::path::{Path, PathBuf};

use anyhow::Context;
use http::Method;
use serde_json::json;
use umbra_pki::IdentityFile;
use umbra_policies::{Action, HostPort, Hosting, Name, Selector, Semantic, Service};
use umbra_proto::api::*;
use umbra_sdk::ControllerClient;

use crate::cli::{Command, IdentityCmd, PolicyCmd, RouterCmd, ServiceCmd};
use crate::output;

/// How long `apply` waits for the controller: planning and committing a document of a million
/// identities takes it tens of seconds.
const APPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

pub(crate) fn admin_path(admin: &Option<PathBuf>) -> PathBuf {
    admin
        .clone()
        .unwrap_or_else(|| Path::new(".umbra").join("admin.json"))
}

/// Loads an identity file and renews its certificate first if renewal is due by the rule every
/// renewing process follows (`umbra_policies::renewal`) and it has not expired yet.
pub(crate) async fn load_renewing(path: &Path) -> anyhow::Result<IdentityFile> {
    let file =
        IdentityFile::load(path).with_context(|| format!("admin identity {}", path.display()))?;
    let leaf = file.leaf()?;
    let now = umbra_clock::Clock::system().timestamp();
    let due = umbra_policies::renewal::due(leaf.not_before, leaf.not_after, now);
    if now < leaf.not_after && due == umbra_policies::renewal::RenewAt::Now {
        match umbra_sdk::renew(&file).await {
            Ok(renewed) => {
                renewed.save(path)?;
                tracing::info!(path = %path.display(), "renewed the certificate");
                return Ok(renewed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not renew the certificate; using the current one")
            }
        }
    }
    Ok(file)
}

fn names(v: &[String], what: &str) -> anyhow::Result<Vec<Name>> {
    v.iter()
        .filter(|s| !s.is_empty())
        .map(|s| Name::new(s.as_str()).with_context(|| format!("invalid {what} {s:?}")))
        .collect()
}

fn selectors(v: &[String]) -> anyhow::Result<Vec<Selector>> {
    v.iter()
        .map(|s| s.parse::<Selector>().map_err(anyhow::Error::from))
        .collect()
}

fn path_seg(name: &str) -> anyhow::Result<String> {
    // Names are a URL-safe alphabet by construction; refuse anything else before it reaches a URL.
    Ok(Name::new(name)
        .with_context(|| format!("invalid name {name:?}"))?
        .to_string())
}

/// Refuses a bad `-o` before the controller creates an identity or a token: a directory, a
/// socket, a dangling link or an unwritable place would otherwise fail only after the token
/// exists, leaving it spent on nothing.
fn check_output(output: &Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(path) = output {
        umbra_pki::check_target(path)?;
    }
    Ok(())
}

/// Writes a token to a file (0600; see `umbra_pki::outfile`) or standard output.
fn emit_token(resp: &TokenResponse, output: &Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    if json && output.is_none() {
        return output::json(resp);
    }
    match output {
        Some(path) => {
            let data = format!("{}\n", resp.token);
            umbra_pki::write_file(path, data.as_bytes(), 0o600).with_context(|| {
                format!(
                    "{} {} exists on the controller, but its enrollment token could not be written",
                    resp.identity.kind, resp.identity.name
                )
            })?;
            eprintln!(
                "created {} {}; enrollment token written to {} (valid until {} UTC)",
                resp.identity.kind,
                resp.identity.name,
                path.display(),
                output::time(resp.token_expires_at)
            );
        }
        None => println!("{}", resp.token),
    }
    Ok(())
}

pub async fn run(
    admin: &Option<PathBuf>,
    controller: Option<&str>,
    json: bool,
    command: Command,
) -> anyhow::Result<()> {
    let path = admin_path(admin);
    // `identity renew --identity FILE` renews any identity, not only the admin's.
    if let Command::Identity(IdentityCmd::Renew { identity }) = &command {
        let target = identity.clone().unwrap_or(path);
        let file = IdentityFile::load(&target)
            .with_context(|| format!("identity {}", target.display()))?;
        let renewed = umbra_sdk::renew(&file).await?;
        renewed.save(&target)?;
        let leaf = renewed.leaf()?;
        println!(
            "renewed {} until {} UTC",
            leaf.spiffe,
            output::time(leaf.not_after)
        );
        return Ok(());
    }
    let file = load_renewing(&path).await?;
    let c = ControllerClient::for_identity(&file, controller)?;
    let none: Option<&()> = None;
    match command {
        Command::Identity(cmd) => identity(&c, json, cmd).await,
        Command::Service(cmd) => service(&c, json, cmd).await,
        Command::Policy(cmd) => policy(&c, json, cmd).await,
        Command::Router(cmd) => router(&c, json, cmd).await,
        Command::Apply(args) => {
            let document = if args.file.as_os_str() == "-" {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
                buf
            } else {
                std::fs::read(&args.file)
                    .with_context(|| format!("reading {}", args.file.display()))?
            };
            // Sent as it is, not wrapped in JSON: a document of a million identities is held
            // once on each side.
            let path = if args.dry_run {
                "/v1/apply?dry_run=true"
            } else {
                "/v1/apply"
            };
            let r: ApplyResponse = c
                .send_document(path, document.into(), APPLY_TIMEOUT)
                .await?;
            if json {
                return output::json(&r);
            }
            println!("{}", r.plan.trim_end());
            if r.applied {
                println!("applied {} change(s)", r.changes);
            } else if r.changes > 0 {
                println!("dry run: {} change(s) not applied", r.changes);
            }
            Ok(())
        }
        Command::Export => {
            let r: ExportResponse = c.call(Method::GET, "/v1/export", none).await?;
            print!("{}", r.document);
            Ok(())
        }
        Command::Audit { limit, follow } => {
            let r: Vec<AuditEntry> = c
                .call(Method::GET, &format!("/v1/audit?limit={limit}"), none)
                .await?;
            if follow {
                for e in &r {
                    crate::follow::print(e, json)?;
                }
                let after = r.last().map(|e| e.id);
                return crate::follow::follow(&c, after, json).await;
            }
            if json {
                return output::json(&r);
            }
            let rows = r
                .into_iter()
                .map(|e| {
                    let summary = crate::follow::summary(&e);
                    vec![
                        e.id.to_string(),
                        output::time(e.at),
                        e.actor,
                        e.action,
                        e.target,
                        summary,
                    ]
                })
                .collect();
            output::table(
                &["id", "time (utc)", "actor", "action", "target", "detail"],
                rows,
            );
            Ok(())
        }
        Command::Controller(_)
        | Command::Enroll(_)
        | Command::Quickstart { .. }
        | Command::Tunnel { .. }
        | Command::Run(_)
        | Command::Verify(_)
        | Command::Gateway(_)
        | Command::Demo => {
            unreachable!("handled in main")
        }
    }
}

async fn identity(c: &ControllerClient, json: bool, cmd: IdentityCmd) -> anyhow::Result<()> {
    let none: Option<&()> = None;
    match cmd {
        IdentityCmd::Create {
            name,
            roles,
            kind,
            token_ttl,
            output,
        } => {
            let req = CreateIdentityRequest {
                name: Name::new(name.as_str()).with_context(|| format!("invalid name {name:?}"))?,
                kind: kind.parse().map_err(anyhow::Error::msg)?,
                roles: names(&roles, "role")?,
                token_ttl_secs: Some(token_ttl.as_secs()),
            };
            check_output(&output)?;
            let r: TokenResponse = c.call(Method::POST, "/v1/identities", Some(&req)).await?;
            emit_token(&r, &output, json)
        }
        IdentityCmd::Token {
            name,
            token_ttl,
            output,
        } => {
            check_output(&output)?;
            let r: TokenResponse = c
                .call(
                    Method::POST,
                    &format!("/v1/identities/{}/token", path_seg(&name)?),
                    Some(&TokenRequest {
                        token_ttl_secs: Some(token_ttl.as_secs()),
                    }),
                )
                .await?;
            emit_token(&r, &output, json)
        }
        IdentityCmd::List => {
            let r: Vec<IdentityView> = c.call(Method::GET, "/v1/identities", none).await?;
            if json {
                return output::json(&r);
            }
            let rows = r
                .into_iter()
                .map(|v| {
                    let i = v.identity;
                    let status = if i.revoked {
                        "revoked"
                    } else if i.disabled {
                        "disabled"
                    } else if v.enrolled {
                        "enrolled"
                    } else {
                        "pending"
                    };
                    vec![
                        i.name.to_string(),
                        i.kind.to_string(),
                        output::list(&i.roles),
                        status.into(),
                        i.id.to_string(),
                    ]
                })
                .collect();
            output::table(&["name", "kind", "roles", "status", "id"], rows);
            Ok(())
        }
        IdentityCmd::Show { name } => {
            let v: IdentityView = c
                .call(
                    Method::GET,
                    &format!("/v1/identities/{}", path_seg(&name)?),
                    none,
                )
                .await?;
            if json {
                return output::json(&v);
            }
            let i = &v.identity;
            println!("name:     {}", i.name);
            println!("id:       {}", i.id);
            println!("kind:     {}", i.kind);
            println!("roles:    {}", output::list(&i.roles));
            println!("revoked:  {}", i.revoked);
            println!("disabled: {}", i.disabled);
            println!("enrolled: {}", v.enrolled);
            if !v.certs.is_empty() {
                println!();
                let rows = v
                    .certs
                    .iter()
                    .map(|c| {
                        vec![
                            c.serial.clone(),
                            output::time(c.issued_at),
                            output::time(c.not_after),
                            c.revoked.to_string(),
                        ]
                    })
                    .collect();
                output::table(
                    &["serial", "issued (utc)", "expires (utc)", "revoked"],
                    rows,
                );
            }
            Ok(())
        }
        IdentityCmd::Revoke { name } => {
            let i: umbra_policies::Identity = c
                .call(
                    Method::POST,
                    &format!("/v1/identities/{}/revoke", path_seg(&name)?),
                    none,
                )
                .await?;
            println!("revoked {} ({})", i.name, i.id);
            Ok(())
        }
        IdentityCmd::Delete { name, cascade } => {
            let r: serde_json::Value = c
                .call(
                    Method::DELETE,
                    &format!("/v1/identities/{}?cascade={cascade}", path_seg(&name)?),
                    none,
                )
                .await?;
            println!("deleted {name}");
            print_deleted_policies(&r);
            Ok(())
        }
        IdentityCmd::Renew { .. } => unreachable!("handled before loading the admin file"),
    }
}

fn print_deleted_policies(r: &serde_json::Value) {
    if let Some(p) = r
        .get("deleted_policies")
        .and_then(|p| p.as_array())
        .filter(|p| !p.is_empty())
    {
        let names: Vec<&str> = p.iter().filter_map(|v| v.as_str()).collect();
        println!("deleted policies: {}", names.join(", "));
    }
}

async fn service(c: &ControllerClient, json: bool, cmd: ServiceCmd) -> anyhow::Result<()> {
    let none: Option<&()> = None;
    match cmd {
        ServiceCmd::Create {
            name,
            address,
            hosted,
            intercepts,
            roles,
            proxy_protocol,
        } => {
            let hosting = match (address, hosted) {
                (Some(a), false) => {
                    Hosting::Address(a.parse::<HostPort>().context("invalid --address")?)
                }
                (None, true) => Hosting::Sdk,
                _ => anyhow::bail!("give exactly one of --address HOST:PORT or --hosted"),
            };
            let svc = Service {
                name: Name::new(name.as_str()).with_context(|| format!("invalid name {name:?}"))?,
                roles: names(&roles, "role")?.into_iter().collect(),
                hosting,
                intercepts: intercepts
                    .iter()
                    .map(|i| {
                        i.parse::<HostPort>()
                            .with_context(|| format!("invalid --intercept {i:?}"))
                    })
                    .collect::<anyhow::Result<_>>()?,
                proxy_protocol,
            };
            let s: Service = c.call(Method::POST, "/v1/services", Some(&svc)).await?;
            if json {
                return output::json(&s);
            }
            println!("created service {}", s.name);
            Ok(())
        }
        ServiceCmd::List => {
            let r: Vec<Service> = c.call(Method::GET, "/v1/services", none).await?;
            if json {
                return output::json(&r);
            }
            let rows = r
                .into_iter()
                .map(|s| {
                    let hosting = match &s.hosting {
                        Hosting::Address(a) => a.to_string(),
                        Hosting::Sdk => "hosted (sdk)".into(),
                    };
                    vec![
                        s.name.to_string(),
                        hosting,
                        output::list(&s.intercepts),
                        output::list(&s.roles),
                    ]
                })
                .collect();
            output::table(&["name", "address", "intercepts", "roles"], rows);
            Ok(())
        }
        ServiceCmd::Show { name } => {
            let s: Service = c
                .call(
                    Method::GET,
                    &format!("/v1/services/{}", path_seg(&name)?),
                    none,
                )
                .await?;
            output::json(&s)
        }
        ServiceCmd::Delete { name, cascade } => {
            let r: serde_json::Value = c
                .call(
                    Method::DELETE,
                    &format!("/v1/services/{}?cascade={cascade}", path_seg(&name)?),
                    none,
                )
                .await?;
            println!("deleted service {name}");
            print_deleted_policies(&r);
            Ok(())
        }
    }
}

async fn policy(c: &ControllerClient, json: bool, cmd: PolicyCmd) -> anyhow::Result<()> {
    let none: Option<&()> = None;
    match cmd {
        PolicyCmd::Grant {
            identities,
            services,
            bind,
            all_of,
            name,
            models,
            tokens,
            rpm,
            tools,
            resources,
            prompts,
            connections,
            rate,
            bandwidth,
        } => {
            let patterns = |flag: &str, v: Option<String>| {
                v.map(|m| {
                    m.parse::<umbra_policies::Patterns>()
                        .with_context(|| format!("--{flag} {m:?}"))
                })
                .transpose()
            };
            let req = GrantRequest {
                name: name
                    .map(|n| Name::new(n.as_str()).with_context(|| format!("invalid --name {n:?}")))
                    .transpose()?,
                action: if bind { Action::Bind } else { Action::Dial },
                identities: selectors(&identities)?,
                services: selectors(&services)?,
                semantic: if all_of {
                    Semantic::AllOf
                } else {
                    Semantic::AnyOf
                },
                limits: umbra_policies::GrantLimits {
                    models: patterns("models", models)?,
                    tokens: tokens
                        .map(|t| t.parse().with_context(|| format!("--tokens {t:?}")))
                        .transpose()?,
                    rpm,
                    tools: patterns("tools", tools)?,
                    resources: patterns("resources", resources)?,
                    prompts: patterns("prompts", prompts)?,
                    connections,
                    rate,
                    bandwidth,
                },
            };
            let p: umbra_policies::ServicePolicy =
                c.call(Method::POST, "/v1/policies", Some(&req)).await?;
            if json {
                return output::json(&p);
            }
            println!("{}", p.name);
            Ok(())
        }
        PolicyCmd::Revoke { name } => {
            let _: serde_json::Value = c
                .call(
                    Method::DELETE,
                    &format!("/v1/policies/{}", path_seg(&name)?),
                    none,
                )
                .await?;
            println!("revoked policy {name}");
            Ok(())
        }
        PolicyCmd::List => {
            let r: Vec<umbra_policies::ServicePolicy> =
                c.call(Method::GET, "/v1/policies", none).await?;
            if json {
                return output::json(&r);
            }
            let rows = r
                .into_iter()
                .map(|p| {
                    let sem = match p.semantic {
                        Semantic::AnyOf => "anyOf",
                        Semantic::AllOf => "allOf",
                    };
                    vec![
                        p.name.to_string(),
                        p.action.to_string(),
                        output::list(&p.identities),
                        output::list(&p.services),
                        sem.into(),
                        p.limits.to_string(),
                    ]
                })
                .collect();
            output::table(
                &[
                    "name",
                    "action",
                    "identities",
                    "services",
                    "semantic",
                    "limits",
                ],
                rows,
            );
            Ok(())
        }
        PolicyCmd::Explain {
            identity,
            service,
            bind,
        } => {
            let action = if bind { "bind" } else { "dial" };
            let r: ExplainResponse = c
                .call(
                    Method::GET,
                    &format!(
                        "/v1/explain?identity={}&service={}&action={action}",
                        path_seg(&identity)?,
                        path_seg(&service)?
                    ),
                    none,
                )
                .await?;
            if json {
                return output::json(&r);
            }
            println!(
                "{}: {}",
                if r.allowed { "allowed" } else { "denied" },
                r.reason
            );
            if !r.granting.is_empty() {
                println!("granted by: {}", output::list(&r.granting));
            }
            for (policy, limits) in &r.limits {
                println!("limits of {policy}: {limits}");
            }
            Ok(())
        }
    }
}

async fn router(c: &ControllerClient, json: bool, cmd: RouterCmd) -> anyhow::Result<()> {
    let none: Option<&()> = None;
    match cmd {
        RouterCmd::Create {
            name,
            token_ttl,
            output,
        } => {
            let body = json!({ "name": Name::new(name.as_str()).with_context(|| format!("invalid name {name:?}"))?, "token_ttl_secs": token_ttl.as_secs() });
            check_output(&output)?;
            let r: TokenResponse = c.call(Method::POST, "/v1/routers", Some(&body)).await?;
            emit_token(&r, &output, json)
        }
        RouterCmd::List => {
            let r: Vec<RouterView> = c.call(Method::GET, "/v1/routers", none).await?;
            if json {
                return output::json(&r);
            }
            let rows = r
                .into_iter()
                .map(|v| {
                    vec![
                        v.identity.name.to_string(),
                        v.advertise.unwrap_or_else(|| "-".into()),
                        if v.identity.revoked {
                            "revoked"
                        } else if v.enrolled {
                            "enrolled"
                        } else {
                            "pending"
                        }
                        .into(),
                        v.identity.id.to_string(),
                    ]
                })
                .collect();
            output::table(&["name", "advertise", "status", "id"], rows);
            Ok(())
        }
        RouterCmd::Enroll { .. } | RouterCmd::Run { .. } => unreachable!("handled in main"),
        RouterCmd::Delete { name } => {
            let _: serde_json::Value = c
                .call(
                    Method::DELETE,
                    &format!("/v1/routers/{}", path_seg(&name)?),
                    none,
                )
                .await?;
            println!("deleted router {name}");
            Ok(())
        }
    }
}
