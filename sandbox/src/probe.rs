//! The escape battery, run inside a sandbox by `umbra __escape-probe` (the same `umbra`
//! executable, shown read-only inside). Each attempt reports what it expected and what it saw;
//! `umbra verify` and the tests judge the whole.
//!
//! No attempt may send a packet off the machine even if isolation were broken: before any attempt
//! aimed at an outside address the probe proves, from `/proc/self/net/dev`, that its namespace
//! has no interface but `lo`; if that proof fails those attempts are not made and the isolation
//! is reported broken.

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

mod limits;
pub mod privilege;

/// Addresses that documentation owns (RFC 5737): never routed anywhere. With only `lo` in the
/// namespace, the kernel has no route for them at all.
pub const OUTSIDE_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// The file the probe tries to write in each home directory; the launcher looks for it on the
/// host afterwards.
pub const HOME_MARKER: &str = "umbra-escape-probe";
/// The cloud metadata address every SSRF guard must block.
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// What the probe is told by the launcher.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProbeConfig {
    /// Which battery: `escape` (the default), or one limit attempt: `fork`, `memory`, `busy`,
    /// `sockets`, `hold`.
    pub mode: String,
    /// A secret unique to one `umbra verify` run: what the probe sends to the host's canary
    /// listeners, so that only the probe's own connections count as escapes. Never on a command
    /// line (see [`CONFIG_ENV`]).
    #[serde(default)]
    pub run: String,
    /// A public tag unique to one run, the probe's only argument, so that the launcher can find
    /// leftovers of exactly its own probes in `/proc/*/cmdline`.
    #[serde(default)]
    pub tag: String,
    /// The workspace (inside path = host path).
    pub workspace: PathBuf,
    /// Files that must not be readable inside (the identity file, the admin file).
    pub secrets: Vec<PathBuf>,
    /// The read-only paths shown inside.
    pub ro: Vec<PathBuf>,
    /// The host user's home directory.
    pub home: Option<PathBuf>,
    /// A directory that exists in the host's /tmp; the probe tries to write into it.
    pub host_tmp_dir: Option<PathBuf>,
    /// A TCP listener on the host's loopback (and its UDP twin's port).
    pub host_tcp: Option<SocketAddr>,
    /// Listeners on test hosts in other network namespaces (veth), which must be unreachable.
    pub test_hosts: Vec<SocketAddr>,
    /// A name the identity may not reach.
    pub refused_name: String,
    /// Addresses of granted listeners (host:port as the agent sees them), for the port scan.
    pub granted: Vec<SocketAddr>,
    /// The launcher's (the tunneler's) process id on the host.
    pub tunneler_pid: Option<i32>,
    /// A directory passed as `--hide` (see [`privilege::HIDDEN_DIR`]).
    #[serde(default)]
    pub hidden: Option<PathBuf>,
}

/// One attempt's result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attempt {
    /// What was tried.
    pub attempt: String,
    /// What must happen.
    pub expected: String,
    /// What happened.
    pub observed: String,
    /// Whether the attempt got out (the sandbox failed).
    pub escaped: bool,
}

fn attempt(name: &str, expected: &str, observed: String, escaped: bool) -> Attempt {
    Attempt {
        attempt: name.to_string(),
        expected: expected.to_string(),
        observed,
        escaped,
    }
}

fn os_err(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("{} ({})", errno_name(code), e.kind()),
        None => e.to_string(),
    }
}

fn errno_name(code: i32) -> &'static str {
    match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EACCES => "EACCES",
        libc::EXDEV => "EXDEV",
        libc::EROFS => "EROFS",
        libc::ENOSYS => "ENOSYS",
        libc::EAGAIN => "EAGAIN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EINVAL => "EINVAL",
        libc::ENOTDIR => "ENOTDIR",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EBUSY => "EBUSY",
        _ => "errno",
    }
}

/// The result of an operation that must fail.
fn must_fail<T>(name: &str, expected: &str, r: io::Result<T>) -> Attempt {
    match r {
        Ok(_) => attempt(name, expected, "succeeded".into(), true),
        Err(e) => attempt(name, expected, format!("refused: {}", os_err(&e)), false),
    }
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

fn cstr(s: impl AsRef<[u8]>) -> CString {
    CString::new(s.as_ref()).unwrap_or_default()
}

/// Interfaces of this network namespace, from `/proc/self/net/dev`.
pub fn interfaces() -> io::Result<Vec<String>> {
    let text = std::fs::read_to_string("/proc/self/net/dev")?;
    Ok(text
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect())
}

/// The environment variable that carries the probe's configuration (JSON). Not the command
/// line: any user on the host can read a process's arguments, and the configuration holds the
/// run's canary token; a process's environment is readable only by its own user.
pub const CONFIG_ENV: &str = "UMBRA_PROBE_CONFIG";

/// The entry point of `umbra __escape-probe TAG` (configuration in [`CONFIG_ENV`]): prints the
/// attempts as JSON.
pub fn main() -> i32 {
    let Ok(arg) = std::env::var(CONFIG_ENV) else {
        eprintln!("usage: {CONFIG_ENV}=CONFIG_JSON umbra __escape-probe TAG");
        return 2;
    };
    let cfg: ProbeConfig = match serde_json::from_str(&arg) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bad probe config: {e}");
            return 2;
        }
    };
    match cfg.mode.as_str() {
        "escape" | "" => {
            let results = escape(&cfg);
            match serde_json::to_string(&results) {
                Ok(s) => {
                    println!("{s}");
                    0
                }
                Err(_) => 1,
            }
        }
        mode => limits::main(mode, &cfg),
    }
}

/// Runs every escape attempt.
pub fn escape(cfg: &ProbeConfig) -> Vec<Attempt> {
    let mut out = Vec::new();
    filesystem(cfg, &mut out);
    let ifaces = interfaces();
    let lo_only = matches!(&ifaces, Ok(v) if v == &["lo".to_string()]);
    out.push(attempt(
        "network namespace holds only lo",
        "only lo",
        match &ifaces {
            Ok(v) => v.join(","),
            Err(e) => os_err(e),
        },
        !lo_only,
    ));
    network(cfg, lo_only, &mut out);
    syscalls(cfg, &mut out);
    privilege::attempts(cfg, &mut out);
    out
}

fn filesystem(cfg: &ProbeConfig, out: &mut Vec<Attempt>) {
    out.push(must_fail(
        "write /etc",
        "refused",
        std::fs::write("/etc/umbra-escape", b"x"),
    ));
    out.push(must_fail(
        "write /usr/bin",
        "refused",
        std::fs::write("/usr/bin/umbra-escape", b"x"),
    ));
    let mut homes: Vec<PathBuf> = cfg.home.iter().cloned().collect();
    homes.push(PathBuf::from("/root"));
    homes.dedup();
    for home in &homes {
        // A home that holds the workspace exists inside only as empty directories leading to it
        // (in the private /tmp, say): writing there may succeed and stays inside. The launcher
        // checks the host's home for this file afterwards.
        let r = std::fs::write(home.join(HOME_MARKER), b"x");
        out.push(attempt(
            &format!("write {}", home.display()),
            "refused, or a private copy",
            match &r {
                Ok(()) => "wrote a private copy (the host's is checked from outside)".into(),
                Err(e) => format!("refused: {}", os_err(e)),
            },
            false,
        ));
        let leads = |name: &std::ffi::OsStr| {
            let p = home.join(name);
            std::iter::once(&cfg.workspace)
                .chain(cfg.ro.iter())
                .any(|shown| shown.starts_with(&p))
        };
        let listed: io::Result<Vec<String>> = std::fs::read_dir(home).map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| !leads(&e.file_name()) && e.file_name() != HOME_MARKER)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        });
        out.push(match listed {
            Err(e) => attempt(
                &format!("list {}", home.display()),
                "nothing of it visible",
                format!("refused: {}", os_err(&e)),
                false,
            ),
            Ok(leaked) => attempt(
                &format!("list {}", home.display()),
                "nothing of it visible",
                format!("visible beyond the workspace: [{}]", leaked.join(" ")),
                !leaked.is_empty(),
            ),
        });
    }
    if let Some(dir) = &cfg.host_tmp_dir {
        // Inside, /tmp is private: the host's directory is not there, and what we write lands
        // in our own /tmp. The launcher checks the host's directory stayed empty.
        let seen = dir.exists();
        let _ = std::fs::create_dir_all(dir);
        let wrote = std::fs::write(dir.join("escaped"), b"x").is_ok();
        out.push(attempt(
            "write the host's /tmp",
            "host /tmp not visible",
            format!("host dir visible: {seen}; wrote private copy: {wrote}"),
            seen,
        ));
    }
    let ws = &cfg.workspace;
    let link = ws.join(".umbra-escape-link");
    let _ = std::fs::remove_file(&link);
    let r = std::os::unix::fs::symlink("/etc", &link)
        .and_then(|_| std::fs::write(link.join("umbra-escape"), b"x"));
    let _ = std::fs::remove_file(&link);
    out.push(must_fail(
        "write /etc through a symlink in the workspace",
        "refused",
        r,
    ));
    let hard = ws.join(".umbra-escape-hard");
    let _ = std::fs::remove_file(&hard);
    let r = std::fs::hard_link("/etc/passwd", &hard);
    let _ = std::fs::remove_file(&hard);
    out.push(must_fail(
        "hard link /etc/passwd into the workspace",
        "refused",
        r,
    ));
    if let Some(secret) = cfg.secrets.first() {
        let target = ws.join(".umbra-escape-hard2");
        let r = std::fs::hard_link(secret, &target);
        let _ = std::fs::remove_file(&target);
        let escaped = r.is_ok()
            && std::fs::metadata(secret)
                .map(|m| m.len() > 0)
                .unwrap_or(false);
        out.push(attempt(
            "hard link the identity file",
            "refused",
            match r {
                Ok(()) => "linked".into(),
                Err(e) => format!("refused: {}", os_err(&e)),
            },
            escaped,
        ));
    }
    out.push(must_fail(
        "read the host through /proc/1/root",
        "refused",
        std::fs::read_dir("/proc/1/root/").map(|_| ()),
    ));
    for p in [
        "/proc/self/cwd/../../../../../../etc/shadow",
        "/proc/self/root/etc/shadow",
    ] {
        out.push(must_fail(&format!("read {p}"), "refused", std::fs::read(p)));
    }
    for secret in &cfg.secrets {
        let r = std::fs::read(secret);
        let escaped = matches!(&r, Ok(b) if !b.is_empty());
        out.push(attempt(
            &format!("read the identity file {}", secret.display()),
            "refused or empty",
            match r {
                Ok(b) => format!("read {} bytes", b.len()),
                Err(e) => format!("refused: {}", os_err(&e)),
            },
            escaped,
        ));
    }
    out.push(must_fail(
        "open /dev/net/tun",
        "refused",
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun"),
    ));
    out.push(must_fail(
        "write /proc/sys",
        "refused",
        std::fs::write("/proc/sys/kernel/hostname", b"escaped"),
    ));
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500))
}

/// Connects and, if that succeeds, sends `token` (the run's secret), by which the host's
/// canary tells our connections from anyone else's.
fn connect_with(addr: SocketAddr, token: &str) -> io::Result<TcpStream> {
    let mut s = connect(addr)?;
    let _ = s.write_all(token.as_bytes());
    Ok(s)
}

/// UDP: sending to an address with no route fails at once; otherwise it leaves silently, so a
/// reply is what tells an escape.
fn udp_probe(addr: SocketAddr) -> io::Result<usize> {
    udp_probe_with(addr, "umbra-escape")
}

/// [`udp_probe`] whose datagram carries `token`.
fn udp_probe_with(addr: SocketAddr, token: &str) -> io::Result<usize> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().map_err(io::Error::other)?
    } else {
        "[::]:0".parse().map_err(io::Error::other)?
    };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    s.send_to(token.as_bytes(), addr)?;
    let mut b = [0u8; 64];
    s.recv_from(&mut b).map(|(n, _)| n)
}

fn network(cfg: &ProbeConfig, lo_only: bool, out: &mut Vec<Attempt>) {
    let outside: Vec<(String, SocketAddr)> = [
        (
            "TCP to an external address",
            SocketAddr::new(OUTSIDE_V4.into(), 443),
        ),
        (
            "TCP to 169.254.169.254",
            SocketAddr::new(METADATA.into(), 80),
        ),
    ]
    .into_iter()
    .map(|(n, a)| (n.to_string(), a))
    .chain(
        cfg.test_hosts
            .iter()
            .map(|a| (format!("TCP to the test host {a}"), *a)),
    )
    .collect();
    for (name, addr) in outside {
        if !lo_only {
            out.push(attempt(
                &name,
                "unreachable",
                "skipped: isolation broken".into(),
                true,
            ));
            continue;
        }
        out.push(must_fail(&name, "unreachable", connect(addr)));
    }
    for (name, addr) in [
        (
            "UDP to an external address",
            SocketAddr::new(OUTSIDE_V4.into(), 53),
        ),
        (
            "UDP to 169.254.169.254",
            SocketAddr::new(METADATA.into(), 53),
        ),
    ] {
        if !lo_only {
            out.push(attempt(
                name,
                "unreachable",
                "skipped: isolation broken".into(),
                true,
            ));
            continue;
        }
        out.push(must_fail(name, "unreachable", udp_probe(addr)));
    }
    if let Some(host) = cfg.host_tcp {
        let port = host.port();
        for (name, ip) in [
            (
                "TCP to the host's 127.0.0.1",
                IpAddr::V4(Ipv4Addr::LOCALHOST),
            ),
            ("TCP to ::1", IpAddr::V6(Ipv6Addr::LOCALHOST)),
            (
                "TCP to ::ffff:127.0.0.1",
                IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
            ),
        ] {
            out.push(must_fail(
                name,
                "refused",
                connect_with(SocketAddr::new(ip, port), &cfg.run),
            ));
        }
        out.push(must_fail(
            "UDP to the host's 127.0.0.1",
            "no answer",
            udp_probe_with(
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
                &cfg.run,
            ),
        ));
    }
    // SAFETY: socket() with integer arguments; the descriptor is closed on success.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    out.push(fd_attempt("open a raw socket", raw));
    // SAFETY: as above.
    let pkt = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    out.push(fd_attempt("open a packet socket", pkt));
    out.push(if lo_only {
        must_fail("ping an external address", "refused", ping(OUTSIDE_V4))
    } else {
        attempt(
            "ping an external address",
            "refused",
            "skipped: isolation broken".into(),
            true,
        )
    });
    out.push(route_change());
    out.push(dns_refused(&cfg.refused_name));
    out.push(dns_refused_tcp(&cfg.refused_name));
    out.push(scan(&cfg.granted));
}

fn fd_attempt(name: &str, fd: libc::c_int) -> Attempt {
    if fd >= 0 {
        // SAFETY: we own the descriptor just opened.
        unsafe { libc::close(fd) };
        attempt(name, "refused", "opened".into(), true)
    } else {
        attempt(
            name,
            "refused",
            format!("refused: {}", os_err(&last_err())),
            false,
        )
    }
}

fn ping(ip: Ipv4Addr) -> io::Result<()> {
    // SAFETY: socket() with integer arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(last_err());
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // An echo request: type 8, code 0; the kernel fills in the id and checksum.
    let pkt = [8u8, 0, 0, 0, 0, 0, 0, 1];
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: valid buffer and address of the right length.
    let r = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(last_err());
    }
    Ok(())
}

/// Asks the kernel, over routing netlink, to add a default route via `lo`.
fn route_change() -> Attempt {
    let name = "add a route over netlink";
    // SAFETY: socket() with integer arguments.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return attempt(
            name,
            "refused",
            format!("refused: {}", os_err(&last_err())),
            false,
        );
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut msg: Vec<u8> = Vec::new();
    let total: u32 = 16 + 12 + 8;
    msg.extend_from_slice(&total.to_ne_bytes());
    msg.extend_from_slice(&(libc::RTM_NEWROUTE).to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE) as u16;
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
                                                // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags(u32)
    msg.extend_from_slice(&[
        libc::AF_INET as u8,
        0,
        0,
        0,
        libc::RT_TABLE_MAIN,
        libc::RTPROT_BOOT,
        libc::RT_SCOPE_UNIVERSE,
        libc::RTN_UNICAST,
    ]);
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // RTA_OIF = 1 (lo)
    msg.extend_from_slice(&8u16.to_ne_bytes());
    msg.extend_from_slice(&libc::RTA_OIF.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    // SAFETY: valid buffer on an owned socket (kernel address is the default destination).
    let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return attempt(
            name,
            "refused",
            format!("refused: {}", os_err(&last_err())),
            false,
        );
    }
    let mut buf = [0u8; 256];
    // SAFETY: valid buffer on an owned socket.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 20 {
        return attempt(name, "refused", "no answer".into(), false);
    }
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    let error = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
    if kind == libc::NLMSG_ERROR as u16 && error < 0 {
        let e = io::Error::from_raw_os_error(-error);
        attempt(name, "refused", format!("refused: {}", os_err(&e)), false)
    } else {
        attempt(name, "refused", "route added".into(), true)
    }
}

fn dns_refused(name: &str) -> Attempt {
    let label = format!("resolve the unauthorized name {name}");
    let r = (|| -> io::Result<(u16, Option<Ipv4Addr>)> {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send_to(&crate::dns::query(0x5a5a, name, 1), "127.0.0.53:53")?;
        let mut b = [0u8; 512];
        let (n, _) = s.recv_from(&mut b)?;
        crate::dns::parse_response(&b[..n]).ok_or_else(|| io::Error::other("unparsable DNS reply"))
    })();
    nxdomain(&label, r)
}

/// The verdict on asking for a name the sandbox must not resolve: only NXDOMAIN passes.
fn nxdomain(label: &str, r: io::Result<(u16, Option<Ipv4Addr>)>) -> Attempt {
    match r {
        Ok((3, None)) => attempt(label, "NXDOMAIN", "NXDOMAIN".into(), false),
        Ok((rcode, ip)) => attempt(
            label,
            "NXDOMAIN",
            format!("rcode {rcode}, address {ip:?}"),
            ip.is_some(),
        ),
        Err(e) => attempt(
            label,
            "NXDOMAIN",
            format!("no answer: {}", os_err(&e)),
            true,
        ),
    }
}

fn dns_refused_tcp(name: &str) -> Attempt {
    let label = format!("resolve the unauthorized name {name} over TCP");
    let r = (|| -> io::Result<(u16, Option<Ipv4Addr>)> {
        let addr = SocketAddr::new(Ipv4Addr::new(127, 0, 0, 53).into(), 53);
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let q = crate::dns::query(0x5a5b, name, 1);
        let len = u16::try_from(q.len()).map_err(|_| io::Error::other("query too long"))?;
        s.write_all(&len.to_be_bytes())?;
        s.write_all(&q)?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len)?;
        let mut b = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut b)?;
        crate::dns::parse_response(&b).ok_or_else(|| io::Error::other("unparsable DNS reply"))
    })();
    nxdomain(&label, r)
}

/// Connects to every port of 127.0.0.1 and to the common ports of the addresses Umbra hands
/// out; anything open that was not granted is an escape.
fn scan(granted: &[SocketAddr]) -> Attempt {
    let start = Instant::now();
    let mut targets: Vec<SocketAddr> = (1..=65535u16)
        .map(|p| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), p))
        .collect();
    for last in 1..=8u8 {
        let ip = Ipv4Addr::new(127, 77, 0, last);
        for p in (1..=1024u16).chain(8000..=9000) {
            targets.push(SocketAddr::new(ip.into(), p));
        }
    }
    targets.extend(granted.iter().copied());
    targets.sort();
    targets.dedup();
    let mut open = Vec::new();
    for t in &targets {
        if let Ok(s) = TcpStream::connect_timeout(t, Duration::from_millis(200)) {
            // Connecting to a port in the ephemeral range can pick that same port as the source
            // and connect to itself (TCP simultaneous open): that is no listener.
            if s.local_addr().ok() != Some(*t) {
                open.push(*t);
            }
        }
    }
    let extra: Vec<String> = open
        .iter()
        .filter(|a| !granted.contains(a))
        .map(|a| a.to_string())
        .collect();
    attempt(
        "scan loopback ports for services not granted",
        "only granted listeners open",
        format!(
            "{} probed in {} ms, {} open, not granted: [{}]",
            targets.len(),
            start.elapsed().as_millis(),
            open.len(),
            extra.join(" ")
        ),
        !extra.is_empty(),
    )
}

fn syscalls(cfg: &ProbeConfig, out: &mut Vec<Attempt>) {
    let dir = cstr("/tmp");
    let (src, fstype) = (cstr("tmpfs"), cstr("tmpfs"));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            dir.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    out.push(rc_attempt("mount a filesystem", r));
    // SAFETY: flags only.
    let r = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
    out.push(rc_attempt("unshare a user namespace", r));
    // SAFETY: flags only.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    out.push(rc_attempt("unshare a network namespace", r));
    let r = std::fs::File::open("/proc/1/ns/net").and_then(|f| {
        // SAFETY: a descriptor we own.
        let r = unsafe { libc::setns(f.as_raw_fd(), 0) };
        if r < 0 {
            Err(last_err())
        } else {
            Ok(())
        }
    });
    out.push(must_fail("setns into pid 1's namespace", "refused", r));
    // SAFETY: flags only.
    let r = unsafe { libc::setns(0, libc::CLONE_NEWNET) };
    out.push(rc_attempt("setns on a descriptor", r));
    // SAFETY: ptrace on pid 1 (the sandbox's init) and on the parent; no memory is touched.
    let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0) } as i32;
    out.push(rc_attempt("ptrace pid 1", r));
    if let Some(pid) = cfg.tunneler_pid {
        // The host's pid means nothing (or another sandboxed process) in this PID namespace.
        // SAFETY: as above.
        let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) } as i32;
        out.push(rc_attempt("ptrace the tunneler", r));
    }
    // SAFETY: as above.
    let ppid = unsafe { libc::getppid() };
    // SAFETY: ptrace with integer arguments only; the kernel refuses it inside the sandbox.
    let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, ppid, 0, 0) } as i32;
    out.push(rc_attempt("ptrace the parent (towards the tunneler)", r));
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup with a zeroed params block of the right size.
    let r = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if r >= 0 {
        // SAFETY: we own the returned descriptor.
        unsafe { libc::close(r as i32) };
    }
    out.push(rc_attempt("io_uring_setup", if r >= 0 { 0 } else { -1 }));
    // SAFETY: bpf with a null attribute: refused by seccomp before the kernel looks at it.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 0, std::ptr::null::<u8>(), 0) };
    out.push(rc_attempt("bpf", if r >= 0 { 0 } else { -1 }));
    // SAFETY: a flag-only call.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, 0) };
    out.push(rc_attempt("userfaultfd", if r >= 0 { 0 } else { -1 }));
    out.push(memfd_exec());
    out.push(capabilities());
}

fn rc_attempt(name: &str, r: i32) -> Attempt {
    if r < 0 {
        attempt(
            name,
            "refused",
            format!("refused: {}", os_err(&last_err())),
            false,
        )
    } else {
        attempt(name, "refused", "succeeded".into(), true)
    }
}

/// Copies a real program into an anonymous memory file and tries to execute it from there.
fn memfd_exec() -> Attempt {
    let name = "memfd_create with exec";
    let mfd_exec = 0x0010u32;
    let n = cstr("umbra-escape");
    // SAFETY: valid name; flags only.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_create, n.as_ptr(), mfd_exec) };
    if fd >= 0 {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(fd as i32) };
        return attempt(
            name,
            "refused",
            "an executable memfd was created".into(),
            true,
        );
    }
    let first = os_err(&last_err());
    // Without MFD_EXEC: copy /bin/true in and exec it through /proc/self/fd.
    // SAFETY: as above, no flags.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_create, n.as_ptr(), 0u32) };
    if fd < 0 {
        return attempt(name, "refused", format!("refused: {first}"), false);
    }
    // SAFETY: a fresh descriptor we own.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd as i32) };
    let mut bin = Vec::new();
    if std::fs::File::open("/bin/true")
        .and_then(|mut f| f.read_to_end(&mut bin))
        .is_err()
        || file.write_all(&bin).is_err()
    {
        return attempt(name, "refused", format!("refused: {first}"), false);
    }
    let path = cstr(format!("/proc/self/fd/{}", file.as_raw_fd()));
    // SAFETY: the child only execs or exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let argv = [path.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: null-terminated arrays of valid strings.
        unsafe {
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(99);
        }
    }
    let mut status = 0;
    // SAFETY: valid out-pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    if code == 0 {
        attempt(name, "refused", "a program ran from memory".into(), true)
    } else {
        attempt(
            name,
            "refused",
            format!("MFD_EXEC refused ({first}); exec from memory refused"),
            false,
        )
    }
}

/// Reads the agent's capability sets: all must be empty.
fn capabilities() -> Attempt {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps: Vec<String> = status
        .lines()
        .filter(|l| l.starts_with("Cap"))
        .map(|l| l.replace('\t', " "))
        .collect();
    let held = status
        .lines()
        .filter(|l| {
            ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .any(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|v| !v.trim_start_matches('0').is_empty())
        });
    let nnp = status
        .lines()
        .any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1'));
    let seccomp = status
        .lines()
        .any(|l| l.starts_with("Seccomp:") && l.ends_with('2'));
    attempt(
        "hold a capability",
        "none held; no_new_privs; seccomp filter",
        format!("{}; no_new_privs={nnp}; seccomp={seccomp}", caps.join(", ")),
        held || !nnp || !seccomp || caps.is_empty(),
    )
}
