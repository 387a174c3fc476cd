//! The compiled index: answers "may this identity dial or bind this service" in well under a
//! microsecond, for routers on every stream request and for the controller.
//!
//! Building it precomputes, per identity, the sorted Dial and Bind policies that select it and,
//! per service, the sorted policies that select it; a lookup is then two hash lookups and the
//! intersection of two short sorted lists. Whether the identity is active (not disabled,
//! revoked or expired at `now`) is checked at lookup time, against a table kept apart from the
//! compiled relations, so that time passing needs nothing and a revocation needs no
//! recompilation ([`Index::with_identity`]).

mod compile;
mod explain;
mod keyed;
mod rows;

use std::fmt;
use std::sync::Arc;

use crate::decision::{Deny, Explanation, Permit};
use crate::model::{Action, Identity, IdentityId, Service, State, Timestamp};
use compile::{Compiled, IdentityEntry};
use rows::{common, first_common, union};

/// An immutable, compiled view of one [`State`], cheap to share between threads (clone it, or
/// put it in an `Arc`) and cheap to query.
#[derive(Clone)]
pub struct Index {
    state: Arc<State>,
    compiled: Arc<Compiled>,
    activity: Arc<[Activity]>,
}

/// The part of an identity that decides whether it may act at all, by identity slot.
#[derive(Debug, Clone, Copy)]
struct Activity {
    disabled: bool,
    revoked: bool,
    expires_at: Option<Timestamp>,
}

impl Activity {
    fn of(identity: &Identity) -> Self {
        Activity {
            disabled: identity.disabled,
            revoked: identity.revoked,
            expires_at: identity.expires_at,
        }
    }

    /// Revocation is reported first (it is final), then disabling, then expiry.
    fn check(self, now: Timestamp) -> Result<(), Deny> {
        if self.revoked {
            Err(Deny::IdentityRevoked)
        } else if self.disabled {
            Err(Deny::IdentityDisabled)
        } else if self.expires_at.is_some_and(|e| now >= e) {
            Err(Deny::IdentityExpired)
        } else {
            Ok(())
        }
    }
}

impl Index {
    /// Compiles `state` (copying it; see [`Index::from_arc`] to share one instead).
    pub fn build(state: &State) -> Index {
        Index::from_arc(Arc::new(state.clone()))
    }

    /// Compiles a state that the caller already shares, without copying it.
    pub fn from_arc(state: Arc<State>) -> Index {
        let compiled = Arc::new(Compiled::new(&state));
        let activity = state.identities.values().map(Activity::of).collect();
        Index {
            state,
            compiled,
            activity,
        }
    }

    /// The index for this state with one identity replaced or added. When only what decides
    /// activity changed (disabled, revoked, expiry, kind), the compiled relations are shared
    /// instead of rebuilt, so that disabling or revoking is cheap; otherwise it recompiles.
    pub fn with_identity(&self, identity: Identity) -> Index {
        let mut state = (*self.state).clone();
        let slot = (self.compiled.identity(identity.id.as_str())).map(|e| e.slot);
        let unchanged = state
            .identities
            .get(&identity.id)
            .is_some_and(|old| old.name == identity.name && old.roles == identity.roles);
        let activity = Activity::of(&identity);
        state.identities.insert(identity.id.clone(), identity);
        match slot {
            Some(slot) if unchanged => {
                let mut table = self.activity.to_vec();
                table[slot as usize] = activity;
                Index {
                    state: Arc::new(state),
                    compiled: Arc::clone(&self.compiled),
                    activity: table.into(),
                }
            }
            _ => Index::from_arc(Arc::new(state)),
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
        let entry = self.active(identity, now)?;
        let of_service = self.compiled.service(service).map_or(&[][..], |(_, p)| p);
        let first = first_common(entry.policies(action), of_service);
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
        let rows = entry.policies(action).iter().map(|&p| c.policy_services.row(p));
        (union(rows, c.services.len()).into_iter())
            .map(|s| &c.services[s as usize])
            .collect()
    }

    /// The ids of the identities that may bind `service` at `now`, sorted: routers use this to
    /// pick the SDK hosts a dial can be routed to. Empty for an unknown service.
    pub fn binders_of(&self, service: &str, now: Timestamp) -> Vec<&IdentityId> {
        let c = &self.compiled;
        let Some((_, policies)) = c.service(service) else {
            return Vec::new();
        };
        let bind = policies.iter().filter(|&&p| c.policy_actions[p as usize] == Action::Bind);
        let rows = bind.map(|&p| c.policy_binders.row(p));
        (union(rows, c.identity_ids.len()).into_iter())
            .filter(|&i| self.activity[i as usize].check(now).is_ok())
            .map(|i| &c.identity_ids[i as usize])
            .collect()
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
        let entry = self.compiled.identity(identity.as_str());
        let granting = (entry.iter())
            .flat_map(|&entry| self.granting(action, entry, service))
            .map(|p| self.compiled.policy_names[p as usize].clone())
            .collect();
        let facts = explain::Facts {
            identity: self.state.identities.get(identity),
            id: identity,
            service,
            service_exists: self.compiled.service(service).is_some(),
            action,
            now,
            granting,
            decision: self.check(action, identity, service, now),
        };
        facts.into_explanation()
    }

    #[doc(hidden)]
    pub fn exp(&self, which: u8, identity: &IdentityId, service: &str, now: Timestamp) -> u32 {
        match which {
            0 => self.compiled.identity(identity.as_str()).map(|e| e.slot).unwrap_or(0),
            1 => self.active(identity, now).map(|e| e.slot).unwrap_or(0),
            2 => self.compiled.service(service).map(|e| e.0).unwrap_or(0),
            3 => self.active(identity, now).map(|e| e.slot).unwrap_or(0) ^ self.compiled.service(service).map(|e| e.0).unwrap_or(0),
            4 => { let Ok(e) = self.active(identity, now) else { return 0 }; let s = self.compiled.service(service).map_or(&[][..], |(_, p)| p); first_common(e.dial, s).unwrap_or(0) }
            5 => { let Ok(e) = self.active(identity, now) else { return 0 }; let s = self.compiled.service(service).map_or(&[][..], |(_, p)| p); e.dial.iter().sum::<u32>() ^ s.iter().sum::<u32>() }
            _ => self.check(Action::Dial, identity, service, now).map(|p| p.policy.as_str().len() as u32).unwrap_or(0),
        }
    }

    /// The state this index was compiled from.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// A known identity that is active at `now`.
    fn active(&self, identity: &IdentityId, now: Timestamp) -> Result<IdentityEntry<'_>, Deny> {
        let entry = (self.compiled.identity(identity.as_str())).ok_or(Deny::UnknownIdentity)?;
        self.activity[entry.slot as usize].check(now)?;
        Ok(entry)
    }

    /// The policies granting `action` on `service` to the identity, in name order, ignoring
    /// whether the identity is active.
    fn granting<'a>(
        &'a self,
        action: Action,
        identity: IdentityEntry<'a>,
        service: &str,
    ) -> impl Iterator<Item = u32> + 'a {
        let of_service = self.compiled.service(service).map_or(&[][..], |(_, p)| p);
        common(identity.policies(action), of_service)
    }
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Index")
            .field("identities", &self.compiled.identity_ids.len())
            .field("services", &self.compiled.services.len())
            .field("policies", &self.compiled.policy_names.len())
            .field("table_bytes", &self.compiled.table_bytes())
            .finish()
    }
}

#[cfg(test)]
mod tests;
