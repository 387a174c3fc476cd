//! What a grant allows beyond reaching a service: which models (on an LLM gateway), how many
//! tokens per calendar period, and how many requests per minute.
//!
//! These ride on the service policy that grants the path, so one identity and one policy decide
//! both the network path and what the agent may do at its end. The controller only stores and
//! ships them; the gateway hosting the service enforces them. Pure: periods are computed from a
//! timestamp the caller passes in.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// Longest single pattern.
pub const MAX_PATTERN_LEN: usize = 128;
/// Most patterns in one list.
pub const MAX_PATTERNS: usize = 64;

/// Why a pattern list or a budget is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowanceError {
    /// An empty list or an empty pattern.
    #[error("empty pattern")]
    Empty,
    /// A pattern that is too long or holds a character patterns may not hold.
    #[error("invalid pattern {0:?}: 1 to 128 characters, no spaces, commas or control characters")]
    Pattern(String),
    /// Too many patterns.
    #[error("at most {MAX_PATTERNS} patterns")]
    TooMany,
    /// Not `AMOUNT/PERIOD`.
    #[error("invalid budget {0:?}: expected AMOUNT/PERIOD such as 200000/day (minute, hour, day, week or month)")]
    Budget(String),
    /// A requests-per-minute cap that is not a number from 1 to [`crate::MAX_RPM`].
    #[error("rpm must be between 1 and {max}", max = crate::MAX_RPM)]
    Rpm,
    /// A concurrent-stream cap that is not a number from 1 to [`crate::MAX_CONNECTIONS`].
    #[error("connections must be between 1 and {max}", max = crate::MAX_CONNECTIONS)]
    Connections,
    /// Not `COUNT/UNIT` with a count from 1 to [`crate::MAX_RATE_COUNT`].
    #[error("invalid rate {0:?}: expected COUNT/UNIT such as 600/min or 10/s (s, min or h), COUNT from 1 to {max}", max = crate::MAX_RATE_COUNT)]
    Rate(String),
    /// Not a positive bandwidth such as `10MiB/s`, or above [`crate::MAX_BANDWIDTH`].
    #[error("invalid bandwidth {0:?}: expected a whole number, a unit (B, KB, MB, GB, KiB, MiB, GiB) and /s, such as 10MiB/s, from 1B/s to 1024GiB/s")]
    Bandwidth(String),
}

/// A list of glob patterns (`*` any run, `?` one character), each possibly negated with `!`.
/// A name matches when no negated pattern matches it and, if there are plain patterns, one of
/// them does: `github__*,!github__delete_*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Patterns(Vec<String>);

impl Patterns {
    /// Whether `name` is allowed by the list.
    pub fn matches(&self, name: &str) -> bool {
        let mut any_plain = false;
        let mut plain_hit = false;
        for p in &self.0 {
            match p.strip_prefix('!') {
                Some(neg) => {
                    if glob(neg.as_bytes(), name.as_bytes()) {
                        return false;
                    }
                }
                None => {
                    any_plain = true;
                    plain_hit = plain_hit || glob(p.as_bytes(), name.as_bytes());
                }
            }
        }
        !any_plain || plain_hit
    }

    /// The patterns as written.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

/// Glob match with `*` and `?`, linear-time backtracking over the last star.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi.min(p.len())..].iter().all(|&c| c == b'*')
}

impl TryFrom<Vec<String>> for Patterns {
    type Error = AllowanceError;

    fn try_from(v: Vec<String>) -> Result<Self, Self::Error> {
        if v.is_empty() {
            return Err(AllowanceError::Empty);
        }
        if v.len() > MAX_PATTERNS {
            return Err(AllowanceError::TooMany);
        }
        for p in &v {
            let body = p.strip_prefix('!').unwrap_or(p);
            if body.is_empty() {
                return Err(AllowanceError::Empty);
            }
            if p.len() > MAX_PATTERN_LEN
                || body.starts_with('!')
                || !p
                    .chars()
                    .all(|c| c.is_ascii_graphic() && c != ',' && c != '"' && c != '\\')
            {
                return Err(AllowanceError::Pattern(p.clone()));
            }
        }
        Ok(Patterns(v))
    }
}

impl From<Patterns> for Vec<String> {
    fn from(p: Patterns) -> Vec<String> {
        p.0
    }
}

impl FromStr for Patterns {
    type Err = AllowanceError;

    /// A comma-separated list, as on the command line.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Patterns::try_from(
            s.split(',')
                .map(|p| p.trim().to_string())
                .collect::<Vec<_>>(),
        )
    }
}

impl fmt::Display for Patterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// A calendar period, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    /// From second 0 of each minute.
    Minute,
    /// From minute 0 of each hour.
    Hour,
    /// From midnight.
    Day,
    /// From Monday midnight.
    Week,
    /// From midnight of the first.
    Month,
}

impl Period {
    fn name(self) -> &'static str {
        match self {
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// The start of the period that holds `t`.
    pub fn start(self, t: Timestamp) -> Timestamp {
        let s = t.0;
        Timestamp(match self {
            Period::Minute => s - s % 60,
            Period::Hour => s - s % 3600,
            Period::Day => s - s % 86_400,
            Period::Week => {
                let days = s / 86_400;
                // 1970-01-01 was a Thursday: Monday is three days later in the cycle.
                let since_monday = (days + 3) % 7;
                // The first days of 1970 belong to a week that began before the epoch.
                days.saturating_sub(since_monday) * 86_400
            }
            Period::Month => {
                let (y, m, _) = civil(s / 86_400);
                days_from_civil(y, m, 1) * 86_400
            }
        })
    }

    /// The start of the next period after the one that holds `t`.
    pub fn next(self, t: Timestamp) -> Timestamp {
        let start = self.start(t).0;
        Timestamp(match self {
            Period::Minute => start + 60,
            Period::Hour => start + 3600,
            Period::Day => start + 86_400,
            Period::Week => start + 7 * 86_400,
            Period::Month => {
                let (y, m, _) = civil(start / 86_400);
                let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                days_from_civil(y, m, 1) * 86_400
            }
        })
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl FromStr for Period {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "minute" | "min" => Period::Minute,
            "hour" | "h" => Period::Hour,
            "day" | "d" => Period::Day,
            "week" | "w" => Period::Week,
            "month" | "mo" => Period::Month,
            _ => return Err(()),
        })
    }
}

/// Tokens (input and output together) allowed per calendar period: `200000/day`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TokenBudget {
    /// Tokens per period.
    pub amount: u64,
    /// The period.
    pub period: Period,
}

impl FromStr for TokenBudget {
    type Err = AllowanceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || AllowanceError::Budget(s.to_string());
        let (amount, period) = s.trim().split_once('/').ok_or_else(bad)?;
        let amount: u64 = amount.trim().replace('_', "").parse().map_err(|_| bad())?;
        let period: Period = period.trim().parse().map_err(|_| bad())?;
        if amount == 0 || amount > 1_000_000_000_000 {
            return Err(bad());
        }
        Ok(TokenBudget { amount, period })
    }
}

impl TryFrom<String> for TokenBudget {
    type Error = AllowanceError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TokenBudget> for String {
    fn from(b: TokenBudget) -> String {
        b.to_string()
    }
}

impl fmt::Display for TokenBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.amount, self.period.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pats(s: &str) -> Patterns {
        s.parse().unwrap()
    }

    #[test]
    fn globs_and_negations() {
        let p = pats("gpt-4o-mini,claude-*");
        assert!(p.matches("gpt-4o-mini"));
        assert!(p.matches("claude-3-5-haiku"));
        assert!(p.matches("claude-"));
        assert!(!p.matches("gpt-4o"));
        assert!(!p.matches("Claude-3"), "case matters");
        let p = pats("github__*,!github__delete_*");
        assert!(p.matches("github__create_issue"));
        assert!(!p.matches("github__delete_repo"));
        assert!(!p.matches("slack__post"));
        let p = pats("!*__delete_*");
        assert!(p.matches("anything"));
        assert!(!p.matches("x__delete_y"));
        assert!(pats("a?c").matches("abc") && !pats("a?c").matches("ac"));
        assert!(pats("*a*b*").matches("xxaxxbxx") && !pats("*a*b*").matches("xxbxxaxx"));
        assert!(pats("*").matches(""));
        // No catastrophic backtracking.
        let long = "a".repeat(100);
        assert!(!pats(&format!("{}b", "*a".repeat(20))).matches(&long));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", ",", "a,,b", "!", "!!a", "a b", "a\"b", &"x".repeat(129)] {
            assert!(bad.parse::<Patterns>().is_err(), "{bad:?}");
        }
        let many = vec!["a".to_string(); 65].join(",");
        assert_eq!(many.parse::<Patterns>(), Err(AllowanceError::TooMany));
        let json: Result<Patterns, _> = serde_json::from_str("[]");
        assert!(json.is_err());
        let p: Patterns = serde_json::from_str(r#"["a*","!ab"]"#).unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), r#"["a*","!ab"]"#);
    }

    #[test]
    fn budgets_parse_and_print() {
        let b: TokenBudget = "200000/day".parse().unwrap();
        assert_eq!(b.amount, 200_000);
        assert_eq!(b.period, Period::Day);
        assert_eq!(b.to_string(), "200000/day");
        assert_eq!("1_000/month".parse::<TokenBudget>().unwrap().amount, 1000);
        for bad in [
            "",
            "100",
            "/day",
            "0/day",
            "-5/day",
            "10/fortnight",
            "x/day",
        ] {
            assert!(bad.parse::<TokenBudget>().is_err(), "{bad:?}");
        }
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(json, "\"200000/day\"");
        assert_eq!(serde_json::from_str::<TokenBudget>(&json).unwrap(), b);
    }

    #[test]
    fn periods_start_on_calendar_boundaries() {
        // 2026-11-25T23:48:29Z, a Wednesday.
        let t = Timestamp(1_795_650_509);
        assert_eq!(Period::Minute.start(t).0 % 60, 0);
        assert_eq!(Period::Day.start(t), Timestamp(1_795_651_200 - 86_400));
        assert_eq!(Period::Day.next(t), Timestamp(1_795_651_200));
        // Monday 2026-11-23T00:00:00Z.
        assert_eq!(Period::Week.start(t), Timestamp(1_795_392_000));
        assert_eq!(Period::Week.next(t), Timestamp(1_795_392_000 + 7 * 86_400));
        // 2026-11-01T00:00:00Z and 2026-12-01T00:00:00Z.
        assert_eq!(Period::Month.start(t), Timestamp(1_793_491_200));
        assert_eq!(Period::Month.next(t), Timestamp(1_796_083_200));
        // December rolls into January.
        let dec = Timestamp(1_796_083_200 + 86_400 * 10);
        assert_eq!(Period::Month.next(dec), Timestamp(1_798_761_600));
        // A leap day: 2028-02-29T12:00Z is in the month starting 2028-02-01.
        let leap = Timestamp(1_835_438_400);
        assert_eq!(Period::Month.start(leap), Timestamp(1_832_976_000));
        assert_eq!(Period::Month.next(leap), Timestamp(1_835_481_600));
        for s in [0u64, 59, 86_399, 1_000_000_007] {
            for p in [
                Period::Minute,
                Period::Hour,
                Period::Day,
                Period::Week,
                Period::Month,
            ] {
                let t = Timestamp(s);
                assert!(p.start(t) <= t && t < p.next(t), "{p:?} {s}");
            }
        }
    }
}
