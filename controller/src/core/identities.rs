//! Identities and routers: create, token, list, revoke, delete.

use super::*;

impl Controller {
    pub(super) fn insert_identity(
        &self,
        actor: &Actor,
        name: Name,
        kind: IdentityKind,
        roles: umbra_policies::Roles,
    ) -> Result<Identity, ControllerError> {
        let mut inner = self.write()?;
        // A name already taken is refused by the gate in `commit`.
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
        // Checked before anything is written, so a bad lifetime leaves no tokenless identity.
        self.token_ttl(req.token_ttl_secs)?;
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
        self.token_ttl(ttl)?;
        let identity =
            self.insert_identity(actor, name, IdentityKind::Router, Default::default())?;
        self.issue_token(actor, identity.name.as_str(), ttl)
    }

    /// The token lifetime a request asks for, or the default; refused outside 1 s..=max.
    fn token_ttl(&self, ttl: Option<u64>) -> Result<u64, ControllerError> {
        let ttl = ttl.unwrap_or(secs(self.cfg.default_token_ttl));
        if ttl == 0 || ttl > secs(self.cfg.max_token_ttl) {
            return Err(ControllerError::Invalid(format!(
                "token lifetime must be between 1 s and {} s",
                secs(self.cfg.max_token_ttl)
            )));
        }
        Ok(ttl)
    }

    /// Issues a new enrollment token for an existing identity; earlier unused tokens stop working.
    pub fn issue_token(
        &self,
        actor: &Actor,
        name: &str,
        ttl: Option<u64>,
    ) -> Result<TokenResponse, ControllerError> {
        let ttl = self.token_ttl(ttl)?;
        let mut inner = self.write()?;
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
        let mut inner = self.lock();
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
        let mut inner = self.lock();
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

    pub(super) fn revoke_certs(
        inner: &mut Inner,
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
        let mut inner = self.write()?;
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
        Self::revoke_certs(&mut inner, &identity.id, now, &mut batch)?;
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
        let mut inner = self.write()?;
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
        Self::revoke_certs(&mut inner, &identity.id, now, &mut batch)?;
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

    /// Routers with their advertised addresses.
    pub fn list_routers(&self) -> Result<Vec<RouterView>, ControllerError> {
        let mut inner = self.lock();
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
}
