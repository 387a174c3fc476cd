//! Durable state: the model, enrollment tokens, issued certificates, the ordered change log that
//! the control channel replays, and the audit log, behind one trait with two implementations of
//! the same semantics: embedded SQLite (one machine, the default) and PostgreSQL (several
//! controllers sharing one database).
//!
//! Every write is one transaction that persists the model changes, appends them to the change log
//! with their sequence numbers, and records the audit entries, so either all of a command takes
//! effect or none of it does. A commit names the sequence number its batch was built on; if the
//! change log has moved past it (another controller committed first), nothing is written and the
//! caller gets [`ControllerError::Stale`], so a command can never be committed over a state it did
//! not see.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use umbra_policies::{IdentityId, Timestamp};
use umbra_proto::api::{AuditEntry, CertInfo};
use umbra_proto::{ChangeEvent, Delta, Replica, RevokedCert};

use crate::error::ControllerError;

mod postgres;
mod sqlite;

pub use self::postgres::PostgresStore;
pub use self::sqlite::SqliteStore;

/// The most deltas replayed to a resuming follower; further behind, it gets a snapshot.
pub const MAX_REPLAY: u64 = 10_000;

/// The change log keeps the last [`MAX_REPLAY`] changes (older ones could never be replayed)
/// and is trimmed whenever a commit crosses a multiple of this many, so that it stays bounded
/// without a delete in every commit.
pub const TRIM_EVERY: u64 = 1024;

/// The `origin` of audit rows written for events identities report (and their summaries);
/// retention and the row cap delete only these.
pub const AGENT_ORIGIN: &str = "agent";

/// An audit record before it is stored.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    /// Who acted: a SPIFFE id, or `controller`.
    pub actor: String,
    /// What was done, e.g. `identity.create`.
    pub action: &'static str,
    /// On what.
    pub target: String,
    /// Details as JSON; never a secret.
    pub detail: serde_json::Value,
}

/// An event an identity reported about itself, stored as an `agent` audit row by the audit
/// writer (never under the command lock, never in a command's transaction).
#[derive(Debug, Clone)]
pub struct AgentEvent {
    /// When the controller received it.
    pub at: Timestamp,
    /// The reporting identity's SPIFFE id.
    pub actor: String,
    /// The event kind, e.g. `sandbox.dns_refused`.
    pub action: &'static str,
    /// The sandbox it concerns.
    pub target: String,
    /// Details as JSON text.
    pub detail: String,
}

/// Bookkeeping that is not part of the replicated model.
#[derive(Debug, Clone)]
pub enum Record {
    /// A new enrollment token; earlier unused tokens of the same identity stop working.
    Token {
        /// The token's nonce.
        jti: String,
        /// The identity it enrolls.
        identity: IdentityId,
        /// When it stops working.
        expires_at: Timestamp,
    },
    /// A token was spent. The commit fails with a conflict, writing nothing, if it already was
    /// (by this controller or another one on the same database).
    TokenUsed {
        /// The token's nonce.
        jti: String,
    },
    /// A certificate was issued.
    Cert {
        /// Its serial number.
        serial: String,
        /// The identity it names.
        identity: IdentityId,
        /// When it expires.
        not_after: Timestamp,
    },
}

/// Everything one command writes.
#[derive(Debug, Default)]
pub struct Batch {
    /// Model changes, replicated to routers in this order.
    pub changes: Vec<ChangeEvent>,
    /// Local bookkeeping.
    pub records: Vec<Record>,
    /// Audit entries.
    pub audit: Vec<AuditRecord>,
}

impl Batch {
    /// Whether the batch writes nothing at all.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.records.is_empty() && self.audit.is_empty()
    }
}

/// A token row.
#[derive(Debug, Clone)]
pub struct TokenRow {
    /// The identity it enrolls.
    pub identity: IdentityId,
    /// When it was spent or superseded by a newer token, if it was.
    pub used_at: Option<Timestamp>,
}

/// Durable state, whichever the engine. Every method is blocking (run it on a blocking
/// thread, never on an async runtime's worker) and takes `&mut self` because a database
/// connection is used by one caller at a time.
///
/// Object-safe: the controller holds a `Box<dyn Store>` chosen by [`StoreConfig::open`].
/// An error for a database that cannot be reached is [`ControllerError::Unavailable`] (503 at
/// the API); the next call tries to reconnect, so a database that restarts is used again
/// without restarting the controller.
pub trait Store: Send {
    /// Reads a metadata value (trust domain, epoch, address, the CA's fingerprint).
    fn meta(&mut self, key: &str) -> Result<Option<String>, ControllerError>;

    /// Writes a metadata value.
    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), ControllerError>;

    /// Loads everything the controller keeps in memory: the model, routers, and the
    /// certificates revoked and not yet expired at `now`, at the change log's last sequence.
    fn load(&mut self, epoch: String, now: Timestamp) -> Result<Replica, ControllerError>;

    /// The sequence number of the last committed change (0 when there is none).
    fn last_seq(&mut self) -> Result<u64, ControllerError>;

    /// The changes after `seq`, in order, or `None` when they are no longer all kept, `seq` is
    /// ahead of the log, or they are more than [`MAX_REPLAY`] (a snapshot is then cheaper and
    /// bounded).
    fn changes_since(&mut self, seq: u64) -> Result<Option<Vec<Delta>>, ControllerError>;

    /// Looks up a token by its nonce.
    fn token(&mut self, jti: &str) -> Result<Option<TokenRow>, ControllerError>;

    /// The identity a certificate was issued to, and whether it was revoked.
    fn cert_owner(&mut self, serial: &str) -> Result<Option<(IdentityId, bool)>, ControllerError>;

    /// Certificates issued to an identity, newest first.
    fn certs_of(&mut self, identity: &IdentityId) -> Result<Vec<CertInfo>, ControllerError>;

    /// The set of identity ids that have enrolled.
    fn enrolled_ids(&mut self) -> Result<HashSet<String>, ControllerError>;

    /// Unrevoked, unexpired certificates of an identity (what revoking it must add to the list).
    fn live_certs_of(
        &mut self,
        identity: &IdentityId,
        now: Timestamp,
    ) -> Result<Vec<RevokedCert>, ControllerError>;

    /// The newest audit entries, newest last.
    fn audit(&mut self, limit: u32) -> Result<Vec<AuditEntry>, ControllerError>;

    /// Audit entries with an id above `after`, oldest first, at most `limit`: what an event
    /// sink or an `audit --follow` has not seen yet (ids only grow).
    fn audit_after(&mut self, after: u64, limit: u32) -> Result<Vec<AuditEntry>, ControllerError>;

    /// How many audit entries have an id above `after`, and the largest id of all (0 when the
    /// log is empty): how far behind a reader is.
    fn audit_span(&mut self, after: u64) -> Result<(u64, u64), ControllerError>;

    /// The audit entries among `ids` that exist now, oldest first: a reader on a shared store
    /// looks again for ids it saw missing, which a transaction still open held then.
    fn audit_ids(&mut self, ids: &[u64]) -> Result<Vec<AuditEntry>, ControllerError>;

    /// Commits a batch in one transaction; its changes get the sequence numbers after `seq`,
    /// which must be the change log's last sequence: otherwise another writer committed since
    /// the batch was built, nothing is written and the error is [`ControllerError::Stale`].
    /// A record that cannot be applied (a token already spent) fails the whole batch with
    /// nothing written. Returns the deltas as committed.
    ///
    /// [`ControllerError::Unavailable`] from a commit means the outcome is unknown (the
    /// connection can be lost after the database committed): the caller must not apply the
    /// batch to its replica, and learns what happened from the change log (catching up by
    /// sequence brings the batch in if it was committed).
    fn commit(
        &mut self,
        batch: &Batch,
        seq: u64,
        now: Timestamp,
    ) -> Result<Vec<Delta>, ControllerError>;

    /// Serializes whole commands across every controller on this database: held from before a
    /// command reads the state until after its commit, so that no other controller's command
    /// commits in between (which [`Store::commit`] would otherwise refuse as stale). A
    /// controller takes it on a store opened for it alone, not the one it commits on (see
    /// `postgres`: the two locks have different keys). A no-op where one
    /// process owns the database (SQLite, whose controller already holds its command mutex).
    /// Taking it again while held is a no-op. Waiting longer than the lock timeout (30 s on
    /// PostgreSQL) fails as [`ControllerError::Unavailable`]. If the connection is lost while
    /// it is held, the lock is gone and a later commit is still checked by sequence.
    fn lock_writes(&mut self) -> Result<(), ControllerError>;

    /// Releases [`Store::lock_writes`]. Never fails: if the connection is gone, so is the lock,
    /// and if releasing fails otherwise the connection is dropped, which releases it.
    fn unlock_writes(&mut self);

    /// Whether this connection holds the session-level lock `key`, taking it if it is free: how
    /// one controller among several on a shared store leads a named task (an event sink). Held
    /// until the connection closes; asking again while holding it takes nothing more. Always
    /// true where one process owns the store (SQLite).
    fn try_lead(&mut self, key: i64) -> Result<bool, ControllerError>;

    /// Stores reported events as `agent` audit rows, in one transaction.
    fn append_agent_events(&mut self, events: &[AgentEvent]) -> Result<(), ControllerError>;

    /// Deletes `agent` audit rows older than `before` (when given), then the oldest ones above
    /// `keep`; never an `operator` row. Returns how many rows went.
    fn prune_agent_events(
        &mut self,
        before: Option<Timestamp>,
        keep: u64,
    ) -> Result<u64, ControllerError>;
}

/// Where a controller keeps its state: `sqlite:PATH` (one controller, the default
/// `DIR/umbra.db`) or `postgres://…` (several controllers sharing one database).
///
/// The PostgreSQL form is a libpq-style URL; its password is never shown: `Debug` and `Display`
/// replace it with `...`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// An SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (`postgres://` or `postgresql://`).
    Postgres(String),
}

/// Why a `--store` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreConfigError {
    /// Neither `sqlite:` nor `postgres://` / `postgresql://`.
    #[error("a store is sqlite:PATH or postgres://USER@HOST:PORT/DB, got {0:?}")]
    Scheme(String),
    /// `sqlite:` with no path.
    #[error("sqlite: needs a path, as in sqlite:/var/lib/umbra/umbra.db")]
    EmptyPath,
    /// The PostgreSQL URL does not parse.
    #[error("invalid PostgreSQL URL {url}: {reason}")]
    Url {
        /// The URL, password redacted.
        url: String,
        /// What is wrong.
        reason: String,
    },
}

impl FromStr for StoreConfig {
    type Err = StoreConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("sqlite:") {
            // `sqlite://PATH` is a common spelling too.
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(StoreConfigError::EmptyPath);
            }
            return Ok(StoreConfig::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            postgres::parse_url(s).map_err(|reason| StoreConfigError::Url {
                url: redact(s),
                reason,
            })?;
            return Ok(StoreConfig::Postgres(s.to_owned()));
        }
        Err(StoreConfigError::Scheme(redact(s)))
    }
}

impl fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreConfig::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            StoreConfig::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreConfig::Sqlite(p) => f.debug_tuple("Sqlite").field(p).finish(),
            StoreConfig::Postgres(url) => f.debug_tuple("Postgres").field(&redact(url)).finish(),
        }
    }
}

/// A URL with its password (in the authority or as a `password=` parameter) replaced by `...`.
fn redact(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    // The authority ends at the first '/', '?' or '#'; its user info at its last '@'.
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (info, host) = authority.split_at(at);
            match info.find(':') {
                Some(colon) => format!("{}:...{host}", &info[..colon]),
                None => authority.to_owned(),
            }
        }
        None => authority.to_owned(),
    };
    let tail = match tail.find('?') {
        Some(q) => {
            let (path, query) = tail.split_at(q + 1);
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=..."),
                    _ => p.to_owned(),
                })
                .collect();
            format!("{path}{}", params.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}{authority}{tail}")
}

impl StoreConfig {
    /// Opens the store, creating its tables if they are missing (idempotent, and safe when
    /// several controllers start at once).
    pub fn open(&self) -> Result<Box<dyn Store>, ControllerError> {
        match self {
            StoreConfig::Sqlite(path) => Ok(Box::new(SqliteStore::open(path)?)),
            StoreConfig::Postgres(url) => Ok(Box::new(PostgresStore::open(url)?)),
        }
    }

    /// Whether several controllers may share this store (PostgreSQL), rather than one process
    /// owning it (SQLite).
    pub fn is_shared(&self) -> bool {
        matches!(self, StoreConfig::Postgres(_))
    }

    /// A watcher that wakes when another controller commits. On PostgreSQL it holds a
    /// connection of its own that `LISTEN`s; create it before loading the state and catch up
    /// by sequence after every wake-up (a notification says only that something was committed,
    /// and one missed while reconnecting is made up for by the catch-up).
    pub fn commit_watcher(&self) -> Result<CommitWatcher, ControllerError> {
        match self {
            StoreConfig::Sqlite(_) => Ok(CommitWatcher(Watch::Alone)),
            StoreConfig::Postgres(url) => Ok(CommitWatcher(Watch::Postgres(Box::new(
                postgres::Listener::connect(url)?,
            )))),
        }
    }
}

/// Wakes when another controller commits to the shared store (see
/// [`StoreConfig::commit_watcher`]).
pub struct CommitWatcher(Watch);

enum Watch {
    /// SQLite: one process owns the database, nobody else commits.
    Alone,
    Postgres(Box<postgres::Listener>),
}

impl fmt::Debug for CommitWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.0 {
            Watch::Alone => "sqlite",
            Watch::Postgres(_) => "postgres",
        };
        f.debug_tuple("CommitWatcher").field(&kind).finish()
    }
}

impl CommitWatcher {
    /// Blocks for at most `timeout`; `Ok(true)` when another controller may have committed
    /// (a notification came, or the watcher reconnected and may have missed some), `Ok(false)`
    /// when the time passed quietly. An error means the database is unreachable: the next call
    /// reconnects (after at least a short pause, so a caller retrying in a loop does not spin).
    pub fn wait(&mut self, timeout: Duration) -> Result<bool, ControllerError> {
        match &mut self.0 {
            Watch::Alone => {
                std::thread::sleep(timeout);
                Ok(false)
            }
            Watch::Postgres(l) => l.wait(timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_parse_and_never_show_a_password() {
        let s: StoreConfig = "sqlite:/var/lib/umbra/umbra.db".parse().unwrap();
        assert_eq!(s, StoreConfig::Sqlite("/var/lib/umbra/umbra.db".into()));
        assert!(!s.is_shared());
        let p: StoreConfig = "postgres://umbra:hunter2@db.internal:5432/umbra"
            .parse()
            .unwrap();
        assert!(p.is_shared());
        for shown in [p.to_string(), format!("{p:?}")] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(
                shown.contains("umbra:...@db.internal:5432/umbra"),
                "{shown}"
            );
        }
        let q: StoreConfig = "postgresql://umbra@127.0.0.1/umbra?password=hunter2&sslmode=disable"
            .parse()
            .unwrap();
        let shown = format!("{q} {q:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("sslmode=disable"), "{shown}");
        assert!(matches!(
            "mysql://root:pw@x/db".parse::<StoreConfig>(),
            Err(StoreConfigError::Scheme(s)) if !s.contains("pw")
        ));
        assert_eq!(
            "sqlite:".parse::<StoreConfig>(),
            Err(StoreConfigError::EmptyPath)
        );
    }
}
