//! Where the router may connect on a caller's behalf.
//!
//! A router-hosted service names `host:port`. When the host is an IP literal, an operator wrote
//! that address on purpose and the router dials it as given. When it is a name, the router
//! resolves it once, refuses the name if any address points back into the router's own network
//! (`umbra_policies::address`: the IANA special-purpose registries as a table, and IPv6 forms
//! that embed such an IPv4 address), and dials the checked IPs, never the name
//! again, so that a DNS answer that changes between check and use (rebinding) gains nothing.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;
use umbra_policies::HostPort;

/// The most resolved addresses tried for one name; a peer-controlled DNS answer cannot make the
/// router try thousands.
const MAX_RESOLVED: usize = 16;

// The rule itself is the pure core's: a table from the IANA special-purpose registries.
pub use umbra_policies::address::{check, Forbidden};

/// Why the router could not connect to a service.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// The name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The name.
        host: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The name resolved to an address the router may not dial.
    #[error("{host} resolves to a refused address ({ip}, {reason})")]
    Forbidden {
        /// The name.
        host: String,
        /// The first refused address.
        ip: IpAddr,
        /// Why it was refused.
        reason: Forbidden,
    },
    /// No address answered.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// The service address.
        target: String,
        /// The last cause.
        source: std::io::Error,
    },
    /// Resolution plus connection took longer than allowed.
    #[error("connecting to {0} timed out")]
    Timeout(String),
}

/// Connects to a router-hosted service's address within `timeout`, applying the rules of this
/// module. Returns the stream and the address actually dialed.
pub async fn connect(
    target: &HostPort,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), EgressError> {
    tokio::time::timeout(timeout, connect_inner(target))
        .await
        .map_err(|_| EgressError::Timeout(target.to_string()))?
}

async fn connect_inner(target: &HostPort) -> Result<(TcpStream, SocketAddr), EgressError> {
    let candidates: Vec<SocketAddr> = match target.ip() {
        // Written literally by an operator: dialed as given.
        Some(ip) => vec![SocketAddr::new(ip, target.port())],
        None => allowed(target.host(), resolve(target).await?)?,
    };
    let mut last = None;
    for addr in candidates {
        match TcpStream::connect(addr).await {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                return Ok((tcp, addr));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(EgressError::Connect {
        target: target.to_string(),
        source: last
            .unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address")),
    })
}

async fn resolve(target: &HostPort) -> Result<Vec<SocketAddr>, EgressError> {
    let addrs = tokio::net::lookup_host((target.host(), target.port()))
        .await
        .map_err(|source| EgressError::Resolve {
            host: target.host().to_owned(),
            source,
        })?;
    Ok(addrs.take(MAX_RESOLVED).collect())
}

/// The resolved addresses, if every one of them may be dialed. One internal address refuses
/// the name: a name that mixes public and internal answers is someone steering the router
/// inwards, and trying the public ones first would only make the attack probabilistic.
fn allowed(host: &str, resolved: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, EgressError> {
    if resolved.is_empty() {
        return Err(EgressError::Resolve {
            host: host.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
        });
    }
    for addr in &resolved {
        if let Err(reason) = check(addr.ip()) {
            tracing::info!(host, ip = %addr.ip(), %reason, "name resolves to a refused address");
            return Err(EgressError::Forbidden {
                host: host.to_owned(),
                ip: addr.ip(),
                reason,
            });
        }
    }
    Ok(resolved)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn verdict(s: &str) -> Result<(), Forbidden> {
        check(s.parse().unwrap())
    }

    #[test]
    fn refuses_internal_ipv4() {
        use Forbidden::*;
        for (ip, why) in [
            ("127.0.0.1", Loopback),
            ("127.255.0.9", Loopback),
            ("169.254.169.254", LinkLocal),
            ("169.254.0.1", LinkLocal),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("100.64.0.1", Cgnat),
            ("100.100.100.200", Cgnat),
            ("100.127.255.255", Cgnat),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("255.255.255.255", Broadcast),
            ("240.0.0.1", Reserved),
        ] {
            assert_eq!(verdict(ip), Err(why), "{ip}");
        }
    }

    #[test]
    fn allows_public_ipv4_next_to_the_ranges() {
        for ip in [
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "169.253.1.1",
            "11.0.0.1",
            "223.255.255.255",
            "1.1.1.1",
        ] {
            assert_eq!(verdict(ip), Ok(()), "{ip}");
        }
    }

    #[test]
    fn refuses_internal_ipv6_and_embedded_forms() {
        use Forbidden::*;
        for (ip, why) in [
            ("::1", Loopback),
            ("::", Unspecified),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("fc00::1", Private),
            ("fd00:ec2::254", Private),
            ("fec0::1", Private),
            ("ff02::1", Multicast),
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:169.254.169.254", LinkLocal),
            ("::ffff:10.0.0.1", Private),
            ("::127.0.0.1", Loopback),
            ("::10.0.0.1", Private),
            ("64:ff9b::a9fe:a9fe", LinkLocal),
            ("64:ff9b::7f00:1", Loopback),
            ("64:ff9b:1::1", Reserved),
            ("2002:7f00:1::", Loopback),
            ("2002:c0a8:101::1", Private),
            ("2002:a9fe:a9fe::", LinkLocal),
            // Teredo: 127.0.0.1 inverted is 128.255.255.254.
            ("2001:0:4136:e378:8000:63bf:80ff:fffe", Loopback),
        ] {
            assert_eq!(verdict(ip), Err(why), "{ip}");
        }
    }

    #[test]
    fn allows_public_ipv6_and_embedded_public_ipv4() {
        for ip in [
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(verdict(ip), Ok(()), "{ip}");
        }
    }

    #[test]
    fn a_name_resolving_to_any_internal_address_is_refused() {
        let resolved = vec![
            "127.0.0.1:80".parse().unwrap(),
            "[::ffff:10.0.0.1]:80".parse().unwrap(),
        ];
        let e = allowed("evil.example", resolved).unwrap_err();
        assert!(
            matches!(
                e,
                EgressError::Forbidden {
                    reason: Forbidden::Loopback,
                    ..
                }
            ),
            "{e}"
        );
        let mixed = vec![
            "8.8.8.8:80".parse().unwrap(),
            "[fd00::1]:80".parse().unwrap(),
        ];
        let e = allowed("mixed.example", mixed).unwrap_err();
        assert!(
            matches!(
                e,
                EgressError::Forbidden {
                    reason: Forbidden::Private,
                    ..
                }
            ),
            "{e}"
        );
        let public = vec![
            "8.8.8.8:80".parse().unwrap(),
            "[2606:4700::1111]:80".parse().unwrap(),
        ];
        assert_eq!(allowed("public.example", public.clone()).unwrap(), public);
        assert!(matches!(
            allowed("empty.example", vec![]),
            Err(EgressError::Resolve { .. })
        ));
    }

    #[tokio::test]
    async fn an_ip_literal_is_dialed_as_given() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target: HostPort = l.local_addr().unwrap().to_string().parse().unwrap();
        let (_tcp, addr) = connect(&target, Duration::from_secs(5)).await.unwrap();
        assert_eq!(addr, l.local_addr().unwrap());
    }
}
