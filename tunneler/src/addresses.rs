//! Loopback addresses for intercept names.
//!
//! An intercept given as a loopback IP literal (`127.0.0.1:8443`) is used as it is. An intercept
//! given as a name (`llm.umbra:443`) gets its own loopback address from a private range, so that
//! several services can each keep their real port (two services on 443 cannot share one IP).
//! A name keeps its address for the tunneler's lifetime, even if its service comes and goes, so
//! a hosts file written once stays right.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use umbra_policies::HostPort;

/// First address handed out for names: `127.77.0.1` (clear of `127.0.0.1` and Debian's
/// `127.0.1.1` host alias).
pub const NAME_BASE: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 1);
/// How many names can get an address.
pub const NAME_CAPACITY: u32 = 65_534;

/// Why an intercept cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// The intercept is an IP literal that is not a loopback address: listening there would
    /// expose the service beyond this machine.
    #[error("intercept {0} is not a loopback address; only loopback intercepts are served")]
    NotLoopback(HostPort),
    /// The range for names is used up.
    #[error("no loopback address left for {0}")]
    Exhausted(String),
}

/// Assigns and remembers loopback addresses for names.
#[derive(Debug, Clone)]
pub struct AddressBook {
    base: Ipv4Addr,
    names: BTreeMap<String, Ipv4Addr>,
}

impl Default for AddressBook {
    fn default() -> Self {
        AddressBook::with_base(NAME_BASE)
    }
}

impl AddressBook {
    /// An empty book handing out addresses from `NAME_BASE` (127.77.0.1).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty book handing out addresses from `base` (a loopback address), so that several
    /// tunnelers on one machine can keep apart.
    pub fn with_base(base: Ipv4Addr) -> Self {
        AddressBook {
            base,
            names: BTreeMap::new(),
        }
    }

    /// The IP to listen on for an intercept.
    pub fn resolve(&mut self, intercept: &HostPort) -> Result<IpAddr, AddressError> {
        if let Some(ip) = intercept.ip() {
            return if ip.is_loopback() {
                Ok(ip)
            } else {
                Err(AddressError::NotLoopback(intercept.clone()))
            };
        }
        let name = intercept.host().to_owned();
        if let Some(ip) = self.names.get(&name) {
            return Ok(IpAddr::V4(*ip));
        }
        let n = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        let ip = Ipv4Addr::from(u32::from(self.base).saturating_add(n));
        if n >= NAME_CAPACITY || !ip.is_loopback() {
            return Err(AddressError::Exhausted(name));
        }
        self.names.insert(name, ip);
        Ok(IpAddr::V4(ip))
    }

    /// `/etc/hosts` lines for every name assigned so far.
    pub fn hosts_snippet(&self) -> String {
        let mut out = String::from("# Umbra tunneler: authorized services\n");
        for (name, ip) in &self.names {
            out.push_str(&format!("{ip}\t{name}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(s: &str) -> HostPort {
        s.parse().unwrap()
    }

    #[test]
    fn names_get_stable_distinct_loopback_addresses() {
        let mut b = AddressBook::new();
        let a = b.resolve(&hp("llm.umbra:443")).unwrap();
        let c = b.resolve(&hp("mcp.umbra:443")).unwrap();
        assert_ne!(a, c);
        assert!(a.is_loopback() && c.is_loopback());
        assert_eq!(
            b.resolve(&hp("llm.umbra:8080")).unwrap(),
            a,
            "one address per name, any port"
        );
        assert_eq!(a, IpAddr::V4(NAME_BASE));
        assert!(b.hosts_snippet().contains("127.77.0.1\tllm.umbra\n"));
    }

    #[test]
    fn literals_must_be_loopback() {
        let mut b = AddressBook::new();
        assert_eq!(
            b.resolve(&hp("127.0.0.1:8443")).unwrap(),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            b.resolve(&hp("[::1]:8443")).unwrap(),
            "::1".parse::<IpAddr>().unwrap()
        );
        for bad in ["0.0.0.0:80", "10.0.0.1:80", "[::]:80", "192.168.1.1:443"] {
            assert!(
                matches!(b.resolve(&hp(bad)), Err(AddressError::NotLoopback(_))),
                "{bad}"
            );
        }
    }
}
