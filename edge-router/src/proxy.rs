//! The PROXY protocol v2 header a router sends first to a router-hosted service that asks for
//! it (`Service::proxy_protocol`): the caller's network address and, in two TLVs, the identity
//! the router verified, so that the service can log or authorize by identity without trusting
//! anything the caller says.
//!
//! Layout (HAProxy's specification, version 2, command PROXY, stream transport): the 12-byte
//! signature, `0x21`, the family (`0x11` TCP over IPv4, `0x21` TCP over IPv6; IPv4 addresses are
//! written IPv4-mapped when the two families differ), the length of what follows, source and
//! destination address and port, then TLVs:
//! - [`TLV_SPIFFE`] (`0xE0`, first custom type): the caller's SPIFFE id, UTF-8;
//! - [`TLV_IDENTITY_ID`] (`0xE1`): the caller's identity id, UTF-8.
//!
//! The source is the caller's UDP address as the router saw it; the destination is the service
//! address the router dialed.

use std::net::{IpAddr, SocketAddr};

/// The protocol's fixed signature.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// TLV type carrying the caller's SPIFFE id.
pub const TLV_SPIFFE: u8 = 0xE0;
/// TLV type carrying the caller's identity id.
pub const TLV_IDENTITY_ID: u8 = 0xE1;

/// Builds the header. TLV values longer than a TLV can hold are cut (ids are far shorter).
pub fn header(src: SocketAddr, dst: SocketAddr, spiffe: &str, identity_id: &str) -> Vec<u8> {
    let mut addrs = Vec::with_capacity(36);
    let family = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
            0x11
        }
        (s, d) => {
            addrs.extend_from_slice(&v6(s).octets());
            addrs.extend_from_slice(&v6(d).octets());
            0x21
        }
    };
    addrs.extend_from_slice(&src.port().to_be_bytes());
    addrs.extend_from_slice(&dst.port().to_be_bytes());
    for (kind, value) in [(TLV_SPIFFE, spiffe), (TLV_IDENTITY_ID, identity_id)] {
        let v = &value.as_bytes()[..value.len().min(1024)];
        addrs.push(kind);
        addrs.extend_from_slice(&(v.len() as u16).to_be_bytes());
        addrs.extend_from_slice(v);
    }
    let mut out = Vec::with_capacity(16 + addrs.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(0x21);
    out.push(family);
    out.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    out.extend_from_slice(&addrs);
    out
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_with_identity_tlvs() {
        let h = header(
            "10.0.0.1:5000".parse().unwrap(),
            "192.0.2.7:443".parse().unwrap(),
            "spiffe://td/agent/a",
            "id-1",
        );
        assert_eq!(&h[..12], &SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        let len = u16::from_be_bytes([h[14], h[15]]) as usize;
        assert_eq!(h.len(), 16 + len);
        let body = &h[16..];
        assert_eq!(&body[..4], &[10, 0, 0, 1]);
        assert_eq!(&body[4..8], &[192, 0, 2, 7]);
        assert_eq!(u16::from_be_bytes([body[8], body[9]]), 5000);
        assert_eq!(u16::from_be_bytes([body[10], body[11]]), 443);
        let tlvs = &body[12..];
        assert_eq!(tlvs[0], TLV_SPIFFE);
        let l = u16::from_be_bytes([tlvs[1], tlvs[2]]) as usize;
        assert_eq!(&tlvs[3..3 + l], b"spiffe://td/agent/a");
        let rest = &tlvs[3 + l..];
        assert_eq!(rest[0], TLV_IDENTITY_ID);
        assert_eq!(&rest[3..], b"id-1");
    }

    #[test]
    fn mixed_families_use_ipv6() {
        let h = header(
            "[2001:db8::1]:1".parse().unwrap(),
            "192.0.2.7:443".parse().unwrap(),
            "s",
            "i",
        );
        assert_eq!(h[13], 0x21);
        let body = &h[16..];
        assert_eq!(
            &body[16..32],
            &"::ffff:192.0.2.7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
    }
}
