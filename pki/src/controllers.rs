//! Where the controllers are: one address or several, written `host:port,host:port,...`.
//!
//! A deployment may run several controllers on one database; a client that knows all of them
//! can fail over when one dies. The list travels as one string everywhere an address used to
//! (the identity file's `controller` field, an enrollment token's `iss`, `--controller`,
//! `--advertise`), so a file or token naming one controller, written before lists existed, is
//! a list of one and keeps working, and nothing that stores the address had to change shape.
//!
//! Items are separated by commas, whitespace around each is ignored, and each is a `HOST:PORT`
//! with IPv6 literals in brackets (`[::1]:443`, whose colons cannot be confused with the
//! separator). An empty item (a stray or doubled comma), a repeated address or more than
//! [`MAX_CONTROLLERS`] addresses is refused: each is a mistake in the operator's list, and a
//! client that silently skipped it would fail over to fewer controllers than the operator thinks.

use std::fmt;
use std::str::FromStr;

use umbra_policies::{HostPort, ParseHostPortError};

/// The most controller addresses in one list: more would make a client's failover (one bounded
/// attempt per address) longer than the outage it is meant to ride out.
pub const MAX_CONTROLLERS: usize = 16;

/// A non-empty list of distinct controller addresses, in the operator's order of preference.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ControllerAddrs(Vec<HostPort>);

/// Why a controller address list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControllerAddrsError {
    /// Nothing but whitespace.
    #[error("no controller address given: expected HOST:PORT, or several separated by commas")]
    Empty,
    /// An item between two commas (or before the first, or after the last) is empty.
    #[error("controller address {position} in {list:?} is empty (a stray comma?)")]
    EmptyItem {
        /// The item's position, from 1.
        position: usize,
        /// The whole list as given.
        list: String,
    },
    /// An item is not a `HOST:PORT`.
    #[error("controller address {position}: {source}")]
    Address {
        /// The item's position, from 1.
        position: usize,
        /// Why it is not an address.
        source: ParseHostPortError,
    },
    /// The same address twice.
    #[error("controller address {0} is listed twice")]
    Duplicate(String),
    /// More than [`MAX_CONTROLLERS`] items.
    #[error("{0} controller addresses; at most {MAX_CONTROLLERS} are accepted")]
    TooMany(usize),
}

impl ControllerAddrs {
    /// A list of one.
    pub fn one(addr: HostPort) -> ControllerAddrs {
        ControllerAddrs(vec![addr])
    }

    /// The addresses, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &HostPort> {
        self.0.iter()
    }

    /// How many addresses (at least one).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always `false`: a list holds at least one address (for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first address.
    pub fn first(&self) -> &HostPort {
        // Never empty: every constructor puts at least one address in.
        &self.0[0]
    }
}

impl FromStr for ControllerAddrs {
    type Err = ControllerAddrsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err(ControllerAddrsError::Empty);
        }
        let items: Vec<&str> = s.split(',').map(str::trim).collect();
        if items.len() > MAX_CONTROLLERS {
            return Err(ControllerAddrsError::TooMany(items.len()));
        }
        let mut out: Vec<HostPort> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let position = i + 1;
            if item.is_empty() {
                return Err(ControllerAddrsError::EmptyItem {
                    position,
                    list: s.to_owned(),
                });
            }
            let addr: HostPort = item
                .parse()
                .map_err(|source| ControllerAddrsError::Address { position, source })?;
            if out.contains(&addr) {
                return Err(ControllerAddrsError::Duplicate(addr.to_string()));
            }
            out.push(addr);
        }
        Ok(ControllerAddrs(out))
    }
}

impl fmt::Display for ControllerAddrs {
    /// The canonical form: items joined by commas, no spaces, IPv6 literals in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ControllerAddrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ControllerAddrs({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Vec<String>, ControllerAddrsError> {
        s.parse::<ControllerAddrs>()
            .map(|l| l.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn one_address_is_a_list_of_one() {
        assert_eq!(parse("127.0.0.1:7443").unwrap(), ["127.0.0.1:7443"]);
        let l: ControllerAddrs = "ctrl.example.com:443".parse().unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l.first().to_string(), "ctrl.example.com:443");
        assert_eq!(l.to_string(), "ctrl.example.com:443");
    }

    #[test]
    fn lists_keep_their_order_and_print_canonically() {
        let l: ControllerAddrs = " a.example:1 ,[::1]:443,\t10.0.0.3:8443 ".parse().unwrap();
        assert_eq!(l.to_string(), "a.example:1,[::1]:443,10.0.0.3:8443");
        // The canonical form parses back to the same list.
        assert_eq!(l.to_string().parse::<ControllerAddrs>().unwrap(), l);
        assert_eq!(l.len(), 3);
        assert!(!l.is_empty());
    }

    #[test]
    fn ipv6_literals_need_brackets() {
        assert_eq!(
            parse("[2001:db8::1]:443,[::1]:80").unwrap(),
            ["[2001:db8::1]:443", "[::1]:80"]
        );
        assert!(matches!(
            parse("::1:443"),
            Err(ControllerAddrsError::Address { position: 1, .. })
        ));
        assert!(matches!(
            parse("127.0.0.1:1,2001:db8::1:443"),
            Err(ControllerAddrsError::Address { position: 2, .. })
        ));
    }

    #[test]
    fn empty_items_are_refused_with_their_position() {
        assert_eq!(parse(""), Err(ControllerAddrsError::Empty));
        assert_eq!(parse("  "), Err(ControllerAddrsError::Empty));
        for (list, position) in [("a:1,,b:2", 2), (",a:1", 1), ("a:1,", 2), ("a:1, ,b:2", 2)] {
            let e = parse(list).unwrap_err();
            assert_eq!(
                e,
                ControllerAddrsError::EmptyItem {
                    position,
                    list: list.to_owned()
                },
                "{list}"
            );
            assert!(e.to_string().contains("empty"), "{e}");
        }
    }

    #[test]
    fn bad_items_duplicates_and_long_lists_are_refused() {
        let e = parse("a:1,b").unwrap_err();
        assert!(matches!(
            e,
            ControllerAddrsError::Address { position: 2, .. }
        ));
        assert!(e.to_string().contains("no port"), "{e}");
        assert!(matches!(
            parse("a:1,b:0"),
            Err(ControllerAddrsError::Address { position: 2, .. })
        ));
        assert!(matches!(
            parse("a b:1"),
            Err(ControllerAddrsError::Address { position: 1, .. })
        ));
        // Names compare case-insensitively, IPv6 literals canonically.
        assert_eq!(
            parse("A.example:1,a.example:1"),
            Err(ControllerAddrsError::Duplicate("a.example:1".into()))
        );
        assert_eq!(
            parse("[::1]:1,[0::1]:1"),
            Err(ControllerAddrsError::Duplicate("[::1]:1".into()))
        );
        let many: Vec<String> = (1..=17).map(|p| format!("h:{p}")).collect();
        assert_eq!(
            parse(&many.join(",")),
            Err(ControllerAddrsError::TooMany(17))
        );
        assert_eq!(parse(&many[..16].join(",")).unwrap().len(), 16);
    }
}
