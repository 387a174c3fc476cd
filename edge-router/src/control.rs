//! The control follower: keeps an exact [`Replica`] of the controller's state over
//! `GET /v1/control` and publishes a compiled [`Policy`] after every batch of changes.
//!
//! The controller pushes; the router never polls. After a disconnect the follower resumes from
//! its epoch and sequence number, so a revocation committed while it was away still arrives
//! before anything newer. If it hears nothing (heartbeats included) for `stale_after`, it
//! publishes `None`: the router then refuses everything rather than enforce a policy that may
//! be missing revocations.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use umbra_proto::{
    ControlMessage, FrameDecoder, Replica, CONTROL_PROTOCOL_VERSION, MAX_CONTROL_FRAME,
};
use umbra_sdk::{ControllerClient, Credentials};

use crate::policy::Policy;

/// First and largest pause between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Follows the controller until `cancel` fires.
pub(crate) struct Follower {
    /// Presents the router's newest certificate on each connection.
    pub client: ControllerClient,
    /// The router's certificate renewals: each one ends the session, so that the channel is
    /// always authenticated by a certificate that is still valid. The next session resumes
    /// from the same sequence number, so nothing is missed and the policy is not withdrawn.
    pub renewed: watch::Receiver<Arc<Credentials>>,
    pub advertise: String,
    pub stale_after: Duration,
    pub tx: watch::Sender<Option<Arc<Policy>>>,
    pub cancel: CancellationToken,
}

/// Why one control-channel session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("{0}")]
    Sdk(#[from] umbra_sdk::SdkError),
    #[error("{0}")]
    Frame(#[from] umbra_proto::FrameError),
    #[error("controller speaks control protocol {0}")]
    Version(u32),
    #[error("{0}; resynchronizing")]
    Gap(#[from] umbra_proto::ApplyError),
    #[error("delta before any snapshot")]
    NoBase,
    #[error("the controller closed the channel")]
    Eof,
    #[error("no message for {0:?}")]
    Silent(Duration),
    #[error("the router's certificate was renewed; reconnecting with the new one")]
    Renewed,
}

/// What the follower knows between sessions.
struct Local {
    /// The exact copy, once a snapshot arrived; `None` forces the next session to ask for one.
    replica: Option<Replica>,
    /// When the controller last said anything (heartbeats included).
    last_heard: Instant,
    /// Whether the published policy is withdrawn (`None`): at start, and after `stale_after`
    /// of silence. It is republished only once the controller is heard again after a Hello.
    stale: bool,
}

impl Follower {
    pub async fn run(self) {
        let span = tracing::info_span!("control", controller = %self.client.addr());
        self.run_inner().instrument(span).await
    }

    async fn run_inner(mut self) {
        let cancel = self.cancel.clone();
        let mut local = Local {
            replica: None,
            last_heard: Instant::now(),
            stale: true,
        };
        let mut backoff = BACKOFF_MIN;
        loop {
            let heard_before = local.last_heard;
            let session = self.session(&mut local);
            let end = tokio::select! {
                _ = cancel.cancelled() => return,
                end = session => end,
            };
            match &end {
                SessionEnd::Gap(_) | SessionEnd::NoBase => local.replica = None,
                SessionEnd::Renewed => {
                    tracing::info!("{end}");
                    continue;
                }
                _ => {}
            }
            if local.last_heard > heard_before {
                // The session worked for a while: this is a fresh failure, retry soon.
                backoff = BACKOFF_MIN;
            }
            let pause = jittered(backoff);
            tracing::warn!(reason = %end, retry_in = ?pause, "control channel down");
            let wait = tokio::time::sleep(pause);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = wait => {}
            }
            self.check_stale(&mut local);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn check_stale(&self, local: &mut Local) {
        if !local.stale && local.last_heard.elapsed() >= self.stale_after {
            local.stale = true;
            self.tx.send_replace(None);
            tracing::error!(silent_for = ?local.last_heard.elapsed(), "no word from the controller: failing closed");
        }
    }

    fn path(&self, local: &Local) -> String {
        let mut path = format!("/v1/control?advertise={}", encode(&self.advertise));
        if let Some(r) = &local.replica {
            path.push_str(&format!("&epoch={}&seq={}", encode(&r.epoch), r.seq));
        }
        path
    }

    async fn session(&mut self, local: &mut Local) -> SessionEnd {
        // A renewal before this session is already in the certificate it presents.
        self.renewed.borrow_and_update();
        let path = self.path(local);
        let connect = self.client.stream(&path);
        let mut stream = match tokio::time::timeout(self.stale_after, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return e.into(),
            Err(_) => return SessionEnd::Silent(self.stale_after),
        };
        tracing::info!(controller = %self.client.addr(), "control channel open");
        let mut decoder = FrameDecoder::new(MAX_CONTROL_FRAME);
        // While stale, the policy is republished only after the first message that follows
        // the Hello, i.e. once the controller has started replaying what we missed.
        let mut after_hello = false;
        // Something was applied that is not yet published; a commit is half applied.
        let mut changed = false;
        let mut mid_commit = false;
        loop {
            let deadline = local.last_heard + self.stale_after;
            let chunk = tokio::select! {
                c = stream.chunk() => c,
                // An error would mean that nothing renews any more: the branch is then
                // disabled and the session lasts as long as it can.
                Ok(()) = self.renewed.changed() => return SessionEnd::Renewed,
                _ = tokio::time::sleep_until(deadline) => {
                    self.check_stale(local);
                    return SessionEnd::Silent(self.stale_after);
                }
            };
            let chunk = match chunk {
                Ok(Some(c)) => c,
                Ok(None) => return SessionEnd::Eof,
                Err(e) => return e.into(),
            };
            decoder.push(&chunk);
            // Apply everything that has arrived, then rebuild once.
            loop {
                let msg = match decoder.next::<ControlMessage>() {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => return e.into(),
                };
                local.last_heard = Instant::now();
                match msg {
                    ControlMessage::Hello { version, epoch } => {
                        if version != CONTROL_PROTOCOL_VERSION {
                            return SessionEnd::Version(version);
                        }
                        if local.replica.as_ref().is_some_and(|r| r.epoch != epoch) {
                            // Another history: our copy means nothing; a snapshot follows.
                            local.replica = None;
                        }
                        after_hello = true;
                        continue;
                    }
                    ControlMessage::Snapshot(s) => {
                        local.replica = Some(Replica::from_snapshot(*s));
                        mid_commit = false;
                        changed = true;
                    }
                    ControlMessage::Delta(d) => {
                        let Some(r) = local.replica.as_mut() else {
                            return SessionEnd::NoBase;
                        };
                        if d.seq <= r.seq {
                            continue;
                        }
                        if let Err(e) = r.apply(&d) {
                            return e.into();
                        }
                        mid_commit = !d.last_in_commit;
                        changed = true;
                    }
                    ControlMessage::Heartbeat { .. } => {}
                }
                if after_hello && local.stale && local.replica.is_some() {
                    local.stale = false;
                    changed = true;
                    tracing::info!("controller heard: serving policy");
                }
            }
            // Only whole commits are enforced: a command's later changes may be what makes its
            // earlier ones safe (an apply that moves a role and deletes a policy).
            if changed && !local.stale && !mid_commit {
                if let Some(r) = &mut local.replica {
                    r.prune_revoked(crate::policy::now());
                    let policy = Policy::build(r.clone());
                    tracing::debug!(seq = policy.replica.seq, "policy published");
                    self.tx.send_replace(Some(Arc::new(policy)));
                    changed = false;
                }
            }
        }
    }
}

/// `base` plus up to a quarter more, so that many routers restarting together do not reconnect
/// in lockstep.
fn jittered(base: Duration) -> Duration {
    use std::hash::{BuildHasher, RandomState};
    let r = RandomState::new().hash_one(Instant::now().elapsed().as_nanos()) % 1000;
    base + base.mul_f64(r as f64 / 4000.0)
}

/// Percent-encodes a query value (everything but unreserved characters).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn encodes_query_values() {
        assert_eq!(super::encode("[::1]:443"), "%5B%3A%3A1%5D%3A443");
        assert_eq!(super::encode("a-b.c_d~1"), "a-b.c_d~1");
    }
}
