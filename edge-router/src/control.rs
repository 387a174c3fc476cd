//! The control follower: keeps an exact [`Replica`] of the controller's state over
//! `GET /v1/control` and publishes a compiled [`Policy`] after every batch of changes.
//!
//! The controller pushes; the router never polls. After a disconnect the follower resumes from
//! its epoch and sequence number, so a revocation committed while it was away still arrives
//! before anything newer. With several controllers (on one database, so one epoch and one
//! sequence) the next session goes to another controller first when this one's stream failed
//! or fell silent (the client's rotation), and resumes there from the same sequence; the pause
//! after a session that was up is the follower's shortest backoff (100 ms), and a connection
//! attempt walks every address, a dead one costing at most about a second. If it hears nothing (heartbeats included) for `stale_after`, it
//! publishes `None`: the router then refuses everything rather than enforce a policy that may
//! be missing revocations.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use umbra_proto::follow::{ControlFollower, Output, SessionEnd};
use umbra_proto::{ControlMessage, FrameDecoder, MAX_CONTROL_FRAME};
use umbra_sdk::{ControllerClient, Credentials};

use crate::publish::Publisher;

/// Follows the controller until `cancel` fires.
pub(crate) struct Follower {
    /// Presents the router's newest certificate on each connection.
    pub client: ControllerClient,
    /// The router's certificate renewals: each one ends the session, so that the channel is
    /// always authenticated by a certificate that is still valid. The next session resumes
    /// from the same sequence number, so nothing is missed and the policy is not withdrawn.
    pub renewed: watch::Receiver<Arc<Credentials>>,
    pub advertise: String,
    /// Every decision: sessions, staleness, when a copy may be enforced.
    pub machine: ControlFollower,
    /// Turns the machine's batches into enforced policies.
    pub publisher: Publisher,
    pub cancel: CancellationToken,
    /// Contact and announced sequence numbers, for the lag and staleness gauges.
    pub metrics: crate::metrics::Metrics,
}

impl Follower {
    pub async fn run(self) {
        let span = tracing::info_span!("control", controllers = %self.client.addrs().join(","));
        self.run_inner().instrument(span).await
    }

    async fn run_inner(mut self) {
        let cancel = self.cancel.clone();
        loop {
            self.machine.session_started(Instant::now().into_std());
            let end = tokio::select! {
                _ = cancel.cancelled() => return,
                end = self.session() => end,
            };
            let pause = self.machine.session_ended(&end, jitter());
            if end == SessionEnd::Renewed {
                tracing::info!("{end}");
                continue;
            }
            tracing::warn!(reason = %end, retry_in = ?pause, "control channel down");
            // Wait out the pause, waking for the stale deadline on the way.
            let until = Instant::now() + pause;
            loop {
                let wake = self
                    .machine
                    .poll_timeout()
                    .map_or(until, |at| Instant::from_std(at).min(until));
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep_until(wake) => {}
                    built = self.publisher.built() => {
                        self.publisher.finished(built, &mut self.machine);
                        continue;
                    }
                }
                let now = Instant::now();
                self.machine.handle_timeout(now.into_std());
                // Between sessions only withdrawals can come out.
                let _ = drain(&mut self.machine, &mut self.publisher);
                if now >= until {
                    break;
                }
            }
        }
    }

    fn path(&self) -> String {
        let mut path = format!(
            "/v1/control?advertise={}&heartbeat_ms={}",
            encode(&self.advertise),
            self.machine.heartbeat().as_millis()
        );
        if let Some((epoch, seq)) = self.machine.resume_from() {
            path.push_str(&format!("&epoch={}&seq={seq}", encode(epoch)));
        }
        path
    }

    async fn session(&mut self) -> SessionEnd {
        // A renewal before this session is already in the certificate it presents.
        self.renewed.borrow_and_update();
        let path = self.path();
        let connect = self.client.stream(&path);
        tokio::pin!(connect);
        let mut stream = loop {
            tokio::select! {
                r = &mut connect => match r {
                    Ok(s) => break s,
                    Err(e) => return SessionEnd::Transport(e.to_string()),
                },
                _ = sleep_until(self.machine.poll_timeout()) => {
                    self.machine.handle_timeout(Instant::now().into_std());
                    if let Some(end) = drain(&mut self.machine, &mut self.publisher) {
                        return end;
                    }
                }
                built = self.publisher.built() => self.publisher.finished(built, &mut self.machine),
            }
        };
        tracing::info!(controller = %stream.addr(), "control channel open");
        let mut decoder = FrameDecoder::new(MAX_CONTROL_FRAME);
        loop {
            let chunk = tokio::select! {
                c = stream.chunk() => c,
                // An error would mean that nothing renews any more: the branch is then
                // disabled and the session lasts as long as it can.
                Ok(()) = self.renewed.changed() => return SessionEnd::Renewed,
                _ = sleep_until(self.machine.poll_timeout()) => {
                    self.machine.handle_timeout(Instant::now().into_std());
                    match drain(&mut self.machine, &mut self.publisher) {
                        Some(end) => {
                            if matches!(end, SessionEnd::Silent(_)) {
                                // A half-open connection: the next session tries another
                                // controller first, if there is one.
                                stream.mark_dead();
                            }
                            return end;
                        }
                        None => continue,
                    }
                }
                built = self.publisher.built() => {
                    self.publisher.finished(built, &mut self.machine);
                    continue;
                }
            };
            let chunk = match chunk {
                Ok(Some(c)) => c,
                Ok(None) => return SessionEnd::Eof,
                Err(e) => return SessionEnd::Transport(e.to_string()),
            };
            let now = Instant::now().into_std();
            self.machine.bytes_received(now);
            decoder.push(&chunk);
            // Apply everything that has arrived, then publish once.
            loop {
                let msg = match decoder.next::<ControlMessage>() {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => return SessionEnd::Transport(e.to_string()),
                };
                self.metrics.heard(now, &msg);
                if let Err(end) = self.machine.handle(msg, now) {
                    return end;
                }
            }
            self.machine.flush();
            if let Some(end) = drain(&mut self.machine, &mut self.publisher) {
                return end;
            }
        }
    }
}

/// Carries out what the machine asks; returns the reason to end the session, if any.
fn drain(machine: &mut ControlFollower, publisher: &mut Publisher) -> Option<SessionEnd> {
    let mut end = None;
    while let Some(out) = machine.poll() {
        match out {
            Output::Publish => publisher.publish(machine),
            Output::Withdraw => publisher.withdraw(),
            Output::Close(e) => {
                end.get_or_insert(e);
            }
        }
    }
    end
}

/// Waits until `at`; never resolves without one.
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// A number in 0..1000 that differs between routers and attempts, so that many routers
/// restarting together do not reconnect in lockstep.
fn jitter() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    let r = RandomState::new().hash_one(std::time::Instant::now());
    (r % 1000) as u16
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
