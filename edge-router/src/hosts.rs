//! SDK hosts: connections that announced (with `Op::Bind`) that they serve a service, and to
//! which the router forwards that service's callers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use quinn::Connection;
use umbra_policies::{IdentityId, Name};

/// Most services one connection may bind; more binds are refused.
pub(crate) const MAX_BINDS_PER_CONNECTION: usize = 64;

/// One registered host of one service.
#[derive(Clone)]
pub(crate) struct Host {
    pub id: IdentityId,
    pub conn: Connection,
}

/// Hosts by service, each with the number of its open registrations of that service (a host
/// binding a service again on the same connection, as a gateway restarted in its process does
/// before its old registration ends, holds two: the first one ending must not unregister it);
/// picks among them round-robin.
#[derive(Default)]
pub(crate) struct Hosts {
    by_service: Mutex<HashMap<Name, Vec<(Host, usize)>>>,
    next: AtomicUsize,
}

impl Hosts {
    /// Registers `conn` as a host of `service`. Returns false if the connection is at its
    /// bind limit.
    pub fn add(&self, service: Name, host: Host) -> bool {
        let mut map = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        let stable = host.conn.stable_id();
        let binds: usize = map
            .values()
            .flatten()
            .filter(|(h, _)| h.conn.stable_id() == stable)
            .map(|(_, n)| n)
            .sum();
        if binds >= MAX_BINDS_PER_CONNECTION {
            return false;
        }
        let hosts = map.entry(service).or_default();
        match hosts.iter_mut().find(|(h, _)| h.conn.stable_id() == stable) {
            Some((_, n)) => *n += 1,
            None => hosts.push((host, 1)),
        }
        true
    }

    /// Removes one binding: the host stops hosting the service when its last one ends.
    pub fn remove(&self, service: &Name, stable_id: usize) {
        let mut map = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hosts) = map.get_mut(service) {
            for (h, n) in hosts.iter_mut() {
                if h.conn.stable_id() == stable_id {
                    *n = n.saturating_sub(1);
                }
            }
            hosts.retain(|(_, n)| *n > 0);
            if hosts.is_empty() {
                map.remove(service);
            }
        }
    }

    /// Removes every binding of a closed connection.
    pub fn remove_connection(&self, stable_id: usize) {
        let mut map = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, hosts| {
            hosts.retain(|(h, _)| h.conn.stable_id() != stable_id);
            !hosts.is_empty()
        });
    }

    /// The hosts of `service` that `allowed` accepts, starting at a rotating offset so that
    /// callers spread across hosts.
    pub fn candidates(&self, service: &Name, allowed: impl Fn(&IdentityId) -> bool) -> Vec<Host> {
        let map = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        let Some(hosts) = map.get(service) else {
            return Vec::new();
        };
        let live: Vec<Host> = hosts
            .iter()
            .map(|(h, _)| h)
            .filter(|h| h.conn.close_reason().is_none() && allowed(&h.id))
            .cloned()
            .collect();
        if live.is_empty() {
            return live;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % live.len();
        live[start..]
            .iter()
            .chain(&live[..start])
            .cloned()
            .collect()
    }
}
