//! Which identities' edge views a committed batch can alter, computed once per commit from the
//! index before and after it, so that the watch hub wakes only their watchers instead of every
//! watcher recomputing its view on every commit.
//!
//! An identity's view (see `views`) is a function of: its own record; the policies that select
//! it and the services they select; for each SDK-hosted service it binds, the Dial policies that
//! select that service and the identities they select; and the routers with their identities.
//! So a batch alters at most the views that depend, before or after it, on something it wrote:
//!
//! - an identity: that identity, and the binders of the SDK-hosted services it may dial before
//!   or after (their grants list it); a router's identity: everyone (the routers list);
//! - a service: every identity a policy selecting it selects, before or after (its dialers and
//!   binders);
//! - a policy: every identity it selects, before or after, and for a Dial policy the binders of
//!   the SDK-hosted services it selects, before or after;
//! - a router: everyone; a revoked certificate: its owner (whose watch must end).
//!
//! The index answers who a policy selects and what (`Index::identities_selected_by`,
//! `services_selected_by`), at a cost proportional to the answer; which policies select a
//! changed service is a scan of the policies. Pure: no lock, no clock (`now` is an argument).
//! Tested against the brute-force truth (every identity's view before and after random
//! batches) in `affected_tests`.

use std::collections::HashSet;

use umbra_policies::{Action, Hosting, IdentityId, IdentityKind, Index, Name, Timestamp};
use umbra_proto::ChangeEvent;

/// Above this many changes a batch wakes every watcher instead of working out whose views it
/// alters: the work of finding them grows with the batch, that of waking everyone only with
/// the number of watchers.
pub const WAKE_EVERYONE_ABOVE: usize = 256;

/// The watchers a batch must wake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Affected {
    /// Every watcher (the routers list changed).
    pub everyone: bool,
    /// The identities whose views may have changed, or whose own access may have ended.
    pub identities: HashSet<IdentityId>,
}

impl Affected {
    /// Whether `id`'s watchers must be woken.
    pub fn contains(&self, id: &IdentityId) -> bool {
        self.everyone || self.identities.contains(id)
    }

    /// Whether nobody is.
    pub fn is_empty(&self) -> bool {
        !self.everyone && self.identities.is_empty()
    }
}

/// The identities whose views `changes` can alter, given the index before and after them and
/// which identities are routers after them (`is_router`; a batch that changes the routers wakes
/// everyone anyway).
pub fn affected(
    before: &Index,
    after: &Index,
    is_router: impl Fn(&IdentityId) -> bool,
    changes: &[ChangeEvent],
    now: Timestamp,
) -> Affected {
    let mut out = Affected::default();
    if changes.len() > WAKE_EVERYONE_ABOVE {
        // A large batch (an `apply`) can touch most views; finding exactly whose would cost
        // more than every watcher recomputing once, which the connection bound limits.
        out.everyone = true;
        return out;
    }
    for change in changes {
        if out.everyone {
            // Nothing narrower can follow, except the owners of revoked certificates, whom
            // "everyone" already wakes.
            break;
        }
        match change {
            ChangeEvent::IdentityPut { identity } => {
                identity_changed(&mut out, [before, after], &is_router, &identity.id, now)
            }
            ChangeEvent::IdentityDeleted { id } => {
                identity_changed(&mut out, [before, after], &is_router, id, now)
            }
            ChangeEvent::ServicePut { service } => {
                service_changed(&mut out, before, after, &service.name)
            }
            ChangeEvent::ServiceDeleted { name } => service_changed(&mut out, before, after, name),
            ChangeEvent::PolicyPut { policy } => {
                policy_changed(&mut out, before, after, &policy.name, now)
            }
            ChangeEvent::PolicyDeleted { name } => {
                policy_changed(&mut out, before, after, name, now)
            }
            ChangeEvent::CertRevoked { cert } => {
                out.identities.insert(cert.identity.clone());
            }
            ChangeEvent::RouterPut { .. } | ChangeEvent::RouterDeleted { .. } => {
                out.everyone = true
            }
        }
    }
    out
}

fn identity_changed(
    out: &mut Affected,
    indexes: [&Index; 2],
    is_router: &impl Fn(&IdentityId) -> bool,
    id: &IdentityId,
    now: Timestamp,
) {
    out.identities.insert(id.clone());
    for index in indexes {
        let router =
            (index.state().identities.get(id)).is_some_and(|i| i.kind == IdentityKind::Router);
        if router || is_router(id) {
            // Whether a router is listed depends on its identity being active.
            out.everyone = true;
            return;
        }
        // An inactive identity dials nothing, so it is in no host's grants in that state.
        for s in index.services_for(id, Action::Dial, now) {
            if s.hosting == Hosting::Sdk {
                let binders = index.binders_of(s.name.as_str(), now);
                out.identities.extend(binders.into_iter().cloned());
            }
        }
    }
}

fn service_changed(out: &mut Affected, before: &Index, after: &Index, name: &Name) {
    for index in [before, after] {
        for p in index.policies_selecting(name.as_str()) {
            out.identities
                .extend(index.identities_selected_by(p).into_iter().cloned());
        }
    }
}

fn policy_changed(out: &mut Affected, before: &Index, after: &Index, name: &Name, now: Timestamp) {
    for index in [before, after] {
        let Some(policy) = index.state().policies.get(name) else {
            continue;
        };
        out.identities
            .extend(index.identities_selected_by(policy).into_iter().cloned());
        if policy.action != Action::Dial {
            // Bind policies change who hosts, never a host's grants.
            continue;
        }
        for s in index.services_selected_by(policy) {
            if s.hosting == Hosting::Sdk {
                let binders = index.binders_of(s.name.as_str(), now);
                out.identities.extend(binders.into_iter().cloned());
            }
        }
    }
}

#[cfg(test)]
#[path = "affected_tests.rs"]
mod tests;
