//! The controller's state machine: every read and write of the model, enrollment and
//! certificate issuance goes through [`Controller`].
//!
//! One mutex serializes writes. Under it a command reads the current state and builds a
//! [`Batch`]; `Controller::commit` (module `commit`), the one gate every write goes through,
//! applies the batch's model changes to a candidate copy of the state and checks the result
//! with the core's rules (`State::validate`: unique names and intercepts, resolving `@name`s, no
//! empty selector list), and only then commits it to SQLite, applies it to the in-memory
//! replica and publishes the deltas, in that order, so that what routers see is always a prefix
//! of what is durable and always a state the core accepts. Commands check only what the core
//! cannot know: that the thing they name exists, that a create does not replace, who is acting.
//! Every call here is blocking (SQLite); the HTTP layer runs them on the blocking pool.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::broadcast;
use umbra_pki::{
    CertificateAuthority, EnrollmentClaims, IdentityFile, PeerCert, RevocationCheck, Serial,
    SpiffeId, TokenSigner, TokenVerifier, TrustDomain,
};
use umbra_policies::{
    Action, Identity, IdentityId, IdentityKind, Index, Name, Selector, Service, ServicePolicy,
    State, Timestamp,
};
use umbra_proto::api::{
    ApplyResponse, AuditEntry, CreateIdentityRequest, EdgeView, EnrollResponse, ExplainResponse,
    GrantRequest, IdentityView, RenewResponse, RouterView, TokenResponse,
};
use umbra_proto::{
    ChangeEvent, ControlMessage, Delta, Replica, RevokedCert, RouterInfo, SnapshotMessages,
};

use crate::audit::writer::AuditSink;
use crate::audit::AuditConfig;
use crate::clock::Clock;
use crate::error::ControllerError;
use crate::store::{AuditRecord, Batch, Record, Store, StoreConfig};

pub mod affected;
mod certs;
mod commit;
mod decisions;
mod declarative;
mod events;
pub mod follow;
pub mod hub;
mod identities;
mod policies;
pub mod shared;
pub mod views;

/// Deltas a router's control channel may fall behind by before it is dropped (it then resumes
/// from the store, or gets a snapshot).
const DELTA_CAPACITY: usize = 4096;

/// File names inside the controller's directory.
pub mod files {
    /// The SQLite database (the default store).
    pub const DB: &str = "umbra.db";
    /// The enrollment-token signing key.
    pub const TOKEN_KEY: &str = "token.key";
    /// The root CA certificate (its presence means the directory holds key material).
    pub const CA_CERT: &str = "ca.crt";
    /// The first admin's identity file.
    pub const ADMIN: &str = "admin.json";
}

/// How a controller runs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The directory made by `umbra controller init`: the CA and token keys (always files
    /// here, never in the database).
    pub dir: PathBuf,
    /// Where the state is kept: SQLite in the directory by default, or PostgreSQL shared by
    /// several controllers.
    pub store: StoreConfig,
    /// Lifetime of identity certificates (short, so that a lost key expires on its own).
    pub cert_validity: Duration,
    /// Lifetime of an enrollment token when the request names none.
    pub default_token_ttl: Duration,
    /// The longest enrollment token lifetime accepted.
    pub max_token_ttl: Duration,
    /// The time source.
    pub clock: Clock,
    /// Limits and retention for events identities report (`POST /v1/audit/events`).
    pub audit: AuditConfig,
    /// Authenticated connections in all, per identity, and for all agents together. Every
    /// tunneler, SDK host and gateway holds one for its edge-view watch, so a deployment with
    /// more agents than `connections.agents` must raise it (and the file descriptor limit).
    pub connections: crate::sessions::AuthLimits,
    /// Where to register the controller's metrics (see `umbra_metrics`); `None` counts nothing.
    pub metrics: Option<umbra_metrics::Registry>,
    /// Where audit events are delivered (`--sinks FILE`); none by default.
    pub sinks: Vec<crate::sinks::SinkConfig>,
}

impl ControllerConfig {
    /// Defaults for a directory: 24 h certificates, 30 min tokens (at most 7 days).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        ControllerConfig {
            store: StoreConfig::Sqlite(dir.join(files::DB)),
            dir,
            cert_validity: Duration::from_secs(24 * 3600),
            default_token_ttl: Duration::from_secs(30 * 60),
            max_token_ttl: Duration::from_secs(7 * 24 * 3600),
            clock: Clock::system(),
            audit: AuditConfig::default(),
            connections: crate::sessions::AuthLimits::default(),
            metrics: None,
            sinks: Vec::new(),
        }
    }
}

/// Who is acting, for the audit log and for rules such as "an admin cannot delete itself".
#[derive(Debug, Clone)]
pub struct Actor {
    /// The acting identity's id, when the actor is an identity.
    pub id: Option<IdentityId>,
    /// What the audit log records: a SPIFFE id, or `controller`.
    pub label: String,
}

impl Actor {
    /// The controller itself (initialization, maintenance).
    pub fn controller() -> Actor {
        Actor {
            id: None,
            label: "controller".into(),
        }
    }
}

/// The live set of revoked certificate serials, read on every TLS handshake without a lock.
#[derive(Debug, Default)]
pub struct RevokedSerials(ArcSwap<imbl::HashSet<String>>);

impl RevokedSerials {
    /// Replaces the whole set (after the state was reloaded from the store).
    fn replace(&self, serials: imbl::HashSet<String>) {
        self.0.store(Arc::new(serials));
    }

    /// Adds serials: a copy of the set (O(1), persistent) with them inserted, swapped in, so a
    /// revocation costs what it adds however long the list is. Only commits call this, under
    /// the command lock, so no two run at once.
    fn add(&self, serials: Vec<String>) {
        let mut set = imbl::HashSet::clone(&self.0.load());
        for s in serials {
            set.insert(s);
        }
        self.0.store(Arc::new(set));
    }
}

impl RevocationCheck for RevokedSerials {
    fn is_revoked(&self, serial: &Serial) -> bool {
        self.0.load().contains(serial.as_str())
    }
}

struct Inner {
    store: Box<dyn Store>,
    replica: Replica,
    names: HashMap<Name, IdentityId>,
    /// The compiled index of `replica.state`, kept current by every commit.
    index: Arc<Index>,
}

impl Inner {
    fn identity_named(&self, name: &str) -> Option<&Identity> {
        let id = self.names.get(name)?;
        self.replica.state.identities.get(id)
    }

    fn state(&self) -> &State {
        &self.replica.state
    }
}

/// What a new control-channel follower gets: the messages to send first, the sequence number
/// they bring it to, and the live deltas (skip those at or below `seq`).
pub struct Subscription {
    /// `Hello`, then a snapshot (made lazily, chunk by chunk, from a copy of the replica) or
    /// the deltas since the follower's position, then a heartbeat.
    pub initial: Box<dyn Iterator<Item = ControlMessage> + Send>,
    /// The sequence number the initial messages reach.
    pub seq: u64,
    /// Every delta committed after subscribing.
    pub deltas: broadcast::Receiver<Arc<Delta>>,
    /// Whether the follower gets a snapshot (it could not resume), for the log.
    pub snapshot: bool,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("seq", &self.seq)
            .field("snapshot", &self.snapshot)
            .finish_non_exhaustive()
    }
}

/// The controller.
pub struct Controller {
    cfg: ControllerConfig,
    ca: CertificateAuthority,
    signer: TokenSigner,
    verifier: TokenVerifier,
    inner: Mutex<Inner>,
    /// The deltas for routers' control channels; replaced (ending every channel, whose
    /// routers then resume or get a snapshot) when the state is reloaded from a shared store.
    deltas: ArcSwap<broadcast::Sender<Arc<Delta>>>,
    revoked: Arc<RevokedSerials>,
    /// With a store other controllers write too: when it last answered, and the write lock.
    shared: Option<shared::Shared>,
    address: Mutex<String>,
    streams: Arc<Mutex<HashMap<IdentityId, usize>>>,
    /// Open edge-view watches, woken by commits that can alter their views.
    hub: Arc<hub::WatchHub>,
    /// Control channels opened with a whole snapshot rather than resumed from the log: a
    /// router that fails over between controllers sharing a store should never need one.
    snapshots_served: std::sync::atomic::AtomicU64,
    /// Reported events: buckets, queue and writer thread, apart from the command lock.
    audit: AuditSink,
    /// Commits, audit reports and refusals counted (nothing without a registry).
    pub(crate) metrics: crate::metrics::Metrics,
    /// Rung after every commit that stored audit rows.
    bell: crate::audit::AuditBell,
    /// Reads the audit log as it grows, on a connection of its own.
    audit_reader: crate::audit::reader::Reader,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("dir", &self.cfg.dir)
            .finish_non_exhaustive()
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs()
}

/// Creates a controller directory: the CA, the token key, the store and the first admin, whose
/// identity file is written to `DIR/admin.json`. `address` is where clients will reach the
/// controller (`host:port`); `run` rewrites it if the controller ends up listening elsewhere.
pub fn init(
    cfg: &ControllerConfig,
    trust_domain: &TrustDomain,
    address: &str,
) -> Result<PathBuf, ControllerError> {
    let dir = &cfg.dir;
    let initialized = match &cfg.store {
        StoreConfig::Sqlite(db) => db.exists(),
        // A shared database is initialized once; other controllers join it. Key files already
        // in DIR are never replaced.
        StoreConfig::Postgres(_) => {
            dir.join(files::CA_CERT).exists() || cfg.store.open()?.meta(meta::EPOCH)?.is_some()
        }
    };
    if initialized {
        return Err(ControllerError::Setup(already_initialized(cfg)));
    }
    std::fs::create_dir_all(dir).map_err(ControllerError::io(dir))?;
    set_mode(dir, 0o700)?;
    let ca = CertificateAuthority::generate(trust_domain, cfg.clock.now())?;
    ca.save(dir)?;
    let signer = TokenSigner::generate();
    signer.save(&dir.join(files::TOKEN_KEY))?;
    let mut store = cfg.store.open()?;
    let mut epoch = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut epoch);
    // Under the write lock, so that of two `init`s racing on one database exactly one wins.
    store.lock_writes()?;
    let values = [
        (meta::TRUST_DOMAIN, trust_domain.as_str().to_owned()),
        (meta::CA_FINGERPRINT, ca.fingerprint().to_string()),
        (meta::TOKEN_KEY, token_key_id(&signer)),
        (meta::ADDRESS, address.to_owned()),
        // Last: its presence is what "initialized" means.
        (meta::EPOCH, hex::encode(epoch)),
    ];
    let written = match store.meta(meta::EPOCH) {
        Ok(Some(_)) => Err(ControllerError::Setup(already_initialized(cfg))),
        Ok(None) => (values.iter()).try_for_each(|(k, v)| store.set_meta(k, v)),
        Err(e) => Err(e),
    };
    store.unlock_writes();
    written?;
    drop(store);

    let ctrl = Controller::open(cfg.clone())?;
    let admin = parse_name("admin")?;
    let identity = ctrl.insert_identity(
        &Actor::controller(),
        admin,
        IdentityKind::Admin,
        Default::default(),
    )?;
    let file = ctrl.issue_local_identity(&Actor::controller(), &identity.id)?;
    let path = dir.join(files::ADMIN);
    file.save(&path)?;
    Ok(path)
}

/// Keys of the store's metadata.
mod meta {
    /// The trust domain.
    pub const TRUST_DOMAIN: &str = "trust_domain";
    /// The history's random id; its presence means the store is initialized.
    pub const EPOCH: &str = "epoch";
    /// Where clients reach the controller.
    pub const ADDRESS: &str = "address";
    /// The SHA-256 fingerprint of the root CA certificate the store was initialized with.
    pub const CA_FINGERPRINT: &str = "ca_fingerprint";
    /// The public key that verifies enrollment tokens (public: it identifies the key only).
    pub const TOKEN_KEY: &str = "token_key";
}

fn already_initialized(cfg: &ControllerConfig) -> String {
    match &cfg.store {
        StoreConfig::Sqlite(_) => format!("{} is already initialized", cfg.dir.display()),
        StoreConfig::Postgres(_) => format!(
            "{} or the database {} is already initialized (to run another controller on it: \
             `umbra controller join --dir NEW --from DIR --store URL`)",
            cfg.dir.display(),
            cfg.store
        ),
    }
}

/// The token verifying key as stored in the metadata: public, it names the key.
fn token_key_id(signer: &TokenSigner) -> String {
    hex::encode(signer.verifying_key().to_bytes())
}

/// Gives a new controller directory `cfg.dir` the key material of an existing controller's
/// directory `from` (the CA and the token key), so that it can run on the same database
/// (`cfg.store`). The keys are checked against the fingerprints the database was initialized
/// with before anything is written; the files are created with their final modes (0600 keys in a
/// 0700 directory); nothing is written to the database. Keys never go through the database.
pub fn join_dir(cfg: &ControllerConfig, from: &Path) -> Result<(), ControllerError> {
    let dir = &cfg.dir;
    for f in [files::CA_CERT, files::TOKEN_KEY] {
        if dir.join(f).exists() {
            return Err(ControllerError::Setup(format!(
                "{} already holds key material ({f})",
                dir.display()
            )));
        }
    }
    let mut store = cfg.store.open()?;
    if store.meta(meta::EPOCH)?.is_none() {
        return Err(ControllerError::Setup(format!(
            "the store {} is not initialized (run `umbra controller init` first)",
            cfg.store
        )));
    }
    let td = trust_domain_of(store.as_mut())?;
    let ca = CertificateAuthority::load(from, &td)?;
    let signer = TokenSigner::load(&from.join(files::TOKEN_KEY))?;
    check_keys(store.as_mut(), &ca, &signer, from)?;
    drop(store);
    ca.save(dir)?;
    set_mode(dir, 0o700)?;
    signer.save(&dir.join(files::TOKEN_KEY))?;
    Ok(())
}

fn trust_domain_of(store: &mut dyn Store) -> Result<TrustDomain, ControllerError> {
    let td = store
        .meta(meta::TRUST_DOMAIN)?
        .ok_or_else(|| ControllerError::Corrupt("no trust domain in the store".into()))?;
    td.parse()
        .map_err(|e| ControllerError::Corrupt(format!("trust domain: {e}")))
}

/// Refuses key material other than the one the store was initialized with: a controller given
/// the wrong directory would otherwise issue certificates no peer trusts, or tokens no other
/// controller accepts. A store made before the fingerprints were kept gets them now.
fn check_keys(
    store: &mut dyn Store,
    ca: &CertificateAuthority,
    signer: &TokenSigner,
    dir: &Path,
) -> Result<(), ControllerError> {
    let checks = [
        (meta::CA_FINGERPRINT, ca.fingerprint().to_string(), "CA"),
        (meta::TOKEN_KEY, token_key_id(signer), "token key"),
    ];
    for (key, ours, what) in checks {
        match store.meta(key)? {
            Some(stored) if stored != ours => {
                return Err(ControllerError::Setup(format!(
                    "the {what} in {} is not the one the store was initialized with \
                     ({key} {ours}, the store has {stored}): run every controller of a store \
                     with the key material of the first (`umbra controller join`)",
                    dir.display()
                )))
            }
            Some(_) => {}
            None => store.set_meta(key, &ours)?,
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ControllerError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(ControllerError::io(path))
}

fn new_identity_id() -> IdentityId {
    let mut b = [0u8; 12];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    // 24 hex characters: random, fixed length, and valid by construction.
    IdentityId::new(hex::encode(b)).unwrap_or_else(|_| unreachable!("hex is a valid id"))
}

pub(crate) fn parse_name(s: &str) -> Result<Name, ControllerError> {
    Name::new(s).map_err(|e| ControllerError::Invalid(format!("invalid name {s:?}: {e}")))
}

impl Controller {
    /// Opens an initialized directory.
    pub fn open(cfg: ControllerConfig) -> Result<Controller, ControllerError> {
        let dir = &cfg.dir;
        let not_initialized = || {
            ControllerError::Setup(match &cfg.store {
                StoreConfig::Sqlite(_) => format!(
                    "{} is not initialized (run `umbra controller init --dir {}`)",
                    dir.display(),
                    dir.display()
                ),
                StoreConfig::Postgres(_) => format!(
                    "the store {} is not initialized (run `umbra controller init --dir {} --store URL`)",
                    cfg.store,
                    dir.display()
                ),
            })
        };
        if let StoreConfig::Sqlite(db) = &cfg.store {
            if !db.exists() {
                return Err(not_initialized());
            }
        }
        let mut store = cfg.store.open()?;
        let epoch = store.meta(meta::EPOCH)?;
        let Some(epoch) = epoch else {
            return Err(match cfg.store {
                StoreConfig::Sqlite(_) => ControllerError::Corrupt("no epoch in the store".into()),
                StoreConfig::Postgres(_) => not_initialized(),
            });
        };
        let td = trust_domain_of(store.as_mut())?;
        let address = store
            .meta(meta::ADDRESS)?
            .unwrap_or_else(|| "127.0.0.1:1280".into());
        let ca = CertificateAuthority::load(dir, &td)?;
        let signer = TokenSigner::load(&dir.join(files::TOKEN_KEY))?;
        check_keys(store.as_mut(), &ca, &signer, dir)?;
        let verifier = signer.verifying_key();
        let bell = crate::audit::AuditBell::default();
        let audit = AuditSink::start(
            &cfg.store,
            cfg.audit.clone(),
            cfg.clock.clone(),
            bell.clone(),
        )?;
        let replica = store.load(epoch, cfg.clock.timestamp())?;
        let names = replica
            .state
            .identities
            .values()
            .map(|i| (i.name.clone(), i.id.clone()))
            .collect();
        if let Err(problems) = replica.state.validate() {
            for problem in problems {
                tracing::warn!(%problem, "the stored state breaks a rule; writes that add to it are refused");
            }
        }
        let revoked = Arc::new(RevokedSerials::default());
        revoked
            .0
            .store(Arc::new(replica.revoked.keys().cloned().collect()));
        let (deltas, _) = broadcast::channel(DELTA_CAPACITY);
        let shared = match &cfg.store {
            crate::store::StoreConfig::Postgres(_) => {
                Some(shared::Shared::open(&cfg.store, std::time::Instant::now())?)
            }
            _ => None,
        };
        let replica_state = replica.state.clone();
        let audit_reader = crate::audit::reader::Reader::new(cfg.store.clone());
        Ok(Controller {
            metrics: crate::metrics::Metrics::new(cfg.metrics.as_ref()),
            cfg,
            ca,
            signer,
            verifier,
            inner: Mutex::new(Inner {
                store,
                replica,
                names,
                index: Arc::new(Index::build(&replica_state)),
            }),
            deltas: ArcSwap::from_pointee(deltas),
            revoked,
            shared,
            address: Mutex::new(address),
            audit,
            bell,
            audit_reader,
            streams: Default::default(),
            hub: Default::default(),
            snapshots_served: Default::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Timestamp {
        self.cfg.clock.timestamp()
    }

    /// Rings after every commit that stored audit rows (see [`crate::audit::AuditBell`]).
    pub fn audit_bell(&self) -> &crate::audit::AuditBell {
        &self.bell
    }

    /// Reads the audit log as it grows (sinks, followers), apart from the command connection.
    pub fn audit_reader(&self) -> &crate::audit::reader::Reader {
        &self.audit_reader
    }

    /// The configuration.
    pub fn config(&self) -> &ControllerConfig {
        &self.cfg
    }

    /// The certificate authority.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.ca.trust_domain()
    }

    /// The revoked-serial set that TLS handshakes consult.
    pub fn revoked_serials(&self) -> Arc<RevokedSerials> {
        self.revoked.clone()
    }

    /// Where clients reach the controller; it goes into enrollment tokens.
    pub fn address(&self) -> String {
        self.address
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records where clients reach the controller (after binding the listener).
    pub fn set_address(&self, address: &str) -> Result<(), ControllerError> {
        // Every controller on a shared store has an address of its own: kept in memory.
        if !self.is_shared() {
            self.lock().store.set_meta("address", address)?;
        }
        *self.address.lock().unwrap_or_else(|e| e.into_inner()) = address.to_owned();
        Ok(())
    }

    /// A copy of the current model.
    pub fn state(&self) -> State {
        self.lock().replica.state.clone()
    }

    /// The compiled policy index for the current state (kept current by every commit, so this
    /// is a copy of a pointer).
    pub fn index(&self) -> Arc<Index> {
        Arc::clone(&self.lock().index)
    }

    fn audit(
        actor: &Actor,
        action: &'static str,
        target: impl Into<String>,
        detail: serde_json::Value,
    ) -> AuditRecord {
        AuditRecord {
            actor: actor.label.clone(),
            action,
            target: target.into(),
            detail,
        }
    }
}

fn rejected(errors: Vec<umbra_policies::DocError>) -> ControllerError {
    ControllerError::Rejected(errors.into_iter().map(|e| e.to_string()).collect())
}

fn join(names: &[Name]) -> String {
    names
        .iter()
        .map(Name::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Policies that name `name` with `@name` on the identity side (`identity_side`) or service side.
fn referencing_policies(state: &State, name: &Name, identity_side: bool) -> Vec<Name> {
    state
        .policies
        .values()
        .filter(|p| {
            let sels = if identity_side {
                &p.identities
            } else {
                &p.services
            };
            sels.iter()
                .any(|s| matches!(s, Selector::Named(n) if n == name))
        })
        .map(|p| p.name.clone())
        .collect()
}

#[cfg(test)]
mod gate_tests;
