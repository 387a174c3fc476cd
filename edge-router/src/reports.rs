//! Decision reports: every stream the router refuses, and every allowed stream when it ends
//! (granting policy, bytes each way, duration), sent to the controller in batches
//! (`POST /v1/audit/decisions`) so that its audit log answers "who reached what, under which
//! policy".
//!
//! Never on the data path's critical section: a stream hands its decision to a bounded queue
//! ([`QUEUE`]) without waiting; a full queue counts the decision as dropped, and the count goes
//! to the controller with the next batch. One task sends a batch when [`BATCH`] decisions wait
//! or [`FLUSH`] after the first of them; a batch the controller does not take is tried
//! [`ATTEMPTS`] times, then counted as dropped too, so a controller outage costs the router one
//! queue and one batch of memory.
//!
//! The queue and the controller's budget for this router are shared by every identity it
//! serves, so each identity has its own budget first ([`REPORTS_PER_SEC`], [`REPORT_BURST`]; a
//! token bucket of `umbra_policies`): one agent flooding the router with refused (or short)
//! streams has its excess counted as dropped, and cannot push another's decisions out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use umbra_policies::{Bucket, Deny, Refill};
use umbra_proto::api::{DecisionReport, StreamDecision, StreamOutcome, MAX_DECISIONS};
use umbra_sdk::ControllerClient;

/// Decisions waiting to be sent at most.
pub const QUEUE: usize = 4096;
/// Decisions per report at most.
pub const BATCH: usize = MAX_DECISIONS;
/// Longest a decision waits for its batch.
pub const FLUSH: Duration = Duration::from_secs(1);
/// Tries per batch.
const ATTEMPTS: u32 = 3;

/// Decisions one identity may have reported a second, sustained: a fifth of what the
/// controller takes from a router, so that no one identity can spend a router's whole budget.
pub const REPORTS_PER_SEC: u32 = 100;
/// Decisions one identity may have reported at once (a fifth of the controller's burst).
pub const REPORT_BURST: u32 = 1000;
/// Identities whose budgets are kept at most; a full budget is forgotten when room is needed
/// (it holds nothing a fresh one would not), and beyond that a new identity's decision is
/// counted as dropped.
const MAX_BUDGETS: usize = 10_000;

/// Each identity's budget of reported decisions.
#[derive(Debug)]
struct Budgets {
    buckets: HashMap<String, Bucket>,
    refill: Option<Refill>,
    epoch: Instant,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            buckets: HashMap::new(),
            refill: Refill::new(
                u64::from(REPORTS_PER_SEC),
                Duration::from_secs(1),
                u64::from(REPORT_BURST),
            ),
            epoch: Instant::now(),
        }
    }
}

impl Budgets {
    /// Takes one decision from `identity`'s budget, if it has one left.
    fn take(&mut self, identity: &str) -> bool {
        let Some(r) = self.refill else {
            return true;
        };
        let now = self.epoch.elapsed();
        if !self.buckets.contains_key(identity) && self.buckets.len() >= MAX_BUDGETS {
            self.buckets.retain(|_, b| !b.is_full(&r, now));
            if self.buckets.len() >= MAX_BUDGETS {
                return false;
            }
        }
        let b = (self.buckets)
            .entry(identity.to_owned())
            .or_insert_with(|| Bucket::full(&r, now));
        b.take(&r, 1, now).is_ok()
    }
}

/// The queue's sending side; inert until [`Reports::start`].
#[derive(Debug, Default)]
pub(crate) struct Reports {
    tx: OnceLock<mpsc::Sender<StreamDecision>>,
    dropped: Arc<AtomicU64>,
    budgets: Mutex<Budgets>,
}

impl Reports {
    /// Starts the sender task on the current runtime.
    pub fn start(&self, client: ControllerClient, cancel: CancellationToken) {
        let (tx, rx) = mpsc::channel(QUEUE);
        if self.tx.set(tx).is_ok() {
            tokio::spawn(run(rx, self.dropped.clone(), client, cancel));
        }
    }

    fn push(&self, d: StreamDecision) {
        let Some(tx) = self.tx.get() else {
            return;
        };
        let within = (self.budgets.lock())
            .unwrap_or_else(|p| p.into_inner())
            .take(&d.identity);
        if !within || tx.try_send(d).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A refused request.
    pub fn refused(&self, identity: &impl ToString, service: &str, action: &str, why: Deny) {
        self.push(StreamDecision {
            identity: identity.to_string(),
            service: service.to_owned(),
            action: action.to_owned(),
            outcome: StreamOutcome::Refused,
            policy: None,
            reason: Some(why.to_string()),
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
        });
    }

    /// A request the policy allowed but a limit refused: `policy` is the grant whose limit it
    /// was (`None` for the router's own bound), `limit` the limit's name.
    pub fn limited(
        &self,
        identity: &impl ToString,
        service: &str,
        action: &str,
        policy: Option<&str>,
        limit: &str,
    ) {
        self.push(StreamDecision {
            identity: identity.to_string(),
            service: service.to_owned(),
            action: action.to_owned(),
            outcome: StreamOutcome::Refused,
            policy: policy.map(str::to_owned),
            reason: Some(format!("limit: {limit}")),
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
        });
    }

    /// An allowed stream; reported when the returned guard is finished or dropped (an early
    /// return, such as an unreachable service, reports `reason: unreachable`).
    pub fn allowed<'a>(
        &'a self,
        identity: &impl ToString,
        service: &str,
        action: &str,
        policy: &str,
        started: Instant,
    ) -> Allowed<'a> {
        Allowed {
            reports: self,
            started,
            d: Some(StreamDecision {
                identity: identity.to_string(),
                service: service.to_owned(),
                action: action.to_owned(),
                outcome: StreamOutcome::Ended,
                policy: Some(policy.to_owned()),
                reason: Some("unreachable".into()),
                bytes_up: 0,
                bytes_down: 0,
                duration_ms: 0,
            }),
        }
    }
}

/// An allowed stream not yet reported.
pub(crate) struct Allowed<'a> {
    reports: &'a Reports,
    started: Instant,
    d: Option<StreamDecision>,
}

impl Allowed<'_> {
    /// How it ended: bytes moved when both directions finished, else why it ended
    /// (`terminated` when the grant stopped holding).
    pub fn finish(mut self, moved: Option<(u64, u64)>, reason: Option<String>, terminated: bool) {
        if let Some(d) = self.d.as_mut() {
            let (up, down) = moved.unwrap_or_default();
            d.bytes_up = up;
            d.bytes_down = down;
            d.reason = reason;
            if terminated {
                d.outcome = StreamOutcome::Terminated;
            }
        }
    }
}

impl Drop for Allowed<'_> {
    fn drop(&mut self) {
        if let Some(mut d) = self.d.take() {
            d.duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.reports.push(d);
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<StreamDecision>,
    dropped: Arc<AtomicU64>,
    client: ControllerClient,
    cancel: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            d = rx.recv() => match d { Some(d) => d, None => return },
            _ = cancel.cancelled() => return,
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + FLUSH;
        while batch.len() < BATCH {
            tokio::select! {
                d = rx.recv() => match d { Some(d) => batch.push(d), None => break },
                _ = tokio::time::sleep_until(deadline) => break,
                _ = cancel.cancelled() => break,
            }
        }
        let report = DecisionReport {
            dropped: dropped.swap(0, Ordering::Relaxed),
            decisions: batch,
        };
        let mut sent = false;
        for attempt in 0..ATTEMPTS {
            let r: Result<serde_json::Value, _> = client
                .call(http::Method::POST, "/v1/audit/decisions", Some(&report))
                .await;
            match r {
                Ok(_) => {
                    sent = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, attempt, "decision report not taken");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500 << attempt)) => {}
                        _ = cancel.cancelled() => return,
                    }
                }
            }
        }
        if !sent {
            tracing::warn!(
                decisions = report.decisions.len(),
                "the controller did not take a decision report; counted as dropped"
            );
            let lost = report.decisions.len() as u64 + report.dropped;
            dropped.fetch_add(lost, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_counts_instead_of_waiting_and_guards_report_once() {
        let r = Reports::default();
        // Inert until started: nothing queued, nothing counted.
        r.refused(&"spiffe://t/agent/a", "svc", "dial", Deny::NotGranted);
        assert_eq!(r.dropped.load(Ordering::Relaxed), 0);
        let (tx, mut rx) = mpsc::channel(2);
        r.tx.set(tx).unwrap();
        r.refused(&"spiffe://t/agent/a", "svc", "dial", Deny::NotGranted);
        {
            let g = r.allowed(&"spiffe://t/agent/a", "svc", "dial", "p1", Instant::now());
            g.finish(Some((3, 4)), None, false);
        }
        // Queue full: counted.
        drop(r.allowed(&"a", "svc", "dial", "p1", Instant::now()));
        assert_eq!(r.dropped.load(Ordering::Relaxed), 1);
        let refused = rx.recv().await.unwrap();
        assert_eq!(refused.outcome, StreamOutcome::Refused);
        assert_eq!(refused.reason.as_deref(), Some("not granted"));
        let ended = rx.recv().await.unwrap();
        assert_eq!(ended.outcome, StreamOutcome::Ended);
        assert_eq!((ended.bytes_up, ended.bytes_down), (3, 4));
        assert_eq!(ended.policy.as_deref(), Some("p1"));
        assert_eq!(ended.reason, None);
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn each_identity_has_its_own_budget() {
        let r = Reports::default();
        let (tx, mut rx) = mpsc::channel(4 * REPORT_BURST as usize);
        r.tx.set(tx).unwrap();
        for _ in 0..2 * REPORT_BURST {
            r.refused(&"spiffe://t/agent/flood", "svc", "dial", Deny::NotGranted);
        }
        r.refused(&"spiffe://t/agent/other", "svc", "dial", Deny::NotGranted);
        assert_eq!(
            r.dropped.load(Ordering::Relaxed),
            u64::from(REPORT_BURST),
            "the excess of one identity is counted"
        );
        let mut from = HashMap::<String, u32>::new();
        while let Ok(d) = rx.try_recv() {
            *from.entry(d.identity).or_default() += 1;
        }
        assert!(from["spiffe://t/agent/flood"] <= REPORT_BURST + 1);
        assert_eq!(from["spiffe://t/agent/other"], 1);
    }

    #[test]
    fn budgets_are_bounded_and_full_ones_forgotten_first() {
        let mut b = Budgets::default();
        for i in 0..MAX_BUDGETS {
            assert!(b.take(&format!("id-{i}")));
        }
        // Every budget was just used (not full): a new identity finds no room.
        assert!(!b.take("one-more"));
        assert_eq!(b.buckets.len(), MAX_BUDGETS);
        // Once they have refilled they are forgotten to make room.
        b.epoch -= Duration::from_secs(1);
        assert!(b.take("one-more"));
        assert!(b.buckets.len() <= 2);
    }
}
