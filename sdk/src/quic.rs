//! QUIC settings that clients and routers share: datagram size, socket buffers and congestion
//! control. Measured on loopback through tunneler and router (data-plane bench, 2 cores):
//! 1,452-byte packets with default buffers moved 4.0 to 4.4 Gbit/s at 2.7 core-s/GB; 6,500-byte
//! packets with 2 MiB buffers 7.7 to 8.2 Gbit/s at 1.4 core-s/GB, without a lost packet.

use std::sync::Arc;

use quinn::{EndpointConfig, MtuDiscoveryConfig, TransportConfig};

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
