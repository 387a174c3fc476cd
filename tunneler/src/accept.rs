//! Accepting connections the agent drives, without letting the agent drive the launcher.
//!
//! Two things went wrong without this. An agent that held enough connections to use up the
//! launcher's descriptors made every `accept` fail at once with `EMFILE` while the connection
//! stayed in the backlog, so a loop that retried at once spun a whole CPU; and a loop that
//! accepted past its bound only to close the newest connection spun as fast as the agent could
//! reconnect. So: over the bound, a listener that has taken a connection waits for a slot
//! before it accepts another (the rest wait in the kernel's backlog, which costs the launcher
//! nothing; at most one descriptor per listener beyond the bound), and a failing `accept` backs
//! off. The slot is not taken before `accept`: an idle listener holding one would leave every
//! listener past the bound unable to accept when an agent has more services than slots.

use std::future::Future;
use std::io;
use std::time::Duration;

/// How long to wait after a failed `accept`: nothing after a failure that concerns one
/// connection only (it was aborted or reset before we took it: the next one is fine), and for
/// any other failure (out of descriptors or memory, most of all) a delay that starts at 5 ms
/// and doubles to 1 s, reset by a success. A pure state machine: the caller sleeps.
#[derive(Debug, Clone)]
pub struct AcceptBackoff {
    next: Duration,
}

/// The first delay after a failed `accept`.
pub const FIRST_DELAY: Duration = Duration::from_millis(5);
/// The longest delay between two `accept` attempts that fail.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff { next: FIRST_DELAY }
    }
}

impl AcceptBackoff {
    /// A fresh backoff.
    pub fn new() -> AcceptBackoff {
        AcceptBackoff::default()
    }

    /// An `accept` succeeded: the next failure starts again from the first delay.
    pub fn succeeded(&mut self) {
        self.next = FIRST_DELAY;
    }

    /// An `accept` failed with `e`: how long to wait before the next attempt.
    pub fn failed(&mut self, e: &io::Error) -> Duration {
        if per_connection(e) {
            return Duration::ZERO;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(MAX_DELAY);
        wait
    }
}

/// Failures that concern the one connection being accepted, not the listener or the process.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Whether `e` says the process (or the system) ran out of something: descriptors, buffers or
/// memory. These are the failures an abusive agent causes, and they are logged as such.
pub fn exhausted(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    )
}

/// The few errno values needed here (the crate has no libc dependency; these are the same on
/// every Linux architecture).
mod libc_errno {
    pub const ENOMEM: i32 = 12;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    pub const ENOBUFS: i32 = 105;
}

/// Calls `accept` until it succeeds, waiting as `backoff` says between failures; a failure is
/// logged (at most once per streak) with `what` naming the listener.
pub async fn accept_with_backoff<T, F, Fut>(
    backoff: &mut AcceptBackoff,
    what: &str,
    mut accept: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    let mut logged = false;
    loop {
        match accept().await {
            Ok(x) => {
                backoff.succeeded();
                return x;
            }
            Err(e) => {
                let wait = backoff.failed(&e);
                if !logged && !wait.is_zero() {
                    logged = true;
                    if exhausted(&e) {
                        tracing::warn!(listener = what, error = %e, "accept failed: out of resources; backing off");
                    } else {
                        tracing::warn!(listener = what, error = %e, "accept failed; backing off");
                    }
                }
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                } else {
                    // Still give the runtime a turn, so a flood of aborted connections cannot
                    // keep this task from yielding.
                    tokio::task::yield_now().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn os(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    #[test]
    fn resource_failures_back_off_doubling_to_a_second_and_reset_on_success() {
        let mut b = AcceptBackoff::new();
        let waits: Vec<u128> = (0..10)
            .map(|_| b.failed(&os(libc_errno::EMFILE)).as_millis())
            .collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(&os(libc_errno::ENFILE)), FIRST_DELAY);
        for code in [libc_errno::ENOBUFS, libc_errno::ENOMEM] {
            assert!(exhausted(&os(code)));
        }
        assert!(!exhausted(&io::ErrorKind::ConnectionAborted.into()));
    }

    #[test]
    fn a_failure_of_one_connection_costs_no_wait_and_keeps_the_streak() {
        let mut b = AcceptBackoff::new();
        b.failed(&os(libc_errno::EMFILE));
        assert_eq!(
            b.failed(&io::ErrorKind::ConnectionAborted.into()),
            Duration::ZERO
        );
        assert_eq!(b.failed(&os(libc_errno::EMFILE)).as_millis(), 10);
        // Unknown failures back off too: a loop must never spin on an error it does not know.
        assert_eq!(b.failed(&os(22)).as_millis(), 20);
    }

    /// In virtual time: a listener that fails with EMFILE for ten seconds is tried a few dozen
    /// times, not millions, and the first success after it is taken at once.
    #[tokio::test(start_paused = true)]
    async fn an_exhausted_listener_is_retried_a_bounded_number_of_times() {
        let calls = Arc::new(AtomicUsize::new(0));
        let start = tokio::time::Instant::now();
        let mut b = AcceptBackoff::new();
        let c = calls.clone();
        let got = accept_with_backoff(&mut b, "test", move || {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                if start.elapsed() < Duration::from_secs(10) {
                    Err(os(libc_errno::EMFILE))
                } else {
                    Ok(7)
                }
            }
        })
        .await;
        assert_eq!(got, 7);
        let n = calls.load(Ordering::SeqCst);
        // 5+10+…+640 ms is 1.275 s over 8 tries, then one a second: about 18 tries in 10 s.
        assert!((15..=25).contains(&n), "{n} attempts");
        assert!(start.elapsed() < Duration::from_secs(11));
        // The success reset the backoff.
        assert_eq!(b.failed(&os(libc_errno::EMFILE)), FIRST_DELAY);
    }
}
