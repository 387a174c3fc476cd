//! SPIFFE ids: the one name under which a certificate identifies an agent, a router or an admin.
//!
//! An Umbra identity is `spiffe://TRUST_DOMAIN/KIND/NAME` with KIND one of `agent`, `router`,
//! `admin` and NAME a [`Name`]. The controller's own server certificate carries
//! `spiffe://TRUST_DOMAIN/controller` (see [`TrustDomain::controller_uri`]), which is deliberately
//! *not* a [`SpiffeId`]: no identity can ever be mistaken for the controller.
//!
//! Parsing is strict, because the id is what authorization decisions are keyed on: one identity
//! must have exactly one spelling, so anything unusual (percent-encoding, a port, upper case, an
//! extra path segment) is refused rather than normalised.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use umbra_policies::{IdentityKind, Name, NameError};

use crate::error::PkiError;

/// The URI scheme of SPIFFE ids.
const SCHEME: &str = "spiffe://";

/// The longest SPIFFE id accepted, as in the SPIFFE specification.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// The longest trust domain accepted.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A validated trust domain: the authority part of every SPIFFE id the CA issues, for example
/// `umbra.local`.
///
/// 1 to 255 characters; dot-separated labels of lower-case ASCII letters, digits, `-` and `_`;
/// labels are 1 to 63 characters and do not start or end with `-`. Upper case is refused rather
/// than folded so that a trust domain has one spelling.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

/// Why a string is not a valid [`TrustDomain`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrustDomainError {
    /// The trust domain is empty.
    #[error("a trust domain must not be empty")]
    Empty,
    /// The trust domain is longer than [`MAX_TRUST_DOMAIN_LEN`].
    #[error("trust domain is {0} bytes long; at most {MAX_TRUST_DOMAIN_LEN} are allowed")]
    TooLong(usize),
    /// The trust domain contains a character outside the allowed alphabet.
    #[error("trust domain contains {0:?}; allowed are a-z, 0-9, '-', '_' and '.'")]
    InvalidChar(char),
    /// A label (the text between dots) is empty, too long, or starts or ends with `-`.
    #[error("trust domain has an empty or badly formed label")]
    BadLabel,
}

impl TrustDomain {
    /// Checks `s` against the trust-domain rules.
    pub fn new(s: impl Into<String>) -> Result<Self, TrustDomainError> {
        let s = s.into();
        if s.is_empty() {
            return Err(TrustDomainError::Empty);
        }
        if s.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(TrustDomainError::TooLong(s.len()));
        }
        if let Some(c) = s.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
        }) {
            return Err(TrustDomainError::InvalidChar(c));
        }
        for label in s.split('.') {
            if label.is_empty()
                || label.len() > 63
                || label.starts_with('-')
                || label.ends_with('-')
            {
                return Err(TrustDomainError::BadLabel);
            }
        }
        Ok(TrustDomain(s))
    }

    /// The trust domain as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE id of the trust domain itself, `spiffe://TD`, carried by the CA certificates so
    /// that a loaded CA can be checked against the trust domain it is configured for.
    pub fn id_uri(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }

    /// The URI SAN of the controller's server certificate, `spiffe://TD/controller`.
    pub fn controller_uri(&self) -> String {
        format!("{SCHEME}{}/controller", self.0)
    }

    /// Parses a trust-domain SPIFFE id, `spiffe://TD` (no path), as found in CA certificates.
    pub fn from_id_uri(uri: &str) -> Result<TrustDomain, SpiffeError> {
        let authority = split_scheme(uri)?;
        check_no_extras(authority)?;
        if authority.contains('/') {
            return Err(SpiffeError::WrongSegmentCount(
                authority.split('/').count().saturating_sub(1),
            ));
        }
        TrustDomain::new(authority).map_err(SpiffeError::TrustDomain)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = TrustDomainError;
    fn try_from(s: String) -> Result<Self, TrustDomainError> {
        TrustDomain::new(s)
    }
}

impl FromStr for TrustDomain {
    type Err = TrustDomainError;
    fn from_str(s: &str) -> Result<Self, TrustDomainError> {
        TrustDomain::new(s)
    }
}

impl From<TrustDomain> for String {
    fn from(t: TrustDomain) -> String {
        t.0
    }
}

impl AsRef<str> for TrustDomain {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// The SPIFFE id of an Umbra identity: `spiffe://TRUST_DOMAIN/{agent|router|admin}/NAME`.
///
/// Built from validated parts, so it can only hold a well-formed id; `Display` gives the URI.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    kind: IdentityKind,
    name: Name,
}

/// Why a string is not a valid Umbra SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeError {
    /// The string is longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("SPIFFE id is {0} bytes long; at most {MAX_SPIFFE_ID_LEN} are allowed")]
    TooLong(usize),
    /// The string does not start with `spiffe://` (the scheme is case-sensitive).
    #[error("not a SPIFFE id: it must start with \"spiffe://\"")]
    NotSpiffe,
    /// The authority carries user information (`user@`).
    #[error("a SPIFFE id must not carry user information")]
    Userinfo,
    /// The authority carries a port.
    #[error("a SPIFFE id must not carry a port")]
    Port,
    /// The id carries a query (`?`).
    #[error("a SPIFFE id must not carry a query")]
    Query,
    /// The id carries a fragment (`#`).
    #[error("a SPIFFE id must not carry a fragment")]
    Fragment,
    /// The id contains percent-encoding, which would give one id several spellings.
    #[error("a SPIFFE id must not contain percent-encoding")]
    PercentEncoded,
    /// The trust domain is invalid.
    #[error("bad trust domain in SPIFFE id: {0}")]
    TrustDomain(TrustDomainError),
    /// The path does not have exactly two segments (`KIND/NAME`).
    #[error("a SPIFFE id path must have exactly 2 segments (kind/name), found {0}")]
    WrongSegmentCount(usize),
    /// A path segment is empty (for example `//` or a trailing `/`).
    #[error("a SPIFFE id path segment is empty")]
    EmptySegment,
    /// The first path segment is not `agent`, `router` or `admin`.
    #[error("unknown identity kind {0:?} in SPIFFE id (expected agent, router or admin)")]
    UnknownKind(String),
    /// The second path segment is not a valid name.
    #[error("bad name in SPIFFE id: {0}")]
    Name(NameError),
}

impl SpiffeId {
    /// The SPIFFE id of the identity `name` of `kind` in `trust_domain`.
    pub fn new(trust_domain: &TrustDomain, kind: IdentityKind, name: &Name) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.clone(),
            kind,
            name: name.clone(),
        }
    }

    /// Parses an Umbra SPIFFE id strictly: scheme `spiffe://`, a valid trust domain without
    /// userinfo or port, exactly two path segments (a known kind and a valid name), no query,
    /// fragment or percent-encoding.
    ///
    /// The error is always [`PkiError::Spiffe`]; [`FromStr`] gives the bare [`SpiffeError`].
    pub fn parse(uri: &str) -> Result<SpiffeId, PkiError> {
        Ok(SpiffeId::parse_strict(uri)?)
    }

    fn parse_strict(uri: &str) -> Result<SpiffeId, SpiffeError> {
        let rest = split_scheme(uri)?;
        check_no_extras(rest)?;
        let (authority, path) = match rest.split_once('/') {
            Some(parts) => parts,
            None => return Err(SpiffeError::WrongSegmentCount(0)),
        };
        let trust_domain = parse_authority(authority)?;
        let segments: Vec<&str> = path.split('/').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return Err(SpiffeError::EmptySegment);
        }
        let [kind, name] = segments.as_slice() else {
            return Err(SpiffeError::WrongSegmentCount(segments.len()));
        };
        let kind = match *kind {
            "agent" => IdentityKind::Agent,
            "router" => IdentityKind::Router,
            "admin" => IdentityKind::Admin,
            other => return Err(SpiffeError::UnknownKind(other.chars().take(64).collect())),
        };
        let name = Name::new(*name).map_err(SpiffeError::Name)?;
        Ok(SpiffeId {
            trust_domain,
            kind,
            name,
        })
    }

    /// The trust domain the id belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// What the identity is for.
    pub fn kind(&self) -> IdentityKind {
        self.kind
    }

    /// The identity's name.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// The id as a URI string (the same as `to_string()`).
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

/// Strips the scheme after checking the length; the rest is authority and path.
fn split_scheme(uri: &str) -> Result<&str, SpiffeError> {
    if uri.len() > MAX_SPIFFE_ID_LEN {
        return Err(SpiffeError::TooLong(uri.len()));
    }
    uri.strip_prefix(SCHEME).ok_or(SpiffeError::NotSpiffe)
}

/// Refuses the URI features that SPIFFE ids must not have anywhere.
fn check_no_extras(rest: &str) -> Result<(), SpiffeError> {
    if rest.contains('#') {
        return Err(SpiffeError::Fragment);
    }
    if rest.contains('?') {
        return Err(SpiffeError::Query);
    }
    if rest.contains('%') {
        return Err(SpiffeError::PercentEncoded);
    }
    Ok(())
}

fn parse_authority(authority: &str) -> Result<TrustDomain, SpiffeError> {
    if authority.contains('@') {
        return Err(SpiffeError::Userinfo);
    }
    if authority.contains(':') {
        return Err(SpiffeError::Port);
    }
    TrustDomain::new(authority).map_err(SpiffeError::TrustDomain)
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, SpiffeError> {
        SpiffeId::parse_strict(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/{}/{}",
            self.trust_domain,
            self.kind.as_str(),
            self.name
        )
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::parse_strict(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).expect("valid trust domain")
    }

    #[test]
    fn trust_domains() {
        for ok in ["umbra.local", "a", "x-y.z_1", "0.0"] {
            assert!(TrustDomain::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(TrustDomain::new(""), Err(TrustDomainError::Empty));
        assert_eq!(
            TrustDomain::new("Umbra.local"),
            Err(TrustDomainError::InvalidChar('U'))
        );
        assert_eq!(
            TrustDomain::new("a:80"),
            Err(TrustDomainError::InvalidChar(':'))
        );
        assert_eq!(TrustDomain::new("a..b"), Err(TrustDomainError::BadLabel));
        assert_eq!(TrustDomain::new(".a"), Err(TrustDomainError::BadLabel));
        assert_eq!(TrustDomain::new("-a.b"), Err(TrustDomainError::BadLabel));
        assert_eq!(
            TrustDomain::new("a".repeat(64)),
            Err(TrustDomainError::BadLabel)
        );
        let long = vec!["a".repeat(60); 5].join(".");
        assert_eq!(
            TrustDomain::new(long.clone()),
            Err(TrustDomainError::TooLong(long.len()))
        );
        assert!(serde_json::from_str::<TrustDomain>("\"BAD\"").is_err());
        assert_eq!(
            serde_json::to_string(&td("umbra.local")).expect("serialize"),
            "\"umbra.local\""
        );
    }

    #[test]
    fn round_trip() {
        let name = Name::new("agent-1").expect("name");
        let id = SpiffeId::new(&td("umbra.local"), IdentityKind::Agent, &name);
        assert_eq!(id.to_string(), "spiffe://umbra.local/agent/agent-1");
        assert_eq!(SpiffeId::from_str(&id.to_string()), Ok(id.clone()));
        assert_eq!(id.kind(), IdentityKind::Agent);
        assert_eq!(id.name().as_str(), "agent-1");
        assert_eq!(id.trust_domain().as_str(), "umbra.local");
        for kind in [
            IdentityKind::Agent,
            IdentityKind::Router,
            IdentityKind::Admin,
        ] {
            let id = SpiffeId::new(&td("t"), kind, &name);
            assert_eq!(SpiffeId::from_str(&id.uri()), Ok(id));
        }
        let json = serde_json::to_string(&id).expect("serialize");
        assert_eq!(
            serde_json::from_str::<SpiffeId>(&json).expect("deserialize"),
            id
        );
    }

    #[test]
    fn strict_parsing() {
        use SpiffeError as E;
        let cases: &[(&str, SpiffeError)] = &[
            ("http://umbra.local/agent/a", E::NotSpiffe),
            ("SPIFFE://umbra.local/agent/a", E::NotSpiffe),
            ("spiffe://u@umbra.local/agent/a", E::Userinfo),
            ("spiffe://umbra.local:443/agent/a", E::Port),
            ("spiffe://umbra.local/agent/a?x=1", E::Query),
            ("spiffe://umbra.local/agent/a#f", E::Fragment),
            ("spiffe://umbra.local/agent/%61", E::PercentEncoded),
            ("spiffe://umbra.local", E::WrongSegmentCount(0)),
            ("spiffe://umbra.local/agent", E::WrongSegmentCount(1)),
            ("spiffe://umbra.local/agent/a/b", E::WrongSegmentCount(3)),
            ("spiffe://umbra.local/agent/a/", E::EmptySegment),
            ("spiffe://umbra.local//a", E::EmptySegment),
            ("spiffe://umbra.local/", E::EmptySegment),
            ("spiffe://umbra.local/controller", E::WrongSegmentCount(1)),
            (
                "spiffe://umbra.local/service/a",
                E::UnknownKind("service".into()),
            ),
            (
                "spiffe://umbra.local/Agent/a",
                E::UnknownKind("Agent".into()),
            ),
            (
                "spiffe://umbra.local/agent/A",
                E::Name(NameError::InvalidChar('A')),
            ),
            ("spiffe:///agent/a", E::TrustDomain(TrustDomainError::Empty)),
            (
                "spiffe://UMBRA/agent/a",
                E::TrustDomain(TrustDomainError::InvalidChar('U')),
            ),
        ];
        for (uri, err) in cases {
            assert_eq!(SpiffeId::from_str(uri).as_ref(), Err(err), "{uri}");
        }
        let long = format!("spiffe://a/agent/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert!(matches!(SpiffeId::from_str(&long), Err(E::TooLong(_))));
    }

    #[test]
    fn trust_domain_uris() {
        let t = td("umbra.local");
        assert_eq!(t.id_uri(), "spiffe://umbra.local");
        assert_eq!(t.controller_uri(), "spiffe://umbra.local/controller");
        assert_eq!(TrustDomain::from_id_uri(&t.id_uri()), Ok(t.clone()));
        assert!(TrustDomain::from_id_uri("spiffe://umbra.local/").is_err());
        assert!(TrustDomain::from_id_uri(&t.controller_uri()).is_err());
        assert!(SpiffeId::parse(&t.controller_uri()).is_err());
    }
}
