//! `umbra tunnel --netns PATH | --pid PID`: argument handling and printing around
//! [`umbra_launcher::attach()`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use umbra_launcher::{attach::Detached, AttachOptions, Target};
use umbra_sandbox::events::EventSink;

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
    let counted = a
        .metrics
        .as_ref()
        .map(umbra_launcher::metrics::sandbox_events);
    let forward = move |ev: &umbra_sandbox::events::Event| {
        if let Some(count) = &counted {
            count(ev);
        }
        to_controller(ev);
    };
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
    let mut mappings = attached.mappings();
    let printer = async {
        let mut shown = std::collections::BTreeSet::new();
        let mut first = true;
        loop {
            let now: std::collections::BTreeSet<_> =
                mappings.borrow_and_update().iter().cloned().collect();
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
                return std::future::pending().await;
            }
        }
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
