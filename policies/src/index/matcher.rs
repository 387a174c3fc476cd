//! Finding which policies select each identity (or service) at build time, without testing
//! every policy against every entity.
//!
//! One side of every policy (its identity selectors, or its service selectors) is compiled to
//! small integers: inverted lists of the policies each role, each name and `#all` can lead to,
//! and a test per policy. An entity's candidates are the union of the lists its name and roles
//! lead to, and only those are tested, so building costs O(entities · candidates) rather than
//! O(entities · policies).

use std::collections::{BTreeSet, HashMap};

use super::rows::{slot, union, Rows};
use crate::model::{Semantic, ServicePolicy};
use crate::name::Name;
use crate::selector::Selector;

/// The encoded name of an entity that no `@name` selector mentions.
const NO_NAME: u32 = u32::MAX;

/// Conditions are role ids, or name ids with this bit set.
const NAMED: u32 = 1 << 31;

/// One side of all policies.
pub(crate) struct Matcher<'a> {
    /// Ids of the roles that the selectors mention; no other role can match.
    roles: HashMap<&'a str, u32>,
    /// Ids of the names that the selectors mention.
    names: HashMap<&'a str, u32>,
    /// Policies that `#all` leads to.
    all: Vec<u32>,
    /// Per role id, the policies it leads to.
    by_role: Rows,
    /// Per name id, the policies it leads to.
    by_name: Rows,
    /// Per policy, how its selectors decide.
    tests: Vec<Test>,
    /// Per policy, the conditions its selectors set (`#all` sets none), sorted.
    conditions: Rows,
    /// How many policies there are.
    policies: usize,
}

/// How one side of a policy decides, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Test {
    /// An empty selector list: nothing.
    Never,
    /// `#all` under AnyOf, or only `#all` under AllOf: everything.
    Always,
    /// AnyOf: whatever meets any condition.
    Any,
    /// AllOf: whatever meets every condition.
    All,
}

impl<'a> Matcher<'a> {
    /// Compiles the side of `policies` that `side` picks.
    pub(crate) fn new(
        policies: &[&'a ServicePolicy],
        side: fn(&ServicePolicy) -> &[Selector],
    ) -> Self {
        let mut m = Matcher {
            roles: HashMap::new(),
            names: HashMap::new(),
            all: Vec::new(),
            by_role: Rows::default(),
            by_name: Rows::default(),
            tests: Vec::with_capacity(policies.len()),
            conditions: Rows::default(),
            policies: policies.len(),
        };
        for selector in policies.iter().flat_map(|p| side(p)) {
            let (ids, name) = match selector {
                Selector::All => continue,
                Selector::Role(r) => (&mut m.roles, r),
                Selector::Named(n) => (&mut m.names, n),
            };
            let next = slot(ids.len());
            ids.entry(name.as_str()).or_insert(next);
        }

        let mut by_role = vec![Vec::new(); m.roles.len()];
        let mut by_name = vec![Vec::new(); m.names.len()];
        for (p, policy) in policies.iter().enumerate() {
            let selectors = side(policy);
            // AnyOf matches through any selector, so each one leads to the policy. AllOf needs
            // all of them, so the most selective one alone is enough to find every match.
            let leads = match policy.semantic {
                Semantic::AnyOf => selectors,
                Semantic::AllOf => most_selective(selectors),
            };
            for selector in leads {
                let list = match m.condition(selector) {
                    None => &mut m.all,
                    Some(c) if c & NAMED != 0 => &mut by_name[(c & !NAMED) as usize],
                    Some(c) => &mut by_role[c as usize],
                };
                // A policy listing a selector twice would be pushed twice in a row.
                if list.last() != Some(&slot(p)) {
                    list.push(slot(p));
                }
            }
            let mut conditions: Vec<u32> =
                selectors.iter().filter_map(|s| m.condition(s)).collect();
            conditions.sort_unstable();
            conditions.dedup();
            m.tests.push(match policy.semantic {
                _ if selectors.is_empty() => Test::Never,
                Semantic::AnyOf if selectors.contains(&Selector::All) => Test::Always,
                Semantic::AnyOf => Test::Any,
                Semantic::AllOf if conditions.is_empty() => Test::Always,
                Semantic::AllOf => Test::All,
            });
            m.conditions.push(conditions);
        }
        by_role.into_iter().for_each(|l| m.by_role.push(l));
        by_name.into_iter().for_each(|l| m.by_name.push(l));
        m
    }

    /// The sorted policies whose selectors on this side select an entity with this name and
    /// these roles.
    pub(crate) fn matching(&self, name: &Name, roles: &BTreeSet<Name>) -> Vec<u32> {
        let name = self.names.get(name.as_str()).copied().unwrap_or(NO_NAME);
        let mut roles: Vec<u32> = (roles.iter())
            .filter_map(|r| self.roles.get(r.as_str()).copied())
            .collect();
        roles.sort_unstable();
        let by_name = (name != NO_NAME).then(|| self.by_name.row(name));
        let leads = std::iter::once(self.all.as_slice())
            .chain(by_name)
            .chain(roles.iter().map(|&r| self.by_role.row(r)));
        let mut found = union(leads, self.policies);
        found.retain(|&p| {
            let meets = |&c: &u32| {
                if c & NAMED != 0 {
                    name == c & !NAMED
                } else {
                    roles.binary_search(&c).is_ok()
                }
            };
            let mut conditions = self.conditions.row(p).iter();
            match self.tests[p as usize] {
                Test::Never => false,
                Test::Always => true,
                Test::Any => conditions.any(meets),
                Test::All => conditions.all(meets),
            }
        });
        found
    }

    fn condition(&self, selector: &Selector) -> Option<u32> {
        match selector {
            Selector::All => None,
            Selector::Role(r) => self.roles.get(r.as_str()).copied(),
            Selector::Named(n) => self.names.get(n.as_str()).map(|&n| n | NAMED),
        }
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
