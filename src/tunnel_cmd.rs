//! `umbra tunnel`: on the host's loopback, or with `--netns PATH | --pid PID` in an existing
//! network namespace (argument handling and printing around [`umbra_launcher::attach()`]).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use umbra_launcher::{attach::Detached, AttachOptions, Target};
use umbra_sandbox::events::EventSink;
use umbra_tunneler::Mapping;

/// What `umbra tunnel` was given, for an existing namespace.
pub struct Attach {
    pub identity: PathBuf,
    pub target: Target,
    pub hosts_file: Option<PathBuf>,
    pub allow_network: bool,
    pub events: Option<PathBuf>,
    pub lanes: usize,
    pub busy_poll: Duration,
    pub metrics: Option<umbra_metrics::Registry>,
}

/// Serves the namespace until it is gone (exit 0), we are interrupted (exit 0) or the identity
/// is revoked (an error).
pub async fn attach(a: Attach, controller: Option<String>) -> anyhow::Result<()> {
    let file = umbra_pki::IdentityFile::load(&a.identity)?;
    let ctx = umbra_sdk::Context::with_controller(file.clone(), controller.as_deref())?;
    ctx.set_identity_path(&a.identity);
    let (to_controller, upload) = umbra_launcher::report::to_controller(ctx.controller());
    let forward = umbra_launcher::metrics::counting(a.metrics.as_ref(), to_controller);
    let events = EventSink::new(
        &a.target.event_id(),
        file.name.as_str(),
        a.events.as_deref(),
    )
    .with_context(|| format!("opening the events file {:?}", a.events))?
    .forward(forward);
    let opts = AttachOptions {
        target: a.target,
        allow_network: a.allow_network,
        hosts_file: a.hosts_file,
        events,
        tunnel: umbra_tunneler::TunnelerConfig {
            controller,
            lanes: a.lanes,
            busy_poll: a.busy_poll,
            metrics: a.metrics,
            ..Default::default()
        },
    };
    let attached = umbra_launcher::attach(ctx, opts).await?;
    let printer = async {
        print_changes(attached.mappings(), true).await;
        std::future::pending().await
    };
    let ended = tokio::select! {
        d = attached.wait() => d,
        () = printer => Detached::Interrupted,
    };
    let code = match ended {
        Detached::Revoked => umbra_sandbox::exit::REVOKED,
        _ => 0,
    };
    attached.stop(code).await;
    upload.finish(Duration::from_secs(3)).await;
    match ended {
        Detached::Gone => {
            println!("the namespace is gone");
            Ok(())
        }
        Detached::Interrupted => Ok(()),
        Detached::Revoked => anyhow::bail!("the identity was revoked"),
    }
}

/// Runs a tunneler for an identity until interrupted, printing its listeners as they change.
pub async fn plain(
    identity: std::path::PathBuf,
    hosts_file: Option<std::path::PathBuf>,
    (lanes, busy_poll): (usize, std::time::Duration),
    controller: Option<String>,
    metrics: Option<umbra_metrics::Registry>,
) -> anyhow::Result<()> {
    let file = umbra_pki::IdentityFile::load(&identity)?;
    let ctx = umbra_sdk::Context::with_controller(file, controller.as_deref())?;
    ctx.set_identity_path(&identity);
    let cfg = umbra_tunneler::TunnelerConfig {
        controller,
        hosts_file,
        lanes,
        busy_poll,
        metrics,
        ..Default::default()
    };
    let tunneler = umbra_tunneler::Tunneler::start(ctx, cfg).await?;
    let printer = print_changes(tunneler.mappings(), false);
    tokio::select! {
        _ = printer => {}
        _ = crate::shutdown_signal() => {}
    }
    tunneler.shutdown().await;
    Ok(())
}

/// Prints the services as they change: the whole list first (at once when `known`, the first
/// view being in; else when it arrives), then only what changed, since an agent with thousands
/// of services would otherwise see them all on every grant. Returns when the tunneler stops.
async fn print_changes(mut mappings: watch::Receiver<Vec<Mapping>>, known: bool) {
    if !known && mappings.changed().await.is_err() {
        return;
    }
    let mut shown = BTreeSet::new();
    let mut first = true;
    loop {
        let now: BTreeSet<_> = mappings.borrow_and_update().iter().cloned().collect();
        if now != shown || std::mem::take(&mut first) {
            println!("services: {}", now.len());
            for m in shown.difference(&now) {
                println!("  - {} -> {} ({})", m.intercept, m.listen, m.service);
            }
            for m in now.difference(&shown) {
                println!("  + {} -> {} ({})", m.intercept, m.listen, m.service);
            }
            shown = now;
        }
        if mappings.changed().await.is_err() {
            return;
        }
    }
}
