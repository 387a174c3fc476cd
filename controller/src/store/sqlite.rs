//! The SQLite store: one file, owned by one controller process. WAL with `synchronous=FULL`:
//! a committed write survives a crash.

use std::collections::HashSet;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use umbra_policies::{Identity, IdentityId, Service, ServicePolicy, State, Timestamp};
use umbra_proto::api::{AuditEntry, CertInfo};
use umbra_proto::{ChangeEvent, Delta, Replica, RevokedCert, RouterInfo};

use super::{AgentEvent, Batch, Record, Store, TokenRow, AGENT_ORIGIN, MAX_REPLAY, TRIM_EVERY};
use crate::error::ControllerError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identities (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS services (name TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policies (name TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS routers (id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    jti TEXT PRIMARY KEY, identity_id TEXT NOT NULL, issued_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL, used_at INTEGER);
CREATE INDEX IF NOT EXISTS tokens_identity ON tokens (identity_id);
CREATE TABLE IF NOT EXISTS certs (
    serial TEXT PRIMARY KEY, identity_id TEXT NOT NULL, issued_at INTEGER NOT NULL,
    not_after INTEGER NOT NULL, revoked_at INTEGER);
CREATE INDEX IF NOT EXISTS certs_identity ON certs (identity_id);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY, at INTEGER NOT NULL, body TEXT NOT NULL,
    last_in_commit INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL);
";

/// WAL pages a commit may leave before it checkpoints itself: a backstop only (64 MiB of 4 KiB
/// pages), since [`checkpointer`] moves the WAL into the database off the commit path.
const AUTOCHECKPOINT_PAGES: i64 = 16_384;

/// How often the checkpointer runs.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The SQLite store.
pub struct SqliteStore {
    conn: Connection,
    /// Dropping it stops the store's checkpointer.
    _checkpointer: Option<std::sync::mpsc::Sender<()>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

fn ts(v: i64) -> Timestamp {
    Timestamp(u64::try_from(v).unwrap_or(0))
}

fn sql_ts(t: Timestamp) -> i64 {
    i64::try_from(t.0).unwrap_or(i64::MAX)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, ControllerError> {
        // Every identity, policy and the audit log: the controller's user alone reads them.
        umbra_pki::private_database(path).map_err(|e| ControllerError::Setup(e.to_string()))?;
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // SQLite checkpoints in the commit that crosses its threshold (1,000 pages by
        // default): with a large database that commit copies a thousand scattered pages and
        // syncs the file, tens of milliseconds at a million identities, so about one
        // revocation in a hundred took 40 ms instead of 5. A thread of the store's own does it
        // every second instead; the commit path checkpoints only past the backstop.
        conn.pragma_update(None, "wal_autocheckpoint", AUTOCHECKPOINT_PAGES)?;
        conn.execute_batch(SCHEMA)?;
        migrate_audit_origin(&conn)?;
        let (stop, stopped) = std::sync::mpsc::channel();
        let file = path.to_owned();
        let checkpointer = std::thread::Builder::new()
            .name("umbra-sqlite-checkpoint".into())
            .spawn(move || checkpointer(&file, &stopped))
            .map_err(|e| tracing::warn!(error = %e, "no checkpoint thread: commits checkpoint"))
            .ok()
            .map(|_| stop);
        Ok(SqliteStore {
            conn,
            _checkpointer: checkpointer,
        })
    }
}

/// Moves the WAL into the database every [`CHECKPOINT_EVERY`] (`PASSIVE`: it never waits for,
/// nor blocks, a writer) until `stop`'s sender is dropped, on a connection of its own.
fn checkpointer(path: &Path, stop: &std::sync::mpsc::Receiver<()>) {
    let conn = match Connection::open(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "the checkpoint thread cannot open the database");
            return;
        }
    };
    let mut failing = false;
    loop {
        match stop.recv_timeout(CHECKPOINT_EVERY) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "checkpoint failed");
                }
                failing = true;
            }
        }
    }
}

impl Store for SqliteStore {
    /// Reads a metadata value.
    fn meta(&mut self, key: &str) -> Result<Option<String>, ControllerError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    /// Writes a metadata value.
    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), ControllerError> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Loads everything the controller keeps in memory.
    fn load(&mut self, epoch: String, now: Timestamp) -> Result<Replica, ControllerError> {
        let mut state = State::default();
        let mut stmt = self.conn.prepare("SELECT body FROM identities")?;
        for body in stmt.query_map([], |r| r.get::<_, String>(0))? {
            let i: Identity = serde_json::from_str(&body?)?;
            state.identities.insert(i.id.clone(), i);
        }
        let mut stmt = self.conn.prepare("SELECT body FROM services")?;
        for body in stmt.query_map([], |r| r.get::<_, String>(0))? {
            let s: Service = serde_json::from_str(&body?)?;
            state.services.insert(s.name.clone(), s);
        }
        let mut stmt = self.conn.prepare("SELECT body FROM policies")?;
        for body in stmt.query_map([], |r| r.get::<_, String>(0))? {
            let p: ServicePolicy = serde_json::from_str(&body?)?;
            state.policies.insert(p.name.clone(), p);
        }
        let mut replica = Replica {
            epoch,
            seq: last_seq(&self.conn)?,
            state,
            ..Default::default()
        };
        let mut stmt = self.conn.prepare("SELECT body FROM routers")?;
        for body in stmt.query_map([], |r| r.get::<_, String>(0))? {
            let r: RouterInfo = serde_json::from_str(&body?)?;
            replica.routers.insert(r.id.clone(), r);
        }
        let mut stmt = self.conn.prepare(
            "SELECT serial, identity_id, not_after FROM certs WHERE revoked_at IS NOT NULL AND not_after > ?1",
        )?;
        let rows = stmt.query_map([sql_ts(now)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (serial, identity, not_after) = row?;
            let identity =
                IdentityId::new(identity).map_err(|e| ControllerError::Corrupt(e.to_string()))?;
            replica.revoked.insert(
                serial.clone(),
                RevokedCert {
                    serial,
                    identity,
                    not_after: ts(not_after),
                },
            );
        }
        Ok(replica)
    }

    /// The sequence number of the last committed change (0 when there is none).
    fn last_seq(&mut self) -> Result<u64, ControllerError> {
        last_seq(&self.conn)
    }

    /// The changes after `seq`, in order, or `None` when they are no longer all kept or are
    /// more than [`MAX_REPLAY`] (a snapshot is then cheaper and bounded).
    fn changes_since(&mut self, seq: u64) -> Result<Option<Vec<Delta>>, ControllerError> {
        if self.last_seq()?.saturating_sub(seq) > MAX_REPLAY {
            return Ok(None);
        }
        let first: Option<i64> = self
            .conn
            .query_row("SELECT MIN(seq) FROM changes", [], |r| r.get(0))?;
        let last = self.last_seq()?;
        if seq > last {
            return Ok(None);
        }
        if seq < last && first.is_some_and(|f| u64::try_from(f).unwrap_or(0) > seq + 1) {
            return Ok(None);
        }
        let mut stmt = self.conn.prepare(
            "SELECT seq, at, body, last_in_commit FROM changes WHERE seq > ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([i64::try_from(seq).unwrap_or(i64::MAX)], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, bool>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, at, body, last_in_commit) = row?;
            out.push(Delta {
                seq: u64::try_from(seq).unwrap_or(0),
                at: ts(at),
                change: serde_json::from_str(&body)?,
                last_in_commit,
            });
        }
        Ok(Some(out))
    }

    /// Looks up a token by its nonce.
    fn token(&mut self, jti: &str) -> Result<Option<TokenRow>, ControllerError> {
        let row = self
            .conn
            .query_row(
                "SELECT identity_id, used_at FROM tokens WHERE jti = ?1",
                [jti],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?)),
            )
            .optional()?;
        let Some((identity, used_at)) = row else {
            return Ok(None);
        };
        let identity =
            IdentityId::new(identity).map_err(|e| ControllerError::Corrupt(e.to_string()))?;
        Ok(Some(TokenRow {
            identity,
            used_at: used_at.map(ts),
        }))
    }

    /// The identity a certificate was issued to, and whether it was revoked.
    fn cert_owner(&mut self, serial: &str) -> Result<Option<(IdentityId, bool)>, ControllerError> {
        let row = self
            .conn
            .query_row(
                "SELECT identity_id, revoked_at IS NOT NULL FROM certs WHERE serial = ?1",
                [serial],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)),
            )
            .optional()?;
        row.map(|(id, revoked)| {
            IdentityId::new(id)
                .map(|id| (id, revoked))
                .map_err(|e| ControllerError::Corrupt(e.to_string()))
        })
        .transpose()
    }

    /// Certificates issued to an identity, newest first.
    fn certs_of(&mut self, identity: &IdentityId) -> Result<Vec<CertInfo>, ControllerError> {
        let mut stmt = self.conn.prepare(
            "SELECT serial, issued_at, not_after, revoked_at IS NOT NULL FROM certs WHERE identity_id = ?1 ORDER BY issued_at DESC, rowid DESC",
        )?;
        let rows = stmt.query_map([identity.as_str()], |r| {
            Ok(CertInfo {
                serial: r.get(0)?,
                issued_at: ts(r.get(1)?),
                not_after: ts(r.get(2)?),
                revoked: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The set of identity ids that have enrolled.
    fn enrolled_ids(&mut self) -> Result<HashSet<String>, ControllerError> {
        let mut stmt = self
            .conn
            .prepare("SELECT DISTINCT identity_id FROM certs")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Unrevoked, unexpired certificates of an identity (what revoking it must add to the list).
    fn live_certs_of(
        &mut self,
        identity: &IdentityId,
        now: Timestamp,
    ) -> Result<Vec<RevokedCert>, ControllerError> {
        let mut stmt = self.conn.prepare(
            "SELECT serial, not_after FROM certs WHERE identity_id = ?1 AND revoked_at IS NULL AND not_after > ?2",
        )?;
        let rows = stmt.query_map(params![identity.as_str(), sql_ts(now)], |r| {
            Ok(RevokedCert {
                serial: r.get(0)?,
                identity: identity.clone(),
                not_after: ts(r.get(1)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The newest audit entries, newest last.
    fn audit(&mut self, limit: u32) -> Result<Vec<AuditEntry>, ControllerError> {
        audit_rows(
            &self.conn,
            "SELECT id, at, actor, action, target, detail FROM (SELECT * FROM audit ORDER BY id DESC LIMIT ?2) WHERE id > ?1 ORDER BY id",
            0,
            limit,
        )
    }

    fn audit_after(&mut self, after: u64, limit: u32) -> Result<Vec<AuditEntry>, ControllerError> {
        audit_rows(
            &self.conn,
            "SELECT id, at, actor, action, target, detail FROM audit WHERE id > ?1 ORDER BY id LIMIT ?2",
            after,
            limit,
        )
    }

    fn audit_ids(&mut self, ids: &[u64]) -> Result<Vec<AuditEntry>, ControllerError> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend(audit_rows(
                &self.conn,
                "SELECT id, at, actor, action, target, detail FROM audit WHERE id = ?1 AND ?2 > 0",
                id,
                1,
            )?);
        }
        Ok(out)
    }

    fn audit_span(&mut self, after: u64) -> Result<(u64, u64), ControllerError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let (n, max): (i64, i64) = self.conn.query_row(
            "SELECT (SELECT COUNT(*) FROM audit WHERE id > ?1), (SELECT COALESCE(MAX(id), 0) FROM audit)",
            [after],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((n.max(0) as u64, max.max(0) as u64))
    }

    /// Commits a batch in one transaction; its changes get the sequence numbers after `seq`.
    /// Returns the deltas as committed.
    fn commit(
        &mut self,
        batch: &Batch,
        seq: u64,
        now: Timestamp,
    ) -> Result<Vec<Delta>, ControllerError> {
        // Immediate: the write lock is taken at BEGIN, so the sequence read below and the
        // writes after it cannot interleave with another connection's commit.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // One process owns the file, so this holds unless the store was written behind the
        // controller's back; checked anyway (it costs one index lookup) so that both stores
        // refuse a batch built on an old state the same way.
        let found = last_seq(&tx)?;
        if found != seq {
            return Err(ControllerError::Stale {
                expected: seq,
                found,
            });
        }
        let mut deltas = Vec::with_capacity(batch.changes.len());
        let n = batch.changes.len();
        for (i, change) in batch.changes.iter().enumerate() {
            persist_change(&tx, change, now)?;
            let seq = seq + 1 + i as u64;
            let last_in_commit = i + 1 == n;
            tx.execute(
                "INSERT INTO changes (seq, at, body, last_in_commit) VALUES (?1, ?2, ?3, ?4)",
                params![
                    i64::try_from(seq).unwrap_or(i64::MAX),
                    sql_ts(now),
                    serde_json::to_string(change)?,
                    last_in_commit
                ],
            )?;
            deltas.push(Delta {
                seq,
                at: now,
                change: change.clone(),
                last_in_commit,
            });
        }
        let last = seq + n as u64;
        if n > 0 && last / TRIM_EVERY != seq / TRIM_EVERY {
            tx.execute(
                "DELETE FROM changes WHERE seq <= ?1",
                [i64::try_from(last.saturating_sub(MAX_REPLAY)).unwrap_or(0)],
            )?;
        }
        for record in &batch.records {
            match record {
                Record::Token {
                    jti,
                    identity,
                    expires_at,
                } => {
                    tx.execute(
                        "UPDATE tokens SET used_at = ?2 WHERE identity_id = ?1 AND used_at IS NULL",
                        params![identity.as_str(), sql_ts(now)],
                    )?;
                    tx.execute(
                        "INSERT INTO tokens (jti, identity_id, issued_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
                        params![jti, identity.as_str(), sql_ts(now), sql_ts(*expires_at)],
                    )?;
                }
                Record::TokenUsed { jti } => {
                    let n = tx.execute(
                        "UPDATE tokens SET used_at = ?2 WHERE jti = ?1 AND used_at IS NULL",
                        params![jti, sql_ts(now)],
                    )?;
                    if n != 1 {
                        return Err(ControllerError::Conflict(
                            "the enrollment token was already used".into(),
                        ));
                    }
                }
                Record::Cert {
                    serial,
                    identity,
                    not_after,
                } => {
                    tx.execute(
                        "INSERT INTO certs (serial, identity_id, issued_at, not_after) VALUES (?1, ?2, ?3, ?4)",
                        params![serial, identity.as_str(), sql_ts(now), sql_ts(*not_after)],
                    )?;
                }
            }
        }
        for a in &batch.audit {
            tx.execute(
                "INSERT INTO audit (at, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    sql_ts(now),
                    a.actor,
                    a.action,
                    a.target,
                    a.detail.to_string()
                ],
            )?;
        }
        tx.commit()?;
        Ok(deltas)
    }

    /// One process owns the file and serializes its commands with its own mutex.
    fn lock_writes(&mut self) -> Result<(), ControllerError> {
        Ok(())
    }

    fn unlock_writes(&mut self) {}

    fn try_lead(&mut self, _key: i64) -> Result<bool, ControllerError> {
        Ok(true)
    }

    fn append_agent_events(&mut self, events: &[AgentEvent]) -> Result<(), ControllerError> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO audit (at, actor, action, target, detail, origin) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for e in events {
                stmt.execute(params![
                    sql_ts(e.at),
                    e.actor,
                    e.action,
                    e.target,
                    e.detail,
                    AGENT_ORIGIN
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn prune_agent_events(
        &mut self,
        before: Option<Timestamp>,
        keep: u64,
    ) -> Result<u64, ControllerError> {
        let mut deleted = 0;
        if let Some(before) = before {
            deleted += self.conn.execute(
                "DELETE FROM audit WHERE origin = ?1 AND at < ?2",
                params![AGENT_ORIGIN, sql_ts(before)],
            )? as u64;
        }
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM audit WHERE origin = ?1",
            [AGENT_ORIGIN],
            |r| r.get(0),
        )?;
        let over = u64::try_from(n).unwrap_or(0).saturating_sub(keep);
        if over > 0 {
            deleted += self.conn.execute(
                "DELETE FROM audit WHERE id IN \
                 (SELECT id FROM audit WHERE origin = ?1 ORDER BY at, id LIMIT ?2)",
                params![AGENT_ORIGIN, i64::try_from(over).unwrap_or(i64::MAX)],
            )? as u64;
        }
        Ok(deleted)
    }
}

/// Audit rows from `sql`, which takes an id (`?1`) and a limit (`?2`).
fn audit_rows(
    conn: &Connection,
    sql: &str,
    after: u64,
    limit: u32,
) -> Result<Vec<AuditEntry>, ControllerError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let rows = stmt.query_map(rusqlite::params![after, limit], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, String>(5)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, at, actor, action, target, detail) = row?;
        out.push(AuditEntry {
            id: u64::try_from(id).unwrap_or(0),
            at: ts(at),
            actor,
            action,
            target,
            detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
        });
    }
    Ok(out)
}

fn last_seq(conn: &Connection) -> Result<u64, ControllerError> {
    let seq: Option<i64> = conn.query_row("SELECT MAX(seq) FROM changes", [], |r| r.get(0))?;
    Ok(seq.map_or(0, |s| u64::try_from(s).unwrap_or(0)))
}

/// Adds `audit.origin` (`operator` or `agent`) to a store made before it existed; rows that
/// identities reported (`sandbox.*`) become `agent` rows, subject to retention.
fn migrate_audit_origin(conn: &Connection) -> Result<(), ControllerError> {
    let has: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('audit') WHERE name = 'origin'")?
        .exists([])?;
    if !has {
        conn.execute_batch(
            "BEGIN;
             ALTER TABLE audit ADD COLUMN origin TEXT NOT NULL DEFAULT 'operator';
             UPDATE audit SET origin = 'agent' WHERE action LIKE 'sandbox.%';
             COMMIT;",
        )?;
    }
    conn.execute_batch("CREATE INDEX IF NOT EXISTS audit_origin_at ON audit (origin, at);")?;
    Ok(())
}

fn persist_change(
    tx: &Transaction<'_>,
    change: &ChangeEvent,
    now: Timestamp,
) -> Result<(), ControllerError> {
    match change {
        ChangeEvent::IdentityPut { identity } => {
            tx.execute(
                "INSERT INTO identities (id, name, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET name = excluded.name, body = excluded.body",
                params![
                    identity.id.as_str(),
                    identity.name.as_str(),
                    serde_json::to_string(identity)?
                ],
            )?;
        }
        ChangeEvent::IdentityDeleted { id } => {
            tx.execute("DELETE FROM identities WHERE id = ?1", [id.as_str()])?;
            tx.execute("DELETE FROM tokens WHERE identity_id = ?1", [id.as_str()])?;
            tx.execute("DELETE FROM routers WHERE id = ?1", [id.as_str()])?;
        }
        ChangeEvent::ServicePut { service } => {
            tx.execute(
                "INSERT INTO services (name, body) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET body = excluded.body",
                params![service.name.as_str(), serde_json::to_string(service)?],
            )?;
        }
        ChangeEvent::ServiceDeleted { name } => {
            tx.execute("DELETE FROM services WHERE name = ?1", [name.as_str()])?;
        }
        ChangeEvent::PolicyPut { policy } => {
            tx.execute(
                "INSERT INTO policies (name, body) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET body = excluded.body",
                params![policy.name.as_str(), serde_json::to_string(policy)?],
            )?;
        }
        ChangeEvent::PolicyDeleted { name } => {
            tx.execute("DELETE FROM policies WHERE name = ?1", [name.as_str()])?;
        }
        ChangeEvent::CertRevoked { cert } => {
            tx.execute(
                "UPDATE certs SET revoked_at = ?2 WHERE serial = ?1 AND revoked_at IS NULL",
                params![cert.serial, sql_ts(now)],
            )?;
        }
        ChangeEvent::RouterPut { router } => {
            tx.execute(
                "INSERT INTO routers (id, body) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET body = excluded.body",
                params![router.id.as_str(), serde_json::to_string(router)?],
            )?;
        }
        ChangeEvent::RouterDeleted { id } => {
            tx.execute("DELETE FROM routers WHERE id = ?1", [id.as_str()])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revocation(i: u64) -> ChangeEvent {
        ChangeEvent::CertRevoked {
            cert: umbra_proto::RevokedCert {
                serial: format!("{i:x}"),
                identity: IdentityId::new("i1").unwrap(),
                not_after: Timestamp(1),
            },
        }
    }

    /// A commit reaches the database file itself within a couple of seconds with no further
    /// write (the checkpointer, not a later commit, moves it out of the WAL); read with
    /// `immutable=1`, which ignores the WAL.
    #[test]
    fn commits_are_checkpointed_off_the_commit_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut store = SqliteStore::open(&path).unwrap();
        let autocheckpoint: i64 = (store.conn)
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap();
        assert_eq!(autocheckpoint, AUTOCHECKPOINT_PAGES);
        store
            .commit(
                &Batch {
                    changes: vec![revocation(1)],
                    ..Default::default()
                },
                0,
                Timestamp(1),
            )
            .unwrap();
        let uri = format!("file:{}?immutable=1", path.display());
        let flags =
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let file = Connection::open_with_flags(&uri, flags).unwrap();
            let n: i64 = file
                .query_row("SELECT COUNT(*) FROM changes", [], |r| r.get(0))
                .unwrap_or(0);
            if n == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the commit never reached the database file"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The change log holds what can still be replayed and no more: it stays bounded however
    /// many commits there are, and a follower too far behind gets a snapshot.
    #[test]
    fn the_change_log_keeps_only_what_can_be_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let mut seq = 0;
        // Commits of 700 changes: trims happen inside commits, not at their edges.
        while seq < 3 * MAX_REPLAY {
            let batch = Batch {
                changes: (0..700).map(|i| revocation(seq + i)).collect(),
                ..Default::default()
            };
            seq = store
                .commit(&batch, seq, Timestamp(1))
                .unwrap()
                .last()
                .unwrap()
                .seq;
        }
        assert_eq!(store.last_seq().unwrap(), seq);
        let rows: i64 = (store.conn)
            .query_row("SELECT COUNT(*) FROM changes", [], |r| r.get(0))
            .unwrap();
        let rows = u64::try_from(rows).unwrap();
        assert!(
            (MAX_REPLAY..MAX_REPLAY + TRIM_EVERY + 700).contains(&rows),
            "{rows} rows"
        );
        let replay = store.changes_since(seq - MAX_REPLAY).unwrap().unwrap();
        assert_eq!(replay.len() as u64, MAX_REPLAY);
        assert_eq!(replay.first().unwrap().seq, seq - MAX_REPLAY + 1);
        assert!(store.changes_since(seq - MAX_REPLAY - 1).unwrap().is_none());
    }
}
