//! Retention for agent rows. Time is an argument: the writer passes the controller's clock.

use std::time::Duration;

use rusqlite::{params, Connection};
use umbra_policies::Timestamp;

use crate::error::ControllerError;

/// The `origin` of rows written for reported events (and their summaries); everything else is
/// `operator` and is never deleted here.
pub const AGENT: &str = "agent";

/// Deletes agent rows older than `retention` before `now`, then the oldest agent rows above
/// `max_agent_rows`. Returns how many rows went.
pub fn prune(
    conn: &Connection,
    now: Timestamp,
    retention: Option<Duration>,
    max_agent_rows: u64,
) -> Result<u64, ControllerError> {
    let mut deleted = 0;
    if let Some(r) = retention {
        let cutoff = i64::try_from(now.0.saturating_sub(r.as_secs())).unwrap_or(i64::MAX);
        deleted += conn.execute(
            "DELETE FROM audit WHERE origin = ?1 AND at < ?2",
            params![AGENT, cutoff],
        )? as u64;
    }
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM audit WHERE origin = ?1",
        [AGENT],
        |r| r.get(0),
    )?;
    let over = u64::try_from(n).unwrap_or(0).saturating_sub(max_agent_rows);
    if over > 0 {
        deleted += conn.execute(
            "DELETE FROM audit WHERE id IN \
             (SELECT id FROM audit WHERE origin = ?1 ORDER BY at, id LIMIT ?2)",
            params![AGENT, i64::try_from(over).unwrap_or(i64::MAX)],
        )? as u64;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        drop(crate::store::Store::open(&dir.path().join("umbra.db")).unwrap());
        let conn = Connection::open(dir.path().join("umbra.db")).unwrap();
        (dir, conn)
    }

    fn row(conn: &Connection, at: u64, origin: &str, action: &str) {
        conn.execute(
            "INSERT INTO audit (at, actor, action, target, detail, origin) VALUES (?1, 'x', ?2, 't', '{}', ?3)",
            params![at as i64, action, origin],
        )
        .unwrap();
    }

    fn count(conn: &Connection, origin: &str) -> i64 {
        conn.query_row(
            "SELECT COUNT(*) FROM audit WHERE origin = ?1",
            [origin],
            |r| r.get(0),
        )
        .unwrap()
    }

    const DAY: u64 = 24 * 3600;

    #[test]
    fn retention_deletes_old_agent_rows_and_keeps_operator_rows() {
        let (_d, conn) = db();
        let t0 = 1_000 * DAY;
        for i in 0..10 {
            row(&conn, t0 + i * DAY, AGENT, "sandbox.dns_refused");
            row(&conn, t0 + i * DAY, "operator", "identity.create");
        }
        let month = Some(Duration::from_secs(30 * DAY));
        // Nothing is old yet.
        assert_eq!(
            prune(&conn, Timestamp(t0 + 20 * DAY), month, u64::MAX).unwrap(),
            0
        );
        // 35 days after t0: the first five days of agent rows go, every operator row stays.
        assert_eq!(
            prune(&conn, Timestamp(t0 + 35 * DAY), month, u64::MAX).unwrap(),
            5
        );
        assert_eq!(count(&conn, AGENT), 5);
        assert_eq!(count(&conn, "operator"), 10);
        // Far in the future: all agent rows gone, operator rows still there.
        prune(&conn, Timestamp(t0 + 1000 * DAY), month, u64::MAX).unwrap();
        assert_eq!(count(&conn, AGENT), 0);
        assert_eq!(count(&conn, "operator"), 10);
    }

    #[test]
    fn the_row_cap_takes_the_oldest_agent_rows_never_operator_rows() {
        let (_d, conn) = db();
        for i in 0..50 {
            row(&conn, 100 + i, "operator", "policy.create");
        }
        for i in 0..100 {
            row(&conn, 200 + i, AGENT, "sandbox.dial_denied");
        }
        assert_eq!(prune(&conn, Timestamp(300), None, 30).unwrap(), 70);
        assert_eq!(count(&conn, AGENT), 30);
        assert_eq!(count(&conn, "operator"), 50);
        let oldest: i64 = conn
            .query_row(
                "SELECT MIN(at) FROM audit WHERE origin = ?1",
                [AGENT],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(oldest, 270, "the newest agent rows are kept");
        // A cap of zero empties the agent rows only.
        prune(&conn, Timestamp(300), None, 0).unwrap();
        assert_eq!(count(&conn, AGENT), 0);
        assert_eq!(count(&conn, "operator"), 50);
    }
}
