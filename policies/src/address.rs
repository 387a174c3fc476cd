//! Which addresses a router may dial for a name-addressed service: the SSRF rule.
//!
//! A name that resolves back into the router's own network (loopback, link-local and cloud
//! metadata services, private ranges, benchmarking and documentation ranges, protocol
//! assignments) must not be dialed, or any agent granted a name-addressed service could reach
//! what only the router can. The rule is a table, [`V4`] and [`V6`], taken row by row from the
//! IANA IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890 and its updates) plus the
//! multicast ranges; the longest matching prefix decides. Rows the registries mark globally
//! reachable (AS112, AMT, the PCP and TURN anycast addresses) are absent from the table, so
//! they are dialed like any public address. IPv6 forms that embed an IPv4 address (mapped,
//! translated, compatible, NAT64, 6to4, Teredo) are judged by the address they embed. Outside
//! global unicast (`2000::/3`) nothing in IPv6 is assigned, so everything else is refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
    /// Documentation ranges (TEST-NET-1/2/3, 2001:db8::/32, 3fff::/20): never a real service.
    #[error("documentation")]
    Documentation,
    /// Benchmarking, 198.18.0.0/15 and 2001:2::/48: lab networks, often the router's own.
    #[error("benchmarking")]
    Benchmarking,
    /// IETF protocol assignments (192.0.0.0/24, holding 192.0.0.192, a cloud metadata address;
    /// 2001::/23), the discard prefix 100::/64, 240.0.0.0/4, the local-use NAT64 prefix
    /// 64:ff9b:1::/48 (translated to anything the operator chose), SRv6 SIDs, the retired 6to4
    /// relay anycast, and everything in IPv6 outside global unicast.
    #[error("reserved")]
    Reserved,
}

/// What a row of the table says about the addresses it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Refused, for this reason.
    Refuse(Forbidden),
    /// Judged by the IPv4 address embedded the way this form embeds it.
    Embedded(Embedding),
}

/// Where an IPv6 form carries an IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Embedding {
    /// The last 32 bits (mapped, translated, compatible, NAT64 64:ff9b::/96).
    Low32,
    /// Bits 16 to 48 (6to4, 2002::/16).
    SixToFour,
    /// The last 32 bits, inverted (Teredo's client address, 2001::/32).
    Teredo,
}

use Embedding::*;
use Forbidden::*;
use Rule::*;

/// The IPv4 rows: network, prefix length, rule.
pub const V4: &[(Ipv4Addr, u8, Rule)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, Refuse(Unspecified)),
    (Ipv4Addr::new(10, 0, 0, 0), 8, Refuse(Private)),
    (Ipv4Addr::new(100, 64, 0, 0), 10, Refuse(Cgnat)),
    (Ipv4Addr::new(127, 0, 0, 0), 8, Refuse(Loopback)),
    (Ipv4Addr::new(169, 254, 0, 0), 16, Refuse(LinkLocal)),
    (Ipv4Addr::new(172, 16, 0, 0), 12, Refuse(Private)),
    (Ipv4Addr::new(192, 0, 0, 0), 24, Refuse(Reserved)),
    (Ipv4Addr::new(192, 0, 2, 0), 24, Refuse(Documentation)),
    (Ipv4Addr::new(192, 88, 99, 0), 24, Refuse(Reserved)),
    (Ipv4Addr::new(192, 168, 0, 0), 16, Refuse(Private)),
    (Ipv4Addr::new(198, 18, 0, 0), 15, Refuse(Benchmarking)),
    (Ipv4Addr::new(198, 51, 100, 0), 24, Refuse(Documentation)),
    (Ipv4Addr::new(203, 0, 113, 0), 24, Refuse(Documentation)),
    (Ipv4Addr::new(224, 0, 0, 0), 4, Refuse(Multicast)),
    (Ipv4Addr::new(240, 0, 0, 0), 4, Refuse(Reserved)),
    (Ipv4Addr::new(255, 255, 255, 255), 32, Refuse(Broadcast)),
];

const fn v6(s: [u16; 8]) -> Ipv6Addr {
    Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])
}

/// The IPv6 rows: network, prefix length, rule. `::/0` (the last row) refuses what no longer
/// prefix allows; `2000::/3` lets global unicast through.
pub const V6: &[(Ipv6Addr, u8, Rule)] = &[
    (v6([0; 8]), 128, Refuse(Unspecified)),
    (v6([0, 0, 0, 0, 0, 0, 0, 1]), 128, Refuse(Loopback)),
    (v6([0; 8]), 96, Embedded(Low32)),
    (v6([0, 0, 0, 0, 0, 0xffff, 0, 0]), 96, Embedded(Low32)),
    (v6([0, 0, 0, 0, 0xffff, 0, 0, 0]), 96, Embedded(Low32)),
    (v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0]), 96, Embedded(Low32)),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0]), 48, Refuse(Reserved)),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0]), 64, Refuse(Reserved)),
    (v6([0x100, 0, 0, 1, 0, 0, 0, 0]), 64, Refuse(Reserved)),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0]), 23, Refuse(Reserved)),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0]), 32, Embedded(Teredo)),
    (v6([0x2001, 2, 0, 0, 0, 0, 0, 0]), 48, Refuse(Benchmarking)),
    (
        v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0]),
        32,
        Refuse(Documentation),
    ),
    (v6([0x2002, 0, 0, 0, 0, 0, 0, 0]), 16, Embedded(SixToFour)),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0]), 20, Refuse(Documentation)),
    (v6([0x5f00, 0, 0, 0, 0, 0, 0, 0]), 16, Refuse(Reserved)),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0]), 7, Refuse(Private)),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0]), 10, Refuse(LinkLocal)),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0]), 10, Refuse(Private)),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0]), 8, Refuse(Multicast)),
    (v6([0; 8]), 0, Refuse(Reserved)),
];

/// Global unicast, `2000::/3`: what the table's rows carve exceptions from.
const GLOBAL_UNICAST: (Ipv6Addr, u8) = (v6([0x2000, 0, 0, 0, 0, 0, 0, 0]), 3);

fn in_v4(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

fn in_v6(ip: Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    u128::from(ip) & mask == u128::from(net) & mask
}

/// Whether an address may be dialed for a name-addressed service.
pub fn check(ip: IpAddr) -> Result<(), Forbidden> {
    match ip {
        IpAddr::V4(v4) => check_v4(v4),
        IpAddr::V6(v6) => check_v6(v6),
    }
}

fn check_v4(ip: Ipv4Addr) -> Result<(), Forbidden> {
    match V4
        .iter()
        .filter(|(net, len, _)| in_v4(ip, *net, *len))
        .max_by_key(|(_, len, _)| *len)
    {
        Some((_, _, Refuse(why))) => Err(*why),
        // No IPv4 row embeds anything; a row that did would be a table error, refused.
        Some((_, _, Embedded(_))) => Err(Reserved),
        None => Ok(()),
    }
}

fn check_v6(ip: Ipv6Addr) -> Result<(), Forbidden> {
    let longest = V6
        .iter()
        .filter(|(net, len, _)| in_v6(ip, *net, *len))
        .max_by_key(|(_, len, _)| *len);
    let bits = u128::from(ip);
    match longest {
        Some((_, len, Refuse(_))) if *len == 0 && in_v6(ip, GLOBAL_UNICAST.0, GLOBAL_UNICAST.1) => {
            Ok(())
        }
        Some((_, _, Refuse(why))) => Err(*why),
        Some((_, _, Embedded(how))) => {
            let v4 = match how {
                Low32 => bits as u32,
                SixToFour => (bits >> 80) as u32,
                Teredo => !(bits as u32),
            };
            check_v4(Ipv4Addr::from(v4))
        }
        None => Err(Reserved),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(s: &str) -> Result<(), Forbidden> {
        check(s.parse().expect("an address"))
    }

    fn last_v4(net: Ipv4Addr, len: u8) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(net) | u32::MAX.checked_shr(u32::from(len)).unwrap_or(0))
    }

    fn last_v6(net: Ipv6Addr, len: u8) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(net) | u128::MAX.checked_shr(u32::from(len)).unwrap_or(0))
    }

    #[test]
    fn every_ipv4_row_refuses_its_first_and_last_address_and_not_its_neighbours() {
        for (net, len, rule) in V4 {
            let Refuse(why) = rule else {
                panic!("{net}/{len}: IPv4 rows refuse")
            };
            let (first, last) = (*net, last_v4(*net, *len));
            // The most specific row decides (255.255.255.255 is broadcast, not 240.0.0.0/4).
            for ip in [first, last] {
                let longest = V4
                    .iter()
                    .filter(|(m, l, _)| in_v4(ip, *m, *l))
                    .map(|(_, l, _)| *l)
                    .max();
                if longest == Some(*len) {
                    assert_eq!(check_v4(ip), Err(*why), "{ip} ({net}/{len})");
                }
            }
            for n in [
                u32::from(first).wrapping_sub(1),
                u32::from(last).wrapping_add(1),
            ] {
                let n = Ipv4Addr::from(n);
                if !V4.iter().any(|(m, l, _)| in_v4(n, *m, *l)) {
                    assert_eq!(check_v4(n), Ok(()), "{n}, next to {net}/{len}");
                }
            }
        }
    }

    #[test]
    fn every_ipv6_row_decides_its_first_and_last_address() {
        for (net, len, rule) in V6 {
            let (first, last) = (*net, last_v6(*net, *len));
            for ip in [first, last] {
                // Only where this row is the longest match.
                let longest = V6
                    .iter()
                    .filter(|(m, l, _)| in_v6(ip, *m, *l))
                    .map(|(_, l, _)| *l)
                    .max();
                if longest != Some(*len) {
                    continue;
                }
                match rule {
                    Refuse(why) if *len > 0 => assert_eq!(check_v6(ip), Err(*why), "{ip}"),
                    Refuse(why) => assert_eq!(check_v6(ip), Err(*why), "{ip} (::/0)"),
                    // First and last of an embedding prefix embed 0.0.0.0 or 255.255.255.255.
                    Embedded(_) => assert!(check_v6(ip).is_err(), "{ip}"),
                }
            }
        }
    }

    #[test]
    fn the_gaps_found_by_review_are_refused() {
        for (ip, why) in [
            ("192.0.0.192", Reserved),
            ("192.0.0.1", Reserved),
            ("198.18.0.1", Benchmarking),
            ("198.19.255.255", Benchmarking),
            ("192.0.2.7", Documentation),
            ("203.0.113.9", Documentation),
            ("::ffff:0:7f00:1", Loopback),
            ("::ffff:0:a9fe:a9fe", LinkLocal),
            ("100::1", Reserved),
            ("2001:db8::1", Documentation),
            ("2001:2::1", Benchmarking),
            ("2001:10::1", Reserved),
            ("3fff::1", Documentation),
            ("fe00::1", Reserved),
            ("4000::1", Reserved),
        ] {
            assert_eq!(verdict(ip), Err(why), "{ip}");
        }
    }

    #[test]
    fn globally_reachable_special_addresses_and_public_ones_are_allowed() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "192.0.1.255",
            "192.31.196.1",
            "192.52.193.1",
            "192.175.48.1",
            "198.17.255.255",
            "198.20.0.0",
            "2606:4700::1111",
            "2620:4f:8000::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2001:200::1",
        ] {
            assert_eq!(verdict(ip), Ok(()), "{ip}");
        }
    }

    proptest::proptest! {
        /// Every IPv6 form that embeds an IPv4 address is judged as that address is.
        #[test]
        fn embedded_forms_are_judged_as_what_they_embed(a in proptest::prelude::any::<u32>()) {
            let v4 = check_v4(Ipv4Addr::from(a));
            let a = u128::from(a);
            for form in [
                0xffff_0000_0000u128 | a,
                0xffff_0000_0000_0000u128 | a,
                (0x64_u128 << 112) | (0xff9b_u128 << 96) | a,
                (0x2002_u128 << 112) | (a << 80),
                (0x2001_u128 << 112) | (!a & 0xffff_ffff),
            ] {
                proptest::prop_assert_eq!(check_v6(Ipv6Addr::from(form)), v4);
            }
        }
    }
}
