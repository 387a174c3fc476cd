//! The tunneler's Prometheus metrics (see `umbra_metrics`): listeners, connections by service
//! and outcome, and bytes per service. Service names come from the identity's own view, so
//! they are bounded by what it was granted; nothing names the identity (one tunneler serves
//! one).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::sync::watch;
use umbra_metrics::Registry;
use umbra_sdk::SdkError;

use crate::plan::Mapping;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabels {
    service: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    service: String,
    direction: &'static str,
}

#[derive(Debug, Default)]
struct Inner {
    connections: Family<ConnLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
}

/// The tunneler's metric handles; a branch and nothing more without a registry.
#[derive(Debug, Clone, Default)]
pub(crate) struct Metrics(Option<Arc<Inner>>);

/// The stable label of how a carried connection ended.
fn outcome(r: &Result<(u64, u64), SdkError>) -> &'static str {
    match r {
        Ok(_) => "carried",
        Err(SdkError::Denied { .. }) => "denied",
        Err(SdkError::Revoked) => "revoked",
        Err(SdkError::Unavailable(_)) => "unavailable",
        Err(_) => "failed",
    }
}

impl Metrics {
    /// Registers the tunneler's families, and a collector of its listeners, in `registry`.
    pub fn new(registry: Option<&Registry>, mappings: watch::Receiver<Vec<Mapping>>) -> Metrics {
        let Some(r) = registry else {
            return Metrics(None);
        };
        let inner = Inner::default();
        r.register("tunneler_connections", "Connections accepted on the listeners, by service and outcome (carried, denied, revoked, unavailable, failed).", inner.connections.clone());
        r.register("tunneler_service_bytes", "Bytes carried, counted as they move, per service and direction (up: agent to service).", inner.bytes.clone());
        r.register_collector(Listeners(mappings));
        Metrics(Some(Arc::new(inner)))
    }

    /// A connection to `service` ended so.
    pub fn carried(&self, service: &str, r: &Result<(u64, u64), SdkError>) {
        if let Some(m) = &self.0 {
            let l = ConnLabels {
                service: service.to_owned(),
                outcome: outcome(r),
            };
            m.connections.get_or_create(&l).inc();
        }
    }

    /// The meters a connection to `service` counts its bytes with as they move (up, down).
    pub fn meters(&self, service: &str) -> (ByteMeter, ByteMeter) {
        let counter = |direction| {
            self.0.as_ref().map(|m| {
                let l = BytesLabels {
                    service: service.to_owned(),
                    direction,
                };
                m.bytes.get_or_create(&l).clone()
            })
        };
        (ByteMeter(counter("up")), ByteMeter(counter("down")))
    }
}

/// One direction's bytes, counted as they move (nothing without a registry).
pub(crate) struct ByteMeter(Option<Counter>);

impl umbra_sdk::Meter for ByteMeter {
    fn moved(&self, n: u64) {
        if let Some(c) = &self.0 {
            c.inc_by(n);
        }
    }
}

/// Reads the listeners at each scrape.
#[derive(Debug)]
struct Listeners(watch::Receiver<Vec<Mapping>>);

impl Collector for Listeners {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let g = ConstGauge::new(self.0.borrow().len() as f64);
        g.encode(e.encode_descriptor(
            "tunneler_listeners",
            "Services listened for now.",
            None,
            g.metric_type(),
        )?)
    }
}
