//! The role attributes of an identity or service.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::name::Name;

/// A set of roles, sorted and without duplicates, in one allocation sized to fit (none when
/// empty).
///
/// A `BTreeSet` allocates a node for eleven entries even for one, and most identities hold one
/// or two roles: at a million identities that node alone was a quarter of a gigabyte in the
/// controller and again in every router. Roles change as a whole (an identity's roles are
/// replaced, never edited in place), so a sorted slice loses nothing.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Roles(Box<[Name]>);

impl Roles {
    /// No roles.
    pub fn new() -> Roles {
        Roles::default()
    }

    /// Whether `role` is one of them.
    pub fn contains(&self, role: &str) -> bool {
        self.0.binary_search_by(|r| r.as_str().cmp(role)).is_ok()
    }

    /// The roles in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Name> {
        self.0.iter()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The roles as a sorted slice.
    pub fn as_slice(&self) -> &[Name] {
        &self.0
    }
}

impl FromIterator<Name> for Roles {
    fn from_iter<I: IntoIterator<Item = Name>>(iter: I) -> Roles {
        let mut v: Vec<Name> = iter.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        Roles(v.into_boxed_slice())
    }
}

impl<const N: usize> From<[Name; N]> for Roles {
    fn from(roles: [Name; N]) -> Roles {
        roles.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Roles {
    type Item = &'a Name;
    type IntoIter = std::slice::Iter<'a, Name>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl IntoIterator for Roles {
    type Item = Name;
    type IntoIter = std::vec::IntoIter<Name>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_vec().into_iter()
    }
}

impl fmt::Debug for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.iter()).finish()
    }
}

/// A list on the wire, as a `BTreeSet` was: sorted, each role once.
impl Serialize for Roles {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

/// Any list of valid names; duplicates are dropped and the order is not kept, as a
/// `BTreeSet` did.
impl<'de> Deserialize<'de> for Roles {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Roles, D::Error> {
        Ok(Vec::<Name>::deserialize(d)?.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        Name::new(s).expect("valid name")
    }

    #[test]
    fn sorted_and_unique_whatever_the_input() {
        let roles: Roles = [n("b"), n("a"), n("b"), n("c")].into_iter().collect();
        let listed: Vec<&str> = roles.iter().map(Name::as_str).collect();
        assert_eq!(listed, ["a", "b", "c"]);
        assert!(roles.contains("a") && roles.contains("c") && !roles.contains("d"));
        assert_eq!(roles.len(), 3);
        assert!(Roles::new().is_empty() && !Roles::new().contains("a"));
    }

    #[test]
    fn the_wire_form_is_a_sorted_list() {
        let roles: Roles = serde_json::from_str(r#"["ops","dev","ops"]"#).expect("roles");
        assert_eq!(roles, Roles::from([n("dev"), n("ops")]));
        assert_eq!(
            serde_json::to_string(&roles).expect("json"),
            r#"["dev","ops"]"#
        );
        assert!(serde_json::from_str::<Roles>(r#"["Bad"]"#).is_err());
        assert!(serde_json::from_str::<Roles>(r#""ops""#).is_err());
    }
}
