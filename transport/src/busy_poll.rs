//! Busy polling: a data-plane thread that has just moved bytes keeps polling its sockets for a
//! short while before it sleeps, so that the answer it is waiting for finds it awake.
//!
//! On a virtual machine a thread that sleeps lets its vCPU halt, and waking a halted vCPU is
//! the dearest step of a round trip: on the 2-core VM of the data-plane bench it costs the
//! *waker* 50-100 µs inside `sendmsg` (the IPI is sent from there), against about 1 µs to a
//! thread that is still polling. A request crossing the tunneler and a router wakes four
//! threads on the way there and back, so most of a 64-byte round trip went to wake-ups. Bare
//! metal pays the same in kind for deep C-states. Seastar's reactors poll 200 µs before they
//! sleep for this reason, and Linux offers the same for NIC queues (`net.core.busy_poll`).
//!
//! How: [`spawn`] starts a poller on a current-thread runtime (a lane). It sleeps until a splice
//! on that thread moves bytes ([`moved`], a thread-local counter), then, for as long as bytes
//! keep moving and for [`BusyPoll::window`] after the last move, it yields to the runtime (which
//! then polls its sockets without blocking) and to the kernel (`sched_yield`, so any other
//! thread runnable on this CPU, the agent's included, runs first). It stops, for a while, as
//! soon as a yield shows that other threads want the CPU (it gave the CPU away for 200 µs or
//! more): polling is for otherwise idle CPUs. An idle lane costs nothing; one that carries
//! traffic costs at most the window of otherwise idle CPU after each burst. The time given
//! away in yields is counted ([`PollStats::given_away`]) so that busy-time metrics, which count
//! it, can leave it out.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, RuntimeFlavor};

/// How long a lane keeps polling after it last moved bytes, unless configured otherwise: the
/// reactor idle-poll time of Seastar, and here more than the longest hop of a round trip
/// through the overlay (so that a thread waiting for its answer does not sleep first).
pub const DEFAULT_WINDOW: Duration = Duration::from_micros(200);

/// A `sched_yield` that gave the CPU away for this long went to a thread that wanted a share
/// of it (a bulk transfer, a build), not to one that answered and slept again (tens of µs):
/// the lane stops polling for a while ([`Backoff`]). A polling thread is CPU-bound to the
/// scheduler and waits behind busy ones for its turn (milliseconds next to a bulk transfer),
/// where a sleeping one is woken ahead of them; and busy threads keep the CPU from halting.
const CONTENDED: Duration = Duration::from_micros(200);

/// How long a lane that found its CPU contended sleeps between moves instead of polling, at
/// first; doubled while the contention lasts, up to [`MAX_COOL_DOWN`].
const COOL_DOWN: Duration = Duration::from_millis(20);

/// The longest cool-down: one yield lost to a busy thread per second at most, under lasting
/// load (next to a bulk transfer, a round trip every ~100 µs: one in 10,000 delayed).
const MAX_COOL_DOWN: Duration = Duration::from_secs(1);

/// The cool-downs of one poller: each first yield of a polling spell under load costs a turn of
/// the busy threads (about a millisecond), so while the load lasts the lane tries less and less
/// often; a spell that polled undisturbed for a while, or ran out its window, starts over.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: COOL_DOWN }
    }

    /// After a polling spell that lasted `polled` and ended with `end`: how long to stay
    /// asleep between moves, if at all.
    fn after(&mut self, end: &Step, polled: Duration) -> Option<Duration> {
        if *end != Step::CoolDown || polled >= COOL_DOWN {
            self.next = COOL_DOWN;
        }
        if *end != Step::CoolDown {
            return None;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(MAX_COOL_DOWN);
        Some(wait)
    }
}

struct Local {
    /// Whether a poller runs on this thread (only then is there anything to count).
    on: Cell<bool>,
    /// Moves counted on this thread since it started.
    moves: Cell<u64>,
    /// The poller, while it sleeps until the next move.
    parked: RefCell<Option<Waker>>,
    /// Bytes moved on this thread, for whoever installed a [`Meter`] here.
    meter: RefCell<Option<Meter>>,
}

thread_local! {
    static LOCAL: Local = const {
        Local {
            on: Cell::new(false),
            moves: Cell::new(0),
            parked: RefCell::new(None),
            meter: RefCell::new(None),
        }
    };
}

/// Tells this thread's poller, if it has one, that `bytes` moved, and its [`Meter`], if it has
/// one. Cheap enough for every read of a splice: a thread-local increment, an uncontended
/// atomic add, and a same-thread wake-up only after an idle spell.
pub fn moved(bytes: usize) {
    LOCAL.with(|l| {
        if l.on.get() {
            l.moves.set(l.moves.get().wrapping_add(1));
            let parked = l.parked.borrow_mut().take();
            if let Some(w) = parked {
                w.wake();
            }
        }
        if let Some(m) = l.meter.borrow().as_ref() {
            m.0.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    });
}

/// Bytes moved by splices on one thread: how a scheduler of lanes tells a lane that carries a
/// bulk transfer (whose thread a new interactive connection would wait behind) from one that
/// is merely busy opening connections.
#[derive(Clone, Debug, Default)]
pub struct Meter(Arc<AtomicU64>);

impl Meter {
    /// Counts what moves on the current thread from now on (replacing any meter there).
    pub fn install(&self) {
        LOCAL.with(|l| *l.meter.borrow_mut() = Some(self.clone()));
    }

    /// Bytes counted so far.
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

fn moves() -> u64 {
    LOCAL.with(|l| l.moves.get())
}

/// A running poller; it stops when this is dropped.
#[derive(Debug)]
pub struct BusyPoll {
    window: Duration,
    stats: PollStats,
    task: tokio::task::JoinHandle<()>,
}

impl BusyPoll {
    /// How long the lane polls after its last move.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// What the poller has done so far, readable from any thread.
    pub fn stats(&self) -> PollStats {
        self.stats.clone()
    }
}

impl Drop for BusyPoll {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A poller's counters, shared with the thread that runs it.
#[derive(Clone, Debug, Default)]
pub struct PollStats {
    given_away: Arc<AtomicU64>,
    polling: Arc<AtomicU64>,
    contended: Arc<AtomicU64>,
}

impl PollStats {
    /// Time given to other threads in yields while polling: tokio counts it as the lane's busy
    /// time, but it was not the lane's work.
    pub fn given_away(&self) -> Duration {
        Duration::from_nanos(self.given_away.load(Ordering::Relaxed))
    }

    /// Time spent polling rather than asleep.
    pub fn polling(&self) -> Duration {
        Duration::from_nanos(self.polling.load(Ordering::Relaxed))
    }

    /// How many times polling stopped because other threads wanted the CPU.
    pub fn contended(&self) -> u64 {
        self.contended.load(Ordering::Relaxed)
    }
}

fn add(counter: &AtomicU64, d: Duration) {
    counter.fetch_add(
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

/// Starts a poller on the runtime of `handle` with the given window. `None` when the window is
/// zero (busy polling off) or the runtime is multi-threaded: a poller belongs to one thread,
/// and a multi-threaded runtime's tasks move between threads.
pub fn spawn(handle: &Handle, window: Duration) -> Option<BusyPoll> {
    if window.is_zero() || handle.runtime_flavor() != RuntimeFlavor::CurrentThread {
        return None;
    }
    let stats = PollStats::default();
    let task = handle.spawn(poll(window, stats.clone()));
    Some(BusyPoll {
        window,
        stats,
        task,
    })
}

/// What a poller does after one yield.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Poll again.
    Again,
    /// Nothing moved for the window: sleep until the next move.
    Sleep,
    /// Other threads want the CPU: sleep for a while ([`Backoff`]), then until the next move.
    CoolDown,
}

/// The rule: a yield that gave the CPU away for [`CONTENDED`] or longer ends polling for a
/// while; otherwise polling goes on until nothing has moved for `window`.
fn step(yielded: Duration, still: Duration, window: Duration) -> Step {
    if yielded >= CONTENDED {
        Step::CoolDown
    } else if still >= window {
        Step::Sleep
    } else {
        Step::Again
    }
}

async fn poll(window: Duration, stats: PollStats) {
    LOCAL.with(|l| l.on.set(true));
    let _off = Off;
    let mut seen = moves();
    let mut cool = Backoff::new();
    loop {
        // Asleep until the next move.
        poll_fn(|cx| {
            LOCAL.with(|l| {
                if l.moves.get() != seen {
                    Poll::Ready(())
                } else {
                    *l.parked.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
        })
        .await;
        seen = moves();
        let started = Instant::now();
        let mut last = started;
        let end = loop {
            let t = Instant::now();
            std::thread::yield_now();
            let yielded = t.elapsed();
            add(&stats.given_away, yielded);
            // The runtime polls its sockets without blocking, runs what they woke, and comes
            // back here.
            tokio::task::yield_now().await;
            let now = Instant::now();
            let m = moves();
            if m != seen {
                seen = m;
                last = now;
            }
            match step(yielded, now.saturating_duration_since(last), window) {
                Step::Again => continue,
                other => break (other, now),
            }
        };
        let polled = end.1.saturating_duration_since(started);
        add(&stats.polling, polled);
        if let Some(wait) = cool.after(&end.0, polled) {
            // The threads that want the CPU keep it from halting, and a thread that sleeps is
            // woken ahead of them, where one that polls waits its turn.
            stats.contended.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
            seen = moves();
        }
    }
}

/// Marks the thread as without a poller when the poller ends (dropped or aborted).
struct Off;

impl Drop for Off {
    fn drop(&mut self) {
        LOCAL.with(|l| {
            l.on.set(false);
            l.parked.borrow_mut().take();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn off_for_a_zero_window_and_for_multi_threaded_runtimes() {
        let rt = current_thread();
        assert!(spawn(rt.handle(), Duration::ZERO).is_none());
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("runtime");
        assert!(spawn(multi.handle(), DEFAULT_WINDOW).is_none());
    }

    #[test]
    fn polls_after_a_move_for_its_window_then_sleeps() {
        let rt = current_thread();
        rt.block_on(async {
            let p = spawn(&Handle::current(), Duration::from_millis(20)).expect("poller");
            let stats = p.stats();
            // Let it start; with nothing moving it sleeps.
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert_eq!(
                stats.polling(),
                Duration::ZERO,
                "an idle lane does not poll"
            );
            moved(1);
            // The sleep's timer fires during the poller's non-blocking polls.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let polled = stats.polling();
            let cooled = stats.contended();
            if cooled == 0 {
                assert!(polled >= Duration::from_millis(20), "polled {polled:?}");
                assert!(
                    polled < Duration::from_millis(90),
                    "kept polling: {polled:?}"
                );
            } else {
                // A loaded test machine gave the CPU to others: polling stopped at once.
                assert!(
                    polled < Duration::from_millis(90),
                    "kept polling: {polled:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(stats.polling(), polled, "a lane with nothing moving sleeps");
        });
    }

    #[test]
    fn polling_goes_on_while_bytes_move_and_stops_when_the_cpu_is_wanted() {
        let w = Duration::from_micros(200);
        let us = Duration::from_micros;
        // An idle CPU (the yield came straight back), bytes moved recently: poll.
        assert_eq!(step(us(1), us(0), w), Step::Again);
        assert_eq!(step(us(1), us(199), w), Step::Again);
        // A thread that answered and slept again had the CPU briefly: still polling.
        assert_eq!(step(us(60), us(10), w), Step::Again);
        // Nothing moved for the window: sleep.
        assert_eq!(step(us(1), us(200), w), Step::Sleep);
        // A busy thread took the CPU for a turn: stop polling for a while, moving or not.
        assert_eq!(step(CONTENDED, us(0), w), Step::CoolDown);
        assert_eq!(step(Duration::from_millis(3), us(500), w), Step::CoolDown);
    }

    #[test]
    fn cool_downs_grow_while_contention_lasts_and_start_over_after_calm() {
        let mut c = Backoff::new();
        let brief = Duration::from_micros(300);
        assert_eq!(c.after(&Step::Sleep, brief), None);
        // Contended at once, again and again: 20, 40, 80 ms ... up to a second.
        let waits: Vec<_> = (0..10)
            .map(|_| {
                c.after(&Step::CoolDown, Duration::ZERO)
                    .expect("cools down")
            })
            .collect();
        assert_eq!(waits[0], COOL_DOWN);
        assert_eq!(waits[1], COOL_DOWN * 2);
        assert_eq!(waits[2], COOL_DOWN * 4);
        assert_eq!(waits[9], MAX_COOL_DOWN);
        // A spell that ran out its window uncontended starts over.
        assert_eq!(c.after(&Step::Sleep, brief), None);
        assert_eq!(c.after(&Step::CoolDown, Duration::ZERO), Some(COOL_DOWN));
        assert_eq!(
            c.after(&Step::CoolDown, Duration::ZERO),
            Some(COOL_DOWN * 2)
        );
        // So does one that polled undisturbed for a while before the CPU was wanted.
        assert_eq!(c.after(&Step::CoolDown, COOL_DOWN), Some(COOL_DOWN));
    }

    #[test]
    fn a_meter_counts_the_bytes_moved_on_its_thread_only() {
        let m = Meter::default();
        moved(5);
        assert_eq!(m.bytes(), 0, "not installed yet");
        m.install();
        moved(5);
        moved(7);
        assert_eq!(m.bytes(), 12);
        let other = m.clone();
        std::thread::spawn(move || {
            moved(100);
            drop(other);
        })
        .join()
        .expect("thread");
        assert_eq!(m.bytes(), 12, "another thread's moves are its own");
    }

    #[test]
    fn a_dropped_poller_stops_counting_moves() {
        let rt = current_thread();
        rt.block_on(async {
            let p = spawn(&Handle::current(), DEFAULT_WINDOW).expect("poller");
            tokio::task::yield_now().await;
            assert!(LOCAL.with(|l| l.on.get()));
            drop(p);
            // The aborted task is dropped at the runtime's next turn.
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            assert!(!LOCAL.with(|l| l.on.get()));
            let before = moves();
            moved(1);
            assert_eq!(moves(), before);
        });
    }
}
