//! The controller's Prometheus metrics (see `umbra_metrics`): API requests by route and status,
//! commits and their latency, reported audit events accepted and suppressed, authenticated
//! connections refused by budget, and, read at each scrape, the control channels and watches
//! open and whether a controller on a shared store is in touch with it.
//!
//! Labels are bounded: the route is the matched pattern (`/v1/identities/{name}`), never the
//! path a client sent, and no label names an identity.

use std::sync::{Arc, Weak};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use umbra_metrics::Registry;

use crate::Controller;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug)]
struct Inner {
    requests: Family<RequestLabels, Counter>,
    commits: Family<OutcomeLabels, Counter>,
    commit: Histogram,
    audit: Family<OutcomeLabels, Counter>,
    refused: Family<OutcomeLabels, Counter>,
}

/// The controller's metric handles; a branch and nothing more without a registry.
#[derive(Debug, Clone, Default)]
pub struct Metrics(Option<Arc<Inner>>);

impl Metrics {
    /// Registers the controller's families in `registry`.
    pub fn new(registry: Option<&Registry>) -> Metrics {
        let Some(r) = registry else {
            return Metrics(None);
        };
        let inner = Inner {
            requests: Family::default(),
            commits: Family::default(),
            commit: umbra_metrics::latency_histogram(),
            audit: Family::default(),
            refused: Family::default(),
        };
        r.register(
            "controller_requests",
            "API requests by matched route, method and status.",
            inner.requests.clone(),
        );
        r.register(
            "controller_commits",
            "Writes by outcome (committed, refused: the core's rules, failed: the store).",
            inner.commits.clone(),
        );
        r.register(
            "controller_commit_seconds",
            "Time to validate, store and publish a committed write.",
            inner.commit.clone(),
        );
        r.register(
            "controller_audit_events",
            "Events reported by identities, by outcome (accepted, suppressed over the limits).",
            inner.audit.clone(),
        );
        r.register(
            "controller_connections_refused",
            "Authenticated connections refused by budget (identity, agents, total).",
            inner.refused.clone(),
        );
        Metrics(Some(Arc::new(inner)))
    }

    /// A commit that began at `started` ended: `Ok` committed, `Err(true)` refused by the
    /// rules, `Err(false)` failed in the store.
    pub(crate) fn commit(&self, started: Instant, outcome: Result<(), bool>) {
        if let Some(m) = &self.0 {
            let outcome = match outcome {
                Ok(()) => {
                    m.commit.observe(started.elapsed().as_secs_f64());
                    "committed"
                }
                Err(true) => "refused",
                Err(false) => "failed",
            };
            m.commits.get_or_create(&OutcomeLabels { outcome }).inc();
        }
    }

    /// A report's events: so many accepted, so many suppressed.
    pub(crate) fn audit(&self, accepted: usize, suppressed: usize) {
        if let Some(m) = &self.0 {
            for (outcome, n) in [("accepted", accepted), ("suppressed", suppressed)] {
                m.audit
                    .get_or_create(&OutcomeLabels { outcome })
                    .inc_by(n as u64);
            }
        }
    }

    /// An authenticated connection refused for its budget.
    pub(crate) fn refused(&self, why: &crate::sessions::AuthRefusal) {
        if let Some(m) = &self.0 {
            let outcome = match why {
                crate::sessions::AuthRefusal::Identity => "identity",
                crate::sessions::AuthRefusal::Agents => "agents",
                crate::sessions::AuthRefusal::Total => "total",
            };
            m.refused.get_or_create(&OutcomeLabels { outcome }).inc();
        }
    }

    /// Counts every request `app` routes, by its matched route; a path no route matches is
    /// not counted (a client could make up any number of them).
    pub(crate) fn layer(&self, app: axum::Router) -> axum::Router {
        match &self.0 {
            None => app,
            Some(m) => {
                let m = Arc::clone(m);
                app.route_layer(axum::middleware::from_fn(
                    move |req: Request, next: Next| {
                        let m = Arc::clone(&m);
                        async move { count(&m, req, next).await }
                    },
                ))
            }
        }
    }
}

/// The method as a label: the methods HTTP defines by name, any other `other`. A client may
/// send any token as a method, and each would otherwise be a new time series.
fn method_label(m: &http::Method) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
    ];
    (KNOWN.iter().copied())
        .find(|k| *k == m.as_str())
        .unwrap_or("other")
}

async fn count(m: &Inner, req: Request, next: Next) -> Response {
    let route =
        (req.extensions().get::<MatchedPath>()).map_or_else(String::new, |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let resp = next.run(req).await;
    let labels = RequestLabels {
        route,
        method,
        status: resp.status().as_u16(),
    };
    m.requests.get_or_create(&labels).inc();
    resp
}

/// Registers the collector that reads the controller's state at each scrape. It holds the
/// controller weakly: the registry lives in the controller's configuration.
pub(crate) fn collect(registry: Option<&Registry>, ctrl: &Arc<Controller>) {
    if let Some(r) = registry {
        r.register_collector(ControllerCollector(Arc::downgrade(ctrl)));
    }
}

struct ControllerCollector(Weak<Controller>);

impl std::fmt::Debug for ControllerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControllerCollector")
    }
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for ControllerCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let Some(ctrl) = self.0.upgrade() else {
            return Ok(());
        };
        let w = ctrl.watch_stats();
        gauge(
            &mut e,
            "controller_streams_open",
            "Long-lived streams open (control channels and edge-view watches).",
            ctrl.streams_open() as f64,
        )?;
        gauge(
            &mut e,
            "controller_watchers",
            "Edge-view watches open.",
            w.watchers as f64,
        )?;
        counter(
            &mut e,
            "controller_watch_diffs_sent",
            "Edge-view diffs sent to watchers.",
            w.diffs_sent,
        )?;
        counter(
            &mut e,
            "controller_snapshots_served",
            "Control channels opened with a whole snapshot rather than resumed.",
            ctrl.snapshots_served(),
        )?;
        gauge(
            &mut e,
            "controller_store_shared",
            "1 if other controllers share this one's store.",
            f64::from(u8::from(ctrl.is_shared())),
        )?;
        gauge(
            &mut e,
            "controller_store_in_touch",
            "1 while this controller may vouch for its state (always with a store of its own).",
            f64::from(u8::from(ctrl.in_touch())),
        )?;
        Ok(())
    }
}
