//! A data-plane stream as the application sees it: `AsyncRead + AsyncWrite`, whose errors say
//! whether access was revoked (see [`SdkError::from_io`]).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use quinn::{ConnectionError, ReadError, RecvStream, SendStream, WriteError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::SdkError;

/// One connection to a service through a router. Shutting down the write side
/// (`AsyncWriteExt::shutdown`) finishes the QUIC send stream: the service sees end-of-file and
/// can still answer.
#[derive(Debug)]
pub struct Stream {
    send: SendStream,
    recv: RecvStream,
    service: String,
}

impl Stream {
    pub(crate) fn new(send: SendStream, recv: RecvStream, service: String) -> Stream {
        Stream {
            send,
            recv,
            service,
        }
    }

    /// The service this stream reaches.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Tells the other end to stop sending (QUIC `STOP_SENDING`) while this end can still answer:
    /// for a service that answers before it has read the whole request (an early refusal) and
    /// wants none of the rest. Routers and tunnelers pass the stop back to the sender and deliver
    /// the answer whole.
    pub fn stop_reading(&mut self) {
        // Already stopped or finished: nothing more is coming anyway.
        let _ = self
            .recv
            .stop(quinn::VarInt::from_u32(umbra_proto::stream::codes::OK));
    }

    /// The QUIC halves and the service name, for [`crate::splice`].
    pub(crate) fn into_parts(self) -> (SendStream, RecvStream, String) {
        (self.send, self.recv, self.service)
    }
}

/// Maps a connection-level end to the SDK's meaning.
pub(crate) fn connection_error(e: &ConnectionError, what: &str) -> SdkError {
    match e {
        ConnectionError::ApplicationClosed(c) => {
            SdkError::from_code(c.error_code.into_inner(), what)
        }
        ConnectionError::ConnectionClosed(c) => SdkError::Handshake {
            addr: what.to_owned(),
            source: io::Error::new(io::ErrorKind::ConnectionRefused, c.to_string()),
        },
        ConnectionError::TransportError(t) => SdkError::Handshake {
            addr: what.to_owned(),
            source: io::Error::new(io::ErrorKind::ConnectionRefused, t.to_string()),
        },
        other => SdkError::Disconnected(other.to_string()),
    }
}

pub(crate) fn read_error(e: ReadError, what: &str) -> SdkError {
    match e {
        ReadError::Reset(code) => SdkError::from_code(code.into_inner(), what),
        ReadError::ConnectionLost(c) => connection_error(&c, what),
        other => SdkError::Protocol(other.to_string()),
    }
}

pub(crate) fn write_error(e: WriteError, what: &str) -> SdkError {
    match e {
        WriteError::Stopped(code) => SdkError::from_code(code.into_inner(), what),
        WriteError::ConnectionLost(c) => connection_error(&c, what),
        other => SdkError::Protocol(other.to_string()),
    }
}

fn to_io(e: SdkError) -> io::Error {
    let kind = match e {
        SdkError::Revoked | SdkError::Denied { .. } => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::ConnectionReset,
    };
    io::Error::new(kind, e)
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match ready!(this.recv.poll_read_buf(cx, buf)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(read_error(e, &this.service)))),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match ready!(SendStream::poll_write(Pin::new(&mut this.send), cx, buf)) {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(e) => Poll::Ready(Err(to_io(write_error(e, &this.service)))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Finishing twice is harmless: the first finish already ended the send side.
        let _ = self.send.finish();
        Poll::Ready(Ok(()))
    }
}
