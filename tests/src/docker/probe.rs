//! What the partition tests share: an echo service on this machine's side of a test network,
//! and a probe of a service through one router, as the routers' refusals tell it apart.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_sdk::{Context, SdkError};

/// Runs blocking `docker` work without stalling the runtime's other tasks (the echo service,
/// the SDK's connections).
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A harness result or a panic that says what failed.
pub fn must<T>(r: super::Result<T>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// An echo service listening on this machine's side of the test network, for the router's
/// container to dial. Stops when dropped.
pub struct HostEcho {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HostEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HostEcho {
    /// Listens on `ip` (this machine's address on a test network), any port.
    pub async fn start(ip: std::net::Ipv4Addr) -> HostEcho {
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind the echo service on the test network");
        let addr = listener.local_addr().expect("echo address");
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut sock, _)) = listener.accept().await {
                conns.spawn(async move {
                    let (mut r, mut w) = sock.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        HostEcho { addr, task }
    }
}

/// What one attempt to use the service through the router gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Dialed, and the bytes came back.
    Served,
    /// The router refused as one without a policy does (stale: it fails closed).
    Closed,
    /// The router refused by policy.
    Denied,
    /// Anything else (unreachable router, timeout...): never expected here.
    Other(String),
}

/// Sends four bytes on a stream and checks they come back.
pub async fn round_trip(s: &mut umbra_sdk::Stream) -> Result<(), String> {
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    if &buf != b"ping" {
        return Err(format!("echoed {buf:?}"));
    }
    Ok(())
}

/// Dials `echo` through the router at `router` (only that one) and round-trips four bytes.
pub async fn probe(ctx: &Context, router: &str) -> Probe {
    let attempt = async {
        let mut s = match ctx.dial_via(router, "echo").await {
            Ok(s) => s,
            Err(SdkError::Unavailable(_)) => return Probe::Closed,
            Err(SdkError::Denied { .. }) => return Probe::Denied,
            Err(e) => return Probe::Other(e.to_string()),
        };
        match round_trip(&mut s).await {
            Ok(()) => Probe::Served,
            Err(e) => Probe::Other(format!("dialed, then {e}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .unwrap_or_else(|_| Probe::Other("no answer within 3 s".into()))
}
