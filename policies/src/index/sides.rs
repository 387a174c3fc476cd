//! Compiling one side of a policy into terms and leads, and enumerating what a side selects
//! through the terms' member sets (so that the cost is proportional to the answer, not to the
//! number of identities or services).

use super::records::{Lead, Side, Test};
use super::slots::{union, SlotSet};
use super::terms::{Kind, Term, TermPolicies, Terms};
use crate::model::Semantic;
use crate::selector::Selector;

/// Which side of policies, and so which lists of a term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Of {
    Identities,
    Services,
}

impl Of {
    /// The entities of this side holding the term.
    pub(crate) fn members(self, term: &Term) -> &SlotSet {
        match self {
            Of::Identities => &term.identities,
            Of::Services => &term.services,
        }
    }

    fn edit_leads(self, term: &mut Term, change: impl FnOnce(&mut SlotSet)) {
        match self {
            Of::Identities => change(&mut term.id_leads),
            Of::Services => term.edit_policies(|p| change(&mut p.svc_leads)),
        }
    }

    /// The policies whose side of this kind names the term.
    pub(crate) fn tests(self, term: &Term) -> &SlotSet {
        match self {
            Of::Identities => term.id_tests(),
            Of::Services => term.svc_tests(),
        }
    }

    fn tests_mut(self, term: &mut TermPolicies) -> &mut SlotSet {
        match self {
            Of::Identities => &mut term.id_tests,
            Of::Services => &mut term.svc_tests,
        }
    }
}

/// The test of a selector list, given whether it names `#all` and whether it names any term.
fn test(selectors: &[Selector], semantic: Semantic, has_terms: bool) -> Test {
    match semantic {
        _ if selectors.is_empty() => Test::Never,
        Semantic::AnyOf if selectors.contains(&Selector::All) => Test::Always,
        Semantic::AnyOf => Test::Any,
        Semantic::AllOf if !has_terms => Test::Always,
        Semantic::AllOf => Test::All,
    }
}

/// Compiles one side of the policy in `slot`: interns its terms (listing the policy as testing
/// each) and lists the policy under its leads (`all` is the side's list for `#all`).
pub(crate) fn link(
    terms: &mut Terms,
    all: &mut SlotSet,
    of: Of,
    slot: u32,
    selectors: &[Selector],
    semantic: Semantic,
) -> Side {
    let mut ts: Vec<u32> = (selectors.iter())
        .filter_map(|s| match s {
            Selector::All => None,
            Selector::Role(r) => Some(terms.intern(Kind::Role, r)),
            Selector::Named(n) => Some(terms.intern(Kind::Name, n)),
        })
        .collect();
    ts.sort_unstable();
    ts.dedup();
    for &t in &ts {
        terms.edit(t, |term| {
            term.edit_policies(|p| of.tests_mut(p).insert(slot))
        });
    }
    let test = test(selectors, semantic, !ts.is_empty());
    let leads: Vec<Lead> = match test {
        Test::Never => Vec::new(),
        Test::Always => vec![Lead::All],
        Test::Any => ts.iter().map(|&t| Lead::Term(t)).collect(),
        // The most selective: a name, else the role held by the fewest entities now.
        Test::All => (ts.iter().copied())
            .min_by_key(|&t| {
                let term = terms.get(t);
                (term.kind == Kind::Role, of.members(term).len())
            })
            .map(Lead::Term)
            .into_iter()
            .collect(),
    };
    for &lead in &leads {
        match lead {
            Lead::All => all.insert(slot),
            Lead::Term(t) => terms.edit(t, |term| of.edit_leads(term, |l| l.insert(slot))),
        }
    }
    Side {
        test,
        terms: ts.into(),
        leads: leads.into(),
    }
}

/// Undoes [`link`] for the policy in `slot`.
pub(crate) fn unlink(terms: &mut Terms, all: &mut SlotSet, of: Of, slot: u32, side: &Side) {
    for &lead in side.leads.iter() {
        match lead {
            Lead::All => all.remove(slot),
            Lead::Term(t) => terms.edit(t, |term| of.edit_leads(term, |l| l.remove(slot))),
        }
    }
    for &t in side.terms.iter() {
        terms.edit(t, |term| {
            term.edit_policies(|p| of.tests_mut(p).remove(slot))
        });
    }
}

/// Compiles a side against the terms as they are, without changing them, for questions about
/// a policy that may not be in the index. A term that does not exist is held by nothing.
pub(crate) fn lookup(terms: &Terms, selectors: &[Selector], semantic: Semantic) -> Side {
    let found: Vec<Option<Option<u32>>> = selectors.iter().map(|s| terms.of_selector(s)).collect();
    let missing = found.iter().any(Option::is_none);
    let mut ts: Vec<u32> = found.into_iter().flatten().flatten().collect();
    ts.sort_unstable();
    ts.dedup();
    let mut test = test(selectors, semantic, missing || !ts.is_empty());
    if test == Test::All && missing {
        test = Test::Never;
    }
    Side {
        test,
        terms: ts.into(),
        leads: Box::new([]),
    }
}

/// The entities of side `of` that `side` selects, sorted: all slots are below `bound`,
/// `everything` lists all of them in order (for `#all`), `terms_of` gives an entity's terms
/// (for AllOf).
pub(crate) fn selected<'a>(
    terms: &Terms,
    side: &Side,
    of: Of,
    bound: usize,
    everything: impl FnOnce() -> Vec<u32>,
    terms_of: impl Fn(u32) -> Option<&'a [u32]>,
) -> Vec<u32> {
    match side.test {
        Test::Never => Vec::new(),
        Test::Always => everything(),
        Test::Any => {
            let sets: Vec<&SlotSet> = (side.terms.iter())
                .map(|&t| of.members(terms.get(t)))
                .collect();
            union(&sets, bound)
        }
        Test::All => {
            let smallest =
                (side.terms.iter().copied()).min_by_key(|&t| of.members(terms.get(t)).len());
            match smallest {
                None => Vec::new(),
                // One set's members: sorted already.
                Some(t) => (of.members(terms.get(t)).iter())
                    .filter(|&e| terms_of(e).is_some_and(|ts| side.selects(ts)))
                    .collect(),
            }
        }
    }
}
