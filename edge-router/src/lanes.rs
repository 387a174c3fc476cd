//! Data-plane lanes: the router serves QUIC on several threads, each with a UDP socket of its
//! own bound to the same address (`SO_REUSEPORT`), its own quinn endpoint and current-thread
//! runtime. A connection lives on one lane for its whole life, so an interactive connection
//! and a bulk one on different lanes never wait for each other's thread: with one thread for
//! everything, a 64-byte round trip waited up to several milliseconds behind a bulk transfer
//! whenever both cores were busy (data-plane bench, "loaded" column).
//!
//! Which lane takes a datagram is decided in the kernel, by a classic BPF program attached to
//! the socket group: the first byte of the destination connection ID modulo the number of lanes.
//! Each lane's endpoint issues connection IDs whose first byte names it
//! (`umbra_transport::quic::LaneCids`), and a client's handshake lands on the lane its initial
//! destination ID names (random, or chosen by the SDK to spread its own lanes). If the program
//! cannot be attached, the kernel's hash of the address pair decides instead; a connection still
//! stays on one lane (the router does not allow migration), only the spreading is left to chance.
//! Only sockets of the same user may join a reuseport group (Linux), and the program never picks
//! an index past the router's own lanes.
#![allow(unsafe_code)]

use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// `SO_ATTACH_REUSEPORT_CBPF` (Linux 4.5; `libc` names it only for Android).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Binds `lanes` UDP sockets to `addr` (the first picks the port if it is 0), in lane order,
/// and steers datagrams between them by connection ID. One lane is a plain socket.
pub(crate) fn bind(addr: SocketAddr, lanes: usize) -> std::io::Result<Vec<UdpSocket>> {
    let lanes = lanes.clamp(1, 255);
    if lanes == 1 {
        return UdpSocket::bind(addr).map(|s| vec![s]);
    }
    // A plain bind first: it fails if anything holds the address, a reuseport group included
    // (another router left running, say), which the group's own binds would silently join and
    // share; and it picks the port when `addr` has none.
    let mut at = UdpSocket::bind(addr)?.local_addr()?;
    let mut sockets: Vec<UdpSocket> = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_port(true)?;
        s.bind(&at.into())?;
        let s: UdpSocket = s.into();
        at = s.local_addr()?;
        sockets.push(s);
    }
    if let Err(e) = steer(&sockets[0], lanes as u8) {
        tracing::warn!(error = %e, "cannot steer datagrams by connection ID; lanes are chosen by the kernel's hash");
    }
    Ok(sockets)
}

/// The steering program: the destination connection ID's first byte (offset 1 in a short
/// header, 6 in a long one), modulo `lanes`, is the index of the socket in the group. A datagram
/// too short to hold it makes the program return 0 (lane 0, whose endpoint drops it).
fn program(lanes: u8) -> [libc::sock_filter; 7] {
    const LDB_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
    const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const JA: u16 = 0x05; // BPF_JMP | BPF_JA
    const MOD_K: u16 = 0x94; // BPF_ALU | BPF_MOD | BPF_K
    const RET_A: u16 = 0x16; // BPF_RET | BPF_A
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        op(LDB_ABS, 0, 0, 0),              // A = first byte (header form)
        op(JSET_K, 2, 0, 0x80),            // long header? to 4
        op(LDB_ABS, 0, 0, 1),              // short: A = DCID[0]
        op(JA, 0, 0, 1),                   // to 5
        op(LDB_ABS, 0, 0, 6),              // long: A = DCID[0] (after version and DCID length)
        op(MOD_K, 0, 0, u32::from(lanes)), // A %= lanes
        op(RET_A, 0, 0, 0),                // socket index A
    ]
}

/// Attaches [`program`] to the reuseport group of `socket`.
fn steer(socket: &UdpSocket, lanes: u8) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut filter = program(lanes);
    let prog = libc::sock_fprog {
        len: filter.len() as libc::c_ushort,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `filter`, which outlives the call; the kernel copies the
    // program and reads exactly `len` instructions. The descriptor is a live socket.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::addr_of!(prog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A datagram whose destination connection ID starts with `first`, in a short or a long
    /// header, reaches the socket of lane `first % lanes`, whichever source it comes from.
    #[test]
    fn an_address_in_use_is_refused_not_shared() {
        let first = bind("127.0.0.1:0".parse().expect("addr"), 2).expect("bind");
        let at = first[0].local_addr().expect("addr");
        let e = bind(at, 2).expect_err("a second group on the same address");
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        let e = bind(at, 1).expect_err("a plain socket on the same address");
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    }

    #[test]
    fn datagrams_reach_the_lane_their_connection_id_names() {
        let lanes = 3u8;
        let sockets = bind("127.0.0.1:0".parse().expect("addr"), lanes.into()).expect("bind");
        let port = sockets[0].local_addr().expect("addr").port();
        assert!(sockets
            .iter()
            .all(|s| s.local_addr().expect("addr").port() == port));
        for s in &sockets {
            s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .expect("timeout");
        }
        for first in [0u8, 1, 2, 4, 200, 255] {
            for long in [false, true] {
                let client = UdpSocket::bind("127.0.0.1:0").expect("client");
                let mut packet = vec![0u8; 40];
                if long {
                    packet[0] = 0xc0;
                    packet[5] = 8;
                    packet[6] = first;
                } else {
                    packet[0] = 0x40;
                    packet[1] = first;
                }
                client.send_to(&packet, ("127.0.0.1", port)).expect("send");
                let lane = usize::from(first % lanes);
                let mut buf = [0u8; 64];
                let (n, _) = sockets[lane].recv_from(&mut buf).expect("the named lane");
                assert_eq!(&buf[..n], &packet[..], "lane {lane}");
            }
        }
        // Nothing went anywhere else.
        for s in &sockets {
            s.set_nonblocking(true).expect("nonblocking");
            assert!(s.recv_from(&mut [0u8; 64]).is_err());
        }
    }
}
