//! The declarative document: export and apply.

use super::*;

/// How many changes of a plan the answer to `apply` and its audit record spell out; the rest
/// are counted. A first apply of a million identities would otherwise answer with (and log) a
/// plan of tens of megabytes.
pub const SHOWN_CHANGES: usize = 1000;

impl Controller {
    /// The current state as a YAML document.
    pub fn export(&self) -> String {
        umbra_policies::export(self.lock().state()).to_yaml()
    }

    /// Makes the state match a document (or only computes the plan, with `dry_run`).
    ///
    /// The plan is made once and applied once, by the core, with the ids it will keep: the
    /// state it yields is what the batch stores (and what the gate in `commit` checks again
    /// with every other write's rules).
    ///
    /// The document's text is dropped once parsed, before the plan is made, so that a large
    /// one is not held as text and as a document at once for longer than parsing takes. What
    /// the answer and the audit log show of the plan is its first `SHOWN_CHANGES` changes and
    /// a count of the rest.
    pub fn apply(
        &self,
        actor: &Actor,
        document: impl AsRef<[u8]>,
        dry_run: bool,
    ) -> Result<ApplyResponse, ControllerError> {
        let doc = std::str::from_utf8(document.as_ref())
            .map_err(|e| ControllerError::Invalid(format!("the document is not UTF-8: {e}")))
            .and_then(|text| umbra_policies::parse_document(text).map_err(rejected))?;
        drop(document);
        let mut inner = self.write()?;
        let plan = umbra_policies::plan(inner.state(), &doc).map_err(rejected)?;
        drop(doc);
        let next =
            umbra_policies::apply_plan(inner.state(), &plan, new_identity_id).map_err(rejected)?;
        let text = plan.shown(SHOWN_CHANGES).to_string();
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
        // Identities the plan creates, by name, with the ids `apply_plan` gave them.
        let created: HashMap<&Name, &Identity> = (next.identities.values())
            .filter(|i| !inner.state().identities.contains_key(&i.id))
            .map(|i| (&i.name, i))
            .collect();
        let changed = |id: &IdentityId| {
            next.identities.get(id).cloned().ok_or_else(|| {
                ControllerError::Corrupt(format!("the applied plan lost identity {id}"))
            })
        };
        for change in plan.changes {
            use umbra_policies::Change;
            match change {
                Change::CreateIdentity { name, .. } => {
                    let identity = (created.get(&name).map(|i| (*i).clone())).ok_or_else(|| {
                        ControllerError::Corrupt(format!("the applied plan lost identity {name}"))
                    })?;
                    batch.changes.push(ChangeEvent::IdentityPut { identity });
                }
                Change::UpdateIdentity { id, .. } => {
                    let identity = changed(&id)?;
                    batch.changes.push(ChangeEvent::IdentityPut { identity });
                }
                Change::DeleteIdentity { id, name } => {
                    if actor.id.as_ref() == Some(&id) {
                        return Err(ControllerError::Conflict(format!(
                            "the document omits {name}, the admin applying it; an admin cannot delete itself"
                        )));
                    }
                    Self::revoke_certs(&mut inner, &id, now, &mut revocations)?;
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
