//! The controller's listener: TCP, then TLS 1.3 with the configuration chosen from the client's
//! server name, then HTTP/1.1 into the matching router.
//!
//! A client asking for `enroll.controller.umbra` gets a handshake without client authentication
//! and only the enrollment routes; every other client must present a certificate of this CA at
//! the handshake (no certificate, a foreign, expired or revoked one: the handshake fails).
//! Connections and handshakes are bounded, and every task belongs to the server's `JoinSet`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use umbra_pki::{ClientAuth, ENROLL_SERVER_NAME};

use crate::api::{self, Peer};
use crate::core::Controller;
use crate::error::ControllerError;

/// Authenticated connections (client certificate verified) served at once.
const MAX_CONNECTIONS: usize = 1024;
/// Enrollment connections (no client certificate) served at once: a separate, small budget so
/// that unauthenticated clients cannot crowd out routers and admins.
const MAX_ENROLL_CONNECTIONS: usize = 64;
/// TLS handshakes in progress at once; a connection beyond this is closed right away.
const MAX_HANDSHAKES: usize = 256;
/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The controller's own server certificate lifetime; it is re-issued every
/// [`SERVER_CERT_REFRESH`], long before it expires, without a restart.
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often the server certificate is re-issued.
const SERVER_CERT_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// ALPN protocols: HTTP/1.1 only.
pub const ALPN: &[&[u8]] = &[b"http/1.1"];

/// A running server.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds `listen` and starts serving. If `advertise` is `None`, the bound address is what
    /// tokens and identity files name.
    pub async fn start(
        ctrl: Arc<Controller>,
        listen: SocketAddr,
        advertise: Option<String>,
    ) -> Result<Server, ControllerError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(ControllerError::io(listen.to_string()))?;
        let local_addr = listener
            .local_addr()
            .map_err(ControllerError::io(listen.to_string()))?;
        let advertise = advertise.unwrap_or_else(|| local_addr.to_string());
        ctrl.set_address(&advertise)?;

        let tls = Arc::new(ArcSwap::from_pointee(TlsConfigs::issue(&ctrl)?));
        let enroll_app = api::enroll_router(ctrl.clone());
        let main_app = api::main_router(ctrl.clone());
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
            let budgets = Budgets {
                enroll: Arc::new(Semaphore::new(MAX_ENROLL_CONNECTIONS)),
                main: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            };
            let mut conns = JoinSet::new();
            let mut refresh = tokio::time::interval(SERVER_CERT_REFRESH);
            refresh.tick().await;
            loop {
                let (tcp, remote) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = refresh.tick() => {
                        match TlsConfigs::issue(&ctrl) {
                            Ok(t) => tls.store(Arc::new(t)),
                            Err(e) => tracing::error!(error = %e, "cannot re-issue the server certificate"),
                        }
                        continue;
                    }
                    _ = token.cancelled() => break,
                };
                let Ok(hs) = handshakes.clone().try_acquire_owned() else {
                    tracing::debug!(%remote, "too many handshakes in progress; connection closed");
                    continue;
                };
                let (tls, budgets) = (tls.load_full(), budgets.clone());
                let (enroll_app, main_app) = (enroll_app.clone(), main_app.clone());
                let token = token.clone();
                conns.spawn(async move {
                    tokio::select! {
                        r = serve_conn(tcp, hs, &tls, &budgets, enroll_app, main_app) => {
                            if let Err(e) = r {
                                tracing::debug!(%remote, error = %e, "connection ended with an error");
                            }
                        }
                        _ = token.cancelled() => {}
                    }
                });
                while conns.try_join_next().is_some() {}
            }
            conns.shutdown().await;
        });
        tracing::info!(%local_addr, %advertise, "controller listening");
        Ok(Server {
            local_addr,
            shutdown,
            task,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, ends every connection and waits for the tasks.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Waits until the server stops (it runs until `shutdown`).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// The two TLS configurations, swapped as a pair when the server certificate is re-issued.
struct TlsConfigs {
    enroll: Arc<rustls::ServerConfig>,
    main: Arc<rustls::ServerConfig>,
}

impl TlsConfigs {
    fn issue(ctrl: &Controller) -> Result<TlsConfigs, ControllerError> {
        // Peers check this certificate against their own clocks, so it is dated by the real one.
        let creds = ctrl
            .ca()
            .issue_server(SERVER_CERT_VALIDITY, std::time::SystemTime::now())?;
        let enroll = umbra_pki::server_config(creds.clone(), ClientAuth::None, ALPN)?;
        let main = umbra_pki::server_config(
            creds,
            ClientAuth::Required {
                roots: vec![ctrl.ca().root_der().clone()],
                revoked: ctrl.revoked_serials(),
            },
            ALPN,
        )?;
        Ok(TlsConfigs { enroll, main })
    }
}

/// Connection budgets by class, taken once the handshake has said which class a client is.
#[derive(Clone)]
struct Budgets {
    enroll: Arc<Semaphore>,
    main: Arc<Semaphore>,
}

async fn serve_conn(
    tcp: TcpStream,
    handshake_permit: tokio::sync::OwnedSemaphorePermit,
    tls: &TlsConfigs,
    budgets: &Budgets,
    enroll_app: axum::Router,
    main_app: axum::Router,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _ = tcp.set_nodelay(true);
    let handshake = async {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        let enroll = start.client_hello().server_name() == Some(ENROLL_SERVER_NAME);
        let config = if enroll {
            tls.enroll.clone()
        } else {
            tls.main.clone()
        };
        let tls = start.into_stream(config).await?;
        Ok::<_, std::io::Error>((enroll, tls))
    };
    let (enroll, tls) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await??;
    drop(handshake_permit);
    let budget = if enroll {
        &budgets.enroll
    } else {
        &budgets.main
    };
    let Ok(_permit) = budget.clone().try_acquire_owned() else {
        return Err("connection budget exhausted; closed".into());
    };
    let app = if enroll {
        enroll_app
    } else {
        let peer = umbra_pki::peer_identity(tls.get_ref().1)?;
        main_app.layer(axum::Extension(Peer(Arc::new(peer))))
    };
    let service =
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| app.clone().oneshot(req));
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(tls), service)
        .await?;
    Ok(())
}
