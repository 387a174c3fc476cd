//! Umbra edge router: accepts only mutually authenticated QUIC connections, authorizes every
//! stream against the policy the controller pushes, and dials the service on the caller's
//! behalf (or hands the stream to an SDK host).
//!
//! Who a caller is comes only from the certificate its handshake verified; whether it may
//! connect and what it may do are decided only by the core's `umbra_policies::admit` and
//! `umbra_policies::check_stream` over the replica the controller keeps exact. Every
//! connection and stream watches the policy and ends itself the moment the policy no longer
//! allows it, with the code `umbra_proto::verdict` gives the reason.
//!
//! The router renews its own short-lived certificate before it expires (`umbra_sdk`'s
//! `RenewingIdentity`): new handshakes get the renewed certificate at once
//! (`Endpoint::set_server_config`), established connections keep theirs, and the control channel
//! reconnects with it.
//!
//! It must never: trust anything in a request frame for identity, serve a policy older than
//! `stale_after` without word from the controller, dial an internal address for a service named
//! by DNS name, or let a peer grow anything without a bound.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod control;
pub mod egress;
mod error;
mod gate;
mod grant_limits;
mod handshakes;
mod hosts;
mod lanes;
mod logbudget;
mod metrics;
mod policy;
pub mod proxy;
mod publish;
mod quota;
mod reports;
mod reset_key;
mod server;
mod shaping;
mod slots;
mod splice;
mod stats;
mod stream;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use umbra_pki::{ClientAuth, IdentityFile, ServerCredentials};
use umbra_policies::IdentityKind;
use umbra_sdk::{Credentials, RenewingIdentity};

pub use config::{Limits, RouterConfig};
pub use error::RouterError;
pub use grant_limits::GrantLimitHit;
pub use metrics::reason as refusal_label;
pub use policy::{Policy, PolicyRx};
pub use reports::{REPORTS_PER_SEC, REPORT_BURST};
pub use stats::{RouterStats, Usage};

/// How long shutdown waits for tasks to finish on their own before aborting them.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// A running router.
pub struct Router;

/// Owns a running router's tasks; [`RouterHandle::shutdown`] ends them all.
pub struct RouterHandle {
    local_addr: SocketAddr,
    policy: PolicyRx,
    identity: RenewingIdentity,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    /// One endpoint per data-plane lane, in lane order.
    endpoints: Vec<quinn::Endpoint>,
    shared: Arc<server::Shared>,
    /// Each resolves when its data-plane thread has stopped.
    data_plane_done: Vec<tokio::sync::oneshot::Receiver<()>>,
    /// Each lane's busy poller's counters (zero where polling is off).
    polling: Vec<umbra_transport::busy_poll::PollStats>,
}

impl Router {
    /// Binds the QUIC endpoint, starts following the controller and serving. Returns at once;
    /// until the first snapshot arrives every connection is refused with `codes::SHUTDOWN`
    /// (see [`RouterHandle::ready`]).
    pub async fn start(cfg: RouterConfig) -> Result<RouterHandle, RouterError> {
        let identity = &cfg.identity;
        if identity.kind != IdentityKind::Router {
            return Err(RouterError::NotARouter(identity.spiffe().to_string()));
        }
        let machine = umbra_proto::follow::ControlFollower::new(cfg.stale_after)?;
        let (tx, rx) = watch::channel(None);
        let tls = TlsFactory {
            roots: umbra_pki::parse_pem_chain(&identity.ca_pem)?,
            policy: rx.clone(),
            limits: cfg.limits.clone(),
            clock: cfg.clock.clone(),
        };
        let server_config = tls.build(identity)?;
        let live = RenewingIdentity::new(
            identity.clone(),
            cfg.controller.as_deref(),
            cfg.clock.clone(),
        )?;
        live.set_path(cfg.identity_path.clone());
        let bind_error = |source| RouterError::Bind {
            addr: cfg.listen,
            source,
        };
        let sockets = lanes::bind(cfg.listen, cfg.limits.lanes).map_err(bind_error)?;
        let count = u8::try_from(sockets.len()).unwrap_or(u8::MAX);
        let reset_key = reset_key::load_or_create(cfg.identity_path.as_deref());
        let mut lanes = Vec::with_capacity(sockets.len());
        for (i, socket) in sockets.into_iter().enumerate() {
            if let Some(got) =
                umbra_transport::quic::size_buffers(&socket, cfg.limits.socket_buffer)
            {
                if i == 0 {
                    tracing::info!(
                        asked = cfg.limits.socket_buffer,
                        got,
                        "the UDP receive buffer is smaller than asked; raise net.core.rmem_max and wmem_max for fewer drops under load"
                    );
                }
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(bind_error)?;
            let mut endpoint_config =
                umbra_transport::quic::endpoint_config_with_reset_key(&reset_key);
            let lane = u8::try_from(i).unwrap_or(0);
            endpoint_config
                .cid_generator(move || Box::new(umbra_transport::quic::LaneCids::new(lane, count)));
            let endpoint = {
                // The endpoint's socket and driver, and every connection and stream task
                // spawned from its accept loop, live on this lane's runtime.
                let _on_lane = runtime.enter();
                quinn::Endpoint::new(
                    endpoint_config,
                    Some(server_config.clone()),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
                .map_err(bind_error)?
            };
            lanes.push((runtime, endpoint));
        }
        let endpoints: Vec<quinn::Endpoint> = lanes.iter().map(|(_, e)| e.clone()).collect();
        let local_addr = endpoints
            .first()
            .ok_or_else(|| std::io::Error::other("no socket bound"))
            .and_then(|e| e.local_addr())
            .map_err(bind_error)?;
        if cfg.advertise.is_none() && local_addr.ip().is_unspecified() {
            tracing::warn!(%local_addr, "listening on an unspecified address without --advertise: clients will be told an address they cannot reach");
        }
        let advertise = cfg
            .advertise
            .clone()
            .unwrap_or_else(|| local_addr.to_string());

        let metrics = metrics::Metrics::new(cfg.metrics.as_ref());
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let follower = control::Follower {
            client: live.controller(),
            renewed: live.subscribe(),
            advertise: advertise.clone(),
            machine,
            publisher: publish::Publisher::new(tx, cfg.clock.clone()).metered(metrics.clone()),
            cancel: cancel.clone(),
            metrics: metrics.clone(),
        };
        tasks.spawn(follower.run());
        tasks.spawn(live.clone().run(cancel.clone()));
        tasks.spawn(swap_credentials(
            live.subscribe(),
            tls,
            endpoints.clone(),
            cancel.clone(),
        ));
        let shared = Arc::new(server::Shared::new(
            cfg.limits.clone(),
            rx.clone(),
            endpoints.len(),
            cfg.clock.clone(),
            metrics.clone(),
        ));
        metrics.collect(cfg.metrics.as_ref(), Arc::clone(&shared));
        shared.reports.start(live.controller(), cancel.clone());
        let mut data_plane_done = Vec::with_capacity(lanes.len());
        let mut polling = Vec::with_capacity(lanes.len());
        for (i, (runtime, endpoint)) in lanes.into_iter().enumerate() {
            let poller = umbra_transport::busy_poll::spawn(runtime.handle(), cfg.limits.busy_poll);
            polling.push(poller.as_ref().map(|p| p.stats()).unwrap_or_default());
            data_plane_done.push(
                spawn_data_plane(
                    i,
                    runtime,
                    poller,
                    server::accept_loop(i, endpoint.clone(), Arc::clone(&shared), cancel.clone()),
                    endpoint,
                )
                .map_err(bind_error)?,
            );
        }
        tracing::info!(router = %identity.spiffe(), %local_addr, %advertise, lanes = endpoints.len(), "edge router listening");
        Ok(RouterHandle {
            local_addr,
            policy: rx,
            identity: live,
            cancel,
            tasks,
            endpoints,
            shared,
            data_plane_done,
            polling,
        })
    }
}

/// Runs one lane of the data plane (`accept`: the lane's accept loop, which owns every
/// connection and stream task of it) on its own thread and current-thread runtime, until it
/// ends and the endpoint has had a moment to send its closes. One thread for a QUIC endpoint,
/// its connections and their splices means no wake-up crosses threads on a connection's data
/// path; with a multi-threaded runtime, waking the other worker for each packet batch and
/// stream cost about a tenth of the router's CPU per byte. `poller`, started on `runtime`
/// (`umbra_transport::busy_poll`), runs with the lane and ends with it. The returned receiver
/// resolves when the thread is done.
fn spawn_data_plane(
    lane: usize,
    runtime: tokio::runtime::Runtime,
    poller: Option<umbra_transport::busy_poll::BusyPoll>,
    accept: impl std::future::Future<Output = ()> + Send + 'static,
    endpoint: quinn::Endpoint,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let (done, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("umbra-lane-{lane}"))
        .spawn(move || {
            runtime.block_on(async {
                let _poller = poller;
                accept.await;
                // Closing connections are drained by the endpoint driver, which lives here.
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, endpoint.wait_idle()).await;
            });
            drop(runtime);
            let _ = done.send(());
        })?;
    Ok(done_rx)
}

/// Builds the QUIC server configuration for one certificate of the router: the same client
/// authentication (the controller's root, the live policy at the handshake) and limits every
/// time, so that a renewal changes nothing but the certificate presented.
struct TlsFactory {
    roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    policy: PolicyRx,
    limits: Limits,
    clock: umbra_clock::Clock,
}

impl TlsFactory {
    fn build(&self, identity: &IdentityFile) -> Result<quinn::ServerConfig, RouterError> {
        let tls = umbra_pki::server_config_with_clock(
            ServerCredentials::from_identity(identity)?,
            ClientAuth::Required {
                roots: self.roots.clone(),
                revoked: Arc::new(policy::LiveRevocations(
                    self.policy.clone(),
                    self.clock.clone(),
                )),
            },
            &[umbra_proto::stream::ALPN],
            &self.clock,
        )?;
        server::quinn_config(tls, &self.limits)
    }
}

/// Presents each renewed certificate to new handshakes; connections already established keep
/// the keys they negotiated and are unaffected.
async fn swap_credentials(
    mut renewed: watch::Receiver<Arc<Credentials>>,
    tls: TlsFactory,
    endpoints: Vec<quinn::Endpoint>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = renewed.changed() => if changed.is_err() { return },
        }
        let creds = Arc::clone(&renewed.borrow_and_update());
        match tls.build(creds.identity()) {
            Ok(cfg) => {
                for endpoint in &endpoints {
                    endpoint.set_server_config(Some(cfg.clone()));
                }
                tracing::info!(serial = %creds.leaf().serial, not_after = creds.leaf().not_after.0, "serving with the renewed certificate");
            }
            // Cannot happen for credentials that passed `Credentials::new`; keep the old
            // certificate, which the next renewal replaces.
            Err(e) => {
                tracing::error!(error = %e, "cannot serve with the renewed certificate");
            }
        }
    }
}

impl RouterHandle {
    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A receiver of the current policy (`None` while failing closed).
    pub fn policy(&self) -> PolicyRx {
        self.policy.clone()
    }

    /// The router's current credentials; the receiver sees every renewal.
    pub fn credentials(&self) -> watch::Receiver<Arc<Credentials>> {
        self.identity.subscribe()
    }

    /// The allow / deny / terminate counters so far.
    pub fn stats(&self) -> RouterStats {
        RouterStats {
            handshakes_in_flight: self.shared.gate.in_flight() as u64,
            held: self.shared.books.total(),
            ..self.shared.stats.snapshot()
        }
    }

    /// What the identity `id` holds on this router now: connections, streams and the bytes
    /// its peers can make the router buffer (see [`Limits::buffer_per_identity`]).
    pub fn usage(&self, id: &umbra_policies::IdentityId) -> Usage {
        self.shared.books.usage(id)
    }

    /// Admitted connections open now on each data-plane lane (see [`Limits::lanes`]), in lane
    /// order: how evenly the kernel spreads clients over the lanes.
    pub fn connections_by_lane(&self) -> Vec<usize> {
        self.shared.connections_by_lane()
    }

    /// Time each data-plane lane has spent busy polling so far (see [`Limits::busy_poll`]), in
    /// lane order; zero where polling is off.
    pub fn polling_by_lane(&self) -> Vec<std::time::Duration> {
        self.polling.iter().map(|p| p.polling()).collect()
    }

    /// Waits until the router holds a policy from the controller.
    pub async fn ready(&self) {
        let mut rx = self.policy.clone();
        // An error means the follower is gone, i.e. the router is shutting down.
        let _ = rx.wait_for(|p| p.is_some()).await;
    }

    /// Stops accepting, closes every connection with `codes::SHUTDOWN`, and waits (briefly) for
    /// every task to end.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        for endpoint in &self.endpoints {
            let stopping = umbra_proto::verdict::Verdict::STOPPING;
            endpoint.close(quinn::VarInt::from_u32(stopping.code), stopping.reason);
        }
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            self.tasks.shutdown().await;
        }
        // The lanes close and drain at once, each on its own thread: waiting in turn costs no
        // more than the slowest.
        let idle = async {
            for endpoint in &self.endpoints {
                endpoint.wait_idle().await;
            }
        };
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, idle).await;
        let done = async {
            for lane in &mut self.data_plane_done {
                let _ = lane.await;
            }
        };
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, done).await;
        tracing::info!(addr = %self.local_addr, "edge router stopped");
    }
}

impl Drop for RouterHandle {
    fn drop(&mut self) {
        // Dropping without shutdown still ends every task (the JoinSet aborts them).
        self.cancel.cancel();
    }
}
