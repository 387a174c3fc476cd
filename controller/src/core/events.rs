//! Events that identities report about themselves (their sandbox's refusals), kept in the
//! audit log beside what operators did.

use umbra_pki::{PeerCert, SpiffeId};
use umbra_proto::api::{ReportedEvent, MAX_REPORTED_EVENTS};

use std::time::Instant;

use super::Controller;
use crate::audit::writer::Row;
use crate::audit::Recorded;
use crate::error::ControllerError;

/// The audit action for each event kind a sandbox reports; anything else is refused.
fn action(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "started" => "sandbox.started",
        "dns_refused" => "sandbox.dns_refused",
        "dns_malformed" => "sandbox.dns_malformed",
        "suppressed" => "sandbox.suppressed",
        "dial_denied" => "sandbox.dial_denied",
        "limit" => "sandbox.limit",
        "timeout" => "sandbox.timeout",
        "revoked" => "sandbox.revoked",
        "exited" => "sandbox.exited",
        _ => return None,
    })
}

/// Largest `detail` accepted per event, serialized.
const MAX_DETAIL: usize = 2048;

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl Controller {
    /// Records events reported by the identity `peer` proved. The whole report is checked
    /// before anything is queued; then the identity's buckets decide which events are stored and
    /// which are only counted (see [`crate::audit`]). The command lock is held only to
    /// authorize: storing happens on the audit writer's own connection.
    pub fn record_events(
        &self,
        peer: &PeerCert,
        events: &[ReportedEvent],
    ) -> Result<Recorded, ControllerError> {
        if events.len() > MAX_REPORTED_EVENTS {
            return Err(ControllerError::Invalid(format!(
                "at most {MAX_REPORTED_EVENTS} events per report"
            )));
        }
        let identity = {
            let mut inner = self.lock();
            self.authorize_locked(&mut inner, peer, None)?
        };
        let label = SpiffeId::new(self.trust_domain(), identity.kind, &identity.name).to_string();
        let at = self.now();
        let mut rows = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            let action = action(&e.kind).ok_or_else(|| {
                ControllerError::Invalid(format!("event {i}: unknown kind {:?}", e.kind))
            })?;
            if !valid_id(&e.sandbox) {
                return Err(ControllerError::Invalid(format!(
                    "event {i}: sandbox must be 1 to 64 of [A-Za-z0-9._-]"
                )));
            }
            let detail_len = serde_json::to_vec(&e.detail)
                .map(|v| v.len())
                .unwrap_or(usize::MAX);
            if detail_len > MAX_DETAIL || e.at.len() > 64 {
                return Err(ControllerError::Invalid(format!("event {i}: too large")));
            }
            let detail = serde_json::json!({ "at": e.at, "event": e.detail }).to_string();
            let size = detail.len() + e.sandbox.len();
            let row = Row {
                at,
                actor: label.clone(),
                action,
                target: e.sandbox.clone(),
                detail,
            };
            rows.push((row, size));
        }
        let rec = self.audit.submit(&label, rows, Instant::now());
        self.metrics.audit(rec.accepted, rec.suppressed);
        if rec.suppressed > 0 {
            tracing::debug!(identity = %label, suppressed = rec.suppressed, "reported events over the limit");
        }
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_kinds_and_plain_ids() {
        assert_eq!(action("dns_refused"), Some("sandbox.dns_refused"));
        assert_eq!(action("dns_malformed"), Some("sandbox.dns_malformed"));
        assert_eq!(action("suppressed"), Some("sandbox.suppressed"));
        assert_eq!(action("identity.create"), None);
        assert!(valid_id("umbra-1a2b"));
        for bad in ["", "a b", "x/../y", &"a".repeat(65)] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
