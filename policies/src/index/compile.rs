//! Compiling a state into the index's relations: which policies select each identity and each
//! service, found through inverted indexes instead of testing every policy against every entity.

use std::collections::{BTreeSet, HashMap};

use super::keyed::KeyedRows;
use super::rows::{slot, Rows};
use crate::model::{Action, IdentityId, Semantic, Service, ServicePolicy, State};
use crate::name::Name;
use crate::selector::Selector;

/// The part of the index that depends on names, roles, services and policies only. Whether an
/// identity is active is kept apart, so that disabling or revoking one needs no recompilation.
#[derive(Debug)]
pub(crate) struct Compiled {
    /// Per identity id: `[slot, number of Dial policies, Dial policies.., Bind policies..]`,
    /// policies sorted. Slots follow id order.
    identities: KeyedRows,
    /// Identity ids by slot.
    pub(crate) identity_ids: Vec<IdentityId>,
    /// Per service name: `[slot, policies of both actions..]`, sorted. Slots follow name order.
    services_by_name: KeyedRows,
    /// Services by slot (a copy, so lookups can hand out references in O(1)).
    pub(crate) services: Vec<Service>,
    /// Policy names by slot; slots follow name order, so the smallest slot is the first name.
    pub(crate) policy_names: Vec<Name>,
    /// Policy actions by slot.
    pub(crate) policy_actions: Vec<Action>,
    /// Per policy slot: the services it selects.
    pub(crate) policy_services: Rows,
    /// Per policy slot: the identities a Bind policy selects (empty for Dial policies), for
    /// routers looking for SDK hosts.
    pub(crate) policy_binders: Rows,
}

/// What the index knows about one identity.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdentityEntry<'a> {
    /// Its slot.
    pub(crate) slot: u32,
    /// The Dial policies that select it, sorted.
    pub(crate) dial: &'a [u32],
    /// The Bind policies that select it, sorted.
    pub(crate) bind: &'a [u32],
}

impl<'a> IdentityEntry<'a> {
    /// The policies of `action` that select the identity.
    pub(crate) fn policies(&self, action: Action) -> &'a [u32] {
        match action {
            Action::Dial => self.dial,
            Action::Bind => self.bind,
        }
    }
}

impl Compiled {
    /// Compiles `state`. Costs O(entities · matching policies), not O(entities · policies).
    pub(crate) fn new(state: &State) -> Compiled {
        let policies: Vec<&ServicePolicy> = state.policies.values().collect();
        let by_identity = Inverted::new(&policies, |p| &p.identities);
        let by_service = Inverted::new(&policies, |p| &p.services);
        let policy_actions: Vec<Action> = policies.iter().map(|p| p.action).collect();

        let mut identities = Vec::with_capacity(state.identities.len());
        let mut identity_bind = Rows::default();
        let mut found = Vec::new();
        for (i, (id, identity)) in state.identities.iter().enumerate() {
            by_identity.matching(&identity.name, &identity.roles, &mut found);
            let (dial, bind): (Vec<u32>, Vec<u32>) = (found.iter())
                .partition(|&&p| policy_actions[p as usize] == Action::Dial);
            let mut entry = vec![slot(i), slot(dial.len())];
            entry.extend(dial);
            entry.extend(&bind);
            identities.push((id.as_str(), entry));
            identity_bind.push(bind);
        }

        let mut services = Vec::with_capacity(state.services.len());
        let mut service_policies = Rows::default();
        for (i, (name, service)) in state.services.iter().enumerate() {
            by_service.matching(&service.name, &service.roles, &mut found);
            let entry = std::iter::once(slot(i)).chain(found.iter().copied());
            services.push((name.as_str(), entry.collect()));
            service_policies.push(found.iter().copied());
        }

        Compiled {
            identities: KeyedRows::new(identities.into_iter()),
            identity_ids: state.identities.keys().cloned().collect(),
            services_by_name: KeyedRows::new(services.into_iter()),
            services: state.services.values().cloned().collect(),
            policy_names: policies.iter().map(|p| p.name.clone()).collect(),
            policy_services: service_policies.transpose(policies.len()),
            policy_binders: identity_bind.transpose(policies.len()),
            policy_actions,
        }
    }

    /// The identity with this id.
    pub(crate) fn identity(&self, id: &str) -> Option<IdentityEntry<'_>> {
        let (&slot, rest) = self.identities.get(id)?.split_first()?;
        let (&dial_len, rest) = rest.split_first()?;
        let (dial, bind) = rest.split_at_checked(dial_len as usize)?;
        Some(IdentityEntry { slot, dial, bind })
    }

    /// The slot of the service with this name and the policies (of both actions) that select
    /// it.
    pub(crate) fn service(&self, name: &str) -> Option<(u32, &[u32])> {
        let (&slot, policies) = self.services_by_name.get(name)?.split_first()?;
        Some((slot, policies))
    }

    /// Approximate heap bytes held by the lookup tables and relations (not counting the
    /// copies of ids, names and services).
    pub(crate) fn table_bytes(&self) -> usize {
        self.identities.heap_bytes()
            + self.services_by_name.heap_bytes()
            + self.policy_services.heap_bytes()
            + self.policy_binders.heap_bytes()
    }
}

/// Policies by what one side of them (identities or services) can match: a candidate list per
/// role and per name, plus the policies that use `#all`.
struct Inverted<'a> {
    policies: &'a [&'a ServicePolicy],
    side: fn(&ServicePolicy) -> &[Selector],
    all: Vec<u32>,
    by_role: HashMap<&'a str, Vec<u32>>,
    by_name: HashMap<&'a str, Vec<u32>>,
}

impl<'a> Inverted<'a> {
    fn new(policies: &'a [&'a ServicePolicy], side: fn(&ServicePolicy) -> &[Selector]) -> Self {
        let mut inv = Inverted {
            policies,
            side,
            all: Vec::new(),
            by_role: HashMap::new(),
            by_name: HashMap::new(),
        };
        for (i, policy) in policies.iter().enumerate() {
            let selectors = side(policy);
            // AnyOf matches through any selector, so each one leads to the policy. AllOf needs
            // all of them, so the most selective one alone is enough to find every match.
            let keys = match policy.semantic {
                Semantic::AnyOf => selectors,
                Semantic::AllOf => most_selective(selectors),
            };
            for selector in keys {
                let list = match selector {
                    Selector::All => &mut inv.all,
                    Selector::Role(r) => inv.by_role.entry(r.as_str()).or_default(),
                    Selector::Named(n) => inv.by_name.entry(n.as_str()).or_default(),
                };
                // A policy listing a selector twice would be pushed twice in a row.
                if list.last() != Some(&slot(i)) {
                    list.push(slot(i));
                }
            }
        }
        inv
    }

    /// Fills `out` with the sorted slots of the policies whose selectors on this side match an
    /// entity with this name and these roles.
    fn matching(&self, name: &Name, roles: &BTreeSet<Name>, out: &mut Vec<u32>) {
        out.clear();
        out.extend_from_slice(&self.all);
        let lists = std::iter::once(self.by_name.get(name.as_str()))
            .chain(roles.iter().map(|r| self.by_role.get(r.as_str())));
        for list in lists.flatten() {
            out.extend_from_slice(list);
        }
        out.sort_unstable();
        out.dedup();
        out.retain(|&p| {
            let policy = self.policies[p as usize];
            policy.semantic.matches((self.side)(policy), name, roles)
        });
    }
}

/// The one selector of an AllOf list that the fewest entities can match: a name, else a role,
/// else `#all`. Empty for an empty list, which matches nothing.
fn most_selective(selectors: &[Selector]) -> &[Selector] {
    let rank = |s: &Selector| match s {
        Selector::Named(_) => 0,
        Selector::Role(_) => 1,
        Selector::All => 2,
    };
    match selectors.iter().enumerate().min_by_key(|(_, s)| rank(s)) {
        Some((i, _)) => &selectors[i..=i],
        None => &[],
    }
}
