//! Moving bytes between a QUIC stream and a TCP connection (or another QUIC stream) without
//! copying them in user space: what arrives on a QUIC stream is handed to the kernel straight
//! from quinn's receive buffers (`read_chunks` and one vectored write), and what is read from a
//! TCP connection goes to quinn as the very buffer it was read into (`write_chunk`), where
//! `AsyncRead`/`AsyncWrite` copy loops would copy every byte once more on each side.
//!
//! Each direction writes what it read before it reads again (backpressure), and passes an end of
//! input on as an end (half-close): a finished QUIC stream shuts the TCP write side down, an end
//! of file on TCP finishes the QUIC stream, and the other direction keeps flowing.
//!
//! A receiver that stops reading (QUIC `STOP_SENDING`, a TCP peer gone from its read side) ends
//! only the direction that feeds it, the way a server that answers before reading the whole
//! request (an early 403 or 413) expects: the stop is passed back to the sender and the answer,
//! going the other way, is still delivered whole. Tearing both directions down there would throw
//! away the very answer that explains why.

use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::busy_poll;

/// Most received segments handed to one vectored write (each is at most one QUIC packet's worth).
const BATCH: usize = 64;
/// The read buffer a direction starts with: small, so that thousands of idle streams cost little.
const FIRST_READ: usize = 4 * 1024;
/// The largest read buffer, reached while reads keep filling it (bulk transfer).
const MAX_READ: usize = 64 * 1024;

/// Told of the bytes a direction moves as it moves them, so that a stream is counted while it
/// runs (a long-lived one shows up before its end) and whatever way it ends (a stream cut by a
/// revocation or reset midway has moved bytes too; the totals the splice returns exist only
/// when it ends normally).
pub trait Meter: Sync {
    /// `n` more bytes were moved (written to the destination, or queued on the QUIC stream).
    fn moved(&self, n: u64);
}

/// No meter.
impl Meter for () {
    fn moved(&self, _: u64) {}
}

/// Why a splice ended early.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// Reading a QUIC stream failed (reset, connection lost).
    #[error("reading the stream: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing a QUIC stream failed (stopped, connection lost).
    #[error("writing the stream: {0}")]
    Write(#[from] quinn::WriteError),
    /// The QUIC send stream was already finished or reset.
    #[error("stream already closed")]
    Closed(#[from] quinn::ClosedStream),
    /// The TCP side (or another byte stream) failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Copies a QUIC stream into `to` until the stream finishes, then shuts `to`'s write side down.
/// Returns the bytes moved.
pub async fn quic_to_io<W>(
    recv: &mut RecvStream,
    to: &mut W,
    meter: &dyn Meter,
) -> Result<u64, SpliceError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut n = 0u64;
    let mut batch: [Bytes; BATCH] = std::array::from_fn(|_| Bytes::new());
    while let Some(k) = recv.read_chunks(&mut batch).await? {
        busy_poll::moved(batch[..k].iter().map(Bytes::len).sum());
        match write_all_vectored(to, &mut batch[..k]).await {
            Ok(m) => {
                n += m;
                meter.moved(m);
            }
            Err(e) if reader_gone(&e) => {
                // The reader left; the stream's sender learns it and the other way goes on.
                let _ = recv.stop(STOPPED);
                return Ok(n);
            }
            Err(e) => return Err(e.into()),
        }
    }
    match to.shutdown().await {
        Err(e) if !reader_gone(&e) => Err(e.into()),
        _ => Ok(n),
    }
}

/// The code a direction's source is stopped with when its receiver stopped reading: "no more,
/// thank you", not a failure.
const STOPPED: quinn::VarInt = quinn::VarInt::from_u32(0);

/// Whether a write failed because the other end no longer reads (rather than a local fault).
fn reader_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

/// Copies `from` into a QUIC stream until end of file, then finishes the stream. Returns the
/// bytes moved.
pub async fn io_to_quic<R>(
    from: &mut R,
    send: &mut SendStream,
    meter: &dyn Meter,
) -> Result<u64, SpliceError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut n = 0u64;
    let mut size = FIRST_READ;
    let mut buf = BytesMut::new();
    loop {
        // The unfilled tail of the last buffer is used until it runs short; what quinn holds
        // keeps the older part alive until it is acknowledged.
        if buf.capacity() < size / 4 {
            buf = BytesMut::with_capacity(size);
        }
        let room = buf.capacity();
        let k = from.read_buf(&mut buf).await?;
        if k == 0 {
            break;
        }
        busy_poll::moved(k);
        n += k as u64;
        if k == room && size < MAX_READ {
            size = (size * 4).min(MAX_READ);
        }
        match send.write_chunk(buf.split().freeze()).await {
            Ok(()) => meter.moved(k as u64),
            Err(quinn::WriteError::Stopped(_)) => {
                discard_to_eof(from, &mut buf).await?;
                return Ok(n);
            }
            Err(e) => return Err(e.into()),
        }
    }
    send.finish()?;
    Ok(n)
}

/// Reads `from` to its end and drops what it reads: the QUIC receiver stopped reading, and a
/// TCP socket closed with unread input would be reset, taking the answer still queued in the
/// other direction with it.
async fn discard_to_eof<R>(from: &mut R, buf: &mut BytesMut) -> io::Result<()>
where
    R: AsyncRead + Unpin + ?Sized,
{
    loop {
        buf.clear();
        if buf.capacity() < FIRST_READ {
            buf.reserve(FIRST_READ);
        }
        if from.read_buf(buf).await? == 0 {
            return Ok(());
        }
    }
}

/// Copies one QUIC stream into another until it finishes, then finishes the other: the received
/// segments are queued for sending as they are, never copied.
pub async fn quic_to_quic(
    recv: &mut RecvStream,
    send: &mut SendStream,
    meter: &dyn Meter,
) -> Result<u64, SpliceError> {
    let mut n = 0u64;
    let mut batch: [Bytes; BATCH] = std::array::from_fn(|_| Bytes::new());
    while let Some(k) = recv.read_chunks(&mut batch).await? {
        let bytes: usize = batch[..k].iter().map(Bytes::len).sum();
        busy_poll::moved(bytes);
        n += bytes as u64;
        match send.write_all_chunks(&mut batch[..k]).await {
            Ok(()) => meter.moved(bytes as u64),
            Err(quinn::WriteError::Stopped(code)) => {
                // Passed back to the sender with the receiver's own code.
                let _ = recv.stop(code);
                return Ok(n);
            }
            Err(e) => return Err(e.into()),
        }
    }
    send.finish()?;
    Ok(n)
}

/// Writes every byte of `chunks` with as few vectored writes as the writer allows, leaving
/// `chunks` empty. Returns the bytes written.
async fn write_all_vectored<W>(to: &mut W, chunks: &mut [Bytes]) -> io::Result<u64>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let mut first = 0;
    while first < chunks.len() {
        if chunks[first].is_empty() {
            first += 1;
            continue;
        }
        let written = {
            let mut slices = [IoSlice::new(&[]); BATCH];
            let mut m = 0;
            for c in chunks[first..].iter().filter(|c| !c.is_empty()).take(BATCH) {
                slices[m] = IoSlice::new(c);
                m += 1;
            }
            to.write_vectored(&slices[..m]).await?
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut left = written;
        while left > 0 && first < chunks.len() {
            let c = &mut chunks[first];
            let take = left.min(c.len());
            c.advance(take);
            left -= take;
            if c.is_empty() {
                first += 1;
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A writer that takes at most `max` bytes from at most two slices per call, the way a
    /// socket under pressure does.
    struct Trickle {
        out: Vec<u8>,
        max: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut left = self.max;
            let mut n = 0;
            for b in bufs.iter().take(2) {
                let k = b.len().min(left);
                self.out.extend_from_slice(&b[..k]);
                left -= k;
                n += k;
                if k < b.len() {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn partial_vectored_writes_deliver_every_byte_in_order() {
        let mut chunks: Vec<Bytes> = (0u8..100)
            .map(|i| Bytes::from(vec![i; usize::from(i % 7)]))
            .collect();
        let expected: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        for max in [1, 5, 13, 1000] {
            let mut copy = chunks.clone();
            let mut w = Trickle {
                out: Vec::new(),
                max,
            };
            let n = write_all_vectored(&mut w, &mut copy).await.expect("write");
            assert_eq!(n, expected.len() as u64);
            assert_eq!(w.out, expected, "max {max}");
            assert!(copy.iter().all(|c| c.is_empty()));
        }
        chunks.clear();
        let mut w = Trickle {
            out: Vec::new(),
            max: 3,
        };
        assert_eq!(
            write_all_vectored(&mut w, &mut chunks)
                .await
                .expect("empty"),
            0
        );
    }
}
