//! What `umbra run` and `umbra tunnel --netns/--pid` share: a tunneler whose listeners are made
//! inside another network namespace, whose refused dials are events, and whose names reach that
//! namespace through a hosts file and a DNS responder inside it, all following the identity's
//! view live. Only where the sockets come from (the sandbox's init, or a thread that joined an
//! existing namespace) and where the hosts lines go differ.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use umbra_sandbox::events::{EventKind, EventSink};
use umbra_sdk::Context;
use umbra_tunneler::{Mapping, Tunneler, TunnelerConfig};

use crate::resolver::{publish_names, Names, Resolver};

/// A network namespace the launcher can make sockets in without entering it.
pub trait Namespace: Send + Sync + 'static {
    /// A non-blocking TCP listener at `addr` inside.
    fn listen_tcp(&self, addr: SocketAddr) -> std::io::Result<std::net::TcpListener>;
    /// A non-blocking UDP socket at `addr` inside.
    fn bind_udp(&self, addr: SocketAddr) -> std::io::Result<std::net::UdpSocket>;
}

impl Namespace for umbra_sandbox::NetNs {
    fn listen_tcp(&self, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
        umbra_sandbox::NetNs::listen_tcp(self, addr)
    }
    fn bind_udp(&self, addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
        umbra_sandbox::NetNs::bind_udp(self, addr)
    }
}

impl Namespace for umbra_sandbox::netns_join::JoinedNetNs {
    fn listen_tcp(&self, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
        umbra_sandbox::netns_join::JoinedNetNs::listen_tcp(self, addr)
    }
    fn bind_udp(&self, addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
        umbra_sandbox::netns_join::JoinedNetNs::bind_udp(self, addr)
    }
}

/// Starts a tunneler whose listeners are made in `ns` (at most `max_connections` carried at
/// once), whose refused dials go to `events`, and waits (15 s at most) for its first view, so
/// that what runs in the namespace starts with what it may reach.
pub(crate) async fn start_tunneler(
    ctx: Context,
    mut tcfg: TunnelerConfig,
    ns: Arc<dyn Namespace>,
    events: &EventSink,
    max_connections: usize,
) -> Result<Tunneler, String> {
    tcfg.max_connections = tcfg.max_connections.min(max_connections);
    tcfg.listen = Some(Arc::new(move |addr| ns.listen_tcp(addr)));
    let events = events.clone();
    tcfg.on_denied = Some(Arc::new(move |service, e| {
        events.emit(EventKind::DialDenied {
            service: service.to_string(),
            reason: e.to_string(),
        })
    }));
    // The hosts lines go where the caller says (see `NameService`), not the host's file.
    tcfg.hosts_file = None;
    let tunneler = Tunneler::start(ctx, tcfg)
        .await
        .map_err(|e| e.to_string())?;
    let mut mappings = tunneler.mappings();
    let mut refused = tunneler.refused();
    let first = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if *refused.borrow() {
                return Err("the controller refused this identity".to_string());
            }
            tokio::select! {
                r = mappings.changed() => {
                    r.map_err(|_| "the tunneler stopped".to_string())?;
                    // An emptied list because the identity was refused is no first view.
                    if *refused.borrow() {
                        return Err("the controller refused this identity".to_string());
                    }
                    return Ok(());
                }
                r = refused.changed() => {
                    r.map_err(|_| "the tunneler stopped".to_string())?;
                }
            }
        }
    })
    .await;
    // On an early return the tunneler is stopped by its `Drop`.
    match first {
        Ok(Ok(())) => Ok(tunneler),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no answer from the controller within 15 s".into()),
    }
}

/// Writes the hosts lines (name, address) wherever the namespace's processes read them.
pub(crate) type HostsWriter = Box<dyn FnMut(&[(String, IpAddr)]) + Send>;

/// The namespace's names: the DNS responder inside it and the hosts writer, both following the
/// tunneler's mappings. The owner of their tasks: dropping it stops them.
pub(crate) struct NameService {
    resolver: Resolver,
    _tasks: JoinSet<()>,
}

impl NameService {
    /// Publishes the current names through `write`, binds the responder in `ns` and keeps both
    /// following `mappings`.
    pub(crate) fn start(
        mut mappings: watch::Receiver<Vec<Mapping>>,
        ns: &dyn Namespace,
        events: EventSink,
        mut write: HostsWriter,
    ) -> std::io::Result<NameService> {
        let names: Names = Arc::default();
        write(&publish_names(&names, &mappings.borrow_and_update()));
        let resolver = Resolver::start(ns, names.clone(), events)?;
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            while mappings.changed().await.is_ok() {
                let list = mappings.borrow_and_update().clone();
                write(&publish_names(&names, &list));
            }
        });
        Ok(NameService {
            resolver,
            _tasks: tasks,
        })
    }

    /// Stops answering and reports what the responder's rate limit held back.
    pub(crate) fn stop(self) {
        self.resolver.stop();
    }
}
