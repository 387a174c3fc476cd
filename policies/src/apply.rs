//! Applying a plan to a state, purely: the controller gets the new state back, checks nothing
//! else, and stores it (or refuses the whole plan).

use std::collections::HashMap;

use crate::error::{DocError, DocErrorKind, Entity, Problems};
use crate::model::{Identity, IdentityId, IdentityKind, State};
use crate::name::Name;
use crate::plan::{protected, Change, Plan};
use crate::rules::At;

/// The state after every change of `plan`, or every reason the plan cannot be applied: a
/// change that no longer fits `state` (the plan is stale), one that touches a router or revoked
/// identity, or a result that breaks the state rules ([`State::validate`]).
///
/// `new_ids` is called once per created identity; ids come from the caller so that this stays
/// deterministic and testable.
pub fn apply_plan(
    state: &State,
    plan: &Plan,
    mut new_ids: impl FnMut() -> IdentityId,
) -> Result<State, Vec<DocError>> {
    let mut next = Applier {
        ids: (state.identities.values())
            .map(|i| (i.name.clone(), i.id.clone()))
            .collect(),
        state: state.clone(),
    };
    let mut problems = Problems::default();
    for (k, change) in plan.changes.iter().enumerate() {
        if let Err(kind) = next.apply(change, &mut new_ids) {
            problems.push(format!("changes[{k}]"), kind);
        }
    }
    problems.finish(|| ())?;
    next.state.validate()?;
    Ok(next.state)
}

/// A state being changed, with an index of identity names to find namesakes quickly.
struct Applier {
    state: State,
    ids: HashMap<Name, IdentityId>,
}

impl Applier {
    fn apply(
        &mut self,
        change: &Change,
        new_id: &mut impl FnMut() -> IdentityId,
    ) -> Result<(), DocErrorKind> {
        match change {
            Change::CreateIdentity {
                name,
                kind,
                roles,
                disabled,
                revoked,
            } => {
                if *kind == IdentityKind::Router {
                    return Err(DocErrorKind::RouterInDocument);
                }
                self.name_free(name, None)?;
                let id = new_id();
                if self.state.identities.contains_key(&id) {
                    return Err(DocErrorKind::IdTaken(id));
                }
                self.ids.insert(name.clone(), id.clone());
                let identity = Identity {
                    id: id.clone(),
                    name: name.clone(),
                    kind: *kind,
                    roles: roles.clone(),
                    disabled: *disabled,
                    revoked: *revoked,
                    expires_at: None,
                };
                self.state.identities.insert(id, identity);
            }
            Change::UpdateIdentity {
                id,
                name,
                roles,
                disabled,
            } => {
                let old_name = self.reachable(id)?.name.clone();
                self.name_free(name, Some(id))?;
                self.ids.remove(&old_name);
                self.ids.insert(name.clone(), id.clone());
                let identity = self.reachable_mut(id)?;
                identity.name = name.clone();
                identity.roles = roles.clone();
                identity.disabled = *disabled;
            }
            Change::DeleteIdentity { id, .. } => {
                let name = self.reachable(id)?.name.clone();
                self.ids.remove(&name);
                self.state.identities.remove(id);
            }
            Change::PutService(service) => {
                self.state
                    .services
                    .insert(service.name.clone(), service.clone());
            }
            Change::DeleteService { name } => {
                (self.state.services.remove(name))
                    .ok_or_else(|| DocErrorKind::UnknownService(name.clone()))?;
            }
            Change::PutPolicy(policy) => {
                self.state
                    .policies
                    .insert(policy.name.clone(), policy.clone());
            }
            Change::DeletePolicy { name } => {
                (self.state.policies.remove(name))
                    .ok_or_else(|| DocErrorKind::UnknownPolicy(name.clone()))?;
            }
        }
        Ok(())
    }

    /// An existing identity that plans may change.
    fn reachable(&self, id: &IdentityId) -> Result<&Identity, DocErrorKind> {
        let identity = (self.state.identities.get(id))
            .ok_or_else(|| DocErrorKind::UnknownIdentityId(id.clone()))?;
        protected(identity).map_or(Ok(identity), Err)
    }

    fn reachable_mut(&mut self, id: &IdentityId) -> Result<&mut Identity, DocErrorKind> {
        self.reachable(id)?;
        (self.state.identities.get_mut(id))
            .ok_or_else(|| DocErrorKind::UnknownIdentityId(id.clone()))
    }

    /// Fails if another identity than `me` has this name.
    fn name_free(&self, name: &Name, me: Option<&IdentityId>) -> Result<(), DocErrorKind> {
        match self.ids.get(name) {
            Some(other) if Some(other) != me => Err(DocErrorKind::Duplicate {
                entity: Entity::Identity,
                name: name.clone(),
                first: At::Key(other.as_str()).path("identities"),
            }),
            _ => Ok(()),
        }
    }
}
