//! Retention for agent rows. Time is an argument: the writer passes the controller's clock.

use std::time::Duration;

use umbra_policies::Timestamp;

use crate::error::ControllerError;
use crate::store::Store;

/// The `origin` of rows written for reported events (and their summaries); everything else is
/// `operator` and is never deleted here.
pub const AGENT: &str = crate::store::AGENT_ORIGIN;

/// Deletes agent rows older than `retention` before `now`, then the oldest agent rows above
/// `max_agent_rows`. Returns how many rows went.
pub fn prune(
    store: &mut dyn Store,
    now: Timestamp,
    retention: Option<Duration>,
    max_agent_rows: u64,
) -> Result<u64, ControllerError> {
    let before = retention.map(|r| Timestamp(now.0.saturating_sub(r.as_secs())));
    store.prune_agent_events(before, max_agent_rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AgentEvent, AuditRecord, Batch, SqliteStore};

    fn db() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("umbra.db")).unwrap();
        (dir, store)
    }

    /// An operator row goes through a command's commit, an agent row through the writer's path.
    fn row(store: &mut SqliteStore, at: u64, origin: &str, action: &'static str) {
        if origin == AGENT {
            let e = AgentEvent {
                at: Timestamp(at),
                actor: "x".into(),
                action,
                target: "t".into(),
                detail: "{}".into(),
            };
            store.append_agent_events(&[e]).unwrap();
        } else {
            let batch = Batch {
                audit: vec![AuditRecord {
                    actor: "x".into(),
                    action,
                    target: "t".into(),
                    detail: serde_json::json!({}),
                }],
                ..Default::default()
            };
            let seq = store.last_seq().unwrap();
            store.commit(&batch, seq, Timestamp(at)).unwrap();
        }
    }

    /// Rows by origin, told apart by action (agent rows here are all `sandbox.*`).
    fn count(store: &mut SqliteStore, origin: &str) -> usize {
        let rows = store.audit(u32::MAX).unwrap();
        rows.iter()
            .filter(|r| r.action.starts_with("sandbox.") == (origin == AGENT))
            .count()
    }

    fn oldest_agent_row(store: &mut SqliteStore) -> u64 {
        let rows = store.audit(u32::MAX).unwrap();
        (rows.iter())
            .filter(|r| r.action.starts_with("sandbox."))
            .map(|r| r.at.0)
            .min()
            .unwrap()
    }

    const DAY: u64 = 24 * 3600;

    #[test]
    fn retention_deletes_old_agent_rows_and_keeps_operator_rows() {
        let (_d, mut s) = db();
        let t0 = 1_000 * DAY;
        for i in 0..10 {
            row(&mut s, t0 + i * DAY, AGENT, "sandbox.dns_refused");
            row(&mut s, t0 + i * DAY, "operator", "identity.create");
        }
        let month = Some(Duration::from_secs(30 * DAY));
        // Nothing is old yet.
        assert_eq!(
            prune(&mut s, Timestamp(t0 + 20 * DAY), month, u64::MAX).unwrap(),
            0
        );
        // 35 days after t0: the first five days of agent rows go, every operator row stays.
        assert_eq!(
            prune(&mut s, Timestamp(t0 + 35 * DAY), month, u64::MAX).unwrap(),
            5
        );
        assert_eq!(count(&mut s, AGENT), 5);
        assert_eq!(count(&mut s, "operator"), 10);
        // Far in the future: all agent rows gone, operator rows still there.
        prune(&mut s, Timestamp(t0 + 1000 * DAY), month, u64::MAX).unwrap();
        assert_eq!(count(&mut s, AGENT), 0);
        assert_eq!(count(&mut s, "operator"), 10);
    }

    #[test]
    fn the_row_cap_takes_the_oldest_agent_rows_never_operator_rows() {
        let (_d, mut s) = db();
        for i in 0..50 {
            row(&mut s, 100 + i, "operator", "policy.create");
        }
        for i in 0..100 {
            row(&mut s, 200 + i, AGENT, "sandbox.dial_denied");
        }
        assert_eq!(prune(&mut s, Timestamp(300), None, 30).unwrap(), 70);
        assert_eq!(count(&mut s, AGENT), 30);
        assert_eq!(count(&mut s, "operator"), 50);
        assert_eq!(
            oldest_agent_row(&mut s),
            270,
            "the newest agent rows are kept"
        );
        // A cap of zero empties the agent rows only.
        prune(&mut s, Timestamp(300), None, 0).unwrap();
        assert_eq!(count(&mut s, AGENT), 0);
        assert_eq!(count(&mut s, "operator"), 50);
    }
}
