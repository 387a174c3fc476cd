//! From the control follower's batches to the policy the router enforces, without ever making
//! the router wait for a compilation.
//!
//! A batch of changes is applied to the last compiled policy in the follower's task: that costs
//! what the changes touch (microseconds for a revocation). A new copy (a snapshot, or more
//! changes than are worth applying one by one) is compiled from scratch, which takes seconds at
//! a million identities; that runs on a blocking thread while the follower goes on reading the
//! channel. The batches that arrive meanwhile are queued and applied to the result, and the
//! revocations among them are applied at once to the policy still enforced, so that a
//! revocation never waits for a compilation (a policy older than the copy, tightened, is no
//! wider than the one already enforced).

use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use umbra_proto::follow::{Changes, ControlFollower, MAX_PENDING_CHANGES};
use umbra_proto::{ChangeEvent, Replica};

use crate::policy::Policy;

/// Publishes policies on the router's watch channel; owned by the control follower's task.
pub(crate) struct Publisher {
    tx: watch::Sender<Option<Arc<Policy>>>,
    /// The last policy compiled, kept apart from `tx` (which says `None` while the router fails
    /// closed), so that the next one is this with the changes since applied.
    compiled: Option<Arc<Policy>>,
    /// The compilation under way, if any.
    building: Option<Build>,
    /// The wall time revocations are pruned at.
    clock: umbra_clock::Clock,
    /// Compilation times, and when each batch was published (revocation-to-cut latency).
    metrics: crate::metrics::Metrics,
}

/// A compilation running on a blocking thread.
struct Build {
    done: oneshot::Receiver<Policy>,
    /// What the follower committed after the copy being compiled, in order.
    pending: Vec<ChangeEvent>,
    /// The copy changed beyond what `pending` can say (another snapshot, or too many changes):
    /// the result is out of date, and the current copy is compiled next.
    superseded: bool,
}

impl Build {
    /// Queues a batch committed during the compilation.
    fn queue(&mut self, list: Vec<ChangeEvent>) {
        if self.superseded {
        } else if self.pending.len() + list.len() > MAX_PENDING_CHANGES {
            self.supersede();
        } else {
            self.pending.extend(list);
        }
    }

    fn supersede(&mut self) {
        self.superseded = true;
        self.pending = Vec::new();
    }
}

impl Publisher {
    /// A publisher with nothing compiled yet.
    pub(crate) fn new(tx: watch::Sender<Option<Arc<Policy>>>, clock: umbra_clock::Clock) -> Self {
        Publisher {
            tx,
            compiled: None,
            building: None,
            clock,
            metrics: Default::default(),
        }
    }

    /// The same publisher, reporting to `metrics`.
    pub(crate) fn metered(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The follower said [`umbra_proto::follow::Output::Publish`]: the copy holds whole commits
    /// from a live controller.
    pub(crate) fn publish(&mut self, machine: &mut ControlFollower) {
        let changes = machine.take_changes();
        self.metrics.publishing();
        let Some(r) = machine.replica_mut() else {
            return;
        };
        if self.building.is_some() {
            match changes {
                Changes::Deltas(list) => {
                    self.tighten(&list);
                    if let Some(build) = self.building.as_mut() {
                        build.queue(list);
                    }
                }
                Changes::Rebuild => {
                    if let Some(build) = self.building.as_mut() {
                        build.supersede();
                    }
                }
            }
            return;
        }
        match (changes, self.compiled.clone()) {
            (Changes::Deltas(list), Some(last)) => {
                let policy = last.apply(r.seq, &list);
                self.send(policy, r, true);
            }
            _ => self.start(r),
        }
    }

    /// The follower said [`umbra_proto::follow::Output::Withdraw`].
    pub(crate) fn withdraw(&mut self) {
        self.tx.send_replace(None);
        tracing::error!("no word from the controller within the stale window: failing closed");
    }

    /// Waits for the compilation under way; never resolves without one.
    pub(crate) async fn built(&mut self) -> Option<Policy> {
        match self.building.as_mut() {
            Some(b) => (&mut b.done).await.ok(),
            None => std::future::pending().await,
        }
    }

    /// A compilation finished (`None`: its thread died): publishes it with the batches that
    /// came meanwhile, or compiles the current copy if it is out of date.
    pub(crate) fn finished(&mut self, built: Option<Policy>, machine: &mut ControlFollower) {
        let Some(build) = self.building.take() else {
            return;
        };
        let fresh = !machine.is_stale();
        let Some(r) = machine.replica_mut() else {
            // Another history began; its snapshot will be compiled when it is complete.
            return;
        };
        match built {
            Some(policy) if !build.superseded => {
                let policy = match build.pending.is_empty() {
                    true => policy,
                    false => policy.apply(r.seq, &build.pending),
                };
                debug_assert_eq!(policy.seq, r.seq);
                self.send(policy, r, fresh);
            }
            _ => self.start(r),
        }
    }

    /// Starts compiling a copy of `replica` on a blocking thread.
    fn start(&mut self, replica: &Replica) {
        let copy = replica.clone();
        let (tx, done) = oneshot::channel();
        tracing::info!(seq = copy.seq, "compiling the policy");
        let metrics = self.metrics.clone();
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let policy = Policy::build(&copy);
            metrics.compiled(started.elapsed());
            tracing::info!(seq = policy.seq, took = ?started.elapsed(), "policy compiled");
            let _ = tx.send(policy);
        });
        self.building = Some(Build {
            done,
            pending: Vec::new(),
            superseded: false,
        });
    }

    /// Applies the revocations among `changes` to the policy enforced now, while a compilation
    /// runs: the enforced policy only loses access by it.
    fn tighten(&mut self, changes: &[ChangeEvent]) {
        let cuts: Vec<ChangeEvent> = changes.iter().filter(|c| cuts_access(c)).cloned().collect();
        if cuts.is_empty() {
            return;
        }
        if let Some(last) = &self.compiled {
            let policy = Arc::new(last.tightened(&cuts));
            self.compiled = Some(Arc::clone(&policy));
            if self.tx.borrow().is_some() {
                self.tx.send_replace(Some(policy));
            }
        }
    }

    /// Makes `policy` the last compiled, and enforces it if the copy is fresh.
    fn send(&mut self, mut policy: Policy, replica: &mut Replica, fresh: bool) {
        let now = self.clock.timestamp();
        if policy.prune_revoked(now) {
            replica.prune_revoked(now);
        }
        let policy = Arc::new(policy);
        self.compiled = Some(Arc::clone(&policy));
        if !fresh {
            return;
        }
        tracing::debug!(seq = policy.seq, "policy published");
        if self.tx.borrow().is_none() {
            tracing::info!(seq = policy.seq, "controller heard: serving policy");
        }
        self.tx.send_replace(Some(policy));
    }
}

/// Whether a change only takes access away: a certificate revoked, an identity deleted, revoked
/// or disabled. Such a change is safe to apply to any earlier policy.
fn cuts_access(change: &ChangeEvent) -> bool {
    match change {
        ChangeEvent::CertRevoked { .. } | ChangeEvent::IdentityDeleted { .. } => true,
        ChangeEvent::IdentityPut { identity } => identity.revoked || identity.disabled,
        _ => false,
    }
}

#[cfg(test)]
#[path = "publish_tests.rs"]
mod tests;
