//! The controller's state machine: every read and write of the model, enrollment and
//! certificate issuance goes through [`Controller`].
//!
//! One mutex serializes writes. Under it a command reads the current state, builds a [`Batch`],
//! commits it to SQLite, applies it to the in-memory replica and publishes the deltas, in that
//! order, so that what routers see is always a prefix of what is durable. Every call here is
//! blocking (SQLite); the HTTP layer runs them on the blocking pool.

use std::collections::{HashMap, HashSet};
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
    ApplyResponse, AuditEntry, CreateIdentityRequest, EdgeService, EdgeView, EnrollResponse,
    ExplainResponse, GrantRequest, IdentityView, RenewResponse, RouterView, TokenResponse,
};
use umbra_proto::{ChangeEvent, ControlMessage, Delta, Replica, RevokedCert, RouterInfo};

use crate::clock::Clock;
use crate::error::ControllerError;
use crate::store::{AuditRecord, Batch, Record, Store};

/// File names inside the controller's directory.
pub mod files {
    /// The SQLite database.
    pub const DB: &str = "umbra.db";
    /// The enrollment-token signing key.
    pub const TOKEN_KEY: &str = "token.key";
    /// The first admin's identity file.
    pub const ADMIN: &str = "admin.json";
}

/// How a controller runs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The directory made by `umbra controller init`.
    pub dir: PathBuf,
    /// Lifetime of identity certificates (short, so that a lost key expires on its own).
    pub cert_validity: Duration,
    /// Lifetime of an enrollment token when the request names none.
    pub default_token_ttl: Duration,
    /// The longest enrollment token lifetime accepted.
    pub max_token_ttl: Duration,
    /// The time source.
    pub clock: Clock,
}

impl ControllerConfig {
    /// Defaults for a directory: 24 h certificates, 30 min tokens (at most 7 days).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ControllerConfig {
            dir: dir.into(),
            cert_validity: Duration::from_secs(24 * 3600),
            default_token_ttl: Duration::from_secs(30 * 60),
            max_token_ttl: Duration::from_secs(7 * 24 * 3600),
            clock: Clock::system(),
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
pub struct RevokedSerials(ArcSwap<HashSet<String>>);

impl RevocationCheck for RevokedSerials {
    fn is_revoked(&self, serial: &Serial) -> bool {
        self.0.load().contains(&serial.to_string())
    }
}

struct Inner {
    store: Store,
    replica: Replica,
    names: HashMap<Name, IdentityId>,
    index: Option<(u64, Arc<Index>)>,
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
#[derive(Debug)]
pub struct Subscription {
    /// `Hello`, then a snapshot or the deltas since the follower's position.
    pub initial: Vec<ControlMessage>,
    /// The sequence number the initial messages reach.
    pub seq: u64,
    /// Every delta committed after subscribing.
    pub deltas: broadcast::Receiver<Arc<Delta>>,
}

/// The controller.
pub struct Controller {
    cfg: ControllerConfig,
    ca: CertificateAuthority,
    signer: TokenSigner,
    verifier: TokenVerifier,
    inner: Mutex<Inner>,
    deltas: broadcast::Sender<Arc<Delta>>,
    revoked: Arc<RevokedSerials>,
    address: Mutex<String>,
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
    if dir.join(files::DB).exists() {
        return Err(ControllerError::Setup(format!(
            "{} is already initialized",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(ControllerError::io(dir))?;
    set_mode(dir, 0o700)?;
    let ca = CertificateAuthority::generate(trust_domain, cfg.clock.now())?;
    ca.save(dir)?;
    TokenSigner::generate().save(&dir.join(files::TOKEN_KEY))?;
    let store = Store::open(&dir.join(files::DB))?;
    let mut epoch = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut epoch);
    store.set_meta("trust_domain", trust_domain.as_str())?;
    store.set_meta("epoch", &hex::encode(epoch))?;
    store.set_meta("address", address)?;
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
        let db = dir.join(files::DB);
        if !db.exists() {
            return Err(ControllerError::Setup(format!(
                "{} is not initialized (run `umbra controller init --dir {}`)",
                dir.display(),
                dir.display()
            )));
        }
        let store = Store::open(&db)?;
        let td = store
            .meta("trust_domain")?
            .ok_or_else(|| ControllerError::Corrupt("no trust domain in the store".into()))?;
        let td: TrustDomain = td
            .parse()
            .map_err(|e| ControllerError::Corrupt(format!("trust domain: {e}")))?;
        let epoch = store
            .meta("epoch")?
            .ok_or_else(|| ControllerError::Corrupt("no epoch in the store".into()))?;
        let address = store
            .meta("address")?
            .unwrap_or_else(|| "127.0.0.1:1280".into());
        let ca = CertificateAuthority::load(dir, &td)?;
        let signer = TokenSigner::load(&dir.join(files::TOKEN_KEY))?;
        let verifier = signer.verifying_key();
        let replica = store.load(epoch, cfg.clock.timestamp())?;
        let names = replica
            .state
            .identities
            .values()
            .map(|i| (i.name.clone(), i.id.clone()))
            .collect();
        let revoked = Arc::new(RevokedSerials::default());
        revoked
            .0
            .store(Arc::new(replica.revoked.keys().cloned().collect()));
        let (deltas, _) = broadcast::channel(4096);
        Ok(Controller {
            cfg,
            ca,
            signer,
            verifier,
            inner: Mutex::new(Inner {
                store,
                replica,
                names,
                index: None,
            }),
            deltas,
            revoked,
            address: Mutex::new(address),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Timestamp {
        self.cfg.clock.timestamp()
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
        self.lock().store.set_meta("address", address)?;
        *self.address.lock().unwrap_or_else(|e| e.into_inner()) = address.to_owned();
        Ok(())
    }

    /// A copy of the current model.
    pub fn state(&self) -> State {
        self.lock().replica.state.clone()
    }

    /// The compiled policy index for the current state (rebuilt only after a model change).
    pub fn index(&self) -> Arc<Index> {
        let mut inner = self.lock();
        let seq = inner.replica.seq;
        if let Some((s, idx)) = &inner.index {
            if *s == seq {
                return idx.clone();
            }
        }
        let idx = Arc::new(Index::build(inner.state()));
        inner.index = Some((seq, idx.clone()));
        idx
    }

    /// Commits a batch built under the lock and publishes its deltas.
    fn commit(&self, inner: &mut Inner, batch: Batch) -> Result<(), ControllerError> {
        if batch.is_empty() {
            return Ok(());
        }
        let now = self.now();
        let deltas = inner.store.commit(&batch, inner.replica.seq, now)?;
        let mut revoked_changed = false;
        for d in &deltas {
            match &d.change {
                ChangeEvent::IdentityPut { identity } => {
                    inner
                        .names
                        .insert(identity.name.clone(), identity.id.clone());
                }
                ChangeEvent::IdentityDeleted { id } => {
                    if let Some(i) = inner.replica.state.identities.get(id) {
                        let n = i.name.clone();
                        inner.names.remove(&n);
                    }
                }
                ChangeEvent::CertRevoked { .. } => revoked_changed = true,
                _ => {}
            }
            inner.replica.apply_change(&d.change);
            inner.replica.seq = d.seq;
        }
        if revoked_changed {
            self.revoked
                .0
                .store(Arc::new(inner.replica.revoked.keys().cloned().collect()));
        }
        for d in deltas {
            // No receivers is normal (no router connected).
            let _ = self.deltas.send(Arc::new(d));
        }
        Ok(())
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

    // ----- identities -------------------------------------------------------------------------

    fn insert_identity(
        &self,
        actor: &Actor,
        name: Name,
        kind: IdentityKind,
        roles: std::collections::BTreeSet<Name>,
    ) -> Result<Identity, ControllerError> {
        let mut inner = self.lock();
        if inner.names.contains_key(&name) {
            return Err(ControllerError::Conflict(format!(
                "an identity named {name} already exists"
            )));
        }
        let identity = Identity {
            id: new_identity_id(),
            name,
            kind,
            roles,
            disabled: false,
            revoked: false,
            expires_at: None,
        };
        let mut batch = Batch::default();
        batch.changes.push(ChangeEvent::IdentityPut {
            identity: identity.clone(),
        });
        if kind == IdentityKind::Router {
            batch.changes.push(ChangeEvent::RouterPut {
                router: RouterInfo {
                    id: identity.id.clone(),
                    name: identity.name.clone(),
                    advertise: None,
                },
            });
        }
        batch.audit.push(Self::audit(
            actor,
            "identity.create",
            identity.name.as_str(),
            serde_json::json!({ "id": identity.id, "kind": kind, "roles": identity.roles }),
        ));
        self.commit(&mut inner, batch)?;
        Ok(identity)
    }

    /// Creates an agent or admin identity and returns its one-time enrollment token.
    pub fn create_identity(
        &self,
        actor: &Actor,
        req: CreateIdentityRequest,
    ) -> Result<TokenResponse, ControllerError> {
        if req.kind == IdentityKind::Router {
            return Err(ControllerError::Invalid(
                "routers are created with `umbra router create`".into(),
            ));
        }
        let identity =
            self.insert_identity(actor, req.name, req.kind, req.roles.into_iter().collect())?;
        self.issue_token(actor, identity.name.as_str(), req.token_ttl_secs)
    }

    /// Creates a router identity and returns its enrollment token.
    pub fn create_router(
        &self,
        actor: &Actor,
        name: Name,
        ttl: Option<u64>,
    ) -> Result<TokenResponse, ControllerError> {
        let identity =
            self.insert_identity(actor, name, IdentityKind::Router, Default::default())?;
        self.issue_token(actor, identity.name.as_str(), ttl)
    }

    /// Issues a new enrollment token for an existing identity; earlier unused tokens stop working.
    pub fn issue_token(
        &self,
        actor: &Actor,
        name: &str,
        ttl: Option<u64>,
    ) -> Result<TokenResponse, ControllerError> {
        let ttl = ttl.unwrap_or(secs(self.cfg.default_token_ttl));
        if ttl == 0 || ttl > secs(self.cfg.max_token_ttl) {
            return Err(ControllerError::Invalid(format!(
                "token lifetime must be between 1 s and {} s",
                secs(self.cfg.max_token_ttl)
            )));
        }
        let mut inner = self.lock();
        let identity = inner
            .identity_named(name)
            .cloned()
            .ok_or_else(|| ControllerError::NotFound(format!("no identity named {name}")))?;
        if identity.revoked {
            return Err(ControllerError::Conflict(format!(
                "identity {name} is revoked"
            )));
        }
        let now = self.now();
        let claims = EnrollmentClaims {
            iss: self.address(),
            sub: identity.id.clone(),
            name: identity.name.clone(),
            kind: identity.kind,
            td: self.trust_domain().clone(),
            ca: self.ca.fingerprint(),
            iat: now,
            exp: now.plus(ttl),
            jti: umbra_pki::new_nonce(),
        };
        let token = self.signer.sign(&claims);
        let mut batch = Batch::default();
        batch.records.push(Record::Token {
            jti: claims.jti.clone(),
            identity: identity.id.clone(),
            expires_at: claims.exp,
        });
        batch.audit.push(Self::audit(
            actor,
            "identity.token",
            identity.name.as_str(),
            serde_json::json!({ "expires_at": claims.exp }),
        ));
        self.commit(&mut inner, batch)?;
        Ok(TokenResponse {
            identity,
            token,
            token_expires_at: claims.exp,
        })
    }

    /// Lists identities (all kinds, or one).
    pub fn list_identities(
        &self,
        kind: Option<IdentityKind>,
    ) -> Result<Vec<IdentityView>, ControllerError> {
        let inner = self.lock();
        let enrolled = inner.store.enrolled_ids()?;
        let mut out: Vec<IdentityView> = inner
            .state()
            .identities
            .values()
            .filter(|i| kind.is_none_or(|k| i.kind == k))
            .map(|i| IdentityView {
                identity: i.clone(),
                enrolled: enrolled.contains(i.id.as_str()),
                certs: vec![],
            })
            .collect();
        out.sort_by(|a, b| a.identity.name.cmp(&b.identity.name));
        Ok(out)
    }

    /// One identity with its certificates.
    pub fn show_identity(&self, name: &str) -> Result<IdentityView, ControllerError> {
        let inner = self.lock();
        let identity = inner
            .identity_named(name)
            .cloned()
            .ok_or_else(|| ControllerError::NotFound(format!("no identity named {name}")))?;
        let certs = inner.store.certs_of(&identity.id)?;
        Ok(IdentityView {
            enrolled: !certs.is_empty(),
            identity,
            certs,
        })
    }

    fn revoke_certs(
        inner: &Inner,
        id: &IdentityId,
        now: Timestamp,
        batch: &mut Batch,
    ) -> Result<(), ControllerError> {
        for cert in inner.store.live_certs_of(id, now)? {
            batch.changes.push(ChangeEvent::CertRevoked { cert });
        }
        Ok(())
    }

    /// Revokes an identity for good: the record stays for audit, every certificate it holds goes
    /// on the revocation list, and routers cut its live connections when the delta arrives.
    pub fn revoke_identity(&self, actor: &Actor, name: &str) -> Result<Identity, ControllerError> {
        let mut inner = self.lock();
        let mut identity = inner
            .identity_named(name)
            .cloned()
            .ok_or_else(|| ControllerError::NotFound(format!("no identity named {name}")))?;
        if actor.id.as_ref() == Some(&identity.id) {
            return Err(ControllerError::Conflict(
                "an admin cannot revoke its own identity".into(),
            ));
        }
        let now = self.now();
        let mut batch = Batch::default();
        // Revocations go first, so a router applying the deltas cuts before anything else.
        Self::revoke_certs(&inner, &identity.id, now, &mut batch)?;
        if !identity.revoked {
            identity.revoked = true;
            batch.changes.insert(
                0,
                ChangeEvent::IdentityPut {
                    identity: identity.clone(),
                },
            );
        }
        batch.audit.push(Self::audit(
            actor,
            "identity.revoke",
            name,
            serde_json::json!({ "id": identity.id }),
        ));
        self.commit(&mut inner, batch)?;
        Ok(identity)
    }

    /// Deletes an identity (or router). A `@name` reference in a policy blocks the delete unless
    /// `cascade`, which deletes those policies too: removing a selector could widen an `allOf`
    /// policy, deleting the policy never widens anything.
    pub fn delete_identity(
        &self,
        actor: &Actor,
        name: &str,
        cascade: bool,
        kind: Option<IdentityKind>,
    ) -> Result<Vec<Name>, ControllerError> {
        let mut inner = self.lock();
        let identity = inner
            .identity_named(name)
            .filter(|i| kind.is_none_or(|k| i.kind == k))
            .cloned()
            .ok_or_else(|| {
                ControllerError::NotFound(format!(
                    "no {} named {name}",
                    kind.map_or("identity", |k| k.as_str())
                ))
            })?;
        if actor.id.as_ref() == Some(&identity.id) {
            return Err(ControllerError::Conflict(
                "an admin cannot delete its own identity".into(),
            ));
        }
        let referencing = referencing_policies(inner.state(), &identity.name, true);
        if !referencing.is_empty() && !cascade {
            return Err(ControllerError::Conflict(format!(
                "identity {name} is named by policies {}; revoke them first or pass --cascade",
                join(&referencing)
            )));
        }
        let now = self.now();
        let mut batch = Batch::default();
        Self::revoke_certs(&inner, &identity.id, now, &mut batch)?;
        batch.changes.push(ChangeEvent::IdentityDeleted {
            id: identity.id.clone(),
        });
        if identity.kind == IdentityKind::Router {
            batch.changes.push(ChangeEvent::RouterDeleted {
                id: identity.id.clone(),
            });
        }
        for p in &referencing {
            batch
                .changes
                .push(ChangeEvent::PolicyDeleted { name: p.clone() });
        }
        batch.audit.push(Self::audit(
            actor,
            "identity.delete",
            name,
            serde_json::json!({ "id": identity.id, "deleted_policies": referencing }),
        ));
        self.commit(&mut inner, batch)?;
        Ok(referencing)
    }

    // ----- services ---------------------------------------------------------------------------

    /// Creates a service.
    pub fn create_service(
        &self,
        actor: &Actor,
        service: Service,
    ) -> Result<Service, ControllerError> {
        let mut inner = self.lock();
        if inner.state().services.contains_key(&service.name) {
            return Err(ControllerError::Conflict(format!(
                "a service named {} already exists",
                service.name
            )));
        }
        for other in inner.state().services.values() {
            if let Some(i) = service
                .intercepts
                .iter()
                .find(|i| other.intercepts.contains(i))
            {
                return Err(ControllerError::Conflict(format!(
                    "intercept {i} is already used by service {}",
                    other.name
                )));
            }
        }
        let mut batch = Batch::default();
        batch.changes.push(ChangeEvent::ServicePut {
            service: service.clone(),
        });
        batch.audit.push(Self::audit(
            actor,
            "service.create",
            service.name.as_str(),
            serde_json::to_value(&service)?,
        ));
        self.commit(&mut inner, batch)?;
        Ok(service)
    }

    /// All services, by name.
    pub fn list_services(&self) -> Vec<Service> {
        self.lock().state().services.values().cloned().collect()
    }

    /// One service.
    pub fn show_service(&self, name: &str) -> Result<Service, ControllerError> {
        self.lock()
            .state()
            .services
            .get(name)
            .cloned()
            .ok_or_else(|| ControllerError::NotFound(format!("no service named {name}")))
    }

    /// Deletes a service; `@name` references block it unless `cascade` (see `delete_identity`).
    pub fn delete_service(
        &self,
        actor: &Actor,
        name: &str,
        cascade: bool,
    ) -> Result<Vec<Name>, ControllerError> {
        let mut inner = self.lock();
        let service = inner
            .state()
            .services
            .get(name)
            .cloned()
            .ok_or_else(|| ControllerError::NotFound(format!("no service named {name}")))?;
        let referencing = referencing_policies(inner.state(), &service.name, false);
        if !referencing.is_empty() && !cascade {
            return Err(ControllerError::Conflict(format!(
                "service {name} is named by policies {}; revoke them first or pass --cascade",
                join(&referencing)
            )));
        }
        let mut batch = Batch::default();
        batch.changes.push(ChangeEvent::ServiceDeleted {
            name: service.name.clone(),
        });
        for p in &referencing {
            batch
                .changes
                .push(ChangeEvent::PolicyDeleted { name: p.clone() });
        }
        batch.audit.push(Self::audit(
            actor,
            "service.delete",
            name,
            serde_json::json!({ "deleted_policies": referencing }),
        ));
        self.commit(&mut inner, batch)?;
        Ok(referencing)
    }

    // ----- policies ---------------------------------------------------------------------------

    /// Creates a service policy.
    pub fn grant(
        &self,
        actor: &Actor,
        req: GrantRequest,
    ) -> Result<ServicePolicy, ControllerError> {
        let mut inner = self.lock();
        let state = inner.state();
        let mut problems = Vec::new();
        if req.identities.is_empty() {
            problems.push("at least one identity selector is needed".to_owned());
        }
        if req.services.is_empty() {
            problems.push("at least one service selector is needed".to_owned());
        }
        for s in &req.identities {
            if let Selector::Named(n) = s {
                if !inner.names.contains_key(n) {
                    problems.push(format!("{s}: no identity named {n}"));
                }
            }
        }
        for s in &req.services {
            if let Selector::Named(n) = s {
                if !state.services.contains_key(n) {
                    problems.push(format!("{s}: no service named {n}"));
                }
            }
        }
        if !problems.is_empty() {
            return Err(ControllerError::Rejected(problems));
        }
        let name = match req.name {
            Some(n) if state.policies.contains_key(&n) => {
                return Err(ControllerError::Conflict(format!(
                    "a policy named {n} already exists"
                )))
            }
            Some(n) => n,
            None => generated_policy_name(state, req.action, &req.identities, &req.services),
        };
        let policy = ServicePolicy {
            name,
            action: req.action,
            identities: req.identities,
            services: req.services,
            semantic: req.semantic,
        };
        let mut batch = Batch::default();
        batch.changes.push(ChangeEvent::PolicyPut {
            policy: policy.clone(),
        });
        batch.audit.push(Self::audit(
            actor,
            "policy.grant",
            policy.name.as_str(),
            serde_json::to_value(&policy)?,
        ));
        self.commit(&mut inner, batch)?;
        Ok(policy)
    }

    /// Deletes a service policy; routers cut the streams that only it allowed.
    pub fn revoke_policy(&self, actor: &Actor, name: &str) -> Result<(), ControllerError> {
        let mut inner = self.lock();
        let policy = inner
            .state()
            .policies
            .get(name)
            .cloned()
            .ok_or_else(|| ControllerError::NotFound(format!("no policy named {name}")))?;
        let mut batch = Batch::default();
        batch.changes.push(ChangeEvent::PolicyDeleted {
            name: policy.name.clone(),
        });
        batch.audit.push(Self::audit(
            actor,
            "policy.revoke",
            name,
            serde_json::to_value(&policy)?,
        ));
        self.commit(&mut inner, batch)
    }

    /// All policies, by name.
    pub fn list_policies(&self) -> Vec<ServicePolicy> {
        self.lock().state().policies.values().cloned().collect()
    }

    /// Names the policies that grant `identity` access to `service`, or says why none does.
    pub fn explain(
        &self,
        identity: &str,
        service: &str,
        action: Action,
    ) -> Result<ExplainResponse, ControllerError> {
        let id = {
            let inner = self.lock();
            inner
                .identity_named(identity)
                .map(|i| i.id.clone())
                .ok_or_else(|| ControllerError::NotFound(format!("no identity named {identity}")))?
        };
        let ex = self.index().explain(&id, service, action, self.now());
        Ok(ExplainResponse {
            allowed: ex.decision.is_ok(),
            granting: ex.granting,
            reason: ex.reason,
        })
    }

    // ----- declarative state ------------------------------------------------------------------

    /// The current state as a YAML document.
    pub fn export(&self) -> String {
        umbra_policies::export(self.lock().state()).to_yaml()
    }

    /// Makes the state match a document (or only computes the plan, with `dry_run`).
    pub fn apply(
        &self,
        actor: &Actor,
        yaml: &str,
        dry_run: bool,
    ) -> Result<ApplyResponse, ControllerError> {
        let doc = umbra_policies::parse_document(yaml).map_err(rejected)?;
        let mut inner = self.lock();
        let plan = umbra_policies::plan(inner.state(), &doc).map_err(rejected)?;
        // The result must pass the same rules as every other write.
        umbra_policies::apply_plan(inner.state(), &plan, new_identity_id).map_err(rejected)?;
        let text = plan.to_string();
        let changes = plan.changes.len();
        if dry_run || plan.is_empty() {
            return Ok(ApplyResponse {
                plan: text,
                changes,
                applied: false,
            });
        }
        let now = self.now();
        let mut batch = Batch::default();
        let mut revocations = Batch::default();
        for change in plan.changes {
            use umbra_policies::Change;
            match change {
                Change::CreateIdentity {
                    name,
                    kind,
                    roles,
                    disabled,
                } => {
                    if inner.names.contains_key(&name) {
                        return Err(ControllerError::Conflict(format!(
                            "an identity named {name} already exists"
                        )));
                    }
                    let identity = Identity {
                        id: new_identity_id(),
                        name,
                        kind,
                        roles,
                        disabled,
                        revoked: false,
                        expires_at: None,
                    };
                    batch.changes.push(ChangeEvent::IdentityPut { identity });
                }
                Change::UpdateIdentity {
                    id,
                    name,
                    roles,
                    disabled,
                } => {
                    let mut identity =
                        inner.state().identities.get(&id).cloned().ok_or_else(|| {
                            ControllerError::Conflict(format!(
                                "identity {name} changed during apply"
                            ))
                        })?;
                    identity.roles = roles;
                    identity.disabled = disabled;
                    batch.changes.push(ChangeEvent::IdentityPut { identity });
                }
                Change::DeleteIdentity { id, name } => {
                    if actor.id.as_ref() == Some(&id) {
                        return Err(ControllerError::Conflict(format!(
                            "the document omits {name}, the admin applying it; an admin cannot delete itself"
                        )));
                    }
                    Self::revoke_certs(&inner, &id, now, &mut revocations)?;
                    batch.changes.push(ChangeEvent::IdentityDeleted { id });
                }
                Change::PutService(service) => {
                    batch.changes.push(ChangeEvent::ServicePut { service })
                }
                Change::DeleteService { name } => {
                    batch.changes.push(ChangeEvent::ServiceDeleted { name })
                }
                Change::PutPolicy(policy) => batch.changes.push(ChangeEvent::PolicyPut { policy }),
                Change::DeletePolicy { name } => {
                    batch.changes.push(ChangeEvent::PolicyDeleted { name })
                }
            }
        }
        // Revocations first, then the rest in plan order.
        revocations.changes.append(&mut batch.changes);
        revocations.audit.push(Self::audit(
            actor,
            "apply",
            "state",
            serde_json::json!({ "plan": text }),
        ));
        self.commit(&mut inner, revocations)?;
        Ok(ApplyResponse {
            plan: text,
            changes,
            applied: true,
        })
    }

    // ----- routers ----------------------------------------------------------------------------

    /// Routers with their advertised addresses.
    pub fn list_routers(&self) -> Result<Vec<RouterView>, ControllerError> {
        let inner = self.lock();
        let enrolled = inner.store.enrolled_ids()?;
        let mut out: Vec<RouterView> = inner
            .state()
            .identities
            .values()
            .filter(|i| i.kind == IdentityKind::Router)
            .map(|i| RouterView {
                identity: i.clone(),
                advertise: inner
                    .replica
                    .routers
                    .get(&i.id)
                    .and_then(|r| r.advertise.clone()),
                enrolled: enrolled.contains(i.id.as_str()),
            })
            .collect();
        out.sort_by(|a, b| a.identity.name.cmp(&b.identity.name));
        Ok(out)
    }

    // ----- certificates -----------------------------------------------------------------------

    /// Spends a one-time token: checks it, signs the CSR and records the certificate, atomically.
    pub fn enroll(&self, token: &str, csr_der: &[u8]) -> Result<EnrollResponse, ControllerError> {
        let now = self.now();
        let claims = self
            .verifier
            .verify(token, now)
            .map_err(|e| ControllerError::Enrollment(e.to_string()))?;
        let mut inner = self.lock();
        let row = inner.store.token(&claims.jti)?.ok_or_else(|| {
            ControllerError::Enrollment("the token is unknown to this controller".into())
        })?;
        if row.used_at.is_some() {
            return Err(ControllerError::Enrollment(
                "the token was already used (or replaced by a newer one)".into(),
            ));
        }
        if row.identity != claims.sub {
            return Err(ControllerError::Enrollment(
                "the token does not match its identity".into(),
            ));
        }
        let identity = inner
            .state()
            .identities
            .get(&claims.sub)
            .cloned()
            .ok_or_else(|| ControllerError::Enrollment("the identity no longer exists".into()))?;
        if !identity.is_active(now) {
            return Err(ControllerError::Enrollment(format!(
                "identity {} is revoked, disabled or expired",
                identity.name
            )));
        }
        let spiffe = SpiffeId::new(self.trust_domain(), identity.kind, &identity.name);
        let issued = self.ca.issue(
            csr_der,
            &spiffe,
            self.cfg.cert_validity,
            self.cfg.clock.now(),
        )?;
        let mut batch = Batch::default();
        batch.records.push(Record::TokenUsed {
            jti: claims.jti.clone(),
        });
        batch.records.push(Record::Cert {
            serial: issued.serial.to_string(),
            identity: identity.id.clone(),
            not_after: issued.not_after,
        });
        batch.audit.push(Self::audit(
            &Actor { id: Some(identity.id.clone()), label: spiffe.to_string() },
            "identity.enroll",
            identity.name.as_str(),
            serde_json::json!({ "serial": issued.serial.to_string(), "not_after": issued.not_after }),
        ));
        self.commit(&mut inner, batch)?;
        Ok(EnrollResponse {
            cert_pem: issued.cert_pem,
            ca_pem: self.ca.root_pem().to_owned(),
            identity,
            trust_domain: self.trust_domain().to_string(),
        })
    }

    /// Issues a fresh certificate to an identity that proved its current one.
    pub fn renew(&self, peer: &PeerCert, csr_der: &[u8]) -> Result<RenewResponse, ControllerError> {
        let identity = self.authorize_peer(peer, None)?;
        let spiffe = SpiffeId::new(self.trust_domain(), identity.kind, &identity.name);
        let issued = self.ca.issue(
            csr_der,
            &spiffe,
            self.cfg.cert_validity,
            self.cfg.clock.now(),
        )?;
        let mut inner = self.lock();
        let mut batch = Batch::default();
        batch.records.push(Record::Cert {
            serial: issued.serial.to_string(),
            identity: identity.id.clone(),
            not_after: issued.not_after,
        });
        batch.audit.push(Self::audit(
            &Actor { id: Some(identity.id.clone()), label: spiffe.to_string() },
            "identity.renew",
            identity.name.as_str(),
            serde_json::json!({ "old_serial": peer.serial.to_string(), "serial": issued.serial.to_string() }),
        ));
        self.commit(&mut inner, batch)?;
        Ok(RenewResponse {
            cert_pem: issued.cert_pem,
            not_after: issued.not_after,
        })
    }

    /// Creates a complete identity file here, for an identity whose key may be generated on this
    /// machine (the first admin at `init`).
    pub fn issue_local_identity(
        &self,
        actor: &Actor,
        id: &IdentityId,
    ) -> Result<IdentityFile, ControllerError> {
        let identity = self
            .lock()
            .state()
            .identities
            .get(id)
            .cloned()
            .ok_or_else(|| ControllerError::NotFound("no such identity".into()))?;
        let key = umbra_pki::generate_key_and_csr(identity.name.as_str())?;
        let spiffe = SpiffeId::new(self.trust_domain(), identity.kind, &identity.name);
        let issued = self.ca.issue(
            &key.csr_der,
            &spiffe,
            self.cfg.cert_validity,
            self.cfg.clock.now(),
        )?;
        let mut inner = self.lock();
        let mut batch = Batch::default();
        batch.records.push(Record::Cert {
            serial: issued.serial.to_string(),
            identity: identity.id.clone(),
            not_after: issued.not_after,
        });
        batch.audit.push(Self::audit(
            actor,
            "identity.issue_local",
            identity.name.as_str(),
            serde_json::json!({ "serial": issued.serial.to_string() }),
        ));
        self.commit(&mut inner, batch)?;
        Ok(IdentityFile {
            version: 1,
            id: identity.id.clone(),
            name: identity.name.clone(),
            kind: identity.kind,
            trust_domain: self.trust_domain().clone(),
            controller: self.address(),
            ca_pem: self.ca.root_pem().to_owned(),
            cert_pem: issued.cert_pem,
            key_pem: key.key_pem,
        })
    }

    /// Checks that a handshake-verified certificate still speaks for an active identity of the
    /// expected kind: the certificate was issued by this controller to that very identity (not
    /// to an earlier namesake) and is not revoked.
    pub fn authorize_peer(
        &self,
        peer: &PeerCert,
        kind: Option<IdentityKind>,
    ) -> Result<Identity, ControllerError> {
        let forbidden =
            || ControllerError::Forbidden("this certificate is not allowed here".into());
        if peer.spiffe.trust_domain() != self.trust_domain() {
            return Err(forbidden());
        }
        if kind.is_some_and(|k| peer.spiffe.kind() != k) {
            return Err(forbidden());
        }
        let inner = self.lock();
        let identity = inner
            .identity_named(peer.spiffe.name().as_str())
            .cloned()
            .ok_or_else(forbidden)?;
        let (owner, revoked) = inner
            .store
            .cert_owner(&peer.serial.to_string())?
            .ok_or_else(forbidden)?;
        if owner != identity.id
            || revoked
            || identity.kind != peer.spiffe.kind()
            || !identity.is_active(self.now())
        {
            return Err(forbidden());
        }
        Ok(identity)
    }

    /// The newest audit entries.
    pub fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>, ControllerError> {
        self.lock().store.audit(limit)
    }

    // ----- control channel --------------------------------------------------------------------

    /// What a follower at `since` (epoch, seq) needs first, and a receiver for what follows.
    /// The receiver is subscribed before the state is read, so no delta falls in between;
    /// the caller skips received deltas at or below the returned sequence number.
    pub fn subscribe(&self, since: Option<(&str, u64)>) -> Result<Subscription, ControllerError> {
        let rx = self.deltas.subscribe();
        let inner = self.lock();
        let epoch = inner.replica.epoch.clone();
        let mut out = vec![ControlMessage::Hello {
            version: umbra_proto::control::CONTROL_PROTOCOL_VERSION,
            epoch: epoch.clone(),
        }];
        let resumed = match since {
            Some((e, seq)) if e == epoch => inner.store.changes_since(seq)?,
            _ => None,
        };
        match resumed {
            Some(deltas) => out.extend(
                deltas
                    .into_iter()
                    .map(|d| ControlMessage::Delta(Box::new(d))),
            ),
            None => {
                let mut replica = inner.replica.clone();
                replica.prune_revoked(self.now());
                out.push(ControlMessage::Snapshot(Box::new(replica.to_snapshot())));
            }
        }
        Ok(Subscription {
            initial: out,
            seq: inner.replica.seq,
            deltas: rx,
        })
    }

    /// Records where a router is reached.
    pub fn router_advertise(
        &self,
        router: &Identity,
        advertise: &str,
    ) -> Result<(), ControllerError> {
        let mut inner = self.lock();
        let info = RouterInfo {
            id: router.id.clone(),
            name: router.name.clone(),
            advertise: Some(advertise.to_owned()),
        };
        if inner.replica.routers.get(&router.id) == Some(&info) {
            return Ok(());
        }
        let mut batch = Batch::default();
        batch.changes.push(ChangeEvent::RouterPut { router: info });
        self.commit(&mut inner, batch)
    }

    /// What `identity` may use now, and where the routers are.
    pub fn edge_view(&self, identity: &Identity) -> EdgeView {
        let index = self.index();
        let now = self.now();
        let mut services: std::collections::BTreeMap<Name, EdgeService> = Default::default();
        for (action, svcs) in [
            (
                Action::Dial,
                index.services_for(&identity.id, Action::Dial, now),
            ),
            (
                Action::Bind,
                index.services_for(&identity.id, Action::Bind, now),
            ),
        ] {
            for s in svcs {
                let e = services
                    .entry(s.name.clone())
                    .or_insert_with(|| EdgeService {
                        name: s.name.clone(),
                        intercepts: s.intercepts.clone(),
                        dial: false,
                        bind: false,
                    });
                match action {
                    Action::Dial => e.dial = true,
                    Action::Bind => e.bind = true,
                }
            }
        }
        let routers = self
            .lock()
            .replica
            .routers
            .values()
            .filter(|r| r.advertise.is_some())
            .cloned()
            .collect();
        EdgeView {
            routers,
            services: services.into_values().collect(),
        }
    }

    /// A receiver of every committed delta, for watchers that recompute a view.
    pub fn deltas(&self) -> broadcast::Receiver<Arc<Delta>> {
        self.deltas.subscribe()
    }

    /// Revoked certificates (for tests and diagnostics).
    pub fn revoked(&self) -> Vec<RevokedCert> {
        self.lock().replica.revoked.values().cloned().collect()
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

/// `dial-agent-1-llm`, made unique with a numeric suffix.
fn generated_policy_name(
    state: &State,
    action: Action,
    ids: &[Selector],
    svcs: &[Selector],
) -> Name {
    let part = |s: Option<&Selector>| match s {
        Some(Selector::All) | None => "all".to_owned(),
        Some(Selector::Role(n)) | Some(Selector::Named(n)) => n.to_string(),
    };
    let mut base = format!("{action}-{}-{}", part(ids.first()), part(svcs.first()));
    base.truncate(54);
    let base = base
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned();
    let mut candidate = base.clone();
    let mut n = 2;
    loop {
        if let Ok(name) = Name::new(candidate.clone()) {
            if !state.policies.contains_key(&name) {
                return name;
            }
        }
        candidate = format!("{base}-{n}");
        n += 1;
    }
}
