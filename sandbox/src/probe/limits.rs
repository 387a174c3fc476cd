//! The limit attempts of the escape battery: each runs alone in a sandbox of its own with small
//! limits (`umbra verify` judges what the launcher saw: the exit code, the cgroup's counters).

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use super::{last_err, os_err, ProbeConfig};

/// Runs the limit attempt `mode`; returns the process's exit code.
pub fn main(mode: &str, cfg: &ProbeConfig) -> i32 {
    match mode {
        "fork" => fork_bomb(),
        "memory" => balloon(),
        "sockmem" => socket_balloon(),
        "connections" => hold_connections(cfg),
        "busy" => loop {
            std::hint::spin_loop();
        },
        other => {
            eprintln!("unknown probe mode {other:?}");
            2
        }
    }
}

/// Forks until the kernel refuses; prints how many children it got.
fn fork_bomb() -> i32 {
    let mut n = 0u64;
    let mut refused = String::new();
    for _ in 0..100_000 {
        // SAFETY: the child only sleeps and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: plain calls in the child.
            unsafe {
                libc::sleep(30);
                libc::_exit(0);
            }
        }
        if pid < 0 {
            refused = os_err(&last_err());
            break;
        }
        n += 1;
    }
    println!("{}", serde_json::json!({ "forked": n, "refused": refused }));
    0
}

/// Allocates and touches memory until the kernel stops it.
fn balloon() -> i32 {
    let mut keep: Vec<Vec<u8>> = Vec::new();
    for i in 0..1_000_000u64 {
        let mut v = vec![0u8; 1 << 20];
        for j in (0..v.len()).step_by(4096) {
            v[j] = (i as u8).wrapping_add(1);
        }
        keep.push(v);
    }
    println!("{}", serde_json::json!({ "allocated_mib": keep.len() }));
    0
}

/// Raises the probe's own descriptor soft limit to its hard limit, as an abusive agent would.
fn raise_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain calls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// The most the socket balloon tries to park, and how long it may try.
const SOCKET_BALLOON_MAX: u64 = 1 << 30;
const SOCKET_BALLOON_TIME: Duration = Duration::from_secs(20);

/// Parks data in loopback TCP buffers: connection pairs inside the sandbox, one end writing
/// until the kernel refuses, the other never reading. Prints how much was parked.
fn socket_balloon() -> i32 {
    raise_nofile();
    let started = Instant::now();
    let chunk = vec![0x5au8; 64 << 10];
    let mut buffered = 0u64;
    let mut keep: Vec<(TcpStream, TcpStream)> = Vec::new();
    let mut stopped = String::from("the bound of the attempt");
    let listener = match TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({ "buffered_mib": 0, "pairs": 0, "stopped": os_err(&e) })
            );
            return 0;
        }
    };
    let Ok(addr) = listener.local_addr() else {
        return 2;
    };
    // Pairs that accept no more data in a row: the kernel has stopped us, not one socket.
    let mut refused_in_a_row = 0;
    for _ in 0..4096 {
        if buffered >= SOCKET_BALLOON_MAX || started.elapsed() > SOCKET_BALLOON_TIME {
            break;
        }
        let pair = TcpStream::connect(addr).and_then(|c| {
            let (s, _) = listener.accept()?;
            c.set_nonblocking(true)?;
            Ok((c, s))
        });
        let (mut client, server) = match pair {
            Ok(p) => p,
            Err(e) => {
                stopped = os_err(&e);
                break;
            }
        };
        let mut this = 0u64;
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until && this < (256 << 20) {
            match client.write(&chunk) {
                Ok(n) => this += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Give the receiver's side a moment to take what is in flight.
                    std::thread::sleep(Duration::from_millis(2));
                    match client.write(&chunk) {
                        Ok(n) => this += n as u64,
                        Err(_) => break,
                    }
                }
                Err(e) => {
                    stopped = os_err(&e);
                    break;
                }
            }
        }
        buffered += this;
        keep.push((client, server));
        if this < (64 << 10) {
            refused_in_a_row += 1;
            if refused_in_a_row >= 32 {
                stopped = "the kernel took no more data".into();
                break;
            }
        } else {
            refused_in_a_row = 0;
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "buffered_mib": buffered >> 20,
            "pairs": keep.len(),
            "stopped": stopped,
        })
    );
    0
}

/// How many connections the connection hold opens to the launcher's listeners.
pub const HELD_CONNECTIONS: usize = 1100;

/// Holds [`HELD_CONNECTIONS`] idle connections to a granted listener (the DNS responder's TCP
/// side when nothing is granted) plus a flood of half-open DNS-over-TCP connections, then asks
/// the DNS responder a question and times the answer. Prints what it held and saw.
fn hold_connections(cfg: &ProbeConfig) -> i32 {
    raise_nofile();
    let dns = SocketAddr::new(Ipv4Addr::new(127, 0, 0, 53).into(), 53);
    let target = cfg.granted.first().copied().unwrap_or(dns);
    let started = Instant::now();
    let mut held = Vec::new();
    let mut failed = String::new();
    for _ in 0..HELD_CONNECTIONS {
        if started.elapsed() > Duration::from_secs(30) {
            failed = "out of time".into();
            break;
        }
        match TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
            Ok(s) => held.push(s),
            Err(e) => failed = os_err(&e),
        }
    }
    // Half-open DNS-over-TCP: a length prefix announcing a query that never comes.
    let mut half_open = 0;
    for _ in 0..200 {
        if let Ok(mut s) = TcpStream::connect_timeout(&dns, Duration::from_millis(200)) {
            let _ = s.write_all(&[0, 40, 0]);
            held.push(s);
            half_open += 1;
        }
    }
    // Let the launcher chew on it, then ask it something.
    std::thread::sleep(Duration::from_secs(2));
    let asked = Instant::now();
    let answer = (|| -> io::Result<u16> {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send_to(&crate::dns::query(0x6b6b, &cfg.refused_name, 1), dns)?;
        let mut b = [0u8; 512];
        let (n, _) = s.recv_from(&mut b)?;
        crate::dns::parse_response(&b[..n])
            .map(|(rcode, _)| rcode)
            .ok_or_else(|| io::Error::other("unparsable DNS reply"))
    })();
    let dns_ms = asked.elapsed().as_millis() as u64;
    println!(
        "{}",
        serde_json::json!({
            "held": held.len() - half_open,
            "half_open": half_open,
            "connect_error": failed,
            "dns_rcode": answer.as_ref().ok(),
            "dns_error": answer.as_ref().err().map(os_err),
            "dns_ms": dns_ms,
        })
    );
    // Keep holding a little longer, so that the launcher is measured while it is held.
    std::thread::sleep(Duration::from_secs(1));
    drop(held);
    0
}
