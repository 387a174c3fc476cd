//! The policy index: answers "may this identity dial or bind this service" in about a
//! microsecond, for routers on every stream request and for the controller, and is kept up to
//! date one change at a time ([`Index::apply`]) instead of being rebuilt.
//!
//! Names and roles are interned as terms (see `terms`), and identities, services and policies
//! get stable `u32` slots. Per identity the index keeps only whether it may act and its
//! terms; which policies select it is found when asked, through the terms' lead lists (the
//! policies each role, each name and `#all` can lead to: AnyOf policies through every
//! selector, AllOf through their most selective one), then the policy's test. Per service it
//! keeps the Dial and Bind policies that select it, materialized with a small bitmap, so a
//! lookup walks the identity's few candidates and tests each against the service's bitmap.
//! Per term it also keeps the identities and services holding it, so that a policy change
//! finds the services it selects, and `binders_of` the identities, without scanning.
//!
//! Everything is persistent (`imbl` maps and vectors, `Arc`ed records), so cloning an index is
//! O(1) and a changed copy shares what the change did not touch. Whether an identity is
//! active (not disabled, revoked or expired at `now`) is checked at lookup time, so that time
//! passing needs nothing and a revocation touches one record.
mod activity;
mod apply;
mod explain;
mod order;
mod records;
mod sides;
mod slots;
mod table;
mod terms;
mod trie;
mod validate;

use std::fmt;
use std::sync::Arc;

use crate::decision::{Deny, Explanation, Permit};
use crate::model::{
    Action, HostPort, Hosting, Identity, IdentityId, Service, ServicePolicy, State, Timestamp,
};
use crate::name::Name;
pub(crate) use activity::Activity;
use records::{IdRecord, PolRecord, Side, SvcRecord, Test};
use sides::Of;
use slots::{sorted_unique, union, SlotSet, Slots};
use table::Table;
use terms::Terms;

/// A compiled view of one [`State`], cheap to clone (O(1): versions share structure), cheap to
/// query and cheap to change ([`Index::apply`]).
#[derive(Clone, Default)]
pub struct Index {
    state: State,
    /// Identities by the id they are stored under.
    identities: Table<IdentityId, Arc<IdRecord>>,
    identity_slots: Slots<Arc<IdRecord>>,
    /// Services by the name they are stored under.
    services: Table<Name, Arc<SvcRecord>>,
    service_slots: Slots<Arc<SvcRecord>>,
    /// Policy slots by the name they are stored under.
    policies: Table<Name, u32>,
    policy_slots: Slots<Arc<PolRecord>>,
    terms: Terms,
    /// Policies whose identity side leads through `#all`.
    identity_all: SlotSet,
    /// Policies whose service side leads through `#all`.
    service_all: SlotSet,
    /// The services listing each intercept (for checking writes).
    intercepts: Table<HostPort, SlotSet>,
}

impl Index {
    /// Compiles `state` (sharing it: states are persistent, so this copies nothing).
    pub fn build(state: &State) -> Index {
        let mut index = Index {
            // First, so that new entries find their neighbours in key order (see `order`).
            state: state.clone(),
            ..Index::default()
        };
        for (id, identity) in &state.identities {
            index.put_identity(id, identity);
        }
        // Policies before services: each service then finds its policies in one pass, rather
        // than each policy growing the lists of the services it selects.
        for (name, policy) in &state.policies {
            index.put_policy(name, policy);
        }
        for (name, service) in &state.services {
            index.put_service(name, service);
        }
        index
    }

    /// Compiles a state that the caller already shares.
    pub fn from_arc(state: Arc<State>) -> Index {
        Index::build(&state)
    }

    /// The index for this state with one identity replaced or added: a copy with
    /// [`Index::apply`] of the put. When only what decides whether it may act changed
    /// (disabled, revoked, expiry, kind) this touches that one record.
    pub fn with_identity(&self, identity: Identity) -> Index {
        let mut index = self.clone();
        index.apply(&crate::StateChange::IdentityPut(identity));
        index
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
        let record = self.active(identity, now)?;
        let service = self.services.get(service).ok_or(Deny::NotGranted)?;
        let of_service = service.policies(action);
        let mut first: Option<&PolRecord> = None;
        self.for_each_candidate(record, |p| {
            if !of_service.contains(p) {
                return;
            }
            let Some(policy) = self.policy_slots.get(p) else {
                return;
            };
            if policy.selects_candidate(record) && first.is_none_or(|f| policy.name < f.name) {
                first = Some(policy);
            }
        });
        let policy = first.ok_or(Deny::NotGranted)?;
        Ok(Permit {
            policy: policy.name.clone(),
        })
    }

    /// Calls `f` with every policy the identity's leads reach (some more than once): those
    /// for `#all`, for its name and for its roles. A plain loop, for the lookup's hot path.
    #[inline]
    fn for_each_candidate(&self, identity: &IdRecord, mut f: impl FnMut(u32)) {
        // Fetch the roles' lists first: the fetches are independent, so their cache misses
        // overlap instead of each waiting for the walk of the list before.
        let mut roles: [Option<&SlotSet>; 8] = [None; 8];
        let mut more = Vec::new();
        let role_terms = (identity.terms.iter()).filter(|&&t| t != identity.name_term);
        for (k, &t) in role_terms.enumerate() {
            let leads = self.terms.get(t).id_leads();
            match roles.get_mut(k) {
                Some(place) => *place = Some(leads),
                None => more.push(leads),
            }
        }
        self.identity_all.for_each(&mut f);
        identity.name_leads.for_each(&mut f);
        for leads in roles.into_iter().flatten().chain(more) {
            leads.for_each(&mut f);
        }
    }

    /// The policies of `action` that select both the identity and the service (a policy may
    /// come more than once). Walks the identity's candidates and tests each against the
    /// service's bitmap first, so that only real grants read a policy record.
    fn granting<'a>(
        &'a self,
        identity: &'a IdRecord,
        service: &'a SvcRecord,
        action: Action,
    ) -> impl Iterator<Item = &'a PolRecord> + 'a {
        let of_service = service.policies(action);
        self.candidates(identity)
            .filter(move |&p| of_service.contains(p))
            .filter_map(move |p| self.policy_slots.get(p))
            .filter(move |p| p.selects_candidate(identity))
            .map(|p| &**p)
    }

    /// The policies the identity's leads reach (some more than once): those for `#all`, for
    /// its name and for its roles.
    fn candidates<'a>(&'a self, identity: &'a IdRecord) -> impl Iterator<Item = u32> + 'a {
        let roles = (identity.terms.iter())
            .filter(|&&t| t != identity.name_term)
            .map(|&t| self.terms.get(t).id_leads());
        [&self.identity_all, &identity.name_leads]
            .into_iter()
            .chain(roles)
            .flat_map(SlotSet::iter)
    }

    /// The policies (of either action) that select the identity, sorted by slot.
    fn selecting(&self, identity: &IdRecord) -> Vec<&PolRecord> {
        let mut slots: Vec<u32> = self.candidates(identity).collect();
        slots.sort_unstable();
        slots.dedup();
        (slots.into_iter())
            .filter_map(|p| self.policy_slots.get(p))
            .filter(|p| p.selects_candidate(identity))
            .map(|p| &**p)
            .collect()
    }

    /// The services `identity` may use for `action` at `now`, sorted by name: what a tunneler
    /// intercepts and what `umbra services` lists. Empty if the identity is unknown or inactive.
    pub fn services_for(
        &self,
        identity: &IdentityId,
        action: Action,
        now: Timestamp,
    ) -> Vec<&Service> {
        let Ok(record) = self.active(identity, now) else {
            return Vec::new();
        };
        // The union of what the service sides select: the member sets of AnyOf sides' terms
        // (each term once), AllOf sides enumerated, everything for `#all`.
        let mut terms: Vec<u32> = Vec::new();
        let mut tested: Vec<u32> = Vec::new();
        for p in self
            .selecting(record)
            .into_iter()
            .filter(|p| p.action == action)
        {
            match p.services.test {
                Test::Never => {}
                Test::Always => return self.services_at(self.selected_services(&p.services)),
                Test::Any => terms.extend(p.services.terms.iter()),
                Test::All => tested.extend(self.selected_services(&p.services)),
            }
        }
        terms.sort_unstable();
        terms.dedup();
        let sets: Vec<&SlotSet> = (terms.iter())
            .map(|&t| Of::Services.members(self.terms.get(t)))
            .collect();
        let bound = self.service_slots.bound();
        let mut slots = union(&sets, bound);
        if !tested.is_empty() {
            slots.extend(tested);
            slots = sorted_unique(slots, bound);
        }
        self.services_at(slots)
    }

    /// The services in these slots, sorted by name.
    fn services_at(&self, slots: Vec<u32>) -> Vec<&Service> {
        // Sorting (label, record) pairs reads each record once, not at every comparison.
        let mut records: Vec<(u64, &SvcRecord)> = (slots.into_iter())
            .filter_map(|s| self.service_slots.get(s))
            .map(|s| (s.order, &**s))
            .collect();
        records.sort_unstable_by_key(|&(order, _)| order);
        records.into_iter().map(|(_, s)| &*s.service).collect()
    }

    /// The ids of the identities that may bind `service` at `now`, sorted: routers use this to
    /// pick the SDK hosts a dial can be routed to. Empty for an unknown service.
    pub fn binders_of(&self, service: &str, now: Timestamp) -> Vec<&IdentityId> {
        let Some(record) = self.services.get(service) else {
            return Vec::new();
        };
        let slots: Vec<u32> = (record.bind.list().iter())
            .filter_map(|&p| self.policy_slots.get(p))
            .flat_map(|p| self.selected_identities(&p.identities))
            .collect();
        let slots = sorted_unique(slots, self.identity_slots.bound());
        self.identity_ids(slots, Some(now))
    }

    /// The ids of the identities in these slots (active at `now`, if given), sorted.
    fn identity_ids(&self, slots: Vec<u32>, now: Option<Timestamp>) -> Vec<&IdentityId> {
        let mut records: Vec<(u64, &IdRecord)> = (slots.into_iter())
            .filter_map(|i| self.identity_slots.get(i))
            .filter(|i| now.is_none_or(|now| i.activity.check(now).is_ok()))
            .map(|i| (i.order, &**i))
            .collect();
        records.sort_unstable_by_key(|&(order, _)| order);
        records.into_iter().map(|(_, i)| &i.id).collect()
    }

    /// Who may dial `service` at `now`, and through which policy: every pair of a Dial policy
    /// selecting the service and an identity it selects that is active at `now`, by policy name
    /// and then identity id. A host (an LLM or MCP gateway) enforces each pair's limits, so it
    /// must see the same grants the routers decide with; asking the index keeps that one
    /// evaluator instead of a second scan of every policy against every identity. Empty for an
    /// unknown service and for one not hosted through the SDK (no host serves it).
    pub fn dialers_of(&self, service: &str, now: Timestamp) -> Vec<(&Identity, &ServicePolicy)> {
        if self.state.services.get(service).map(|s| &s.hosting) != Some(&Hosting::Sdk) {
            return Vec::new();
        }
        let Some(record) = self.services.get(service) else {
            return Vec::new();
        };
        let mut policies: Vec<&PolRecord> = (record.dial.list().iter())
            .filter_map(|&p| self.policy_slots.get(p))
            .map(|p| &**p)
            .collect();
        policies.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let mut out = Vec::new();
        for p in policies {
            let Some(policy) = self.state.policies.get(&p.name) else {
                continue;
            };
            let slots = self.selected_identities(&p.identities);
            for id in self.identity_ids(slots, Some(now)) {
                if let Some(identity) = self.state.identities.get(id) {
                    out.push((identity, policy));
                }
            }
        }
        out
    }

    /// Every policy that grants `identity` `action` on `service` at `now`, by name (empty when
    /// none does or the identity is not active): a router charges a stream to one of them when
    /// they carry limits (`throttle::admit_stream`), so it must see them all, not only the first.
    pub fn granting_policies(
        &self,
        identity: &IdentityId,
        service: &str,
        action: Action,
        now: Timestamp,
    ) -> Vec<&ServicePolicy> {
        let (Ok(record), Some(svc)) = (self.active(identity, now), self.services.get(service))
        else {
            return Vec::new();
        };
        let mut names: Vec<&Name> = self
            .granting(record, svc, action)
            .map(|p| &p.name)
            .collect();
        names.sort_unstable();
        names.dedup();
        (names.into_iter())
            .filter_map(|n| self.state.policies.get(n))
            .collect()
    }

    /// The policies (of both actions) whose service side selects `service`, by name: read from
    /// the service's own lists, so a service change costs the controller what selects it, not
    /// a scan of every policy. Empty for an unknown service.
    pub fn policies_selecting(&self, service: &str) -> Vec<&ServicePolicy> {
        let Some(record) = self.services.get(service) else {
            return Vec::new();
        };
        let mut out: Vec<&ServicePolicy> = (record.dial.list().iter())
            .chain(record.bind.list().iter())
            .filter_map(|&p| self.policy_slots.get(p))
            .filter_map(|p| self.state.policies.get(&p.name))
            .collect();
        out.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        out.dedup_by(|a, b| a.name == b.name);
        out
    }

    /// The identities a policy's identity side selects, active or not, sorted by id: found
    /// through the terms' member sets, at a cost proportional to the answer. The policy need
    /// not be in the index (the controller asks about the old and new version of a changed
    /// one, to find whose views it changes).
    pub fn identities_selected_by(&self, policy: &ServicePolicy) -> Vec<&IdentityId> {
        let side = sides::lookup(&self.terms, &policy.identities, policy.semantic);
        self.identity_ids(self.selected_identities(&side), None)
    }

    /// The services a policy's service side selects, sorted by name, likewise.
    pub fn services_selected_by(&self, policy: &ServicePolicy) -> Vec<&Service> {
        let side = sides::lookup(&self.terms, &policy.services, policy.semantic);
        self.services_at(self.selected_services(&side))
    }

    /// The identity slots a side selects, sorted.
    fn selected_identities(&self, side: &Side) -> Vec<u32> {
        let everything = || self.identity_slots.iter().map(|i| i.slot).collect();
        let terms_of = |i| self.identity_slots.get(i).map(|i| &i.terms[..]);
        let bound = self.identity_slots.bound();
        sides::selected(
            &self.terms,
            side,
            Of::Identities,
            bound,
            everything,
            terms_of,
        )
    }

    /// The service slots a side selects, sorted.
    fn selected_services(&self, side: &Side) -> Vec<u32> {
        let everything = || self.service_slots.iter().map(|s| s.slot).collect();
        let terms_of = |s| self.service_slots.get(s).map(|s| &s.terms[..]);
        let bound = self.service_slots.bound();
        sides::selected(&self.terms, side, Of::Services, bound, everything, terms_of)
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
        let record = self.services.get(service);
        let mut granting: Vec<Name> = match (self.identities.get(identity), record) {
            (Some(i), Some(s)) => (self.granting(i, s, action))
                .map(|p| p.name.clone())
                .collect(),
            _ => Vec::new(),
        };
        granting.sort_unstable();
        granting.dedup();
        let facts = explain::Facts {
            identity: self.state.identities.get(identity),
            id: identity,
            service,
            service_exists: record.is_some(),
            action,
            now,
            granting,
            decision: self.check(action, identity, service, now),
        };
        facts.into_explanation()
    }

    /// The identity with this name, found through its name's term, so that a router, which
    /// admits connections by the name in their certificates, keeps no map of its own.
    pub fn identity_named(&self, name: &str) -> Option<&Identity> {
        let term = self.terms.get(self.terms.find(terms::Kind::Name, name)?);
        let slot = term.identities.iter().next()?;
        let record = self.identity_slots.get(slot)?;
        self.state.identities.get(&record.id)
    }

    /// The state this index was compiled from.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// A known identity that is active at `now`.
    fn active(&self, identity: &IdentityId, now: Timestamp) -> Result<&IdRecord, Deny> {
        let record = self.identities.get(identity).ok_or(Deny::UnknownIdentity)?;
        record.activity.check(now)?;
        Ok(record)
    }
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Index")
            .field("identities", &self.identity_slots.len())
            .field("services", &self.service_slots.len())
            .field("policies", &self.policy_slots.len())
            .field("terms", &self.terms.len())
            .finish()
    }
}

#[cfg(test)]
mod tests;
