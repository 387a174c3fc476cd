//! The limits a grant carries to the gateway hosting its service, as one validated value.
//!
//! A service policy, a grant request, the grant a hosting gateway sees and the YAML document
//! all carry the same optional limits: six the gateways enforce, and three the routers enforce
//! for any service (`connections`, `rate`, `bandwidth`; see the `throughput` module). They used to be six loose fields copied into each of
//! those places, and the requests-per-minute range was checked by hand in three of them. Here
//! they are one [`GrantLimits`] whose fields are newtypes that cannot hold a bad value
//! ([`Rpm`], [`TokenBudget`], [`Patterns`]), so the checks exist once and every place that
//! holds limits holds valid ones. On the wire and in YAML they stay six flat, optional fields.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{AllowanceError, Bandwidth, MaxConnections, Patterns, Rate, Throughput, TokenBudget};

/// The most requests per minute a grant may carry.
pub const MAX_RPM: u32 = 1_000_000;

/// Requests per minute one identity may make through a grant: 1 to [`MAX_RPM`].
///
/// Zero would be a grant that allows nothing, which is what revoking the policy is for; the
/// upper bound keeps the gateway's per-minute windows small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Rpm(NonZeroU32);

impl Rpm {
    /// The number of requests per minute.
    pub fn get(self) -> u32 {
        self.0.get()
    }
}

impl TryFrom<u32> for Rpm {
    type Error = AllowanceError;

    fn try_from(n: u32) -> Result<Self, Self::Error> {
        match NonZeroU32::new(n) {
            Some(n) if n.get() <= MAX_RPM => Ok(Rpm(n)),
            _ => Err(AllowanceError::Rpm),
        }
    }
}

impl From<Rpm> for u32 {
    fn from(r: Rpm) -> u32 {
        r.get()
    }
}

impl FromStr for Rpm {
    type Err = AllowanceError;

    /// A decimal number, as on the command line.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n: u32 = s.trim().parse().map_err(|_| AllowanceError::Rpm)?;
        Rpm::try_from(n)
    }
}

impl fmt::Display for Rpm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a grant allows beyond reaching the service. Every field absent (the default) means no
/// limit: any model, no token cap, no rate cap, every MCP tool, resource and prompt shown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GrantLimits {
    /// Which models a gateway hosting the service lets these identities use; absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Patterns>,
    /// Tokens per calendar period each identity may spend through this grant; absent: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenBudget>,
    /// Requests per minute each identity may make through this grant; absent: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<Rpm>,
    /// Which MCP tools (`server__tool`) a gateway hosting the service shows; absent: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Patterns>,
    /// Which MCP resources (`server__uri`); absent: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Patterns>,
    /// Which MCP prompts (`server__prompt`); absent: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<Patterns>,
    /// Streams each identity may hold open at once through this grant, per router; absent: no
    /// cap beyond the router's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<MaxConnections>,
    /// New streams per period each identity may open through this grant, per router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// Bytes per second all of an identity's streams through this grant may move (both
    /// directions together), per router: streams are slowed down to it, never cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
}

impl GrantLimits {
    /// Whether the grant lets its identities use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.matches(model))
    }

    /// The part of the limits that routers enforce.
    pub fn throughput(&self) -> Throughput {
        Throughput {
            connections: self.connections,
            rate: self.rate,
            bandwidth: self.bandwidth,
        }
    }

    /// Whether no limit is set.
    pub fn is_unlimited(&self) -> bool {
        *self == GrantLimits::default()
    }
}

impl fmt::Display for GrantLimits {
    /// The set limits on one line, `models=a,b tokens=1000/day rpm=60 rate=600/min`, or `-` for
    /// none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unlimited() {
            return f.write_str("-");
        }
        let mut sep = "";
        let mut field = |f: &mut fmt::Formatter<'_>, k: &str, v: &dyn fmt::Display| {
            let r = write!(f, "{sep}{k}={v}");
            sep = " ";
            r
        };
        if let Some(m) = &self.models {
            field(f, "models", m)?;
        }
        if let Some(t) = &self.tokens {
            field(f, "tokens", t)?;
        }
        if let Some(r) = &self.rpm {
            field(f, "rpm", r)?;
        }
        for (k, v) in [
            ("tools", &self.tools),
            ("resources", &self.resources),
            ("prompts", &self.prompts),
        ] {
            if let Some(v) = v {
                field(f, k, v)?;
            }
        }
        if let Some(c) = &self.connections {
            field(f, "connections", c)?;
        }
        if let Some(r) = &self.rate {
            field(f, "rate", r)?;
        }
        if let Some(b) = &self.bandwidth {
            field(f, "bandwidth", b)?;
        }
        Ok(())
    }
}

/// The limits as written in a YAML document, still unparsed, so that every invalid field can
/// be reported at its own path rather than only the first one serde meets.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RawLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tokens: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rpm: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tools: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) resources: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) prompts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) bandwidth: Option<String>,
}

impl RawLimits {
    /// Parses every field; on failure, each invalid field's name with its error.
    pub(crate) fn parse(self) -> Result<GrantLimits, Vec<(&'static str, AllowanceError)>> {
        fn field<T>(
            errors: &mut Vec<(&'static str, AllowanceError)>,
            name: &'static str,
            r: Result<Option<T>, AllowanceError>,
        ) -> Option<T> {
            r.unwrap_or_else(|e| {
                errors.push((name, e));
                None
            })
        }
        let patterns = |v: Option<Vec<String>>| v.map(Patterns::try_from).transpose();
        let mut errors = Vec::new();
        let e = &mut errors;
        // In the order the document lists problems: pattern lists first, then the numbers.
        let models = field(e, "models", patterns(self.models));
        let tools = field(e, "tools", patterns(self.tools));
        let resources = field(e, "resources", patterns(self.resources));
        let prompts = field(e, "prompts", patterns(self.prompts));
        let tokens = field(e, "tokens", self.tokens.map(|t| t.parse()).transpose());
        let rpm = field(e, "rpm", self.rpm.map(Rpm::try_from).transpose());
        let connections = self.connections.map(MaxConnections::try_from);
        let connections = field(e, "connections", connections.transpose());
        let rate = field(e, "rate", self.rate.map(|r| r.parse()).transpose());
        let bandwidth = field(
            e,
            "bandwidth",
            self.bandwidth.map(|b| b.parse()).transpose(),
        );
        let limits = GrantLimits {
            models,
            tokens,
            rpm,
            tools,
            resources,
            prompts,
            connections,
            rate,
            bandwidth,
        };
        if errors.is_empty() {
            Ok(limits)
        } else {
            Err(errors)
        }
    }
}

impl From<&GrantLimits> for RawLimits {
    fn from(l: &GrantLimits) -> RawLimits {
        let strings = |p: &Option<Patterns>| p.as_ref().map(|p| p.as_slice().to_vec());
        RawLimits {
            models: strings(&l.models),
            tokens: l.tokens.map(|t| t.to_string()),
            rpm: l.rpm.map(Rpm::get),
            tools: strings(&l.tools),
            resources: strings(&l.resources),
            prompts: strings(&l.prompts),
            connections: l.connections.map(MaxConnections::get),
            rate: l.rate.map(|r| r.to_string()),
            bandwidth: l.bandwidth.map(|b| b.to_string()),
        }
    }
}

#[cfg(test)]
#[path = "limits_tests.rs"]
mod tests;
