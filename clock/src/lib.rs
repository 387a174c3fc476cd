//! Umbra's one source of wall-clock time.
//!
//! Every shell that needs the date (the controller signing certificates and checking tokens,
//! the SDK and routers deciding when to renew, the router admitting identities, the gateways
//! counting budget periods and stamping records) takes a [`Clock`] in its constructor or
//! configuration instead of calling `SystemTime::now` itself. Production passes
//! [`Clock::system`]; tests pass a [`ManualClock`] and move it, so expiry, renewal and budget
//! periods are tested without waiting for them.
//!
//! This crate only tells the time, and waits for a wall-clock time to come
//! ([`Clock::sleep_until`], for deadlines that are dates: a certificate's renewal or expiry).
//! It never decides anything with the time (that is `policies/`), and it is not for monotonic
//! timers: plain sleeps and timeouts stay tokio's, whose paused time already virtualizes them.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use umbra_policies::Timestamp;

/// The longest a wait for a wall-clock time sleeps before it reads the clock again, so that a
/// stepped clock or a suspended machine (whose monotonic timers stood still) delays a deadline
/// by at most this much.
pub const MAX_NAP: Duration = Duration::from_secs(60);

/// Where a component reads the wall-clock time. Cheap to clone; clones read the same source.
#[derive(Clone)]
pub struct Clock(Source);

#[derive(Clone)]
enum Source {
    /// The operating system's clock.
    System,
    /// The system clock moved by a fixed offset, in seconds.
    Shifted(i64),
    /// A time that moves only when a test moves it; the channel wakes those waiting for it.
    Manual(Arc<watch::Sender<SystemTime>>),
}

impl Clock {
    /// The operating system's clock: what every production component uses.
    pub fn system() -> Clock {
        Clock(Source::System)
    }

    /// The system clock run `offset_secs` seconds ahead of (or, if negative, behind) the real
    /// time, for a process that must disagree with its peers' clocks (a controller restarted
    /// "a month later" over the same store, say).
    pub fn shifted(offset_secs: i64) -> Clock {
        Clock(Source::Shifted(offset_secs))
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        match &self.0 {
            Source::System => SystemTime::now(),
            Source::Shifted(offset) => {
                let d = Duration::from_secs(offset.unsigned_abs());
                let now = SystemTime::now();
                if *offset >= 0 {
                    now + d
                } else {
                    now - d
                }
            }
            Source::Manual(t) => *t.borrow(),
        }
    }

    /// Waits until the clock shows `at` or later. On the system clock this sleeps (tokio's
    /// timer) and reads the clock again at least every [`MAX_NAP`]; on a manual clock it wakes
    /// when a test moves the time past `at`, however little real time went by.
    pub async fn sleep_until(&self, at: SystemTime) {
        match &self.0 {
            Source::System | Source::Shifted(_) => loop {
                let left = at.duration_since(self.now()).unwrap_or_default();
                if left.is_zero() {
                    return;
                }
                tokio::time::sleep(left.min(MAX_NAP)).await;
            },
            Source::Manual(t) => {
                let mut rx = t.subscribe();
                // Ends when the time shows `at`, or never if every handle to the clock is gone
                // (nothing could move it any more).
                if rx.wait_for(|now| *now >= at).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// The time since the Unix epoch, with sub-second precision (zero before the epoch).
    pub fn since_epoch(&self) -> Duration {
        self.now().duration_since(UNIX_EPOCH).unwrap_or_default()
    }

    /// The current time in whole seconds since the epoch, as the policy core takes it.
    pub fn timestamp(&self) -> Timestamp {
        to_timestamp(self.now())
    }
}

impl Default for Clock {
    /// The system clock.
    fn default() -> Clock {
        Clock::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Source::System => f.write_str("Clock::system"),
            Source::Shifted(s) => write!(f, "Clock::shifted({s})"),
            Source::Manual(_) => f.write_str("Clock::manual"),
        }
    }
}

/// A clock that stands still until it is moved: the handle a test keeps while the components
/// under test hold the [`Clock`] from [`ManualClock::clock`].
#[derive(Clone)]
pub struct ManualClock(Arc<watch::Sender<SystemTime>>);

impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: SystemTime) -> ManualClock {
        ManualClock(Arc::new(watch::Sender::new(start)))
    }

    /// A clock showing the real time now (so that certificates it dates are valid for peers
    /// on the system clock), frozen from then on.
    pub fn starting_now() -> ManualClock {
        ManualClock::new(SystemTime::now())
    }

    /// The [`Clock`] to hand to the components under test.
    pub fn clock(&self) -> Clock {
        Clock(Source::Manual(Arc::clone(&self.0)))
    }

    /// Moves the time forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.0.send_modify(|t| *t += d);
    }

    /// Sets the time, forward or back (a clock step, as NTP may make).
    pub fn set(&self, to: SystemTime) {
        self.0.send_replace(to);
    }

    /// The time it shows.
    pub fn now(&self) -> SystemTime {
        *self.0.borrow()
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ManualClock").field(&self.now()).finish()
    }
}

/// Whole seconds since the epoch (0 for times before it).
pub fn to_timestamp(t: SystemTime) -> Timestamp {
    Timestamp(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_moved_and_all_clones_see_it() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000);
        let m = ManualClock::new(start);
        let (a, b) = (m.clock(), m.clock().clone());
        assert_eq!(a.now(), start);
        m.advance(Duration::from_millis(1_500));
        assert_eq!(b.since_epoch(), Duration::from_millis(1_001_500));
        assert_eq!(a.timestamp(), Timestamp(1_001));
        m.set(start - Duration::from_secs(10));
        assert_eq!(a.timestamp(), Timestamp(990));
    }

    #[test]
    fn shifted_clocks_run_apart_from_the_system() {
        let real = Clock::system().timestamp().0;
        let ahead = Clock::shifted(3_600).timestamp().0;
        let behind = Clock::shifted(-3_600).timestamp().0;
        assert!((3_599..=3_601).contains(&(ahead - real)), "{ahead} {real}");
        assert!(
            (3_599..=3_601).contains(&(real - behind)),
            "{behind} {real}"
        );
    }

    #[tokio::test]
    async fn a_wait_on_a_manual_clock_ends_when_the_time_is_moved_past_it() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000);
        let m = ManualClock::new(start);
        let c = m.clock();
        let at = start + Duration::from_secs(3_600);
        let wait = tokio::spawn(async move { c.sleep_until(at).await });
        tokio::task::yield_now().await;
        m.advance(Duration::from_secs(3_599));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!wait.is_finished(), "a second early");
        m.advance(Duration::from_secs(1));
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("woken by the move, not by real time")
            .expect("no panic");
        // A time already past returns at once.
        m.clock().sleep_until(start).await;
    }

    #[tokio::test]
    async fn a_wait_on_the_system_clock_returns_for_a_past_time_and_sleeps_for_a_future_one() {
        Clock::system().sleep_until(UNIX_EPOCH).await;
        let later = SystemTime::now() + Duration::from_secs(3_600);
        let clock = Clock::system();
        let waited = tokio::time::timeout(Duration::from_millis(50), clock.sleep_until(later));
        assert!(waited.await.is_err(), "an hour away is not reached at once");
    }

    #[test]
    fn times_before_the_epoch_are_zero() {
        let m = ManualClock::new(UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(m.clock().timestamp(), Timestamp(0));
        assert_eq!(m.clock().since_epoch(), Duration::ZERO);
    }
}
