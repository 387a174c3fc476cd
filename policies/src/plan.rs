//! Planning: the ordered changes that turn the current state into the one a document describes,
//! shown to the operator by `umbra apply --dry-run` before anything is written.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::roles::Roles;
use std::fmt;

use crate::doc::{DocIdentity, Document};
use crate::error::{DocError, DocErrorKind, Problems};
use crate::model::{Hosting, Identity, IdentityId, IdentityKind, Service, ServicePolicy, State};
use crate::name::Name;
use crate::rules::At;

/// The changes that make a state match a document, in an order in which each intermediate
/// state is valid: creations, then updates, then deletions of policies before the services
/// and identities they could name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The changes, in the order they must be applied.
    pub changes: Vec<Change>,
    /// The entries as they were before the changes that update them, so that the plan can be
    /// shown as a diff.
    before: Before,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Before {
    identities: BTreeMap<IdentityId, Identity>,
    services: BTreeMap<Name, Service>,
    policies: BTreeMap<Name, ServicePolicy>,
}

/// One change to the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Create an identity; the controller assigns its id.
    CreateIdentity {
        /// Its name.
        name: Name,
        /// Agent or admin.
        kind: IdentityKind,
        /// Its roles.
        roles: Roles,
        /// Whether it starts disabled.
        disabled: bool,
        /// Whether it is a revoked record (recreated from a document, so that its name stays
        /// taken and the policies naming it resolve); it never holds a certificate.
        revoked: bool,
    },
    /// Change an existing identity's roles or disabled flag.
    UpdateIdentity {
        /// Which identity.
        id: IdentityId,
        /// Its name.
        name: Name,
        /// Its new roles.
        roles: Roles,
        /// Its new disabled flag.
        disabled: bool,
    },
    /// Delete an identity.
    DeleteIdentity {
        /// Which identity.
        id: IdentityId,
        /// Its name, for display.
        name: Name,
    },
    /// Create or replace a service.
    PutService(Service),
    /// Delete a service.
    DeleteService {
        /// Which service.
        name: Name,
    },
    /// Create or replace a policy.
    PutPolicy(ServicePolicy),
    /// Delete a policy.
    DeletePolicy {
        /// Which policy.
        name: Name,
    },
}

impl Plan {
    /// A plan of these changes, with no record of what they replace (shown without diffs).
    pub fn new(changes: Vec<Change>) -> Plan {
        Plan {
            changes,
            before: Before::default(),
        }
    }

    /// Whether the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// The changes that make `current` match `desired`.
///
/// Routers and revoked identities in `current` are never touched: a document may list one only
/// exactly as it is (as `export` does, for the policies that name it), and a document router
/// must exist. A revoked identity the state lacks is created as a revoked record; marking an
/// active identity revoked, or changing an identity's kind, is an error. Agent and admin
/// identities, services and policies missing from the document are deleted. Entries that
/// would not change are left out.
pub fn plan(current: &State, desired: &Document) -> Result<Plan, Vec<DocError>> {
    let mut problems = Problems::default();
    if let Err(e) = desired.validate() {
        problems.extend(e);
    }
    let mut plan = Plan::default();
    let by_name: HashMap<&Name, &Identity> = (current.identities.values())
        .map(|i| (&i.name, i))
        .collect();

    let mut wanted: Vec<(usize, &DocIdentity)> = desired.identities.iter().enumerate().collect();
    wanted.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    let (mut creates, mut updates) = (Vec::new(), Vec::new());
    for (i, want) in wanted {
        let path = At::Pos(i).path("identities");
        match by_name.get(&want.name) {
            None if want.kind == IdentityKind::Router => {
                let kind = DocErrorKind::RouterNotEnrolled {
                    name: want.name.clone(),
                };
                problems.push(format!("{path}.name"), kind);
            }
            None => creates.push(Change::CreateIdentity {
                name: want.name.clone(),
                kind: want.kind,
                roles: want.roles.clone(),
                disabled: want.disabled,
                revoked: want.revoked,
            }),
            Some(have) => match protected(have) {
                // A reference to a router or revoked record, exactly as it is.
                Some(_) if DocIdentity::from(*have) == *want => {}
                Some(kind) => problems.push(format!("{path}.name"), kind),
                None if have.kind != want.kind => {
                    let kind = DocErrorKind::KindChange {
                        name: want.name.clone(),
                        current: have.kind,
                        desired: want.kind,
                    };
                    problems.push(format!("{path}.kind"), kind);
                }
                None if want.revoked => {
                    let kind = DocErrorKind::RevokeInDocument {
                        name: want.name.clone(),
                    };
                    problems.push(format!("{path}.revoked"), kind);
                }
                None if have.roles != want.roles || have.disabled != want.disabled => {
                    plan.before
                        .identities
                        .insert(have.id.clone(), (*have).clone());
                    updates.push(Change::UpdateIdentity {
                        id: have.id.clone(),
                        name: want.name.clone(),
                        roles: want.roles.clone(),
                        disabled: want.disabled,
                    });
                }
                None => {}
            },
        }
    }
    let keep: HashSet<&Name> = desired.identities.iter().map(|i| &i.name).collect();
    let mut identity_deletes: Vec<&Identity> = (current.identities.values())
        .filter(|i| protected(i).is_none() && !keep.contains(&i.name))
        .collect();
    identity_deletes.sort_by(|a, b| a.name.cmp(&b.name));

    let services = diff(&current.services, &desired.services, |s| &s.name);
    let policies = diff(&current.policies, &desired.policies, |p| &p.name);
    plan.before.services = services.before;
    plan.before.policies = policies.before;

    plan.changes.extend(creates);
    plan.changes
        .extend(services.puts.into_iter().map(Change::PutService));
    plan.changes.extend(updates);
    plan.changes
        .extend(policies.puts.into_iter().map(Change::PutPolicy));
    let delete_policy = |name| Change::DeletePolicy { name };
    plan.changes
        .extend(policies.deletes.into_iter().map(delete_policy));
    let delete_service = |name| Change::DeleteService { name };
    plan.changes
        .extend(services.deletes.into_iter().map(delete_service));
    plan.changes.extend(
        identity_deletes
            .into_iter()
            .map(|i| Change::DeleteIdentity {
                id: i.id.clone(),
                name: i.name.clone(),
            }),
    );
    problems.finish(|| plan)
}

/// Why an identity is out of reach of documents and plans, if it is.
pub(crate) fn protected(identity: &Identity) -> Option<DocErrorKind> {
    let name = identity.name.clone();
    if identity.kind == IdentityKind::Router {
        Some(DocErrorKind::RouterName { name })
    } else if identity.revoked {
        Some(DocErrorKind::RevokedName { name })
    } else {
        None
    }
}

/// What must change in a name-keyed list: entries to put (sorted by name), names to delete, and
/// the current version of every entry that a put replaces.
struct Diff<T> {
    puts: Vec<T>,
    deletes: Vec<Name>,
    before: BTreeMap<Name, T>,
}

fn diff<T: Clone + PartialEq>(
    current: &imbl::OrdMap<Name, T>,
    desired: &[T],
    name: impl Fn(&T) -> &Name,
) -> Diff<T> {
    let mut puts: Vec<T> = Vec::new();
    let mut before = BTreeMap::new();
    for want in desired {
        match current.get(name(want)) {
            Some(have) if have == want => {}
            Some(have) => {
                before.insert(name(want).clone(), have.clone());
                puts.push(want.clone());
            }
            None => puts.push(want.clone()),
        }
    }
    puts.sort_by(|a, b| name(a).cmp(name(b)));
    let keep: HashSet<&Name> = desired.iter().map(&name).collect();
    let deletes = (current.keys())
        .filter(|k| !keep.contains(k))
        .cloned()
        .collect();
    Diff {
        puts,
        deletes,
        before,
    }
}

/// A field of an entry as the plan shows it.
type Fields = Vec<(&'static str, String)>;

fn list<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|x| x.to_string()).collect();
    items.join(",")
}

fn identity_fields(roles: &Roles, disabled: bool, revoked: bool) -> Fields {
    vec![
        ("roles", list(roles)),
        ("disabled", disabled.to_string()),
        ("revoked", revoked.to_string()),
    ]
}

fn service_fields(s: &Service) -> Fields {
    let address = match &s.hosting {
        Hosting::Address(a) => a.to_string(),
        Hosting::Sdk => "hosted".to_owned(),
    };
    vec![
        ("address", address),
        ("roles", list(&s.roles)),
        ("intercepts", list(&s.intercepts)),
        ("proxy_protocol", s.proxy_protocol.to_string()),
    ]
}

fn policy_fields(p: &ServicePolicy) -> Fields {
    vec![
        ("action", p.action.to_string()),
        ("identities", list(&p.identities)),
        ("services", list(&p.services)),
        ("semantic", p.semantic.to_string()),
    ]
}

/// Whether a field is worth showing on a `+` line: set, and not an empty list or `false`.
fn is_set(value: &str) -> bool {
    !value.is_empty() && value != "false"
}

/// `+ service llm address=a:1 roles=ai`: the fields that are set.
fn listed(f: &mut fmt::Formatter<'_>, sign: char, head: &str, fields: &Fields) -> fmt::Result {
    write!(f, "{sign} {head}")?;
    for (k, v) in fields.iter().filter(|(_, v)| is_set(v)) {
        write!(f, " {k}={v}")?;
    }
    writeln!(f)
}

/// `~ service llm: address a:1 -> b:2, roles (none) -> ai`: the fields that differ.
fn changed(f: &mut fmt::Formatter<'_>, head: &str, old: &Fields, new: &Fields) -> fmt::Result {
    let shown = |v: &str| if v.is_empty() { "(none)" } else { v }.to_owned();
    let diffs: Vec<String> = (old.iter().zip(new))
        .filter(|((_, a), (_, b))| a != b)
        .map(|((k, a), (_, b))| format!("{k} {} -> {}", shown(a), shown(b)))
        .collect();
    writeln!(f, "~ {head}: {}", diffs.join(", "))
}

impl Plan {
    /// The plan as a diff of at most `limit` changes, then one line counting the rest by kind,
    /// for answers and logs that must stay small whatever the document.
    pub fn shown(&self, limit: usize) -> Shown<'_> {
        Shown { plan: self, limit }
    }
}

/// A plan shown in part (see [`Plan::shown`]).
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a> {
    plan: &'a Plan,
    limit: usize,
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.plan.write(f, self.limit)?;
        let rest = self.plan.changes.get(self.limit..).unwrap_or_default();
        if rest.is_empty() {
            return Ok(());
        }
        let (mut identities, mut services, mut policies) = (0usize, 0usize, 0usize);
        for change in rest {
            match change {
                Change::CreateIdentity { .. }
                | Change::UpdateIdentity { .. }
                | Change::DeleteIdentity { .. } => identities += 1,
                Change::PutService(_) | Change::DeleteService { .. } => services += 1,
                Change::PutPolicy(_) | Change::DeletePolicy { .. } => policies += 1,
            }
        }
        writeln!(
            f,
            "... and {} more change(s): {identities} to identities, {services} to services, \
             {policies} to policies",
            rest.len()
        )
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, usize::MAX)
    }
}

impl Plan {
    fn write(&self, f: &mut fmt::Formatter<'_>, limit: usize) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "no changes");
        }
        let b = &self.before;
        for change in self.changes.iter().take(limit) {
            match change {
                Change::CreateIdentity {
                    name,
                    kind,
                    roles,
                    disabled,
                    revoked,
                } => {
                    let head = format!("identity {name} ({kind})");
                    listed(f, '+', &head, &identity_fields(roles, *disabled, *revoked))?
                }
                Change::UpdateIdentity {
                    id,
                    name,
                    roles,
                    disabled,
                } => {
                    let new = identity_fields(roles, *disabled, false);
                    match b.identities.get(id) {
                        Some(old) => {
                            let old = identity_fields(&old.roles, old.disabled, old.revoked);
                            changed(f, &format!("identity {name}"), &old, &new)?
                        }
                        None => listed(f, '~', &format!("identity {name}"), &new)?,
                    }
                }
                Change::PutService(s) => {
                    let head = format!("service {}", s.name);
                    match b.services.get(&s.name) {
                        Some(old) => changed(f, &head, &service_fields(old), &service_fields(s))?,
                        None => listed(f, '+', &head, &service_fields(s))?,
                    }
                }
                Change::PutPolicy(p) => {
                    let head = format!("policy {}", p.name);
                    match b.policies.get(&p.name) {
                        Some(old) => changed(f, &head, &policy_fields(old), &policy_fields(p))?,
                        None => listed(f, '+', &head, &policy_fields(p))?,
                    }
                }
                Change::DeleteIdentity { name, .. } => writeln!(f, "- identity {name}")?,
                Change::DeleteService { name } => writeln!(f, "- service {name}")?,
                Change::DeletePolicy { name } => writeln!(f, "- policy {name}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
