//! Checking a batch of changes against the rules of `State::validate` in time proportional to
//! the batch: which problems would the batch add to the indexed state?
//!
//! Every rule of `validate` concerns a small group of entries: the identities sharing a name,
//! the services listing an intercept, one policy and the names its `@name`s need. A batch can
//! only change the problems of the groups it touches: the names its identities had or get, the
//! intercepts its services listed or list, the policies it puts, and the policies that name
//! (through the term tables) an identity or service the batch deletes or renames. For each,
//! the problems are computed on the state before and after, with the same code `validate`
//! uses, and the new ones reported. This assumes entries are stored under their own id or
//! name, as every state built by [`crate::State::apply`] is.

use std::collections::{BTreeSet, HashMap};

use super::sides::Of;
use super::terms::Kind;
use super::Index;
use crate::change::StateChange;
use crate::error::{DocError, DocErrorKind, Entity, Problems};
use crate::model::{HostPort, IdentityId, State};
use crate::name::Name;
use crate::rules::{check_policy, intercepts_unique, unique, At, PolicyRefs, Side};

/// What a batch touches.
#[derive(Default)]
struct Touched<'a> {
    identities: BTreeSet<&'a IdentityId>,
    services: BTreeSet<&'a Name>,
    policies: BTreeSet<&'a Name>,
}

impl Index {
    /// The problems that applying `changes` (in order) to this index's state would add: the
    /// problems `validate` finds after that are not found before, in time proportional to
    /// the batch and the entries it touches rather than to the state.
    pub fn validate_changes(&self, changes: &[StateChange]) -> Result<(), Vec<DocError>> {
        let before = &self.state;
        let mut after = before.clone();
        let mut touched = Touched::default();
        for change in changes {
            after.apply(change);
            match change {
                StateChange::IdentityPut(i) => touched.identities.insert(&i.id),
                StateChange::IdentityDeleted(id) => touched.identities.insert(id),
                StateChange::ServicePut(s) => touched.services.insert(&s.name),
                StateChange::ServiceDeleted(name) => touched.services.insert(name),
                StateChange::PolicyPut(p) => touched.policies.insert(&p.name),
                StateChange::PolicyDeleted(name) => touched.policies.insert(name),
            };
        }
        let (was, is) = (
            Grouped::new(before, &touched),
            Grouped::new(&after, &touched),
        );
        let mut added = Vec::new();
        let mut diff = |was: Vec<DocError>, is: Vec<DocError>| {
            added.extend(is.into_iter().filter(|p| !was.contains(p)));
        };

        // Names of identities the batch touches, before and after.
        let identity_names: BTreeSet<&Name> = (touched.identities.iter())
            .flat_map(|id| [before.identities.get(*id), after.identities.get(*id)])
            .flatten()
            .map(|i| &i.name)
            .collect();
        for &name in &identity_names {
            diff(
                self.duplicates(&was, name, &touched),
                self.duplicates(&is, name, &touched),
            );
        }

        // Intercepts of services the batch touches, before and after.
        let intercepts: BTreeSet<&HostPort> = (touched.services.iter())
            .flat_map(|s| [before.services.get(*s), after.services.get(*s)])
            .flatten()
            .flat_map(|s| s.intercepts.iter())
            .collect();
        for &intercept in &intercepts {
            diff(
                self.intercept_problems(&was, intercept),
                self.intercept_problems(&is, intercept),
            );
        }

        // Policies the batch puts, and those naming an identity or service it may remove.
        let mut policies: BTreeSet<Name> = touched.policies.iter().map(|&p| p.clone()).collect();
        let service_names = (touched.services.iter())
            .filter_map(|s| before.services.get(*s))
            .map(|s| &s.name);
        let named = (identity_names.iter().map(|&n| (Of::Identities, n)))
            .chain(service_names.map(|n| (Of::Services, n)));
        for (of, name) in named {
            if let Some(t) = self.terms.find(Kind::Name, name.as_str()) {
                let slots = of.tests(self.terms.get(t)).iter();
                policies.extend(
                    slots
                        .filter_map(|p| self.policy_slots.get(p))
                        .map(|p| p.name.clone()),
                );
            }
        }
        for name in &policies {
            diff(
                self.policy_problems(&was, name, &touched),
                self.policy_problems(&is, name, &touched),
            );
        }
        if added.is_empty() {
            Ok(())
        } else {
            Err(added)
        }
    }

    /// The ids of the identities named `name` in `g.state`, sorted: those the index holds
    /// (which are the ones in `self.state`) unless touched, and the touched ones `g.state` has
    /// with that name.
    fn holders<'a>(
        &'a self,
        g: &Grouped<'a>,
        name: &Name,
        touched: &Touched<'a>,
    ) -> Vec<&'a IdentityId> {
        let mut ids: Vec<&IdentityId> = match self.terms.find(Kind::Name, name.as_str()) {
            Some(t) => (self.terms.get(t).identities.iter())
                .filter_map(|i| self.identity_slots.get(i))
                .map(|i| &i.id)
                .filter(|id| !touched.identities.contains(id))
                .collect(),
            None => Vec::new(),
        };
        ids.extend(g.named.get(name).into_iter().flatten().copied());
        ids.sort_unstable();
        ids
    }

    /// The duplicate-name problems among the identities named `name` in `g.state`.
    fn duplicates(&self, g: &Grouped<'_>, name: &Name, touched: &Touched<'_>) -> Vec<DocError> {
        let entries: Vec<(At<'_>, Option<&Name>)> = (self.holders(g, name, touched).into_iter())
            .map(|id| (At::Key(id.as_str()), Some(name)))
            .collect();
        let mut problems = Problems::default();
        unique(Entity::Identity, "identities", &entries, &mut problems);
        problems.finish(|| ()).err().unwrap_or_default()
    }

    /// The problems of services in `g.state` listing `intercept`.
    fn intercept_problems(&self, g: &Grouped<'_>, intercept: &HostPort) -> Vec<DocError> {
        let state = g.state;
        let listed = self.intercepts.get(intercept);
        let mut names: Vec<&Name> = (listed.into_iter().flat_map(|s| s.iter()))
            .filter_map(|s| self.service_slots.get(s))
            .map(|s| &s.name)
            .chain(g.listing.get(intercept).into_iter().flatten().copied())
            .collect();
        names.sort_unstable();
        names.dedup();
        let services: Vec<_> = (names.into_iter())
            .filter_map(|n| state.services.get(n).map(|s| (n, s)))
            .filter(|(_, s)| s.intercepts.contains(intercept))
            .map(|(n, s)| (At::Key(n.as_str()), &s.name, s.intercepts.as_slice()))
            .collect();
        let mut problems = Problems::default();
        intercepts_unique(&services, &mut problems);
        let problems = problems.finish(|| ()).err().unwrap_or_default();
        (problems.into_iter())
            .filter(|p| {
                matches!(&p.kind, DocErrorKind::InterceptTaken { intercept: i, .. } if i == intercept)
            })
            .collect()
    }

    /// The problems of the policy stored under `name` in `state` (none if it is absent).
    fn policy_problems(
        &self,
        g: &Grouped<'_>,
        name: &Name,
        touched: &Touched<'_>,
    ) -> Vec<DocError> {
        let Some(policy) = g.state.policies.get(name) else {
            return Vec::new();
        };
        let refs = PolicyRefs {
            at: At::Key(name.as_str()),
            name: Some(&policy.name),
            identities: Side::of(&policy.identities),
            services: Side::of(&policy.services),
        };
        let identity = |n: &Name| !self.holders(g, n, touched).is_empty();
        let service = |n: &Name| self.service_named(g.state, n, touched);
        let mut problems = Problems::default();
        check_policy(&refs, &identity, &service, &mut problems);
        problems.finish(|| ()).err().unwrap_or_default()
    }

    /// Whether `state` has a service named `name`: services are stored under their names, so
    /// a touched name is looked up in `state`, an untouched one in the index.
    fn service_named(&self, state: &State, name: &Name, touched: &Touched<'_>) -> bool {
        if touched.services.contains(name) {
            return state.services.contains_key(name);
        }
        self.terms.find(Kind::Name, name.as_str()).is_some_and(|t| {
            (self.terms.get(t).services.iter())
                .filter_map(|s| self.service_slots.get(s))
                .any(|s| &s.name == name)
        })
    }
}

/// The touched entries of one state (before or after the batch) grouped by what the rules
/// compare, built once per batch, so that each group's check finds its touched members
/// directly instead of scanning every touched entry (which made a batch of n changes cost n²).
struct Grouped<'a> {
    state: &'a State,
    /// Touched identities by the name they have in `state`.
    named: HashMap<&'a Name, Vec<&'a IdentityId>>,
    /// Touched services by each intercept they list in `state`.
    listing: HashMap<&'a HostPort, Vec<&'a Name>>,
}

impl<'a> Grouped<'a> {
    fn new(state: &'a State, touched: &Touched<'a>) -> Grouped<'a> {
        let mut named: HashMap<&Name, Vec<&IdentityId>> = HashMap::new();
        for &id in &touched.identities {
            if let Some(i) = state.identities.get(id) {
                named.entry(&i.name).or_default().push(id);
            }
        }
        let mut listing: HashMap<&HostPort, Vec<&Name>> = HashMap::new();
        for &name in &touched.services {
            if let Some(s) = state.services.get(name) {
                for intercept in &s.intercepts {
                    listing.entry(intercept).or_default().push(name);
                }
            }
        }
        Grouped {
            state,
            named,
            listing,
        }
    }
}
