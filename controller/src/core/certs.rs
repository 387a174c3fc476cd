//! Certificates: enrollment, renewal, local issuance, and checking a handshake-verified peer.

use umbra_policies::{CertRecord, Roster};

use super::*;

impl Controller {
    /// Spends a one-time token: checks it, signs the CSR and records the certificate, atomically.
    pub fn enroll(&self, token: &str, csr_der: &[u8]) -> Result<EnrollResponse, ControllerError> {
        let now = self.now();
        let claims = self
            .verifier
            .verify(token, now)
            .map_err(|e| ControllerError::Enrollment(e.to_string()))?;
        let mut inner = self.write()?;
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
        let mut batch = Batch::default();
        batch.records.push(Record::TokenUsed {
            jti: claims.jti.clone(),
        });
        let issued = self.sign(&identity, csr_der, None, "identity.enroll", &mut batch)?;
        self.commit(&mut inner, batch)?;
        Ok(EnrollResponse {
            cert_pem: issued.cert_pem,
            ca_pem: self.ca.root_pem().to_owned(),
            identity,
            trust_domain: self.trust_domain().to_string(),
        })
    }

    /// Issues a fresh certificate to an identity that proved its current one. The check, the
    /// signature and the commit happen under one lock: a renewal racing a revoke or delete
    /// either completes before it (and its certificate is revoked with the others) or fails.
    pub fn renew(&self, peer: &PeerCert, csr_der: &[u8]) -> Result<RenewResponse, ControllerError> {
        let mut inner = self.write()?;
        let identity = self.authorize_locked(&mut inner, peer, None)?;
        let mut batch = Batch::default();
        let issued = self.sign(&identity, csr_der, None, "identity.renew", &mut batch)?;
        // Which certificate vouched for the renewal, for whoever reads the audit log later.
        if let Some(entry) = batch.audit.last_mut() {
            entry.detail["old_serial"] = serde_json::Value::String(peer.serial.to_string());
        }
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
        let key = umbra_pki::generate_key_and_csr("local")?;
        let mut inner = self.write()?;
        let identity = inner
            .state()
            .identities
            .get(id)
            .cloned()
            .ok_or_else(|| ControllerError::NotFound("no such identity".into()))?;
        let mut batch = Batch::default();
        let issued = self.sign(
            &identity,
            &key.csr_der,
            Some(actor),
            "identity.issue_local",
            &mut batch,
        )?;
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

    /// Signs a leaf for `identity` from a CSR and adds its record and audit entry to `batch`.
    /// The actor is the identity itself unless given. Called with the write lock held.
    fn sign(
        &self,
        identity: &Identity,
        csr_der: &[u8],
        actor: Option<&Actor>,
        action: &'static str,
        batch: &mut Batch,
    ) -> Result<umbra_pki::IssuedCert, ControllerError> {
        let spiffe = SpiffeId::new(self.trust_domain(), identity.kind, &identity.name);
        let issued = self.ca.issue(
            csr_der,
            &spiffe,
            self.cfg.cert_validity,
            self.cfg.clock.now(),
        )?;
        batch.records.push(Record::Cert {
            serial: issued.serial.to_string(),
            identity: identity.id.clone(),
            not_after: issued.not_after,
        });
        let own = Actor {
            id: Some(identity.id.clone()),
            label: spiffe.to_string(),
        };
        batch.audit.push(Self::audit(
            actor.unwrap_or(&own),
            action,
            identity.name.as_str(),
            serde_json::json!({ "serial": issued.serial.to_string(), "not_after": issued.not_after }),
        ));
        Ok(issued)
    }

    /// Checks that a handshake-verified certificate still speaks for an active identity of the
    /// expected kind (`None`: any kind). The decision is the core's `umbra_policies::admit`,
    /// the same the routers make; the controller's roster knows every certificate it issued,
    /// so it also refuses one it never issued or one issued to an earlier namesake.
    pub fn authorize_peer(
        &self,
        peer: &PeerCert,
        kind: Option<IdentityKind>,
    ) -> Result<Identity, ControllerError> {
        self.authorize_locked(&mut self.lock(), peer, kind)
    }

    /// [`Controller::authorize_peer`] under a lock the caller already holds, so that what it
    /// checked is still true when the caller commits.
    pub(super) fn authorize_locked(
        &self,
        inner: &mut Inner,
        peer: &PeerCert,
        kind: Option<IdentityKind>,
    ) -> Result<Identity, ControllerError> {
        // Not the judge's: which trust domain a certificate may name is the PKI's question,
        // and the handshake's verifier (`umbra_pki`, the same for routers) already refuses a
        // foreign one. Kept as it was, as a guard in depth that decides nothing new.
        if peer.spiffe.trust_domain() != self.trust_domain() {
            return Err(forbidden());
        }
        let record = inner.store.cert_owner(peer.serial.as_str())?;
        let roster = IssuedRoster {
            inner,
            serial: peer.serial.as_str(),
            record: record.as_ref(),
        };
        match umbra_policies::admit(&roster, &peer.presented(), kind, self.now()) {
            Ok(identity) => Ok(identity.clone()),
            Err(why) => {
                tracing::info!(peer = %peer.spiffe, serial = %peer.serial, reason = %why, "certificate refused");
                Err(forbidden())
            }
        }
    }

    /// The newest audit entries.
    pub fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>, ControllerError> {
        self.lock().store.audit(limit)
    }
}

/// Every refusal reads the same from outside, whatever the reason.
fn forbidden() -> ControllerError {
    ControllerError::Forbidden("this certificate is not allowed here".into())
}

/// The controller's roster for one certificate: the replica's identities, and the store's
/// record of that certificate (looked up before, since the store can fail and the judge
/// cannot).
struct IssuedRoster<'a> {
    inner: &'a Inner,
    serial: &'a str,
    /// The identity the certificate was issued to, and whether it is revoked.
    record: Option<&'a (IdentityId, bool)>,
}

impl Roster for IssuedRoster<'_> {
    fn identity_named(&self, name: &str) -> Option<&Identity> {
        self.inner.identity_named(name)
    }

    fn certificate(&self, serial: &str) -> CertRecord<'_> {
        match self.record {
            _ if serial != self.serial => CertRecord::NeverIssued,
            None => CertRecord::NeverIssued,
            Some((owner, true)) => CertRecord::Revoked { owner },
            Some((owner, false)) => CertRecord::Issued { owner },
        }
    }
}
