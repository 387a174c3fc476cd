//! One change to the model, as a commit records it and a router receives it: the unit the
//! index is maintained by ([`crate::Index::apply`]) and write batches are checked by
//! ([`crate::Index::validate_changes`]).

use crate::model::{Identity, IdentityId, Service, ServicePolicy, State};
use crate::name::Name;

/// One put or delete of an identity, service or policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateChange {
    /// An identity was created or replaced (disabling and revoking are puts too).
    IdentityPut(Identity),
    /// The identity with this id was deleted.
    IdentityDeleted(IdentityId),
    /// A service was created or replaced.
    ServicePut(Service),
    /// The service with this name was deleted.
    ServiceDeleted(Name),
    /// A policy was created or replaced.
    PolicyPut(ServicePolicy),
    /// The policy with this name was deleted.
    PolicyDeleted(Name),
}

impl State {
    /// Applies one change: a put stores the entry under its own id or name, a delete of
    /// something absent does nothing.
    pub fn apply(&mut self, change: &StateChange) {
        match change {
            StateChange::IdentityPut(i) => {
                self.identities.insert(i.id.clone(), i.clone());
            }
            StateChange::IdentityDeleted(id) => {
                self.identities.remove(id);
            }
            StateChange::ServicePut(s) => {
                self.services.insert(s.name.clone(), s.clone());
            }
            StateChange::ServiceDeleted(name) => {
                self.services.remove(name);
            }
            StateChange::PolicyPut(p) => {
                self.policies.insert(p.name.clone(), p.clone());
            }
            StateChange::PolicyDeleted(name) => {
                self.policies.remove(name);
            }
        }
    }
}
