//! `--metrics ADDR`: the Prometheus endpoint of whichever component this process runs (see
//! `umbra_metrics`).

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
