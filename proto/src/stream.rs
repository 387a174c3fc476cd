//! The first bytes of every QUIC stream on the data plane, and the error codes that end them.
//!
//! A client (or a router, towards an SDK host) opens a bidirectional stream and sends one
//! request frame: `version (u8) | op (u8) | length (u16, big-endian) | JSON payload`. The peer
//! answers with one response frame: `version (u8) | status (u8)`. After an `Ok` response the
//! stream carries the application's bytes both ways; any other status is followed by a close.
//!
//! Nothing in a request is trusted for identity: the router takes the caller's identity only
//! from the certificate its handshake verified. The payload names a service and nothing else.

use serde::{Deserialize, Serialize};
use umbra_policies::{IdentityId, Name};

/// The data-plane protocol version; a frame with another version is refused.
pub const STREAM_PROTOCOL_VERSION: u8 = 1;
/// The ALPN protocol of Umbra's QUIC connections.
pub const ALPN: &[u8] = b"umbra/1";
/// The largest request payload accepted.
pub const MAX_REQUEST_PAYLOAD: usize = 4096;

/// What a stream asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Client to router: connect me to a service.
    Dial = 1,
    /// SDK host to router: I host this service; send me its callers.
    Bind = 2,
    /// Router to SDK host: a caller for a service you bound.
    Incoming = 3,
}

/// The request payloads, by op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRequest {
    /// The service's name.
    pub service: Name,
}

/// Router to SDK host: who is calling (as the router's handshake verified it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    /// The service being dialed.
    pub service: Name,
    /// The caller's identity id.
    pub caller_id: IdentityId,
    /// The caller's name.
    pub caller_name: Name,
    /// The caller's SPIFFE id.
    pub caller_spiffe: String,
}

/// The answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Go ahead: bytes follow.
    Ok = 0,
    /// Not authorized, or no such service: deliberately the same answer.
    Denied = 1,
    /// Authorized, but the service could not be reached.
    Unavailable = 2,
    /// The request was malformed.
    BadRequest = 3,
}

/// QUIC application error codes used to close streams and connections.
pub mod codes {
    /// Orderly end.
    pub const OK: u32 = 0;
    /// The identity or the grant was revoked while the stream or connection was open.
    pub const REVOKED: u32 = 0x10;
    /// Refused by policy (or no such service).
    pub const DENIED: u32 = 0x11;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 0x12;
    /// The service could not be reached.
    pub const UNAVAILABLE: u32 = 0x13;
    /// Too many streams or requests.
    pub const LIMIT: u32 = 0x14;
    /// The router is shutting down or has no current policy.
    pub const SHUTDOWN: u32 = 0x15;
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum StreamFrameError {
    /// Unknown protocol version.
    #[error("unsupported stream protocol version {0}")]
    Version(u8),
    /// Unknown op or status byte.
    #[error("unknown {what} {value}")]
    Unknown {
        /// `op` or `status`.
        what: &'static str,
        /// The byte.
        value: u8,
    },
    /// The declared payload length is above [`MAX_REQUEST_PAYLOAD`].
    #[error("request payload of {0} bytes is too large")]
    TooLarge(usize),
    /// The payload is not the op's JSON.
    #[error("malformed request payload: {0}")]
    Malformed(#[from] serde_json::Error),
}

impl TryFrom<u8> for Op {
    type Error = StreamFrameError;
    fn try_from(v: u8) -> Result<Self, StreamFrameError> {
        match v {
            1 => Ok(Op::Dial),
            2 => Ok(Op::Bind),
            3 => Ok(Op::Incoming),
            value => Err(StreamFrameError::Unknown { what: "op", value }),
        }
    }
}

impl TryFrom<u8> for Status {
    type Error = StreamFrameError;
    fn try_from(v: u8) -> Result<Self, StreamFrameError> {
        match v {
            0 => Ok(Status::Ok),
            1 => Ok(Status::Denied),
            2 => Ok(Status::Unavailable),
            3 => Ok(Status::BadRequest),
            value => Err(StreamFrameError::Unknown {
                what: "status",
                value,
            }),
        }
    }
}

/// Encodes a request frame.
pub fn encode_request<T: Serialize>(op: Op, payload: &T) -> Result<Vec<u8>, StreamFrameError> {
    let body = serde_json::to_vec(payload)?;
    if body.len() > MAX_REQUEST_PAYLOAD {
        return Err(StreamFrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.push(STREAM_PROTOCOL_VERSION);
    out.push(op as u8);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Parses a request header (the first 4 bytes): the op and the payload length to read next.
pub fn decode_request_header(h: [u8; 4]) -> Result<(Op, usize), StreamFrameError> {
    if h[0] != STREAM_PROTOCOL_VERSION {
        return Err(StreamFrameError::Version(h[0]));
    }
    let op = Op::try_from(h[1])?;
    let len = u16::from_be_bytes([h[2], h[3]]) as usize;
    if len > MAX_REQUEST_PAYLOAD {
        return Err(StreamFrameError::TooLarge(len));
    }
    Ok((op, len))
}

/// Encodes a response frame.
pub fn encode_response(status: Status) -> [u8; 2] {
    [STREAM_PROTOCOL_VERSION, status as u8]
}

/// Parses a response frame.
pub fn decode_response(r: [u8; 2]) -> Result<Status, StreamFrameError> {
    if r[0] != STREAM_PROTOCOL_VERSION {
        return Err(StreamFrameError::Version(r[0]));
    }
    Status::try_from(r[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let req = ServiceRequest {
            service: Name::new("llm").unwrap(),
        };
        let bytes = encode_request(Op::Dial, &req).unwrap();
        let (op, len) = decode_request_header(bytes[..4].try_into().unwrap()).unwrap();
        assert_eq!(op, Op::Dial);
        assert_eq!(len, bytes.len() - 4);
        let back: ServiceRequest = serde_json::from_slice(&bytes[4..]).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn bad_frames_are_refused() {
        assert!(matches!(
            decode_request_header([2, 1, 0, 1]),
            Err(StreamFrameError::Version(2))
        ));
        assert!(matches!(
            decode_request_header([1, 9, 0, 1]),
            Err(StreamFrameError::Unknown { .. })
        ));
        assert!(matches!(
            decode_request_header([1, 1, 0xff, 0xff]),
            Err(StreamFrameError::TooLarge(_))
        ));
        assert!(serde_json::from_slice::<ServiceRequest>(br#"{"service":"LLM"}"#).is_err());
        assert!(
            serde_json::from_slice::<ServiceRequest>(br#"{"service":"x","identity":"admin"}"#)
                .is_err()
        );
        assert!(matches!(
            decode_response([1, 7]),
            Err(StreamFrameError::Unknown { .. })
        ));
        assert_eq!(
            decode_response(encode_response(Status::Denied)).unwrap(),
            Status::Denied
        );
    }
}
