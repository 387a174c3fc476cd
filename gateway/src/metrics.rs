//! The gateways' Prometheus metrics (see `umbra_metrics`): LLM requests by model, decision and
//! reason, tokens by model and direction, upstream latency; MCP calls by kind, name and
//! decision, and their duration.
//!
//! Labels are bounded: a model or tool is named only if the configuration offers it (what a
//! client asks for is its own text), reasons are the gateway's fixed strings, and no label
//! names an identity: per-identity usage is what the ledger (LLM) and the audit file (MCP)
//! are for, and the number of identities has no bound a time series should carry.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use umbra_metrics::{latency_histogram, Registry};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    decision: String,
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    kind: &'static str,
    name: String,
    decision: String,
}

#[derive(Debug)]
struct Llm {
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    upstream: Histogram,
}

/// The LLM gateway's metric handles; a branch and nothing more without a registry.
#[derive(Debug, Clone, Default)]
pub(crate) struct LlmMetrics(Option<Arc<Llm>>);

/// A fixed reason as a label value: `rate limit` becomes `rate_limit`.
fn label(reason: &str) -> String {
    reason.replace(' ', "_")
}

impl LlmMetrics {
    pub fn new(registry: Option<&Registry>) -> LlmMetrics {
        let Some(r) = registry else {
            return LlmMetrics(None);
        };
        let m = Llm {
            requests: Family::default(),
            tokens: Family::default(),
            upstream: latency_histogram(),
        };
        r.register("llm_requests", "LLM gateway requests by configured model, decision (allowed, denied) and how they ended or why they were refused.", m.requests.clone());
        r.register(
            "llm_tokens",
            "Tokens charged by configured model and direction (input, output).",
            m.tokens.clone(),
        );
        r.register(
            "llm_upstream_seconds",
            "Time for the provider to answer with headers.",
            m.upstream.clone(),
        );
        LlmMetrics(Some(Arc::new(m)))
    }

    /// A request's ledger record: counted, and its tokens added. `known` says whether the
    /// model it asked for is configured.
    pub fn record(&self, rec: &crate::ledger::Record, known: bool) {
        if let Some(m) = &self.0 {
            let model = if known {
                rec.model.clone()
            } else {
                String::new()
            };
            let l = RequestLabels {
                model: model.clone(),
                decision: rec.decision.to_owned(),
                reason: label(&rec.reason),
            };
            m.requests.get_or_create(&l).inc();
            for (direction, n) in [("input", rec.usage.input), ("output", rec.usage.output)] {
                if n > 0 {
                    let l = TokenLabels {
                        model: model.clone(),
                        direction,
                    };
                    m.tokens.get_or_create(&l).inc_by(n);
                }
            }
        }
    }

    /// Awaits the upstream call `f`, timing it.
    pub async fn upstream<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let started = Instant::now();
        let out = f.await;
        if let Some(m) = &self.0 {
            m.upstream.observe(started.elapsed().as_secs_f64());
        }
        out
    }
}

#[derive(Debug)]
struct Mcp {
    calls: Family<CallLabels, Counter>,
    took: Histogram,
}

/// The MCP gateway's metric handles; a branch and nothing more without a registry.
#[derive(Debug, Clone, Default)]
pub(crate) struct McpMetrics(Option<Arc<Mcp>>);

impl McpMetrics {
    pub fn new(registry: Option<&Registry>) -> McpMetrics {
        let Some(r) = registry else {
            return McpMetrics(None);
        };
        let m = Mcp {
            calls: Family::default(),
            took: latency_histogram(),
        };
        r.register("mcp_calls", "MCP gateway calls by kind (tools, resources, prompts), offered name (empty when refused) and decision.", m.calls.clone());
        r.register(
            "mcp_call_seconds",
            "MCP call duration, upstream included.",
            m.took.clone(),
        );
        McpMetrics(Some(Arc::new(m)))
    }

    /// A call of `kind` ended; `name` is named only when it was allowed (the catalog offered
    /// it), since a refused name is whatever the client sent.
    pub fn call(&self, kind: &'static str, name: &str, decision: &str, took: std::time::Duration) {
        if let Some(m) = &self.0 {
            let name = if decision == "allowed" {
                name.to_owned()
            } else {
                String::new()
            };
            let l = CallLabels {
                kind,
                name,
                decision: decision.to_owned(),
            };
            m.calls.get_or_create(&l).inc();
            m.took.observe(took.as_secs_f64());
        }
    }
}
