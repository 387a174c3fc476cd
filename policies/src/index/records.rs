//! What the index keeps per identity, service and policy.

use std::sync::Arc;

use super::activity::Activity;
use super::slots::SlotSet;
use crate::model::{Action, IdentityId, Service};
use crate::name::Name;

/// An identity: whether it may act, and the terms (its name and roles) that selectors test.
/// Which policies select it is not stored: a million identities selected by a hundred policies
/// each would take gigabytes, and a policy change would touch every identity it selects.
#[derive(Debug, Clone)]
pub(crate) struct IdRecord {
    /// The id it is stored under.
    pub(crate) id: IdentityId,
    pub(crate) slot: u32,
    /// Follows id order (see `order`).
    pub(crate) order: u64,
    pub(crate) activity: Activity,
    /// Its name's and roles' terms, sorted.
    pub(crate) terms: Arc<[u32]>,
    /// Its name's term.
    pub(crate) name_term: u32,
    /// The policies leading through its name's term (a copy kept here, so that a lookup need
    /// not read a term that, for most identities, no policy names).
    pub(crate) name_leads: SlotSet,
}

/// A service: its terms and, per action, the policies that select it, materialized (services
/// are fewer than identities, and a lookup starts from the service's list).
#[derive(Debug, Clone)]
pub(crate) struct SvcRecord {
    /// The name it is stored under.
    pub(crate) name: Name,
    pub(crate) slot: u32,
    /// Follows name order (see `order`).
    pub(crate) order: u64,
    /// Its name's and roles' terms, sorted.
    pub(crate) terms: Arc<[u32]>,
    pub(crate) dial: Filter,
    pub(crate) bind: Filter,
    /// The service itself, for answers that hand it out.
    pub(crate) service: Arc<Service>,
}

impl SvcRecord {
    /// The policies of `action` that select the service.
    pub(crate) fn policies(&self, action: Action) -> &Filter {
        match action {
            Action::Dial => &self.dial,
            Action::Bind => &self.bind,
        }
    }

    /// The same, to change.
    pub(crate) fn policies_mut(&mut self, action: Action) -> &mut Filter {
        match action {
            Action::Dial => &mut self.dial,
            Action::Bind => &mut self.bind,
        }
    }
}

/// Words in a filter: 512 bits, stored with the service so that reading one reads it.
const FILTER_WORDS: usize = 16;

/// A sorted list of policy slots with a small bitmap of its members (slot `p` sets bit
/// `p % 512`), so that testing a candidate policy against a service is one bit test for most
/// candidates, and only the few that pass search the list.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    bits: [u32; FILTER_WORDS],
    list: Option<Arc<[u32]>>,
}

impl Filter {
    /// The filter of these sorted, duplicate-free slots.
    pub(crate) fn new(list: Vec<u32>) -> Filter {
        let mut bits = [0; FILTER_WORDS];
        for &x in &list {
            bits[(x as usize / 32) % FILTER_WORDS] |= 1 << (x % 32);
        }
        Filter {
            bits,
            list: (!list.is_empty()).then(|| list.into()),
        }
    }

    /// The sorted slots.
    pub(crate) fn list(&self) -> &[u32] {
        self.list.as_deref().unwrap_or(&[])
    }

    /// Whether `p` is in the list.
    pub(crate) fn contains(&self, p: u32) -> bool {
        self.bits[(p as usize / 32) % FILTER_WORDS] & (1 << (p % 32)) != 0
            && self.list().binary_search(&p).is_ok()
    }

    /// This list with `p` added.
    pub(crate) fn with(&self, p: u32) -> Filter {
        let mut list = self.list().to_vec();
        if let Err(at) = list.binary_search(&p) {
            list.insert(at, p);
        }
        Filter::new(list)
    }

    /// This list without `p`.
    pub(crate) fn without(&self, p: u32) -> Filter {
        let mut list = self.list().to_vec();
        if let Ok(at) = list.binary_search(&p) {
            list.remove(at);
        }
        Filter::new(list)
    }
}

/// A policy: its name and action and both sides compiled. The services it selects are not
/// stored: they are found through the terms' member sets when asked.
#[derive(Debug, Clone)]
pub(crate) struct PolRecord {
    pub(crate) name: Name,
    pub(crate) action: Action,
    /// The identity side's test, kept here so that a lookup reads the side only for AllOf.
    pub(crate) identity_test: Test,
    pub(crate) identities: Arc<Side>,
    pub(crate) services: Arc<Side>,
}

/// How one side of a policy decides, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Test {
    /// An empty selector list: nothing.
    Never,
    /// `#all` under AnyOf, or only `#all` under AllOf: everything.
    Always,
    /// AnyOf: whatever holds any of the terms.
    Any,
    /// AllOf: whatever holds every term.
    All,
}

/// Where the index finds the candidates of a side: through the policies listed for `#all`, or
/// for a term. AnyOf leads through every selector, AllOf through its most selective one only
/// (everything it selects holds that term), and the test decides among the candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lead {
    All,
    Term(u32),
}

/// One side (identities or services) of a policy, compiled.
#[derive(Debug, Clone)]
pub(crate) struct Side {
    pub(crate) test: Test,
    /// The terms its selectors name, sorted and without duplicates.
    pub(crate) terms: Box<[u32]>,
    /// Where it is listed.
    pub(crate) leads: Box<[Lead]>,
}

impl PolRecord {
    /// Whether the identity side selects an identity found through one of its leads: always
    /// for AnyOf (a lead is a selector the identity matches), tested for AllOf.
    pub(crate) fn selects_candidate(&self, identity: &IdRecord) -> bool {
        match self.identity_test {
            Test::Any | Test::Always => true,
            Test::Never => false,
            Test::All => self.identities.selects(&identity.terms),
        }
    }
}

impl Side {
    /// Whether an entity holding these sorted terms is selected.
    pub(crate) fn selects(&self, terms: &[u32]) -> bool {
        let holds = |t: &u32| terms.binary_search(t).is_ok();
        match self.test {
            Test::Never => false,
            Test::Always => true,
            Test::Any => self.terms.iter().any(holds),
            Test::All => self.terms.iter().all(holds),
        }
    }
}
