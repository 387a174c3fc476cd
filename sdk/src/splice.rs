//! Carrying a TCP connection over an overlay [`Stream`]: the byte moving is
//! `umbra_transport::splice` (no copies in user space, half-close, stops passed back); here its
//! errors become the SDK's, so a revocation reads as [`SdkError::Revoked`] as it would on the
//! stream itself.

use tokio::net::TcpStream;
pub use umbra_transport::splice::Meter;
use umbra_transport::splice::{io_to_quic, quic_to_io, SpliceError};

use crate::error::SdkError;
use crate::stream::{read_error, write_error, Stream};

/// Carries a TCP connection over an overlay stream, both directions, until both have ended or
/// one fails; the fast equivalent of `tokio::io::copy_bidirectional(&mut tcp, &mut stream)`.
/// Returns the bytes moved (TCP to stream, stream to TCP). A revocation ends it with
/// [`SdkError::Revoked`], as reading or writing the [`Stream`] would.
pub async fn splice(tcp: TcpStream, stream: Stream) -> Result<(u64, u64), SdkError> {
    splice_metered(tcp, stream, (&(), &())).await
}

/// [`splice`], telling `up` (TCP to stream) and `down` (stream to TCP) of the bytes as they
/// move, so that a long-lived connection, or one that fails midway, is counted too.
pub async fn splice_metered(
    mut tcp: TcpStream,
    stream: Stream,
    (up, down): (&dyn Meter, &dyn Meter),
) -> Result<(u64, u64), SdkError> {
    let (mut send, mut recv, service) = stream.into_parts();
    let (mut r, mut w) = tcp.split();
    let (meter_up, meter_down) = (up, down);
    let up = async {
        io_to_quic(&mut r, &mut send, meter_up)
            .await
            .map_err(|e| splice_error(e, &service))
    };
    let down = async {
        quic_to_io(&mut recv, &mut w, meter_down)
            .await
            .map_err(|e| splice_error(e, &service))
    };
    tokio::try_join!(up, down)
}

fn splice_error(e: SpliceError, service: &str) -> SdkError {
    match e {
        SpliceError::Read(e) => read_error(e, service),
        SpliceError::Write(e) => write_error(e, service),
        SpliceError::Closed(e) => SdkError::Protocol(e.to_string()),
        SpliceError::Io(e) => SdkError::Io(e),
    }
}
