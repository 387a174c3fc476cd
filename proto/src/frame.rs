//! Length-prefixed JSON frames: a 4-byte big-endian length, then that many bytes of JSON.
//!
//! Used for the control channel (carried in a streaming HTTPS response body). The decoder
//! accepts bytes in any split a transport produces and refuses a declared length above its
//! bound before buffering it, so a peer cannot make it allocate more than the bound.

use serde::{de::DeserializeOwned, Serialize};

/// The largest control frame accepted. A snapshot comes in chunks of at most
/// [`crate::snapshot::CHUNK_ENTRIES`] entries (about a quarter of a megabyte) and a delta
/// carries one entry, which the controller's 16 MiB request bound already limits, so no frame
/// of a well-behaved controller comes near it.
pub const MAX_CONTROL_FRAME: usize = 16 * 1024 * 1024;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The declared length is above the decoder's bound.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The declared length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The frame's bytes are not the expected JSON message.
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// A frame of length zero: sent on an idle stream so the reader can tell a quiet peer from a
/// dead connection (a half-open TCP connection otherwise waits forever). Decoders skip it.
pub const KEEPALIVE: [u8; 4] = [0; 4];

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg)?;
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
        len: body.len(),
        max: u32::MAX as usize,
    })?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reassembles frames from arbitrary chunks.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            max,
        }
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if one has fully arrived. (Not an `Iterator`: each call picks
    /// the message type and can fail.)
    #[allow(clippy::should_implement_trait)]
    pub fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let mut skip = 0;
        while self.buf[skip..].starts_with(&KEEPALIVE) {
            skip += KEEPALIVE.len();
        }
        self.buf.drain(..skip);
        let Some(header) = self.buf.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*header) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = serde_json::from_slice(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        Ok(Some(msg?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ControlMessage;

    #[test]
    fn reassembles_byte_by_byte() {
        let a = ControlMessage::Heartbeat { seq: 7 };
        let b = ControlMessage::Hello {
            version: 1,
            epoch: "x".into(),
        };
        let mut bytes = KEEPALIVE.to_vec();
        bytes.extend(encode(&a).unwrap());
        bytes.extend(KEEPALIVE);
        bytes.extend(KEEPALIVE);
        bytes.extend(encode(&b).unwrap());
        bytes.extend(KEEPALIVE);
        let mut d = FrameDecoder::new(1024);
        let mut got = Vec::new();
        for byte in bytes {
            d.push(&[byte]);
            while let Some(m) = d.next::<ControlMessage>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![a, b], "keepalives are skipped wherever they fall");
    }

    #[test]
    fn refuses_oversized_and_malformed() {
        let mut d = FrameDecoder::new(16);
        d.push(&1000u32.to_be_bytes());
        assert!(matches!(
            d.next::<ControlMessage>(),
            Err(FrameError::TooLarge { len: 1000, .. })
        ));
        let mut d = FrameDecoder::new(16);
        d.push(&3u32.to_be_bytes());
        d.push(b"{x}");
        assert!(matches!(
            d.next::<ControlMessage>(),
            Err(FrameError::Malformed(_))
        ));
    }
}
