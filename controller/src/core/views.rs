//! An identity's edge view as a pure function of the compiled index, the routers and `now`:
//! what `GET /v1/edge` answers, the first frame of `GET /v1/edge/watch`, and what the watch
//! hub's `affected` is tested against (every identity's view before and after a change).

use std::collections::BTreeMap;

use umbra_policies::{Action, IdentityId, IdentityKind, Index, Name, State, Timestamp};
use umbra_proto::api::{EdgeService, EdgeView, HostedGrant};
use umbra_proto::RouterInfo;

/// The routers every view lists: those that reported an address and whose own identity is
/// active at `now` (a revoked router is never offered). The same for every identity, so it is
/// computed once per batch of views.
pub fn listed_routers<'a>(
    state: &State,
    routers: impl IntoIterator<Item = &'a RouterInfo>,
    now: Timestamp,
) -> Vec<RouterInfo> {
    (routers.into_iter())
        .filter(|r| r.advertise.is_some())
        .filter(|r| (state.identities.get(&r.id)).is_some_and(|i| i.is_active(now)))
        .cloned()
        .collect()
}

/// What `identity` may use at `now` (its dialable and bindable services, with, for each one it
/// hosts, every grant to dial it), listing `routers`. Canonical (see `EdgeView::canonicalize`).
pub fn edge_view(
    index: &Index,
    identity: &IdentityId,
    routers: Vec<RouterInfo>,
    now: Timestamp,
) -> EdgeView {
    let mut services: BTreeMap<Name, EdgeService> = BTreeMap::new();
    for action in [Action::Dial, Action::Bind] {
        for s in index.services_for(identity, action, now) {
            let e = services
                .entry(s.name.clone())
                .or_insert_with(|| EdgeService {
                    name: s.name.clone(),
                    intercepts: s.intercepts.clone(),
                    dial: false,
                    bind: false,
                    grants: Vec::new(),
                });
            match action {
                Action::Dial => e.dial = true,
                Action::Bind => e.bind = true,
            }
        }
    }
    // A host learns who may call the services it binds, and with what limits, so that a
    // gateway enforces the same grants the routers do: the index answers, as it does for the
    // routers. Only agents call through gateways.
    for e in services.values_mut().filter(|e| e.bind) {
        for (i, p) in index.dialers_of(e.name.as_str(), now) {
            if i.kind != IdentityKind::Agent {
                continue;
            }
            e.grants.push(HostedGrant {
                identity: i.id.clone(),
                name: i.name.clone(),
                policy: p.name.clone(),
                limits: p.limits.clone(),
            });
        }
    }
    let mut view = EdgeView {
        routers,
        services: services.into_values().collect(),
    };
    view.canonicalize();
    view
}
