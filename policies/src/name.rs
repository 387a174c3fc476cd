//! Names of identities, services, policies and role attributes.

use std::fmt;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

/// The longest name accepted, so that a name always fits in a DNS label and a SPIFFE path segment.
pub const MAX_NAME_LEN: usize = 63;

/// A validated name: 1 to 63 characters of lower-case ASCII letters, digits, `-`, `_` and `.`,
/// starting and ending with a letter or digit.
///
/// Names appear in SPIFFE ids (`spiffe://domain/agent/NAME`), in selectors (`@NAME`, `#NAME`), in
/// file names and in log lines, so they are kept to a small alphabet that needs no escaping
/// anywhere and cannot hide look-alike characters. Upper case is refused rather than folded so
/// that one name has exactly one spelling.
///
/// Held inline (names of up to 24 bytes take no allocation): a million identities carry their
/// names in the state, the index and every router's copy.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(CompactString);

/// Why a string is not a valid [`Name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is the empty string.
    #[error("a name must not be empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("name is {0} characters long; at most {MAX_NAME_LEN} are allowed")]
    TooLong(usize),
    /// The name contains a character outside the allowed alphabet.
    #[error("name contains {0:?}; allowed are a-z, 0-9, '-', '_' and '.'")]
    InvalidChar(char),
    /// The name starts or ends with a punctuation character.
    #[error("a name must start and end with a letter or digit")]
    BadEdge,
}

impl Name {
    /// Checks `s` against the name rules.
    pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(s.chars().count()));
        }
        if let Some(c) = s.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
        }) {
            return Err(NameError::InvalidChar(c));
        }
        let edge_ok =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !edge_ok(s.chars().next()) || !edge_ok(s.chars().last()) {
            return Err(NameError::BadEdge);
        }
        Ok(Name(CompactString::from(s)))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Name::new(s)
    }
}

impl std::str::FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Name::new(s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0.into_string()
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in [
            "a",
            "agent-1",
            "llm.umbra",
            "x_y",
            "0",
            "a".repeat(63).as_str(),
        ] {
            assert!(Name::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(Name::new(""), Err(NameError::Empty));
        assert_eq!(Name::new("a".repeat(64)), Err(NameError::TooLong(64)));
        assert_eq!(Name::new("Agent"), Err(NameError::InvalidChar('A')));
        assert_eq!(Name::new("a b"), Err(NameError::InvalidChar(' ')));
        assert_eq!(Name::new("a/b"), Err(NameError::InvalidChar('/')));
        assert_eq!(Name::new("аgent"), Err(NameError::InvalidChar('а'))); // Cyrillic a
        assert_eq!(Name::new("-a"), Err(NameError::BadEdge));
        assert_eq!(Name::new("a."), Err(NameError::BadEdge));
        assert!(serde_json::from_str::<Name>("\"Bad\"").is_err());
    }
}
