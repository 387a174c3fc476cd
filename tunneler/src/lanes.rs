//! Lanes: the tunneler carries connections on more than one thread, each with its own QUIC
//! connection to each router (see `Context::on_runtime`), so that an interactive connection
//! opened while another moves bulk data does not wait behind it, here or on the router (whose
//! lanes take a context's lanes on different threads). Measured on the data-plane bench: a
//! 64-byte round trip next to a bulk transfer went from 4-7 ms at p99 on one thread to under
//! 0.5 ms.
//!
//! The first lane is the tunneler's own runtime, where connections are accepted: a connection
//! carried there costs no hand-over to another thread (one wake-up, tens of microseconds on a
//! VM), so it is preferred while it is neither busy nor carrying bulk. Busy means its thread
//! spent more than half of the last sampling period polling tasks (tokio's busy-duration
//! metric, less the time the lane's busy poller gave away); bulk means its splices moved more
//! than [`BULK`] a second, which a lane busy only with opening short connections never does,
//! while a bulk transfer slowed by a busy machine can leave its lane under half busy and still
//! hold up an interactive connection there for milliseconds. A sampler measures both every
//! [`SAMPLE`] while any lane carries a connection, and sleeps otherwise.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use umbra_sdk::Context;
use umbra_transport::busy_poll::{self, BusyPoll, Meter, PollStats};

/// How often lanes' business is measured while connections are carried.
const SAMPLE: Duration = Duration::from_millis(10);
/// Busy share (per mille) above which a lane counts as busy.
const BUSY: u64 = 500;
/// Bytes a second above which a lane counts as carrying a bulk transfer (512 Mbit/s: a few per
/// cent of its thread, already enough to queue an interactive connection's packets behind
/// it now and then). Connections that open and close in quick succession move next to
/// nothing, so this tells them apart from bulk where the busy share cannot.
const BULK: u64 = 64 << 20;

/// One lane.
pub(crate) struct Lane {
    /// Dials over this lane's own connections.
    pub ctx: Context,
    /// The lane's runtime; `None` for the tunneler's own.
    pub runtime: Option<Handle>,
    /// TCP connections the lane carries now.
    carried: Arc<AtomicUsize>,
    /// Whether the lane was busy or carried bulk over the last sample (see [`loaded`]).
    loaded: AtomicBool,
    /// What the lane's splices move (installed on its thread).
    meter: Meter,
    /// The runtime's metrics, for its busy time.
    metrics: tokio::runtime::RuntimeMetrics,
    /// The lane's busy poller (it stops with this), and its counters: the time it gave away in
    /// yields counts as busy to tokio.
    _poller: Option<BusyPoll>,
    polled: PollStats,
}

impl Lane {
    /// A lane on `runtime`, or on the current runtime for `None`.
    fn new(ctx: Context, runtime: Option<Handle>, busy_poll: Duration) -> Lane {
        let on = runtime.clone().unwrap_or_else(Handle::current);
        let poller = busy_poll::spawn(&on, busy_poll);
        let meter = Meter::default();
        // On a current-thread runtime, the thread its splices run on.
        let m = meter.clone();
        drop(on.spawn(async move { m.install() }));
        Lane {
            ctx,
            runtime,
            carried: Arc::default(),
            loaded: AtomicBool::new(false),
            meter,
            metrics: on.metrics(),
            polled: poller.as_ref().map(BusyPoll::stats).unwrap_or_default(),
            _poller: poller,
        }
    }

    /// Time the lane's thread spent on work so far.
    fn worked(&self) -> Duration {
        let busy = self.metrics.worker_total_busy_duration(0);
        busy.saturating_sub(self.polled.given_away())
    }
}

/// The tunneler's lanes, and what wakes their sampler.
pub(crate) struct Lanes {
    lanes: Vec<Lane>,
    carrying: Notify,
}

impl Lanes {
    /// Starts `count` lanes: the current runtime, and a thread with a runtime of its own for
    /// each other, which runs until `stop` is cancelled. A lane whose thread cannot start is
    /// left out (logged); the first always exists. Each lane on a current-thread runtime polls
    /// for `busy_poll` after it last moved bytes. Call from within a Tokio runtime.
    pub fn start(
        ctx: &Context,
        count: usize,
        busy_poll: Duration,
        stop: &CancellationToken,
    ) -> Arc<Lanes> {
        let own = Handle::current();
        let mut lanes = vec![Lane::new(ctx.clone(), None, busy_poll)];
        for i in 1..count.clamp(1, 64) {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::warn!(lane = i, error = %e, "cannot start a lane");
                    break;
                }
            };
            let handle = runtime.handle().clone();
            let stop = stop.clone();
            let started = std::thread::Builder::new()
                .name(format!("umbra-tunnel-lane-{i}"))
                .spawn(move || runtime.block_on(stop.cancelled()));
            if let Err(e) = started {
                tracing::warn!(lane = i, error = %e, "cannot start a lane");
                break;
            }
            lanes.push(Lane::new(
                ctx.on_runtime(handle.clone()),
                Some(handle),
                busy_poll,
            ));
        }
        let lanes = Arc::new(Lanes {
            lanes,
            carrying: Notify::new(),
        });
        if lanes.lanes.len() > 1 {
            own.spawn(sample(Arc::clone(&lanes), stop.clone()));
        }
        lanes
    }

    /// The lane for a new connection: the first while it is neither busy nor carrying bulk,
    /// else the one carrying the fewest among the others that are neither. Returns it with its
    /// count raised, lowered again when the returned guard is dropped.
    pub fn pick(&self) -> (&Lane, Carried) {
        let i = choose(self.lanes.iter().map(|l| {
            (
                l.loaded.load(Ordering::Relaxed),
                l.carried.load(Ordering::Relaxed),
            )
        }));
        let lane = self.lanes.get(i).unwrap_or(&self.lanes[0]);
        if lane.carried.fetch_add(1, Ordering::Relaxed) == 0 {
            self.carrying.notify_one();
        }
        (lane, Carried(Arc::clone(&lane.carried)))
    }

    fn carrying(&self) -> bool {
        self.lanes
            .iter()
            .any(|l| l.carried.load(Ordering::Relaxed) > 0)
    }
}

/// [`Lanes::pick`]'s rule over each lane's (loaded: busy or carrying bulk, connections
/// carried): the first lane while it is not loaded, else the lane carrying the fewest among
/// those not loaded (or among all, if every lane is), the first of equals.
fn choose(lanes: impl Iterator<Item = (bool, usize)>) -> usize {
    let mut best: Option<(usize, (bool, usize))> = None;
    for (i, (loaded, carried)) in lanes.enumerate() {
        if i == 0 && !loaded {
            return 0;
        }
        let key = (loaded, carried);
        if best.is_none_or(|(_, b)| key < b) {
            best = Some((i, key));
        }
    }
    best.map_or(0, |(i, _)| i)
}

/// Whether a lane that worked `worked` and moved `bytes` over `wall` is loaded: busy more than
/// [`BUSY`] per mille of the time, or moving more than [`BULK`] bytes a second.
fn loaded(worked: Duration, bytes: u64, wall: Duration) -> bool {
    let wall = wall.as_micros().max(1);
    worked.as_micros() * 1000 / wall > u128::from(BUSY)
        || u128::from(bytes) * 1_000_000 / wall > u128::from(BULK)
}

/// Measures each lane's busy share every [`SAMPLE`] while any lane carries a connection, until
/// `stop` (which ends the lanes too).
async fn sample(l: Arc<Lanes>, stop: CancellationToken) {
    let mut last: Vec<(Instant, (Duration, u64))> = Vec::new();
    loop {
        if !l.carrying() {
            // Idle: forget the old samples and sleep until a connection is carried.
            last.clear();
            for lane in &l.lanes {
                lane.loaded.store(false, Ordering::Relaxed);
            }
            tokio::select! {
                _ = l.carrying.notified() => {}
                _ = stop.cancelled() => return,
            }
            continue;
        }
        let now = Instant::now();
        let counts: Vec<(Duration, u64)> = l
            .lanes
            .iter()
            .map(|lane| (lane.worked(), lane.meter.bytes()))
            .collect();
        if last.len() == counts.len() {
            for ((lane, (b, m)), (t0, (b0, m0))) in l.lanes.iter().zip(&counts).zip(&last) {
                let wall = now.saturating_duration_since(*t0);
                let l = loaded(b.saturating_sub(*b0), m.saturating_sub(*m0), wall);
                lane.loaded.store(l, Ordering::Relaxed);
            }
        }
        last = counts.into_iter().map(|c| (now, c)).collect();
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// One connection counted on its lane; the count drops with it.
pub(crate) struct Carried(Arc<AtomicUsize>);

impl Drop for Carried {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_is_loaded_when_busy_or_moving_bulk() {
        let ms = Duration::from_millis;
        // Idle, or busy opening short connections (a third of its time, a few bytes each).
        assert!(!loaded(ms(0), 0, ms(10)));
        assert!(!loaded(ms(3), 4_000, ms(10)));
        // Busy over half the time.
        assert!(loaded(ms(6), 0, ms(10)));
        // A bulk transfer on a slow machine: under half busy, but 100 MB/s.
        assert!(loaded(ms(4), 1_000_000, ms(10)));
        // Just under the bulk rate: not bulk.
        assert!(!loaded(ms(1), (BULK / 100) - 1, ms(10)));
        // No time passed: nothing divides by zero.
        assert!(!loaded(Duration::ZERO, 0, Duration::ZERO));
    }

    #[test]
    fn the_first_lane_while_it_is_not_loaded_else_the_least_loaded_other() {
        // Not loaded: the first, however many it carries (no hand-over to another thread).
        assert_eq!(choose([(false, 5), (false, 0)].into_iter()), 0);
        // Loaded (busy, or a bulk transfer): the next connection goes elsewhere.
        assert_eq!(choose([(true, 1), (false, 0)].into_iter()), 1);
        assert_eq!(choose([(true, 1), (false, 3), (false, 2)].into_iter()), 2);
        // A loaded lane is avoided even if it carries fewer.
        assert_eq!(choose([(true, 1), (true, 0), (false, 4)].into_iter()), 2);
        // Every lane loaded: the one carrying the fewest, the first of equals.
        assert_eq!(choose([(true, 2), (true, 1), (true, 1)].into_iter()), 1);
        // One lane, or none.
        assert_eq!(choose([(true, 9)].into_iter()), 0);
        assert_eq!(choose(std::iter::empty()), 0);
    }
}
