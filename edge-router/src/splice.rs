//! Moves bytes both ways between a client's QUIC stream and the service side (a TCP connection
//! to a router-hosted service, or a QUIC stream to an SDK host), with backpressure (each side is
//! written before the next read) and half-close (an end of one direction is passed on as an end,
//! not as a close of both). Bytes are not copied in user space: see `umbra_transport::splice`.

use quinn::{RecvStream, SendStream};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use umbra_transport::splice::{io_to_quic, quic_to_io, quic_to_quic, Meter};

use crate::shaping::{self, Paced, Shaper};

pub(crate) use umbra_transport::splice::SpliceError;

/// Bytes moved: client to service, service to client.
pub(crate) type Moved = (u64, u64);

/// The other end of a spliced client stream.
pub(crate) enum ServiceSide<'a> {
    /// A router-hosted service.
    Tcp(OwnedReadHalf, OwnedWriteHalf),
    /// A stream to an SDK host.
    Host(&'a mut SendStream, &'a mut RecvStream),
}

/// What a stream's bytes are charged to as they move.
#[derive(Clone, Copy)]
pub(crate) struct Charges<'a> {
    /// The grant's shaper, when it limits bandwidth: both directions wait for it.
    pub pace: Option<&'a Shaper>,
    /// Told of the bytes from the client to the service.
    pub up: &'a dyn Meter,
    /// Told of the bytes from the service to the client.
    pub down: &'a dyn Meter,
}

/// Runs until both directions have ended, or one fails, charging the bytes as they move.
pub(crate) async fn run(
    send: &mut SendStream,
    recv: &mut RecvStream,
    service: ServiceSide<'_>,
    charges: Charges<'_>,
) -> Result<Moved, SpliceError> {
    let (up, down) = (charges.up, charges.down);
    match (service, charges.pace) {
        (ServiceSide::Tcp(mut r, mut w), None) => {
            tokio::try_join!(quic_to_io(recv, &mut w, up), io_to_quic(&mut r, send, down))
        }
        (ServiceSide::Host(hsend, hrecv), None) => {
            tokio::try_join!(
                quic_to_quic(recv, hsend, up),
                quic_to_quic(hrecv, send, down)
            )
        }
        (ServiceSide::Tcp(r, w), Some(shaper)) => {
            let (mut r, mut w) = (Paced::new(r, shaper), Paced::new(w, shaper));
            tokio::try_join!(quic_to_io(recv, &mut w, up), io_to_quic(&mut r, send, down))
        }
        (ServiceSide::Host(hsend, hrecv), Some(shaper)) => tokio::try_join!(
            shaping::quic_to_quic(recv, hsend, shaper, up),
            shaping::quic_to_quic(hrecv, send, shaper, down)
        ),
    }
}
