//! Where the router may connect on a caller's behalf.
//!
//! A router-hosted service names `host:port`. When the host is an IP literal, an operator wrote
//! that address on purpose and the router dials it as given. When it is a name, the router
//! resolves it once, refuses the name if any address points back into the router's own network
//! (loopback, link-local and cloud metadata, private, CGNAT, unspecified, multicast, broadcast,
//! and IPv6 forms that embed such an IPv4 address), and dials the checked IPs, never the name
//! again, so that a DNS answer that changes between check and use (rebinding) gains nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;
use umbra_policies::HostPort;

/// The most resolved addresses tried for one name; a peer-controlled DNS answer cannot make the
/// router try thousands.
const MAX_RESOLVED: usize = 16;

/// Why an address may not be dialed for a name-addressed service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Forbidden {
    /// 127.0.0.0/8, ::1.
    #[error("loopback")]
    Loopback,
    /// 169.254.0.0/16 (including the 169.254.169.254 metadata service), fe80::/10.
    #[error("link-local or metadata")]
    LinkLocal,
    /// RFC 1918 (10/8, 172.16/12, 192.168/16), unique-local fc00::/7, site-local fec0::/10.
    #[error("private")]
    Private,
    /// Carrier-grade NAT, 100.64.0.0/10 (also where some clouds put their metadata service).
    #[error("shared address space (CGNAT)")]
    Cgnat,
    /// 0.0.0.0/8, ::.
    #[error("unspecified")]
    Unspecified,
    /// 224.0.0.0/4, ff00::/8.
    #[error("multicast")]
    Multicast,
    /// 255.255.255.255.
    #[error("broadcast")]
    Broadcast,
    /// 240.0.0.0/4 and the local-use NAT64 prefix 64:ff9b:1::/48, which can reach anything.
    #[error("reserved")]
    Reserved,
}

/// Whether a resolved address may be dialed. IPv6 addresses that embed an IPv4 address
/// (mapped, compatible, NAT64, 6to4, Teredo) are judged by the address they embed.
pub fn check(ip: IpAddr) -> Result<(), Forbidden> {
    match ip {
        IpAddr::V4(v4) => check_v4(v4),
        IpAddr::V6(v6) => check_v6(v6),
    }
}

fn check_v4(ip: Ipv4Addr) -> Result<(), Forbidden> {
    let [a, b, _, _] = ip.octets();
    if ip.is_broadcast() {
        Err(Forbidden::Broadcast)
    } else if a == 0 {
        Err(Forbidden::Unspecified)
    } else if a == 127 {
        Err(Forbidden::Loopback)
    } else if a == 169 && b == 254 {
        Err(Forbidden::LinkLocal)
    } else if a == 10 || (a == 172 && (16..=31).contains(&b)) || (a == 192 && b == 168) {
        Err(Forbidden::Private)
    } else if a == 100 && (64..=127).contains(&b) {
        Err(Forbidden::Cgnat)
    } else if (224..=239).contains(&a) {
        Err(Forbidden::Multicast)
    } else if a >= 240 {
        Err(Forbidden::Reserved)
    } else {
        Ok(())
    }
}

fn check_v6(ip: Ipv6Addr) -> Result<(), Forbidden> {
    let s = ip.segments();
    let low32 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if ip.is_unspecified() {
        return Err(Forbidden::Unspecified);
    }
    if ip.is_loopback() {
        return Err(Forbidden::Loopback);
    }
    // ::ffff:0:0/96 (mapped) and ::/96 (compatible): the last 32 bits are the IPv4 address.
    if s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0) {
        return check_v4(low32);
    }
    // 64:ff9b::/96, the well-known NAT64 prefix.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return check_v4(low32);
    }
    // 64:ff9b:1::/48, local-use NAT64: translated to anything the operator chose.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        return Err(Forbidden::Reserved);
    }
    // 2002::/16, 6to4: bits 16..48 are the IPv4 address.
    if s[0] == 0x2002 {
        return check_v4(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    // 2001::/32, Teredo: the client's IPv4 address is the last 32 bits, inverted.
    if s[0] == 0x2001 && s[1] == 0 {
        return check_v4(Ipv4Addr::from(!u32::from(low32)));
    }
    if s[0] & 0xffc0 == 0xfe80 {
        return Err(Forbidden::LinkLocal);
    }
    if s[0] & 0xfe00 == 0xfc00 || s[0] & 0xffc0 == 0xfec0 {
        return Err(Forbidden::Private);
    }
    if s[0] & 0xff00 == 0xff00 {
        return Err(Forbidden::Multicast);
    }
    Ok(())
}

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
            "fe00::1",
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
