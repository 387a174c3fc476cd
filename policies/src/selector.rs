//! Selectors pick identities or services in a service policy, as OpenZiti's role attributes do.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::name::{Name, NameError};

/// One term of a policy's identity or service list.
///
/// `#all` matches everything, `#ROLE` matches whatever carries the role attribute `ROLE`, and
/// `@NAME` matches the one identity or service called `NAME`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Selector {
    /// `#all`: every identity or service.
    All,
    /// `#ROLE`: everything that holds this role attribute.
    Role(Name),
    /// `@NAME`: exactly the entity with this name.
    Named(Name),
}

/// Why a string is not a valid [`Selector`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// The selector does not start with `#` or `@`.
    #[error("selector {0:?} must start with '#' (a role, or #all) or '@' (a name)")]
    MissingSigil(String),
    /// The part after the sigil is not a valid name.
    #[error("selector {selector:?}: {source}")]
    BadName {
        /// The selector as written.
        selector: String,
        /// Why its name part was refused.
        source: NameError,
    },
}

impl Selector {
    /// Whether this selector picks an entity with the given name and roles.
    pub fn matches<'a>(&self, name: &Name, mut roles: impl Iterator<Item = &'a Name>) -> bool {
        match self {
            Selector::All => true,
            Selector::Role(r) => roles.any(|x| x == r),
            Selector::Named(n) => n == name,
        }
    }
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, SelectorError> {
        let bad = |source| SelectorError::BadName {
            selector: s.to_owned(),
            source,
        };
        if let Some(rest) = s.strip_prefix('#') {
            if rest == "all" {
                return Ok(Selector::All);
            }
            return Name::new(rest).map(Selector::Role).map_err(bad);
        }
        if let Some(rest) = s.strip_prefix('@') {
            return Name::new(rest).map(Selector::Named).map_err(bad);
        }
        Err(SelectorError::MissingSigil(s.to_owned()))
    }
}

impl TryFrom<String> for Selector {
    type Error = SelectorError;
    fn try_from(s: String) -> Result<Self, SelectorError> {
        s.parse()
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> String {
        s.to_string()
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::All => f.write_str("#all"),
            Selector::Role(r) => write!(f, "#{r}"),
            Selector::Named(n) => write!(f, "@{n}"),
        }
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[test]
    fn parses_and_prints() {
        for s in ["#all", "#analysts", "@agent-1"] {
            assert_eq!(s.parse::<Selector>().unwrap().to_string(), s);
        }
        assert_eq!("#all".parse::<Selector>().unwrap(), Selector::All);
        assert!(matches!(
            "agent".parse::<Selector>(),
            Err(SelectorError::MissingSigil(_))
        ));
        assert!(matches!(
            "@".parse::<Selector>(),
            Err(SelectorError::BadName { .. })
        ));
        assert!(matches!(
            "#A".parse::<Selector>(),
            Err(SelectorError::BadName { .. })
        ));
    }

    #[test]
    fn matching() {
        let roles = [n("a"), n("b")];
        assert!(Selector::All.matches(&n("x"), roles.iter()));
        assert!(Selector::Role(n("b")).matches(&n("x"), roles.iter()));
        assert!(!Selector::Role(n("c")).matches(&n("x"), roles.iter()));
        assert!(Selector::Named(n("x")).matches(&n("x"), roles.iter()));
        assert!(!Selector::Named(n("a")).matches(&n("x"), roles.iter()));
    }
}
