//! The decisions behind a grant's `connections`, `rate` and `bandwidth` limits: token buckets
//! and the book one identity keeps per grant on a router, with the time as an argument.
//!
//! A router keeps one [`GrantBook`] per (identity, service, policy) and asks [`admit_stream`]
//! for each new stream; the book says whether the grant has room (a free stream slot and a
//! token) and the router holds the slot until the stream ends. Bandwidth is a [`Bucket`] the
//! router charges with every chunk it moves ([`Bucket::charge`]) and waits on
//! ([`Bucket::ready_at`]) before moving more: streams are slowed down, never cut.
//!
//! Time is a [`Duration`] since any fixed instant the caller picks (a router uses its start),
//! so that the buckets are tested in virtual time. Integer arithmetic throughout: one token is
//! `period` units of a bucket's level and every nanosecond adds `per` units, so nothing is
//! lost to rounding and a bucket never admits more than `burst + per × elapsed / period`.

use std::time::Duration;

use crate::{Bandwidth, Rate, Throughput};

/// The least burst a bandwidth bucket has: one full read of the router's splice, so that a
/// small limit still moves whole chunks.
const MIN_BANDWIDTH_BURST: u64 = 64 * 1024;

/// How a bucket fills: `per` tokens every `period`, holding at most `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refill {
    per: u64,
    period_ns: u64,
    burst: u64,
}

impl Refill {
    /// `per` tokens every `period`, at most `burst` held. `None` for a zero `per`, `burst` or
    /// `period` (a bucket that never fills is a revoked grant, not a limit).
    pub fn new(per: u64, period: Duration, burst: u64) -> Option<Refill> {
        let period_ns = u64::try_from(period.as_nanos()).ok()?;
        (per > 0 && burst > 0 && period_ns > 0).then_some(Refill {
            per,
            period_ns,
            burst,
        })
    }

    /// A stream rate: `count` per period, a burst of `count` (one period's worth at once).
    pub fn of_rate(rate: Rate) -> Refill {
        let count = u64::from(rate.count());
        Refill {
            per: count,
            period_ns: rate.unit().period().as_secs() * 1_000_000_000,
            burst: count,
        }
    }

    /// A bandwidth in bytes: a burst of a tenth of a second's worth (at least one 64 KiB read),
    /// so that a measured transfer runs at the limit rather than a second ahead of it.
    pub fn of_bandwidth(bandwidth: Bandwidth) -> Refill {
        let bps = bandwidth.bytes_per_sec();
        Refill {
            per: bps,
            period_ns: 1_000_000_000,
            burst: (bps / 10).max(MIN_BANDWIDTH_BURST),
        }
    }

    /// The most tokens the bucket holds.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    fn capacity(&self) -> i128 {
        i128::from(self.burst) * i128::from(self.period_ns)
    }

    /// The units of `n` tokens.
    fn units(&self, n: u64) -> i128 {
        i128::from(n) * i128::from(self.period_ns)
    }

    /// How long the bucket takes to gain `units`.
    fn time_for(&self, units: i128) -> Duration {
        let per = i128::from(self.per);
        let ns = (units + per - 1) / per;
        Duration::from_nanos(u64::try_from(ns.max(0)).unwrap_or(u64::MAX))
    }
}

/// A token bucket. Its level may fall below zero only through [`Bucket::charge`] (bytes already
/// moved); it never rises above the burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    level: i128,
    at: Duration,
}

impl Bucket {
    /// A full bucket at `now`: a grant starts with its whole burst.
    pub fn full(r: &Refill, now: Duration) -> Bucket {
        Bucket {
            level: r.capacity(),
            at: now,
        }
    }

    /// Adds what accrued since the last call. Time never runs backwards for a bucket: an
    /// earlier `now` adds nothing. A refill whose burst shrank (the policy changed) clamps.
    fn refill(&mut self, r: &Refill, now: Duration) {
        if now > self.at {
            let dt = i128::try_from((now - self.at).as_nanos()).unwrap_or(i128::MAX);
            let gained = dt.saturating_mul(i128::from(r.per));
            self.level = self.level.saturating_add(gained);
            self.at = now;
        }
        self.level = self.level.min(r.capacity());
    }

    /// Takes `n` tokens if the bucket holds them at `now`; otherwise takes nothing and says when
    /// it will (never, for more than the burst: then the time it would be full).
    pub fn take(&mut self, r: &Refill, n: u64, now: Duration) -> Result<(), Duration> {
        self.refill(r, now);
        let need = r.units(n);
        if self.level >= need {
            self.level -= need;
            Ok(())
        } else {
            let short = need.min(r.capacity()) - self.level;
            Err(self.at + r.time_for(short))
        }
    }

    /// Takes `n` tokens that were already spent (bytes moved), going into debt if it must.
    pub fn charge(&mut self, r: &Refill, n: u64, now: Duration) {
        self.refill(r, now);
        self.level = self.level.saturating_sub(r.units(n));
    }

    /// `None` if the bucket is not in debt at `now`; otherwise when it will be out of it, the
    /// time to wait before moving more.
    pub fn ready_at(&mut self, r: &Refill, now: Duration) -> Option<Duration> {
        self.refill(r, now);
        (self.level < 0).then(|| self.at + r.time_for(-self.level))
    }

    /// Whether the bucket is full at `now` (forgetting it loses nothing).
    pub fn is_full(&mut self, r: &Refill, now: Duration) -> bool {
        self.refill(r, now);
        self.level >= r.capacity()
    }

    /// Whole tokens held at `now` (zero while in debt).
    pub fn tokens(&mut self, r: &Refill, now: Duration) -> u64 {
        self.refill(r, now);
        u64::try_from(self.level.max(0) / i128::from(r.period_ns)).unwrap_or(u64::MAX)
    }
}

/// Which of a grant's limits refused a stream (or slowed it: bandwidth never refuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum GrantLimit {
    /// The identity already holds `connections` streams through the grant on this router.
    #[error("connections")]
    Connections,
    /// The identity opened `rate` streams through the grant too recently.
    #[error("rate")]
    Rate,
    /// The identity's streams through the grant moved `bandwidth` bytes per second.
    #[error("bandwidth")]
    Bandwidth,
}

impl GrantLimit {
    /// The limit's field name, for logs, counters and audit.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantLimit::Connections => "connections",
            GrantLimit::Rate => "rate",
            GrantLimit::Bandwidth => "bandwidth",
        }
    }
}

/// What one identity holds through one grant to one service on a router: its open streams and
/// its stream-rate bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantBook {
    open: u32,
    rate: Option<Bucket>,
}

impl GrantBook {
    /// Opens a stream if the grant has room at `now`: a free slot under `connections` and a
    /// token under `rate`. Takes both or neither.
    pub fn try_open(&mut self, limits: &Throughput, now: Duration) -> Result<(), GrantLimit> {
        if limits.connections.is_some_and(|c| self.open >= c.get()) {
            return Err(GrantLimit::Connections);
        }
        match limits.rate.map(Refill::of_rate) {
            Some(r) => {
                let bucket = self.rate.get_or_insert_with(|| Bucket::full(&r, now));
                bucket.take(&r, 1, now).map_err(|_| GrantLimit::Rate)?;
            }
            None => self.rate = None,
        }
        self.open += 1;
        Ok(())
    }

    /// A stream opened through [`GrantBook::try_open`] ended.
    pub fn close(&mut self) {
        self.open = self.open.saturating_sub(1);
    }

    /// Streams open now.
    pub fn open(&self) -> u32 {
        self.open
    }

    /// Whether the book holds nothing a fresh one would not: no open stream and a full rate
    /// bucket. Such a book can be forgotten without letting anyone past a limit.
    pub fn is_idle(&mut self, limits: &Throughput, now: Duration) -> bool {
        let rate_full = match (limits.rate.map(Refill::of_rate), &mut self.rate) {
            (Some(r), Some(b)) => b.is_full(&r, now),
            _ => true,
        };
        self.open == 0 && rate_full
    }
}

/// Which grant a new stream is charged to, when `grants` (each granting policy's limits and
/// the identity's book for it, in policy-name order) all grant it.
///
/// `Ok(None)`: a grant without router limits grants it, so nothing is counted (the most
/// generous grant wins, as it would alone). `Ok(Some(i))`: the first grant with room took the
/// stream, and its book must be closed when the stream ends. `Err`: no grant has room; the
/// limit is the first grant's, so that refusals name a stable policy.
pub fn admit_stream(
    grants: &mut [(Throughput, &mut GrantBook)],
    now: Duration,
) -> Result<Option<usize>, GrantLimit> {
    if grants.is_empty() || grants.iter().any(|(t, _)| t.is_unlimited()) {
        return Ok(None);
    }
    let mut first = None;
    for (i, (limits, book)) in grants.iter_mut().enumerate() {
        match book.try_open(limits, now) {
            Ok(()) => return Ok(Some(i)),
            Err(hit) => {
                first.get_or_insert(hit);
            }
        }
    }
    Err(first.unwrap_or(GrantLimit::Connections))
}

#[cfg(test)]
#[path = "throttle_tests.rs"]
mod tests;
