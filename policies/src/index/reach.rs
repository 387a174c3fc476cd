//! The identity side of every policy, compiled to small integers: which policies an identity
//! can reach through each of its roles, through its name and through `#all`, and what an AllOf
//! policy further requires of it.
//!
//! The index keeps this instead of a list of matching policies per identity because it is
//! tiny (kilobytes for thousands of policies, against tens of megabytes of per-identity lists
//! at 100,000 identities) and so stays in the CPU caches: a lookup then costs a handful of
//! cache hits instead of a trip to main memory for the identity's list.

use std::collections::HashMap;

use super::rows::{slot, Rows};
use crate::model::{Action, Identity, Semantic, ServicePolicy};
use crate::selector::Selector;

/// The encoded name of an identity that no `@name` selector mentions.
pub(crate) const NO_NAME: u32 = u32::MAX;

/// Conditions are role ids, or name ids with this bit set.
const NAMED: u32 = 1 << 31;

/// Ids for the roles and names that identity selectors mention; nothing else can match.
pub(crate) struct Vocabulary<'a> {
    roles: HashMap<&'a str, u32>,
    names: HashMap<&'a str, u32>,
}

impl<'a> Vocabulary<'a> {
    pub(crate) fn new(policies: &[&'a ServicePolicy]) -> Self {
        let mut vocabulary = Vocabulary {
            roles: HashMap::new(),
            names: HashMap::new(),
        };
        for selector in policies.iter().flat_map(|p| &p.identities) {
            let (map, name) = match selector {
                Selector::All => continue,
                Selector::Role(r) => (&mut vocabulary.roles, r),
                Selector::Named(n) => (&mut vocabulary.names, n),
            };
            let next = slot(map.len());
            map.entry(name.as_str()).or_insert(next);
        }
        vocabulary
    }

    /// An identity as the index stores it: its name id (or [`NO_NAME`]) and the sorted ids of
    /// its roles that some policy mentions.
    pub(crate) fn encode(&self, identity: &Identity) -> (u32, Vec<u32>) {
        let name = self.names.get(identity.name.as_str()).copied();
        let mut roles: Vec<u32> = (identity.roles.iter())
            .filter_map(|r| self.roles.get(r.as_str()).copied())
            .collect();
        roles.sort_unstable();
        (name.unwrap_or(NO_NAME), roles)
    }

    fn condition(&self, selector: &Selector) -> Option<u32> {
        match selector {
            Selector::All => None,
            Selector::Role(r) => self.roles.get(r.as_str()).copied(),
            Selector::Named(n) => self.names.get(n.as_str()).map(|&n| n | NAMED),
        }
    }
}

/// The identity side of all policies.
#[derive(Debug)]
pub(crate) struct Reach {
    /// Per action (Dial, then Bind): the policies each lead reaches.
    leads: [Leads; 2],
    /// Per policy: for AllOf, every condition its identity selectors set (`#all` sets none);
    /// empty for AnyOf, where reaching the policy through any lead is a match.
    requires: Rows,
}

/// Sorted policy lists by what leads an identity to them.
#[derive(Debug, Default)]
struct Leads {
    all: Vec<u32>,
    by_role: Rows,
    by_name: Rows,
}

/// One identity as [`Reach`] sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Who<'a> {
    /// The name id, or [`NO_NAME`].
    pub(crate) name: u32,
    /// The sorted role ids.
    pub(crate) roles: &'a [u32],
}

impl Who<'_> {
    fn meets(&self, condition: u32) -> bool {
        if condition & NAMED != 0 {
            self.name == condition & !NAMED
        } else {
            self.roles.contains(&condition)
        }
    }
}

impl Reach {
    pub(crate) fn new(policies: &[&ServicePolicy], vocabulary: &Vocabulary) -> Self {
        let mut all = [Vec::new(), Vec::new()];
        let mut by_role = [
            vec![Vec::new(); vocabulary.roles.len()],
            vec![Vec::new(); vocabulary.roles.len()],
        ];
        let mut by_name = [
            vec![Vec::new(); vocabulary.names.len()],
            vec![Vec::new(); vocabulary.names.len()],
        ];
        let mut requires = Rows::default();
        for (p, policy) in policies.iter().enumerate() {
            let a = action_index(policy.action);
            let selectors = &policy.identities;
            // AnyOf matches through any selector, so each one leads to the policy. AllOf needs
            // all of them, so the most selective one alone is enough to find every match.
            let leads = match policy.semantic {
                Semantic::AnyOf => selectors.as_slice(),
                Semantic::AllOf => most_selective(selectors),
            };
            for selector in leads {
                let list = match vocabulary.condition(selector) {
                    None => &mut all[a],
                    Some(c) if c & NAMED != 0 => &mut by_name[a][(c & !NAMED) as usize],
                    Some(c) => &mut by_role[a][c as usize],
                };
                // A policy listing a selector twice would be pushed twice in a row.
                if list.last() != Some(&slot(p)) {
                    list.push(slot(p));
                }
            }
            let mut conditions: Vec<u32> = match policy.semantic {
                Semantic::AnyOf => Vec::new(),
                Semantic::AllOf => selectors
                    .iter()
                    .filter_map(|s| vocabulary.condition(s))
                    .collect(),
            };
            conditions.sort_unstable();
            conditions.dedup();
            requires.push(conditions);
        }
        let rows = |lists: Vec<Vec<u32>>| {
            let mut rows = Rows::default();
            lists.into_iter().for_each(|l| rows.push(l));
            rows
        };
        let [all_dial, all_bind] = all;
        let [role_dial, role_bind] = by_role;
        let [name_dial, name_bind] = by_name;
        Reach {
            leads: [
                Leads {
                    all: all_dial,
                    by_role: rows(role_dial),
                    by_name: rows(name_dial),
                },
                Leads {
                    all: all_bind,
                    by_role: rows(role_bind),
                    by_name: rows(name_bind),
                },
            ],
            requires,
        }
    }

    /// The sorted policy lists of `action` that the identity reaches. Every policy that selects
    /// it is in one of them; an AllOf policy in them selects it only if [`Reach::selects`].
    pub(crate) fn leads<'a>(
        &'a self,
        action: Action,
        who: Who<'a>,
    ) -> impl Iterator<Item = &'a [u32]> + 'a {
        let leads = &self.leads[action_index(action)];
        let by_name = (who.name != NO_NAME).then(|| leads.by_name.row(who.name));
        std::iter::once(leads.all.as_slice())
            .chain(by_name)
            .chain(who.roles.iter().map(|&r| leads.by_role.row(r)))
    }

    /// Whether a policy that the identity reaches through a lead selects it.
    pub(crate) fn selects(&self, policy: u32, who: Who<'_>) -> bool {
        self.requires.row(policy).iter().all(|&c| who.meets(c))
    }
}

fn action_index(action: Action) -> usize {
    match action {
        Action::Dial => 0,
        Action::Bind => 1,
    }
}

/// The one selector of an AllOf list that the fewest entities can match: a name, else a role,
/// else `#all`. Empty for an empty list, which matches nothing.
pub(crate) fn most_selective(selectors: &[Selector]) -> &[Selector] {
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
