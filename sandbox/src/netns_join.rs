//! Sockets inside a network namespace that Umbra did not make: a container's (`docker run
//! --network none`, Podman, a Kubernetes pod's sandbox) or one made with `ip netns add`.
//!
//! A dedicated thread `setns(CLONE_NEWNET)`s into the namespace once and makes the sockets there
//! on request; a socket keeps the namespace it was made in, so the caller's runtime accepts and
//! carries its connections from the host's side. The process itself (its controller and router
//! connections, its key) never enters the namespace. The namespace is named by a path
//! (`/var/run/netns/NAME`, `/proc/PID/ns/net`), which is watched: once it names another
//! namespace or nothing at all, the namespace is gone for our purposes ([`JoinedNetNs::is_gone`]).

use std::ffi::CStr;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;

/// `NS_GET_NSTYPE` (`linux/nsfs.h`: `_IO(0xb7, 0x3)`): which kind of namespace a file is.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Why a namespace could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The path could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The path names something other than a network namespace.
    #[error("{0} is not a network namespace")]
    NotNetNs(PathBuf),
    /// `setns` was refused (it needs `CAP_SYS_ADMIN` over the namespace's owner).
    #[error("cannot enter the network namespace {path}: {source}")]
    Enter {
        /// The path given.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
}

type Job = Box<dyn FnOnce() + Send>;

/// A network namespace joined by one thread of ours, which makes sockets inside it. Dropping
/// the last handle ends the thread; sockets already made stay where they are.
#[derive(Debug)]
pub struct JoinedNetNs {
    jobs: Mutex<mpsc::Sender<Job>>,
    path: PathBuf,
    id: (u64, u64),
}

impl JoinedNetNs {
    /// Opens the network namespace at `path` and starts the thread that lives in it. A path
    /// that names this process's own namespace (a sidecar sharing a pod's network) needs no
    /// `setns` and so no `CAP_SYS_ADMIN`.
    pub fn open(path: &Path) -> Result<JoinedNetNs, JoinError> {
        let file = std::fs::File::open(path).map_err(|source| JoinError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let fd = OwnedFd::from(file);
        // SAFETY: an ioctl without argument on a descriptor we own.
        let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
        if kind != libc::CLONE_NEWNET {
            return Err(JoinError::NotNetNs(path.to_path_buf()));
        }
        let id = crate::idmap::identity_of(&fd).map_err(|source| JoinError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let own = std::fs::metadata("/proc/thread-self/ns/net")
            .map(|m| {
                (
                    std::os::linux::fs::MetadataExt::st_dev(&m),
                    std::os::linux::fs::MetadataExt::st_ino(&m),
                )
            })
            .ok();
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        let enter = own != Some(id);
        std::thread::Builder::new()
            .name("umbra-netns".into())
            .spawn(move || {
                let entered = if enter {
                    // SAFETY: setns on a namespace descriptor we own; it changes only this
                    // thread's network namespace.
                    let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
                    if r == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::last_os_error())
                    }
                } else {
                    Ok(())
                };
                drop(fd);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
            })
            .map_err(|source| JoinError::Enter {
                path: path.to_path_buf(),
                source,
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(JoinedNetNs {
                jobs: Mutex::new(tx),
                path: path.to_path_buf(),
                id,
            }),
            Ok(Err(source)) => Err(JoinError::Enter {
                path: path.to_path_buf(),
                source,
            }),
            Err(_) => Err(JoinError::Enter {
                path: path.to_path_buf(),
                source: io::Error::other("the namespace thread ended"),
            }),
        }
    }

    /// Runs `f` on the thread inside the namespace and returns what it returned.
    fn inside<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .lock()
            .map_err(|_| io::Error::other("namespace handle poisoned"))?
            .send(job)
            .map_err(|_| io::Error::other("the namespace thread ended"))?;
        rx.recv()
            .map_err(|_| io::Error::other("the namespace thread ended"))?
    }

    /// A non-blocking TCP listener at `addr` inside the namespace.
    pub fn listen_tcp(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        let l = self.inside(move || std::net::TcpListener::bind(addr))?;
        l.set_nonblocking(true)?;
        Ok(l)
    }

    /// A non-blocking UDP socket bound at `addr` inside the namespace.
    pub fn bind_udp(&self, addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
        let s = self.inside(move || std::net::UdpSocket::bind(addr))?;
        s.set_nonblocking(true)?;
        Ok(s)
    }

    /// The names of the namespace's interfaces (`lo` among them).
    pub fn interfaces(&self) -> io::Result<Vec<String>> {
        self.inside(interface_names)
    }

    /// Brings `lo` up if it is down (`ip netns add` makes it down); `Ok(true)` if it had to.
    /// Needs `CAP_NET_ADMIN` over the namespace only when it is down.
    pub fn loopback_up(&self) -> io::Result<bool> {
        self.inside(loopback_up)
    }

    /// The path the namespace was named by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path no longer names this namespace: the container's process exited (its
    /// `/proc/PID` is gone or is another process's), or `ip netns delete` removed the name.
    /// Our own sockets keep the namespace itself alive, so its name is what is watched.
    pub fn is_gone(&self) -> bool {
        match std::fs::metadata(&self.path) {
            Ok(m) => {
                use std::os::linux::fs::MetadataExt;
                (m.st_dev(), m.st_ino()) != self.id
            }
            Err(_) => true,
        }
    }
}

/// The interfaces of the calling thread's network namespace (`if_nameindex` asks the kernel
/// over netlink in that namespace).
fn interface_names() -> io::Result<Vec<String>> {
    // SAFETY: returns an array ending with a zeroed entry, or null with errno set.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        // SAFETY: within the array, which ends with an entry whose index is 0.
        let entry = unsafe { &*list.add(i) };
        if entry.if_index == 0 || entry.if_name.is_null() {
            break;
        }
        // SAFETY: a NUL-terminated name owned by the array.
        out.push(
            unsafe { CStr::from_ptr(entry.if_name) }
                .to_string_lossy()
                .into_owned(),
        );
        i += 1;
    }
    // SAFETY: the array from if_nameindex, freed once.
    unsafe { libc::if_freenameindex(list) };
    Ok(out)
}

/// Brings up `lo` in the calling thread's network namespace if it is down.
fn loopback_up() -> io::Result<bool> {
    // SAFETY: a plain datagram socket used only for interface ioctls.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `s` is a fresh descriptor we own.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: a valid ifreq for SIOCGIFFLAGS, which fills its flags.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the union's flags member, just filled by SIOCGIFFLAGS.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(false);
    }
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: a valid ifreq for SIOCSIFFLAGS.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_needs_no_setns_and_lists_lo() {
        let ns = JoinedNetNs::open(Path::new("/proc/self/ns/net")).expect("own namespace");
        assert!(ns
            .interfaces()
            .expect("interfaces")
            .iter()
            .any(|n| n == "lo"));
        let l = ns
            .listen_tcp("127.0.0.1:0".parse().unwrap())
            .expect("listen");
        assert!(l.local_addr().unwrap().port() != 0);
        assert!(!ns.is_gone());
    }

    #[test]
    fn a_file_that_is_no_namespace_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            JoinedNetNs::open(f.path()),
            Err(JoinError::NotNetNs(_))
        ));
        assert!(matches!(
            JoinedNetNs::open(Path::new("/proc/self/ns/uts")),
            Err(JoinError::NotNetNs(_))
        ));
    }
}
