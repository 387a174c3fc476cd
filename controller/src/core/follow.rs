//! Followers: the control channel for routers and the per-identity edge view.

use super::*;

/// Long-lived streams (control channel, edge watch) one identity may hold open at once.
pub const MAX_STREAMS_PER_IDENTITY: usize = 8;

/// Counts an identity's open streams; dropping it gives the slot back.
#[derive(Debug)]
pub struct StreamGuard {
    counts: Arc<Mutex<HashMap<IdentityId, usize>>>,
    id: IdentityId,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.id);
            }
        }
    }
}

/// How long past its expiry a revoked certificate stays on the list sent to routers, so that a
/// router whose clock runs behind still refuses it.
const REVOCATION_GRACE_SECS: u64 = 3600;

impl Controller {
    /// Opens a router's control channel: checks the router (under the same lock as everything
    /// else here, so a revocation cannot slip between the check and the subscription), records
    /// its address, and returns what it needs first and a receiver for what follows. The
    /// receiver is subscribed before the state is read, so no delta falls in between; the
    /// caller skips received deltas at or below the returned sequence number.
    pub fn subscribe_router(
        &self,
        peer: &PeerCert,
        since: Option<(&str, u64)>,
        advertise: Option<&str>,
    ) -> Result<(Identity, Subscription), ControllerError> {
        if !self.in_touch() {
            return Err(ControllerError::Unavailable(
                "this controller cannot reach its store".into(),
            ));
        }
        let mut inner = self.write()?;
        // Under the command lock, which every commit and catch-up holds: no delta falls
        // between the state read below and the subscription.
        let rx = self.deltas.load().subscribe();
        let router = self.authorize_locked(&mut inner, peer, Some(IdentityKind::Router))?;
        if let Some(addr) = advertise {
            self.advertise_locked(&mut inner, &router, addr)?;
        }
        let sub = self.subscription_locked(&mut inner, since, rx)?;
        Ok((router, sub))
    }

    /// What a follower at `since` (epoch, seq) needs first (no authorization: for tests and
    /// in-process followers).
    pub fn subscribe(&self, since: Option<(&str, u64)>) -> Result<Subscription, ControllerError> {
        let mut inner = self.lock();
        let rx = self.deltas.load().subscribe();
        self.subscription_locked(&mut inner, since, rx)
    }

    fn subscription_locked(
        &self,
        inner: &mut Inner,
        since: Option<(&str, u64)>,
        rx: broadcast::Receiver<Arc<Delta>>,
    ) -> Result<Subscription, ControllerError> {
        let epoch = inner.replica.epoch.clone();
        let hello = ControlMessage::Hello {
            version: umbra_proto::control::CONTROL_PROTOCOL_VERSION,
            epoch: epoch.clone(),
        };
        let resumed = match since {
            Some((e, seq)) if e == epoch => inner.store.changes_since(seq)?,
            _ => None,
        };
        let snapshot = resumed.is_none();
        if snapshot {
            (self.snapshots_served).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let catch_up: Box<dyn Iterator<Item = ControlMessage> + Send> = match resumed {
            Some(deltas) => Box::new(
                deltas
                    .into_iter()
                    .map(|d| ControlMessage::Delta(Box::new(d))),
            ),
            None => {
                let mut replica = inner.replica.clone();
                // Keep revocations an hour past expiry, for followers whose clocks run behind.
                replica.prune_revoked(Timestamp(
                    self.now().0.saturating_sub(REVOCATION_GRACE_SECS),
                ));
                // Made chunk by chunk as the follower reads, not held whole.
                Box::new(SnapshotMessages::new(replica))
            }
        };
        // Says how far the controller is: a follower that failed closed during an outage knows
        // the replay is complete and serves again at once, not at the next heartbeat.
        let heartbeat = ControlMessage::Heartbeat {
            seq: inner.replica.seq,
        };
        Ok(Subscription {
            initial: Box::new(
                std::iter::once(hello)
                    .chain(catch_up)
                    .chain(std::iter::once(heartbeat)),
            ),
            seq: inner.replica.seq,
            deltas: rx,
            snapshot,
        })
    }

    /// How many control channels this controller opened with a whole snapshot (the rest
    /// resumed from the change log).
    pub fn snapshots_served(&self) -> u64 {
        self.snapshots_served
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records where a router is reached; the router must still exist and be active.
    fn advertise_locked(
        &self,
        inner: &mut Inner,
        router: &Identity,
        advertise: &str,
    ) -> Result<(), ControllerError> {
        let info = RouterInfo {
            id: router.id.clone(),
            name: router.name.clone(),
            advertise: Some(advertise.to_owned()),
        };
        if inner.replica.routers.get(&router.id) == Some(&info) {
            return Ok(());
        }
        let mut batch = Batch::default();
        batch.changes.push(ChangeEvent::RouterPut { router: info });
        batch.audit.push(Self::audit(
            &Actor {
                id: Some(router.id.clone()),
                label: SpiffeId::new(self.trust_domain(), router.kind, &router.name).to_string(),
            },
            "router.advertise",
            router.name.as_str(),
            serde_json::json!({ "advertise": advertise }),
        ));
        self.commit(inner, batch)
    }

    /// What `identity` may use now, and where the routers are.
    pub fn edge_view(&self, identity: &Identity) -> EdgeView {
        let now = self.now();
        let (index, routers) = {
            let inner = self.lock();
            let index = Arc::clone(&inner.index);
            let routers = views::listed_routers(inner.state(), inner.replica.routers.values(), now);
            (index, routers)
        };
        views::edge_view(&index, &identity.id, routers, now)
    }

    /// Opens a watch of the peer's edge view: checks the peer and registers its watcher with
    /// the hub under the same lock commits take, so that no commit falls between the check and
    /// the registration unseen (one that comes after wakes the watcher). The caller computes
    /// the first view after this returns.
    pub fn watch_edge(&self, peer: &PeerCert) -> Result<(Identity, hub::Watcher), ControllerError> {
        let mut inner = self.lock();
        let identity = self.authorize_locked(&mut inner, peer, None)?;
        let watcher = self.hub.register(&identity.id);
        Ok((identity, watcher))
    }

    /// The watch hub's counters: how many watches are open, how many wakes commits handed out
    /// and how many views they cost.
    pub fn watch_stats(&self) -> hub::WatchStats {
        self.hub.stats()
    }

    /// Long-lived streams open now, over all identities.
    pub fn streams_open(&self) -> usize {
        let counts = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        counts.values().sum()
    }

    /// Takes one of an identity's long-lived stream slots, so that no identity can hold the
    /// controller's connection budget.
    pub fn open_stream(&self, id: &IdentityId) -> Result<StreamGuard, ControllerError> {
        let mut counts = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(id.clone()).or_insert(0);
        if *n >= MAX_STREAMS_PER_IDENTITY {
            return Err(ControllerError::Conflict(format!(
                "at most {MAX_STREAMS_PER_IDENTITY} open streams per identity"
            )));
        }
        *n += 1;
        Ok(StreamGuard {
            counts: self.streams.clone(),
            id: id.clone(),
        })
    }

    /// A receiver of every committed delta (in-process followers and tests).
    pub fn deltas(&self) -> broadcast::Receiver<Arc<Delta>> {
        self.deltas.load().subscribe()
    }

    /// Revoked certificates (for tests and diagnostics).
    pub fn revoked(&self) -> Vec<RevokedCert> {
        self.lock().replica.revoked.values().cloned().collect()
    }
}
