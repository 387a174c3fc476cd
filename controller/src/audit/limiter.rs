//! Per-identity token buckets for reported audit events: a sans-IO state machine (`now` is an
//! argument).
//!
//! An identity may report [`Limits::event_burst`] events (and [`Limits::byte_burst`] bytes) at
//! once and [`Limits::events_per_sec`] (and [`Limits::bytes_per_sec`]) after that. What goes over
//! is not dropped silently: it is counted per identity and handed back by
//! [`Limiter::summaries`] as one summary a period, which the writer stores as one row.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The rates and bursts, per identity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Sustained events a second.
    pub events_per_sec: f64,
    /// Events at once.
    pub event_burst: f64,
    /// Sustained bytes a second (serialized event size).
    pub bytes_per_sec: f64,
    /// Bytes at once.
    pub byte_burst: f64,
}

impl Limits {
    /// 20 events and 32 KiB a second, bursts of 500 events and 512 KiB: well above what a
    /// sandbox's own event window lets through (50 names a second, summarized beyond), far below
    /// what fills a disk (40,000 rows in 4.4 s became about 600).
    pub const DEFAULT: Limits = Limits {
        events_per_sec: 20.0,
        event_burst: 500.0,
        bytes_per_sec: 32.0 * 1024.0,
        byte_burst: 512.0 * 1024.0,
    };
}

impl Limits {
    /// For routers' decision reports: a router reports every stream it decides, so 500
    /// decisions (and 256 KiB) a second sustained, bursts of 5,000 (and 2 MiB); past that its
    /// decisions are summarized like an agent's events.
    pub const ROUTERS: Limits = Limits {
        events_per_sec: 500.0,
        event_burst: 5000.0,
        bytes_per_sec: 256.0 * 1024.0,
        byte_burst: 2.0 * 1024.0 * 1024.0,
    };
}

/// Events held back for one identity since `since`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    /// The identity (its SPIFFE id).
    pub who: String,
    /// How many events.
    pub count: u64,
    /// Their serialized size.
    pub bytes: u64,
}

#[derive(Debug)]
struct Bucket {
    events: f64,
    bytes: f64,
    last: Instant,
    suppressed: u64,
    suppressed_bytes: u64,
    since: Option<Instant>,
}

impl Bucket {
    fn refill(&mut self, limits: &Limits, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.events = (self.events + dt * limits.events_per_sec).min(limits.event_burst);
        self.bytes = (self.bytes + dt * limits.bytes_per_sec).min(limits.byte_burst);
        self.last = self.last.max(now);
    }

    fn full(&self, limits: &Limits) -> bool {
        self.events >= limits.event_burst && self.bytes >= limits.byte_burst
    }
}

/// The buckets of every identity that reported recently.
#[derive(Debug)]
pub struct Limiter {
    limits: Limits,
    buckets: HashMap<String, Bucket>,
}

impl Limiter {
    /// No identity has reported yet.
    pub fn new(limits: Limits) -> Self {
        Limiter {
            limits,
            buckets: HashMap::new(),
        }
    }

    fn bucket(&mut self, who: &str, now: Instant) -> &mut Bucket {
        let limits = self.limits;
        let b = self
            .buckets
            .entry(who.to_owned())
            .or_insert_with(|| Bucket {
                events: limits.event_burst,
                bytes: limits.byte_burst,
                last: now,
                suppressed: 0,
                suppressed_bytes: 0,
                since: None,
            });
        b.refill(&limits, now);
        b
    }

    /// Decides for each event of `sizes` (serialized bytes) whether `who` may have it stored;
    /// those refused are counted as suppressed. Returns one decision per event.
    pub fn admit(&mut self, who: &str, sizes: &[usize], now: Instant) -> Vec<bool> {
        let b = self.bucket(who, now);
        sizes
            .iter()
            .map(|&size| {
                let size = size as f64;
                if b.events >= 1.0 && b.bytes >= size {
                    b.events -= 1.0;
                    b.bytes -= size;
                    true
                } else {
                    b.suppressed += 1;
                    b.suppressed_bytes += size as u64;
                    b.since.get_or_insert(now);
                    false
                }
            })
            .collect()
    }

    /// Counts events admitted by the buckets but not stored after all (the write queue was
    /// full), so that they too appear in the summary.
    pub fn suppress(&mut self, who: &str, count: u64, bytes: u64, now: Instant) {
        let b = self.bucket(who, now);
        b.suppressed += count;
        b.suppressed_bytes += bytes;
        b.since.get_or_insert(now);
    }

    /// The summaries whose first suppressed event is at least `period` old (all of them if
    /// `period` is zero), reset once returned; identities with full buckets and nothing to
    /// report are forgotten, so the map holds only identities that reported lately.
    pub fn summaries(&mut self, now: Instant, period: Duration) -> Vec<Suppressed> {
        let limits = self.limits;
        let mut out = Vec::new();
        self.buckets.retain(|who, b| {
            b.refill(&limits, now);
            if b.since
                .is_some_and(|s| now.saturating_duration_since(s) >= period)
            {
                out.push(Suppressed {
                    who: who.clone(),
                    count: b.suppressed,
                    bytes: b.suppressed_bytes,
                });
                b.suppressed = 0;
                b.suppressed_bytes = 0;
                b.since = None;
            }
            b.since.is_some() || !b.full(&limits)
        });
        out.sort_by(|a, b| a.who.cmp(&b.who));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        events_per_sec: 10.0,
        event_burst: 100.0,
        bytes_per_sec: 1000.0,
        byte_burst: 10_000.0,
    };

    #[test]
    fn a_burst_then_the_rate_and_the_rest_summarized() {
        let t0 = Instant::now();
        let mut l = Limiter::new(L);
        let ok = l.admit("a", &[10; 150], t0);
        assert_eq!(ok.iter().filter(|x| **x).count(), 100);
        // Another identity has its own bucket.
        assert!(l.admit("b", &[10; 5], t0).iter().all(|x| *x));
        // One second later: ten more.
        let ok = l.admit("a", &[10; 50], t0 + Duration::from_secs(1));
        assert_eq!(ok.iter().filter(|x| **x).count(), 10);
        // Not yet a period old.
        assert!(l
            .summaries(t0 + Duration::from_secs(1), Duration::from_secs(5))
            .is_empty());
        let s = l.summaries(t0 + Duration::from_secs(5), Duration::from_secs(5));
        assert_eq!(
            s,
            vec![Suppressed {
                who: "a".into(),
                count: 90,
                bytes: 900
            }]
        );
        // Reset once reported.
        assert!(l
            .summaries(t0 + Duration::from_secs(60), Duration::ZERO)
            .is_empty());
    }

    #[test]
    fn large_events_spend_the_byte_bucket() {
        let t0 = Instant::now();
        let mut l = Limiter::new(L);
        let ok = l.admit("a", &[2048; 10], t0);
        assert_eq!(ok.iter().filter(|x| **x).count(), 4);
        l.suppress("a", 3, 30, t0);
        let s = l.summaries(t0, Duration::ZERO);
        assert_eq!(s[0].count, 6 + 3);
        assert_eq!(s[0].bytes, 6 * 2048 + 30);
    }

    #[test]
    fn idle_identities_are_forgotten_and_time_never_runs_backwards() {
        let t0 = Instant::now();
        let mut l = Limiter::new(L);
        l.admit("a", &[10; 100], t0 + Duration::from_secs(10));
        // An earlier `now` refills nothing.
        assert!(!l.admit("a", &[10], t0)[0]);
        l.summaries(t0 + Duration::from_secs(10), Duration::ZERO);
        assert_eq!(l.buckets.len(), 1, "still refilling");
        l.summaries(t0 + Duration::from_secs(30), Duration::ZERO);
        assert!(l.buckets.is_empty());
    }
}
