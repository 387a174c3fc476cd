//! The router's control follower as a sans-IO state machine: messages, bytes and `now` in;
//! what to publish and the next deadline out (after quinn-proto's `Connection`).
//!
//! The shell (the edge router) owns the socket, the timer and the policy compiler; every
//! decision about sessions, staleness and when a copy may be enforced is made here, where it
//! is tested in virtual time across outages, restarts, epoch changes, gaps, duplicates and slow
//! first messages.
//!
//! Two clocks run independently. *Staleness* counts from the last message the controller sent
//! (heartbeats included): past `stale_after` the policy is withdrawn, because it may be missing
//! revocations. *Session liveness* counts from when this session opened or last carried a byte:
//! a session silent for three heartbeats is given up and a new one opened. A session's deadline
//! never starts from an earlier session's silence, so a follower that failed closed during an
//! outage serves again as soon as a controller is back and has replayed what was missed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::control::{ApplyError, ChangeEvent, ControlMessage, Replica, CONTROL_PROTOCOL_VERSION};
use crate::snapshot::{SnapshotAssembly, SnapshotError};

/// The heartbeat of a channel whose follower asks for none.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// The fastest heartbeat a controller sends, whatever a follower asks for: it bounds the work
/// one router can make the controller do on an idle channel.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(250);
/// The shortest stale window a router accepts: four of the fastest heartbeats, so an idle
/// router never flaps between heartbeats.
pub const MIN_STALE_AFTER: Duration = Duration::from_secs(1);
/// Heartbeats a session may miss before it is given up.
const SILENT_HEARTBEATS: u32 = 3;
/// First and largest pause between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A stale window shorter than [`MIN_STALE_AFTER`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a stale window of {0:?} is shorter than the {MIN_STALE_AFTER:?} minimum: the router would \
     stop serving between two heartbeats"
)]
pub struct StaleTooShort(pub Duration);

/// The heartbeat a follower with this stale window asks the controller for: a quarter of the
/// window (so three may be lost before the policy is withdrawn), between [`MIN_HEARTBEAT`] and
/// [`DEFAULT_HEARTBEAT`].
pub fn heartbeat_for(stale_after: Duration) -> Duration {
    (stale_after / 4).clamp(MIN_HEARTBEAT, DEFAULT_HEARTBEAT)
}

/// The heartbeat a controller grants a follower that asked for `asked_ms`.
pub fn granted_heartbeat(asked_ms: Option<u64>) -> Duration {
    asked_ms
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_HEARTBEAT)
        .clamp(MIN_HEARTBEAT, DEFAULT_HEARTBEAT)
}

/// How long a session may carry nothing before it is given up: three heartbeats.
pub fn session_silence(heartbeat: Duration) -> Duration {
    heartbeat * SILENT_HEARTBEATS
}

/// Why one control session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionEnd {
    /// The transport failed (connect, TLS, HTTP, framing); the text says how.
    #[error("{0}")]
    Transport(String),
    /// The controller speaks another protocol version.
    #[error("controller speaks control protocol {0}")]
    Version(u32),
    /// A delta did not follow the copy; the next session asks for a snapshot.
    #[error("{0}; resynchronizing")]
    Gap(#[from] ApplyError),
    /// A delta came before any snapshot; the next session asks for one.
    #[error("delta before any snapshot")]
    NoBase,
    /// A snapshot arrived out of order or incomplete; nothing of it was enforced.
    #[error("{0}")]
    Snapshot(#[from] SnapshotError),
    /// The controller closed the channel.
    #[error("the controller closed the channel")]
    Eof,
    /// Nothing arrived on this session for three heartbeats.
    #[error("no message for {0:?}")]
    Silent(Duration),
    /// The router's certificate was renewed: the next session presents the new one and resumes
    /// at once, from the same sequence number, without withdrawing anything.
    #[error("the router's certificate was renewed; reconnecting with the new one")]
    Renewed,
}

/// The most changes kept for the shell between two publications; past it the shell is told to
/// compile the copy afresh, which then costs less than applying them one by one.
pub const MAX_PENDING_CHANGES: usize = 65_536;

/// What changed in the copy since the shell last took it: the shell keeps its compiled policy
/// up to date by applying these, in order, instead of compiling the whole copy again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// These changes, in order, since the last time (empty: nothing, or only sequence numbers).
    Deltas(Vec<ChangeEvent>),
    /// A new copy (a snapshot, another history, or more changes than are worth applying):
    /// compile [`ControlFollower::replica`] from scratch.
    Rebuild,
}

impl Default for Changes {
    fn default() -> Self {
        Changes::Deltas(Vec::new())
    }
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Compile [`ControlFollower::replica`] and enforce it: it holds whole commits only and the
    /// controller was heard within the stale window.
    Publish,
    /// Stop enforcing any policy (refuse everything) until the next `Publish`.
    Withdraw,
    /// End the current session (the shell drops its stream), then call
    /// [`ControlFollower::session_ended`] with this reason.
    Close(SessionEnd),
}

/// One open (or opening) session.
#[derive(Debug)]
struct Session {
    /// When the session opened or last carried a byte.
    live_at: Instant,
    /// The controller's Hello has been read on this session.
    after_hello: bool,
    /// Something was applied that is not yet published.
    changed: bool,
    /// The last delta applied was not the last of its commit.
    mid_commit: bool,
    /// Whether [`Output::Close`] was already emitted for it.
    closing: bool,
    /// A snapshot being received; what is enforced changes only when it is complete.
    snapshot: Option<SnapshotAssembly>,
}

/// The router's follower of `GET /v1/control`.
#[derive(Debug)]
pub struct ControlFollower {
    stale_after: Duration,
    heartbeat: Duration,
    /// The exact copy, once a snapshot arrived; `None` makes the next session ask for one.
    replica: Option<Replica>,
    /// What changed in the copy since the shell last took [`ControlFollower::take_changes`].
    changes: Changes,
    /// When the controller last sent a message; `None` before the first.
    last_heard: Option<Instant>,
    /// Whether nothing is enforced: at start, and after `stale_after` of silence.
    stale: bool,
    session: Option<Session>,
    /// Consecutive sessions that ended without hearing anything.
    failures: u32,
    outputs: VecDeque<Output>,
}

impl ControlFollower {
    /// A follower that enforces nothing until it has a copy from a live controller.
    pub fn new(stale_after: Duration) -> Result<ControlFollower, StaleTooShort> {
        if stale_after < MIN_STALE_AFTER {
            return Err(StaleTooShort(stale_after));
        }
        Ok(ControlFollower {
            stale_after,
            heartbeat: heartbeat_for(stale_after),
            replica: None,
            changes: Changes::Rebuild,
            last_heard: None,
            stale: true,
            session: None,
            failures: 0,
            outputs: VecDeque::new(),
        })
    }

    /// The heartbeat to ask the controller for.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// The copy being followed, once a snapshot arrived.
    pub fn replica(&self) -> Option<&Replica> {
        self.replica.as_ref()
    }

    /// The copy, for pruning before it is compiled.
    pub fn replica_mut(&mut self) -> Option<&mut Replica> {
        self.replica.as_mut()
    }

    /// What changed in the copy since the last call (the first call says [`Changes::Rebuild`]).
    /// The shell calls it on each [`Output::Publish`] and applies the result to what it last
    /// compiled, which then equals a compilation of [`ControlFollower::replica`].
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Where the next session resumes: the epoch and last applied sequence, or `None` to ask for
    /// a snapshot.
    pub fn resume_from(&self) -> Option<(&str, u64)> {
        self.replica.as_ref().map(|r| (r.epoch.as_str(), r.seq))
    }

    /// Whether nothing is enforced now.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// A session is being opened (connect, TLS, request); its silence counts from now, never
    /// from an earlier session's.
    pub fn session_started(&mut self, now: Instant) {
        self.session = Some(Session {
            live_at: now,
            after_hello: false,
            changed: false,
            mid_commit: false,
            closing: false,
            snapshot: None,
        });
    }

    /// Bytes arrived on the session (perhaps part of a large snapshot): it is alive, though
    /// the controller is not "heard" until a whole message arrives.
    pub fn bytes_received(&mut self, now: Instant) {
        if let Some(s) = &mut self.session {
            s.live_at = now;
        }
    }

    /// One message from the controller. An error ends the session: the shell must stop reading
    /// it and call [`session_ended`](Self::session_ended).
    pub fn handle(&mut self, msg: ControlMessage, now: Instant) -> Result<(), SessionEnd> {
        let Some(session) = self.session.as_mut() else {
            return Err(SessionEnd::Transport("no session".into()));
        };
        session.live_at = now;
        self.last_heard = Some(now);
        self.failures = 0;
        let caught_up = match msg {
            ControlMessage::Hello { version, epoch } => {
                if version != CONTROL_PROTOCOL_VERSION {
                    return Err(SessionEnd::Version(version));
                }
                if self.replica.as_ref().is_some_and(|r| r.epoch != epoch) {
                    // Another history: our copy means nothing; a snapshot follows.
                    self.replica = None;
                }
                session.after_hello = true;
                return Ok(());
            }
            _ if !session.after_hello => {
                return Err(SessionEnd::Transport("a message before Hello".into()))
            }
            ControlMessage::SnapshotBegin { epoch, seq } => {
                if session.snapshot.is_some() {
                    return Err(SnapshotError::Interrupted.into());
                }
                session.snapshot = Some(SnapshotAssembly::begin(epoch, seq));
                return Ok(());
            }
            ControlMessage::SnapshotChunk(chunk) => {
                let assembly = session.snapshot.as_mut().ok_or(SnapshotError::NotBegun)?;
                assembly.push(*chunk)?;
                return Ok(());
            }
            ControlMessage::SnapshotEnd(counts) => {
                let assembly = session.snapshot.take().ok_or(SnapshotError::NotBegun)?;
                self.replica = Some(assembly.finish(counts)?);
                self.changes = Changes::Rebuild;
                session.mid_commit = false;
                session.changed = true;
                true
            }
            _ if session.snapshot.is_some() => return Err(SnapshotError::Interrupted.into()),
            ControlMessage::Delta(d) => {
                let Some(r) = self.replica.as_mut() else {
                    return Err(SessionEnd::NoBase);
                };
                if d.seq <= r.seq {
                    // A duplicate of what we hold.
                    return Ok(());
                }
                r.apply(&d)?;
                if let Changes::Deltas(list) = &mut self.changes {
                    if list.len() < MAX_PENDING_CHANGES {
                        list.push(d.change);
                    } else {
                        self.changes = Changes::Rebuild;
                    }
                }
                session.mid_commit = !d.last_in_commit;
                session.changed = true;
                // Deltas replayed on resume are followed by a heartbeat that says how far the
                // controller is; until then a stale copy is not yet known to be complete.
                !self.stale
            }
            ControlMessage::Heartbeat { seq } => {
                // The controller has sent everything up to `seq`: a copy at `seq` is current.
                self.replica.as_ref().is_some_and(|r| r.seq >= seq)
            }
        };
        if caught_up && self.stale && self.replica.is_some() {
            self.stale = false;
            session.changed = true;
        }
        Ok(())
    }

    /// Call after the messages that arrived together have been handled: a copy that holds whole
    /// commits only and is fresh is published once per batch, not once per message.
    pub fn flush(&mut self) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if s.changed && !self.stale && !s.mid_commit && self.replica.is_some() {
            s.changed = false;
            self.outputs.push_back(Output::Publish);
        }
    }

    /// The session ended; returns how long to wait before the next one (`jitter` in 0..1000
    /// spreads many routers' retries, so they do not reconnect in lockstep).
    pub fn session_ended(&mut self, end: &SessionEnd, jitter: u16) -> Duration {
        let heard = self.session.take().is_some_and(|s| s.after_hello);
        match end {
            SessionEnd::Gap(_) | SessionEnd::NoBase => self.replica = None,
            SessionEnd::Renewed => return Duration::ZERO,
            _ => {}
        }
        if !heard {
            self.failures = self.failures.saturating_add(1);
        }
        let base = BACKOFF_MIN
            .saturating_mul(1 << self.failures.saturating_sub(1).min(8))
            .min(BACKOFF_MAX);
        base + base.mul_f64(f64::from(jitter.min(999)) / 4000.0)
    }

    /// The next instant at which [`handle_timeout`](Self::handle_timeout) must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let stale_at = match (self.stale, self.last_heard) {
            (false, Some(at)) => Some(at + self.stale_after),
            _ => None,
        };
        let silent_at = self
            .session
            .as_ref()
            .filter(|s| !s.closing)
            .map(|s| s.live_at + session_silence(self.heartbeat));
        match (stale_at, silent_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Time has passed: withdraws a policy not confirmed within the stale window, and gives up
    /// a session that has been silent too long.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.stale
            && self
                .last_heard
                .is_some_and(|at| now >= at + self.stale_after)
        {
            self.stale = true;
            self.outputs.push_back(Output::Withdraw);
        }
        let limit = session_silence(self.heartbeat);
        if let Some(s) = &mut self.session {
            if !s.closing && now >= s.live_at + limit {
                s.closing = true;
                self.outputs
                    .push_back(Output::Close(SessionEnd::Silent(limit)));
            }
        }
    }

    /// The next thing the shell must do.
    pub fn poll(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }
}

/// How a watch of an identity's view ended (`/v1/edge/watch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// The controller refused the identity (revoked, disabled, deleted): nothing may stay.
    Refused,
    /// The controller ended the watch itself, which it does when the identity's own access
    /// changes: ask again at once, so that a refusal is known within one handshake.
    Ended,
    /// The transport failed or fell silent: keep what is open (routers still authorize every
    /// stream) and reconnect with backoff.
    Failed,
}

/// What to do after a watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchNext {
    /// Close everything the view opened.
    pub clear: bool,
    /// Wait this long before watching again.
    pub pause: Duration,
}

/// The tunneler's (and any SDK watcher's) follower of its identity's view: when a watch is
/// taken for dead, and what to do when it ends. Sans-IO like [`ControlFollower`].
#[derive(Debug)]
pub struct WatchFollower {
    silence: Duration,
    /// When the current watch opened or last carried a byte.
    live_at: Option<Instant>,
    failures: u32,
}

/// The pause after a watch the controller ended on purpose.
const REWATCH: Duration = Duration::from_millis(10);

impl WatchFollower {
    /// A follower of a watch that carries a keepalive every `heartbeat`.
    pub fn new(heartbeat: Duration) -> WatchFollower {
        WatchFollower {
            silence: session_silence(heartbeat),
            live_at: None,
            failures: 0,
        }
    }

    /// A watch is being opened; its silence counts from now.
    pub fn started(&mut self, now: Instant) {
        self.live_at = Some(now);
    }

    /// Bytes (a view or a keepalive) arrived.
    pub fn bytes_received(&mut self, now: Instant) {
        self.live_at = Some(now);
        self.failures = 0;
    }

    /// When the current watch is taken for dead if nothing arrives.
    pub fn deadline(&self) -> Option<Instant> {
        self.live_at.map(|at| at + self.silence)
    }

    /// How long the watch may stay silent.
    pub fn silence(&self) -> Duration {
        self.silence
    }

    /// The watch ended; what to do next (`jitter` in 0..1000).
    pub fn ended(&mut self, end: WatchEnd, jitter: u16) -> WatchNext {
        self.live_at = None;
        if end == WatchEnd::Ended {
            self.failures = 0;
            return WatchNext {
                clear: false,
                pause: REWATCH,
            };
        }
        self.failures = self.failures.saturating_add(1);
        let base = BACKOFF_MIN
            .saturating_mul(1 << self.failures.saturating_sub(1).min(8))
            .min(BACKOFF_MAX);
        WatchNext {
            clear: end == WatchEnd::Refused,
            pause: base + base.mul_f64(f64::from(jitter.min(999)) / 4000.0),
        }
    }
}

#[cfg(test)]
#[path = "follow_tests.rs"]
mod tests;
