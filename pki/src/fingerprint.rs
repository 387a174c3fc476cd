//! Certificate fingerprints: how an enrollee pins the CA before it has any other reason to trust
//! it.
//!
//! The enrollment token carries the SHA-256 of the root CA certificate's DER; on first contact the
//! enrollee accepts the controller only if its chain contains a certificate with that hash.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The SHA-256 digest of a certificate's DER encoding.
///
/// Displays and parses as exactly 64 lower-case hex characters (one spelling, so that a pasted
/// fingerprint compares equal or visibly differs). Equality is constant-time: a fingerprint is
/// what a verifier compares attacker-supplied certificates against.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Fingerprint([u8; 32]);

/// Why a string is not a valid [`Fingerprint`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FingerprintError {
    /// The string is not 64 characters long.
    #[error("a fingerprint is 64 hex characters, got {0}")]
    WrongLength(usize),
    /// The string contains something other than `0-9` and `a-f`.
    #[error("a fingerprint must be lower-case hex (0-9, a-f)")]
    NotLowerHex,
}

/// The SHA-256 fingerprint of the DER-encoded certificate `der`.
pub fn fingerprint(der: &[u8]) -> Fingerprint {
    Fingerprint(Sha256::digest(der).into())
}

impl Fingerprint {
    /// Wraps a raw 32-byte digest.
    pub fn from_bytes(bytes: [u8; 32]) -> Fingerprint {
        Fingerprint(bytes)
    }

    /// The raw 32-byte digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl PartialEq for Fingerprint {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Fingerprint {}

impl std::hash::Hash for Fingerprint {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Consistent with `eq`: equal fingerprints have equal bytes.
        self.0.hash(state);
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = FingerprintError;
    fn from_str(s: &str) -> Result<Self, FingerprintError> {
        if s.len() != 64 {
            return Err(FingerprintError::WrongLength(s.len()));
        }
        if !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(FingerprintError::NotLowerHex);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| FingerprintError::NotLowerHex)?;
        Ok(Fingerprint(out))
    }
}

impl TryFrom<String> for Fingerprint {
    type Error = FingerprintError;
    fn try_from(s: String) -> Result<Self, FingerprintError> {
        s.parse()
    }
}

impl From<Fingerprint> for String {
    fn from(f: Fingerprint) -> String {
        f.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let f = fingerprint(b"hello");
        let s = f.to_string();
        assert_eq!(
            s,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(s.parse::<Fingerprint>(), Ok(f));
        let json = serde_json::to_string(&f).expect("serialize");
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(
            serde_json::from_str::<Fingerprint>(&json).expect("deserialize"),
            f
        );
        assert_ne!(f, fingerprint(b"hello!"));
    }

    #[test]
    fn refuses_other_spellings() {
        let s = fingerprint(b"x").to_string();
        assert_eq!(
            s.to_uppercase().parse::<Fingerprint>(),
            Err(FingerprintError::NotLowerHex)
        );
        assert_eq!(
            format!("sha256:{s}").parse::<Fingerprint>(),
            Err(FingerprintError::WrongLength(71))
        );
        assert_eq!(
            s[..62].parse::<Fingerprint>(),
            Err(FingerprintError::WrongLength(62))
        );
        assert_eq!(
            format!("{}zz", &s[..62]).parse::<Fingerprint>(),
            Err(FingerprintError::NotLowerHex)
        );
    }
}
