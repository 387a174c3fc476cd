//! The one gate every write goes through: a batch's model changes are applied to a candidate
//! copy of the replica and checked with the core's rules before anything is stored or
//! published.

use umbra_policies::StateChange;

use super::affected::affected;
use super::*;

impl Controller {
    /// Commits a batch built under the lock and publishes its deltas: the one gate for every
    /// write. A batch that changes the model is first applied to a candidate copy of the
    /// replica (by the same [`Replica::apply_change`] followers use) and refused, with nothing
    /// written, unless the result keeps the core's rules ([`State::validate`]). A problem the
    /// stored state already had (a store written before a rule existed, logged at start) does
    /// not block unrelated writes; only a problem the batch would add is refused.
    pub(super) fn commit(&self, inner: &mut Inner, batch: Batch) -> Result<(), ControllerError> {
        if batch.is_empty() {
            return Ok(());
        }
        if batch.changes.iter().any(changes_model) {
            let mut candidate = inner.replica.clone();
            for change in &batch.changes {
                candidate.apply_change(change);
            }
            if let Err(problems) = candidate.state.validate() {
                let old = inner.state().validate().err().unwrap_or_default();
                let new: Vec<_> = problems.into_iter().filter(|p| !old.contains(p)).collect();
                if !new.is_empty() {
                    return Err(refused(new, &batch));
                }
            }
        }
        let now = self.now();
        let model = batch.changes.iter().any(changes_model);
        // The index before the batch, when a watch may need to know whose view it alters
        // (kept current commit by commit, so this is a lookup, not a compilation).
        let watched = !self.hub.is_empty();
        let before = (watched && model).then(|| self.index_locked(inner));
        let seq_before = inner.replica.seq;
        let deltas = inner.store.commit(&batch, inner.replica.seq, now)?;
        let mut revoked_changed = false;
        for d in &deltas {
            match &d.change {
                ChangeEvent::IdentityPut { identity } => {
                    inner
                        .names
                        .insert(identity.name.clone(), identity.id.clone());
                }
                ChangeEvent::IdentityDeleted { id } => {
                    if let Some(i) = inner.replica.state.identities.get(id) {
                        let n = i.name.clone();
                        inner.names.remove(&n);
                    }
                }
                ChangeEvent::CertRevoked { .. } => revoked_changed = true,
                _ => {}
            }
            inner.replica.apply_change(&d.change);
            inner.replica.seq = d.seq;
        }
        if revoked_changed {
            self.revoked
                .0
                .store(Arc::new(inner.replica.revoked.keys().cloned().collect()));
        }
        self.next_index(inner, seq_before, before.clone(), &batch.changes);
        if watched {
            // Computed once here, so that only the watchers whose views the batch can alter
            // recompute them (see `hub`).
            let after = self.index_locked(inner);
            let before = before.unwrap_or_else(|| after.clone());
            let routers = &inner.replica.routers;
            let is_router = |id: &IdentityId| routers.contains_key(id);
            self.hub
                .wake(&affected(&before, &after, is_router, &batch.changes, now));
        }
        for d in deltas {
            // No receivers is normal (no router connected).
            let _ = self.deltas.send(Arc::new(d));
        }
        Ok(())
    }

    /// Keeps the cached index current after a commit, one change at a time
    /// ([`Index::apply`], at a cost proportional to what each change touches, on an O(1) copy
    /// that shares the rest with the index before): a batch that changes no model entity
    /// (certificates, router addresses) keeps it as it is. Without a current index to start
    /// from, it is compiled when next asked for.
    fn next_index(
        &self,
        inner: &mut Inner,
        seq_before: u64,
        before: Option<Arc<Index>>,
        changes: &[ChangeEvent],
    ) {
        let seq = inner.replica.seq;
        let base = before.or_else(|| match &inner.index {
            Some((s, idx)) if *s == seq_before => Some(idx.clone()),
            _ => None,
        });
        let Some(base) = base else {
            return;
        };
        let mut next = Index::clone(&base);
        let mut changed = false;
        for change in changes.iter().filter_map(state_change) {
            next.apply(&change);
            changed = true;
        }
        inner.index = Some((seq, if changed { Arc::new(next) } else { base }));
    }
}

/// The model change a committed change makes, if any (the index's unit of change).
fn state_change(change: &ChangeEvent) -> Option<StateChange> {
    Some(match change {
        ChangeEvent::IdentityPut { identity } => StateChange::IdentityPut(identity.clone()),
        ChangeEvent::IdentityDeleted { id } => StateChange::IdentityDeleted(id.clone()),
        ChangeEvent::ServicePut { service } => StateChange::ServicePut(service.clone()),
        ChangeEvent::ServiceDeleted { name } => StateChange::ServiceDeleted(name.clone()),
        ChangeEvent::PolicyPut { policy } => StateChange::PolicyPut(policy.clone()),
        ChangeEvent::PolicyDeleted { name } => StateChange::PolicyDeleted(name.clone()),
        ChangeEvent::CertRevoked { .. }
        | ChangeEvent::RouterPut { .. }
        | ChangeEvent::RouterDeleted { .. } => return None,
    })
}

/// Whether a change can affect what [`State::validate`] checks (certificates and router
/// addresses cannot).
fn changes_model(change: &ChangeEvent) -> bool {
    !matches!(
        change,
        ChangeEvent::CertRevoked { .. }
            | ChangeEvent::RouterPut { .. }
            | ChangeEvent::RouterDeleted { .. }
    )
}

/// A write the core's rules refused, as the operator should read it. A name or intercept
/// another entry holds is a conflict (409, what the loser of two concurrent creates gets),
/// worded for a command rather than as a path in the state (naming the service the batch does
/// not write as the one holding an intercept); anything else is invalid (400), with the paths
/// the core gives.
fn refused(errors: Vec<umbra_policies::DocError>, batch: &Batch) -> ControllerError {
    use umbra_policies::{DocErrorKind, Entity};
    let conflict = |e: &umbra_policies::DocError| match &e.kind {
        DocErrorKind::Duplicate { entity, name, .. } => {
            let what = match entity {
                Entity::Identity => "an identity",
                Entity::Service => "a service",
                Entity::Policy => "a policy",
            };
            Some(format!("{what} named {name} already exists"))
        }
        DocErrorKind::InterceptTaken {
            intercept,
            service,
            by,
        } => {
            let written = |n: &Name| {
                (batch.changes.iter())
                    .any(|c| matches!(c, ChangeEvent::ServicePut { service } if &service.name == n))
            };
            let holder = if written(service) && !written(by) {
                by
            } else {
                service
            };
            Some(format!(
                "intercept {intercept} is already used by service {holder}"
            ))
        }
        _ => None,
    };
    match errors.iter().map(conflict).collect::<Option<Vec<String>>>() {
        Some(conflicts) if !conflicts.is_empty() => ControllerError::Conflict(conflicts.join("; ")),
        _ => rejected(errors),
    }
}
