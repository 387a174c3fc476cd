//! What each identity may make the router hold: connections, streams, and bytes buffered in
//! QUIC flow-control windows, per identity and in all.
//!
//! Bytes are bounded through flow control, the only place they can be: a peer can make the
//! router hold at most the receive window it was granted (data it sent that nobody has read yet,
//! e.g. while the service's connect stalls) plus the send window (data for it that it does not
//! acknowledge). Each connection is granted a window, the same each way, out of its identity's
//! budget and the router's; the grant is counted twice (both ways) until the connection ends.
//! Every connection starts with `handshake_window`, given at the handshake before the peer is
//! known, and is never granted less; an identity whose budget is spent keeps working at that
//! window, and a connection granted less than `connection_window` grows when budget comes back
//! ([`Quotas::grow`]).
//!
//! So an identity holds at most `buffer_per_identity` plus two handshake windows per connection
//! beyond it, and the router `buffer_total` plus two handshake windows per connection.
//!
//! Pure bookkeeping: no sockets, no clock, no runtime.

use std::collections::HashMap;
use std::hash::Hash;

/// The bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QuotaLimits {
    /// Admitted connections per identity.
    pub connections_per_identity: usize,
    /// Admitted connections in all.
    pub connections_total: usize,
    /// Open streams per identity.
    pub streams_per_identity: usize,
    /// Open streams in all.
    pub streams_total: usize,
    /// Window bytes granted to one identity's connections, both ways counted.
    pub buffer_per_identity: u64,
    /// Window bytes granted to all connections, both ways counted.
    pub buffer_total: u64,
    /// The window every connection has from its handshake on, each way.
    pub handshake_window: u64,
    /// The most one connection is granted, each way.
    pub connection_window: u64,
}

/// Which limit refused a connection or stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Limit {
    /// The identity has `connections_per_identity` connections.
    #[error("the identity's connection limit")]
    IdentityConnections,
    /// The router has `connections_total` connections.
    #[error("the router's connection limit")]
    RouterConnections,
    /// The identity has `streams_per_identity` streams open.
    #[error("the identity's stream limit")]
    IdentityStreams,
    /// The router has `streams_total` streams open.
    #[error("the router's stream limit")]
    RouterStreams,
}

/// What one identity, or the router, holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    /// Admitted connections.
    pub connections: usize,
    /// Open streams.
    pub streams: usize,
    /// Window bytes granted, both ways.
    pub bytes: u64,
}

/// The holdings of every identity.
#[derive(Debug)]
pub(crate) struct Quotas<K> {
    limits: QuotaLimits,
    by_id: HashMap<K, Held>,
    total: Held,
}

impl<K: Hash + Eq + Clone> Quotas<K> {
    /// Nothing held.
    pub fn new(limits: QuotaLimits) -> Self {
        Quotas {
            limits,
            by_id: HashMap::new(),
            total: Held::default(),
        }
    }

    /// The bounds.
    pub fn limits(&self) -> QuotaLimits {
        self.limits
    }

    /// What `id` holds now.
    pub fn held(&self, id: &K) -> Held {
        self.by_id.get(id).copied().unwrap_or_default()
    }

    /// What the router holds now.
    pub fn total(&self) -> Held {
        self.total
    }

    /// The most a window of `id` may grow by now, each way.
    fn room(&self, id: &K) -> u64 {
        let mine = self.held(id).bytes;
        let id_left = self.limits.buffer_per_identity.saturating_sub(mine);
        let all_left = self.limits.buffer_total.saturating_sub(self.total.bytes);
        id_left.min(all_left) / 2
    }

    /// Admits a connection of `id`; returns its window, each way.
    pub fn open_connection(&mut self, id: &K) -> Result<u64, Limit> {
        let l = self.limits;
        if self.held(id).connections >= l.connections_per_identity {
            return Err(Limit::IdentityConnections);
        }
        if self.total.connections >= l.connections_total {
            return Err(Limit::RouterConnections);
        }
        let window = self
            .room(id)
            .min(l.connection_window)
            .max(l.handshake_window);
        let held = self.by_id.entry(id.clone()).or_default();
        held.connections += 1;
        held.bytes += 2 * window;
        self.total.connections += 1;
        self.total.bytes += 2 * window;
        Ok(window)
    }

    /// Grows a connection of `id` granted `window` each way towards `connection_window`, as far
    /// as the budgets allow; returns its window now (never less than `window`).
    pub fn grow(&mut self, id: &K, window: u64) -> u64 {
        let more = self
            .room(id)
            .min(self.limits.connection_window.saturating_sub(window));
        if more > 0 {
            if let Some(held) = self.by_id.get_mut(id) {
                held.bytes += 2 * more;
                self.total.bytes += 2 * more;
                return window + more;
            }
        }
        window
    }

    /// Forgets a connection of `id` whose window (each way) was `window`.
    pub fn close_connection(&mut self, id: &K, window: u64) {
        self.total.connections = self.total.connections.saturating_sub(1);
        self.total.bytes = self.total.bytes.saturating_sub(2 * window);
        if let Some(held) = self.by_id.get_mut(id) {
            held.connections = held.connections.saturating_sub(1);
            held.bytes = held.bytes.saturating_sub(2 * window);
        }
        self.forget_if_idle(id);
    }

    /// Opens a stream of `id`.
    pub fn open_stream(&mut self, id: &K) -> Result<(), Limit> {
        if self.held(id).streams >= self.limits.streams_per_identity {
            return Err(Limit::IdentityStreams);
        }
        if self.total.streams >= self.limits.streams_total {
            return Err(Limit::RouterStreams);
        }
        self.by_id.entry(id.clone()).or_default().streams += 1;
        self.total.streams += 1;
        Ok(())
    }

    /// Closes a stream of `id`.
    pub fn close_stream(&mut self, id: &K) {
        self.total.streams = self.total.streams.saturating_sub(1);
        if let Some(held) = self.by_id.get_mut(id) {
            held.streams = held.streams.saturating_sub(1);
        }
        self.forget_if_idle(id);
    }

    fn forget_if_idle(&mut self, id: &K) {
        if self.by_id.get(id).is_some_and(|h| *h == Held::default()) {
            self.by_id.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1024 * 1024;
    const LIMITS: QuotaLimits = QuotaLimits {
        connections_per_identity: 8,
        connections_total: 20,
        streams_per_identity: 5,
        streams_total: 12,
        buffer_per_identity: 64 * MIB,
        buffer_total: 160 * MIB,
        handshake_window: MIB / 4,
        connection_window: 16 * MIB,
    };

    #[test]
    fn an_identity_spends_its_budget_then_works_at_the_handshake_window() {
        let mut q = Quotas::new(LIMITS);
        assert_eq!(q.open_connection(&"a"), Ok(16 * MIB));
        assert_eq!(q.open_connection(&"a"), Ok(16 * MIB));
        assert_eq!(q.open_connection(&"a"), Ok(MIB / 4));
        assert_eq!(q.held(&"a").bytes, 64 * MIB + MIB / 2);
        // Another identity is untouched by it.
        assert_eq!(q.open_connection(&"b"), Ok(16 * MIB));
        // A closed connection's budget lets a short one grow.
        q.close_connection(&"a", 16 * MIB);
        assert_eq!(q.grow(&"a", MIB / 4), 16 * MIB);
        assert_eq!(q.held(&"a").bytes, 64 * MIB);
    }

    #[test]
    fn connection_and_stream_counts_are_capped_per_identity_and_in_all() {
        let mut q = Quotas::new(LIMITS);
        for _ in 0..8 {
            q.open_connection(&0u32).expect("under the cap");
        }
        assert_eq!(q.open_connection(&0), Err(Limit::IdentityConnections));
        for i in 1..=12u32 {
            q.open_connection(&i).expect("others");
        }
        assert_eq!(q.open_connection(&99), Err(Limit::RouterConnections));
        for _ in 0..5 {
            q.open_stream(&0).expect("under the cap");
        }
        assert_eq!(q.open_stream(&0), Err(Limit::IdentityStreams));
        for _ in 0..5 {
            q.open_stream(&1).expect("under the cap");
        }
        q.open_stream(&2).expect("under the cap");
        q.open_stream(&2).expect("under the cap");
        assert_eq!(q.open_stream(&2), Err(Limit::RouterStreams));
        q.close_stream(&0);
        q.open_stream(&2).expect("a slot came back");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Open(u8),
        Close(usize),
        Grow(usize),
        Stream(u8),
        EndStream(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..4).prop_map(Op::Open),
            any::<usize>().prop_map(Op::Close),
            any::<usize>().prop_map(Op::Grow),
            (0u8..4).prop_map(Op::Stream),
            any::<usize>().prop_map(Op::EndStream),
        ]
    }

    proptest! {
        /// Whatever the order of opens, grows and closes: every count stays under its cap, an
        /// identity's bytes under its budget plus two handshake windows per connection (the
        /// router's likewise), the books match the connections' own windows, and closing
        /// everything returns to nothing.
        #[test]
        fn bounds_hold_and_books_balance(ops in proptest::collection::vec(op(), 0..300)) {
            let mut q = Quotas::new(LIMITS);
            let mut conns: Vec<(u8, u64)> = Vec::new();
            let mut streams: Vec<u8> = Vec::new();
            for op in ops {
                match op {
                    Op::Open(id) => if let Ok(w) = q.open_connection(&id) {
                        prop_assert!((LIMITS.handshake_window..=LIMITS.connection_window).contains(&w));
                        conns.push((id, w));
                    },
                    Op::Close(i) if !conns.is_empty() => {
                        let (id, w) = conns.remove(i % conns.len());
                        q.close_connection(&id, w);
                    }
                    Op::Grow(i) if !conns.is_empty() => {
                        let i = i % conns.len();
                        let (id, w) = conns[i];
                        let grown = q.grow(&id, w);
                        prop_assert!(grown >= w && grown <= LIMITS.connection_window);
                        conns[i].1 = grown;
                    }
                    Op::Stream(id) if q.open_stream(&id).is_ok() => streams.push(id),
                    Op::EndStream(i) if !streams.is_empty() => {
                        let id = streams.remove(i % streams.len());
                        q.close_stream(&id);
                    }
                    _ => {}
                }
                let floor = 2 * LIMITS.handshake_window;
                for id in 0..4u8 {
                    let mine: Vec<u64> = conns.iter().filter(|c| c.0 == id).map(|c| c.1).collect();
                    let held = q.held(&id);
                    prop_assert_eq!(held.bytes, mine.iter().map(|w| 2 * w).sum::<u64>());
                    prop_assert_eq!(held.connections, mine.len());
                    prop_assert!(held.connections <= LIMITS.connections_per_identity);
                    prop_assert!(held.streams <= LIMITS.streams_per_identity);
                    prop_assert!(held.bytes <= LIMITS.buffer_per_identity + floor * mine.len() as u64);
                }
                let total = q.total();
                prop_assert!(total.connections <= LIMITS.connections_total);
                prop_assert!(total.streams <= LIMITS.streams_total);
                prop_assert!(total.bytes <= LIMITS.buffer_total + floor * conns.len() as u64);
            }
            for (id, w) in conns {
                q.close_connection(&id, w);
            }
            for id in streams {
                q.close_stream(&id);
            }
            prop_assert_eq!(q.total(), Held::default());
            prop_assert!(q.by_id.is_empty());
        }
    }
}
