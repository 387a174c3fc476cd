//! The `umbra` binary: parses the command line and calls the crates. Errors become one line on
//! standard error and exit code 1; usage errors exit 2 (clap).

mod admin;
mod cli;
mod output;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use cli::{Cli, Command, ControllerCmd};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UMBRA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,umbra=info,umbra_controller=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
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
        Command::Controller(ControllerCmd::Init { dir, trust_domain, address }) => {
            let td: umbra_pki::TrustDomain = trust_domain.parse().context("invalid --trust-domain")?;
            address
                .parse::<umbra_policies::HostPort>()
                .context("invalid --address")?;
            let cfg = umbra_controller::ControllerConfig::new(&dir);
            let admin = umbra_controller::init(&cfg, &td, &address)?;
            println!("initialized {} (trust domain {td})", dir.display());
            println!("admin identity: {}", admin.display());
            println!("next: umbra controller run --dir {}", dir.display());
            Ok(())
        }
        Command::Controller(ControllerCmd::Run(args)) => run_controller(args).await,
        Command::Quickstart { dir, listen } => quickstart(dir, listen).await,
        Command::Enroll(args) => {
            let token = read_token(&args.token)?;
            let file = umbra_sdk::enroll(&token, cli.controller.as_deref()).await?;
            file.save(&args.output)?;
            println!("enrolled {} ({}) -> {}", file.name, file.spiffe(), args.output.display());
            Ok(())
        }
        command => admin::run(&cli.admin, cli.controller.as_deref(), cli.json, command).await,
    }
}

/// A token given inline or in a file.
fn read_token(arg: &str) -> anyhow::Result<String> {
    let path = std::path::Path::new(arg);
    if arg.len() < 4096 && path.is_file() {
        let meta = std::fs::metadata(path)?;
        anyhow::ensure!(meta.len() <= 16 * 1024, "{arg}: too large to be a token");
        return Ok(std::fs::read_to_string(path).with_context(|| format!("reading {arg}"))?.trim().to_owned());
    }
    Ok(arg.trim().to_owned())
}

/// Initializes `dir` on first use, then runs the controller there with the embedded defaults.
async fn quickstart(dir: std::path::PathBuf, listen: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let cfg = umbra_controller::ControllerConfig::new(&dir);
    if !dir.join(umbra_controller::files::DB).exists() {
        let td: umbra_pki::TrustDomain = "umbra.local".parse()?;
        umbra_controller::init(&cfg, &td, "127.0.0.1:1280")?;
        println!("initialized {} with a new CA and an admin identity", dir.display());
    }
    let admin = dir.join(umbra_controller::files::ADMIN);
    println!("next steps (in another shell, in this directory):");
    println!("  umbra identity create agent-1 --role analysts -o agent-1.jwt");
    println!("  umbra enroll agent-1.jwt -o agent-1.json");
    println!("  umbra service create echo --address 127.0.0.1:7 --intercept echo.umbra:7");
    println!("  umbra policy grant --identity '#analysts' --service '@echo'");
    println!("  umbra policy explain --identity agent-1 --service echo");
    println!("admin identity: {} (used by default from this directory)", admin.display());
    run_controller(cli::RunArgs { dir, listen, advertise: None, cert_validity: cfg.cert_validity }).await
}

async fn run_controller(args: cli::RunArgs) -> anyhow::Result<()> {
    let mut cfg = umbra_controller::ControllerConfig::new(&args.dir);
    cfg.cert_validity = args.cert_validity;
    let ctrl = std::sync::Arc::new(tokio::task::spawn_blocking(move || umbra_controller::Controller::open(cfg)).await??);
    let listen = match args.listen {
        Some(l) => l,
        None => ctrl.address().parse().context("the stored controller address is not IP:PORT; pass --listen")?,
    };
    let server = umbra_controller::Server::start(ctrl.clone(), listen, args.advertise).await?;
    // Keep the first admin's file pointing at where the controller really is.
    let admin_path = args.dir.join(umbra_controller::files::ADMIN);
    if let Ok(mut admin) = umbra_pki::IdentityFile::load(&admin_path) {
        let addr = ctrl.address();
        if admin.controller != addr {
            admin.controller = addr;
            admin.save(&admin_path)?;
        }
    }
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
