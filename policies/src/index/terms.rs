//! Terms: the roles and names that selectors test, interned as small integers, each with the
//! inverted lists that connect entities and policies through it.
//!
//! A term is `#role` or `@name`. It exists while anything refers to it (an entity holding the
//! role or name, a policy testing or leading through it) and is freed when nothing does, so
//! the table is bounded by what the state holds.

use std::sync::Arc;

use super::slots::{SlotSet, Slots};
use super::table::Table;
use crate::name::Name;
use crate::selector::Selector;

/// Whether a term is a role or a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `#role`.
    Role,
    /// `@name`.
    Name,
}

/// One term and what connects through it.
#[derive(Debug, Clone)]
pub(crate) struct Term {
    pub(crate) kind: Kind,
    pub(crate) key: Name,
    /// Identities holding this role, or named so.
    pub(crate) identities: SlotSet,
    /// Services holding this role, or named so.
    pub(crate) services: SlotSet,
    /// Policies whose identity side leads through this term (see `Side`): kept inline, since
    /// every lookup reads it for each role of the identity.
    pub(crate) id_leads: SlotSet,
    /// The other policies connected through it; absent for the many terms no policy names (the
    /// names of most identities), which keeps those small.
    policies: Option<Arc<TermPolicies>>,
}

/// The policies connected through a term.
#[derive(Debug, Clone, Default)]
pub(crate) struct TermPolicies {
    /// Policies whose service side leads through this term.
    pub(crate) svc_leads: SlotSet,
    /// Policies whose identity side names this term.
    pub(crate) id_tests: SlotSet,
    /// Policies whose service side names this term.
    pub(crate) svc_tests: SlotSet,
}

impl TermPolicies {
    fn is_empty(&self) -> bool {
        self.id_tests.is_empty() && self.svc_tests.is_empty() && self.svc_leads.is_empty()
    }
}

/// The empty set, for terms without policies.
static EMPTY: SlotSet = SlotSet::Small(None);

impl Term {
    fn unused(&self) -> bool {
        self.policies.is_none()
            && self.id_leads.is_empty()
            && self.identities.is_empty()
            && self.services.is_empty()
    }

    /// Policies whose identity side leads through this term.
    pub(crate) fn id_leads(&self) -> &SlotSet {
        &self.id_leads
    }

    /// Policies whose service side leads through this term.
    pub(crate) fn svc_leads(&self) -> &SlotSet {
        self.policies.as_ref().map_or(&EMPTY, |p| &p.svc_leads)
    }

    /// Policies whose identity side names this term.
    pub(crate) fn id_tests(&self) -> &SlotSet {
        self.policies.as_ref().map_or(&EMPTY, |p| &p.id_tests)
    }

    /// Policies whose service side names this term.
    pub(crate) fn svc_tests(&self) -> &SlotSet {
        self.policies.as_ref().map_or(&EMPTY, |p| &p.svc_tests)
    }

    /// Changes the policies connected through this term.
    pub(crate) fn edit_policies(&mut self, change: impl FnOnce(&mut TermPolicies)) {
        let mut policies = self.policies.take().unwrap_or_default();
        change(Arc::make_mut(&mut policies));
        if !policies.is_empty() {
            self.policies = Some(policies);
        }
    }
}

/// Name terms have this bit set in their id; role terms are numbered apart, so that the
/// few, hot role terms a lookup reads sit in a small table of their own.
const NAME_BIT: u32 = 1 << 31;

/// The table of terms.
#[derive(Debug, Clone, Default)]
pub(crate) struct Terms {
    /// By key. Tables rather than HAMTs: a HAMT node costs hundreds of bytes per entry, and
    /// there is a name term for each of a million identities.
    roles: Table<Name, u32>,
    names: Table<Name, u32>,
    role_table: Slots<Arc<Term>>,
    name_table: Slots<Arc<Term>>,
}

impl Terms {
    /// The term for `kind` and `key`, if it exists.
    pub(crate) fn find(&self, kind: Kind, key: &str) -> Option<u32> {
        match kind {
            Kind::Role => self.roles.get(key).copied(),
            Kind::Name => self.names.get(key).copied(),
        }
    }

    /// The term a selector tests (`None` for `#all`), if it exists.
    pub(crate) fn of_selector(&self, selector: &Selector) -> Option<Option<u32>> {
        match selector {
            Selector::All => Some(None),
            Selector::Role(r) => self.find(Kind::Role, r.as_str()).map(Some),
            Selector::Named(n) => self.find(Kind::Name, n.as_str()).map(Some),
        }
    }

    /// The term for `kind` and `key`, created if it does not exist. The caller makes it used
    /// with [`Terms::edit`] at once.
    pub(crate) fn intern(&mut self, kind: Kind, key: &Name) -> u32 {
        if let Some(t) = self.find(kind, key.as_str()) {
            return t;
        }
        let term = Arc::new(Term {
            kind,
            key: key.clone(),
            identities: SlotSet::default(),
            services: SlotSet::default(),
            id_leads: SlotSet::default(),
            policies: None,
        });
        let (map, t) = match kind {
            Kind::Role => (&mut self.roles, self.role_table.add(term)),
            Kind::Name => (&mut self.names, self.name_table.add(term) | NAME_BIT),
        };
        debug_assert!(
            t & NAME_BIT == 0 || kind == Kind::Name,
            "fewer than 2^31 roles"
        );
        map.insert(key.clone(), t);
        t
    }

    /// The term in slot `t`. Terms are only referred to while they exist.
    #[inline]
    pub(crate) fn get(&self, t: u32) -> &Term {
        self.try_get(t).expect("a referenced term exists")
    }

    /// The term in slot `t`, if it exists.
    #[inline]
    pub(crate) fn try_get(&self, t: u32) -> Option<&Term> {
        self.table(t).get(t & !NAME_BIT).map(|t| &**t)
    }

    fn table(&self, t: u32) -> &Slots<Arc<Term>> {
        if t & NAME_BIT == 0 {
            &self.role_table
        } else {
            &self.name_table
        }
    }

    /// Changes term `t`, and frees it if nothing refers to it any more.
    pub(crate) fn edit(&mut self, t: u32, change: impl FnOnce(&mut Term)) {
        // In place when nothing else shares the term (while building).
        let Some(term) = self.table_mut(t).get_mut(t & !NAME_BIT) else {
            return;
        };
        let term = Arc::make_mut(term);
        change(term);
        if term.unused() {
            let (kind, key) = (term.kind, term.key.clone());
            match kind {
                Kind::Role => self.roles.remove(key.as_str()),
                Kind::Name => self.names.remove(key.as_str()),
            };
            self.table_mut(t).remove(t & !NAME_BIT);
        }
    }

    fn table_mut(&mut self, t: u32) -> &mut Slots<Arc<Term>> {
        if t & NAME_BIT == 0 {
            &mut self.role_table
        } else {
            &mut self.name_table
        }
    }

    /// The number of terms.
    pub(crate) fn len(&self) -> usize {
        self.role_table.len() + self.name_table.len()
    }
}
