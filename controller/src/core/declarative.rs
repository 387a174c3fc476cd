//! The declarative document: export and apply.

use super::*;

impl Controller {
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
}
