//! The limits a grant puts on the path itself, enforced by the routers for any service: how
//! many streams an identity may hold open through the grant ([`MaxConnections`]), how fast it
//! may open new ones ([`Rate`]) and how many bytes per second they may move ([`Bandwidth`]).
//!
//! Each is a newtype that cannot hold a bad value, parsed from the text an operator writes
//! (`--connections 2`, `--rate 600/min`, `--bandwidth 10MiB/s`) and printed back as text that
//! parses to the same value, so that `umbra export` round-trips what `apply` took.
//!
//! `rate` is not the gateways' `rpm`: `rpm` counts HTTP requests inside streams at an LLM or MCP
//! gateway (many requests ride one stream), `rate` counts streams a router opens to any service.
//! One field for both would charge an LLM call twice or a plain TCP service never.

use std::fmt;
use std::num::{NonZeroU32, NonZeroU64};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::AllowanceError;

/// The most concurrent streams a grant may allow (it bounds a router's books, not a peer).
pub const MAX_CONNECTIONS: u32 = 1_000_000;
/// The largest count in a rate (per second, minute or hour).
pub const MAX_RATE_COUNT: u32 = 1_000_000;
/// The largest bandwidth: 1 TiB/s, far above any link, so that arithmetic on it never overflows.
pub const MAX_BANDWIDTH: u64 = 1 << 40;

/// Streams one identity may hold open at once through a grant to a service, on one router:
/// 1 to [`MAX_CONNECTIONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct MaxConnections(NonZeroU32);

impl MaxConnections {
    /// The number of streams.
    pub fn get(self) -> u32 {
        self.0.get()
    }
}

impl TryFrom<u32> for MaxConnections {
    type Error = AllowanceError;

    fn try_from(n: u32) -> Result<Self, Self::Error> {
        match NonZeroU32::new(n) {
            Some(n) if n.get() <= MAX_CONNECTIONS => Ok(MaxConnections(n)),
            _ => Err(AllowanceError::Connections),
        }
    }
}

impl From<MaxConnections> for u32 {
    fn from(c: MaxConnections) -> u32 {
        c.get()
    }
}

impl FromStr for MaxConnections {
    type Err = AllowanceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n: u32 = s.trim().parse().map_err(|_| AllowanceError::Connections)?;
        MaxConnections::try_from(n)
    }
}

impl fmt::Display for MaxConnections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The period a [`Rate`] counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RateUnit {
    /// `N/s`.
    Second,
    /// `N/min`.
    Minute,
    /// `N/h`.
    Hour,
}

impl RateUnit {
    /// The period's length.
    pub fn period(self) -> Duration {
        Duration::from_secs(match self {
            RateUnit::Second => 1,
            RateUnit::Minute => 60,
            RateUnit::Hour => 3600,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            RateUnit::Second => "s",
            RateUnit::Minute => "min",
            RateUnit::Hour => "h",
        }
    }
}

/// New streams per period one identity may open through a grant to a service, on one router:
/// `600/min`, `10/s`, `100/h`. A token bucket: it holds one period's count (a burst of `count`
/// streams at once, as `governor`'s quotas do) and refills at `count` per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rate {
    count: NonZeroU32,
    unit: RateUnit,
}

impl Rate {
    /// Streams per period.
    pub fn count(self) -> u32 {
        self.count.get()
    }

    /// The period counted over.
    pub fn unit(self) -> RateUnit {
        self.unit
    }
}

impl FromStr for Rate {
    type Err = AllowanceError;

    /// `N/s`, `N/sec`, `N/min`, `N/m`, `N/h` or `N/hour`, N from 1 to [`MAX_RATE_COUNT`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || AllowanceError::Rate(s.to_string());
        let (count, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().replace('_', "").parse().map_err(|_| bad())?;
        let unit = match unit.trim() {
            "s" | "sec" | "second" => RateUnit::Second,
            "m" | "min" | "minute" => RateUnit::Minute,
            "h" | "hour" => RateUnit::Hour,
            _ => return Err(bad()),
        };
        match NonZeroU32::new(count) {
            Some(count) if count.get() <= MAX_RATE_COUNT => Ok(Rate { count, unit }),
            _ => Err(bad()),
        }
    }
}

impl TryFrom<String> for Rate {
    type Error = AllowanceError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Rate> for String {
    fn from(r: Rate) -> String {
        r.to_string()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.unit.as_str())
    }
}

/// Bytes per second that all of one identity's streams to a service through a grant may move
/// on one router, both directions counted together (what an agent sends plus what it receives):
/// 1 B/s to [`MAX_BANDWIDTH`]. Written `10MiB/s`, `500KB/s`, `1GiB/s` or `4096B/s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Bandwidth(NonZeroU64);

/// The units a bandwidth is written in, largest first (printing picks the first exact one).
const UNITS: [(&str, u64); 7] = [
    ("GiB", 1 << 30),
    ("GB", 1_000_000_000),
    ("MiB", 1 << 20),
    ("MB", 1_000_000),
    ("KiB", 1 << 10),
    ("KB", 1_000),
    ("B", 1),
];

impl Bandwidth {
    /// Bytes per second.
    pub fn bytes_per_sec(self) -> u64 {
        self.0.get()
    }
}

impl TryFrom<u64> for Bandwidth {
    type Error = AllowanceError;

    fn try_from(n: u64) -> Result<Self, Self::Error> {
        match NonZeroU64::new(n) {
            Some(n) if n.get() <= MAX_BANDWIDTH => Ok(Bandwidth(n)),
            _ => Err(AllowanceError::Bandwidth(n.to_string())),
        }
    }
}

impl FromStr for Bandwidth {
    type Err = AllowanceError;

    /// A whole number, a unit (B, KB, MB, GB, KiB, MiB, GiB; case-insensitive) and `/s`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || AllowanceError::Bandwidth(s.to_string());
        let t = s.trim();
        let t = t.strip_suffix("/s").ok_or_else(bad)?.trim_end();
        let digits = t
            .find(|c: char| !c.is_ascii_digit() && c != '_')
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(digits);
        let number: u64 = number.replace('_', "").parse().map_err(|_| bad())?;
        let unit = unit.trim();
        let (_, scale) = (UNITS.iter())
            .find(|(u, _)| u.eq_ignore_ascii_case(unit))
            .ok_or_else(bad)?;
        let bytes = number.checked_mul(*scale).ok_or_else(bad)?;
        Bandwidth::try_from(bytes).map_err(|_| bad())
    }
}

impl TryFrom<String> for Bandwidth {
    type Error = AllowanceError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Bandwidth> for String {
    fn from(b: Bandwidth) -> String {
        b.to_string()
    }
}

impl fmt::Display for Bandwidth {
    /// In the largest unit that divides it exactly: `10MiB/s`, `1500B/s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.get();
        let (unit, scale) = (UNITS.iter())
            .find(|(_, scale)| n % scale == 0)
            .copied()
            .unwrap_or(("B", 1));
        write!(f, "{}{unit}/s", n / scale)
    }
}

/// The router-enforced part of a grant's limits; all absent means the router counts nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Throughput {
    /// Concurrent streams.
    pub connections: Option<MaxConnections>,
    /// New streams per period.
    pub rate: Option<Rate>,
    /// Bytes per second, both directions together.
    pub bandwidth: Option<Bandwidth>,
}

impl Throughput {
    /// Whether the router has nothing to count for this grant.
    pub fn is_unlimited(&self) -> bool {
        *self == Throughput::default()
    }
}

#[cfg(test)]
#[path = "throughput_tests.rs"]
mod tests;
