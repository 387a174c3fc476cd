//! The `umbra` binary: parses the command line and calls the crates. Errors become one line on
//! standard error and exit code 1; usage errors exit 2 (clap).

mod admin;
mod cli;
mod demo;
mod follow;
mod metrics;
mod output;
mod sandbox_cmd;
mod tunnel_cmd;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use cli::{Cli, Command, ControllerCmd};

/// Every Umbra process allocates through mimalloc: under glibc's allocator a controller or router
/// kept the memory of a large apply or snapshot long after freeing it (RSS twice the live data
/// at 100,000 identities), because freed chunks stay in per-thread arenas; mimalloc returns
/// freed pages to the system.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // The sandbox's own processes: single-threaded, before any runtime or logging exists.
    match std::env::args_os()
        .nth(1)
        .as_deref()
        .and_then(|a| a.to_str())
    {
        Some("__sandbox-init") => return exit_code(umbra_sandbox::init::main()),
        Some("__escape-probe") => return exit_code(umbra_sandbox::probe::main()),
        _ => {}
    }
    let cli = Cli::parse();
    // Servers report what they do; one-shot commands and the demo speak only of problems.
    let default_filter = match cli.command {
        Command::Quickstart { .. }
        | Command::Controller(ControllerCmd::Run(_))
        | Command::Router(cli::RouterCmd::Run { .. }) => {
            "warn,umbra=info,umbra_controller=info,umbra_edge_router=info"
        }
        Command::Tunnel { .. } => "warn,umbra_tunneler=info",
        Command::Gateway(_) => "warn,umbra_gateway=info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("UMBRA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        cli::LogFormat::Json => logs.json().init(),
        // Escape codes only for a person at a terminal: in a file they break grep and shippers.
        cli::LogFormat::Text => logs
            .with_ansi(
                std::io::IsTerminal::is_terminal(&std::io::stderr())
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            )
            .init(),
    }
    // Servers hold a socket per peer: take the open-file limit the system allows (its hard
    // limit), as a service manager's default soft limit (often 1,024) is below the controller's
    // connection bound.
    if matches!(
        cli.command,
        Command::Quickstart { .. }
            | Command::Controller(ControllerCmd::Run(_))
            | Command::Router(cli::RouterCmd::Run { .. })
            | Command::Tunnel { .. }
            | Command::Gateway(_)
    ) {
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(n) => tracing::debug!(open_files = n, "open-file limit"),
            Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
        }
    }
    // The tunneler's data path wakes no other thread on one core: fewer scheduler wake-ups per
    // byte and a shorter queue for interactive streams under bulk load (see the data-plane bench).
    let runtime = if matches!(cli.command, Command::Tunnel { .. }) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // `run` and `verify` end with codes of their own (the agent's, or a documented one).
    if matches!(cli.command, Command::Run(_) | Command::Verify(_)) {
        let (admin, controller, json) = (cli.admin.clone(), cli.controller.clone(), cli.json);
        let r = runtime.block_on(async move {
            match cli.command {
                Command::Run(args) => sandbox_cmd::run(&admin, controller, args).await,
                Command::Verify(args) => sandbox_cmd::verify(&admin, controller, json, args).await,
                _ => Ok(0),
            }
        });
        // Whatever the agent left running was killed with its sandbox; do not wait for
        // blocking threads of the runtime.
        runtime.shutdown_timeout(std::time::Duration::from_millis(100));
        return match r {
            Ok(code) => exit_code(code),
            Err(e) => {
                eprintln!("umbra run: {}", one_line(&e));
                exit_code(umbra_sandbox::exit::SETUP)
            }
        };
    }
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// The error and its causes on one line, without repeating a cause the message already holds.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out.replace('\n', " ")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Controller(ControllerCmd::Init {
            dir,
            trust_domain,
            address,
            store,
        }) => {
            let td: umbra_pki::TrustDomain =
                trust_domain.parse().context("invalid --trust-domain")?;
            address
                .parse::<umbra_policies::HostPort>()
                .context("invalid --address")?;
            let mut cfg = umbra_controller::ControllerConfig::new(&dir);
            if let Some(s) = store {
                cfg.store = parse_store(&s)?;
            }
            let shared = cfg.store.is_shared().then(|| cfg.store.to_string());
            let admin = tokio::task::spawn_blocking(move || {
                umbra_controller::init(&cfg, &td, &address).map(|admin| (admin, td))
            })
            .await??;
            let (admin, td) = admin;
            println!("initialized {} (trust domain {td})", dir.display());
            println!("admin identity: {}", admin.display());
            match shared {
                Some(store) => {
                    println!("state kept in {store}");
                    println!(
                        "next: umbra controller run --dir {} --store URL",
                        dir.display()
                    );
                }
                None => println!("next: umbra controller run --dir {}", dir.display()),
            }
            Ok(())
        }
        Command::Controller(ControllerCmd::Run(args)) => run_controller(args).await,
        Command::Controller(ControllerCmd::Join { dir, from, store }) => {
            let mut cfg = umbra_controller::ControllerConfig::new(&dir);
            cfg.store = parse_store(&store)?;
            let shown = cfg.store.to_string();
            tokio::task::spawn_blocking(move || umbra_controller::join_dir(&cfg, &from)).await??;
            println!(
                "{} holds the key material of the controllers on {shown}",
                dir.display()
            );
            println!(
                "next: umbra controller run --dir {} --store URL",
                dir.display()
            );
            Ok(())
        }
        Command::Quickstart { dir, listen } => quickstart(dir, listen).await,
        Command::Demo => demo::run().await,
        Command::Enroll(args) => {
            let token = read_token(&args.token)?;
            // A one-time token: refuse a bad -o before spending it.
            umbra_pki::check_target(&args.output)?;
            let file = umbra_sdk::enroll(&token, cli.controller.as_deref()).await?;
            file.save(&args.output)?;
            println!(
                "enrolled {} ({}) -> {}",
                file.name,
                file.spiffe(),
                args.output.display()
            );
            Ok(())
        }
        Command::Router(cli::RouterCmd::Enroll { token, dir }) => {
            let token = read_token(&token)?;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join(ROUTER_FILE);
            // A one-time token: refuse an unwritable place before spending it.
            umbra_pki::check_target(&path)?;
            let file = umbra_sdk::enroll(&token, cli.controller.as_deref()).await?;
            anyhow::ensure!(
                file.kind == umbra_policies::IdentityKind::Router,
                "this token enrolls a {}, not a router",
                file.kind
            );
            file.save(&path)?;
            println!("enrolled router {} -> {}", file.name, path.display());
            Ok(())
        }
        Command::Router(cli::RouterCmd::Run {
            dir,
            listen,
            advertise,
            stale_after,
            lanes,
            busy_poll,
            metrics,
        }) => {
            let metrics = metrics::start(&metrics).await?;
            let identity = umbra_pki::IdentityFile::load(dir.join(ROUTER_FILE))?;
            let mut cfg = umbra_edge_router::RouterConfig::new(identity, listen);
            cfg.advertise = advertise;
            cfg.controller = cli.controller.clone();
            cfg.stale_after = stale_after;
            cfg.identity_path = Some(dir.join(ROUTER_FILE));
            if let Some(n) = lanes {
                cfg.limits.lanes = n.into();
            }
            cfg.limits.busy_poll = busy_poll;
            cfg.metrics = metrics.as_ref().map(|(r, _)| r.clone());
            let router = umbra_edge_router::Router::start(cfg).await?;
            println!("router listening on {} (udp)", router.local_addr());
            shutdown_signal().await;
            router.shutdown().await;
            Ok(())
        }
        Command::Tunnel {
            identity,
            hosts_file,
            lanes,
            busy_poll,
            netns,
            pid,
            allow_network,
            events,
            metrics,
        } => {
            let metrics = metrics::start(&metrics).await?;
            let target = match (netns, pid) {
                (Some(p), _) => Some(umbra_launcher::Target::NetNs(p)),
                (None, Some(pid)) => Some(umbra_launcher::Target::Pid(pid)),
                (None, None) => None,
            };
            if let Some(target) = target {
                let opts = tunnel_cmd::Attach {
                    identity,
                    target,
                    hosts_file,
                    allow_network,
                    events,
                    lanes: lanes.into(),
                    busy_poll,
                    metrics: metrics.as_ref().map(|(r, _)| r.clone()),
                };
                return tunnel_cmd::attach(opts, cli.controller).await;
            }
            if allow_network || events.is_some() {
                anyhow::bail!("--allow-network and --events go with --netns or --pid");
            }
            tunnel_cmd::plain(
                identity,
                hosts_file,
                (lanes.into(), busy_poll),
                cli.controller,
                metrics.as_ref().map(|(r, _)| r.clone()),
            )
            .await
        }
        Command::Gateway(cli::GatewayCmd::Llm {
            identity,
            config,
            metrics,
        }) => {
            let metrics = metrics::start(&metrics).await?;
            let registry = metrics.as_ref().map(|(r, _)| r.clone());
            gateway_llm(identity, config, cli.controller, registry).await
        }
        Command::Gateway(cli::GatewayCmd::Mcp {
            identity,
            config,
            metrics,
        }) => {
            let metrics = metrics::start(&metrics).await?;
            let registry = metrics.as_ref().map(|(r, _)| r.clone());
            gateway_mcp(identity, config, cli.controller, registry).await
        }
        command => admin::run(&cli.admin, cli.controller.as_deref(), cli.json, command).await,
    }
}

/// The router's identity file inside its directory.
const ROUTER_FILE: &str = "router.json";

/// Runs the LLM gateway until interrupted.
async fn gateway_llm(
    identity: std::path::PathBuf,
    config: std::path::PathBuf,
    controller: Option<String>,
    metrics: Option<umbra_metrics::Registry>,
) -> anyhow::Result<()> {
    let mut cfg = umbra_gateway::Config::load(&config)?;
    cfg.metrics = metrics;
    let file = umbra_pki::IdentityFile::load(&identity)
        .with_context(|| format!("identity {}", identity.display()))?;
    let ctx = umbra_sdk::Context::with_controller(file, controller.as_deref())?;
    ctx.set_identity_path(&identity);
    let service = cfg.service.clone();
    let models = cfg.models.len();
    let gateway = umbra_gateway::Gateway::start(ctx, cfg).await?;
    println!("llm gateway hosting service {service} ({models} models); no listening port");
    shutdown_signal().await;
    drop(gateway);
    Ok(())
}

/// Runs the MCP gateway until interrupted.
async fn gateway_mcp(
    identity: std::path::PathBuf,
    config: std::path::PathBuf,
    controller: Option<String>,
    metrics: Option<umbra_metrics::Registry>,
) -> anyhow::Result<()> {
    let mut cfg = umbra_gateway::mcp::McpConfig::load(&config)?;
    cfg.metrics = metrics;
    let file = umbra_pki::IdentityFile::load(&identity)
        .with_context(|| format!("identity {}", identity.display()))?;
    let ctx = umbra_sdk::Context::with_controller(file, controller.as_deref())?;
    ctx.set_identity_path(&identity);
    let service = cfg.service.clone();
    let servers = cfg.servers.len();
    let gateway = umbra_gateway::mcp::McpGateway::start(ctx, cfg).await?;
    println!(
        "mcp gateway hosting service {service} ({servers} upstream servers); no listening port"
    );
    shutdown_signal().await;
    drop(gateway);
    Ok(())
}

/// A token given inline or in a file.
fn read_token(arg: &str) -> anyhow::Result<String> {
    let path = std::path::Path::new(arg);
    if arg.len() < 4096 && path.is_file() {
        let meta = std::fs::metadata(path)?;
        anyhow::ensure!(meta.len() <= 16 * 1024, "{arg}: too large to be a token");
        return Ok(std::fs::read_to_string(path)
            .with_context(|| format!("reading {arg}"))?
            .trim()
            .to_owned());
    }
    Ok(arg.trim().to_owned())
}

/// Initializes `dir` on first use, then runs a controller and one edge router in this process
/// on loopback with the embedded defaults.
async fn quickstart(
    dir: std::path::PathBuf,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let cfg = umbra_controller::ControllerConfig::new(&dir);
    if !dir.join(umbra_controller::files::DB).exists() {
        let td: umbra_pki::TrustDomain = "umbra.local".parse()?;
        umbra_controller::init(&cfg, &td, "127.0.0.1:1280")?;
        println!(
            "initialized {} with a new CA and an admin identity",
            dir.display()
        );
    }
    let args = cli::RunArgs {
        dir: dir.clone(),
        listen,
        advertise: None,
        store: None,
        cert_validity: cfg.cert_validity,
        audit_retention: cfg.audit.retention.unwrap_or_default(),
        audit_max_agent_rows: cfg.audit.max_agent_rows,
        max_connections: cfg.connections.total,
        max_agent_connections: cfg.connections.agents,
        metrics: cli::MetricsArgs {
            metrics: None,
            metrics_non_loopback: false,
        },
        sinks: None,
    };
    let (ctrl, server) = start_controller(&args, None).await?;

    // One router, enrolled on first use like any other.
    let router_path = dir.join(ROUTER_FILE);
    if !router_path.exists() {
        let c = ctrl.clone();
        let tok = tokio::task::spawn_blocking(move || {
            let name = umbra_policies::Name::new("router-1").map_err(anyhow::Error::from)?;
            c.create_router(&umbra_controller::Actor::controller(), name, None)
                .map_err(anyhow::Error::from)
        })
        .await??;
        umbra_sdk::enroll(&tok.token, Some(&ctrl.address()))
            .await?
            .save(&router_path)?;
    }
    let mut identity = umbra_pki::IdentityFile::load(&router_path)?;
    identity.controller = ctrl.address();
    let router_listen = match listen {
        Some(l) => std::net::SocketAddr::new(l.ip(), 0),
        None => "127.0.0.1:3022".parse()?,
    };
    let mut router_cfg = umbra_edge_router::RouterConfig::new(identity, router_listen);
    router_cfg.identity_path = Some(router_path.clone());
    let router = umbra_edge_router::Router::start(router_cfg).await?;

    let admin = dir.join(umbra_controller::files::ADMIN);
    println!(
        "admin identity: {} (used by default from this directory)",
        admin.display()
    );
    println!("next steps, in another shell in this directory:");
    println!("  umbra identity create agent-1 --role analysts -o agent-1.jwt");
    println!("  umbra enroll agent-1.jwt -o agent-1.json");
    println!("  umbra service create echo --address 127.0.0.1:7007 --intercept 127.0.0.1:17007");
    println!("  umbra policy grant --identity '#analysts' --service '@echo'");
    println!("  umbra tunnel --identity agent-1.json    # then connect to 127.0.0.1:17007");
    println!("router listening on {} (udp)", router.local_addr());
    println!("controller listening on {}", server.local_addr());
    shutdown_signal().await;
    eprintln!("shutting down");
    router.shutdown().await;
    server.shutdown().await;
    Ok(())
}

/// Opens the directory and starts serving; keeps the first admin's file pointing at where the
/// controller really is.
async fn start_controller(
    args: &cli::RunArgs,
    metrics: Option<umbra_metrics::Registry>,
) -> anyhow::Result<(
    std::sync::Arc<umbra_controller::Controller>,
    umbra_controller::Server,
)> {
    let mut cfg = umbra_controller::ControllerConfig::new(&args.dir);
    if let Some(s) = &args.store {
        cfg.store = parse_store(s)?;
    }
    cfg.cert_validity = args.cert_validity;
    cfg.metrics = metrics;
    cfg.audit.retention = (!args.audit_retention.is_zero()).then_some(args.audit_retention);
    cfg.audit.max_agent_rows = args.audit_max_agent_rows;
    if args.max_agent_connections >= args.max_connections {
        anyhow::bail!(
            "--max-agent-connections ({}) must be below --max-connections ({}): the rest is kept for admins and routers",
            args.max_agent_connections,
            args.max_connections
        );
    }
    cfg.connections.total = args.max_connections;
    cfg.connections.agents = args.max_agent_connections;
    if let Some(path) = &args.sinks {
        cfg.sinks = umbra_controller::sinks::config::load(path, |k| std::env::var(k).ok())
            .with_context(|| format!("--sinks {}", path.display()))?;
    }
    let ctrl = std::sync::Arc::new(
        tokio::task::spawn_blocking(move || umbra_controller::Controller::open(cfg)).await??,
    );
    let listen = match args.listen {
        Some(l) => l,
        // After `--advertise a,b` the stored address is a list: which one is this controller's
        // is for the operator to say.
        None => ctrl.address().parse().with_context(|| {
            format!(
                "the stored controller address {:?} is not one IP:PORT; pass --listen",
                ctrl.address()
            )
        })?,
    };
    let server =
        umbra_controller::Server::start(ctrl.clone(), listen, args.advertise.clone()).await?;
    let admin_path = args.dir.join(umbra_controller::files::ADMIN);
    if let Ok(mut admin) = umbra_pki::IdentityFile::load(&admin_path) {
        let addr = ctrl.address();
        if admin.controller != addr {
            admin.controller = addr;
            admin.save(&admin_path)?;
        }
    }
    Ok((ctrl, server))
}

/// A `--store` value; errors never repeat a password.
fn parse_store(s: &str) -> anyhow::Result<umbra_controller::StoreConfig> {
    s.parse()
        .map_err(|e| anyhow::anyhow!("invalid --store: {e}"))
}

async fn run_controller(args: cli::RunArgs) -> anyhow::Result<()> {
    let metrics = metrics::start(&args.metrics).await?;
    let registry = metrics.as_ref().map(|(r, _)| r.clone());
    let (_ctrl, server) = start_controller(&args, registry).await?;
    println!("controller listening on {}", server.local_addr());
    shutdown_signal().await;
    eprintln!("shutting down");
    server.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
