//! Converting the YAML DTOs into a [`Document`], recording every problem with its path.
//!
//! Each entry is converted field by field; an entry with any invalid field is dropped from the
//! result but what was valid in it (its name, its valid selectors) still takes part in the
//! cross-entry rules, so that one run reports duplicates and dangling references too.

use crate::roles::Roles;

use super::dto::{DocumentDto, IdentityDto, PolicyDto, ServiceDto};
use super::{DocIdentity, Document};
use crate::error::{DocError, DocErrorKind, Problems};
use crate::model::{HostPort, Hosting, Service, ServicePolicy};
use crate::name::Name;
use crate::rules::{At, Catalog, PolicyRefs, Side};
use crate::selector::Selector;

/// An entry as far as it could be converted.
struct Draft<T> {
    /// The entry's name, if valid.
    name: Option<Name>,
    /// The entry, if every field was valid.
    item: Option<T>,
}

/// A policy as far as it could be converted; selectors stay in place so paths keep their index.
struct PolicyDraft {
    name: Option<Name>,
    identities: Vec<Option<Selector>>,
    services: Vec<Option<Selector>>,
    item: Option<ServicePolicy>,
}

pub(super) fn convert(dto: DocumentDto) -> Result<Document, Vec<DocError>> {
    let mut problems = Problems::default();
    let identities: Vec<_> = (dto.identities.into_iter().enumerate())
        .map(|(i, x)| identity(i, x, &mut problems))
        .collect();
    let services: Vec<_> = (dto.services.into_iter().enumerate())
        .map(|(i, x)| service(i, x, &mut problems))
        .collect();
    let policies: Vec<_> = (dto.policies.into_iter().enumerate())
        .map(|(i, x)| policy(i, x, &mut problems))
        .collect();

    Catalog {
        identities: names(&identities),
        services: names(&services),
        policies: (policies.iter().enumerate())
            .map(|(i, p)| PolicyRefs {
                at: At::Pos(i),
                name: p.name.as_ref(),
                identities: side(&p.identities),
                services: side(&p.services),
            })
            .collect(),
        intercepts: (services.iter().enumerate())
            .filter_map(|(i, d)| {
                Some((
                    At::Pos(i),
                    &d.item.as_ref()?.name,
                    &d.item.as_ref()?.intercepts[..],
                ))
            })
            .collect(),
    }
    .check(&mut problems);

    problems.finish(|| Document {
        identities: identities.into_iter().filter_map(|d| d.item).collect(),
        services: services.into_iter().filter_map(|d| d.item).collect(),
        policies: policies.into_iter().filter_map(|d| d.item).collect(),
    })
}

fn identity(i: usize, dto: IdentityDto, problems: &mut Problems) -> Draft<DocIdentity> {
    let path = At::Pos(i).path("identities");
    let name = problems.take(|| format!("{path}.name"), Name::new(dto.name));
    let roles = roles(&path, dto.roles, problems);
    let item = match (&name, roles) {
        (Some(name), Some(roles)) => Some(DocIdentity {
            name: name.clone(),
            kind: dto.kind,
            roles,
            disabled: dto.disabled,
            revoked: dto.revoked,
        }),
        _ => None,
    };
    Draft { name, item }
}

fn service(i: usize, dto: ServiceDto, problems: &mut Problems) -> Draft<Service> {
    let path = At::Pos(i).path("services");
    let name = problems.take(|| format!("{path}.name"), Name::new(dto.name));
    let roles = roles(&path, dto.roles, problems);
    let hosting = match (dto.address, dto.hosted) {
        (Some(a), false) => problems
            .take(|| format!("{path}.address"), a.parse::<HostPort>())
            .map(Hosting::Address),
        (None, true) => Some(Hosting::Sdk),
        (Some(_), true) => problems.take(|| path.clone(), Err(DocErrorKind::AddressAndHosted)),
        (None, false) => problems.take(|| path.clone(), Err(DocErrorKind::NoHosting)),
    };
    let intercepts = all((dto.intercepts.into_iter().enumerate())
        .map(|(j, s)| problems.take(|| format!("{path}.intercepts[{j}]"), s.parse::<HostPort>())));
    let item = match (&name, roles, hosting, intercepts) {
        (Some(name), Some(roles), Some(hosting), Some(intercepts)) => Some(Service {
            name: name.clone(),
            roles,
            hosting,
            intercepts,
            proxy_protocol: dto.proxy_protocol,
        }),
        _ => None,
    };
    Draft { name, item }
}

fn policy(i: usize, dto: PolicyDto, problems: &mut Problems) -> PolicyDraft {
    let path = At::Pos(i).path("policies");
    let name = problems.take(|| format!("{path}.name"), Name::new(dto.name));
    let mut selectors = |field: &str, list: Vec<String>| -> Vec<Option<Selector>> {
        (list.into_iter().enumerate())
            .map(|(j, s)| problems.take(|| format!("{path}.{field}[{j}]"), s.parse()))
            .collect()
    };
    let identities = selectors("identities", dto.identities);
    let services = selectors("services", dto.services);
    let limits = dto.limits.parse().map_err(|errors| {
        for (field, e) in errors {
            problems.push(format!("{path}.{field}"), e);
        }
    });
    let item = match (
        &name,
        all(identities.iter().cloned()),
        all(services.iter().cloned()),
        limits,
    ) {
        (Some(name), Some(ids), Some(svcs), Ok(limits)) => Some(ServicePolicy {
            name: name.clone(),
            action: dto.action,
            identities: ids,
            services: svcs,
            semantic: dto.semantic,
            limits,
        }),
        _ => None,
    };
    PolicyDraft {
        name,
        identities,
        services,
        item,
    }
}

/// The names of the drafts, for the cross-entry rules.
fn names<T>(drafts: &[Draft<T>]) -> Vec<(At<'static>, Option<&Name>)> {
    (drafts.iter().enumerate())
        .map(|(i, d)| (At::Pos(i), d.name.as_ref()))
        .collect()
}

/// The valid selectors of a policy side, at their original positions.
fn side(selectors: &[Option<Selector>]) -> Side<'_> {
    Side {
        len: selectors.len(),
        valid: (selectors.iter().enumerate())
            .filter_map(|(j, s)| Some((j, s.as_ref()?)))
            .collect(),
    }
}

/// The role names of the entry at `path`, reporting each invalid one.
fn roles(path: &str, roles: Vec<String>, problems: &mut Problems) -> Option<Roles> {
    all((roles.into_iter().enumerate())
        .map(|(j, r)| problems.take(|| format!("{path}.roles[{j}]"), Name::new(r))))
}

/// Every value, if none is missing. Consumes the whole iterator, so that every problem along
/// the way is recorded.
fn all<T, C: FromIterator<T>>(items: impl Iterator<Item = Option<T>>) -> Option<C> {
    let items: Vec<Option<T>> = items.collect();
    items.into_iter().collect()
}
