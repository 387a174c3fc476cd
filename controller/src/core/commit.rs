//! The one gate every write goes through: a batch's model changes are applied to a candidate
//! copy of the replica and checked with the core's rules before anything is stored or
//! published.

use umbra_policies::StateChange;

use super::affected::affected;
use super::*;

impl Controller {
    /// Commits a batch built under the lock and publishes its deltas: the one gate for every
    /// write. A batch that changes the model is refused, with nothing written, if it would add
    /// a problem to the state by the core's rules: the index answers that from what the batch
    /// touches ([`Index::validate_changes`], the problems `State::validate` of the result has
    /// and of the state before has not), so a write costs what it changes, not the size of the
    /// state. A problem the stored state already had (a store written before a rule existed,
    /// logged at start) does not block unrelated writes.
    pub(super) fn commit(&self, inner: &mut Inner, batch: Batch) -> Result<(), ControllerError> {
        let started = std::time::Instant::now();
        let out = self.commit_timed(inner, batch);
        if let Some(outcome) = outcome(&out) {
            self.metrics.commit(started, outcome);
        }
        out
    }

    fn commit_timed(&self, inner: &mut Inner, batch: Batch) -> Result<(), ControllerError> {
        if batch.is_empty() {
            return Ok(());
        }
        let changes: Vec<StateChange> = (batch.changes.iter())
            .filter_map(ChangeEvent::state_change)
            .collect();
        if !changes.is_empty() {
            if let Err(problems) = inner.index.validate_changes(&changes) {
                return Err(refused(problems, &batch));
            }
        }
        let now = self.now();
        let deltas = inner.store.commit(&batch, inner.replica.seq, now)?;
        self.absorb(inner, deltas, now);
        if !batch.audit.is_empty() {
            self.bell.ring();
        }
        Ok(())
    }

    /// Makes committed deltas part of the in-memory state and publishes them: this
    /// controller's own, right after they are stored, or another controller's, read back from
    /// a shared store (module `shared`). They must follow `inner.replica.seq` without a gap.
    /// The index, the replica, the names, the revoked serials, the watchers whose views the
    /// deltas can alter, and the routers following the control channel, in that order.
    pub(super) fn absorb(&self, inner: &mut Inner, deltas: Vec<Delta>, now: Timestamp) {
        let changes: Vec<StateChange> = (deltas.iter())
            .filter_map(|d| d.change.state_change())
            .collect();
        // The index before the batch, for finding whose views it alters.
        let before = Arc::clone(&inner.index);
        if !changes.is_empty() {
            // One change at a time, each at a cost proportional to what it touches, on an
            // O(1) copy that shares the rest with the index before.
            let mut next = Index::clone(&before);
            for change in &changes {
                next.apply(change);
            }
            inner.index = Arc::new(next);
        }
        let mut revoked = Vec::new();
        for d in &deltas {
            match &d.change {
                ChangeEvent::IdentityPut { identity } => {
                    if let Some(old) = inner.replica.state.identities.get(&identity.id) {
                        if old.name != identity.name {
                            let n = old.name.clone();
                            inner.names.remove(&n);
                        }
                    }
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
                ChangeEvent::CertRevoked { cert } => revoked.push(cert.serial.clone()),
                _ => {}
            }
            if !is_model(&d.change) {
                inner.replica.apply_change(&d.change);
            }
            inner.replica.seq = d.seq;
        }
        if !changes.is_empty() {
            // The model changes, made once: the replica holds the index's state (persistent,
            // so this shares it instead of holding a second copy).
            inner.replica.state = inner.index.state().clone();
        }
        if !revoked.is_empty() {
            self.revoked.add(revoked);
        }
        // What the watchers need, taken before the deltas go to the routers.
        let events: Option<Vec<ChangeEvent>> =
            (!self.hub.is_empty()).then(|| deltas.iter().map(|d| d.change.clone()).collect());
        // Routers first: a revocation reaches them before the watchers' views are worked out.
        let sender = self.deltas.load();
        for d in deltas {
            // No receivers is normal (no router connected).
            let _ = sender.send(Arc::new(d));
        }
        if let Some(events) = events {
            // Computed once here, so that only the watchers whose views the batch can alter
            // recompute them (see `hub`).
            let routers = &inner.replica.routers;
            let is_router = |id: &IdentityId| routers.contains_key(id);
            self.hub
                .wake(&affected(&before, &inner.index, is_router, &events, now));
        }
    }
}

/// Whether a change is to the model (what the index and `State` hold), rather than to
/// certificates or routers.
fn is_model(change: &ChangeEvent) -> bool {
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

/// How a commit ended, for the metrics (`None`: nothing to commit).
fn outcome(out: &Result<(), ControllerError>) -> Option<Result<(), bool>> {
    match out {
        Ok(()) => Some(Ok(())),
        Err(
            ControllerError::Invalid(_)
            | ControllerError::Rejected(_)
            | ControllerError::Conflict(_),
        ) => Some(Err(true)),
        Err(_) => Some(Err(false)),
    }
}
