//! Terse builders for the unit tests.

use crate::model::{
    Action, Hosting, Identity, IdentityId, IdentityKind, Semantic, Service, ServicePolicy, State,
};
use crate::name::Name;

pub(crate) fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

pub(crate) fn id(s: &str) -> IdentityId {
    IdentityId::new(s).unwrap()
}

/// An active agent with id `id-NAME`.
pub(crate) fn agent(name: &str, roles: &[&str]) -> Identity {
    Identity {
        id: id(&format!("id-{name}")),
        name: n(name),
        kind: IdentityKind::Agent,
        roles: roles.iter().map(|r| n(r)).collect(),
        disabled: false,
        revoked: false,
        expires_at: None,
    }
}

/// An SDK-hosted service.
pub(crate) fn service(name: &str, roles: &[&str]) -> Service {
    Service {
        name: n(name),
        roles: roles.iter().map(|r| n(r)).collect(),
        hosting: Hosting::Sdk,
        intercepts: vec![],
        proxy_protocol: false,
    }
}

pub(crate) fn policy(
    name: &str,
    action: Action,
    semantic: Semantic,
    identities: &[&str],
    services: &[&str],
) -> ServicePolicy {
    ServicePolicy {
        name: n(name),
        action,
        identities: identities.iter().map(|s| s.parse().unwrap()).collect(),
        services: services.iter().map(|s| s.parse().unwrap()).collect(),
        semantic,
        limits: crate::GrantLimits::default(),
    }
}

pub(crate) fn state(
    identities: impl IntoIterator<Item = Identity>,
    services: impl IntoIterator<Item = Service>,
    policies: impl IntoIterator<Item = ServicePolicy>,
) -> State {
    State {
        identities: (identities.into_iter())
            .map(|i| (i.id.clone(), i))
            .collect(),
        services: (services.into_iter())
            .map(|s| (s.name.clone(), s))
            .collect(),
        policies: (policies.into_iter())
            .map(|p| (p.name.clone(), p))
            .collect(),
    }
}
