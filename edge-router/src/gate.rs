//! The accept loop's gate in front of every handshake: applies the decision of `handshakes`
//! to quinn's `Incoming` (start, stateless Retry, or refuse) and counts what it started until
//! the handshake is over.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::handshakes::{Decision, Full, HandshakeLimits, Handshakes, Source};
use crate::stats::{bump, Counters};

/// The handshakes in flight over every lane (a source's attempts may land on any lane).
pub(crate) struct Gate {
    handshakes: Mutex<State>,
}

/// The counts, and every handshake in flight by age, so the oldest of a source can be shed.
struct State {
    counts: Handshakes,
    live: BTreeMap<u64, Live>,
    next: u64,
}

struct Live {
    source: Source,
    validated: bool,
    shed: CancellationToken,
}

impl State {
    fn end(&mut self, id: u64) {
        if let Some(l) = self.live.remove(&id) {
            self.counts.end(l.source, l.validated);
        }
    }
}

/// A handshake counted in flight; the count drops with it. Its handshake must give up when
/// [`HandshakeSlot::shed`] fires: its slot went to a newcomer from a source holding fewer.
pub(crate) struct HandshakeSlot {
    gate: Arc<Gate>,
    id: u64,
    shed: CancellationToken,
}

impl HandshakeSlot {
    /// Fires when this handshake's slot was taken for a newcomer.
    pub fn shed(&self) -> CancellationToken {
        self.shed.clone()
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.gate.lock().end(self.id);
    }
}

impl Gate {
    pub fn new(limits: HandshakeLimits) -> Arc<Gate> {
        Arc::new(Gate {
            handshakes: Mutex::new(State {
                counts: Handshakes::new(limits),
                live: BTreeMap::new(),
                next: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.handshakes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handshakes in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock().counts.in_flight()
    }

    /// Starts `incoming`'s handshake (returned with its slot), or answers it with a Retry or a
    /// refusal and returns `None`. Either answer is one packet and keeps no state.
    pub fn admit(
        self: &Arc<Self>,
        incoming: quinn::Incoming,
        stats: &Counters,
    ) -> Option<(quinn::Incoming, HandshakeSlot)> {
        let remote = incoming.remote_address();
        let source = Source::of(remote.ip());
        let validated = incoming.remote_address_validated();
        let shed = CancellationToken::new();
        let (decision, id) = {
            let mut st = self.lock();
            let mut d = st.counts.decide(source, validated);
            if d == Decision::Refuse(Full::Router) && validated {
                // Every slot is taken: the busiest source's oldest handshake gives way.
                if let Some(victim) = st.counts.busiest_over(source) {
                    let oldest = st
                        .live
                        .iter()
                        .find(|(_, l)| l.source == victim)
                        .map(|(id, l)| (*id, l.shed.clone()));
                    if let Some((vid, token)) = oldest {
                        st.end(vid);
                        token.cancel();
                        bump(&stats.handshakes_refused);
                        tracing::debug!(%remote, "handshakes full: the busiest source's oldest gave way");
                        d = st.counts.decide(source, validated);
                    }
                }
            }
            let id = st.next;
            if d == Decision::Admit {
                st.next += 1;
                st.counts.start(source, validated);
                st.live.insert(
                    id,
                    Live {
                        source,
                        validated,
                        shed: shed.clone(),
                    },
                );
            }
            (d, id)
        };
        match decision {
            Decision::Admit => {
                let slot = HandshakeSlot {
                    gate: Arc::clone(self),
                    id,
                    shed,
                };
                Some((incoming, slot))
            }
            Decision::Retry if incoming.may_retry() => {
                bump(&stats.handshakes_retried);
                tracing::debug!(%remote, "handshakes piling up: address validation asked");
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                None
            }
            Decision::Retry | Decision::Refuse(_) => {
                bump(&stats.handshakes_refused);
                tracing::debug!(%remote, ?decision, "handshake refused");
                incoming.refuse();
                None
            }
        }
    }
}
