//! The data model: identities, services and service policies, and the whole `State`.

use crate::roles::Roles;
use std::fmt;
use std::net::IpAddr;

use imbl::OrdMap;
use serde::{Deserialize, Serialize};

use crate::name::Name;
use crate::selector::Selector;

/// Seconds since the Unix epoch. The core never reads the clock; callers pass `now` in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The timestamp `secs` seconds later, saturating instead of overflowing.
    pub fn plus(self, secs: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(secs))
    }
}

/// The stable, random identifier of an identity, chosen by the controller when it creates it.
///
/// Names can be reused after a delete; ids never are, so anything that must not transfer to a
/// later namesake (certificates, ledgers, audit records) refers to the id. Held inline (the
/// controller's 24-character ids take no allocation), like [`Name`].
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdentityId(compact_str::CompactString);

impl IdentityId {
    /// Checks `s`: 1 to 64 characters of ASCII letters, digits, `-` and `_`.
    pub fn new(s: impl Into<String>) -> Result<Self, crate::NameError> {
        let s = s.into();
        if s.is_empty() {
            return Err(crate::NameError::Empty);
        }
        if s.len() > 64 {
            return Err(crate::NameError::TooLong(s.chars().count()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            return Err(crate::NameError::InvalidChar(c));
        }
        Ok(IdentityId(s.into()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for IdentityId {
    type Error = crate::NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        IdentityId::new(s)
    }
}

impl From<IdentityId> for String {
    fn from(i: IdentityId) -> String {
        i.0.into_string()
    }
}

impl fmt::Display for IdentityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for IdentityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// What an identity is for. The kind is part of its SPIFFE id and decides which endpoints
/// accept it: only `Admin` may use the management API, only `Router` the control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityKind {
    /// An AI agent (or any other workload) that dials or hosts services.
    Agent,
    /// An edge router.
    Router,
    /// An operator allowed to change the controller's state.
    Admin,
}

impl IdentityKind {
    /// The lower-case word used in SPIFFE paths and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Agent => "agent",
            IdentityKind::Router => "router",
            IdentityKind::Admin => "admin",
        }
    }
}

impl fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for IdentityKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "agent" => Ok(IdentityKind::Agent),
            "router" => Ok(IdentityKind::Router),
            "admin" => Ok(IdentityKind::Admin),
            other => Err(format!(
                "unknown identity kind {other:?} (expected agent, router or admin)"
            )),
        }
    }
}

/// An identity: who an agent, router or operator is, as the controller knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// Stable random id; certificates and records refer to it.
    pub id: IdentityId,
    /// Unique human-readable name (unique across all kinds).
    pub name: Name,
    /// What the identity is for.
    pub kind: IdentityKind,
    /// Role attributes that `#role` selectors match.
    #[serde(default)]
    pub roles: Roles,
    /// A disabled identity keeps its record and certificates but is refused everywhere until
    /// enabled again.
    #[serde(default)]
    pub disabled: bool,
    /// A revoked identity is refused everywhere for good; its record stays for audit.
    #[serde(default)]
    pub revoked: bool,
    /// After this instant the identity is refused, whatever its certificates say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
}

impl Identity {
    /// Whether the identity may act at all at `now`: neither disabled, revoked nor expired.
    pub fn is_active(&self, now: Timestamp) -> bool {
        !self.disabled && !self.revoked && self.expires_at.is_none_or(|e| now < e)
    }
}

/// A host (DNS name or IP literal) and a port: a service's address or an intercept address.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPort {
    host: String,
    port: u16,
}

/// Why a string is not a valid `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseHostPortError {
    /// No `:port` part.
    #[error("{0:?} has no port: expected HOST:PORT (IPv6 as [ADDR]:PORT)")]
    MissingPort(String),
    /// The port is not a number from 1 to 65535.
    #[error("{0:?}: the port must be a number from 1 to 65535")]
    BadPort(String),
    /// The host is neither an IP literal nor a valid DNS name.
    #[error("{0:?}: the host must be an IP address or a DNS name of letters, digits, '-' and '.'")]
    BadHost(String),
}

impl HostPort {
    /// Builds a host and port, checking the host.
    pub fn new(host: &str, port: u16) -> Result<Self, ParseHostPortError> {
        let shown = format!("{host}:{port}");
        if port == 0 {
            return Err(ParseHostPortError::BadPort(shown));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(HostPort {
                host: ip.to_string(),
                port,
            });
        }
        if !is_dns_name(host) {
            return Err(ParseHostPortError::BadHost(shown));
        }
        Ok(HostPort {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// The host: a lower-case DNS name or a canonical IP literal (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host as an IP address, when it is a literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

/// RFC 1123 host names: labels of 1 to 63 letters, digits and '-', not starting or ending with
/// '-', at most 253 characters in all. A trailing dot is not accepted.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

impl std::str::FromStr for HostPort {
    type Err = ParseHostPortError;
    fn from_str(s: &str) -> Result<Self, ParseHostPortError> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| ParseHostPortError::MissingPort(s.to_owned()))?;
            (h, p)
        } else {
            s.rsplit_once(':')
                .ok_or_else(|| ParseHostPortError::MissingPort(s.to_owned()))?
        };
        if host.contains(':') && !s.starts_with('[') {
            return Err(ParseHostPortError::BadHost(s.to_owned()));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| ParseHostPortError::BadPort(s.to_owned()))?;
        HostPort::new(host, port).map_err(|e| match e {
            ParseHostPortError::BadHost(_) => ParseHostPortError::BadHost(s.to_owned()),
            ParseHostPortError::BadPort(_) => ParseHostPortError::BadPort(s.to_owned()),
            other => other,
        })
    }
}

impl TryFrom<String> for HostPort {
    type Error = ParseHostPortError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<HostPort> for String {
    fn from(h: HostPort) -> String {
        h.to_string()
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How a service is reached once a router has authorized a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hosting {
    /// The router dials this address itself.
    Address(HostPort),
    /// The service is hosted through the SDK by identities that hold Bind on it; it has no
    /// listening port anywhere.
    Sdk,
}

/// A service: something an identity can dial through the overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Unique name; what clients put in a stream request.
    pub name: Name,
    /// Role attributes that `#role` selectors match.
    #[serde(default)]
    pub roles: Roles,
    /// How the service is reached.
    pub hosting: Hosting,
    /// Where tunnelers expose the service to agents (`llm.umbra:443`, `127.0.0.1:8443`).
    #[serde(default)]
    pub intercepts: Vec<HostPort>,
    /// Whether a router sends a PROXY protocol v2 header carrying the caller's identity to a
    /// router-hosted service.
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// What a service policy grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Open streams to the service.
    Dial,
    /// Host the service through the SDK.
    Bind,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Dial => "dial",
            Action::Bind => "bind",
        })
    }
}

/// How a policy combines its selectors, for identities and services alike (as OpenZiti does).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Semantic {
    /// An entity matches when any selector matches it.
    #[default]
    #[serde(rename = "anyOf")]
    AnyOf,
    /// An entity matches only when every selector matches it.
    #[serde(rename = "allOf")]
    AllOf,
}

impl Semantic {
    /// Combines selectors: an empty list matches nothing under either semantic, so that a
    /// policy with no selectors can never grant anything by accident.
    pub fn matches(self, selectors: &[Selector], name: &Name, roles: &Roles) -> bool {
        if selectors.is_empty() {
            return false;
        }
        match self {
            Semantic::AnyOf => selectors.iter().any(|s| s.matches(name, roles.iter())),
            Semantic::AllOf => selectors.iter().all(|s| s.matches(name, roles.iter())),
        }
    }
}

impl fmt::Display for Semantic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Semantic::AnyOf => "anyOf",
            Semantic::AllOf => "allOf",
        })
    }
}

/// A service policy: which identities may dial (or bind) which services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePolicy {
    /// Unique name.
    pub name: Name,
    /// What it grants.
    pub action: Action,
    /// Which identities it grants to.
    pub identities: Vec<Selector>,
    /// Which services it grants.
    pub services: Vec<Selector>,
    /// How the selectors combine.
    #[serde(default)]
    pub semantic: Semantic,
    /// What the grant allows at the gateway hosting the service (flat fields on the wire).
    #[serde(flatten)]
    pub limits: crate::GrantLimits,
}

impl ServicePolicy {
    /// Whether this policy selects the identity (ignoring whether the identity is active).
    pub fn selects_identity(&self, identity: &Identity) -> bool {
        self.semantic
            .matches(&self.identities, &identity.name, &identity.roles)
    }

    /// Whether this policy selects the service.
    pub fn selects_service(&self, service: &Service) -> bool {
        self.semantic
            .matches(&self.services, &service.name, &service.roles)
    }
}

/// The whole model at one instant: what the controller stores and what routers receive.
///
/// The maps are persistent (`imbl::OrdMap`, ordered by key like a `BTreeMap` and serialized the
/// same way): cloning a state is O(1) and a changed copy shares everything it did not change,
/// so that every commit can keep the previous version (a router's replica, the index's copy, a
/// write's candidate) without copying 100,000 identities.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Identities by id.
    pub identities: OrdMap<IdentityId, Identity>,
    /// Services by name.
    pub services: OrdMap<Name, Service>,
    /// Service policies by name.
    pub policies: OrdMap<Name, ServicePolicy>,
}

impl State {
    /// Finds an identity by name (names are unique across kinds).
    pub fn identity_by_name(&self, name: &str) -> Option<&Identity> {
        self.identities.values().find(|i| i.name.as_str() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parsing() {
        let h: HostPort = "LLM.umbra:443".parse().unwrap();
        assert_eq!((h.host(), h.port()), ("llm.umbra", 443));
        assert_eq!(h.to_string(), "llm.umbra:443");
        let v6: HostPort = "[::1]:8443".parse().unwrap();
        assert_eq!(v6.host(), "::1");
        assert_eq!(v6.to_string(), "[::1]:8443");
        assert!(v6.ip().is_some());
        for bad in [
            "llm",
            "llm:0",
            "llm:70000",
            "llm:x",
            "::1:80",
            "a_b:1",
            "-a:1",
            ":80",
            "a..b:1",
        ] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad}");
        }
    }

    #[test]
    fn empty_selectors_match_nothing() {
        let n = Name::new("x").unwrap();
        let roles = Roles::new();
        assert!(!Semantic::AnyOf.matches(&[], &n, &roles));
        assert!(!Semantic::AllOf.matches(&[], &n, &roles));
        assert!(Semantic::AllOf.matches(&[Selector::All], &n, &roles));
    }

    #[test]
    fn identity_activity() {
        let mut i = Identity {
            id: IdentityId::new("id1").unwrap(),
            name: Name::new("a").unwrap(),
            kind: IdentityKind::Agent,
            roles: Roles::new(),
            disabled: false,
            revoked: false,
            expires_at: Some(Timestamp(100)),
        };
        assert!(i.is_active(Timestamp(99)));
        assert!(!i.is_active(Timestamp(100)));
        i.expires_at = None;
        i.revoked = true;
        assert!(!i.is_active(Timestamp(0)));
    }
}
