//! A fake HTTPS webhook receiver for the controller's event sinks, on `127.0.0.1:0`, with a
//! certificate from a CA of its own (written to a PEM file the sink is told to trust).
//!
//! It checks what a real receiver must: the `X-Umbra-Signature` HMAC-SHA256 over
//! `timestamp.body` with the shared secret, and a timestamp within five minutes. Batches that
//! fail either are counted and not recorded. It can be told to answer a status other than 200
//! (an outage that answers) or to drop connections unanswered (one that does not).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// One event as received, with when it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    /// The event as JSON.
    pub event: serde_json::Value,
    /// When its batch arrived.
    pub at: Instant,
    /// The same, by the wall clock (to compare with times other processes write down).
    pub wall: SystemTime,
}

#[derive(Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    batches: AtomicU64,
    bad_signatures: AtomicU64,
    refused: AtomicU64,
}

/// A running receiver; stops when dropped.
pub struct FakeWebhook {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The CA that issued its certificate (PEM file).
    pub ca_file: PathBuf,
    status: Arc<AtomicU16>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeWebhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn hmac_hex(secret: &[u8], msg: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, msg);
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl FakeWebhook {
    /// Starts one that accepts batches signed with `secret`; its CA goes to `dir/hook-ca.pem`.
    pub async fn start(dir: &Path, secret: &str) -> FakeWebhook {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("leaf");
        let ca_file = dir.join("hook-ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).expect("write ca");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(leaf.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let status = Arc::new(AtomicU16::new(200));
        let shared = Arc::new(Shared::default());
        let (st, sh, secret) = (status.clone(), shared.clone(), secret.as_bytes().to_vec());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, st, sh, secret) =
                    (acceptor.clone(), st.clone(), sh.clone(), secret.clone());
                conns.spawn(async move {
                    if st.load(Ordering::SeqCst) == 0 {
                        sh.refused.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let (st, sh, secret) = (st.clone(), sh.clone(), secret.clone());
                        async move { Ok::<_, Infallible>(handle(req, &st, &sh, &secret).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        FakeWebhook {
            addr,
            ca_file,
            status,
            shared,
            task,
        }
    }

    /// The URL to configure.
    pub fn url(&self) -> String {
        format!("https://{}/hooks/umbra", self.addr)
    }

    /// Answer `code` from now on (200 is healthy; 0 drops connections unanswered).
    pub fn answer(&self, code: u16) {
        self.status.store(code, Ordering::SeqCst);
    }

    /// Every event received in a correctly signed batch answered 200, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared
            .received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Batches whose signature or timestamp did not check out.
    pub fn bad_signatures(&self) -> u64 {
        self.shared.bad_signatures.load(Ordering::SeqCst)
    }

    /// Batches answered 200.
    pub fn batches(&self) -> u64 {
        self.shared.batches.load(Ordering::SeqCst)
    }

    /// Attempts answered with an error status or dropped (the outage as the sink saw it).
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

async fn handle(
    req: http::Request<Incoming>,
    status: &AtomicU16,
    shared: &Shared,
    secret: &[u8],
) -> http::Response<Full<Bytes>> {
    let reply = |code: u16| {
        http::Response::builder()
            .status(code)
            .body(Full::new(Bytes::new()))
            .expect("response")
    };
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (ts, sig) = (header("x-umbra-timestamp"), header("x-umbra-signature"));
    if req.method() != http::Method::POST || req.uri().path() != "/hooks/umbra" {
        return reply(404);
    }
    let Ok(body) = Limited::new(req.into_body(), 4 << 20).collect().await else {
        return reply(413);
    };
    let body = body.to_bytes();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let fresh = ts
        .as_deref()
        .and_then(|t| t.parse::<u64>().ok())
        .is_some_and(|t| t.abs_diff(now) <= 300);
    let mut signed = ts.clone().unwrap_or_default().into_bytes();
    signed.push(b'.');
    signed.extend_from_slice(&body);
    let expected = format!("sha256={}", hmac_hex(secret, &signed));
    if !fresh || sig.as_deref() != Some(expected.as_str()) {
        shared.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return reply(401);
    }
    let code = status.load(Ordering::SeqCst);
    if code != 200 {
        shared.refused.fetch_add(1, Ordering::SeqCst);
        return reply(code.max(100));
    }
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return reply(400);
    };
    let (at, wall) = (Instant::now(), SystemTime::now());
    let events = doc["events"].as_array().cloned().unwrap_or_default();
    shared
        .received
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(events.into_iter().map(|event| Received { event, at, wall }));
    shared.batches.fetch_add(1, Ordering::SeqCst);
    reply(200)
}
