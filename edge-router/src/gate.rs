//! The accept loop's gate in front of every handshake: applies the decision of `handshakes`
//! to quinn's `Incoming` (start, stateless Retry, or refuse) and counts what it started until
//! the handshake is over.

use std::sync::{Arc, Mutex};

use crate::handshakes::{Decision, HandshakeLimits, Handshakes, Source};
use crate::stats::{bump, Counters};

/// The handshakes in flight over every lane (a source's attempts may land on any lane).
pub(crate) struct Gate {
    handshakes: Mutex<Handshakes>,
}

/// A handshake counted in flight; the count drops with it.
pub(crate) struct HandshakeSlot {
    gate: Arc<Gate>,
    source: Source,
    validated: bool,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.gate.lock().end(self.source, self.validated);
    }
}

impl Gate {
    pub fn new(limits: HandshakeLimits) -> Arc<Gate> {
        Arc::new(Gate {
            handshakes: Mutex::new(Handshakes::new(limits)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Handshakes> {
        self.handshakes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handshakes in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight()
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
        let decision = {
            let mut h = self.lock();
            let d = h.decide(source, validated);
            if d == Decision::Admit {
                h.start(source, validated);
            }
            d
        };
        match decision {
            Decision::Admit => {
                let slot = HandshakeSlot {
                    gate: Arc::clone(self),
                    source,
                    validated,
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
