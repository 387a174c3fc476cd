//! Allow / deny / terminate counters, exposed as a snapshot rather than printed, so that an
//! operator's metrics system (or a test) can read them.

use std::sync::atomic::{AtomicU64, Ordering};

/// What the router has decided since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterStats {
    /// Connections whose identity was admitted.
    pub connections_admitted: u64,
    /// Connections refused after the handshake (unknown, inactive, revoked, not an agent, or
    /// no current policy). Handshakes that TLS refused are not counted here.
    pub connections_refused: u64,
    /// Live connections closed because the identity or certificate was revoked or expired.
    pub connections_terminated: u64,
    /// Streams (dial or bind) allowed by policy.
    pub streams_allowed: u64,
    /// Streams refused by policy.
    pub streams_denied: u64,
    /// Live streams cut because their grant was revoked.
    pub streams_terminated: u64,
    /// Streams refused for a malformed, oversized or late request.
    pub bad_requests: u64,
    /// Streams and connections refused for a limit of their identity or of the router (see
    /// [`crate::Limits`]).
    pub limited: u64,
    /// Dial streams refused by a `connections` or `rate` limit of the grant they came through
    /// (see `GrantLimitHit`).
    pub grant_limited: u64,
    /// Connection attempts answered with a stateless Retry (address validation) because
    /// handshakes piled up or their source had its share in flight.
    pub handshakes_retried: u64,
    /// Connection attempts refused before the handshake (validated ones over a limit).
    pub handshakes_refused: u64,
    /// Handshakes in flight now.
    pub handshakes_in_flight: u64,
    /// What all identities hold now.
    pub held: Usage,
}

/// What an identity (or all of them) holds on a router now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Admitted connections.
    pub connections: usize,
    /// Open streams.
    pub streams: usize,
    /// Flow-control window bytes granted to its connections, both directions: the most its
    /// peers can make the router buffer (see [`crate::Limits::buffer_per_identity`]).
    pub buffer_bytes: u64,
}

impl From<crate::quota::Held> for Usage {
    fn from(h: crate::quota::Held) -> Usage {
        Usage {
            connections: h.connections,
            streams: h.streams,
            buffer_bytes: h.bytes,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub connections_admitted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub connections_terminated: AtomicU64,
    pub streams_allowed: AtomicU64,
    pub streams_denied: AtomicU64,
    pub streams_terminated: AtomicU64,
    pub bad_requests: AtomicU64,
    pub limited: AtomicU64,
    pub grant_limited: AtomicU64,
    pub handshakes_retried: AtomicU64,
    pub handshakes_refused: AtomicU64,
}

/// Adds one.
pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub fn snapshot(&self) -> RouterStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RouterStats {
            connections_admitted: g(&self.connections_admitted),
            connections_refused: g(&self.connections_refused),
            connections_terminated: g(&self.connections_terminated),
            streams_allowed: g(&self.streams_allowed),
            streams_denied: g(&self.streams_denied),
            streams_terminated: g(&self.streams_terminated),
            bad_requests: g(&self.bad_requests),
            limited: g(&self.limited),
            grant_limited: g(&self.grant_limited),
            handshakes_retried: g(&self.handshakes_retried),
            handshakes_refused: g(&self.handshakes_refused),
            handshakes_in_flight: 0,
            held: Usage::default(),
        }
    }
}
