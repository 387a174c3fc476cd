//! Moves bytes both ways between a QUIC stream and another byte stream (a TCP connection to a
//! router-hosted service, or a QUIC stream to an SDK host), with backpressure (each side is
//! written before the next read) and half-close (an end of one direction is passed on as an end,
//! not as a close of both).

use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest chunk moved at once.
const CHUNK: usize = 64 * 1024;
/// The buffer a stream starts with.
const FIRST_CHUNK: usize = 4 * 1024;

/// Why a splice ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpliceError {
    /// Reading from the client's stream failed (reset, connection lost).
    #[error("client stream: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing to the client's stream failed (stopped, connection lost).
    #[error("client stream: {0}")]
    Write(#[from] quinn::WriteError),
    /// The client's stream was already closed.
    #[error("client stream closed")]
    Closed(#[from] quinn::ClosedStream),
    /// The service side failed.
    #[error("service side: {0}")]
    Io(#[from] std::io::Error),
}

/// Bytes moved: client to service, service to client.
pub(crate) type Moved = (u64, u64);

/// Runs until both directions have ended, or one fails.
pub(crate) async fn run<R, W>(
    send: &mut SendStream,
    recv: &mut RecvStream,
    mut from_service: R,
    mut to_service: W,
) -> Result<Moved, SpliceError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let up = async {
        let mut n = 0u64;
        // Reading into a buffer gathers the many packet-sized chunks QUIC has received into one
        // write, instead of one system call per packet.
        let mut buf = vec![0u8; FIRST_CHUNK];
        while let Some(k) = recv.read(&mut buf).await? {
            to_service.write_all(&buf[..k]).await?;
            n += k as u64;
            if k == buf.len() && buf.len() < CHUNK {
                buf.resize((buf.len() * 4).min(CHUNK), 0);
            }
        }
        // The client finished sending: pass the end on, keep the other direction open.
        to_service.shutdown().await?;
        Ok::<u64, SpliceError>(n)
    };
    let down = async {
        let mut n = 0u64;
        // Small while the stream is interactive or idle, so that thousands of open streams
        // cost little; grown while a read fills it, i.e. during bulk transfer.
        let mut buf = vec![0u8; FIRST_CHUNK];
        loop {
            let k = from_service.read(&mut buf).await?;
            if k == 0 {
                break;
            }
            send.write_all(&buf[..k]).await?;
            n += k as u64;
            if k == buf.len() && buf.len() < CHUNK {
                buf.resize((buf.len() * 4).min(CHUNK), 0);
            }
        }
        send.finish()?;
        Ok::<u64, SpliceError>(n)
    };
    tokio::try_join!(up, down)
}
