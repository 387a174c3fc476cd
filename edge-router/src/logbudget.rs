//! A bound on the log lines peers can cause. Every stream and connection decision is recorded,
//! bounded per identity, in the controller's audit log (decision reports) and counted in the
//! metrics; the router's own log is for operators, and an agent opening 50,000 refused streams
//! a second must not turn it into 50,000 lines a second (disk, journald, log shipping).
//! Per-stream decisions are therefore logged at `debug`; refusals a peer causes at the
//! connection level and failures an operator should see (a service unreachable, a limit hit) go
//! through [`LogBudget`]: a few lines a second at their level, the rest at `debug`, and the
//! next line let through says how many were held back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use umbra_policies::{Bucket, Refill};

/// Lines a second let through at their own level, in bursts of [`BURST`].
const PER_SEC: u64 = 10;
/// The most lines let through at once.
const BURST: u64 = 20;

/// The router's budget of peer-caused log lines.
#[derive(Debug)]
pub(crate) struct LogBudget {
    start: Instant,
    bucket: Mutex<Bucket>,
    refill: Refill,
    held: AtomicU64,
}

impl Default for LogBudget {
    fn default() -> LogBudget {
        let refill = Refill::new(PER_SEC, Duration::from_secs(1), BURST)
            .unwrap_or_else(|| unreachable!("non-zero constants"));
        LogBudget {
            start: Instant::now(),
            bucket: Mutex::new(Bucket::full(&refill, Duration::ZERO)),
            refill,
            held: AtomicU64::new(0),
        }
    }
}

impl LogBudget {
    /// Whether a line may be logged at its level now: `Some(n)`, `n` being the lines held back
    /// since the last one let through (for the line to say), or `None` (log it at `debug`).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(self.start.elapsed())
    }

    fn admit_at(&self, now: Duration) -> Option<u64> {
        let taken = {
            let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            b.take(&self.refill, 1, now).is_ok()
        };
        if taken {
            Some(self.held.swap(0, Ordering::Relaxed))
        } else {
            self.held.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Logs at `$level` within the router's budget, else at `debug`; a line let through after
/// others were held back carries `held_back`.
macro_rules! budgeted {
    ($budget:expr, $level:ident, $($arg:tt)+) => {
        match $budget.admit() {
            Some(0) => tracing::$level!($($arg)+),
            Some(held_back) => tracing::$level!(held_back, $($arg)+),
            None => tracing::debug!($($arg)+),
        }
    };
}
pub(crate) use budgeted;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_gets_its_burst_then_the_rate_and_the_count_of_what_was_held() {
        let b = LogBudget::default();
        let t0 = Duration::from_secs(1);
        let let_through = (0..1000).filter(|_| b.admit_at(t0).is_some()).count();
        assert_eq!(let_through as u64, BURST);
        // A second later: the rate's worth, the first saying how many were held back.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.admit_at(t1), Some(1000 - BURST));
        let more = (0..1000).filter(|_| b.admit_at(t1).is_some()).count();
        assert_eq!(more as u64, PER_SEC - 1);
        // Quiet for long: the burst again, nothing held back since the last line let through
        // but the ones refused just now.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(b.admit_at(t2), Some(1000 - (PER_SEC - 1)));
        assert_eq!(b.admit_at(t2), Some(0));
    }
}
