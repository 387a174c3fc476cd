//! The sandbox's names: its `/etc/hosts` and the DNS responder inside it, both fed from the
//! tunneler's mappings, so a grant or a revocation changes listeners, hosts and DNS together.
//! The responder answers from those names alone and never forwards anything.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use umbra_sandbox::dns::{self, Outcome};
use umbra_sandbox::events::{EventKind, EventSink, EventWindow};
use umbra_tunneler::accept::{accept_with_backoff, AcceptBackoff};
use umbra_tunneler::Mapping;

/// The names the sandbox resolves, shared by the hosts writer and the DNS responder.
pub(crate) type Names = Arc<RwLock<HashMap<String, Ipv4Addr>>>;

fn names_of(list: &[Mapping]) -> Vec<(String, IpAddr)> {
    let mut out: Vec<(String, IpAddr)> = list
        .iter()
        .filter(|m| m.intercept.ip().is_none())
        .map(|m| (m.intercept.host().to_ascii_lowercase(), m.listen.ip()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Updates the names the responder answers from `list` and returns them, for the hosts file.
pub(crate) fn publish_names(names: &Names, list: &[Mapping]) -> Vec<(String, IpAddr)> {
    let pairs = names_of(list);
    if let Ok(mut n) = names.write() {
        n.clear();
        for (name, ip) in &pairs {
            if let IpAddr::V4(v4) = ip {
                n.insert(name.clone(), *v4);
            }
        }
    }
    pairs
}

/// Where the DNS responder listens inside the sandbox.
pub const DNS_ADDR: std::net::SocketAddr =
    std::net::SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)), 53);

/// The running DNS responder (UDP and TCP), the owner of its tasks: dropping it stops them all,
/// connections included, so no path out of the launcher leaves one answering.
pub(crate) struct Resolver {
    tasks: tokio::task::JoinSet<()>,
    audit: Arc<DnsAudit>,
}

impl Resolver {
    /// Binds the responder inside the sandbox's network namespace and starts answering from
    /// `names`; refused and malformed queries become events in `events`.
    pub(crate) fn start(
        netns: &dyn crate::inside::Namespace,
        names: Names,
        events: EventSink,
    ) -> std::io::Result<Resolver> {
        let udp = netns.bind_udp(DNS_ADDR).and_then(|s| {
            s.set_nonblocking(true)?;
            UdpSocket::from_std(s)
        })?;
        let tcp = netns
            .listen_tcp(DNS_ADDR)
            .and_then(tokio::net::TcpListener::from_std)?;
        let audit = Arc::new(DnsAudit::new(events));
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(serve_dns(udp, names.clone(), audit.clone()));
        tasks.spawn(serve_dns_tcp(tcp, names, audit.clone()));
        Ok(Resolver { tasks, audit })
    }

    /// Stops answering, then reports what the rate limit held back.
    pub(crate) fn stop(mut self) {
        self.tasks.abort_all();
        self.audit.flush();
    }
}

/// Refused and malformed queries become events, a bounded number of them: one per name (as
/// asked) per second, at most 50 a second (a resolver asks for A and AAAA, and retries, over UDP
/// and TCP; an agent encoding data in names asks as fast as it can).
struct DnsAudit {
    events: EventSink,
    window: std::sync::Mutex<EventWindow>,
}

impl DnsAudit {
    fn new(events: EventSink) -> DnsAudit {
        DnsAudit {
            events,
            window: std::sync::Mutex::new(EventWindow::new(Duration::from_secs(1), 50)),
        }
    }

    fn report(&self, outcome: Outcome) {
        let (key, kind) = match outcome {
            Outcome::Refused(name) => (format!("refused {name}"), EventKind::DnsRefused { name }),
            Outcome::Malformed { reason, name } => (
                format!("malformed {reason} {}", name.as_deref().unwrap_or("")),
                EventKind::DnsMalformed {
                    reason: reason.to_string(),
                    name,
                },
            ),
            Outcome::Answered(_) | Outcome::NoData(_) => return,
        };
        let now = Instant::now();
        let (admitted, summary) = match self.window.lock() {
            Ok(mut w) => {
                let admitted = w.admit(now, &key);
                (admitted, w.summary(now, false))
            }
            Err(_) => (false, None),
        };
        self.summarise(summary);
        if admitted {
            self.events.emit(kind);
        }
    }

    /// Writes how many events were suppressed, if any: a flood of refused names stays visible
    /// as a count even where its names are not all written.
    fn summarise(&self, count: Option<u64>) {
        if let Some(count) = count {
            self.events.emit(EventKind::Suppressed {
                what: "dns".into(),
                count,
            });
        }
    }

    /// At the end of the sandbox: says what is left to say.
    fn flush(&self) {
        let count = match self.window.lock() {
            Ok(mut w) => w.summary(Instant::now(), true),
            Err(_) => None,
        };
        self.summarise(count);
    }
}

/// Answers one query from `names`: `None` for input that is not DNS at all.
fn answer_from(names: &Names, query: &[u8]) -> Option<(Vec<u8>, Outcome)> {
    let lookup = |name: &str| names.read().ok().and_then(|m| m.get(name).copied());
    dns::answer(query, lookup)
}

/// Answers the sandbox's DNS queries over UDP from `names`; never forwards anything.
async fn serve_dns(socket: UdpSocket, names: Names, refused: Arc<DnsAudit>) {
    let mut buf = [0u8; 1500];
    let mut backoff = AcceptBackoff::new();
    loop {
        // A failing socket must not spin the launcher on the agent's behalf.
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => {
                backoff.succeeded();
                x
            }
            Err(e) => {
                tokio::time::sleep(backoff.failed(&e)).await;
                continue;
            }
        };
        let Some((reply, outcome)) = answer_from(&names, &buf[..n]) else {
            continue;
        };
        let _ = socket.send_to(&reply, peer).await;
        refused.report(outcome);
    }
}

/// Connections the agent may hold open to the TCP side of its DNS responder at once.
const DNS_TCP_CONNECTIONS: usize = 16;
/// How long a DNS-over-TCP connection may sit without a complete query (a stub resolver sends
/// its query at once; one that does not is holding a slot).
const DNS_TCP_IDLE: Duration = Duration::from_secs(5);
/// How long one DNS-over-TCP connection may live, however busy: a slot is lent, not given.
const DNS_TCP_LIFETIME: Duration = Duration::from_secs(30);
/// The largest query taken over TCP (a query names one host; anything longer is not one).
const DNS_TCP_MAX_QUERY: usize = 1500;

/// The same answers over TCP (RFC 7766: two-byte length, then the message), for resolvers that
/// use it (`options use-vc`, `dig +tcp`, retries after truncation). Bounded in connections, idle
/// time, lifetime and query size, since the agent drives it. A slot is taken before `accept`:
/// over the bound, connections wait in the kernel's backlog, so a flood of half-open connections
/// costs the launcher nothing (closing the newest at once instead let the agent make the
/// launcher accept and close as fast as it could reconnect).
async fn serve_dns_tcp(listener: tokio::net::TcpListener, names: Names, refused: Arc<DnsAudit>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(DNS_TCP_CONNECTIONS));
    let mut backoff = AcceptBackoff::new();
    // The connections end with the listener, however it ends.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (conn, _) = accept_with_backoff(&mut backoff, "dns/tcp", || listener.accept()).await;
        let (names, refused) = (names.clone(), refused.clone());
        conns.spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(DNS_TCP_LIFETIME, serve_dns_conn(conn, &names, &refused))
                .await;
        });
    }
}

/// Answers the queries of one DNS-over-TCP connection until it is idle, ends or errs.
async fn serve_dns_conn(mut conn: tokio::net::TcpStream, names: &Names, refused: &DnsAudit) {
    let mut buf = vec![0u8; DNS_TCP_MAX_QUERY];
    loop {
        let query = async {
            let mut len = [0u8; 2];
            conn.read_exact(&mut len).await?;
            let len = usize::from(u16::from_be_bytes(len));
            if len > DNS_TCP_MAX_QUERY {
                return Err(std::io::ErrorKind::InvalidData.into());
            }
            conn.read_exact(&mut buf[..len]).await?;
            Ok::<usize, std::io::Error>(len)
        };
        let Ok(Ok(len)) = tokio::time::timeout(DNS_TCP_IDLE, query).await else {
            return;
        };
        let Some((reply, outcome)) = answer_from(names, &buf[..len]) else {
            return;
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(2 + reply.len());
        framed.extend_from_slice(&n.to_be_bytes());
        framed.extend_from_slice(&reply);
        if conn.write_all(&framed).await.is_err() {
            return;
        }
        refused.report(outcome);
    }
}
