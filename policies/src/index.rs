//! The compiled index: answers "may this identity dial or bind this service" in well under a
//! microsecond, for routers on every stream request and for the controller.
//!
//! Building it finds, for every identity and every service, the sorted policies that select it
//! (see `matcher`), and stores each identity's lists in one block next to its id and each
//! service's in one block next to its name (see `keyed`). A lookup fetches the two blocks
//! together and finds the first policy of the identity's list that is also in the service's,
//! testing against a bitmap stored with the service (see `filtered`). With 100,000 identities
//! most lookups miss the CPU caches, so what a lookup costs is the number of memory reads that
//! wait on one another; this layout keeps that to one block per side. Whether the identity is
//! active (not disabled, revoked or expired at `now`) is checked at lookup time, so that time
//! passing needs nothing and a revocation needs no recompilation ([`Index::with_identity`]).

mod compile;
mod explain;
mod filtered;
mod identities;
mod keyed;
mod matcher;
mod rows;

use std::fmt;
use std::sync::Arc;

use crate::decision::{Deny, Explanation, Permit};
use crate::model::{
    Action, Hosting, Identity, IdentityId, Service, ServicePolicy, State, Timestamp,
};
use compile::Compiled;
pub(crate) use identities::Activity;
use identities::{Identities, IdentityEntry};
use rows::{common, union};

/// An immutable, compiled view of one [`State`], cheap to share between threads (clone it, or
/// put it in an `Arc`) and cheap to query.
#[derive(Clone)]
pub struct Index {
    state: Arc<State>,
    /// Identities by id, with whether they may act; replaced alone when only that changes.
    identities: Arc<Identities>,
    compiled: Arc<Compiled>,
}

impl Index {
    /// Compiles `state` (copying it; see [`Index::from_arc`] to share one instead).
    pub fn build(state: &State) -> Index {
        Index::from_arc(Arc::new(state.clone()))
    }

    /// Compiles a state that the caller already shares, without copying it.
    pub fn from_arc(state: Arc<State>) -> Index {
        let (compiled, identities) = Compiled::new(&state);
        Index {
            state,
            identities: Arc::new(identities),
            compiled: Arc::new(compiled),
        }
    }

    /// The index for this state with one identity replaced or added. When only what decides
    /// whether it may act changed (disabled, revoked, expiry, kind), the compiled relations
    /// are shared instead of rebuilt, so that disabling or revoking is cheap; otherwise it
    /// recompiles.
    pub fn with_identity(&self, identity: Identity) -> Index {
        let mut state = (*self.state).clone();
        let unchanged = (state.identities.get(&identity.id))
            .is_some_and(|old| old.name == identity.name && old.roles == identity.roles);
        let patched = unchanged
            .then(|| {
                self.identities
                    .with_activity(identity.id.as_str(), Activity::of(&identity))
            })
            .flatten();
        state.identities.insert(identity.id.clone(), identity);
        match patched {
            Some(identities) => Index {
                state: Arc::new(state),
                identities: Arc::new(identities),
                compiled: Arc::clone(&self.compiled),
            },
            None => Index::from_arc(Arc::new(state)),
        }
    }

    /// Whether `identity` may open streams to `service` at `now`.
    pub fn can_dial(
        &self,
        identity: &IdentityId,
        service: &str,
        now: Timestamp,
    ) -> Result<Permit, Deny> {
        self.check(Action::Dial, identity, service, now)
    }

    /// Whether `identity` may host `service` through the SDK at `now`.
    pub fn can_bind(
        &self,
        identity: &IdentityId,
        service: &str,
        now: Timestamp,
    ) -> Result<Permit, Deny> {
        self.check(Action::Bind, identity, service, now)
    }

    /// Whether `identity` may perform `action` on `service` at `now`, and through which policy
    /// (the first granting one by name).
    pub fn check(
        &self,
        action: Action,
        identity: &IdentityId,
        service: &str,
        now: Timestamp,
    ) -> Result<Permit, Deny> {
        // Both lookups are independent; issuing them together lets their cache misses overlap.
        let (entry, of_service) = (
            self.identities.get(identity.as_str()),
            self.compiled.service(service, action),
        );
        let entry = entry.ok_or(Deny::UnknownIdentity)?;
        entry.activity.check(now)?;
        let first = of_service.and_then(|s| s.first_of(entry.policies(action)));
        let policy = first.ok_or(Deny::NotGranted)?;
        Ok(Permit {
            policy: self.compiled.policy_names[policy as usize].clone(),
        })
    }

    /// The services `identity` may use for `action` at `now`, sorted by name: what a tunneler
    /// intercepts and what `umbra services` lists. Empty if the identity is unknown or inactive.
    pub fn services_for(
        &self,
        identity: &IdentityId,
        action: Action,
        now: Timestamp,
    ) -> Vec<&Service> {
        let Ok(entry) = self.active(identity, now) else {
            return Vec::new();
        };
        let c = &self.compiled;
        let rows = entry
            .policies(action)
            .iter()
            .map(|&p| c.policy_services.row(p));
        (union(rows, c.services.len()).into_iter())
            .map(|s| &c.services[s as usize])
            .collect()
    }

    /// The ids of the identities that may bind `service` at `now`, sorted: routers use this to
    /// pick the SDK hosts a dial can be routed to. Empty for an unknown service.
    pub fn binders_of(&self, service: &str, now: Timestamp) -> Vec<&IdentityId> {
        let c = &self.compiled;
        let Some(policies) = c.service(service, Action::Bind) else {
            return Vec::new();
        };
        let rows = policies.list().iter().map(|&p| c.policy_identities.row(p));
        (union(rows, c.identity_ids.len()).into_iter())
            .filter(|&i| self.identities.at(i).activity.check(now).is_ok())
            .map(|i| &c.identity_ids[i as usize])
            .collect()
    }

    /// Who may dial `service` at `now`, and through which policy: every pair of a Dial policy
    /// selecting the service and an identity it selects that is active at `now`, by policy name
    /// and then identity id. A host (an LLM or MCP gateway) enforces each pair's limits, so it
    /// must see the same grants the routers decide with; asking the index keeps that one
    /// evaluator instead of a second scan of every policy against every identity. Empty for an
    /// unknown service and for one not hosted through the SDK (no host serves it, and the
    /// index keeps no table for it).
    pub fn dialers_of(&self, service: &str, now: Timestamp) -> Vec<(&Identity, &ServicePolicy)> {
        let c = &self.compiled;
        if self.state.services.get(service).map(|s| &s.hosting) != Some(&Hosting::Sdk) {
            return Vec::new();
        }
        let Some(policies) = c.service(service, Action::Dial) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for &p in policies.list() {
            let Some(policy) = self.state.policies.get(&c.policy_names[p as usize]) else {
                continue;
            };
            for &i in c.policy_identities.row(p) {
                if self.identities.at(i).activity.check(now).is_err() {
                    continue;
                }
                if let Some(identity) = self.state.identities.get(&c.identity_ids[i as usize]) {
                    out.push((identity, policy));
                }
            }
        }
        out
    }

    /// The decision for `identity`, `service` and `action` at `now` with the facts behind it,
    /// for operators. It reveals whether the service exists, so show it to admins only.
    pub fn explain(
        &self,
        identity: &IdentityId,
        service: &str,
        action: Action,
        now: Timestamp,
    ) -> Explanation {
        let c = &self.compiled;
        let selecting = (self.identities.get(identity.as_str()))
            .map(|entry| entry.policies(action).to_vec())
            .unwrap_or_default();
        let of_service = c
            .service(service, action)
            .map(|s| s.list())
            .unwrap_or_default();
        let granting = common(&selecting, of_service)
            .map(|p| c.policy_names[p as usize].clone())
            .collect();
        let facts = explain::Facts {
            identity: self.state.identities.get(identity),
            id: identity,
            service,
            service_exists: self.compiled.service(service, action).is_some(),
            action,
            now,
            granting,
            decision: self.check(action, identity, service, now),
        };
        facts.into_explanation()
    }

    /// The state this index was compiled from.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// A known identity that is active at `now`.
    fn active(&self, identity: &IdentityId, now: Timestamp) -> Result<IdentityEntry<'_>, Deny> {
        let entry = (self.identities.get(identity.as_str())).ok_or(Deny::UnknownIdentity)?;
        entry.activity.check(now)?;
        Ok(entry)
    }
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Index")
            .field("identities", &self.compiled.identity_ids.len())
            .field("services", &self.compiled.services.len())
            .field("policies", &self.compiled.policy_names.len())
            .field(
                "table_bytes",
                &(self.compiled.table_bytes() + self.identities.heap_bytes()),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests;
