//! Followers: the control channel for routers and the per-identity edge view.

use super::*;

impl Controller {
    /// What a follower at `since` (epoch, seq) needs first, and a receiver for what follows.
    /// The receiver is subscribed before the state is read, so no delta falls in between;
    /// the caller skips received deltas at or below the returned sequence number.
    pub fn subscribe(&self, since: Option<(&str, u64)>) -> Result<Subscription, ControllerError> {
        let rx = self.deltas.subscribe();
        let inner = self.lock();
        let epoch = inner.replica.epoch.clone();
        let mut out = vec![ControlMessage::Hello {
            version: umbra_proto::control::CONTROL_PROTOCOL_VERSION,
            epoch: epoch.clone(),
        }];
        let resumed = match since {
            Some((e, seq)) if e == epoch => inner.store.changes_since(seq)?,
            _ => None,
        };
        match resumed {
            Some(deltas) => out.extend(
                deltas
                    .into_iter()
                    .map(|d| ControlMessage::Delta(Box::new(d))),
            ),
            None => {
                let mut replica = inner.replica.clone();
                replica.prune_revoked(self.now());
                out.push(ControlMessage::Snapshot(Box::new(replica.to_snapshot())));
            }
        }
        Ok(Subscription {
            initial: out,
            seq: inner.replica.seq,
            deltas: rx,
        })
    }

    /// Records where a router is reached.
    pub fn router_advertise(
        &self,
        router: &Identity,
        advertise: &str,
    ) -> Result<(), ControllerError> {
        let mut inner = self.lock();
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
        self.commit(&mut inner, batch)
    }

    /// What `identity` may use now, and where the routers are.
    pub fn edge_view(&self, identity: &Identity) -> EdgeView {
        let index = self.index();
        let now = self.now();
        let mut services: std::collections::BTreeMap<Name, EdgeService> = Default::default();
        for (action, svcs) in [
            (
                Action::Dial,
                index.services_for(&identity.id, Action::Dial, now),
            ),
            (
                Action::Bind,
                index.services_for(&identity.id, Action::Bind, now),
            ),
        ] {
            for s in svcs {
                let e = services
                    .entry(s.name.clone())
                    .or_insert_with(|| EdgeService {
                        name: s.name.clone(),
                        intercepts: s.intercepts.clone(),
                        dial: false,
                        bind: false,
                    });
                match action {
                    Action::Dial => e.dial = true,
                    Action::Bind => e.bind = true,
                }
            }
        }
        let routers = self
            .lock()
            .replica
            .routers
            .values()
            .filter(|r| r.advertise.is_some())
            .cloned()
            .collect();
        EdgeView {
            routers,
            services: services.into_values().collect(),
        }
    }

    /// A receiver of every committed delta, for watchers that recompute a view.
    pub fn deltas(&self) -> broadcast::Receiver<Arc<Delta>> {
        self.deltas.subscribe()
    }

    /// Revoked certificates (for tests and diagnostics).
    pub fn revoked(&self) -> Vec<RevokedCert> {
        self.lock().replica.revoked.values().cloned().collect()
    }
}
