//! Sockets made inside the sandbox's network namespace and handed to the launcher.
//!
//! The sandbox's first process lives in the agent's namespaces and holds their capabilities; the
//! launcher, which may be unprivileged, cannot enter them. So the launcher asks, over a
//! `SOCK_SEQPACKET` pair, for a TCP listener or a UDP socket at an address, and the first process
//! makes it and passes the descriptor back (`SCM_RIGHTS`). A socket keeps the namespace it was
//! made in: the agent connects to it from inside, the launcher accepts on it from outside.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Largest request or reply.
const MAX_MSG: usize = 512;

/// A `SOCK_SEQPACKET` Unix socket pair, close-on-exec.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: a valid two-element out-array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends one message, with `fd` attached if given.
pub fn send(sock: RawFd, data: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // Room for one descriptor, aligned as cmsghdr requires.
    let mut cmsg_buf = [0u64; 8];
    // SAFETY: msghdr is plain data; zeroed is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is large enough for one header and one descriptor.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: msg points at live buffers for the duration of the call.
    let r = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message into `buf` and the descriptor attached to it, if any. `Ok((0, None))`
/// is the peer's end.
pub fn recv(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cmsg_buf = [0u64; 8];
    // SAFETY: msghdr is plain data; zeroed is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg_buf) as _;
    // SAFETY: msg points at live buffers; MSG_CMSG_CLOEXEC keeps received fds from leaking.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fd = None;
    // SAFETY: walking the control messages the kernel wrote into our buffer.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                // A second descriptor (never sent by us) would be closed here.
                let owned = OwnedFd::from_raw_fd(raw);
                if fd.is_none() {
                    fd = Some(owned);
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, fd))
}

/// What the launcher asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// A listening TCP socket.
    Tcp(SocketAddr),
    /// A bound UDP socket.
    Udp(SocketAddr),
}

impl Request {
    /// The request's bytes: a kind letter and the address as text.
    pub fn encode(&self) -> Vec<u8> {
        let (k, a) = match self {
            Request::Tcp(a) => (b'T', a),
            Request::Udp(a) => (b'U', a),
        };
        let mut v = vec![k];
        v.extend_from_slice(a.to_string().as_bytes());
        v
    }

    /// Parses a request; anything malformed is `None`.
    pub fn decode(b: &[u8]) -> Option<Request> {
        let (&k, rest) = b.split_first()?;
        let addr: SocketAddr = std::str::from_utf8(rest).ok()?.parse().ok()?;
        match k {
            b'T' => Some(Request::Tcp(addr)),
            b'U' => Some(Request::Udp(addr)),
            _ => None,
        }
    }
}

/// Serves one request on `sock` (in the sandbox's first process). `Ok(false)`: the launcher is
/// gone.
pub fn serve_one(sock: RawFd) -> io::Result<bool> {
    let mut buf = [0u8; MAX_MSG];
    let (n, stray) = recv(sock, &mut buf)?;
    drop(stray);
    if n == 0 {
        return Ok(false);
    }
    let made = match Request::decode(&buf[..n]) {
        None => Err(io::Error::new(io::ErrorKind::InvalidInput, "bad request")),
        Some(Request::Tcp(a)) => std::net::TcpListener::bind(a).map(OwnedFd::from),
        Some(Request::Udp(a)) => std::net::UdpSocket::bind(a).map(OwnedFd::from),
    };
    match made {
        Ok(fd) => send(sock, b"O", Some(fd.as_raw_fd()))?,
        Err(e) => {
            let mut reply = vec![b'E'];
            reply.extend_from_slice(&e.raw_os_error().unwrap_or(libc::EINVAL).to_be_bytes());
            send(sock, &reply, None)?;
        }
    }
    Ok(true)
}

/// Asks for a socket (in the launcher).
pub fn ask(sock: RawFd, req: Request) -> io::Result<OwnedFd> {
    send(sock, &req.encode(), None)?;
    let mut buf = [0u8; MAX_MSG];
    let (n, fd) = recv(sock, &mut buf)?;
    match (buf.first(), fd) {
        (Some(b'O'), Some(fd)) if n == 1 => Ok(fd),
        (Some(b'E'), None) if n == 5 => {
            let code = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
            Err(io::Error::from_raw_os_error(code))
        }
        _ if n == 0 => Err(io::Error::other("the sandbox is gone")),
        _ => Err(io::Error::other("malformed reply from the sandbox")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_garbage_is_refused() {
        for r in [
            Request::Tcp("127.77.0.1:443".parse().unwrap()),
            Request::Udp("[::1]:53".parse().unwrap()),
        ] {
            assert_eq!(Request::decode(&r.encode()), Some(r));
        }
        for bad in [&b""[..], b"T", b"X127.0.0.1:1", b"T127.0.0.1", b"T\xff\xfe"] {
            assert_eq!(Request::decode(bad), None);
        }
    }

    #[test]
    fn sockets_travel_with_their_descriptor() {
        let (a, b) = seqpacket_pair().unwrap();
        let server = std::thread::spawn(move || {
            assert!(serve_one(b.as_raw_fd()).unwrap());
            assert!(serve_one(b.as_raw_fd()).unwrap());
            // Malformed request: an error reply, and the server goes on.
            assert!(serve_one(b.as_raw_fd()).unwrap());
            b
        });
        let fd = ask(a.as_raw_fd(), Request::Tcp("127.0.0.1:0".parse().unwrap())).unwrap();
        let l = std::net::TcpListener::from(fd);
        let addr = l.local_addr().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        assert!(l.accept().is_ok());
        // The same port again: refused with the kernel's reason.
        let e = ask(a.as_raw_fd(), Request::Tcp(addr)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE));
        send(a.as_raw_fd(), b"garbage", None).unwrap();
        let mut buf = [0u8; 16];
        let (n, fd) = recv(a.as_raw_fd(), &mut buf).unwrap();
        assert!(n == 5 && buf[0] == b'E' && fd.is_none());
        let b = server.join().unwrap();
        drop(a);
        assert!(!serve_one(b.as_raw_fd()).unwrap(), "peer gone");
    }
}
