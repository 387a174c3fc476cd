//! Admission of connections that have not authenticated yet: a sans-IO state machine.
//!
//! Every TCP connection the controller accepts is *pending* until its TLS handshake ends. A
//! pending connection costs a task, a socket and (once the ClientHello is in) handshake work, and
//! before this module one source could hold all of them with idle sockets. The rules here bound
//! what one source can hold and decide whom to shed when slots run short:
//!
//! * at most [`Limits::per_source`] pending connections per source (an IPv4 address, or an IPv6
//!   /64, which is what one host is given);
//! * at most [`Limits::pending`] pending connections in all; when full, a newcomer takes the
//!   slot of a connection that has **sent nothing yet**, from the source that holds the most
//!   silent ones, oldest first; connections that have spoken are not shed for a newcomer;
//! * once the ClientHello is in, the connection moves to the handshake pool of its server name
//!   (enrollment or mutual TLS), each with its own bound, so anonymous enrollment traffic cannot
//!   use up the handshakes routers and admins need.
//!
//! A connection leaves this machine when its handshake ends, either way; authenticated ones are
//! then counted by the server's connection budgets, which nothing anonymous can touch. No clock
//! is read here: `now` is an argument, and the deadlines themselves are the shell's timers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// The unit of per-source accounting: an IPv4 address, or the /64 of an IPv6 address (an
/// IPv4-mapped IPv6 address counts as its IPv4 address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// One IPv4 address.
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6Prefix(u64),
}

impl Source {
    /// The source an address belongs to.
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => Source::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Which handshake a ClientHello asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pool {
    /// `enroll.controller.umbra`: no client certificate.
    Enroll,
    /// Everything else: a client certificate is required.
    Main,
}

/// The bounds. See the module documentation for what happens at each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Pending connections in all.
    pub pending: usize,
    /// Pending connections per source.
    pub per_source: usize,
    /// Handshakes in progress for enrollment.
    pub enroll_handshakes: usize,
    /// Handshakes in progress for mutual TLS.
    pub main_handshakes: usize,
}

impl Limits {
    /// The controller's defaults: 512 pending, 16 per source, 64 enrollment and 192 mutual-TLS
    /// handshakes.
    pub const DEFAULT: Limits = Limits {
        pending: 512,
        per_source: 16,
        enroll_handshakes: 64,
        main_handshakes: 192,
    };
}

/// A pending connection's handle in the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

/// How far a pending connection has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepted; no byte received.
    Silent,
    /// Bytes received; the ClientHello is not complete.
    Talking,
    /// ClientHello read; the handshake is running in this pool.
    Handshake(Pool),
}

#[derive(Debug)]
struct Entry<H> {
    source: Source,
    since: Instant,
    phase: Phase,
    handle: H,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its source already holds [`Limits::per_source`] pending connections that have spoken.
    SourceFull,
    /// Every pending slot is held by connections that have spoken.
    Full,
    /// The handshake pool it asked for is full.
    PoolFull(Pool),
}

/// The answer to a new connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<H> {
    /// Admitted as `id`; `shed`, if any, is the handle of a silent connection to close now.
    Accept {
        /// The newcomer's id.
        id: ConnId,
        /// A connection that lost its slot to the newcomer.
        shed: Option<H>,
    },
    /// Refused: close the newcomer.
    Refuse(Refusal),
}

/// The admission state: every pending connection, by id, with its source and phase.
///
/// `H` is whatever the shell needs to close a shed connection (a cancellation token).
#[derive(Debug)]
pub struct Admission<H> {
    limits: Limits,
    next: u64,
    conns: HashMap<ConnId, Entry<H>>,
    per_source: HashMap<Source, usize>,
    per_pool: HashMap<Pool, usize>,
}

impl<H> Admission<H> {
    /// An empty machine with these bounds.
    pub fn new(limits: Limits) -> Self {
        Admission {
            limits,
            next: 0,
            conns: HashMap::new(),
            per_source: HashMap::new(),
            per_pool: HashMap::new(),
        }
    }

    /// Pending connections now.
    pub fn pending(&self) -> usize {
        self.conns.len()
    }

    /// Pending connections of `source` now.
    pub fn pending_from(&self, source: Source) -> usize {
        self.per_source.get(&source).copied().unwrap_or(0)
    }

    /// A new connection from `source`, accepted at `now`.
    pub fn admit(&mut self, source: Source, now: Instant, handle: H) -> Admit<H> {
        let mut shed = None;
        if self.pending_from(source) >= self.limits.per_source {
            // The source replaces its own oldest silent connection, or is refused: it never
            // takes more, and never takes from anyone else.
            match self.oldest_silent(Some(source)) {
                Some(victim) => shed = self.remove(victim),
                None => return Admit::Refuse(Refusal::SourceFull),
            }
        } else if self.conns.len() >= self.limits.pending {
            let Some(victim) = self.busiest_silent() else {
                return Admit::Refuse(Refusal::Full);
            };
            shed = self.remove(victim);
        }
        let id = ConnId(self.next);
        self.next += 1;
        *self.per_source.entry(source).or_insert(0) += 1;
        self.conns.insert(
            id,
            Entry {
                source,
                since: now,
                phase: Phase::Silent,
                handle,
            },
        );
        Admit::Accept { id, shed }
    }

    /// The connection has sent its first bytes: it is no longer the first to be shed.
    pub fn spoke(&mut self, id: ConnId) {
        if let Some(e) = self.conns.get_mut(&id) {
            if e.phase == Phase::Silent {
                e.phase = Phase::Talking;
            }
        }
    }

    /// The connection's ClientHello asked for `pool`: it takes a handshake slot there. When the
    /// pool is full, the slot of the oldest handshake of the source holding the most handshakes
    /// in that pool is taken instead (its handle is returned, to be closed now), provided that
    /// source holds more than the newcomer's source: stalled handshakes from many sources
    /// (complete ClientHellos that never finish) cannot keep a new source out, yet a source
    /// never takes from one holding no more than itself. Otherwise the newcomer is refused
    /// (and removed).
    pub fn hello(&mut self, id: ConnId, pool: Pool) -> Result<Option<H>, Refusal> {
        let cap = match pool {
            Pool::Enroll => self.limits.enroll_handshakes,
            Pool::Main => self.limits.main_handshakes,
        };
        let used = self.per_pool.get(&pool).copied().unwrap_or(0);
        let Some(e) = self.conns.get(&id) else {
            return Err(Refusal::Full);
        };
        if matches!(e.phase, Phase::Handshake(_)) {
            return Ok(None);
        }
        let source = e.source;
        let mut shed = None;
        if used >= cap {
            match self.busiest_handshake(pool, source) {
                Some(victim) => shed = self.remove(victim),
                None => {
                    self.remove(id);
                    return Err(Refusal::PoolFull(pool));
                }
            }
        }
        if let Some(e) = self.conns.get_mut(&id) {
            e.phase = Phase::Handshake(pool);
        }
        *self.per_pool.entry(pool).or_insert(0) += 1;
        Ok(shed)
    }

    /// The oldest handshake in `pool` of the source holding the most there, if that source holds
    /// more than `newcomer` does.
    fn busiest_handshake(&self, pool: Pool, newcomer: Source) -> Option<ConnId> {
        let mut held: HashMap<Source, usize> = HashMap::new();
        for e in self.conns.values() {
            if e.phase == Phase::Handshake(pool) {
                *held.entry(e.source).or_insert(0) += 1;
            }
        }
        let mine = held.get(&newcomer).copied().unwrap_or(0);
        let most = held.values().copied().max()?;
        if most <= mine {
            return None;
        }
        self.conns
            .iter()
            .filter(|(_, e)| {
                e.phase == Phase::Handshake(pool) && held.get(&e.source) == Some(&most)
            })
            .min_by_key(|(id, e)| (e.since, **id))
            .map(|(id, _)| *id)
    }

    /// The connection is no longer pending (handshake done, failed, timed out or shed).
    /// Releasing an id twice, or an unknown one, does nothing.
    pub fn release(&mut self, id: ConnId) {
        self.remove(id);
    }

    fn remove(&mut self, id: ConnId) -> Option<H> {
        let e = self.conns.remove(&id)?;
        if let Some(n) = self.per_source.get_mut(&e.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&e.source);
            }
        }
        if let Phase::Handshake(pool) = e.phase {
            if let Some(n) = self.per_pool.get_mut(&pool) {
                *n = n.saturating_sub(1);
            }
        }
        Some(e.handle)
    }

    /// The oldest silent connection, of `source` if given.
    fn oldest_silent(&self, source: Option<Source>) -> Option<ConnId> {
        self.conns
            .iter()
            .filter(|(_, e)| e.phase == Phase::Silent && source.is_none_or(|s| s == e.source))
            .min_by_key(|(id, e)| (e.since, **id))
            .map(|(id, _)| *id)
    }

    /// The oldest silent connection of the source holding the most silent connections.
    fn busiest_silent(&self) -> Option<ConnId> {
        let mut silent: HashMap<Source, usize> = HashMap::new();
        for e in self.conns.values().filter(|e| e.phase == Phase::Silent) {
            *silent.entry(e.source).or_insert(0) += 1;
        }
        let (source, _) = silent
            .into_iter()
            .max_by_key(|(s, n)| (*n, std::cmp::Reverse(*s)))?;
        self.oldest_silent(Some(source))
    }
}

#[cfg(test)]
#[path = "admission_tests.rs"]
mod tests;
