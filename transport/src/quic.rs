//! QUIC settings that clients and routers share: datagram size, socket buffers and congestion
//! control. Measured on loopback through tunneler and router (data-plane bench, 2 cores):
//! 1,452-byte packets with default buffers moved 4.0 to 4.4 Gbit/s at 2.7 core-s/GB; 6,500-byte
//! packets with 2 MiB buffers 7.7 to 8.2 Gbit/s at 1.4 core-s/GB, without a lost packet.

use std::sync::Arc;

use quinn::{EndpointConfig, MtuDiscoveryConfig, TransportConfig};
use quinn_proto::ConnectionIdGenerator as _;

use crate::congestion::LowQueueConfig;

/// The largest UDP payload Umbra sends or accepts. Path MTU discovery probes up to it and keeps
/// what the path carries: on loopback (MTU 65,536) and jumbo-frame links it saves most of the
/// per-packet work (packet building, encryption calls, acknowledgements, syscalls and skbs),
/// which dominates at 1,452 bytes; on an Ethernet path the probes are lost and packets stay at
/// the Ethernet size. Ten of them (quinn's largest GSO batch) fit in one 64 KiB send.
pub const MAX_UDP_PAYLOAD: u16 = 6_500;

/// The kernel buffer asked for each QUIC socket, both directions. The default (208 KiB) holds
/// about thirty 6,500-byte datagrams: a receiver busy for a few hundred microseconds drops the
/// rest, and every drop is a congestion event for the sender.
pub const SOCKET_BUFFER: usize = 2 * 1024 * 1024;

/// An endpoint configuration that accepts [`MAX_UDP_PAYLOAD`]-sized datagrams.
pub fn endpoint_config() -> EndpointConfig {
    let mut cfg = EndpointConfig::default();
    // In quinn's accepted range (1,200 to 65,527), so this cannot fail.
    let _ = cfg.max_udp_payload_size(MAX_UDP_PAYLOAD);
    cfg
}

/// [`endpoint_config`] with a given stateless-reset key. A server that keeps its key across
/// restarts (a router, from a private file in its directory) answers packets of connections
/// it no longer knows with resets its clients accept, so they learn at once that the
/// connection is gone and dial again, instead of waiting out the idle timeout.
pub fn endpoint_config_with_reset_key(key: &[u8; 32]) -> EndpointConfig {
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut cfg = EndpointConfig::new(Arc::new(hmac));
    let _ = cfg.max_udp_payload_size(MAX_UDP_PAYLOAD);
    cfg
}

/// Applies the shared settings to a connection's transport configuration: MTU discovery up to
/// [`MAX_UDP_PAYLOAD`], and congestion control that keeps its queue short (`queue_floor`, see
/// [`crate::congestion`]; `None` is plain Cubic).
pub fn tune(transport: &mut TransportConfig, queue_floor: Option<std::time::Duration>) {
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    transport.mtu_discovery_config(Some(mtu));
    if let Some(floor) = queue_floor {
        transport.congestion_controller_factory(Arc::new(LowQueueConfig::new(floor)));
    }
}

/// Asks for `bytes` of kernel buffer on a QUIC socket, both directions. The kernel caps the
/// request at `net.core.rmem_max` / `wmem_max` (raising them needs privileges); a capped buffer
/// still works, at the cost of drops under load. Returns the receive buffer obtained when it is
/// smaller than asked, for the caller to mention where an operator will see it.
pub fn size_buffers(socket: &std::net::UdpSocket, bytes: usize) -> Option<usize> {
    let s = socket2::SockRef::from(socket);
    let _ = s.set_recv_buffer_size(bytes);
    let _ = s.set_send_buffer_size(bytes);
    // Linux reports twice what it granted (it counts its own bookkeeping).
    let got = s.recv_buffer_size().unwrap_or(0);
    (got < bytes).then_some(got)
}

/// The length of the connection IDs routers issue (quinn's default).
pub const CID_LEN: usize = 8;

/// Connection IDs whose first byte names the data-plane thread ("lane") that owns the
/// connection, modulo the router's number of lanes: a router with several lanes binds one UDP
/// socket per lane on the same port, and a socket filter in the kernel delivers each datagram to
/// the socket of the lane its destination connection ID names (see the router's `lanes`). The
/// other bytes stay random; the lane itself is no secret (load balancers encode the same, see
/// the QUIC-LB draft).
#[derive(Debug, Clone, Copy)]
pub struct LaneCids {
    lane: u8,
    lanes: u8,
}

impl LaneCids {
    /// CIDs for lane `lane` of `lanes` (at least 1, at most 255; `lane < lanes`).
    pub fn new(lane: u8, lanes: u8) -> LaneCids {
        let lanes = lanes.max(1);
        LaneCids {
            lane: lane % lanes,
            lanes,
        }
    }

    /// The first byte of a CID of this lane, from a random byte: the random byte's multiple of
    /// `lanes` plus the lane, so the byte stays as evenly spread as it can.
    fn first_byte(&self, random: u8) -> u8 {
        let (lane, lanes) = (u16::from(self.lane), u16::from(self.lanes));
        let base = u16::from(random) - u16::from(random) % lanes;
        let b = base + lane;
        // Past 255 for the last, partial multiple: step back one multiple.
        u8::try_from(if b > 255 { b - lanes } else { b }).unwrap_or(self.lane)
    }
}

impl quinn_proto::ConnectionIdGenerator for LaneCids {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        let random = quinn_proto::RandomConnectionIdGenerator::new(CID_LEN).generate_cid();
        let mut bytes = [0u8; CID_LEN];
        bytes.copy_from_slice(&random[..CID_LEN]);
        bytes[0] = self.first_byte(bytes[0]);
        quinn_proto::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// A random initial destination connection ID whose first byte is `slot`: the client's choice
/// of the router lane its handshake lands on (`slot` modulo the router's lanes). A context gives
/// each of its own lanes consecutive slots, so that they land on different router threads.
pub fn initial_cid(slot: u8) -> quinn_proto::ConnectionId {
    // 8 bytes: RFC 9000 asks at least that much unpredictability of an initial DCID.
    let random = quinn_proto::RandomConnectionIdGenerator::new(CID_LEN).generate_cid();
    let mut bytes = [0u8; CID_LEN];
    bytes.copy_from_slice(&random[..CID_LEN]);
    bytes[0] = slot;
    quinn_proto::ConnectionId::new(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cid_names_its_lane_and_keeps_the_rest_random() {
        for lanes in [1u8, 2, 3, 7, 8, 255] {
            for lane in 0..lanes {
                let g = LaneCids::new(lane, lanes);
                for random in 0..=255u8 {
                    assert_eq!(
                        g.first_byte(random) % lanes,
                        lane,
                        "{lane}/{lanes} {random}"
                    );
                }
            }
        }
        let mut g = LaneCids::new(1, 2);
        let (a, b) = (g.generate_cid(), g.generate_cid());
        assert_eq!((a.len(), b.len()), (CID_LEN, CID_LEN));
        assert_eq!((a[0] % 2, b[0] % 2), (1, 1));
        assert_ne!(a[1..], b[1..]);
        let c = initial_cid(5);
        assert_eq!((c.len(), c[0]), (CID_LEN, 5));
        assert_ne!(initial_cid(5)[1..], c[1..]);
    }
}
