//! The PostgreSQL store: several controllers share one database, the engine operators already
//! run, replicate and back up.
//!
//! **How writes are serialized.** Every commit runs in one READ COMMITTED transaction that first
//! takes the transaction-scoped advisory lock [`WRITE_LOCK`], then reads the change log's last
//! sequence and refuses the batch ([`ControllerError::Stale`], nothing written) unless it is the
//! one the batch was built on. The lock makes commits from all controllers one queue, so the
//! change log has one gap-free sequence; the check (a fresh snapshot per statement under READ
//! COMMITTED, taken after the lock is granted, so it sees every commit before ours) makes a
//! batch built on an old state impossible to commit. `pg_notify('umbra_changes', last seq)` in
//! the same transaction tells the other controllers, at commit and only if it commits.
//!
//! [`Store::lock_writes`] takes the *session-level* advisory lock [`COMMAND_LOCK`], so that a
//! whole command (read the state, build the batch, commit) runs with no other controller's
//! command in between. A controller takes it on a connection kept for it alone, not the one it
//! commits on, so that a command waiting for another controller's does not hold the command
//! lock that every read of that controller needs; hence a key of its own (the same key would be
//! held by one session and asked for again, at commit, by another of the same controller).
//! Every commit a controller makes is inside such a command, so commands and commits from all
//! controllers form one queue; the transaction-level lock and the sequence check keep the log
//! whole even for a commit made outside one.
//! If the session dies (the database restarted), the lock dies with it; a commit made after
//! reconnecting is still safe, since the sequence check does not depend on the session lock.
//!
//! **Connections.** One connection per store, made again on the first call after it was lost:
//! a call that finds the database unreachable fails with [`ControllerError::Unavailable`] (503),
//! nothing written. Idempotent calls made on a connection that turns out to be dead are retried
//! once on a fresh one, so a restarted database costs at most the calls made while it was down.
//! Without TLS (`NoTls`): use it on loopback or a private network; `sslmode=require` is refused
//! until TLS to the database is supported.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use ::postgres::config::SslMode;
use ::postgres::error::SqlState;
use ::postgres::fallible_iterator::FallibleIterator;
use ::postgres::{Client, Config, IsolationLevel, NoTls, Statement};
use umbra_policies::{Identity, IdentityId, Service, ServicePolicy, State, Timestamp};
use umbra_proto::api::{AuditEntry, CertInfo};
use umbra_proto::{ChangeEvent, Delta, Replica, RevokedCert, RouterInfo};

use super::{
    redact, AgentEvent, Batch, Record, Store, TokenRow, AGENT_ORIGIN, MAX_REPLAY, TRIM_EVERY,
};
use crate::error::ControllerError;

/// The advisory lock key that serializes commits (transaction level) and whole commands
/// (session level, [`Store::lock_writes`]) across controllers: "umbra" and a 1, so that it is
/// unlikely to collide with another application's keys in a shared database.
pub const WRITE_LOCK: i64 = 0x756d_6272_6100_0001;

/// The advisory lock key that serializes whole commands across controllers (session level,
/// [`Store::lock_writes`]), apart from [`WRITE_LOCK`]: see the module's documentation.
pub const COMMAND_LOCK: i64 = 0x756d_6272_6100_0002;

/// The channel commits are announced on; the payload is the change log's last sequence.
pub const CHANNEL: &str = "umbra_changes";

/// How long a statement waits for a lock (the write lock held by another controller's command)
/// before the call fails as unavailable rather than hanging the command.
const LOCK_TIMEOUT: &str = "30s";

/// How long connecting may take when the URL does not say.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a connection suspected dead has to answer a no-op query.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identities (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS services (name TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policies (name TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS routers (id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    jti TEXT PRIMARY KEY, identity_id TEXT NOT NULL, issued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL, used_at BIGINT);
CREATE INDEX IF NOT EXISTS tokens_identity ON tokens (identity_id);
CREATE TABLE IF NOT EXISTS certs (
    n BIGSERIAL, serial TEXT PRIMARY KEY, identity_id TEXT NOT NULL, issued_at BIGINT NOT NULL,
    not_after BIGINT NOT NULL, revoked_at BIGINT);
CREATE INDEX IF NOT EXISTS certs_identity ON certs (identity_id);
CREATE TABLE IF NOT EXISTS changes (
    seq BIGINT PRIMARY KEY, at BIGINT NOT NULL, body TEXT NOT NULL,
    last_in_commit BOOLEAN NOT NULL DEFAULT TRUE);
CREATE TABLE IF NOT EXISTS audit (
    id BIGSERIAL PRIMARY KEY, at BIGINT NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL,
    origin TEXT NOT NULL DEFAULT 'operator');
CREATE INDEX IF NOT EXISTS audit_origin_at ON audit (origin, at);
";

/// Parses a connection URL into a configuration with Umbra's defaults (a connect timeout,
/// TCP keepalives, an application name). The error never contains the password.
pub(super) fn parse_url(url: &str) -> Result<Config, String> {
    let mut cfg: Config = url.parse().map_err(|e: ::postgres::Error| e.to_string())?;
    if cfg.get_ssl_mode() == SslMode::Require {
        return Err("sslmode=require: TLS to PostgreSQL is not supported yet; \
                    use loopback or a private network (sslmode=disable or prefer)"
            .into());
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("umbra-controller");
    }
    // A database host that vanishes (rather than closing connections) is noticed in seconds,
    // not at the kernel's default of minutes: an idle connection after about 9 s of silence,
    // one waiting for an answer after 5 s without an acknowledgement. The command lock is held
    // while the follower reads the log, so a query stuck on a dead connection would stall
    // every read of the controller (and, after a partition heals, its catching up) that long.
    cfg.keepalives(true);
    cfg.keepalives_idle(Duration::from_secs(5));
    cfg.keepalives_interval(Duration::from_secs(2));
    cfg.keepalives_retries(2);
    if cfg.get_tcp_user_timeout().is_none() {
        cfg.tcp_user_timeout(Duration::from_secs(5));
    }
    Ok(cfg)
}

/// Whether a PostgreSQL error means "the database cannot do this now, nothing was written"
/// (a lost or refused connection, a server shutting down, no resources, a lock wait that timed
/// out), rather than a mistake in what was asked.
fn is_transient(e: &::postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let c = code.code();
            // 08: connection exception; 53: insufficient resources (disk full, out of memory,
            // too many connections); 57P: the server is shutting down or starting.
            c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("57P")
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::LOCK_NOT_AVAILABLE
                || *code == SqlState::QUERY_CANCELED
        }
        // No SQLSTATE: the error came from the client side. Conversions and wrong queries are
        // mistakes; everything else (I/O, connecting, timeouts, a broken protocol stream) is
        // the connection's.
        None => {
            let s = e.to_string();
            !(s.starts_with("error serializing")
                || s.starts_with("invalid connection string")
                || s.starts_with("invalid configuration")
                || s.starts_with("error deserializing")
                || s.starts_with("invalid column")
                || s.starts_with("query returned an unexpected number of rows")
                || s.starts_with("expected "))
        }
    }
}

/// A PostgreSQL error as the controller's: unavailable (503) when transient, a database
/// failure (500) otherwise.
fn pg(e: ::postgres::Error) -> ControllerError {
    if is_transient(&e) {
        ControllerError::Unavailable(e.to_string())
    } else {
        ControllerError::Postgres(e)
    }
}

fn ts(v: i64) -> Timestamp {
    Timestamp(u64::try_from(v).unwrap_or(0))
}

fn sql_ts(t: Timestamp) -> i64 {
    i64::try_from(t.0).unwrap_or(i64::MAX)
}

fn sql_seq(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn identity_id(s: String) -> Result<IdentityId, ControllerError> {
    IdentityId::new(s).map_err(|e| ControllerError::Corrupt(e.to_string()))
}

/// Connects and sets the session's limits.
fn connect(config: &Config, what: &str) -> Result<Client, ControllerError> {
    let mut client = config.connect(NoTls).map_err(|e| {
        tracing::warn!(store = %what, error = %e, "cannot connect to PostgreSQL");
        pg(e)
    })?;
    client
        .batch_execute(&format!("SET lock_timeout = '{LOCK_TIMEOUT}'"))
        .map_err(pg)?;
    Ok(client)
}

/// Closes a connection where that is allowed: the blocking client owns a tokio runtime of its
/// own, and tokio refuses to drop a runtime on an async runtime's thread (a controller may be
/// dropped there, at shutdown), so there it is dropped on a thread of its own.
fn discard(client: Client) {
    if tokio::runtime::Handle::try_current().is_ok() {
        let spawned = std::thread::Builder::new()
            .name("umbra-pg-close".into())
            .spawn(move || drop(client));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot close a PostgreSQL connection on a thread; leaking it");
        }
    } else {
        drop(client);
    }
}

/// The PostgreSQL store (see the module documentation).
pub struct PostgresStore {
    config: Config,
    /// The URL with its password redacted, for logs.
    what: String,
    client: Option<Client>,
    /// Whether this session holds the write lock ([`Store::lock_writes`]).
    locked: bool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.what)
            .field("connected", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            discard(c);
        }
    }
}

impl PostgresStore {
    /// Connects to the database at `url` and creates the tables if they are missing (under the
    /// write lock, so that controllers starting together do not race on `CREATE`).
    pub fn open(url: &str) -> Result<PostgresStore, ControllerError> {
        let what = redact(url);
        let config = parse_url(url)
            .map_err(|reason| ControllerError::Invalid(format!("{what}: {reason}")))?;
        let mut store = PostgresStore {
            config,
            what,
            client: None,
            locked: false,
        };
        store.idempotent(|c| {
            let mut tx = c.transaction().map_err(pg)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
                .map_err(pg)?;
            tx.batch_execute(SCHEMA).map_err(pg)?;
            tx.commit().map_err(pg)
        })?;
        Ok(store)
    }

    /// The connection, made if there is none or the last one was lost.
    fn client(&mut self) -> Result<&mut Client, ControllerError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.lost();
        }
        let client = match self.client.take() {
            Some(c) => c,
            None => {
                let c = connect(&self.config, &self.what)?;
                tracing::info!(store = %self.what, "connected to PostgreSQL");
                c
            }
        };
        Ok(self.client.insert(client))
    }

    /// Forgets the connection (and with it the session's write lock, if it held it).
    fn lost(&mut self) {
        if let Some(c) = self.client.take() {
            tracing::warn!(store = %self.what, "PostgreSQL connection lost; reconnecting at the next call");
            discard(c);
        }
        self.locked = false;
    }

    /// Runs `f` once on the connection. After a transient failure the connection is probed:
    /// a dead one (the database restarted or went away; the client does not always notice by
    /// itself) is dropped, and the second value says so, so that an idempotent call may be
    /// retried on a fresh one. A live one (the failure was a lock wait, say) is kept.
    fn once<T>(
        &mut self,
        f: &mut impl FnMut(&mut Client) -> Result<T, ControllerError>,
    ) -> (Result<T, ControllerError>, bool) {
        let client = match self.client() {
            Ok(c) => c,
            Err(e) => return (Err(e), false),
        };
        let r = f(client);
        let dead = match &r {
            Err(ControllerError::Unavailable(_)) => {
                client.is_closed() || client.is_valid(PROBE_TIMEOUT).is_err()
            }
            _ => client.is_closed(),
        };
        if dead {
            self.lost();
        }
        (r, dead)
    }

    /// Runs `f`, which must be safe to run twice (a read, or a write that is the same done
    /// twice), retrying once on a fresh connection if the one it found had died meanwhile (the
    /// database restarted since the last call).
    /// Audit rows from `sql`, which takes an id (`$1`) and a limit (`$2`).
    fn audit_rows(
        &mut self,
        sql: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, ControllerError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        self.idempotent(|c| {
            let rows = c.query(sql, &[&after, &i64::from(limit)]).map_err(pg)?;
            rows.iter().map(audit_row).collect()
        })
    }

    fn idempotent<T>(
        &mut self,
        mut f: impl FnMut(&mut Client) -> Result<T, ControllerError>,
    ) -> Result<T, ControllerError> {
        let reused = self.client.is_some();
        match self.once(&mut f) {
            (Err(ControllerError::Unavailable(why)), true) if reused => {
                tracing::debug!(store = %self.what, %why, "retrying on a fresh connection");
                self.once(&mut f).0
            }
            (r, _) => r,
        }
    }

    /// Runs `f` in a transaction begun on a live connection (the `BEGIN` is retried like an
    /// idempotent call), committed if `f` succeeds and rolled back otherwise. Not retried once
    /// begun: if the connection is lost around `COMMIT`, whether it committed is unknown, and
    /// the caller learns it from the change log.
    fn transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Client) -> Result<T, ControllerError>,
    ) -> Result<T, ControllerError> {
        self.idempotent(|c| c.batch_execute("BEGIN").map_err(pg))?;
        // The connection the transaction was begun on, never a new one (which would run `f`
        // outside any transaction).
        let Some(client) = self.client.as_mut() else {
            return Err(ControllerError::Unavailable(
                "the connection was lost at BEGIN".into(),
            ));
        };
        let r = f(client).and_then(|v| client.batch_execute("COMMIT").map(|()| v).map_err(pg));
        // A failed transaction is rolled back on the server already if the connection is gone;
        // a connection that cannot even roll back is not used again.
        if r.is_err() && (client.batch_execute("ROLLBACK").is_err() || client.is_closed()) {
            self.lost();
        }
        r
    }
}

fn last_seq(c: &mut impl ::postgres::GenericClient) -> Result<u64, ControllerError> {
    let row = c
        .query_one("SELECT MAX(seq) FROM changes", &[])
        .map_err(pg)?;
    let seq: Option<i64> = row.try_get(0).map_err(pg)?;
    Ok(seq.map_or(0, |s| u64::try_from(s).unwrap_or(0)))
}

fn bodies<T: serde::de::DeserializeOwned>(
    c: &mut impl ::postgres::GenericClient,
    sql: &str,
) -> Result<Vec<T>, ControllerError> {
    let rows = c.query(sql, &[]).map_err(pg)?;
    rows.iter()
        .map(|r| {
            let body: String = r.try_get(0).map_err(pg)?;
            Ok(serde_json::from_str(&body)?)
        })
        .collect()
}

impl Store for PostgresStore {
    fn meta(&mut self, key: &str) -> Result<Option<String>, ControllerError> {
        self.idempotent(|c| {
            let row = c
                .query_opt("SELECT value FROM meta WHERE key = $1", &[&key])
                .map_err(pg)?;
            row.map(|r| r.try_get(0).map_err(pg)).transpose()
        })
    }

    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), ControllerError> {
        self.idempotent(|c| {
            c.execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&key, &value],
            )
            .map_err(pg)?;
            Ok(())
        })
    }

    /// One consistent snapshot (REPEATABLE READ): the state and the sequence it is at agree
    /// even while other controllers commit.
    fn load(&mut self, epoch: String, now: Timestamp) -> Result<Replica, ControllerError> {
        self.idempotent(|c| {
            let mut tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(pg)?;
            let mut state = State::default();
            for i in bodies::<Identity>(&mut tx, "SELECT body FROM identities")? {
                state.identities.insert(i.id.clone(), i);
            }
            for s in bodies::<Service>(&mut tx, "SELECT body FROM services")? {
                state.services.insert(s.name.clone(), s);
            }
            for p in bodies::<ServicePolicy>(&mut tx, "SELECT body FROM policies")? {
                state.policies.insert(p.name.clone(), p);
            }
            let mut replica = Replica {
                epoch: epoch.clone(),
                seq: last_seq(&mut tx)?,
                state,
                ..Default::default()
            };
            for r in bodies::<RouterInfo>(&mut tx, "SELECT body FROM routers")? {
                replica.routers.insert(r.id.clone(), r);
            }
            let rows = tx
                .query(
                    "SELECT serial, identity_id, not_after FROM certs \
                     WHERE revoked_at IS NOT NULL AND not_after > $1",
                    &[&sql_ts(now)],
                )
                .map_err(pg)?;
            for row in rows {
                let serial: String = row.try_get(0).map_err(pg)?;
                let identity = identity_id(row.try_get(1).map_err(pg)?)?;
                let not_after: i64 = row.try_get(2).map_err(pg)?;
                replica.revoked.insert(
                    serial.clone(),
                    RevokedCert {
                        serial,
                        identity,
                        not_after: ts(not_after),
                    },
                );
            }
            tx.commit().map_err(pg)?;
            Ok(replica)
        })
    }

    fn last_seq(&mut self) -> Result<u64, ControllerError> {
        self.idempotent(last_seq)
    }

    /// Read in one snapshot, so that a trim committed meanwhile by another controller cannot
    /// leave a gap between what was checked and what is returned.
    fn changes_since(&mut self, seq: u64) -> Result<Option<Vec<Delta>>, ControllerError> {
        self.idempotent(|c| {
            let mut tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(pg)?;
            let last = last_seq(&mut tx)?;
            if last.saturating_sub(seq) > MAX_REPLAY || seq > last {
                return Ok(None);
            }
            let first: Option<i64> = tx
                .query_one("SELECT MIN(seq) FROM changes", &[])
                .map_err(pg)?
                .try_get(0)
                .map_err(pg)?;
            if seq < last && first.is_some_and(|f| u64::try_from(f).unwrap_or(0) > seq + 1) {
                return Ok(None);
            }
            let rows = tx
                .query(
                    "SELECT seq, at, body, last_in_commit FROM changes WHERE seq > $1 ORDER BY seq",
                    &[&sql_seq(seq)],
                )
                .map_err(pg)?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let body: String = row.try_get(2).map_err(pg)?;
                out.push(Delta {
                    seq: u64::try_from(row.try_get::<_, i64>(0).map_err(pg)?).unwrap_or(0),
                    at: ts(row.try_get(1).map_err(pg)?),
                    change: serde_json::from_str(&body)?,
                    last_in_commit: row.try_get(3).map_err(pg)?,
                });
            }
            tx.commit().map_err(pg)?;
            Ok(Some(out))
        })
    }

    fn token(&mut self, jti: &str) -> Result<Option<TokenRow>, ControllerError> {
        self.idempotent(|c| {
            let Some(row) = c
                .query_opt(
                    "SELECT identity_id, used_at FROM tokens WHERE jti = $1",
                    &[&jti],
                )
                .map_err(pg)?
            else {
                return Ok(None);
            };
            let used_at: Option<i64> = row.try_get(1).map_err(pg)?;
            Ok(Some(TokenRow {
                identity: identity_id(row.try_get(0).map_err(pg)?)?,
                used_at: used_at.map(ts),
            }))
        })
    }

    fn cert_owner(&mut self, serial: &str) -> Result<Option<(IdentityId, bool)>, ControllerError> {
        self.idempotent(|c| {
            let Some(row) = c
                .query_opt(
                    "SELECT identity_id, revoked_at IS NOT NULL FROM certs WHERE serial = $1",
                    &[&serial],
                )
                .map_err(pg)?
            else {
                return Ok(None);
            };
            let id = identity_id(row.try_get(0).map_err(pg)?)?;
            Ok(Some((id, row.try_get(1).map_err(pg)?)))
        })
    }

    fn certs_of(&mut self, identity: &IdentityId) -> Result<Vec<CertInfo>, ControllerError> {
        self.idempotent(|c| {
            let rows = c
                .query(
                    "SELECT serial, issued_at, not_after, revoked_at IS NOT NULL FROM certs \
                     WHERE identity_id = $1 ORDER BY issued_at DESC, n DESC",
                    &[&identity.as_str()],
                )
                .map_err(pg)?;
            rows.iter()
                .map(|r| {
                    Ok(CertInfo {
                        serial: r.try_get(0).map_err(pg)?,
                        issued_at: ts(r.try_get(1).map_err(pg)?),
                        not_after: ts(r.try_get(2).map_err(pg)?),
                        revoked: r.try_get(3).map_err(pg)?,
                    })
                })
                .collect()
        })
    }

    fn enrolled_ids(&mut self) -> Result<HashSet<String>, ControllerError> {
        self.idempotent(|c| {
            let rows = c
                .query("SELECT DISTINCT identity_id FROM certs", &[])
                .map_err(pg)?;
            rows.iter().map(|r| r.try_get(0).map_err(pg)).collect()
        })
    }

    fn live_certs_of(
        &mut self,
        identity: &IdentityId,
        now: Timestamp,
    ) -> Result<Vec<RevokedCert>, ControllerError> {
        self.idempotent(|c| {
            let rows = c
                .query(
                    "SELECT serial, not_after FROM certs \
                     WHERE identity_id = $1 AND revoked_at IS NULL AND not_after > $2",
                    &[&identity.as_str(), &sql_ts(now)],
                )
                .map_err(pg)?;
            rows.iter()
                .map(|r| {
                    Ok(RevokedCert {
                        serial: r.try_get(0).map_err(pg)?,
                        identity: identity.clone(),
                        not_after: ts(r.try_get(1).map_err(pg)?),
                    })
                })
                .collect()
        })
    }

    fn audit(&mut self, limit: u32) -> Result<Vec<AuditEntry>, ControllerError> {
        self.audit_rows(
            "SELECT id, at, actor, action, target, detail FROM \
             (SELECT * FROM audit ORDER BY id DESC LIMIT $2) AS newest WHERE id > $1 ORDER BY id",
            0,
            limit,
        )
    }

    fn audit_after(&mut self, after: u64, limit: u32) -> Result<Vec<AuditEntry>, ControllerError> {
        self.audit_rows(
            "SELECT id, at, actor, action, target, detail FROM audit \
             WHERE id > $1 ORDER BY id LIMIT $2",
            after,
            limit,
        )
    }

    fn audit_ids(&mut self, ids: &[u64]) -> Result<Vec<AuditEntry>, ControllerError> {
        let ids: Vec<i64> = ids.iter().filter_map(|&i| i64::try_from(i).ok()).collect();
        self.idempotent(|c| {
            let rows = c
                .query(
                    "SELECT id, at, actor, action, target, detail FROM audit \
                     WHERE id = ANY($1) ORDER BY id",
                    &[&ids],
                )
                .map_err(pg)?;
            rows.iter().map(audit_row).collect()
        })
    }

    fn audit_span(&mut self, after: u64) -> Result<(u64, u64), ControllerError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        self.idempotent(|c| {
            let r = c
                .query_one(
                    "SELECT (SELECT COUNT(*) FROM audit WHERE id > $1), \
                     (SELECT COALESCE(MAX(id), 0) FROM audit)",
                    &[&after],
                )
                .map_err(pg)?;
            let (n, max): (i64, i64) = (r.try_get(0).map_err(pg)?, r.try_get(1).map_err(pg)?);
            Ok((n.max(0) as u64, max.max(0) as u64))
        })
    }

    fn commit(
        &mut self,
        batch: &Batch,
        seq: u64,
        now: Timestamp,
    ) -> Result<Vec<Delta>, ControllerError> {
        self.transaction(|c| commit_in(c, batch, seq, now))
    }

    fn lock_writes(&mut self) -> Result<(), ControllerError> {
        if self.locked && self.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        self.idempotent(|c| {
            c.execute("SELECT pg_advisory_lock($1)", &[&COMMAND_LOCK])
                .map_err(pg)
        })?;
        self.locked = true;
        Ok(())
    }

    fn unlock_writes(&mut self) {
        if !self.locked {
            return;
        }
        self.locked = false;
        let Some(client) = self.client.as_mut() else {
            return;
        };
        if let Err(e) = client.execute("SELECT pg_advisory_unlock($1)", &[&COMMAND_LOCK]) {
            // Dropping the session is what releases the lock for certain.
            tracing::warn!(store = %self.what, error = %e, "cannot release the write lock; closing the connection");
            self.lost();
        }
    }

    fn try_lead(&mut self, key: i64) -> Result<bool, ControllerError> {
        self.idempotent(|c| {
            let row = c
                .query_one(
                    "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                     AND pid = pg_backend_pid() AND granted AND objsubid = 1 \
                     AND classid::bigint = ($1::bigint >> 32) \
                     AND objid::bigint = ($1::bigint & 4294967295)) \
                     THEN true ELSE pg_try_advisory_lock($1::bigint) END",
                    &[&key],
                )
                .map_err(pg)?;
            row.try_get::<_, bool>(0).map_err(pg)
        })
    }

    fn append_agent_events(&mut self, events: &[AgentEvent]) -> Result<(), ControllerError> {
        if events.is_empty() {
            return Ok(());
        }
        self.transaction(|c| {
            let stmt = c
                .prepare(
                    "INSERT INTO audit (at, actor, action, target, detail, origin) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .map_err(pg)?;
            for e in events {
                c.execute(
                    &stmt,
                    &[
                        &sql_ts(e.at),
                        &e.actor,
                        &e.action,
                        &e.target,
                        &e.detail,
                        &AGENT_ORIGIN,
                    ],
                )
                .map_err(pg)?;
            }
            Ok(())
        })
    }

    fn prune_agent_events(
        &mut self,
        before: Option<Timestamp>,
        keep: u64,
    ) -> Result<u64, ControllerError> {
        self.idempotent(|c| {
            let mut deleted = 0;
            if let Some(before) = before {
                deleted += c
                    .execute(
                        "DELETE FROM audit WHERE origin = $1 AND at < $2",
                        &[&AGENT_ORIGIN, &sql_ts(before)],
                    )
                    .map_err(pg)?;
            }
            let n: i64 = c
                .query_one(
                    "SELECT COUNT(*) FROM audit WHERE origin = $1",
                    &[&AGENT_ORIGIN],
                )
                .map_err(pg)?
                .try_get(0)
                .map_err(pg)?;
            let over = u64::try_from(n).unwrap_or(0).saturating_sub(keep);
            if over > 0 {
                deleted += c
                    .execute(
                        "DELETE FROM audit WHERE id IN \
                         (SELECT id FROM audit WHERE origin = $1 ORDER BY at, id LIMIT $2)",
                        &[&AGENT_ORIGIN, &sql_seq(over)],
                    )
                    .map_err(pg)?;
            }
            Ok(deleted)
        })
    }
}

/// Prepared statements of one commit, made the first time each is needed (a large apply runs
/// the same few statements many thousand times).
struct Statements<'a> {
    client: &'a mut Client,
    made: Vec<(&'static str, Statement)>,
}

impl Statements<'_> {
    fn run(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ::postgres::types::ToSql + Sync)],
    ) -> Result<u64, ControllerError> {
        let stmt = match self.made.iter().find(|(s, _)| *s == sql) {
            Some((_, stmt)) => stmt.clone(),
            None => {
                let stmt = self.client.prepare(sql).map_err(pg)?;
                self.made.push((sql, stmt.clone()));
                stmt
            }
        };
        self.client.execute(&stmt, params).map_err(pg)
    }
}

/// The body of a commit, inside the transaction `BEGIN` opened on `client`.
fn commit_in(
    client: &mut Client,
    batch: &Batch,
    seq: u64,
    now: Timestamp,
) -> Result<Vec<Delta>, ControllerError> {
    client
        .execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
        .map_err(pg)?;
    // A statement after the lock: under READ COMMITTED its snapshot includes every commit that
    // released the lock before us.
    let found = last_seq(client)?;
    if found != seq {
        return Err(ControllerError::Stale {
            expected: seq,
            found,
        });
    }
    let mut st = Statements {
        client,
        made: Vec::new(),
    };
    let now_sql = sql_ts(now);
    let n = batch.changes.len();
    let mut deltas = Vec::with_capacity(n);
    for (i, change) in batch.changes.iter().enumerate() {
        persist_change(&mut st, change, now_sql)?;
        let seq = seq + 1 + i as u64;
        let last_in_commit = i + 1 == n;
        st.run(
            "INSERT INTO changes (seq, at, body, last_in_commit) VALUES ($1, $2, $3, $4)",
            &[
                &sql_seq(seq),
                &now_sql,
                &serde_json::to_string(change)?,
                &last_in_commit,
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
        st.run(
            "DELETE FROM changes WHERE seq <= $1",
            &[&sql_seq(last.saturating_sub(MAX_REPLAY))],
        )?;
    }
    for record in &batch.records {
        match record {
            Record::Token {
                jti,
                identity,
                expires_at,
            } => {
                st.run(
                    "UPDATE tokens SET used_at = $2 WHERE identity_id = $1 AND used_at IS NULL",
                    &[&identity.as_str(), &now_sql],
                )?;
                st.run(
                    "INSERT INTO tokens (jti, identity_id, issued_at, expires_at) VALUES ($1, $2, $3, $4)",
                    &[jti, &identity.as_str(), &now_sql, &sql_ts(*expires_at)],
                )?;
            }
            Record::TokenUsed { jti } => {
                let n = st.run(
                    "UPDATE tokens SET used_at = $2 WHERE jti = $1 AND used_at IS NULL",
                    &[jti, &now_sql],
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
                st.run(
                    "INSERT INTO certs (serial, identity_id, issued_at, not_after) VALUES ($1, $2, $3, $4)",
                    &[serial, &identity.as_str(), &now_sql, &sql_ts(*not_after)],
                )?;
            }
        }
    }
    for a in &batch.audit {
        st.run(
            "INSERT INTO audit (at, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5)",
            &[
                &now_sql,
                &a.actor,
                &a.action,
                &a.target,
                &a.detail.to_string(),
            ],
        )?;
    }
    if n > 0 {
        // Delivered to listeners when (and only if) the transaction commits.
        st.run("SELECT pg_notify($1, $2)", &[&CHANNEL, &last.to_string()])?;
    }
    Ok(deltas)
}

fn persist_change(
    st: &mut Statements<'_>,
    change: &ChangeEvent,
    now: i64,
) -> Result<(), ControllerError> {
    match change {
        ChangeEvent::IdentityPut { identity } => {
            st.run(
                "INSERT INTO identities (id, name, body) VALUES ($1, $2, $3) \
                 ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, body = EXCLUDED.body",
                &[
                    &identity.id.as_str(),
                    &identity.name.as_str(),
                    &serde_json::to_string(identity)?,
                ],
            )?;
        }
        ChangeEvent::IdentityDeleted { id } => {
            st.run("DELETE FROM identities WHERE id = $1", &[&id.as_str()])?;
            st.run("DELETE FROM tokens WHERE identity_id = $1", &[&id.as_str()])?;
            st.run("DELETE FROM routers WHERE id = $1", &[&id.as_str()])?;
        }
        ChangeEvent::ServicePut { service } => {
            st.run(
                "INSERT INTO services (name, body) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body",
                &[&service.name.as_str(), &serde_json::to_string(service)?],
            )?;
        }
        ChangeEvent::ServiceDeleted { name } => {
            st.run("DELETE FROM services WHERE name = $1", &[&name.as_str()])?;
        }
        ChangeEvent::PolicyPut { policy } => {
            st.run(
                "INSERT INTO policies (name, body) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body",
                &[&policy.name.as_str(), &serde_json::to_string(policy)?],
            )?;
        }
        ChangeEvent::PolicyDeleted { name } => {
            st.run("DELETE FROM policies WHERE name = $1", &[&name.as_str()])?;
        }
        ChangeEvent::CertRevoked { cert } => {
            st.run(
                "UPDATE certs SET revoked_at = $2 WHERE serial = $1 AND revoked_at IS NULL",
                &[&cert.serial, &now],
            )?;
        }
        ChangeEvent::RouterPut { router } => {
            st.run(
                "INSERT INTO routers (id, body) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
                &[&router.id.as_str(), &serde_json::to_string(router)?],
            )?;
        }
        ChangeEvent::RouterDeleted { id } => {
            st.run("DELETE FROM routers WHERE id = $1", &[&id.as_str()])?;
        }
    }
    Ok(())
}

/// A connection that `LISTEN`s on [`CHANNEL`], made again after it is lost.
pub(super) struct Listener {
    config: Config,
    what: String,
    client: Option<Client>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            discard(c);
        }
    }
}

impl Listener {
    /// Connects and starts listening.
    pub(super) fn connect(url: &str) -> Result<Listener, ControllerError> {
        let what = redact(url);
        let config = parse_url(url)
            .map_err(|reason| ControllerError::Invalid(format!("{what}: {reason}")))?;
        let mut l = Listener {
            config,
            what,
            client: None,
        };
        l.listen()?;
        Ok(l)
    }

    fn listen(&mut self) -> Result<(), ControllerError> {
        let mut client = connect(&self.config, &self.what)?;
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .map_err(pg)?;
        self.client = Some(client);
        Ok(())
    }

    pub(super) fn wait(&mut self, timeout: Duration) -> Result<bool, ControllerError> {
        let client = match self.client.as_mut() {
            Some(c) if !c.is_closed() => c,
            _ => {
                if let Some(c) = self.client.take() {
                    discard(c);
                }
                let started = Instant::now();
                return match self.listen() {
                    // Notifications sent while it was away are lost: the caller catches up.
                    Ok(()) => Ok(true),
                    Err(e) => {
                        let pause = timeout.min(Duration::from_secs(1));
                        std::thread::sleep(pause.saturating_sub(started.elapsed()));
                        Err(e)
                    }
                };
            }
        };
        let started = Instant::now();
        let first = {
            let mut notifications = client.notifications();
            let first = notifications.timeout_iter(timeout).next();
            if let Ok(Some(_)) = first {
                // Many commits, one wake-up: the caller reads everything new at once.
                while let Ok(Some(_)) = notifications.iter().next() {}
            }
            first
        };
        let woke = match first {
            Ok(woke) => woke.is_some(),
            Err(e) => {
                if let Some(c) = self.client.take() {
                    discard(c);
                }
                tracing::warn!(store = %self.what, error = %e, "lost the PostgreSQL notification connection");
                return Err(pg(e));
            }
        };
        // Nothing, and before the time was up: the server ended the connection (the client
        // does not always mark itself closed).
        let ended = !woke && started.elapsed() + Duration::from_millis(5) < timeout;
        if ended || client.is_closed() {
            if let Some(c) = self.client.take() {
                discard(c);
            }
            tracing::warn!(store = %self.what, "lost the PostgreSQL notification connection");
            return Err(ControllerError::Unavailable(
                "the notification connection was closed".into(),
            ));
        }
        Ok(woke)
    }
}

/// An audit row read as `id, at, actor, action, target, detail`.
fn audit_row(r: &::postgres::Row) -> Result<AuditEntry, ControllerError> {
    let detail: String = r.try_get(5).map_err(pg)?;
    Ok(AuditEntry {
        id: u64::try_from(r.try_get::<_, i64>(0).map_err(pg)?).unwrap_or(0),
        at: ts(r.try_get(1).map_err(pg)?),
        actor: r.try_get(2).map_err(pg)?,
        action: r.try_get(3).map_err(pg)?,
        target: r.try_get(4).map_err(pg)?,
        detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
    })
}
