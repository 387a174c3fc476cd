//! Which QUIC handshakes the router starts, decided before it keeps any state for them.
//!
//! quinn hands the router each `Incoming` connection attempt before a handshake slot is spent,
//! so the router can answer it with a stateless Retry (address validation: the client must echo
//! a token sent to its claimed address, which a spoofed source cannot), refuse it, or start the
//! handshake. A flood of Initial packets from spoofed sources therefore costs the router one
//! packet each once handshakes pile up, never a slot held until the handshake times out.
//!
//! This module is the decision alone: no sockets, no clock, no runtime. The accept loop asks
//! [`Handshakes::decide`], then records what it started with [`Handshakes::start`] and
//! [`Handshakes::end`].
//!
//! The rules:
//! - in flight below `retry_above`: an unvalidated attempt is started, unless its source already
//!   has `per_source` handshakes in flight, in which case it is asked to retry;
//! - in flight at or over `retry_above`: every unvalidated attempt is asked to retry;
//! - a validated attempt (it answered a Retry) is started while fewer than `in_flight`
//!   handshakes are in flight and its source has fewer than `per_source` *validated* ones;
//!   otherwise it is refused.
//!
//! Unvalidated attempts never hold more than `retry_above` slots, so validated clients always
//! find the rest; and per-source counts of validated handshakes cannot be filled by packets that
//! merely claim a victim's address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

/// Where a handshake comes from, as far as limits go: an IPv4 address, or an IPv6 /64 (one
/// host usually holds a whole /64, so counting single IPv6 addresses would not limit it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Source {
    /// An IPv4 address (IPv4-mapped IPv6 addresses included).
    V4(Ipv4Addr),
    /// The upper 64 bits of an IPv6 address.
    V6(u64),
}

impl Source {
    /// The source an address counts against.
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => Source::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// What to do with a connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Start the handshake (and [`Handshakes::start`] it).
    Admit,
    /// Answer with a stateless Retry: no state is kept; a real client comes back validated.
    Retry,
    /// Refuse the attempt (a validated client over a limit).
    Refuse(Full),
}

/// Which limit a refused attempt met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// All `in_flight` slots are taken.
    Router,
    /// Its source has `per_source` validated handshakes in flight.
    Source,
}

/// The bounds (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HandshakeLimits {
    /// Handshakes in flight at most.
    pub in_flight: usize,
    /// From this many in flight on, unvalidated attempts are asked to retry.
    pub retry_above: usize,
    /// Handshakes in flight per source (validated ones counted apart).
    pub per_source: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct Count {
    all: usize,
    validated: usize,
}

/// The handshakes in flight, by source.
#[derive(Debug)]
pub(crate) struct Handshakes {
    limits: HandshakeLimits,
    total: usize,
    by_source: HashMap<Source, Count>,
}

impl Handshakes {
    /// No handshakes in flight. `retry_above` is capped at `in_flight`.
    pub fn new(limits: HandshakeLimits) -> Handshakes {
        let limits = HandshakeLimits {
            retry_above: limits.retry_above.min(limits.in_flight),
            ..limits
        };
        Handshakes {
            limits,
            total: 0,
            by_source: HashMap::new(),
        }
    }

    /// Handshakes in flight now.
    pub fn in_flight(&self) -> usize {
        self.total
    }

    /// What to do with an attempt from `source`; `validated` when it proved its address.
    pub fn decide(&self, source: Source, validated: bool) -> Decision {
        let count = self.by_source.get(&source).copied().unwrap_or_default();
        let l = &self.limits;
        if validated {
            if self.total >= l.in_flight {
                Decision::Refuse(Full::Router)
            } else if count.validated >= l.per_source {
                Decision::Refuse(Full::Source)
            } else {
                Decision::Admit
            }
        } else if self.total >= l.retry_above || count.all >= l.per_source {
            Decision::Retry
        } else {
            Decision::Admit
        }
    }

    /// For a validated attempt refused because every slot is taken: the source whose oldest
    /// handshake should give up its slot, if one holds more handshakes than `newcomer` does and
    /// `newcomer` is under its own validated share. Stalled handshakes from many sources then
    /// cannot keep a new source out, and no source takes from one holding no more than itself.
    pub fn busiest_over(&self, newcomer: Source) -> Option<Source> {
        let mine = self.by_source.get(&newcomer).copied().unwrap_or_default();
        if mine.validated >= self.limits.per_source {
            return None;
        }
        let (source, count) = self
            .by_source
            .iter()
            .max_by_key(|(s, c)| (c.all, std::cmp::Reverse(**s)))?;
        (count.all > mine.all).then_some(*source)
    }

    /// Counts an admitted handshake until [`Handshakes::end`].
    pub fn start(&mut self, source: Source, validated: bool) {
        self.total += 1;
        let c = self.by_source.entry(source).or_default();
        c.all += 1;
        if validated {
            c.validated += 1;
        }
    }

    /// Forgets a handshake [`Handshakes::start`] counted (finished, failed or timed out).
    pub fn end(&mut self, source: Source, validated: bool) {
        self.total = self.total.saturating_sub(1);
        if let Some(c) = self.by_source.get_mut(&source) {
            c.all = c.all.saturating_sub(1);
            if validated {
                c.validated = c.validated.saturating_sub(1);
            }
            if c.all == 0 {
                self.by_source.remove(&source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: HandshakeLimits = HandshakeLimits {
        in_flight: 16,
        retry_above: 4,
        per_source: 3,
    };

    fn v4(last: u8) -> Source {
        Source::of(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            Source::of(ip("2001:db8::1")),
            Source::of(ip("2001:db8::ffff:2"))
        );
        assert_ne!(
            Source::of(ip("2001:db8::1")),
            Source::of(ip("2001:db8:0:1::1"))
        );
        assert_eq!(
            Source::of(ip("::ffff:10.0.0.1")),
            Source::of(ip("10.0.0.1"))
        );
        assert_ne!(Source::of(ip("10.0.0.1")), Source::of(ip("10.0.0.2")));
    }

    #[test]
    fn unvalidated_attempts_are_retried_once_handshakes_pile_up() {
        let mut h = Handshakes::new(LIMITS);
        for i in 0..4 {
            assert_eq!(h.decide(v4(i), false), Decision::Admit);
            h.start(v4(i), false);
        }
        assert_eq!(h.decide(v4(100), false), Decision::Retry);
        // A client that answered the Retry is started.
        assert_eq!(h.decide(v4(100), true), Decision::Admit);
        h.end(v4(0), false);
        assert_eq!(h.decide(v4(100), false), Decision::Admit);
    }

    #[test]
    fn a_source_over_its_share_is_retried_then_refused() {
        let mut h = Handshakes::new(HandshakeLimits {
            retry_above: 16,
            ..LIMITS
        });
        for _ in 0..3 {
            h.start(v4(1), false);
        }
        assert_eq!(h.decide(v4(1), false), Decision::Retry);
        // Spoofed packets claiming the address do not fill its validated share.
        assert_eq!(h.decide(v4(1), true), Decision::Admit);
        for _ in 0..3 {
            h.start(v4(1), true);
        }
        assert_eq!(h.decide(v4(1), true), Decision::Refuse(Full::Source));
        assert_eq!(h.decide(v4(2), true), Decision::Admit);
    }

    #[test]
    fn a_full_router_refuses_validated_and_retries_the_rest() {
        let mut h = Handshakes::new(LIMITS);
        for i in 0..16 {
            h.start(v4(i), true);
        }
        assert_eq!(h.decide(v4(200), true), Decision::Refuse(Full::Router));
        assert_eq!(h.decide(v4(200), false), Decision::Retry);
        for i in 0..16 {
            h.end(v4(i), true);
        }
        assert_eq!(h.in_flight(), 0);
        assert!(h.by_source.is_empty());
    }

    #[test]
    fn a_full_router_takes_a_slot_from_the_busiest_source_for_a_newcomer() {
        let mut h = Handshakes::new(LIMITS);
        // Six sources hold the 16 slots: 3, 3, 3, 3, 2, 2.
        for (i, n) in [3, 3, 3, 3, 2, 2].into_iter().enumerate() {
            for _ in 0..n {
                h.start(v4(i as u8), true);
            }
        }
        assert_eq!(h.decide(v4(9), true), Decision::Refuse(Full::Router));
        let victim = h.busiest_over(v4(9)).expect("a newcomer takes a slot");
        assert!(h.by_source[&victim].all == 3);
        // A source holding as many as the busiest takes nothing; nor does one at its share.
        assert_eq!(h.busiest_over(v4(0)), None);
        assert_eq!(h.busiest_over(v4(4)).map(|s| h.by_source[&s].all), Some(3));
    }

    proptest! {
        /// Whatever arrives in whatever order: the totals hold, unvalidated attempts never
        /// hold more than `retry_above` slots, and a validated client whose source is under
        /// its share is admitted whenever validated handshakes leave room beside them.
        #[test]
        fn bounds_hold_and_validated_clients_get_through(
            ops in proptest::collection::vec((0u8..6, any::<bool>(), any::<bool>()), 0..400)
        ) {
            let mut h = Handshakes::new(LIMITS);
            let mut started: Vec<(Source, bool)> = Vec::new();
            for (src, validated, finish) in ops {
                let src = v4(src);
                if finish && !started.is_empty() {
                    let (s, v) = started.remove(usize::from(src == v4(0)) % started.len());
                    h.end(s, v);
                    continue;
                }
                let unvalidated = started.iter().filter(|(_, v)| !v).count();
                let validated_total = started.len() - unvalidated;
                let mine = started.iter().filter(|(s, v)| *s == src && *v).count();
                let d = h.decide(src, validated);
                if validated && mine < LIMITS.per_source
                    && validated_total < LIMITS.in_flight - LIMITS.retry_above
                {
                    prop_assert_eq!(d, Decision::Admit);
                }
                if !validated {
                    prop_assert!(!matches!(d, Decision::Refuse(_)));
                }
                if d == Decision::Admit {
                    h.start(src, validated);
                    started.push((src, validated));
                }
                let unvalidated = started.iter().filter(|(_, v)| !v).count();
                prop_assert!(started.len() <= LIMITS.in_flight);
                prop_assert!(unvalidated <= LIMITS.retry_above);
                prop_assert_eq!(h.in_flight(), started.len());
                for s in 0..6 {
                    let n = started.iter().filter(|(x, v)| *x == v4(s) && *v).count();
                    prop_assert!(n <= LIMITS.per_source);
                }
            }
        }
    }
}
