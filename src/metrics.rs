//! `--metrics ADDR`: the Prometheus endpoint of whichever component this process runs (see
//! `umbra_metrics`), and the sandbox's event counts for `umbra run`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use umbra_metrics::{MetricsServer, Registry, ServeOptions};

use crate::cli::MetricsArgs;

/// Starts the endpoint if `--metrics` was given: the registry to hand to the component, and
/// the server, which serves until dropped.
pub async fn start(args: &MetricsArgs) -> anyhow::Result<Option<(Registry, MetricsServer)>> {
    let Some(addr) = args.metrics else {
        return Ok(None);
    };
    let registry = Registry::new();
    let opts = ServeOptions {
        allow_non_loopback: args.metrics_non_loopback,
        ..ServeOptions::default()
    };
    let server = umbra_metrics::serve(addr, registry.clone(), opts).await?;
    eprintln!("metrics on http://{}/metrics", server.local_addr());
    Ok(Some((registry, server)))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// Counts the sandbox's events by kind (`dns_refused`, `dial_denied`, `limit`, ...: the
/// events' own fixed tags), as `umbra_sandbox_events_total`; returns the counter to call with
/// each event.
pub fn sandbox_events(registry: &Registry) -> impl Fn(&umbra_sandbox::events::Event) + Send + Sync {
    let family = Family::<KindLabel, Counter>::default();
    registry.register(
        "sandbox_events",
        "Sandbox events by kind: refused DNS names, denied dials, limits hit, timeouts, revocations.",
        family.clone(),
    );
    move |ev| {
        let kind = serde_json::to_value(&ev.kind)
            .ok()
            .and_then(|v| v.get("kind")?.as_str().map(str::to_owned))
            .unwrap_or_default();
        family.get_or_create(&KindLabel { kind }).inc();
    }
}
