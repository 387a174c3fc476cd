//! Umbra's metrics: a registry every component registers its own metric families into, the
//! `/metrics` endpoint Prometheus scrapes (the OpenMetrics text exposition format, written by
//! the Prometheus org's `prometheus-client`, never by hand), and the helpers the components
//! share (latency buckets).
//!
//! Nothing here knows what a router or a gateway counts: each component defines its families
//! in its own `metrics` module. A component given no registry pays nothing but a branch.
//!
//! The exposition names services, models, tools and, where their number is bounded, identities:
//! it is operational data for the operator, not for agents. The endpoint therefore binds to a
//! loopback address unless the operator explicitly allows another (see [`ServeOptions`]), and
//! it must never hold more than a few connections, nor wait long for any of them.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod server;

use std::sync::{Arc, Mutex, PoisonError};

pub use prometheus_client;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Metric;
pub use server::{serve, MetricsServer, ServeError, ServeOptions};

/// What every metric name starts with.
pub const PREFIX: &str = "umbra";

/// A shared registry of metric families: cheap to clone into each component's configuration,
/// locked only while a family is registered and while a scrape encodes (never across an
/// `.await`), so the counting sites never touch the lock: they hold their own handles.
#[derive(Clone)]
pub struct Registry(Arc<Mutex<prometheus_client::registry::Registry>>);

impl Default for Registry {
    fn default() -> Self {
        Registry(Arc::new(Mutex::new(
            prometheus_client::registry::Registry::with_prefix(PREFIX),
        )))
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry(..)")
    }
}

impl Registry {
    /// An empty registry whose names all start with `umbra_`.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut prometheus_client::registry::Registry) -> R) -> R {
        // A panic while registering leaves the registry usable: it holds whole entries only.
        let mut r = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut r)
    }

    /// Registers a metric (a counter, gauge, histogram, or a family of one of them) under
    /// `umbra_<name>`; counters gain the `_total` suffix in the exposition. A family is
    /// declared (`# HELP`, `# TYPE`) even before its first sample, so that a dashboard or an
    /// alert can tell "none yet" from "not exposed".
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.with(|r| r.register(name, help, Declared(metric)));
    }

    /// Registers a collector, asked for its metrics at each scrape: for values that already
    /// live somewhere (a component's atomic counters), read rather than counted twice.
    pub fn register_collector(&self, collector: impl Collector) {
        self.with(|r| r.register_collector(Box::new(collector)));
    }

    /// The exposition of everything registered, ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        self.with(|r| {
            // Writing to a String cannot fail; a collector that fails ends the text early,
            // which a scraper sees as a malformed exposition rather than wrong numbers.
            if let Err(e) = prometheus_client::encoding::text::encode(&mut out, r) {
                tracing::warn!(error = %e, "encoding the metrics failed");
            }
        });
        out
    }
}

/// A metric always declared, samples or not (`prometheus-client` leaves an empty family out).
#[derive(Debug)]
struct Declared<M>(M);

impl<M: EncodeMetric> EncodeMetric for Declared<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
}

/// Histogram buckets for latencies, in seconds: 50 µs to about 26 s, doubling. Covers a
/// policy check (microseconds), a handshake (milliseconds) and a revocation reaching a live
/// stream or an upstream model answering (up to seconds).
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 20)
}

/// A histogram with [`latency_buckets`].
pub fn latency_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(latency_buckets())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn encodes_prefixed_names_and_eof() {
        let r = Registry::new();
        let c = Counter::<u64>::default();
        r.register("things", "Things seen.", c.clone());
        c.inc_by(3);
        let text = r.encode();
        assert!(text.contains("umbra_things_total 3"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn an_empty_family_is_declared() {
        use prometheus_client::metrics::family::Family;
        let r = Registry::new();
        r.register(
            "empty",
            "None yet.",
            Family::<Vec<(String, String)>, Counter>::default(),
        );
        let text = r.encode();
        assert!(text.contains("# TYPE umbra_empty counter"), "{text}");
    }

    #[test]
    fn latency_buckets_span_microseconds_to_seconds() {
        let b: Vec<f64> = latency_buckets().collect();
        assert!(b[0] <= 0.0001);
        assert!(*b.last().unwrap_or(&0.0) >= 10.0);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }
}
