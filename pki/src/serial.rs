//! Certificate serial numbers, as the controller records and revokes them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest serial number accepted, in bytes (RFC 5280 allows at most 20 octets).
const MAX_SERIAL_BYTES: usize = 20;

/// A certificate serial number in canonical form: lower-case hex of the big-endian value without
/// leading zero bytes (the single byte `00` for zero).
///
/// One serial has exactly one spelling, so a revocation list keyed by `Serial` cannot be bypassed
/// by an alternative encoding of the same number. Ordering is by that string (useful for sorted
/// maps), not numeric.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Serial(String);

/// Why a string is not a canonical [`Serial`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SerialError {
    /// The string is empty.
    #[error("a serial number must not be empty")]
    Empty,
    /// The string is longer than 40 hex characters (20 bytes).
    #[error("a serial number is at most 40 hex characters")]
    TooLong,
    /// The string is not an even number of lower-case hex characters.
    #[error("a serial number is an even number of lower-case hex characters")]
    NotLowerHex,
    /// The string has a leading `00` byte.
    #[error("a serial number must not have leading zero bytes")]
    LeadingZero,
}

impl Serial {
    /// The canonical serial of the big-endian bytes `raw` (as found in a certificate, possibly
    /// with a leading zero byte that DER adds to keep the INTEGER positive).
    pub fn from_bytes(raw: &[u8]) -> Serial {
        let first = raw.iter().position(|b| *b != 0);
        match first {
            Some(i) => Serial(hex::encode(&raw[i..])),
            None => Serial("00".to_owned()),
        }
    }

    /// The serial as a hex string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Serial {
    type Err = SerialError;
    fn from_str(s: &str) -> Result<Self, SerialError> {
        if s.is_empty() {
            return Err(SerialError::Empty);
        }
        if s.len() > 2 * MAX_SERIAL_BYTES {
            return Err(SerialError::TooLong);
        }
        if s.len() % 2 != 0 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(SerialError::NotLowerHex);
        }
        if s.len() > 2 && s.starts_with("00") {
            return Err(SerialError::LeadingZero);
        }
        Ok(Serial(s.to_owned()))
    }
}

impl TryFrom<String> for Serial {
    type Error = SerialError;
    fn try_from(s: String) -> Result<Self, SerialError> {
        s.parse()
    }
}

impl From<Serial> for String {
    fn from(s: Serial) -> String {
        s.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_form() {
        assert_eq!(Serial::from_bytes(&[0, 0x80, 1]).as_str(), "8001");
        assert_eq!(Serial::from_bytes(&[0x7f]).as_str(), "7f");
        assert_eq!(Serial::from_bytes(&[0, 0]).as_str(), "00");
        assert_eq!(Serial::from_bytes(&[]).as_str(), "00");
        assert_eq!("8001".parse::<Serial>(), Ok(Serial::from_bytes(&[0x80, 1])));
        assert_eq!("00".parse::<Serial>(), Ok(Serial::from_bytes(&[0])));
        assert_eq!("".parse::<Serial>(), Err(SerialError::Empty));
        assert_eq!("008001".parse::<Serial>(), Err(SerialError::LeadingZero));
        assert_eq!("8001A".parse::<Serial>(), Err(SerialError::NotLowerHex));
        assert_eq!("80AB".parse::<Serial>(), Err(SerialError::NotLowerHex));
        assert_eq!("a".repeat(42).parse::<Serial>(), Err(SerialError::TooLong));
        let s = Serial::from_bytes(&[1, 2, 3]);
        let json = serde_json::to_string(&s).expect("serialize");
        assert_eq!(json, "\"010203\"");
        assert_eq!(
            serde_json::from_str::<Serial>(&json).expect("deserialize"),
            s
        );
        assert!(serde_json::from_str::<Serial>("\"0001\"").is_err());
    }
}
