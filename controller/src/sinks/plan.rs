//! The sinks' decisions, sans I/O (time and randomness are arguments): how long to wait before
//! retrying a failed delivery, and when a sink has fallen so far behind that it must skip ahead.

use std::time::Duration;

use umbra_policies::Timestamp;

/// The first retry's delay.
pub const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// The longest delay between retries.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The delay before retry number `attempt` (0 for the first): exponential from
/// [`BACKOFF_BASE`], capped at [`BACKOFF_MAX`], scaled by `jitter` in `[0, 1)` into its upper
/// half ("equal jitter"), so that sinks failing together do not retry in step and a delay is
/// never shorter than half the nominal one.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let nominal = BACKOFF_BASE
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX);
    nominal.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// How far a sink may fall behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Undelivered events at most.
    pub max_events: u64,
    /// Age of the oldest undelivered event at most.
    pub max_age: Duration,
}

/// Whether a sink with `pending` undelivered events, the oldest stored at `oldest`, has gone
/// past its bounds at `now` and must skip ahead (and deliver a record of what it skipped
/// instead). Skipping is what keeps an outage bounded: the rows stay in the audit log, but the
/// sink never owes more than the bounds.
pub fn must_skip(bounds: Bounds, pending: u64, oldest: Timestamp, now: Timestamp) -> bool {
    pending > bounds.max_events || now.0.saturating_sub(oldest.0) > bounds.max_age.as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_jittered_within_bounds() {
        assert_eq!(backoff(0, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(0, 0.0), Duration::from_millis(100));
        assert_eq!(backoff(3, 1.0), Duration::from_millis(1600));
        assert_eq!(backoff(10, 1.0), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX, 1.0), BACKOFF_MAX);
        for a in 0..40 {
            for j in [0.0, 0.3, 0.999, -5.0, 7.0] {
                let d = backoff(a, j);
                assert!(d >= BACKOFF_BASE / 2 && d <= BACKOFF_MAX, "{a} {j} {d:?}");
            }
        }
    }

    #[test]
    fn skipping_happens_past_either_bound_only() {
        let b = Bounds {
            max_events: 100,
            max_age: Duration::from_secs(60),
        };
        let t = Timestamp(1_000_000);
        assert!(!must_skip(b, 100, t, t.plus(60)));
        assert!(must_skip(b, 101, t, t));
        assert!(must_skip(b, 1, t, t.plus(61)));
        // A clock that went backwards is no reason to skip.
        assert!(!must_skip(b, 1, t.plus(100), t));
    }
}
