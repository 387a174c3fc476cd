//! The router's configuration: who it is, where it listens, and the bounds on what peers can
//! make it hold.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use umbra_pki::IdentityFile;

/// Bounds on everything a peer can make the router allocate or wait for.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open streams at once per identity, over all its connections; more are reset with
    /// `codes::LIMIT`.
    pub streams_per_identity: usize,
    /// Open streams at once over all identities; more are reset with `codes::LIMIT`. Each can
    /// hold a socket to a service, so this also bounds the router's file descriptors.
    pub streams_total: usize,
    /// Admitted connections at once per identity; more are closed with `codes::LIMIT` after
    /// the handshake. An SDK context opens one per lane per router.
    pub connections_per_identity: usize,
    /// Admitted connections at once over all identities; more are closed with `codes::LIMIT`.
    pub connections_total: usize,
    /// Bytes one identity's connections may make the router buffer, both directions counted:
    /// the QUIC flow-control windows granted to them (what a peer sends that nobody has read,
    /// what is sent to it that it has not acknowledged). A connection gets up to
    /// `connection_window` each way out of this; once it is spent, the identity's further
    /// connections work at `handshake_window` (see the `quota` module).
    pub buffer_per_identity: u64,
    /// Bytes all connections together may make the router buffer, as above.
    pub buffer_total: u64,
    /// The flow-control window, each way, that a connection has from its handshake on, before
    /// its identity is known and its grant set: small, since nothing bounds it per identity.
    pub handshake_window: u32,
    /// Bidirectional streams a peer may open at once on one connection (QUIC flow control).
    /// By default as many as its identity may hold open (`streams_per_identity`), the bound
    /// that counts: a client's one connection (the SDK makes one per router and lane) can then
    /// carry everything its identity may, where 256 left a tunneler's 257th connection waiting
    /// for a stream and an SDK opening more connections that the router refuses past 32.
    pub streams_per_connection: u32,
    /// How long a new stream has to deliver its whole request frame.
    pub request_timeout: Duration,
    /// QUIC handshakes in progress at once. Over it, attempts that proved their address are
    /// refused and the others are answered with a stateless Retry (see `handshakes`).
    pub handshakes_in_flight: usize,
    /// From this many handshakes in flight on, an attempt from an address not yet validated is
    /// answered with a stateless Retry instead of a handshake, so packets from spoofed sources
    /// cost one packet each and hold no slot. Capped at `handshakes_in_flight`.
    pub handshakes_before_retry: usize,
    /// Handshakes in flight per source (an IPv4 address or an IPv6 /64): over it, unvalidated
    /// attempts are asked to retry and validated ones refused, so one source cannot take every
    /// slot. Validated handshakes are counted apart, so packets that only claim an address
    /// cannot use up that address's share.
    pub handshakes_per_source: usize,
    /// How long a handshake may take: short, since a slot is held meanwhile.
    pub handshake_timeout: Duration,
    /// How long connecting to a router-hosted service may take (resolution included).
    pub connect_timeout: Duration,
    /// Per-stream receive window, bytes: near the bandwidth-delay product and not larger, so
    /// that a bulk stream does not build a standing queue in front of interactive ones. The
    /// "delay" includes scheduling on a busy host: 2 MiB held one loopback stream near 3 Gbit/s
    /// on a loaded 2-core machine, 4 MiB reached 4.5 to 6 Gbit/s.
    pub stream_window: u32,
    /// Most a connection is granted each way (receive and send window), bytes, out of
    /// `buffer_per_identity` and `buffer_total`.
    pub connection_window: u32,
    /// Idle connections are closed after this long (keep-alives keep live ones open).
    pub idle_timeout: Duration,
    /// How often an otherwise idle connection sends a keep-alive.
    pub keep_alive: Duration,
    /// The standing queue the router lets what it sends build before it backs off as for a
    /// loss (see `umbra_transport::congestion`); `None` is plain Cubic, which fills buffers until
    /// they overflow and so delays interactive streams behind bulk ones.
    pub queue_floor: Option<Duration>,
    /// Kernel buffer asked for the router's UDP socket, each direction, bytes (capped by
    /// `net.core.rmem_max` / `wmem_max`); too small a buffer drops datagrams under load.
    pub socket_buffer: usize,
    /// Data-plane threads ("lanes"), each with its own UDP socket on the listening port and its
    /// own connections (see the `lanes` module): connections on different lanes never wait
    /// for each other's thread. Default: one per core, at most 8.
    pub lanes: usize,
    /// How long a lane keeps polling its sockets after it last moved bytes before its thread
    /// sleeps (see `umbra_transport::busy_poll`): a round trip then finds the router awake instead
    /// of paying for waking a halted CPU. Zero turns it off.
    pub busy_poll: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            streams_per_identity: 1024,
            streams_total: 16 * 1024,
            connections_per_identity: 32,
            connections_total: 4096,
            buffer_per_identity: 64 * 1024 * 1024,
            buffer_total: 1024 * 1024 * 1024,
            handshake_window: 64 * 1024,
            streams_per_connection: 1024,
            request_timeout: Duration::from_secs(5),
            handshakes_in_flight: 256,
            handshakes_before_retry: 64,
            handshakes_per_source: 16,
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(10),
            queue_floor: Some(umbra_transport::congestion::DEFAULT_QUEUE_FLOOR),
            socket_buffer: umbra_transport::quic::SOCKET_BUFFER,
            lanes: std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
            busy_poll: umbra_transport::busy_poll::DEFAULT_WINDOW,
        }
    }
}

/// How to run a router.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The router's own enrolled identity (kind `router`). The router renews its certificate
    /// itself before it expires.
    pub identity: IdentityFile,
    /// Where to save each renewal of `identity` (atomically, mode 0600), normally the file it
    /// was loaded from, so that a restarted router starts from a valid certificate. `None`
    /// keeps renewals in memory only.
    pub identity_path: Option<PathBuf>,
    /// The UDP address to listen on.
    pub listen: SocketAddr,
    /// The `host:port` clients should use; defaults to the bound address.
    pub advertise: Option<String>,
    /// The controllers' addresses (one `host:port`, or several separated by commas, among
    /// which the control channel fails over), overriding the identity file's.
    pub controller: Option<String>,
    /// Without any message from the controller (heartbeats included) for this long, the router
    /// stops serving its last policy and refuses everything until it hears from it again.
    pub stale_after: Duration,
    /// Bounds on peers.
    pub limits: Limits,
    /// Where the router reads the wall time: certificate renewal, and whether an identity has
    /// expired. `Clock::system()` in production; tests move a manual one.
    pub clock: umbra_clock::Clock,
    /// Where to register the router's metrics (see `umbra_metrics`); `None` counts nothing
    /// beyond [`crate::RouterStats`].
    pub metrics: Option<umbra_metrics::Registry>,
}

impl RouterConfig {
    /// A configuration with default limits and a 60 s staleness bound.
    pub fn new(identity: IdentityFile, listen: SocketAddr) -> Self {
        RouterConfig {
            identity,
            identity_path: None,
            listen,
            advertise: None,
            controller: None,
            stale_after: Duration::from_secs(60),
            limits: Limits::default(),
            clock: umbra_clock::Clock::system(),
            metrics: None,
        }
    }
}
