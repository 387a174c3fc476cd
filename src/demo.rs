//! `umbra demo`: plays the whole story on the embedded defaults, in a scratch directory, and
//! prints each step with what was observed. Everything is real: a controller with a fresh CA, an
//! edge router on QUIC, an enrolled agent, a TCP echo service, all on loopback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_controller::{Actor, Controller, ControllerConfig, Server};
use umbra_policies::{Action, Hosting, IdentityKind, Name, Selector, Semantic, Service};
use umbra_proto::api::{CreateIdentityRequest, GrantRequest};
use umbra_sdk::{Context, SdkError};

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn ok(text: impl std::fmt::Display) {
    println!("    ok: {text}");
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// A TCP echo server on an ephemeral loopback port.
async fn echo_server() -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = sock.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

pub async fn run() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let dir = scratch.path().join("controller");

    step(
        1,
        "initialize a controller: root and intermediate CA, token key, store, admin",
    );
    let cfg = ControllerConfig::new(&dir);
    let td: umbra_pki::TrustDomain = "demo.umbra".parse()?;
    let c = cfg.clone();
    blocking(move || Ok(umbra_controller::init(&c, &td, "127.0.0.1:1")?)).await?;
    let ctrl = Arc::new(blocking(move || Ok(Controller::open(cfg)?)).await?);
    let server = Server::start(ctrl.clone(), "127.0.0.1:0".parse()?, None).await?;
    ok(format!(
        "controller on {} (trust domain demo.umbra)",
        server.local_addr()
    ));
    let admin = Actor::controller();

    step(2, "enroll an edge router and start it (QUIC, mutual TLS)");
    let c = ctrl.clone();
    let a = admin.clone();
    let tok = blocking(move || Ok(c.create_router(&a, Name::new("router-1")?, None)?)).await?;
    let router_id = umbra_sdk::enroll(&tok.token, None).await?;
    let router = umbra_edge_router::Router::start(umbra_edge_router::RouterConfig::new(
        router_id,
        "127.0.0.1:0".parse()?,
    ))
    .await?;
    tokio::time::timeout(Duration::from_secs(10), router.ready())
        .await
        .context("the router did not synchronize")?;
    ok(format!(
        "router on {} (udp), following the controller's policy",
        router.local_addr()
    ));

    step(
        3,
        "start an echo service and register it twice: `echo` and `vault`",
    );
    let echo = echo_server().await?;
    for name in ["echo", "vault"] {
        let svc = Service {
            name: Name::new(name)?,
            roles: Default::default(),
            hosting: Hosting::Address(echo.to_string().parse()?),
            intercepts: vec![format!("{name}.umbra:7").parse()?],
            proxy_protocol: false,
        };
        let (c, a) = (ctrl.clone(), admin.clone());
        blocking(move || Ok(c.create_service(&a, svc)?)).await?;
    }
    ok(format!(
        "both point at {echo}; nothing can reach either yet"
    ));

    step(
        4,
        "create agent-1 and enroll it: the key is made here, only a CSR is sent",
    );
    let (c, a) = (ctrl.clone(), admin.clone());
    let tok = blocking(move || {
        Ok(c.create_identity(
            &a,
            CreateIdentityRequest {
                name: Name::new("agent-1")?,
                kind: IdentityKind::Agent,
                roles: vec![],
                token_ttl_secs: None,
            },
        )?)
    })
    .await?;
    let agent = umbra_sdk::enroll(&tok.token, None).await?;
    ok(format!("agent-1 is {}", agent.spiffe()));
    let ctx = Context::new(agent)?;

    step(
        5,
        "grant agent-1 dial on echo, and dial it through the router",
    );
    let (c, a) = (ctrl.clone(), admin.clone());
    let policy = blocking(move || {
        Ok(c.grant(
            &a,
            GrantRequest {
                name: None,
                action: Action::Dial,
                identities: vec!["@agent-1".parse::<Selector>()?],
                services: vec!["@echo".parse::<Selector>()?],
                semantic: Semantic::AnyOf,
                limits: umbra_policies::GrantLimits::default(),
            },
        )?)
    })
    .await?;
    let mut stream = dial_when_ready(&ctx, "echo").await?;
    stream.write_all(b"hello, overlay").await?;
    let mut buf = [0u8; 14];
    stream.read_exact(&mut buf).await?;
    if &buf != b"hello, overlay" {
        bail!("the echo came back wrong");
    }
    ok(format!(
        "policy {} grants it; the service echoed {:?}",
        policy.name,
        String::from_utf8_lossy(&buf)
    ));

    step(
        6,
        "dial vault (exists, not granted) and nosuch (does not exist)",
    );
    let vault = ctx
        .dial("vault")
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    let nosuch = ctx
        .dial("nosuch")
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    if vault.is_empty() || vault.replace("vault", "X") != nosuch.replace("nosuch", "X") {
        bail!("expected the same refusal for both, got {vault:?} and {nosuch:?}");
    }
    ok(format!("both refused identically: {vault}"));

    step(7, "revoke agent-1 while its connection is open");
    stream.write_all(b"still here?").await?;
    let mut buf = [0u8; 11];
    stream.read_exact(&mut buf).await?;
    let started = Instant::now();
    let c = ctrl.clone();
    blocking(move || Ok(c.revoke_identity(&Actor::controller(), "agent-1")?)).await?;
    let mut sink = [0u8; 64];
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) => return "closed".to_owned(),
                Ok(_) => continue,
                Err(e) => return SdkError::from_io(e).to_string(),
            }
        }
    })
    .await
    .context("the live connection was not cut")?;
    ok(format!(
        "the live connection ended {:.1} ms after the revoke was committed: {outcome}",
        started.elapsed().as_secs_f64() * 1e3
    ));
    match ctx.dial("echo").await {
        Ok(_) => bail!("a revoked identity could still dial"),
        Err(e) => ok(format!("a new dial is refused: {e}")),
    }

    println!("\ndemo complete");
    router.shutdown().await;
    server.shutdown().await;
    Ok(())
}

/// The router learns of a grant from the control channel a moment after the controller commits
/// it; retry briefly (bounded) until it has.
async fn dial_when_ready(ctx: &Context, service: &str) -> anyhow::Result<umbra_sdk::Stream> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match ctx.dial(service).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "dial not yet allowed; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
