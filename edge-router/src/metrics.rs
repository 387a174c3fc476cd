//! The router's Prometheus metrics (see `umbra_metrics`): what it decides, by outcome, reason
//! and service; bytes per service; how long handshakes, policy checks, compilations and
//! revocations take; and how closely it follows the controller.
//!
//! Revocation to cut runs from the arrival of the first change of the batch that cut a stream
//! (the controller's commit time, `Delta::at`, is whole seconds: too coarse to start from).
//!
//! Counters that need no label are read from the router's own atomics at each scrape
//! ([`RouterCollector`]); labelled ones are counted here. Labels are bounded: a service name
//! only when the service exists in the enforced policy (a peer dialing made-up names gets
//! `service=""`), reasons from the fixed set [`reason`] maps, never an identity (a router can
//! hold millions).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use umbra_metrics::{latency_histogram, Registry};
use umbra_policies::{Deny, Name};
use umbra_proto::ControlMessage;

use crate::policy::{Policy, PolicyRx};

/// The stable label value of each refusal reason: what dashboards and alerts match on, so
/// renaming a `Deny` variant must not change it.
pub fn reason(why: Deny) -> &'static str {
    match why {
        Deny::UnknownIdentity => "unknown_identity",
        Deny::IdentityDisabled => "identity_disabled",
        Deny::IdentityRevoked => "identity_revoked",
        Deny::IdentityExpired => "identity_expired",
        Deny::NotGranted => "not_granted",
        Deny::WrongKind => "wrong_kind",
        Deny::CertRevoked => "cert_revoked",
        Deny::CertExpired => "cert_expired",
        Deny::NoHosting => "no_hosting",
    }
}

/// Refusals that are not the judge's.
pub(crate) const NO_POLICY: &str = "no_policy";
/// A limit of the identity or of the router.
pub(crate) const LIMIT: &str = "limit";
/// The handshake failed or timed out, or TLS refused the certificate (unknown issuer, revoked
/// serial, expired): refused before any identity was admitted.
pub(crate) const HANDSHAKE: &str = "handshake";

/// A stream's kind.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Action {
    Dial,
    Bind,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    action: &'static str,
    outcome: &'static str,
    service: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabels {
    outcome: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    service: String,
    direction: &'static str,
}

/// Where the control channel stands, for the collector.
#[derive(Debug, Default)]
struct ControlState {
    /// The newest sequence number the controller announced (deltas, heartbeats, snapshots).
    announced: AtomicU64,
    /// When anything last arrived from the controller.
    contact: Mutex<Option<Instant>>,
    /// When the first change not yet published arrived.
    unpublished: Mutex<Option<Instant>>,
    /// When the changes of the last batch published began to arrive: the start of a
    /// revocation's way to the streams it cuts.
    published: Mutex<Option<Instant>>,
}

#[derive(Debug)]
struct Inner {
    streams: Family<StreamLabels, Counter>,
    connections: Family<ConnLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    handshake: Histogram,
    check: Histogram,
    cut: Histogram,
    compile: Histogram,
    control: ControlState,
}

/// The router's metric handles; every method is a branch when the router has no registry.
#[derive(Debug, Clone, Default)]
pub(crate) struct Metrics(Option<Arc<Inner>>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Metrics {
    /// Registers the router's families in `registry`.
    pub fn new(registry: Option<&Registry>) -> Metrics {
        let Some(r) = registry else {
            return Metrics(None);
        };
        let inner = Inner {
            streams: Family::default(),
            connections: Family::default(),
            bytes: Family::default(),
            handshake: latency_histogram(),
            check: latency_histogram(),
            cut: latency_histogram(),
            compile: latency_histogram(),
            control: ControlState::default(),
        };
        r.register("router_streams", "Streams by action, outcome (allowed, denied, terminated, limited, bad_request), service and refusal reason.", inner.streams.clone());
        r.register(
            "router_connections",
            "Connections by outcome (admitted, refused, terminated) and refusal reason.",
            inner.connections.clone(),
        );
        r.register("router_service_bytes", "Bytes carried, counted as they move, per service and direction (up: client to service).", inner.bytes.clone());
        r.register(
            "router_handshake_seconds",
            "QUIC handshake duration, admitted attempts.",
            inner.handshake.clone(),
        );
        r.register(
            "router_policy_check_seconds",
            "Time to decide a stream request (check_stream).",
            inner.check.clone(),
        );
        r.register("router_revocation_cut_seconds", "From the arrival of a batch of changes from the controller to a live stream it revokes being cut.", inner.cut.clone());
        r.register(
            "router_policy_compile_seconds",
            "Compiling a whole policy from a snapshot.",
            inner.compile.clone(),
        );
        Metrics(Some(Arc::new(inner)))
    }

    fn stream(
        &self,
        action: Option<Action>,
        outcome: &'static str,
        service: String,
        why: &'static str,
    ) {
        if let Some(m) = &self.0 {
            let action = match action {
                Some(Action::Dial) => "dial",
                Some(Action::Bind) => "bind",
                // Refused before the request said which.
                None => "",
            };
            let labels = StreamLabels {
                action,
                outcome,
                service,
                reason: why,
            };
            m.streams.get_or_create(&labels).inc();
        }
    }

    /// A stream allowed by policy.
    pub fn allowed(&self, action: Action, service: &Name) {
        self.stream(Some(action), "allowed", service.to_string(), "");
    }

    /// A stream refused by policy; the service is named only if `policy` has it.
    pub fn denied(&self, action: Action, service: &Name, policy: &Policy, why: Deny) {
        if self.0.is_some() {
            let known = policy.index.state().services.contains_key(service);
            let service = if known {
                service.to_string()
            } else {
                String::new()
            };
            self.stream(Some(action), "denied", service, reason(why));
        }
    }

    /// A dial the judge allowed, refused by its grant's `connections` or `rate`
    /// (`limit`, the limit's fixed name): the service exists, so it is named.
    pub fn grant_limited(&self, service: &Name, limit: &'static str) {
        self.stream(
            Some(Action::Dial),
            "grant_limited",
            service.to_string(),
            limit,
        );
    }

    /// A stream refused before the judge (a limit, a bad request, no policy).
    pub fn refused(&self, outcome: &'static str) {
        self.stream(None, outcome, String::new(), "");
    }

    /// A live stream cut because the policy no longer allows it: counted, and the time since
    /// the change that cut it arrived observed.
    pub fn cut(&self, action: Action, service: &Name, why: Deny) {
        if let Some(m) = &self.0 {
            self.stream(Some(action), "terminated", service.to_string(), reason(why));
            if let Some(at) = *lock(&m.control.published) {
                m.cut.observe(at.elapsed().as_secs_f64());
            }
        }
    }

    /// The tallies an allowed stream to `service` (which exists) counts its bytes with as they
    /// move: up (client to service), down.
    pub fn tallies(&self, service: &Name) -> (Tally, Tally) {
        let counter = |direction| {
            self.0.as_ref().map(|m| {
                let l = BytesLabels {
                    service: service.to_string(),
                    direction,
                };
                m.bytes.get_or_create(&l).clone()
            })
        };
        (Tally::new(counter("up")), Tally::new(counter("down")))
    }

    /// A connection decision: `outcome` admitted, refused or terminated.
    pub fn connection(&self, outcome: &'static str, why: &'static str) {
        if let Some(m) = &self.0 {
            let l = ConnLabels {
                outcome,
                reason: why,
            };
            m.connections.get_or_create(&l).inc();
        }
    }

    /// Runs the policy check `f`, timing it.
    pub fn check<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.0 {
            None => f(),
            Some(m) => {
                let started = Instant::now();
                let out = f();
                m.check.observe(started.elapsed().as_secs_f64());
                out
            }
        }
    }

    /// A handshake that began at `started` completed.
    pub fn handshake(&self, started: Instant) {
        if let Some(m) = &self.0 {
            m.handshake.observe(started.elapsed().as_secs_f64());
        }
    }

    /// A whole policy took `took` to compile.
    pub fn compiled(&self, took: std::time::Duration) {
        if let Some(m) = &self.0 {
            m.compile.observe(took.as_secs_f64());
        }
    }

    /// `msg` arrived from the controller at `now`.
    pub fn heard(&self, now: Instant, msg: &ControlMessage) {
        if let Some(m) = &self.0 {
            *lock(&m.control.contact) = Some(now);
            let seq = match msg {
                ControlMessage::Heartbeat { seq } | ControlMessage::SnapshotBegin { seq, .. } => {
                    Some(*seq)
                }
                ControlMessage::Delta(d) => {
                    lock(&m.control.unpublished).get_or_insert(now);
                    Some(d.seq)
                }
                _ => None,
            };
            if let Some(seq) = seq {
                m.control.announced.fetch_max(seq, Ordering::Relaxed);
            }
        }
    }

    /// The changes received since the last batch are about to be enforced.
    pub fn publishing(&self) {
        if let Some(m) = &self.0 {
            let since = lock(&m.control.unpublished).take();
            *lock(&m.control.published) = Some(since.unwrap_or_else(Instant::now));
        }
    }

    /// Registers the collector that reads the router's atomics and control state.
    pub fn collect(&self, registry: Option<&Registry>, shared: Arc<crate::server::Shared>) {
        if let (Some(r), Some(m)) = (registry, &self.0) {
            r.register_collector(RouterCollector {
                shared,
                metrics: Arc::clone(m),
            });
        }
    }
}

/// Reads, at each scrape, what the router already counts (handshakes, held resources) and the
/// control channel's state, so that nothing is counted twice.
struct RouterCollector {
    shared: Arc<crate::server::Shared>,
    metrics: Arc<Inner>,
}

impl std::fmt::Debug for RouterCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouterCollector")
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for RouterCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.shared;
        let stats = s.stats.snapshot();
        let held = s.books.total();
        counter(
            &mut e,
            "router_handshakes_retried",
            "Connection attempts answered with a stateless Retry.",
            stats.handshakes_retried,
        )?;
        counter(
            &mut e,
            "router_handshakes_refused",
            "Connection attempts refused before the handshake.",
            stats.handshakes_refused,
        )?;
        gauge(
            &mut e,
            "router_handshakes_in_flight",
            "Handshakes in progress now.",
            s.gate.in_flight() as f64,
        )?;
        gauge(
            &mut e,
            "router_held_connections",
            "Admitted connections open now.",
            held.connections as f64,
        )?;
        gauge(
            &mut e,
            "router_held_streams",
            "Streams open now.",
            held.streams as f64,
        )?;
        gauge(
            &mut e,
            "router_held_window_bytes",
            "Flow-control window bytes granted to connections now.",
            held.buffer_bytes as f64,
        )?;
        let enforced = enforced_seq(&s.policy);
        let c = &self.metrics.control;
        let announced = c.announced.load(Ordering::Relaxed);
        gauge(
            &mut e,
            "router_control_failing_closed",
            "1 while the router refuses everything for want of a fresh policy.",
            if enforced.is_none() { 1.0 } else { 0.0 },
        )?;
        let applied = enforced.unwrap_or(0);
        gauge(
            &mut e,
            "router_control_applied_seq",
            "Sequence number of the last change enforced.",
            applied as f64,
        )?;
        gauge(
            &mut e,
            "router_control_lag",
            "Changes the controller announced that are not enforced yet.",
            announced.saturating_sub(applied) as f64,
        )?;
        let silence = lock(&c.contact).map_or(f64::INFINITY, |t| t.elapsed().as_secs_f64());
        gauge(
            &mut e,
            "router_control_staleness_seconds",
            "Seconds since anything arrived from the controller (+Inf: never).",
            silence,
        )?;
        Ok(())
    }
}

fn enforced_seq(rx: &PolicyRx) -> Option<u64> {
    rx.borrow().as_ref().map(|p| p.seq)
}

/// One direction of a stream's bytes, counted as they move: into the service's counter (with a
/// registry), and into a total of its own for the stream's decision report, whichever way the
/// stream ends.
pub(crate) struct Tally {
    total: std::sync::atomic::AtomicU64,
    counter: Option<Counter>,
}

impl Tally {
    fn new(counter: Option<Counter>) -> Tally {
        Tally {
            total: std::sync::atomic::AtomicU64::new(0),
            counter,
        }
    }

    /// The bytes moved so far.
    pub fn total(&self) -> u64 {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl umbra_transport::splice::Meter for Tally {
    fn moved(&self, n: u64) {
        self.total
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if let Some(c) = &self.counter {
            c.inc_by(n);
        }
    }
}
