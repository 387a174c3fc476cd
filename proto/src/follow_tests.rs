//! The control follower in virtual time: every instant is `t0 + offset`, nothing sleeps.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use umbra_policies::{IdentityId, Timestamp};

use super::*;
use crate::control::{ChangeEvent, Delta, RevokedCert};
use crate::snapshot::SnapshotMessages;

const STALE: Duration = Duration::from_secs(15);

fn hello(epoch: &str) -> ControlMessage {
    ControlMessage::Hello {
        version: CONTROL_PROTOCOL_VERSION,
        epoch: epoch.into(),
    }
}

/// A snapshot of an empty state, as the controller sends it: begin, then end.
fn snapshot(epoch: &str, seq: u64) -> Vec<ControlMessage> {
    let replica = Replica {
        epoch: epoch.into(),
        seq,
        ..Default::default()
    };
    SnapshotMessages::new(replica).collect()
}

fn delta(seq: u64, last_in_commit: bool) -> ControlMessage {
    ControlMessage::Delta(Box::new(Delta {
        seq,
        at: Timestamp(seq),
        change: ChangeEvent::CertRevoked {
            cert: RevokedCert {
                serial: format!("{seq:x}"),
                identity: IdentityId::new("i1").unwrap(),
                not_after: Timestamp(u64::MAX),
            },
        },
        last_in_commit,
    }))
}

fn beat(seq: u64) -> ControlMessage {
    ControlMessage::Heartbeat { seq }
}

fn drain(f: &mut ControlFollower) -> Vec<Output> {
    std::iter::from_fn(|| f.poll()).collect()
}

/// Feeds one batch, as the shell does with the messages of one chunk.
fn batch(f: &mut ControlFollower, msgs: Vec<ControlMessage>, now: Instant) -> Vec<Output> {
    for m in msgs {
        f.handle(m, now).expect("accepted");
    }
    f.flush();
    drain(f)
}

/// A follower that has connected at `t0` and serves epoch "e1" at `seq`.
fn serving(t0: Instant, seq: u64) -> ControlFollower {
    let mut f = ControlFollower::new(STALE).unwrap();
    f.session_started(t0);
    let out = batch(
        &mut f,
        [vec![hello("e1")], snapshot("e1", seq), vec![beat(seq)]].concat(),
        t0,
    );
    assert_eq!(out, vec![Output::Publish]);
    f
}

/// Advances to `now`, as the shell's timer does.
fn tick(f: &mut ControlFollower, now: Instant) -> Vec<Output> {
    f.handle_timeout(now);
    drain(f)
}

#[test]
fn a_stale_window_below_the_minimum_is_refused_and_the_heartbeat_follows_the_window() {
    assert!(ControlFollower::new(Duration::from_millis(300)).is_err());
    assert!(ControlFollower::new(MIN_STALE_AFTER).is_ok());
    assert_eq!(heartbeat_for(Duration::from_secs(60)), DEFAULT_HEARTBEAT);
    assert_eq!(
        heartbeat_for(Duration::from_secs(8)),
        Duration::from_secs(2)
    );
    assert_eq!(heartbeat_for(MIN_STALE_AFTER), MIN_HEARTBEAT);
    // Whatever a router asks for, the controller stays within bounds.
    assert_eq!(granted_heartbeat(Some(1)), MIN_HEARTBEAT);
    assert_eq!(granted_heartbeat(Some(u64::MAX)), DEFAULT_HEARTBEAT);
    assert_eq!(granted_heartbeat(None), DEFAULT_HEARTBEAT);
    // Three heartbeats fit in the window: an idle router never withdraws between two.
    for secs in [1, 2, 5, 15, 60, 3600] {
        let stale = Duration::from_secs(secs);
        assert!(session_silence(heartbeat_for(stale)) <= stale, "{stale:?}");
    }
}

#[test]
fn nothing_is_enforced_before_the_first_copy() {
    let t0 = Instant::now();
    let mut f = ControlFollower::new(STALE).unwrap();
    assert!(f.is_stale());
    f.session_started(t0);
    assert_eq!(batch(&mut f, vec![hello("e1")], t0), vec![]);
    assert_eq!(f.resume_from(), None);
}

#[test]
fn a_slow_first_message_does_not_end_the_session() {
    let t0 = Instant::now();
    let mut f = ControlFollower::new(STALE).unwrap();
    f.session_started(t0);
    let first = t0 + session_silence(f.heartbeat()) - Duration::from_millis(1);
    assert_eq!(tick(&mut f, first), vec![]);
    let out = batch(
        &mut f,
        [vec![hello("e1")], snapshot("e1", 3), vec![beat(3)]].concat(),
        first,
    );
    assert_eq!(out, vec![Output::Publish]);
}

#[test]
fn a_session_that_hears_nothing_is_given_up_after_three_heartbeats() {
    let t0 = Instant::now();
    let mut f = serving(t0, 1);
    let limit = session_silence(f.heartbeat());
    assert_eq!(f.poll_timeout(), Some(t0 + limit));
    assert_eq!(
        tick(&mut f, t0 + limit),
        vec![Output::Close(SessionEnd::Silent(limit))]
    );
    // The policy stays until the stale window ends.
    assert!(!f.is_stale());
}

/// The reported defect: after an outage longer than the stale window, a new session's deadline
/// was computed from the old silence, so it ended before the controller's first message.
#[test]
fn a_router_that_failed_closed_serves_again_when_the_controller_returns() {
    let t0 = Instant::now();
    let mut f = serving(t0, 5);
    let silence = session_silence(f.heartbeat());
    assert!(matches!(tick(&mut f, t0 + silence)[..], [Output::Close(_)]));
    let mut now = t0 + silence;
    f.session_ended(&SessionEnd::Silent(silence), 0);
    // The controller is down for 22 s: every attempt fails at once.
    let mut withdrawn = false;
    while now < t0 + Duration::from_secs(22) {
        f.session_started(now);
        let pause = f.session_ended(&SessionEnd::Transport("refused".into()), 500);
        assert!(pause <= BACKOFF_MAX + BACKOFF_MAX / 4);
        now += pause;
        withdrawn |= tick(&mut f, now).contains(&Output::Withdraw);
    }
    assert!(withdrawn, "failed closed during the outage");
    assert!(f.is_stale());
    // It is back; its first message takes a while.
    f.session_started(now);
    let deadline = f.poll_timeout().expect("the session has a deadline");
    assert!(deadline > now, "a new session's deadline is in its future");
    now += Duration::from_secs(2);
    assert_eq!(tick(&mut f, now), vec![]);
    assert_eq!(f.resume_from(), Some(("e1", 5)));
    // Replayed changes are not enforced until the controller says that was all.
    assert_eq!(
        batch(&mut f, vec![hello("e1"), delta(6, true)], now),
        vec![]
    );
    assert_eq!(batch(&mut f, vec![beat(6)], now), vec![Output::Publish]);
    assert!(!f.is_stale());
}

#[test]
fn a_restarted_controller_with_a_new_epoch_sends_a_whole_new_copy() {
    let t0 = Instant::now();
    let mut f = serving(t0, 9);
    f.session_ended(&SessionEnd::Eof, 0);
    f.session_started(t0);
    assert_eq!(batch(&mut f, vec![hello("e2")], t0), vec![]);
    assert_eq!(f.resume_from(), None, "the old copy is dropped");
    let out = batch(&mut f, [snapshot("e2", 2), vec![beat(2)]].concat(), t0);
    assert_eq!(out, vec![Output::Publish]);
    assert_eq!(f.resume_from(), Some(("e2", 2)));
}

#[test]
fn a_gap_forces_a_snapshot_and_duplicates_are_ignored() {
    let t0 = Instant::now();
    let mut f = serving(t0, 4);
    assert_eq!(
        batch(&mut f, vec![delta(3, true), delta(4, true)], t0),
        vec![]
    );
    assert_eq!(f.resume_from(), Some(("e1", 4)));
    let e = f.handle(delta(6, true), t0).unwrap_err();
    assert!(matches!(e, SessionEnd::Gap(_)));
    f.session_ended(&e, 0);
    assert_eq!(f.resume_from(), None);
    // The enforced policy is not withdrawn by a gap: it is still the latest whole copy.
    assert!(!f.is_stale());
}

#[test]
fn a_delta_before_any_snapshot_or_a_message_before_hello_ends_the_session() {
    let t0 = Instant::now();
    let mut f = ControlFollower::new(STALE).unwrap();
    f.session_started(t0);
    assert!(f.handle(beat(1), t0).is_err());
    f.session_started(t0);
    f.handle(hello("e1"), t0).unwrap();
    assert_eq!(f.handle(delta(1, true), t0), Err(SessionEnd::NoBase));
    f.session_started(t0);
    let e = f
        .handle(
            ControlMessage::Hello {
                version: CONTROL_PROTOCOL_VERSION + 1,
                epoch: "e1".into(),
            },
            t0,
        )
        .unwrap_err();
    assert_eq!(e, SessionEnd::Version(CONTROL_PROTOCOL_VERSION + 1));
}

#[test]
fn only_whole_commits_are_published() {
    let t0 = Instant::now();
    let mut f = serving(t0, 1);
    assert_eq!(batch(&mut f, vec![delta(2, false)], t0), vec![]);
    assert_eq!(batch(&mut f, vec![delta(3, false)], t0), vec![]);
    assert_eq!(
        batch(&mut f, vec![delta(4, true)], t0),
        vec![Output::Publish]
    );
    // Several whole commits in one batch: one publication.
    let out = batch(&mut f, vec![delta(5, true), delta(6, true)], t0);
    assert_eq!(out, vec![Output::Publish]);
}

#[test]
fn a_renewal_reconnects_at_once_without_withdrawing() {
    let t0 = Instant::now();
    let mut f = serving(t0, 1);
    assert_eq!(f.session_ended(&SessionEnd::Renewed, 999), Duration::ZERO);
    assert!(!f.is_stale());
    f.session_started(t0);
    assert_eq!(batch(&mut f, vec![hello("e1"), beat(1)], t0), vec![]);
}

#[test]
fn heartbeats_keep_an_idle_router_serving() {
    let t0 = Instant::now();
    let mut f = serving(t0, 1);
    let hb = f.heartbeat();
    let mut now = t0;
    for _ in 0..100 {
        now += hb;
        assert_eq!(tick(&mut f, now), vec![]);
        assert_eq!(batch(&mut f, vec![beat(1)], now), vec![]);
    }
    assert!(!f.is_stale());
}

#[test]
fn retries_back_off_and_a_heard_session_resets_them() {
    let t0 = Instant::now();
    let mut f = ControlFollower::new(STALE).unwrap();
    let mut pauses = vec![];
    for _ in 0..10 {
        f.session_started(t0);
        pauses.push(f.session_ended(&SessionEnd::Transport("x".into()), 0));
    }
    assert_eq!(pauses[0], BACKOFF_MIN);
    assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(*pauses.last().unwrap(), BACKOFF_MAX);
    f.session_started(t0);
    f.handle(hello("e1"), t0).unwrap();
    assert_eq!(f.session_ended(&SessionEnd::Eof, 0), BACKOFF_MIN);
}

#[test]
fn a_watch_is_dead_after_three_silent_keepalives_and_refusals_clear_everything() {
    let t0 = Instant::now();
    let mut w = WatchFollower::new(DEFAULT_HEARTBEAT);
    assert_eq!(w.deadline(), None);
    w.started(t0);
    assert_eq!(w.deadline(), Some(t0 + Duration::from_secs(15)));
    w.bytes_received(t0 + Duration::from_secs(10));
    assert_eq!(w.deadline(), Some(t0 + Duration::from_secs(25)));
    // A failure keeps what is open and backs off; refusals clear.
    let a = w.ended(WatchEnd::Failed, 0);
    assert_eq!(
        a,
        WatchNext {
            clear: false,
            pause: BACKOFF_MIN
        }
    );
    assert_eq!(w.deadline(), None);
    let b = w.ended(WatchEnd::Failed, 0);
    assert!(b.pause > a.pause);
    let r = w.ended(WatchEnd::Refused, 999);
    assert!(r.clear && r.pause <= BACKOFF_MAX + BACKOFF_MAX / 4);
    for _ in 0..20 {
        assert!(w.ended(WatchEnd::Failed, 999).pause <= BACKOFF_MAX + BACKOFF_MAX / 4);
    }
    // The controller ending the watch on purpose: ask again at once, backoff reset.
    assert_eq!(
        w.ended(WatchEnd::Ended, 999),
        WatchNext {
            clear: false,
            pause: REWATCH
        }
    );
    assert_eq!(w.ended(WatchEnd::Failed, 0).pause, BACKOFF_MIN);
}

/// What the controller or the network can do next.
#[derive(Debug, Clone)]
enum Step {
    Wait(u64),
    Connect,
    Drop,
    Hello(bool),
    Deltas(u8, bool),
    Duplicate,
    Beat,
    Gap,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u64..20_000).prop_map(Step::Wait),
        Just(Step::Connect),
        Just(Step::Drop),
        any::<bool>().prop_map(Step::Hello),
        (1u8..4, any::<bool>()).prop_map(|(n, l)| Step::Deltas(n, l)),
        Just(Step::Duplicate),
        Just(Step::Beat),
        Just(Step::Gap),
    ]
}

/// The controller's history in the model: its epoch, and for each sequence number whether it
/// ends a commit.
struct History {
    epoch: u32,
    ends: Vec<bool>,
}

impl History {
    fn seq(&self) -> u64 {
        self.ends.len() as u64
    }
    fn whole(&self) -> bool {
        self.ends.last().copied().unwrap_or(true)
    }
    fn boundary(&self, seq: u64) -> bool {
        seq == 0 || self.ends.get(seq as usize - 1).copied().unwrap_or(false)
    }
    fn name(&self) -> String {
        format!("e{}", self.epoch)
    }
    /// What a controller sends a follower that resumes from `from`: Hello, the replay or a
    /// snapshot, then a heartbeat that says how far it is.
    fn greet(&mut self, from: Option<(&str, u64)>) -> Vec<ControlMessage> {
        if !self.whole() {
            // The command finished committing while the follower was away.
            self.ends.push(true);
        }
        let mut out = vec![hello(&self.name())];
        match from {
            Some((e, s)) if e == self.name() && s <= self.seq() => {
                for seq in s + 1..=self.seq() {
                    out.push(delta(seq, self.ends[seq as usize - 1]));
                }
            }
            _ => out.extend(snapshot(&self.name(), self.seq())),
        }
        out.push(beat(self.seq()));
        out
    }
}

proptest! {
    /// Whatever the controller and the network do: a policy is enforced only if a message was
    /// heard within the stale window and the copy is at a commit boundary of the controller's
    /// history; deadlines are never in the past; a controller that answers is served again.
    #[test]
    fn the_follower_fails_closed_and_recovers(steps in proptest::collection::vec(step(), 1..80)) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut f = ControlFollower::new(STALE).unwrap();
        let mut h = History { epoch: 1, ends: vec![] };
        let mut open = false;
        let mut enforced = false;
        let mut last_msg: Option<Instant> = None;
        for s in steps {
            let mut msgs = vec![];
            match s {
                Step::Wait(ms) => {
                    let until = now + Duration::from_millis(ms);
                    // The shell wakes at every deadline on the way.
                    while let Some(at) = f.poll_timeout().filter(|at| *at <= until) {
                        prop_assert!(at >= now, "a deadline in the past");
                        now = at;
                        f.handle_timeout(now);
                        while let Some(o) = f.poll() {
                            match o {
                                Output::Withdraw => enforced = false,
                                Output::Close(e) => { f.session_ended(&e, 0); open = false; }
                                Output::Publish => prop_assert!(false, "publish on a timer"),
                            }
                        }
                    }
                    now = until;
                }
                Step::Connect => { f.session_started(now); open = true; }
                Step::Drop if open => { f.session_ended(&SessionEnd::Eof, 0); open = false; }
                Step::Hello(new_epoch) if open => {
                    if new_epoch { h = History { epoch: h.epoch + 1, ends: vec![] }; }
                    let from = f.resume_from().map(|(e, s)| (e.to_owned(), s));
                    msgs = h.greet(from.as_ref().map(|(e, s)| (e.as_str(), *s)));
                }
                Step::Deltas(n, last) if open => {
                    for i in 0..n {
                        let end = i + 1 == n && last;
                        h.ends.push(end);
                        msgs.push(delta(h.seq(), end));
                    }
                }
                Step::Duplicate if open && h.seq() > 0 => msgs.push(delta(h.seq(), h.whole())),
                Step::Beat if open && h.whole() => msgs.push(beat(h.seq())),
                Step::Gap if open => {
                    h.ends.extend([true, true]);
                    msgs.push(delta(h.seq(), true));
                }
                _ => {}
            }
            let mut ended = None;
            for m in msgs {
                last_msg = Some(now);
                if let Err(e) = f.handle(m, now) { ended = Some(e); break; }
            }
            f.flush();
            while let Some(o) = f.poll() {
                match o {
                    Output::Publish => {
                        let r = f.replica().expect("a copy");
                        prop_assert_eq!(&r.epoch, &h.name());
                        prop_assert!(h.boundary(r.seq), "a half commit enforced");
                        enforced = true;
                    }
                    Output::Withdraw => enforced = false,
                    Output::Close(e) => { ended.get_or_insert(e); }
                }
            }
            if let Some(e) = ended {
                f.session_ended(&e, 0);
                open = false;
            }
            if enforced {
                let heard = last_msg.expect("heard before enforcing");
                prop_assert!(now.duration_since(heard) < STALE, "enforced past the stale window");
            }
        }
        // Liveness: a controller that answers serves again within one exchange.
        if open { f.session_ended(&SessionEnd::Eof, 0); }
        f.session_started(now);
        let from = f.resume_from().map(|(e, s)| (e.to_owned(), s));
        for m in h.greet(from.as_ref().map(|(e, s)| (e.as_str(), *s))) {
            f.handle(m, now).unwrap();
        }
        f.flush();
        prop_assert!(!f.is_stale());
        prop_assert_eq!(f.replica().map(|r| r.seq), Some(h.seq()));
    }
}

/// A snapshot replaces what is enforced only once it is complete: one interrupted by another
/// message, or short of what its end announced, ends the session and leaves the copy as it was.
#[test]
fn an_interrupted_or_incomplete_snapshot_changes_nothing() {
    let t0 = Instant::now();
    let mut f = serving(t0, 3);
    let mut r = Replica {
        epoch: "e1".into(),
        seq: 9,
        ..Default::default()
    };
    r.apply_change(&ChangeEvent::CertRevoked {
        cert: RevokedCert {
            serial: "ff".into(),
            identity: IdentityId::new("i1").unwrap(),
            not_after: Timestamp(u64::MAX),
        },
    });
    let msgs: Vec<ControlMessage> = SnapshotMessages::new(r).collect();
    assert_eq!(msgs.len(), 3, "begin, one chunk, end");

    for broken in [
        // A delta in the middle.
        vec![msgs[0].clone(), delta(4, true)],
        // A second beginning.
        vec![msgs[0].clone(), msgs[0].clone()],
        // The chunk lost.
        vec![msgs[0].clone(), msgs[2].clone()],
        // Parts without a beginning.
        vec![msgs[1].clone()],
        vec![msgs[2].clone()],
    ] {
        f.session_ended(&SessionEnd::Eof, 0);
        f.session_started(t0);
        f.handle(hello("e1"), t0).unwrap();
        let mut ended = None;
        for m in broken {
            if let Err(e) = f.handle(m, t0) {
                ended = Some(e);
                break;
            }
        }
        assert!(matches!(ended, Some(SessionEnd::Snapshot(_))), "{ended:?}");
        f.flush();
        assert_eq!(drain(&mut f), vec![]);
        assert_eq!(f.resume_from(), Some(("e1", 3)), "the copy is as it was");
    }
}

/// The shell learns exactly what changed since it last compiled: the whole copy after a
/// snapshot, the changes in order after deltas, and the whole copy again once there are more
/// changes than are worth applying one by one.
#[test]
fn the_shell_is_told_what_changed_since_it_last_compiled() {
    let t0 = Instant::now();
    let mut f = serving(t0, 3);
    assert_eq!(f.take_changes(), Changes::Rebuild, "a snapshot arrived");
    assert_eq!(f.take_changes(), Changes::Deltas(vec![]));
    let out = batch(&mut f, vec![delta(4, false), delta(5, true)], t0);
    assert_eq!(out, vec![Output::Publish]);
    let Changes::Deltas(list) = f.take_changes() else {
        panic!("deltas, not a rebuild")
    };
    let serials: Vec<String> = (list.iter())
        .map(|c| match c {
            ChangeEvent::CertRevoked { cert } => cert.serial.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(serials, ["4", "5"]);
    // A duplicate is not a change.
    let _ = batch(&mut f, vec![delta(5, true)], t0);
    assert_eq!(f.take_changes(), Changes::Deltas(vec![]));

    let many: Vec<ControlMessage> = (6..6 + MAX_PENDING_CHANGES as u64 + 1)
        .map(|s| delta(s, true))
        .collect();
    let _ = batch(&mut f, many, t0);
    assert_eq!(f.take_changes(), Changes::Rebuild);
    assert_eq!(f.take_changes(), Changes::Deltas(vec![]));
}
