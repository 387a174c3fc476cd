//! Compiling a state into the index's relations: the policies that select each identity and
//! each service, the services each policy selects and the identities each policy selects.

use super::filtered::{Filtered, FILTER_WORDS};
use super::identities::Identities;
use super::keyed::KeyedRows;
use super::matcher::Matcher;
use super::rows::{slot, Rows};
use crate::model::{Action, Hosting, IdentityId, Service, ServicePolicy, State};
use crate::name::Name;

/// Everything the index knows except the table of identities, which also holds whether each
/// may act and so is replaced on its own when only that changes.
#[derive(Debug)]
pub(crate) struct Compiled {
    /// Identity ids by slot; slots follow id order.
    pub(crate) identity_ids: Vec<IdentityId>,
    /// Per service name: `[slot, number of Dial policies, Dial filter.., Bind filter..,
    /// Dial policies.., Bind policies..]`, the policies sorted (see [`Filtered`]). Slots follow
    /// name order.
    services_by_name: KeyedRows,
    /// Services by slot (a copy, so lookups can hand out references in O(1)).
    pub(crate) services: Vec<Service>,
    /// Policy names by slot; slots follow name order, so the smallest slot is the first name.
    pub(crate) policy_names: Vec<Name>,
    /// Per policy slot: the services it selects.
    pub(crate) policy_services: Rows,
    /// Per policy slot: the identities it selects (whether active or not), for routers looking
    /// for SDK hosts (Bind policies) and for the grants a host sees (Dial policies that select
    /// a service hosted through the SDK; empty for other Dial policies, which no host serves,
    /// so that a large deployment of address services does not pay for the table).
    pub(crate) policy_identities: Rows,
}

impl Compiled {
    /// Compiles `state`, with the table of its identities. Costs O(entities · candidate
    /// policies), not O(entities · policies) (see [`Matcher`]).
    pub(crate) fn new(state: &State) -> (Compiled, Identities) {
        let policies: Vec<&ServicePolicy> = state.policies.values().collect();
        // Policies of both actions in slot order, split into Dial and Bind (both stay sorted).
        let split = |found: Vec<u32>| -> (Vec<u32>, Vec<u32>) {
            (found.into_iter()).partition(|&p| policies[p as usize].action == Action::Dial)
        };

        // Which policies select a service hosted through the SDK: only a host is told who may
        // dial its service, so only their Dial rows are worth keeping per policy.
        let mut hosted = vec![false; policies.len()];
        let by_service = Matcher::new(&policies, |p| &p.services);
        let mut services = Vec::with_capacity(state.services.len());
        let mut service_policies = Rows::default();
        for (i, (name, service)) in state.services.iter().enumerate() {
            let found = by_service.matching(&service.name, &service.roles);
            if service.hosting == Hosting::Sdk {
                for &p in &found {
                    hosted[p as usize] = true;
                }
            }
            service_policies.push(found.iter().copied());
            let (dial, bind) = split(found);
            let mut entry = vec![slot(i), slot(dial.len())];
            entry.extend(Filtered::bits_of(&dial));
            entry.extend(Filtered::bits_of(&bind));
            entry.extend(dial);
            entry.extend(bind);
            services.push((name.as_str(), entry));
        }

        let by_identity = Matcher::new(&policies, |p| &p.identities);
        let mut identity_policies = Rows::default();
        let mut identities = Vec::with_capacity(state.identities.len());
        for (id, identity) in &state.identities {
            let found = by_identity.matching(&identity.name, &identity.roles);
            identity_policies.push(
                found
                    .iter()
                    .copied()
                    .filter(|&p| policies[p as usize].action == Action::Bind || hosted[p as usize]),
            );
            let (dial, bind) = split(found);
            identities.push((id, identity, dial, bind));
        }
        let identities = Identities::new(identities.into_iter());

        let compiled = Compiled {
            identity_ids: state.identities.keys().cloned().collect(),
            services_by_name: KeyedRows::new(services.into_iter()),
            services: state.services.values().cloned().collect(),
            policy_names: policies.iter().map(|p| p.name.clone()).collect(),
            policy_services: service_policies.transpose(policies.len()),
            policy_identities: identity_policies.transpose(policies.len()),
        };
        (compiled, identities)
    }

    /// The policies of `action` that select the service with this name.
    pub(crate) fn service(&self, name: &str, action: Action) -> Option<Filtered<'_>> {
        let (_, rest) = self.services_by_name.get(name)?.split_first()?;
        let (&dial_len, rest) = rest.split_first()?;
        let (dial_bits, rest) = rest.split_at_checked(FILTER_WORDS)?;
        let (bind_bits, rest) = rest.split_at_checked(FILTER_WORDS)?;
        let (dial, bind) = rest.split_at_checked(dial_len as usize)?;
        Some(match action {
            Action::Dial => Filtered::new(dial_bits, dial),
            Action::Bind => Filtered::new(bind_bits, bind),
        })
    }

    /// Approximate heap bytes held by the lookup tables and relations (not counting the
    /// copies of ids, names and services).
    pub(crate) fn table_bytes(&self) -> usize {
        self.services_by_name.heap_bytes()
            + self.policy_services.heap_bytes()
            + self.policy_identities.heap_bytes()
    }
}
