//! The rules that span entries: names unique within a list, every `@name` selector naming
//! something, no empty selector list, no intercept address used by two services.
//!
//! Documents (parsed or built in code) and controller states are checked by this one piece of
//! code, through a [`Catalog`] of what each holds, so that `umbra apply` and every controller
//! write refuse exactly the same things.

use std::collections::{HashMap, HashSet};

use crate::error::{DocErrorKind, Entity, Problems};
use crate::model::{HostPort, State};
use crate::name::Name;
use crate::selector::Selector;

/// Where an entry sits: by position in a document, by key in a state.
#[derive(Debug, Clone, Copy)]
pub(crate) enum At<'a> {
    /// The n-th entry of a document list.
    Pos(usize),
    /// The entry stored under this key in a state map.
    Key(&'a str),
}

impl At<'_> {
    /// The path of the entry in the list called `list`: `services[3]` or `services["llm"]`.
    pub(crate) fn path(self, list: &str) -> String {
        match self {
            At::Pos(i) => format!("{list}[{i}]"),
            At::Key(k) => format!("{list}[{k:?}]"),
        }
    }
}

/// One side (identities or services) of a policy: how many selectors it has, and those that
/// are valid with their positions (an invalid one has been reported already).
#[derive(Debug, Default)]
pub(crate) struct Side<'a> {
    pub(crate) len: usize,
    pub(crate) valid: Vec<(usize, &'a Selector)>,
}

impl<'a> Side<'a> {
    /// A side whose selectors are all valid.
    pub(crate) fn of(selectors: &'a [Selector]) -> Self {
        Side {
            len: selectors.len(),
            valid: selectors.iter().enumerate().collect(),
        }
    }
}

/// What a policy contributes to the cross-entry rules.
#[derive(Debug)]
pub(crate) struct PolicyRefs<'a> {
    pub(crate) at: At<'a>,
    pub(crate) name: Option<&'a Name>,
    pub(crate) identities: Side<'a>,
    pub(crate) services: Side<'a>,
}

/// The names and references of a document or state, as the cross-entry rules see them.
/// Entries whose name was invalid appear without one.
#[derive(Debug, Default)]
pub(crate) struct Catalog<'a> {
    pub(crate) identities: Vec<(At<'a>, Option<&'a Name>)>,
    pub(crate) services: Vec<(At<'a>, Option<&'a Name>)>,
    pub(crate) policies: Vec<PolicyRefs<'a>>,
    /// Each service's intercepts, for the services whose entry is valid.
    pub(crate) intercepts: Vec<(At<'a>, &'a Name, &'a [HostPort])>,
}

impl Catalog<'_> {
    /// Records every broken cross-entry rule.
    pub(crate) fn check(&self, problems: &mut Problems) {
        let identities = unique(Entity::Identity, "identities", &self.identities, problems);
        let services = unique(Entity::Service, "services", &self.services, problems);
        let policies: Vec<_> = self.policies.iter().map(|p| (p.at, p.name)).collect();
        unique(Entity::Policy, "policies", &policies, problems);
        intercepts_unique(&self.intercepts, problems);
        for p in &self.policies {
            let identity = |n: &Name| identities.contains(n);
            let service = |n: &Name| services.contains(n);
            check_policy(p, &identity, &service, problems);
        }
    }
}

/// Records the problems of one policy: an empty selector list, and each `@name` naming no
/// identity (no service) as `identity` (`service`) tells.
pub(crate) fn check_policy(
    p: &PolicyRefs<'_>,
    identity: &dyn Fn(&Name) -> bool,
    service: &dyn Fn(&Name) -> bool,
    problems: &mut Problems,
) {
    let path = p.at.path("policies");
    let sides = [
        ("identities", &p.identities, Entity::Identity, identity),
        ("services", &p.services, Entity::Service, service),
    ];
    for (field, side, entity, known) in sides {
        if side.len == 0 {
            problems.push(format!("{path}.{field}"), DocErrorKind::EmptySelectors);
        }
        for &(j, selector) in &side.valid {
            if let Selector::Named(name) = selector {
                if !known(name) {
                    let name = name.clone();
                    let kind = DocErrorKind::Dangling { entity, name };
                    problems.push(format!("{path}.{field}[{j}]"), kind);
                }
            }
        }
    }
}

/// Reports every intercept listed by a service after another service listed it: a tunneler
/// listens once per address, so two services there would leave one silently unreachable. A
/// service repeating its own intercept is harmless and left alone.
pub(crate) fn intercepts_unique(
    services: &[(At<'_>, &Name, &[HostPort])],
    problems: &mut Problems,
) {
    let mut owner: HashMap<&HostPort, &Name> = HashMap::new();
    for &(at, name, intercepts) in services {
        for (j, intercept) in intercepts.iter().enumerate() {
            match owner.get(intercept) {
                Some(&first) if first != name => {
                    let kind = DocErrorKind::InterceptTaken {
                        intercept: intercept.clone(),
                        service: first.clone(),
                        by: name.clone(),
                    };
                    problems.push(format!("{}.intercepts[{j}]", at.path("services")), kind);
                }
                Some(_) => {}
                None => {
                    owner.insert(intercept, name);
                }
            }
        }
    }
}

/// Reports names used twice in one list and returns the set of names in it.
pub(crate) fn unique<'a>(
    entity: Entity,
    list: &str,
    entries: &[(At<'_>, Option<&'a Name>)],
    problems: &mut Problems,
) -> HashSet<&'a Name> {
    let mut first: HashMap<&Name, At<'_>> = HashMap::with_capacity(entries.len());
    for &(at, name) in entries {
        let Some(name) = name else { continue };
        if let Some(prev) = first.get(name) {
            let kind = DocErrorKind::Duplicate {
                entity,
                name: name.clone(),
                first: prev.path(list),
            };
            problems.push(format!("{}.name", at.path(list)), kind);
        } else {
            first.insert(name, at);
        }
    }
    first.into_keys().collect()
}

impl State {
    /// Checks the rules every stored state must keep: entries stored under their own id or
    /// name, names unique within each list (identity names across all kinds, revoked ones
    /// included, since their names are never reused), every `@name` naming an existing identity
    /// or service, no empty selector list, and no intercept address used by two services. The
    /// controller runs it on the result of every write before storing it, with the same rules
    /// `umbra apply` applies to documents.
    pub fn validate(&self) -> Result<(), Vec<crate::DocError>> {
        let mut problems = Problems::default();
        let mismatch = |list: &str, key: &str, own: &str, problems: &mut Problems| {
            if key != own {
                let kind = DocErrorKind::KeyMismatch {
                    key: key.to_owned(),
                    own: own.to_owned(),
                };
                problems.push(At::Key(key).path(list), kind);
            }
        };
        for (id, i) in &self.identities {
            mismatch("identities", id.as_str(), i.id.as_str(), &mut problems);
        }
        for (name, s) in &self.services {
            mismatch("services", name.as_str(), s.name.as_str(), &mut problems);
        }
        for (name, p) in &self.policies {
            mismatch("policies", name.as_str(), p.name.as_str(), &mut problems);
        }
        let catalog = Catalog {
            identities: (self.identities.iter())
                .map(|(id, i)| (At::Key(id.as_str()), Some(&i.name)))
                .collect(),
            services: (self.services.iter())
                .map(|(k, s)| (At::Key(k.as_str()), Some(&s.name)))
                .collect(),
            policies: (self.policies.iter())
                .map(|(k, p)| PolicyRefs {
                    at: At::Key(k.as_str()),
                    name: Some(&p.name),
                    identities: Side::of(&p.identities),
                    services: Side::of(&p.services),
                })
                .collect(),
            intercepts: (self.services.iter())
                .map(|(k, s)| (At::Key(k.as_str()), &s.name, s.intercepts.as_slice()))
                .collect(),
        };
        catalog.check(&mut problems);
        problems.finish(|| ())
    }
}

#[cfg(test)]
mod tests {
    use crate::error::{DocErrorKind, Entity};
    use crate::model::{Action, IdentityKind, Semantic};
    use crate::testing::{agent, id, n, policy, service, state};

    fn paths(s: &crate::State) -> Vec<(String, DocErrorKind)> {
        let errs = s.validate().expect_err("state should be invalid");
        errs.into_iter().map(|e| (e.path, e.kind)).collect()
    }

    #[test]
    fn a_sound_state_passes() {
        let s = state(
            [agent("a", &["r"])],
            [service("s", &[])],
            [policy("p", Action::Dial, Semantic::AnyOf, &["@a"], &["@s"])],
        );
        s.validate().unwrap();
    }

    #[test]
    fn identity_names_are_unique_across_kinds_and_revocation() {
        let mut admin = agent("a", &[]);
        admin.id = id("other");
        admin.kind = IdentityKind::Admin;
        admin.revoked = true;
        let got = paths(&state([agent("a", &[]), admin], [], []));
        assert_eq!(
            got,
            [(
                "identities[\"other\"].name".to_owned(),
                DocErrorKind::Duplicate {
                    entity: Entity::Identity,
                    name: n("a"),
                    first: "identities[\"id-a\"]".into()
                }
            )]
        );
    }

    #[test]
    fn entries_live_under_their_own_key() {
        let mut s = state([agent("a", &[])], [service("s", &[])], []);
        let moved = s.services.remove(&n("s")).unwrap();
        s.services.insert(n("t"), moved);
        let got = paths(&s);
        assert_eq!(got[0].0, "services[\"t\"]");
        assert!(matches!(got[0].1, DocErrorKind::KeyMismatch { .. }));
    }

    #[test]
    fn references_must_resolve_and_lists_must_not_be_empty() {
        let s = state(
            [agent("a", &[])],
            [service("s", &[])],
            [
                policy("p", Action::Bind, Semantic::AllOf, &["#x", "@s"], &["@a"]),
                policy("q", Action::Dial, Semantic::AnyOf, &[], &["#all"]),
            ],
        );
        let got: Vec<String> = paths(&s).into_iter().map(|(p, _)| p).collect();
        assert_eq!(
            got,
            [
                "policies[\"p\"].identities[1]",
                "policies[\"p\"].services[0]",
                "policies[\"q\"].identities"
            ]
        );
    }
}
