//! Keeping the index up to date, one change at a time, at a cost proportional to what the
//! change touches:
//!
//! - an identity whose name and roles are unchanged (disabled, revoked, expiry): O(log n);
//! - an identity put with new roles or name: O(its roles · log n), no policy is touched,
//!   because which policies select an identity is found at lookup time through its terms;
//! - a policy put or delete: O(its selectors + the services it selects), never the identities
//!   it selects;
//! - a service put or delete: O(its candidate policies).

use std::sync::Arc;

use super::activity::Activity;
use super::records::{Filter, IdRecord, Lead, PolRecord, SvcRecord};
use super::sides::{self, Of};
use super::terms::Kind;
use super::Index;
use crate::change::StateChange;
use crate::model::{Action, Identity, IdentityId, Service, ServicePolicy};
use crate::name::Name;

impl Index {
    /// Applies one change to this index and its state, in place (clone the index first to
    /// keep the previous version: both share everything the change did not touch).
    pub fn apply(&mut self, change: &StateChange) {
        self.state.apply(change);
        match change {
            StateChange::IdentityPut(i) => self.put_identity(&i.id, i),
            StateChange::IdentityDeleted(id) => self.remove_identity(id),
            StateChange::ServicePut(s) => self.put_service(&s.name, s),
            StateChange::ServiceDeleted(name) => self.remove_service(name),
            StateChange::PolicyPut(p) => self.put_policy(&p.name, p),
            StateChange::PolicyDeleted(name) => self.remove_policy(name),
        }
    }

    /// Indexes `identity` under `id` (its key in the state).
    pub(super) fn put_identity(&mut self, id: &IdentityId, identity: &Identity) {
        let activity = Activity::of(identity);
        let old = self.identities.get(id).cloned();
        let slot = match old.clone() {
            Some(old) => {
                // Only whether it may act changed: keep its terms and slot.
                if self
                    .existing_terms(&identity.name, &identity.roles)
                    .as_deref()
                    == Some(&old.terms[..])
                {
                    let record = IdRecord {
                        activity,
                        ..IdRecord::clone(&old)
                    };
                    self.store_identity(Arc::new(record));
                    return;
                }
                for &t in old.terms.iter() {
                    self.terms.edit(t, |term| term.identities.remove(old.slot));
                }
                old.slot
            }
            None => self.identity_slots.next_slot(),
        };
        let terms = self.intern_entity(&identity.name, &identity.roles, |term| {
            term.identities.insert(slot)
        });
        let name_term = self.terms.intern(Kind::Name, &identity.name);
        let order = match old {
            Some(old) => old.order,
            None => self.identity_label(id),
        };
        let record = Arc::new(IdRecord {
            id: id.clone(),
            slot,
            order,
            activity,
            terms,
            name_term,
            name_leads: self.terms.get(name_term).id_leads().clone(),
        });
        if self.identity_slots.get(slot).is_none() {
            let added = self.identity_slots.add(Arc::clone(&record));
            debug_assert_eq!(added, slot);
        }
        self.store_identity(record);
    }

    fn store_identity(&mut self, record: Arc<IdRecord>) {
        self.identity_slots.set(record.slot, Arc::clone(&record));
        self.identities.insert(record.id.clone(), record);
    }

    /// Unindexes the identity stored under `id`.
    pub(super) fn remove_identity(&mut self, id: &IdentityId) {
        let Some(old) = self.identities.remove(id) else {
            return;
        };
        for &t in old.terms.iter() {
            self.terms.edit(t, |term| term.identities.remove(old.slot));
        }
        self.identity_slots.remove(old.slot);
    }

    /// The sorted terms of an entity with this name and these roles, if they all exist.
    fn existing_terms<'a>(
        &self,
        name: &Name,
        roles: impl IntoIterator<Item = &'a Name>,
    ) -> Option<Vec<u32>> {
        let mut ts = vec![self.terms.find(Kind::Name, name.as_str())?];
        for r in roles {
            ts.push(self.terms.find(Kind::Role, r.as_str())?);
        }
        ts.sort_unstable();
        ts.dedup();
        Some(ts)
    }

    /// Interns the terms of an entity and adds it to each (with `join`); returns them sorted.
    fn intern_entity<'a>(
        &mut self,
        name: &Name,
        roles: impl IntoIterator<Item = &'a Name>,
        join: impl Fn(&mut super::terms::Term),
    ) -> Arc<[u32]> {
        let mut ts = vec![self.terms.intern(Kind::Name, name)];
        ts.extend(roles.into_iter().map(|r| self.terms.intern(Kind::Role, r)));
        ts.sort_unstable();
        ts.dedup();
        for &t in &ts {
            self.terms.edit(t, &join);
        }
        ts.into()
    }

    /// Indexes `service` under `key` (its name in the state): finds the policies that select
    /// it through its terms' lead lists, and lists them with the service.
    pub(super) fn put_service(&mut self, key: &Name, service: &Service) {
        if let Some(old) = self.services.get(key).cloned() {
            if self
                .existing_terms(&service.name, &service.roles)
                .as_deref()
                == Some(&old.terms[..])
            {
                // Same name and roles: the same policies select it.
                self.list_intercepts(&old, false);
                let record = Arc::new(SvcRecord {
                    service: Arc::new(service.clone()),
                    ..SvcRecord::clone(&old)
                });
                self.list_intercepts(&record, true);
                self.service_slots.set(record.slot, Arc::clone(&record));
                self.services.insert(key.clone(), record);
                return;
            }
            self.remove_service(key);
        }
        let slot = self.service_slots.next_slot();
        let order = self.service_label(key);
        let terms = self.intern_entity(&service.name, &service.roles, |term| {
            term.services.insert(slot)
        });
        let mut candidates: Vec<u32> = self.service_all.iter().collect();
        for &t in terms.iter() {
            candidates.extend(self.terms.get(t).svc_leads().iter());
        }
        candidates.sort_unstable();
        candidates.dedup();
        let (mut dial, mut bind) = (Vec::new(), Vec::new());
        for p in candidates {
            let Some(policy) = self.policy_slots.get(p) else {
                continue;
            };
            if !policy.services.selects(&terms) {
                continue;
            }
            match policy.action {
                Action::Dial => dial.push(p),
                Action::Bind => bind.push(p),
            }
        }
        let record = Arc::new(SvcRecord {
            name: key.clone(),
            slot,
            order,
            terms,
            dial: Filter::new(dial),
            bind: Filter::new(bind),
            service: Arc::new(service.clone()),
        });
        let added = self.service_slots.add(Arc::clone(&record));
        debug_assert_eq!(added, slot);
        self.list_intercepts(&record, true);
        self.services.insert(key.clone(), record);
    }

    /// Adds the service to (or removes it from) the map of who lists each of its intercepts.
    fn list_intercepts(&mut self, service: &SvcRecord, add: bool) {
        for intercept in service.service.intercepts.iter() {
            let mut listed = self.intercepts.get(intercept).cloned().unwrap_or_default();
            if add {
                listed.insert(service.slot);
            } else {
                listed.remove(service.slot);
            }
            if listed.is_empty() {
                self.intercepts.remove(intercept);
            } else {
                self.intercepts.insert(intercept.clone(), listed);
            }
        }
    }

    /// Unindexes the service stored under `key`.
    pub(super) fn remove_service(&mut self, key: &Name) {
        let Some(old) = self.services.remove(key) else {
            return;
        };
        self.list_intercepts(&old, false);
        for &t in old.terms.iter() {
            self.terms.edit(t, |term| term.services.remove(old.slot));
        }
        self.service_slots.remove(old.slot);
    }

    /// Indexes `policy` under `key` (its name in the state): compiles both sides, lists it
    /// under its leads, and adds it to the services it selects.
    pub(super) fn put_policy(&mut self, key: &Name, policy: &ServicePolicy) {
        self.remove_policy(key);
        let slot = self.policy_slots.next_slot();
        let identities = sides::link(
            &mut self.terms,
            &mut self.identity_all,
            Of::Identities,
            slot,
            &policy.identities,
            policy.semantic,
        );
        let services = sides::link(
            &mut self.terms,
            &mut self.service_all,
            Of::Services,
            slot,
            &policy.services,
            policy.semantic,
        );
        let selected = self.selected_services(&services);
        for &s in &selected {
            self.edit_service(s, |record| {
                let list = record.policies_mut(policy.action);
                *list = list.with(slot);
            });
        }
        self.sync_name_leads(&identities.leads);
        let added = self.policy_slots.add(Arc::new(PolRecord {
            name: policy.name.clone(),
            action: policy.action,
            identity_test: identities.test,
            identities: Arc::new(identities),
            services: Arc::new(services),
        }));
        debug_assert_eq!(added, slot);
        self.policies.insert(key.clone(), slot);
    }

    /// Unindexes the policy stored under `key`.
    pub(super) fn remove_policy(&mut self, key: &Name) {
        let Some(slot) = self.policies.remove(key) else {
            return;
        };
        let Some(old) = self.policy_slots.get(slot).cloned() else {
            return;
        };
        // The services it selects are those whose lists hold it: found through the terms
        // while it is still linked, rather than stored per policy.
        for s in self.selected_services(&old.services) {
            self.edit_service(s, |record| {
                let list = record.policies_mut(old.action);
                *list = list.without(slot);
            });
        }
        let (identity_all, service_all) = (&mut self.identity_all, &mut self.service_all);
        sides::unlink(
            &mut self.terms,
            identity_all,
            Of::Identities,
            slot,
            &old.identities,
        );
        sides::unlink(
            &mut self.terms,
            service_all,
            Of::Services,
            slot,
            &old.services,
        );
        self.sync_name_leads(&old.identities.leads);
        self.policy_slots.remove(slot);
    }

    /// Refreshes the copy of a name term's identity leads kept by the identities holding that
    /// name (one, in a valid state), after a policy leading through it came or went.
    fn sync_name_leads(&mut self, leads: &[Lead]) {
        for &lead in leads {
            let Lead::Term(t) = lead else { continue };
            let Some(term) = self.terms.try_get(t) else {
                continue;
            };
            if term.kind != Kind::Name {
                continue;
            }
            let (holders, name_leads) = (term.identities.clone(), term.id_leads().clone());
            for i in holders.iter() {
                if let Some(record) = self.identity_slots.get(i) {
                    let record = IdRecord {
                        name_leads: name_leads.clone(),
                        ..IdRecord::clone(record)
                    };
                    self.store_identity(Arc::new(record));
                }
            }
        }
    }

    fn edit_service(&mut self, slot: u32, change: impl FnOnce(&mut SvcRecord)) {
        let Some(record) = self.service_slots.get(slot) else {
            return;
        };
        let mut record = SvcRecord::clone(record);
        change(&mut record);
        let record = Arc::new(record);
        self.service_slots.set(slot, Arc::clone(&record));
        self.services.insert(record.name.clone(), record);
    }
}
