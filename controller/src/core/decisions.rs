//! Stream decisions routers report (`POST /v1/audit/decisions`): stored as audit rows whose
//! actor is the caller, target the service and kind the outcome, so that the audit log answers
//! "who reached what, under which policy" and "who was refused, why".

use std::time::Instant;

use umbra_pki::PeerCert;
use umbra_proto::api::{DecisionReport, StreamOutcome, MAX_DECISIONS};

use super::Controller;
use crate::audit::writer::Row;
use crate::audit::Recorded;
use crate::error::ControllerError;

/// The audit kind of each outcome.
pub fn action(o: StreamOutcome) -> &'static str {
    match o {
        StreamOutcome::Refused => "router.stream_refused",
        StreamOutcome::Ended => "router.stream",
        StreamOutcome::Terminated => "router.stream_terminated",
    }
}

fn short(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

impl Controller {
    /// Records what the router `peer` (already authorized as a router) reports. The whole
    /// report is checked before anything is queued; the routers' buckets then decide what is
    /// stored and what only counted.
    pub fn record_decisions(
        &self,
        peer: &PeerCert,
        report: &DecisionReport,
    ) -> Result<Recorded, ControllerError> {
        if report.decisions.len() > MAX_DECISIONS {
            return Err(ControllerError::Invalid(format!(
                "at most {MAX_DECISIONS} decisions per report"
            )));
        }
        let router = peer.spiffe.to_string();
        let at = self.now();
        let mut rows = Vec::with_capacity(report.decisions.len());
        for (i, d) in report.decisions.iter().enumerate() {
            let ok = d.identity.starts_with("spiffe://")
                && short(&d.identity, 512)
                && short(&d.service, 256)
                && matches!(d.action.as_str(), "dial" | "bind")
                && d.policy.as_deref().is_none_or(|p| short(p, 256))
                && d.reason.as_deref().is_none_or(|r| short(r, 256));
            if !ok {
                return Err(ControllerError::Invalid(format!("decision {i}: malformed")));
            }
            let detail = serde_json::json!({
                "router": router,
                "action": d.action,
                "policy": d.policy,
                "reason": d.reason,
                "bytes_up": d.bytes_up,
                "bytes_down": d.bytes_down,
                "duration_ms": d.duration_ms,
            })
            .to_string();
            let size = detail.len() + d.identity.len() + d.service.len();
            rows.push((
                Row {
                    at,
                    actor: d.identity.clone(),
                    action: action(d.outcome),
                    target: d.service.clone(),
                    detail,
                },
                size,
            ));
        }
        Ok(self
            .audit
            .submit_router(&router, rows, report.dropped, Instant::now()))
    }
}
