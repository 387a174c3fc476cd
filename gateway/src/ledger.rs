//! The token ledger: what each identity spent through each grant, per calendar period, and an
//! audit record of every request.
//!
//! Budgets are enforced with reservations: a request takes, before it goes upstream, the most
//! it may spend (its prompt estimate plus its output cap, clamped to what is left), so concurrent
//! requests cannot together overspend by more than one reservation. When it ends, the
//! reservation is replaced by what the provider reported. Spending is stored in SQLite and
//! survives a restart; so does every reservation (a `holds` row, written before the request
//! goes upstream and deleted in the transaction that records what it spent), so a gateway that
//! crashes mid-request cannot lose what the provider billed: at the next start each leftover
//! hold is charged in full, as an `interrupted` record, and the ledger balances. The database
//! runs in WAL mode with `synchronous=NORMAL`: a process crash loses nothing, a power loss at
//! most the last moments of records, and no request waits for a disk flush.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection};
use umbra_policies::{Period, Timestamp};

use crate::meter::Usage;

/// Why the ledger failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// SQLite reported an error.
    #[error("ledger: {0}")]
    Db(#[from] rusqlite::Error),
    /// The ledger file could not be created, or its path names a directory, socket or dangling
    /// link (see `umbra_pki::outfile`).
    #[error("ledger: {0}")]
    File(#[from] umbra_pki::OutFileError),
    /// The path names a FIFO or a device: SQLite needs a regular file it can seek and lock.
    #[error("ledger: {}: not a regular file", .0.display())]
    NotRegular(PathBuf),
}

/// One grant's budget for one identity in one period.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Bucket {
    /// The identity id.
    pub identity: String,
    /// The granting policy.
    pub policy: String,
    /// The period's start (seconds since the epoch, UTC).
    pub period_start: u64,
}

impl Bucket {
    /// The bucket of `identity` under `policy` for the period of `period` holding `now`.
    pub fn new(identity: &str, policy: &str, period: Period, now: Timestamp) -> Bucket {
        Bucket {
            identity: identity.to_string(),
            policy: policy.to_string(),
            period_start: period.start(now).0,
        }
    }
}

/// Tokens held for a request in flight.
#[derive(Debug)]
pub struct Reservation {
    /// The bucket it was taken from (`None`: a grant without a budget).
    pub bucket: Option<Bucket>,
    /// Tokens held.
    pub amount: u64,
    /// Its `holds` row, which charges it in full if the gateway dies before settling.
    pub(crate) hold: Option<i64>,
}

/// One request, as the audit log records it.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// When (seconds since the epoch).
    pub at: u64,
    /// The caller's identity id.
    pub identity: String,
    /// The caller's name.
    pub name: String,
    /// The granting policy ("" when denied before one was chosen).
    pub policy: String,
    /// The model asked for.
    pub model: String,
    /// The endpoint.
    pub endpoint: String,
    /// Whether it was streamed.
    pub stream: bool,
    /// What was charged.
    pub usage: Usage,
    /// Estimated cost in millionths of a dollar.
    pub cost_micros: u64,
    /// `allowed` or `denied`.
    pub decision: &'static str,
    /// Why it was denied, cut short or how it ended.
    pub reason: String,
}

/// The ledger.
#[derive(Debug)]
pub struct Ledger {
    db: Mutex<Connection>,
    /// Spent (settled) per bucket, loaded lazily from the database.
    spent: Mutex<HashMap<Bucket, u64>>,
    /// Held by requests in flight per bucket.
    held: Mutex<HashMap<Bucket, u64>>,
}

/// The budget cannot cover even the request's prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    /// Tokens left in the bucket (after other reservations).
    pub left: u64,
}

/// Makes sure `path` is a regular file before SQLite opens it, creating it 0600 if missing:
/// left to SQLite it would be created at the umask's mode (0644, readable by every user, with
/// who spent what), and SQLite's `-wal` and `-shm` files copy the database file's mode. A FIFO or
/// device is refused here rather than handed to SQLite.
fn create_private(path: &Path) -> Result<(), LedgerError> {
    match umbra_pki::check_target(path)? {
        umbra_pki::outfile::TargetKind::Missing | umbra_pki::outfile::TargetKind::Regular => {
            umbra_pki::private_database(path)?;
            Ok(())
        }
        _ => Err(LedgerError::NotRegular(path.to_path_buf())),
    }
}

impl Ledger {
    /// Opens (creating) the ledger at `path`.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        create_private(path)?;
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS requests (
                id INTEGER PRIMARY KEY,
                at INTEGER NOT NULL,
                identity TEXT NOT NULL,
                name TEXT NOT NULL,
                policy TEXT NOT NULL,
                model TEXT NOT NULL,
                endpoint TEXT NOT NULL,
                stream INTEGER NOT NULL,
                input INTEGER NOT NULL,
                output INTEGER NOT NULL,
                estimated INTEGER NOT NULL,
                cost_micros INTEGER NOT NULL,
                decision TEXT NOT NULL,
                reason TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS requests_bucket ON requests (identity, policy, at);
             CREATE TABLE IF NOT EXISTS holds (
                id INTEGER PRIMARY KEY,
                identity TEXT NOT NULL,
                policy TEXT NOT NULL,
                period_start INTEGER NOT NULL,
                amount INTEGER NOT NULL
             );",
        )?;
        charge_interrupted(&conn)?;
        // The file holds who used what: only its owner reads it.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        Ok(Ledger {
            db: Mutex::new(conn),
            spent: Mutex::default(),
            held: Mutex::default(),
        })
    }

    fn spent_locked(
        &self,
        spent: &mut HashMap<Bucket, u64>,
        b: &Bucket,
    ) -> Result<u64, LedgerError> {
        if let Some(v) = spent.get(b) {
            return Ok(*v);
        }
        let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        let v: i64 = db.query_row(
            "SELECT COALESCE(SUM(input + output), 0) FROM requests
             WHERE identity = ?1 AND policy = ?2 AND at >= ?3 AND decision = 'allowed'",
            params![b.identity, b.policy, b.period_start as i64],
            |r| r.get(0),
        )?;
        let v = v.max(0) as u64;
        spent.insert(b.clone(), v);
        Ok(v)
    }

    /// Tokens spent and held in a bucket.
    pub fn used(&self, b: &Bucket) -> Result<(u64, u64), LedgerError> {
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        let s = self.spent_locked(&mut spent, b)?;
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        Ok((s, held.get(b).copied().unwrap_or(0)))
    }

    /// Holds between `min` and `max` tokens of a bucket whose budget is `budget`: as many as are
    /// left up to `max`, or `Exhausted` if fewer than `min` are.
    pub fn reserve(
        &self,
        b: &Bucket,
        budget: u64,
        min: u64,
        max: u64,
    ) -> Result<Result<Reservation, Exhausted>, LedgerError> {
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        let s = self.spent_locked(&mut spent, b)?;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let h = held.entry(b.clone()).or_insert(0);
        let left = budget.saturating_sub(s).saturating_sub(*h);
        if left < min.max(1) {
            return Ok(Err(Exhausted { left }));
        }
        let amount = left.min(max.max(min));
        let hold = {
            let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
            db.execute(
                "INSERT INTO holds (identity, policy, period_start, amount) VALUES (?1, ?2, ?3, ?4)",
                params![b.identity, b.policy, b.period_start as i64, amount as i64],
            )?;
            db.last_insert_rowid()
        };
        *h += amount;
        Ok(Ok(Reservation {
            bucket: Some(b.clone()),
            amount,
            hold: Some(hold),
        }))
    }

    /// Tries to hold `extra` more tokens for a running request (its provider spent more than
    /// estimated). False: the budget has run out.
    pub fn grow(&self, r: &mut Reservation, budget: u64, extra: u64) -> Result<bool, LedgerError> {
        let Some(b) = &r.bucket else {
            return Ok(true);
        };
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        let s = self.spent_locked(&mut spent, b)?;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let h = held.entry(b.clone()).or_insert(0);
        if budget.saturating_sub(s).saturating_sub(*h) < extra {
            return Ok(false);
        }
        if let Some(id) = r.hold {
            let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
            db.execute(
                "UPDATE holds SET amount = ?1 WHERE id = ?2",
                params![(r.amount + extra) as i64, id],
            )?;
        }
        *h += extra;
        r.amount += extra;
        Ok(true)
    }

    /// Ends a request: releases its reservation and records what it really spent.
    pub fn settle(&self, r: Reservation, record: &Record) -> Result<(), LedgerError> {
        {
            let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(b) = &r.bucket {
                if let Some(h) = held.get_mut(b) {
                    *h = h.saturating_sub(r.amount);
                }
                if let Some(s) = spent.get_mut(b) {
                    *s += record.usage.total();
                }
            }
        }
        let mut db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        let tx = db.transaction()?;
        if let Some(id) = r.hold {
            tx.execute("DELETE FROM holds WHERE id = ?1", params![id])?;
        }
        insert_record(&tx, record)?;
        tx.commit()?;
        Ok(())
    }

    /// Gives a reservation back unused: the request never went upstream (it lost a race for a
    /// rate-limit slot), so nothing is recorded for it.
    pub fn release(&self, r: Reservation) -> Result<(), LedgerError> {
        if let Some(b) = &r.bucket {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(h) = held.get_mut(b) {
                *h = h.saturating_sub(r.amount);
            }
        }
        if let Some(id) = r.hold {
            let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
            db.execute("DELETE FROM holds WHERE id = ?1", params![id])?;
        }
        Ok(())
    }

    /// Records a request that was refused before any reservation.
    pub fn insert(&self, r: &Record) -> Result<(), LedgerError> {
        let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        insert_record(&db, r)
    }

    /// The newest records, newest last (for tests and the audit command).
    pub fn recent(&self, limit: u32) -> Result<Vec<serde_json::Value>, LedgerError> {
        let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = db.prepare(
            "SELECT at, name, policy, model, endpoint, stream, input, output, estimated,
                    cost_micros, decision, reason
             FROM (SELECT * FROM requests ORDER BY id DESC LIMIT ?1) ORDER BY id",
        )?;
        let rows = st.query_map(params![limit], |r| {
            Ok(serde_json::json!({
                "at": r.get::<_, i64>(0)?,
                "identity": r.get::<_, String>(1)?,
                "policy": r.get::<_, String>(2)?,
                "model": r.get::<_, String>(3)?,
                "endpoint": r.get::<_, String>(4)?,
                "stream": r.get::<_, bool>(5)?,
                "input": r.get::<_, i64>(6)?,
                "output": r.get::<_, i64>(7)?,
                "estimated": r.get::<_, bool>(8)?,
                "cost_micros": r.get::<_, i64>(9)?,
                "decision": r.get::<_, String>(10)?,
                "reason": r.get::<_, String>(11)?,
            }))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn insert_record(db: &Connection, r: &Record) -> Result<(), LedgerError> {
    db.execute(
        "INSERT INTO requests (at, identity, name, policy, model, endpoint, stream, input,
                output, estimated, cost_micros, decision, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        params![
            r.at as i64,
            r.identity,
            r.name,
            r.policy,
            r.model,
            r.endpoint,
            r.stream,
            r.usage.input as i64,
            r.usage.output as i64,
            r.usage.estimated,
            r.cost_micros as i64,
            r.decision,
            r.reason,
        ],
    )?;
    Ok(())
}

/// Charges, in full, every reservation a crashed gateway left behind: the provider may have
/// billed all of it, and a budget must fail closed. Each becomes an `allowed` record with the
/// held tokens as input, dated at its period's start (so it counts in the right period).
fn charge_interrupted(conn: &Connection) -> Result<(), LedgerError> {
    let n = conn.execute(
        "INSERT INTO requests (at, identity, name, policy, model, endpoint, stream, input,
            output, estimated, cost_micros, decision, reason)
         SELECT period_start, identity, identity, policy, '', '', 0, amount, 0, 1, 0, 'allowed',
            'interrupted: the gateway stopped before the request ended; charged what it held'
         FROM holds",
        [],
    )?;
    conn.execute("DELETE FROM holds", [])?;
    if n > 0 {
        tracing::warn!(
            requests = n,
            "charged the reservations of requests a stopped gateway left in flight"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(tokens: u64) -> Record {
        Record {
            at: 1_000_000,
            identity: "id-1".into(),
            name: "agent-1".into(),
            policy: "p".into(),
            model: "m".into(),
            endpoint: "/v1/chat/completions".into(),
            usage: Usage {
                input: tokens / 2,
                output: tokens - tokens / 2,
                estimated: false,
            },
            decision: "allowed",
            ..Default::default()
        }
    }

    #[test]
    fn ledger_file_is_private_and_never_a_device() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        drop(Ledger::open(&path).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            Ledger::open(Path::new("/dev/null")),
            Err(LedgerError::NotRegular(_))
        ));
        assert!(matches!(
            Ledger::open(dir.path()),
            Err(LedgerError::File(_))
        ));
    }

    fn next_period(b: &Bucket) -> Bucket {
        Bucket::new(
            "id-1",
            &b.policy,
            Period::Day,
            Timestamp(b.period_start + 86_400),
        )
    }

    #[test]
    fn reservations_never_overspend_and_spending_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let b = Bucket::new("id-1", "p", Period::Day, Timestamp(1_000_000));
        let l = Ledger::open(&path).unwrap();
        let r1 = l.reserve(&b, 100, 10, 60).unwrap().unwrap();
        assert_eq!(r1.amount, 60);
        let r2 = l.reserve(&b, 100, 10, 60).unwrap().unwrap();
        assert_eq!(r2.amount, 40, "clamped to what is left");
        assert_eq!(
            l.reserve(&b, 100, 10, 60).unwrap().unwrap_err(),
            Exhausted { left: 0 }
        );
        l.settle(r1, &rec(30)).unwrap();
        l.settle(r2, &rec(20)).unwrap();
        assert_eq!(l.used(&b).unwrap(), (50, 0));
        let mut r3 = l.reserve(&b, 100, 10, 20).unwrap().unwrap();
        assert!(l.grow(&mut r3, 100, 30).unwrap());
        assert!(
            !l.grow(&mut r3, 100, 1).unwrap(),
            "nothing left to grow into"
        );
        // The gateway dies with r3 in flight: at the next start it is charged in full.
        assert_eq!(r3.amount, 50);
        // A reservation given back unused leaves no record and no hold.
        let unused = l.reserve(&next_period(&b), 100, 10, 20).unwrap().unwrap();
        l.release(unused).unwrap();
        assert_eq!(l.used(&next_period(&b)).unwrap(), (0, 0));
        drop(l);
        let l = Ledger::open(&path).unwrap();
        assert_eq!(
            l.used(&b).unwrap(),
            (100, 0),
            "spending survives, and a hold left by a crash is charged"
        );
        let recent = l.recent(10).unwrap();
        let interrupted = recent.last().unwrap();
        assert_eq!(interrupted["input"], 50);
        assert!(interrupted["reason"]
            .as_str()
            .unwrap()
            .starts_with("interrupted"));
        drop(l);
        let l = Ledger::open(&path).unwrap();
        assert_eq!(
            l.used(&b).unwrap(),
            (100, 0),
            "charged once, not at every start"
        );
        let next_day = Bucket::new("id-1", "p", Period::Day, Timestamp(1_000_000 + 86_400));
        assert_eq!(
            l.used(&next_day).unwrap(),
            (0, 0),
            "a new period starts empty"
        );
        assert_eq!(l.recent(10).unwrap().len(), 3);
    }
}
