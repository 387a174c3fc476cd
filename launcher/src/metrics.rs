//! The sandbox's Prometheus metrics (see `umbra_metrics`): its events by kind, so that a
//! refused DNS name or dial inside a sandbox can be graphed and alerted on. The kind is the
//! event's own fixed tag (`dns_refused`, `dial_denied`, `limit`, ...), never what the agent
//! asked for.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use umbra_metrics::Registry;
use umbra_sandbox::events::Event;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// Registers `umbra_sandbox_events_total{kind}` in `registry`; returns the function to call
/// with each event (beside the sink's other forwarding).
pub fn sandbox_events(registry: &Registry) -> impl Fn(&Event) + Send + Sync + 'static {
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

/// `forward`, counting each event by kind first when there is a registry: what `umbra run` and
/// `umbra tunnel --netns/--pid` hand their event sinks.
pub fn counting(
    registry: Option<&Registry>,
    forward: impl Fn(&Event) + Send + Sync + 'static,
) -> impl Fn(&Event) + Send + Sync + 'static {
    let counted = registry.map(sandbox_events);
    move |ev| {
        if let Some(count) = &counted {
            count(ev);
        }
        forward(ev);
    }
}
