//! Slowing a grant's streams down to its `bandwidth`: one [`Shaper`] (a byte bucket) per
//! identity, service and grant, charged with every chunk any of its streams moves, either way,
//! and waited on before the next chunk. Streams are throttled, never cut: when the bucket is
//! in debt a direction stops reading, and QUIC and TCP flow control push back on the sender.
//!
//! The TCP side of a stream is wrapped ([`Paced`]) so that `umbra_transport::splice` moves it as
//! before; a stream to an SDK host is copied by [`quic_to_quic`] here, which waits the same way.
//! A shaper follows its policy: when the router's policy changes, the next chunk is shaped to
//! the policy's new bandwidth, so a changed limit reaches live streams too.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use umbra_policies::{Bandwidth, Bucket, Name, Refill};
use umbra_transport::splice::SpliceError;

use crate::policy::PolicyRx;

struct State {
    refill: Refill,
    bucket: Bucket,
    /// The router's policy, to follow the grant's bandwidth when it changes.
    rx: PolicyRx,
    policy: Name,
}

/// The byte bucket shared by all of one identity's streams through one grant to one service.
pub(crate) struct Shaper {
    state: Mutex<State>,
    epoch: Instant,
}

impl Shaper {
    pub(crate) fn new(
        epoch: Instant,
        bandwidth: Bandwidth,
        policy: Name,
        mut rx: PolicyRx,
        now: Duration,
    ) -> Arc<Shaper> {
        rx.borrow_and_update();
        let refill = Refill::of_bandwidth(bandwidth);
        let state = State {
            refill,
            bucket: Bucket::full(&refill, now),
            rx,
            policy,
        };
        Arc::new(Shaper {
            state: Mutex::new(state),
            epoch,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Shapes to `bandwidth` from now on.
    pub(crate) fn follow(&self, bandwidth: Bandwidth) {
        self.lock().refill = Refill::of_bandwidth(bandwidth);
    }

    /// Picks up the grant's bandwidth if the policy changed since the last look.
    fn refresh(state: &mut State) {
        if !state.rx.has_changed().unwrap_or(false) {
            return;
        }
        let current = state.rx.borrow_and_update().clone();
        let bandwidth = current.and_then(|p| {
            let policy = p.index.state().policies.get(&state.policy)?;
            policy.limits.bandwidth
        });
        // A policy gone or without a bandwidth any more: the stream is cut or the next one is
        // not shaped; live ones keep the last limit.
        if let Some(b) = bandwidth {
            state.refill = Refill::of_bandwidth(b);
        }
    }

    /// Takes `n` bytes already moved.
    pub(crate) fn charge(&self, n: usize) {
        let now = self.now();
        let mut s = self.lock();
        Self::refresh(&mut s);
        let refill = s.refill;
        s.bucket.charge(&refill, n as u64, now);
    }

    /// When the bucket is out of debt, or `None` if it is now.
    fn ready_at(&self) -> Option<Instant> {
        let now = self.now();
        let mut s = self.lock();
        Self::refresh(&mut s);
        let refill = s.refill;
        s.bucket.ready_at(&refill, now).map(|at| self.epoch + at)
    }

    /// Whether forgetting the shaper loses nothing (its bucket is full).
    pub(crate) fn is_full(&self, now: Duration) -> bool {
        let mut s = self.lock();
        let refill = s.refill;
        s.bucket.is_full(&refill, now)
    }

    /// Waits until the bucket is out of debt, looking again at least every [`MAX_WAIT`].
    pub(crate) async fn ready(&self) {
        while let Some(at) = self.ready_at() {
            tokio::time::sleep_until(at.min(Instant::now() + MAX_WAIT)).await;
        }
    }
}

/// The most bytes moved between two looks at the bucket: a write or read of more would put the
/// bucket that much in debt at once (quinn can hand over megabytes in one chunk), and the wait
/// that follows would be computed at the old rate however the policy changes meanwhile.
const MAX_STEP: usize = 64 * 1024;

/// The longest wait before looking at the bucket (and the policy) again.
const MAX_WAIT: Duration = Duration::from_millis(100);

/// A byte stream whose reads and writes are charged to a shaper, waiting while it is in debt.
pub(crate) struct Paced<'a, T> {
    inner: T,
    shaper: &'a Shaper,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<'a, T> Paced<'a, T> {
    pub(crate) fn new(inner: T, shaper: &'a Shaper) -> Self {
        Paced {
            inner,
            shaper,
            sleep: None,
        }
    }

    /// Ready once the shaper is out of debt.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some(sleep) = &mut self.sleep {
                ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
            }
            match self.shaper.ready_at() {
                None => return Poll::Ready(()),
                Some(at) => {
                    let at = at.min(Instant::now() + MAX_WAIT);
                    self.sleep = Some(Box::pin(tokio::time::sleep_until(at)));
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Paced<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_ready(cx));
        // `io_to_quic` reads into at most 64 KiB (its largest buffer): each read is one step.
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.shaper.charge(buf.filled().len() - before);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Paced<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_ready(cx));
        let buf = &buf[..buf.len().min(MAX_STEP)];
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.shaper.charge(n);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_ready(cx));
        // At most MAX_STEP bytes of the slices, the last one cut short.
        let mut step: Vec<io::IoSlice<'_>> = Vec::with_capacity(bufs.len());
        let mut room = MAX_STEP;
        for b in bufs {
            if room == 0 {
                break;
            }
            let k = b.len().min(room);
            step.push(io::IoSlice::new(&b[..k]));
            room -= k;
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &step))?;
        this.shaper.charge(n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// `umbra_transport::splice::quic_to_quic`, waiting for the shaper before each chunk (of at
/// most [`MAX_STEP`] bytes): copies one QUIC stream into another until it finishes, then
/// finishes the other.
pub(crate) async fn quic_to_quic(
    recv: &mut RecvStream,
    send: &mut SendStream,
    shaper: &Shaper,
    meter: &dyn umbra_transport::splice::Meter,
) -> Result<u64, SpliceError> {
    let mut n = 0u64;
    loop {
        shaper.ready().await;
        let Some(chunk) = recv.read_chunk(MAX_STEP, true).await? else {
            break;
        };
        let bytes: Bytes = chunk.bytes;
        shaper.charge(bytes.len());
        let k = bytes.len() as u64;
        n += k;
        match send.write_chunk(bytes).await {
            Ok(()) => meter.moved(k),
            Err(quinn::WriteError::Stopped(code)) => {
                let _ = recv.stop(code);
                return Ok(n);
            }
            Err(e) => return Err(e.into()),
        }
    }
    send.finish()?;
    Ok(n)
}
