//! The QUIC side: the endpoint's configuration, the accept loop (handshakes admitted by `gate`)
//! and one task per connection that admits the peer and keeps re-admitting it whenever the
//! policy changes.

use crate::logbudget::budgeted;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Connection, VarInt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use umbra_pki::PeerCert;

use crate::config::Limits;
use crate::error::RouterError;
use crate::hosts::Hosts;
use crate::policy::PolicyRx;
use crate::stats::{bump, Counters};
use umbra_policies::{admitted_until, Deny};
use umbra_proto::verdict::{Moment, Verdict};

/// State shared by every connection.
pub(crate) struct Shared {
    pub limits: Limits,
    pub policy: PolicyRx,
    pub gate: Arc<crate::gate::Gate>,
    /// What each identity holds: connections, streams, window bytes.
    pub books: Arc<crate::slots::Books>,
    /// What each identity holds through each grant that limits it (`grant_limits`).
    pub grants: Arc<crate::grant_limits::GrantBooks>,
    pub hosts: Hosts,
    pub stats: Counters,
    /// The wall time admission and expiry are judged at.
    pub clock: umbra_clock::Clock,
    /// Labelled counters and latencies (nothing without a registry).
    pub metrics: crate::metrics::Metrics,
    /// Admitted connections open now, per data-plane lane.
    lanes: Vec<AtomicUsize>,
    /// Stream decisions for the controller's audit log.
    pub reports: crate::reports::Reports,
    /// The budget of log lines peers can cause (see `logbudget`).
    pub logs: crate::logbudget::LogBudget,
}

/// An admitted connection counted on its lane; the count drops with it.
struct OnLane<'a>(&'a AtomicUsize);

impl Drop for OnLane<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    pub fn new(
        limits: Limits,
        policy: PolicyRx,
        lanes: usize,
        clock: umbra_clock::Clock,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        Shared {
            books: crate::slots::Books::new(&limits),
            grants: crate::grant_limits::GrantBooks::new(crate::grant_limits::MAX_GRANT_BOOKS),
            lanes: (0..lanes).map(|_| AtomicUsize::new(0)).collect(),
            gate: crate::gate::Gate::new(crate::handshakes::HandshakeLimits {
                in_flight: limits.handshakes_in_flight,
                retry_above: limits.handshakes_before_retry,
                per_source: limits.handshakes_per_source,
            }),
            limits,
            policy,
            hosts: Hosts::default(),
            stats: Counters::default(),
            clock,
            metrics,
            reports: Default::default(),
            logs: Default::default(),
        }
    }

    /// Admitted connections open now, per lane.
    pub fn connections_by_lane(&self) -> Vec<usize> {
        self.lanes
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// Counts an admitted connection on `lane` until the returned guard is dropped.
    fn on_lane(&self, lane: usize) -> Option<OnLane<'_>> {
        let n = self.lanes.get(lane)?;
        n.fetch_add(1, Ordering::Relaxed);
        Some(OnLane(n))
    }
}

/// The quinn server configuration: our TLS, and transport limits that keep what one peer can
/// make us buffer small.
pub(crate) fn quinn_config(
    tls: Arc<rustls::ServerConfig>,
    limits: &Limits,
) -> Result<quinn::ServerConfig, RouterError> {
    let crypto = QuicServerConfig::try_from(tls)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(limits.streams_per_connection))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(limits.stream_window))
        // Until the peer's identity is known and its connection granted a window out of the
        // identity's budget (`slots`), it gets only the small handshake window.
        .receive_window(VarInt::from_u32(limits.handshake_window))
        .send_window(u64::from(limits.handshake_window))
        .keep_alive_interval(Some(limits.keep_alive))
        .datagram_receive_buffer_size(None)
        .max_idle_timeout(quinn::IdleTimeout::try_from(limits.idle_timeout).ok());
    umbra_transport::quic::tune(&mut transport, limits.queue_floor);
    cfg.transport_config(Arc::new(transport));
    // quinn's own bound on attempts not yet decided; the gate decides each one at once.
    cfg.max_incoming(limits.handshakes_in_flight.max(1))
        .migration(false);
    Ok(cfg)
}

/// Accepts the connections of one lane until cancelled; every connection task is owned here.
pub(crate) async fn accept_loop(
    lane: usize,
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let Some((incoming, permit)) = shared.gate.admit(incoming, &shared.stats) else {
            continue;
        };
        let remote = incoming.remote_address();
        let span = tracing::info_span!("conn", %remote, identity = tracing::field::Empty);
        let (shared, cancel) = (Arc::clone(&shared), cancel.clone());
        conns.spawn(
            async move {
                let shed = permit.shed();
                let started = std::time::Instant::now();
                let conn = tokio::select! {
                    r = handshake(incoming, &shared) => match r {
                        Ok(c) => c,
                        Err(e) => {
                            budgeted!(shared.logs, info, error = %e, "handshake failed");
                            shared.metrics.connection("refused", crate::metrics::HANDSHAKE);
                            return;
                        }
                    },
                    // Its slot went to a newcomer from a source holding fewer.
                    _ = shed.cancelled() => return,
                };
                drop(permit);
                shared.metrics.handshake(started);
                serve(conn, lane, shared, cancel).await;
            }
            .instrument(span),
        );
    }
    while conns.join_next().await.is_some() {}
}

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("timed out")]
    Timeout,
    #[error("no verified peer certificate")]
    NoCert,
    #[error("peer certificate: {0}")]
    Cert(#[from] umbra_pki::PkiError),
}

async fn handshake(
    incoming: quinn::Incoming,
    shared: &Shared,
) -> Result<(Connection, PeerCert), HandshakeError> {
    let connecting = incoming.accept()?;
    let conn = tokio::time::timeout(shared.limits.handshake_timeout, connecting)
        .await
        .map_err(|_| HandshakeError::Timeout)??;
    let leaf = conn
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.first().cloned());
    let Some(leaf) = leaf else {
        // No certificate speaks for anyone: the answer to an unknown identity.
        close(&conn, Verdict::of(Deny::UnknownIdentity, Moment::Request));
        return Err(HandshakeError::NoCert);
    };
    match umbra_pki::parse_peer_cert(&leaf) {
        Ok(peer) => Ok((conn, peer)),
        Err(e) => {
            close(&conn, Verdict::of(Deny::UnknownIdentity, Moment::Request));
            Err(e.into())
        }
    }
}

/// Admits the peer, then serves its streams while re-admitting it on every policy change.
async fn serve(
    (conn, peer): (Connection, PeerCert),
    lane: usize,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let span = tracing::Span::current();
    span.record("identity", tracing::field::display(&peer.spiffe));
    let mut policy = shared.policy.clone();
    let admitted = {
        let current = policy.borrow_and_update();
        match current.as_ref() {
            None => Err(None),
            Some(p) => p
                .admit(&peer, shared.clock.timestamp())
                .map(|i| (i.id.clone(), admitted_until(i, &peer.presented())))
                .map_err(Some),
        }
    };
    let (id, (until, mut ends)) = match admitted {
        Ok(admitted) => admitted,
        Err(None) => {
            budgeted!(shared.logs, warn, "no current policy: connection refused");
            bump(&shared.stats.connections_refused);
            shared
                .metrics
                .connection("refused", crate::metrics::NO_POLICY);
            close(&conn, Verdict::NO_POLICY);
            return;
        }
        Err(Some(why)) => {
            budgeted!(shared.logs, info, decision = "deny", reason = %why, "connection refused");
            bump(&shared.stats.connections_refused);
            shared
                .metrics
                .connection("refused", crate::metrics::reason(why));
            close(&conn, Verdict::of(why, Moment::Request));
            return;
        }
    };
    let mut slot = match shared.books.open_connection(&id, &conn) {
        Ok(slot) => slot,
        Err(limit) => {
            budgeted!(shared.logs, warn, decision = "deny", %limit, "connection refused");
            bump(&shared.stats.limited);
            shared.metrics.connection("refused", crate::metrics::LIMIT);
            close(&conn, Verdict::LIMIT);
            return;
        }
    };
    budgeted!(shared.logs, info, decision = "allow", serial = %peer.serial, "connection admitted");
    bump(&shared.stats.connections_admitted);
    shared.metrics.connection("admitted", "");
    let _on_lane = shared.on_lane(lane);
    let ctx = Arc::new(crate::stream::ConnCtx {
        id,
        peer,
        conn: conn.clone(),
        shared: Arc::clone(&shared),
    });
    let mut streams = JoinSet::new();
    let stream_cancel = cancel.child_token();
    // One timer for the connection's life, on the router's clock (expiry is a date), replaced
    // only when the policy changes the expiry (not one registered on every turn of the loop).
    let timer = |until: umbra_policies::Timestamp| {
        let clock = shared.clock.clone();
        Box::pin(async move { clock.sleep_until(wall(until)).await })
    };
    let mut expired = timer(until);
    // A connection granted less than a full window tries to grow while it lives.
    let regrant = tokio::time::sleep(REGRANT);
    tokio::pin!(regrant);
    loop {
        tokio::select! {
            // In this order: a revocation or expiry is acted on (and counted) before anything
            // else that became ready at the same moment, such as the client closing.
            biased;
            _ = cancel.cancelled() => {
                close(&conn, Verdict::STOPPING);
                break;
            }
            // Certificates and identities can expire while connected: nothing else would end
            // such a connection, since no delta announces the passing of time.
            _ = &mut expired => {
                budgeted!(shared.logs, info, decision = "terminate", reason = %ends, "connection closed");
                close(&conn, Verdict::of(ends, Moment::Open));
                bump(&shared.stats.connections_terminated);
                shared.metrics.connection("terminated", crate::metrics::reason(ends));
                break;
            }
            changed = policy.changed() => {
                let verdict = match (changed, policy.borrow_and_update().as_ref()) {
                    (Err(_), _) => Err(Lost::Stopping),
                    (Ok(()), None) => Err(Lost::NoPolicy),
                    (Ok(()), Some(p)) => p
                        .readmit(&ctx.peer, &ctx.id, shared.clock.timestamp())
                        .map(|i| admitted_until(i, &ctx.peer.presented()))
                        .map_err(Lost::Refused),
                };
                match verdict {
                    Ok((until, why)) => {
                        ends = why;
                        expired = timer(until);
                    }
                    // The same reason as at connect, so the same answer (`Verdict::of`).
                    Err(Lost::Refused(why)) => {
                        budgeted!(shared.logs, info, decision = "terminate", reason = %why, "connection closed");
                        bump(&shared.stats.connections_terminated);
                        shared.metrics.connection("terminated", crate::metrics::reason(why));
                        cut_streams_first(&conn, &mut streams).await;
                        close(&conn, Verdict::of(why, Moment::Open));
                        break;
                    }
                    Err(Lost::NoPolicy) => {
                        budgeted!(shared.logs, warn, "no current policy: connection closed");
                        close(&conn, Verdict::NO_POLICY);
                        break;
                    }
                    Err(Lost::Stopping) => {
                        close(&conn, Verdict::STOPPING);
                        break;
                    }
                }
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            _ = &mut regrant, if slot.short() => {
                slot.grow(&conn);
                regrant.as_mut().reset(tokio::time::Instant::now() + REGRANT);
            }
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    let span = tracing::info_span!("stream", id = %send.id(), service = tracing::field::Empty);
                    streams.spawn(crate::stream::handle(Arc::clone(&ctx), send, recv, stream_cancel.clone()).instrument(span));
                }
                Err(e) => {
                    tracing::debug!(reason = %e, "connection ended");
                    break;
                }
            },
        }
    }
    stream_cancel.cancel();
    shared.hosts.remove_connection(conn.stable_id());
    while streams.join_next().await.is_some() {}
}

/// How often a connection granted less than a full window asks for more.
const REGRANT: std::time::Duration = std::time::Duration::from_secs(1);

/// Why an admitted connection may not go on after a policy change.
enum Lost {
    /// The judge refuses it now.
    Refused(Deny),
    /// The router has no trustworthy policy any more.
    NoPolicy,
    /// The router is stopping.
    Stopping,
}

/// Closes a connection with a refusal's code and reason.
pub(crate) fn close(conn: &Connection, verdict: Verdict) {
    conn.close(VarInt::from_u32(verdict.code), verdict.reason);
}

/// `until` (as decided by [`admitted_until`]) as a wall-clock time for the router's clock.
fn wall(until: umbra_policies::Timestamp) -> std::time::SystemTime {
    // Far-future expiries are capped (at the end of year 9999) so the time is representable.
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(until.0.min(253_402_300_799))
}

/// Longest a revoked connection waits for its streams to end themselves before it is closed.
const STREAMS_FIRST: std::time::Duration = std::time::Duration::from_millis(50);
/// Least and most time a revoked connection's stream resets get to reach the client before
/// the connection itself is closed.
const SETTLE_FLOOR: std::time::Duration = std::time::Duration::from_millis(100);
const SETTLE_CAP: std::time::Duration = std::time::Duration::from_millis(250);

/// Lets every stream of a refused connection end itself with the code for its reason (each
/// stream task sees the same policy change and asks the same judge), then waits a few round trips before the connection is closed.
///
/// Why: a stream reset is retransmitted until acknowledged, and it stops the bulk flow in both
/// directions, while a connection close is sent only a few times; under a flood the close can
/// be lost and the client then learns only of a stateless reset, not that it was revoked.
async fn cut_streams_first(conn: &Connection, streams: &mut JoinSet<()>) {
    let drain = async { while streams.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(STREAMS_FIRST, drain).await;
    // The resets are retransmitted until acknowledged; the close after them is answered again
    // only for three probe timeouts. A client still working through a full socket buffer
    // (hundreds of datagrams behind the resets) needs longer than a few of our round trips, so
    // the floor is generous: no data flows meanwhile, and new streams are refused by policy.
    let settle = (conn.rtt() * 8).clamp(SETTLE_FLOOR, SETTLE_CAP);
    tokio::time::sleep(settle).await;
}
