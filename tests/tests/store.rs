//! The two stores, one semantics: every test body runs against embedded SQLite and against a
//! real PostgreSQL ([`umbra_tests::pg::PgServer`]), through the same `Store` trait the controller
//! uses. Then what only a shared database has: notifications, the write lock across
//! connections, a server restarting under a running store, and controllers sharing keys.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use umbra_controller::store::{
    AgentEvent, AuditRecord, Batch, Record, Store, StoreConfig, MAX_REPLAY, TRIM_EVERY,
};
use umbra_controller::{ControllerConfig, ControllerError};
use umbra_policies::{HostPort, Hosting, IdentityId, Name, Service, Timestamp};
use umbra_proto::{ChangeEvent, RevokedCert};
use umbra_tests::pg::PgServer;

/// A store to test on, with what keeps it alive.
struct Backend {
    cfg: StoreConfig,
    _dir: tempfile::TempDir,
}

impl Backend {
    fn sqlite() -> Backend {
        let dir = tempfile::tempdir().expect("tempdir");
        Backend {
            cfg: StoreConfig::Sqlite(dir.path().join("umbra.db")),
            _dir: dir,
        }
    }

    fn postgres() -> Backend {
        let url = PgServer::shared().database();
        Backend {
            cfg: url.parse().expect("url"),
            _dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn open(&self) -> Box<dyn Store> {
        self.cfg.open().expect("open the store")
    }

    /// Rows in the change log, read behind the trait's back.
    fn change_rows(&self) -> u64 {
        match &self.cfg {
            StoreConfig::Sqlite(path) => {
                let c = rusqlite::Connection::open(path).expect("sqlite");
                let n: i64 = c
                    .query_row("SELECT COUNT(*) FROM changes", [], |r| r.get(0))
                    .expect("count");
                u64::try_from(n).expect("count")
            }
            StoreConfig::Postgres(url) => {
                let url = url.clone();
                std::thread::spawn(move || {
                    let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("pg");
                    let n: i64 = c
                        .query_one("SELECT COUNT(*) FROM changes", &[])
                        .expect("count")
                        .get(0);
                    u64::try_from(n).expect("count")
                })
                .join()
                .expect("thread")
            }
        }
    }
}

/// One test body, run on both stores as `NAME::sqlite` and `NAME::postgres`.
macro_rules! both {
    ($(#[$doc:meta])* fn $name:ident($b:ident) $body:block) => {
        mod $name {
            use super::*;
            $(#[$doc])*
            fn body($b: &Backend) $body
            #[test]
            fn sqlite() {
                body(&Backend::sqlite())
            }
            #[test]
            fn postgres() {
                body(&Backend::postgres())
            }
        }
    };
}

fn id(s: &str) -> IdentityId {
    IdentityId::new(s).expect("id")
}

fn service(name: &str) -> ChangeEvent {
    ChangeEvent::ServicePut {
        service: Service {
            name: Name::new(name).expect("name"),
            roles: Default::default(),
            hosting: Hosting::Sdk,
            intercepts: vec![format!("{name}.umbra:443")
                .parse::<HostPort>()
                .expect("intercept")],
            proxy_protocol: false,
        },
    }
}

fn revocation(i: u64) -> ChangeEvent {
    ChangeEvent::CertRevoked {
        cert: RevokedCert {
            serial: format!("{i:x}"),
            identity: id("i1"),
            not_after: Timestamp(1),
        },
    }
}

fn audit(action: &'static str) -> AuditRecord {
    AuditRecord {
        actor: "controller".into(),
        action,
        target: "t".into(),
        detail: serde_json::json!({ "n": 1 }),
    }
}

/// Commits at the store's current sequence.
fn commit(s: &mut dyn Store, batch: &Batch, now: u64) -> Result<u64, ControllerError> {
    let seq = s.last_seq()?;
    s.commit(batch, seq, Timestamp(now))
        .map(|d| d.last().map_or(seq, |d| d.seq))
}

/// A token for identity `who`, committed.
fn issue_token(s: &mut dyn Store, jti: &str, who: &str) {
    let batch = Batch {
        records: vec![Record::Token {
            jti: jti.into(),
            identity: id(who),
            expires_at: Timestamp(10_000),
        }],
        ..Default::default()
    };
    commit(s, &batch, 100).expect("token");
}

fn spend(jti: &str, serial: &str, who: &str) -> Batch {
    Batch {
        records: vec![
            Record::TokenUsed { jti: jti.into() },
            Record::Cert {
                serial: serial.into(),
                identity: id(who),
                not_after: Timestamp(100_000),
            },
        ],
        audit: vec![audit("identity.enroll")],
        ..Default::default()
    }
}

both! {
    /// A batch with a record that cannot be applied (a spent token) writes nothing: no change
    /// rows, no model rows, no certificate, no audit rows, and the sequence does not move.
    fn a_batch_commits_all_or_nothing(b) {
        let mut s = b.open();
        issue_token(s.as_mut(), "t1", "i1");
        commit(s.as_mut(), &spend("t1", "s1", "i1"), 200).expect("first spend");
        assert_eq!(s.token("t1").unwrap().unwrap().used_at, Some(Timestamp(200)));
        let seq = s.last_seq().unwrap();
        let audit_rows = s.audit(u32::MAX).unwrap().len();

        let mut batch = spend("t1", "s2", "i1");
        batch.changes = vec![service("svc"), revocation(1)];
        let e = commit(s.as_mut(), &batch, 300).unwrap_err();
        assert!(matches!(e, ControllerError::Conflict(_)), "{e}");

        assert_eq!(s.last_seq().unwrap(), seq);
        assert_eq!(s.changes_since(seq).unwrap().unwrap().len(), 0);
        assert_eq!(b.change_rows(), seq);
        let replica = s.load("e".into(), Timestamp(0)).unwrap();
        assert!(replica.state.services.is_empty(), "a service row was written");
        assert!(s.cert_owner("s2").unwrap().is_none(), "a certificate was written");
        assert_eq!(s.audit(u32::MAX).unwrap().len(), audit_rows);
        // The store is usable afterwards and the same changes commit without the bad record.
        batch.records.clear();
        commit(s.as_mut(), &batch, 400).expect("commit");
        assert_eq!(s.load("e".into(), Timestamp(0)).unwrap().state.services.len(), 1);
    }
}

both! {
    /// Sequence numbers are contiguous across commits, `last_in_commit` marks each commit's
    /// end, and `changes_since` replays exactly what follows a position.
    fn sequences_are_contiguous_and_replay_is_exact(b) {
        let mut s = b.open();
        assert_eq!(s.last_seq().unwrap(), 0);
        assert_eq!(s.changes_since(0).unwrap().unwrap().len(), 0);
        let mut all = Vec::new();
        let mut n = 0;
        for size in [1, 3, 0, 5, 2] {
            let batch = Batch {
                changes: (0..size).map(|i| revocation(n + i)).collect(),
                audit: vec![audit("policy.create")],
                ..Default::default()
            };
            n += size;
            let seq = s.last_seq().unwrap();
            let deltas = s.commit(&batch, seq, Timestamp(7)).unwrap();
            assert_eq!(deltas.len() as u64, size);
            for (i, d) in deltas.iter().enumerate() {
                assert_eq!(d.seq, seq + 1 + i as u64);
                assert_eq!(d.last_in_commit, i + 1 == deltas.len());
            }
            all.extend(deltas);
        }
        assert_eq!(s.last_seq().unwrap(), 11);
        let seqs: Vec<u64> = all.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, (1..=11).collect::<Vec<_>>());
        for from in 0..=11 {
            let replay = s.changes_since(from).unwrap().unwrap();
            assert_eq!(replay.len() as u64, 11 - from);
            for (d, want) in replay.iter().zip(&all[from as usize..]) {
                assert_eq!((d.seq, d.last_in_commit), (want.seq, want.last_in_commit));
                assert_eq!(d.change, want.change);
                assert_eq!(d.at, Timestamp(7));
            }
        }
        // Ahead of the log: a snapshot, not an empty replay.
        assert!(s.changes_since(12).unwrap().is_none());
        // A second store on the same database sees the same log.
        let mut other = b.open();
        assert_eq!(other.last_seq().unwrap(), 11);
        assert_eq!(other.changes_since(4).unwrap().unwrap().len(), 7);
    }
}

both! {
    /// The change log holds what can still be replayed and no more: it stays bounded however
    /// many commits there are, and a follower too far behind gets a snapshot.
    fn the_change_log_keeps_only_what_can_be_replayed(b) {
        let mut s = b.open();
        let mut seq = 0;
        // Commits of 700 changes: trims happen inside commits, not at their edges.
        while seq < 3 * MAX_REPLAY {
            let batch = Batch {
                changes: (0..700).map(|i| revocation(seq + i)).collect(),
                ..Default::default()
            };
            seq = s.commit(&batch, seq, Timestamp(1)).unwrap().last().unwrap().seq;
        }
        assert_eq!(s.last_seq().unwrap(), seq);
        let rows = b.change_rows();
        assert!(
            (MAX_REPLAY..MAX_REPLAY + TRIM_EVERY + 700).contains(&rows),
            "{rows} rows"
        );
        let replay = s.changes_since(seq - MAX_REPLAY).unwrap().unwrap();
        assert_eq!(replay.len() as u64, MAX_REPLAY);
        assert_eq!(replay.first().unwrap().seq, seq - MAX_REPLAY + 1);
        assert!(s.changes_since(seq - MAX_REPLAY - 1).unwrap().is_none());
    }
}

both! {
    /// Two stores (two connections, as two controllers have) race to spend the same token
    /// from two threads at once: exactly one succeeds, and the loser's certificate is not
    /// recorded. Many rounds, so that the two really overlap.
    fn a_token_is_spent_exactly_once_under_a_race(b) {
        let stores: Vec<_> = (0..2).map(|_| b.open()).collect();
        let mut setup = b.open();
        let rounds = 20;
        // One identity per round: a new token supersedes the identity's unused ones.
        for r in 0..rounds {
            issue_token(setup.as_mut(), &format!("t{r}"), &format!("i{r}"));
        }
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = stores
            .into_iter()
            .enumerate()
            .map(|(k, mut s)| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let mut won = Vec::new();
                    for r in 0..rounds {
                        // Neither batch changes the model, so both are built on the same
                        // sequence; only the token decides.
                        let seq = s.last_seq().unwrap();
                        barrier.wait();
                        let batch = spend(&format!("t{r}"), &format!("s{r}-{k}"), &format!("i{r}"));
                        match s.commit(&batch, seq, Timestamp(500)) {
                            Ok(_) => won.push(true),
                            Err(ControllerError::Conflict(_)) => won.push(false),
                            Err(e) => panic!("round {r}: {e}"),
                        }
                    }
                    won
                })
            })
            .collect();
        let results: Vec<Vec<bool>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        for r in 0..rounds {
            let winners = results.iter().filter(|w| w[r]).count();
            assert_eq!(winners, 1, "round {r}: {winners} spends succeeded");
            for (k, w) in results.iter().enumerate() {
                let cert = setup.cert_owner(&format!("s{r}-{k}")).unwrap();
                assert_eq!(cert.is_some(), w[r], "round {r}: certificate of store {k}");
            }
        }
    }
}

both! {
    /// A batch built on a sequence the log has moved past (another controller committed first)
    /// is refused as stale, with nothing written.
    fn a_commit_on_an_old_sequence_is_stale(b) {
        let mut first = b.open();
        let mut second = b.open();
        let seq = second.last_seq().unwrap();
        commit(first.as_mut(), &Batch { changes: vec![service("one")], ..Default::default() }, 1)
            .unwrap();
        let batch = Batch {
            changes: vec![service("two")],
            audit: vec![audit("service.create")],
            ..Default::default()
        };
        let audit_rows = second.audit(u32::MAX).unwrap().len();
        match second.commit(&batch, seq, Timestamp(2)) {
            Err(ControllerError::Stale { expected, found }) => {
                assert_eq!((expected, found), (seq, seq + 1));
            }
            other => panic!("expected a stale commit, got {other:?}"),
        }
        let replica = second.load("e".into(), Timestamp(0)).unwrap();
        assert_eq!(replica.seq, seq + 1);
        let names: Vec<&str> = replica.state.services.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["one"]);
        assert_eq!(second.audit(u32::MAX).unwrap().len(), audit_rows);
        // Caught up, the same batch commits.
        second.commit(&batch, seq + 1, Timestamp(3)).unwrap();
        assert_eq!(first.last_seq().unwrap(), seq + 2);
    }
}

both! {
    /// Certificates, tokens, metadata and revocations read back as they were written.
    fn bookkeeping_reads_back(b) {
        let mut s = b.open();
        assert_eq!(s.meta("k").unwrap(), None);
        s.set_meta("k", "v1").unwrap();
        s.set_meta("k", "v2").unwrap();
        assert_eq!(s.meta("k").unwrap().as_deref(), Some("v2"));
        issue_token(s.as_mut(), "t1", "i1");
        assert_eq!(s.token("t1").unwrap().unwrap().used_at, None);
        // A newer token supersedes the unused one.
        issue_token(s.as_mut(), "t2", "i1");
        assert_eq!(s.token("t1").unwrap().unwrap().used_at, Some(Timestamp(100)));
        assert!(s.token("nope").unwrap().is_none());
        for (serial, at) in [("a", 10), ("b", 20), ("c", 20)] {
            let batch = Batch {
                records: vec![Record::Cert {
                    serial: serial.into(),
                    identity: id("i1"),
                    not_after: Timestamp(1000),
                }],
                ..Default::default()
            };
            commit(s.as_mut(), &batch, at).unwrap();
        }
        let certs: Vec<String> = s.certs_of(&id("i1")).unwrap().into_iter().map(|c| c.serial).collect();
        assert_eq!(certs, ["c", "b", "a"], "newest first, ties by insertion");
        assert!(s.enrolled_ids().unwrap().contains("i1"));
        let live = s.live_certs_of(&id("i1"), Timestamp(500)).unwrap();
        assert_eq!(live.len(), 3);
        let batch = Batch {
            changes: live.into_iter().take(1).map(|cert| ChangeEvent::CertRevoked { cert }).collect(),
            ..Default::default()
        };
        commit(s.as_mut(), &batch, 600).unwrap();
        assert_eq!(s.live_certs_of(&id("i1"), Timestamp(500)).unwrap().len(), 2);
        let revoked = s.load("e".into(), Timestamp(500)).unwrap().revoked;
        assert_eq!(revoked.len(), 1);
        // Expired revocations are not loaded.
        assert!(s.load("e".into(), Timestamp(2000)).unwrap().revoked.is_empty());
        let (owner, is_revoked) = s.cert_owner(revoked.keys().next().unwrap()).unwrap().unwrap();
        assert_eq!((owner, is_revoked), (id("i1"), true));
    }
}

both! {
    /// Agent rows are pruned by age and by count; operator rows never are.
    fn agent_audit_rows_are_pruned_and_operator_rows_kept(b) {
        let mut s = b.open();
        for i in 0..10 {
            commit(s.as_mut(), &Batch { audit: vec![audit("identity.create")], ..Default::default() }, 100 + i)
                .unwrap();
        }
        let events: Vec<AgentEvent> = (0..20)
            .map(|i| AgentEvent {
                at: Timestamp(100 + i),
                actor: "spiffe://t/agent/a".into(),
                action: "sandbox.dns_refused",
                target: "sb".into(),
                detail: "{}".into(),
            })
            .collect();
        s.append_agent_events(&events).unwrap();
        let count = |s: &mut dyn Store, agent: bool| {
            (s.audit(u32::MAX).unwrap().iter())
                .filter(|e| e.action.starts_with("sandbox.") == agent)
                .count()
        };
        assert_eq!(count(s.as_mut(), true), 20);
        // Older than 105: five go.
        assert_eq!(s.prune_agent_events(Some(Timestamp(105)), u64::MAX).unwrap(), 5);
        // Above 10 rows: the five oldest left go.
        assert_eq!(s.prune_agent_events(None, 10).unwrap(), 5);
        let agent: Vec<u64> = (s.audit(u32::MAX).unwrap().iter())
            .filter(|e| e.action.starts_with("sandbox."))
            .map(|e| e.at.0)
            .collect();
        assert_eq!(agent, (110..120).collect::<Vec<_>>());
        s.prune_agent_events(Some(Timestamp(u64::MAX >> 2)), 0).unwrap();
        assert_eq!(count(s.as_mut(), true), 0);
        assert_eq!(count(s.as_mut(), false), 10);
        // The newest entries, newest last.
        let last3: Vec<u64> = s.audit(3).unwrap().iter().map(|e| e.at.0).collect();
        assert_eq!(last3, [107, 108, 109]);
    }
}

/// A watcher on PostgreSQL wakes within a second of another connection's commit, and stays
/// quiet when nothing is committed. On SQLite it only waits.
#[test]
fn a_commit_wakes_the_watchers_of_other_controllers() {
    let b = Backend::postgres();
    let mut s = b.open();
    let mut watcher = b.cfg.commit_watcher().unwrap();
    assert!(
        !watcher.wait(Duration::from_millis(200)).unwrap(),
        "woke with nothing committed"
    );
    // A commit that changes nothing in the log announces nothing.
    commit(
        s.as_mut(),
        &Batch {
            audit: vec![audit("x")],
            ..Default::default()
        },
        1,
    )
    .unwrap();
    assert!(!watcher.wait(Duration::from_millis(200)).unwrap());
    let waiter = std::thread::spawn(move || {
        let started = Instant::now();
        let woke = watcher.wait(Duration::from_secs(10)).unwrap();
        (woke, started.elapsed(), watcher)
    });
    std::thread::sleep(Duration::from_millis(100));
    let committed = Instant::now();
    commit(
        s.as_mut(),
        &Batch {
            changes: vec![service("one")],
            ..Default::default()
        },
        2,
    )
    .unwrap();
    let (woke, _, mut watcher) = waiter.join().unwrap();
    assert!(woke);
    let lag = committed.elapsed();
    assert!(
        lag < Duration::from_secs(1),
        "woke {lag:?} after the commit"
    );
    // Several commits, then a wait: it wakes.
    for i in 0..3 {
        commit(
            s.as_mut(),
            &Batch {
                changes: vec![revocation(i)],
                ..Default::default()
            },
            3,
        )
        .unwrap();
    }
    assert!(watcher.wait(Duration::from_secs(5)).unwrap());

    let sqlite = Backend::sqlite();
    let mut alone = sqlite.cfg.commit_watcher().unwrap();
    let started = Instant::now();
    assert!(!alone.wait(Duration::from_millis(100)).unwrap());
    assert!(started.elapsed() >= Duration::from_millis(100));
}

/// While one controller holds the command lock (on a connection of its own), another
/// controller's command waits for it, and then finds the log moved by the holder's commit
/// (made on the holder's other connection, which does not wait for its own command): stale,
/// nothing written.
#[test]
fn the_command_lock_serializes_whole_commands_across_controllers() {
    let b = Backend::postgres();
    let (mut holder_lock, mut holder) = (b.open(), b.open());
    let (mut other_lock, mut other) = (b.open(), b.open());
    holder_lock.lock_writes().unwrap();
    // Re-entrant: a command may take it again.
    holder_lock.lock_writes().unwrap();
    let seq = holder.last_seq().unwrap();
    let locked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = locked.clone();
    let waiter = std::thread::spawn(move || {
        other_lock.lock_writes().unwrap();
        seen.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = other.commit(
            &Batch {
                changes: vec![service("theirs")],
                ..Default::default()
            },
            seq,
            Timestamp(1),
        );
        other_lock.unlock_writes();
        (r, other, other_lock)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !locked.load(std::sync::atomic::Ordering::SeqCst),
        "another controller's command ran while the lock was held"
    );
    holder
        .commit(
            &Batch {
                changes: vec![service("ours")],
                ..Default::default()
            },
            seq,
            Timestamp(1),
        )
        .expect("the holder commits on its other connection under its own command");
    holder_lock.unlock_writes();
    let (r, mut other, mut other_lock) = waiter.join().unwrap();
    assert!(matches!(r, Err(ControllerError::Stale { .. })), "{r:?}");
    let names: Vec<String> = (other
        .load("e".into(), Timestamp(0))
        .unwrap()
        .state
        .services
        .keys())
    .map(|n| n.to_string())
    .collect();
    assert_eq!(names, ["ours"]);
    // Released: taken at once now; unlocking what is not held is harmless.
    other_lock.lock_writes().unwrap();
    other_lock.unlock_writes();
    other_lock.unlock_writes();
}

/// The PostgreSQL server stops and starts again under a running store: meanwhile every call
/// fails as unavailable (503 at the API), nothing panics, and afterwards the same store (and
/// watcher) works again without being reopened.
#[test]
fn a_store_recovers_after_the_database_restarts() {
    let server = PgServer::private();
    let url = server.database();
    let cfg: StoreConfig = url.parse().unwrap();
    let mut s = cfg.open().unwrap();
    let mut watcher = cfg.commit_watcher().unwrap();
    commit(
        s.as_mut(),
        &Batch {
            changes: vec![service("before")],
            ..Default::default()
        },
        1,
    )
    .unwrap();
    assert!(watcher.wait(Duration::from_secs(5)).unwrap());
    s.lock_writes().unwrap();

    server.stop();
    let e = s.last_seq().unwrap_err();
    assert!(matches!(e, ControllerError::Unavailable(_)), "{e}");
    let e = commit(
        s.as_mut(),
        &Batch {
            changes: vec![service("during")],
            ..Default::default()
        },
        2,
    )
    .unwrap_err();
    assert!(matches!(e, ControllerError::Unavailable(_)), "{e}");
    assert!(
        e.to_string().starts_with("the database is unavailable"),
        "{e}"
    );
    // The lock died with the session; releasing it does not fail.
    s.unlock_writes();
    assert!(watcher.wait(Duration::from_millis(300)).is_err());
    assert!(matches!(cfg.open(), Err(ControllerError::Unavailable(_))));

    server.start();
    let seq = s.last_seq().expect("the store reconnects by itself");
    assert_eq!(seq, 1, "nothing of the failed commit was written");
    commit(
        s.as_mut(),
        &Batch {
            changes: vec![service("after")],
            ..Default::default()
        },
        3,
    )
    .unwrap();
    // The watcher reconnects (and says so: notifications may have been missed), then hears
    // commits again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match watcher.wait(Duration::from_millis(200)) {
            Ok(true) => break,
            Ok(false) | Err(_) if Instant::now() < deadline => {}
            other => panic!("the watcher did not come back: {other:?}"),
        }
    }
    let mut other = cfg.open().unwrap();
    commit(
        other.as_mut(),
        &Batch {
            changes: vec![service("later")],
            ..Default::default()
        },
        4,
    )
    .unwrap();
    assert!(watcher.wait(Duration::from_secs(5)).unwrap());
    let names: Vec<String> = (s
        .load("e".into(), Timestamp(0))
        .unwrap()
        .state
        .services
        .keys())
    .map(|n| n.to_string())
    .collect();
    assert_eq!(names, ["after", "before", "later"]);
}

fn controller_cfg(dir: &std::path::Path, store: &StoreConfig) -> ControllerConfig {
    let mut cfg = ControllerConfig::new(dir);
    cfg.store = store.clone();
    cfg
}

/// `init` once on a shared database, `join` copies the keys to a second directory (private
/// modes, nothing in the database), both open; a directory with other keys is refused, and a
/// second `init` of the same database too.
#[test]
fn controllers_share_a_database_only_with_the_same_keys() {
    use std::os::unix::fs::PermissionsExt;
    let b = Backend::postgres();
    let root = tempfile::tempdir().unwrap();
    let (a, joined, stranger) = (
        root.path().join("a"),
        root.path().join("b"),
        root.path().join("c"),
    );
    let td: umbra_pki::TrustDomain = "test.umbra".parse().unwrap();
    let e = umbra_controller::Controller::open(controller_cfg(&a, &b.cfg)).unwrap_err();
    assert!(e.to_string().contains("not initialized"), "{e}");
    umbra_controller::init(&controller_cfg(&a, &b.cfg), &td, "127.0.0.1:1").unwrap();
    assert!(!a.join("umbra.db").exists(), "the state went to PostgreSQL");
    let e = umbra_controller::init(
        &controller_cfg(&root.path().join("d"), &b.cfg),
        &td,
        "127.0.0.1:1",
    )
    .unwrap_err();
    assert!(e.to_string().contains("already initialized"), "{e}");

    umbra_controller::join_dir(&controller_cfg(&joined, &b.cfg), &a).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&joined), 0o700);
    for key in ["token.key", "intermediate.key", "root.key"] {
        assert_eq!(mode(&joined.join(key)), 0o600, "{key}");
        assert_eq!(
            std::fs::read(joined.join(key)).unwrap(),
            std::fs::read(a.join(key)).unwrap()
        );
    }
    let first = umbra_controller::Controller::open(controller_cfg(&a, &b.cfg)).unwrap();
    let second = umbra_controller::Controller::open(controller_cfg(&joined, &b.cfg)).unwrap();
    assert_eq!(
        first.ca().fingerprint().to_string(),
        second.ca().fingerprint().to_string()
    );
    // Both see the admin that init made, from the one database.
    assert_eq!(second.state().identities.len(), 1);
    // No key material in the database.
    let key = std::fs::read_to_string(a.join("token.key")).unwrap();
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    let dump = dump_database(&b.cfg);
    assert!(!dump.contains(&body), "the token key is in the database");

    // Another CA: its own init (SQLite, so the database above is untouched), then pointed at
    // the shared database.
    umbra_controller::init(&ControllerConfig::new(&stranger), &td, "127.0.0.1:1").unwrap();
    let e = umbra_controller::Controller::open(controller_cfg(&stranger, &b.cfg)).unwrap_err();
    assert!(matches!(e, ControllerError::Setup(_)), "{e}");
    assert!(e.to_string().contains("CA"), "{e}");
    let e = umbra_controller::join_dir(&controller_cfg(&root.path().join("e"), &b.cfg), &stranger)
        .unwrap_err();
    assert!(e.to_string().contains("CA"), "{e}");
    assert!(!root.path().join("e").join("token.key").exists());
    // Joining over existing key material is refused.
    assert!(umbra_controller::join_dir(&controller_cfg(&joined, &b.cfg), &a).is_err());
}

/// Every text value in the database's tables, for looking for what must not be there.
fn dump_database(cfg: &StoreConfig) -> String {
    let StoreConfig::Postgres(url) = cfg else {
        panic!("postgres only")
    };
    let url = url.clone();
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let mut out = String::new();
        for t in [
            "meta",
            "identities",
            "services",
            "policies",
            "routers",
            "tokens",
            "certs",
            "changes",
            "audit",
        ] {
            for row in c
                .query(&format!("SELECT t::text FROM {t} AS t"), &[])
                .unwrap()
            {
                out.push_str(&row.get::<_, String>(0));
                out.push('\n');
            }
        }
        out
    })
    .join()
    .unwrap()
}
