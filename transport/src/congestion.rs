//! Congestion control that keeps the queue it builds short.
//!
//! One QUIC connection carries all of an agent's streams, so a bulk transfer and an interactive
//! exchange share its congestion window: every packet of the interactive stream waits behind
//! whatever the window lets the bulk stream put in flight. Cubic alone grows the window until a
//! buffer overflows (on loopback, the receiver's UDP socket buffer; on a WAN, the bottleneck's
//! queue), so the interactive round trip is stretched by that whole buffer, several
//! milliseconds at loopback speeds.
//!
//! [`LowQueue`] is Cubic plus a delay signal: once per round trip it compares the least RTT
//! sample of the round with the path's minimum RTT (the least sample of the last ten seconds,
//! so that a route change to a longer path is not taken for a queue forever; the decreases
//! themselves drain the queue often enough to measure it); when the difference (the standing
//! queue) exceeds a target, it takes the same multiplicative decrease a loss would. The target
//! is the larger of a floor and the minimum RTT itself, so on a LAN or loopback the queue stays
//! near the floor, and on a WAN path only a queue longer than the path's own round trip (the
//! in-flight bound BBR uses) is cut: a path is never held below its bandwidth-delay product.
//! Losses are handled exactly as Cubic handles them.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics, CubicConfig};
use quinn_proto::RttEstimator;

/// The standing queue tolerated on short paths: 1 ms, enough to keep the pipe full across the
/// scheduling delays of a busy host (on a loaded 2-core machine, 0.25 ms held the window so
/// tight that interactive streams waited on it: 0.86 ms median round trip under load against
/// 0.18 ms at 1 ms), while a loopback path no longer overflows its socket buffers (Cubic alone
/// grew the window to 4 to 30 MB there and lost packets in bursts).
pub const DEFAULT_QUEUE_FLOOR: Duration = Duration::from_millis(1);

/// How long the least RTT sample stands for the path's minimum RTT (BBR's min-RTT window).
const BASE_WINDOW: Duration = Duration::from_secs(10);

/// Shortest round over which the least RTT sample is taken (loopback RTTs are tens of
/// microseconds, too few samples to tell a queue from noise).
const MIN_ROUND: Duration = Duration::from_micros(500);

/// Builds [`LowQueue`] controllers; set it as a `TransportConfig`'s congestion controller
/// factory on both ends of a connection (each end governs what it sends).
#[derive(Debug, Clone)]
pub struct LowQueueConfig {
    cubic: Arc<CubicConfig>,
    floor: Duration,
}

impl LowQueueConfig {
    /// A factory with the given queue floor (see [`DEFAULT_QUEUE_FLOOR`]).
    pub fn new(floor: Duration) -> LowQueueConfig {
        LowQueueConfig {
            cubic: Arc::new(CubicConfig::default()),
            floor,
        }
    }
}

impl Default for LowQueueConfig {
    fn default() -> LowQueueConfig {
        LowQueueConfig::new(DEFAULT_QUEUE_FLOOR)
    }
}

impl ControllerFactory for LowQueueConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(LowQueue {
            inner: self.cubic.clone().build(now, current_mtu),
            signal: QueueSignal::new(now, self.floor),
        })
    }
}

/// Cubic with a queue-delay bound; see the module documentation.
pub struct LowQueue {
    inner: Box<dyn Controller>,
    signal: QueueSignal,
}

/// Tells, once per round trip, whether the round showed a standing queue.
#[derive(Debug, Clone, Copy)]
struct QueueSignal {
    floor: Duration,
    round_start: Instant,
    /// The least RTT sample seen in the current round.
    round_min: Option<Duration>,
    /// The path's minimum RTT and when it was sampled.
    base: Option<(Duration, Instant)>,
}

impl QueueSignal {
    fn new(now: Instant, floor: Duration) -> QueueSignal {
        QueueSignal {
            floor,
            round_start: now,
            round_min: None,
            base: None,
        }
    }

    /// Takes one RTT sample; true at the end of a round whose least sample stood more than
    /// the target above the path's minimum RTT.
    fn sample(&mut self, now: Instant, sample: Duration, srtt: Duration) -> bool {
        let stale = |(b, at): (Duration, Instant)| {
            sample <= b || now.saturating_duration_since(at) > BASE_WINDOW
        };
        if self.base.is_none_or(stale) {
            self.base = Some((sample, now));
        }
        self.round_min = Some(self.round_min.map_or(sample, |m| m.min(sample)));
        if now.saturating_duration_since(self.round_start) < srtt.max(MIN_ROUND) {
            return false;
        }
        self.round_start = now;
        let base = self.base.map_or(Duration::ZERO, |(b, _)| b);
        self.round_min
            .take()
            .is_some_and(|least| standing(least, base, self.floor))
    }
}

/// Whether a round whose least RTT was `least` shows a queue longer than allowed over a path
/// whose minimum RTT is `base`.
fn standing(least: Duration, base: Duration, floor: Duration) -> bool {
    least.saturating_sub(base) > floor.max(base)
}

impl Controller for LowQueue {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
        // An application-limited sender builds no queue: its samples say nothing about it.
        let sample = now.saturating_duration_since(sent);
        if !app_limited && self.signal.sample(now, sample, rtt.get()) {
            // Packets sent from now on count for the next decision; Cubic ignores further
            // events for packets sent before this one, as after a loss.
            self.inner.on_congestion_event(now, now, false, 0);
        }
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.inner.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(LowQueue {
            inner: self.inner.clone_box(),
            signal: self.signal,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn short_paths_are_held_to_the_floor() {
        let floor = 250 * US;
        // Loopback: 40 µs minimum RTT.
        assert!(!standing(40 * US, 40 * US, floor));
        assert!(!standing(290 * US, 40 * US, floor), "exactly the floor");
        assert!(standing(300 * US, 40 * US, floor));
        assert!(standing(5000 * US, 40 * US, floor));
    }

    #[test]
    fn long_paths_keep_a_queue_as_long_as_their_round_trip() {
        let floor = 250 * US;
        let base = Duration::from_millis(50);
        assert!(!standing(Duration::from_millis(99), base, floor));
        assert!(!standing(Duration::from_millis(100), base, floor));
        assert!(standing(Duration::from_millis(101), base, floor));
    }

    #[test]
    fn a_standing_queue_is_signalled_once_per_round() {
        let t0 = Instant::now();
        let mut q = QueueSignal::new(t0, 250 * US);
        let srtt = 100 * US;
        // Short samples over many rounds: never.
        for i in 1..=200u32 {
            assert!(!q.sample(t0 + US * (10 * i), 60 * US, srtt));
        }
        // Long samples: once per round (MIN_ROUND, as srtt is shorter), not per sample.
        let start = t0 + 2000 * US;
        let signals = (1..=300u32)
            .filter(|i| q.sample(start + US * (10 * i), 3000 * US, srtt))
            .count();
        assert_eq!(signals, 6, "3 ms of samples over 0.5 ms rounds");
        // One short sample in a round clears that round: the queue drained at least once.
        let mut q = QueueSignal::new(t0, 250 * US);
        let mut at = t0;
        let mut round = |short_at: Option<u64>| {
            let mut signalled = 0;
            for i in 1..=50u64 {
                at += 10 * US;
                let s = if short_at == Some(i) {
                    50 * US
                } else {
                    3000 * US
                };
                signalled += usize::from(q.sample(at, s, srtt));
            }
            signalled
        };
        assert_eq!(round(Some(20)), 0);
        assert_eq!(round(None), 1);
    }

    #[test]
    fn a_longer_path_after_a_route_change_is_learned_within_the_window() {
        let t0 = Instant::now();
        let mut q = QueueSignal::new(t0, 250 * US);
        let srtt = 100 * US;
        for i in 1..=100u32 {
            q.sample(t0 + US * (10 * i), 40 * US, srtt);
        }
        // The route now takes 50 ms each way and nothing queues.
        let (long, changed) = (Duration::from_millis(50), t0 + Duration::from_millis(1));
        let mut signals_after = |from: Duration, to: Duration| {
            let mut n = 0;
            let mut at = changed + from;
            while at < changed + to {
                n += usize::from(q.sample(at, long, long));
                at += Duration::from_millis(5);
            }
            n
        };
        assert!(
            signals_after(Duration::ZERO, Duration::from_secs(9)) > 0,
            "taken for a queue"
        );
        signals_after(Duration::from_secs(9), Duration::from_secs(11));
        assert_eq!(
            signals_after(Duration::from_secs(11), Duration::from_secs(20)),
            0,
            "the new minimum is the path's"
        );
    }
}
