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

/// Hosts by service; picks among them round-robin.
#[derive(Default)]
pub(crate) struct Hosts {
    by_service: Mutex<HashMap<Name, Vec<Host>>>,
    next: AtomicUsize,
}

impl Hosts {
    /// Registers `conn` as a host of `service`. Returns false if the connection is at its
    /// bind limit.
    pub fn add(&self, service: Name, host: Host) -> bool {
        let mut map = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        let stable = host.conn.stable_id();
        let binds = map
            .values()
            .flatten()
            .filter(|h| h.conn.stable_id() == stable)
            .count();
        if binds >= MAX_BINDS_PER_CONNECTION {
            return false;
        }
        let hosts = map.entry(service).or_default();
        if !hosts.iter().any(|h| h.conn.stable_id() == stable) {
            hosts.push(host);
        }
        true
    }

    /// Removes one binding.
    pub fn remove(&self, service: &Name, stable_id: usize) {
        let mut map = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hosts) = map.get_mut(service) {
            hosts.retain(|h| h.conn.stable_id() != stable_id);
            if hosts.is_empty() {
                map.remove(service);
            }
        }
    }

    /// Removes every binding of a closed connection.
    pub fn remove_connection(&self, stable_id: usize) {
        let mut map = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, hosts| {
            hosts.retain(|h| h.conn.stable_id() != stable_id);
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
