//! Helpers for data-plane tests: enrolled agents and routers, a real edge router on
//! `127.0.0.1:0`, a TCP echo service, and raw QUIC clients that misbehave on purpose.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::AsyncWriteExt;
use umbra_edge_router::{Router, RouterConfig, RouterHandle};
use umbra_pki::IdentityFile;
use umbra_policies::{
    Action, Hosting, IdentityKind, Name, Selector, Semantic, Service, ServicePolicy,
};
use umbra_proto::api::{CreateIdentityRequest, GrantRequest, TokenResponse};

use crate::TestController;

/// A checked name.
pub fn name(s: &str) -> Name {
    Name::new(s).expect("name")
}

/// Creates and enrolls an agent.
pub async fn agent(t: &TestController, n: &str) -> IdentityFile {
    let req = CreateIdentityRequest {
        name: name(n),
        kind: IdentityKind::Agent,
        roles: Default::default(),
        token_ttl_secs: None,
    };
    let tok: TokenResponse = t
        .admin_client()
        .call(Method::POST, "/v1/identities", Some(&req))
        .await
        .expect("create agent");
    umbra_sdk::enroll(&tok.token, Some(&t.addr()))
        .await
        .expect("enroll agent")
}

/// Creates and enrolls a router identity.
pub async fn router_identity(t: &TestController, n: &str) -> IdentityFile {
    let tok: TokenResponse = t
        .admin_client()
        .call(
            Method::POST,
            "/v1/routers",
            Some(&serde_json::json!({ "name": n })),
        )
        .await
        .expect("create router");
    umbra_sdk::enroll(&tok.token, Some(&t.addr()))
        .await
        .expect("enroll router")
}

/// Starts a router named `n` on `127.0.0.1:0` following `t`, and waits until it holds a policy.
pub async fn start_router(
    t: &TestController,
    n: &str,
    tweak: impl FnOnce(&mut RouterConfig),
) -> RouterHandle {
    let identity = router_identity(t, n).await;
    let mut cfg = RouterConfig::new(identity, "127.0.0.1:0".parse().expect("addr"));
    cfg.controller = Some(t.addr());
    tweak(&mut cfg);
    let router = Router::start(cfg).await.expect("router starts");
    tokio::time::timeout(Duration::from_secs(10), router.ready())
        .await
        .expect("router synchronizes");
    router
}

/// Creates a service.
pub async fn service(t: &TestController, n: &str, hosting: Hosting) {
    let svc = Service {
        name: name(n),
        roles: Default::default(),
        hosting,
        intercepts: vec![format!("{n}.umbra:443").parse().expect("intercept")],
        proxy_protocol: false,
    };
    let _: Service = t
        .admin_client()
        .call(Method::POST, "/v1/services", Some(&svc))
        .await
        .expect("create service");
}

/// Creates the SDK-hosted service `svc`, hosted by `host` (Bind, policy `<svc>-host`) and
/// dialed by `caller` (Dial, policy `<svc>-dial`).
pub async fn sdk_service(t: &TestController, svc: &str, host: &str, caller: &str) {
    service(t, svc, Hosting::Sdk).await;
    grant(t, &format!("{svc}-host"), Action::Bind, host, svc).await;
    grant(t, &format!("{svc}-dial"), Action::Dial, caller, svc).await;
}

/// Grants `action` on the service named `svc` to the identity named `who`, as policy `policy`.
pub async fn grant(t: &TestController, policy: &str, action: Action, who: &str, svc: &str) {
    let req = GrantRequest {
        name: Some(name(policy)),
        action,
        identities: vec![format!("@{who}").parse::<Selector>().expect("selector")],
        services: vec![format!("@{svc}").parse::<Selector>().expect("selector")],
        semantic: Semantic::AnyOf,
        limits: umbra_policies::GrantLimits::default(),
    };
    let _: ServicePolicy = t
        .admin_client()
        .call(Method::POST, "/v1/policies", Some(&req))
        .await
        .expect("grant");
}

/// Deletes a policy.
pub async fn revoke_policy(t: &TestController, policy: &str) {
    let _: serde_json::Value = t
        .admin_client()
        .call(
            Method::DELETE,
            &format!("/v1/policies/{policy}"),
            None::<&()>,
        )
        .await
        .expect("revoke policy");
}

/// Revokes an identity.
pub async fn revoke_identity(t: &TestController, who: &str) {
    let _: serde_json::Value = t
        .admin_client()
        .call(
            Method::POST,
            &format!("/v1/identities/{who}/revoke"),
            None::<&()>,
        )
        .await
        .expect("revoke identity");
}

/// A TCP echo server on `127.0.0.1:0` that passes half-closes on. Stops when dropped.
pub struct Echo {
    /// Where it listens.
    pub addr: SocketAddr,
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    /// Starts one.
    pub async fn start() -> Echo {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind echo");
        let addr = listener.local_addr().expect("addr");
        let open = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&open);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut sock, _)) = listener.accept().await {
                let counter = Arc::clone(&counter);
                counter.fetch_add(1, Ordering::SeqCst);
                conns.spawn(async move {
                    let (mut r, mut w) = sock.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                    counter.fetch_sub(1, Ordering::SeqCst);
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Echo { addr, open, task }
    }

    /// How many connections it has open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// The service hosting that points at it (an IP literal, dialed as given).
    pub fn hosting(&self) -> Hosting {
        Hosting::Address(self.addr.to_string().parse().expect("hostport"))
    }
}

/// Accepts any server certificate: for clients that test how the *router* treats them.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A raw QUIC client presenting `identity`'s certificate (or none) and trusting any server.
pub fn raw_client(identity: Option<&IdentityFile>) -> (quinn::Endpoint, quinn::ClientConfig) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut tls = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder
            .with_client_auth_cert(
                umbra_pki::parse_pem_chain(&id.cert_pem).expect("chain"),
                umbra_pki::parse_private_key_pem(&id.key_pem).expect("key"),
            )
            .expect("client auth"),
    };
    tls.alpn_protocols = vec![umbra_proto::stream::ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).expect("quic tls");
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    (endpoint, quinn::ClientConfig::new(Arc::new(crypto)))
}

/// A raw QUIC client that verifies the router properly (as the SDK does) and presents
/// `identity`: for sending hand-made request frames.
pub fn agent_raw_client(identity: &IdentityFile) -> (quinn::Endpoint, quinn::ClientConfig) {
    let tls = umbra_pki::client_config_spiffe(
        identity,
        umbra_pki::ExpectedServer::AnyOfKind(IdentityKind::Router),
        &[umbra_proto::stream::ALPN],
    )
    .expect("tls");
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    (endpoint, quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Connects and sends `bytes` as a request on a new stream; returns the router's 2-byte answer,
/// or the error that prevented one.
pub async fn raw_request(
    endpoint: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
    router: SocketAddr,
    bytes: &[u8],
) -> Result<[u8; 2], String> {
    let conn = endpoint
        .connect_with(cfg.clone(), router, "router.umbra")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    request_on(&conn, bytes).await
}

/// Sends `bytes` on a new stream of `conn` and reads the 2-byte answer.
pub async fn request_on(conn: &quinn::Connection, bytes: &[u8]) -> Result<[u8; 2], String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(bytes).await.map_err(|e| e.to_string())?;
    let mut resp = [0u8; 2];
    recv.read_exact(&mut resp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(resp)
}

/// Allows `action` for the agent on a fresh echo-backed service. Convenience for tests.
pub async fn echo_service(t: &TestController, echo: &Echo, svc: &str, who: &str) {
    service(t, svc, echo.hosting()).await;
    grant(t, &format!("{who}-{svc}"), Action::Dial, who, svc).await;
}

/// Asks, on a raw client connection, to dial `svc`: the router's status byte and the stream,
/// for tests that look at the wire answer itself rather than the SDK's reading of it.
pub async fn raw_dial(
    conn: &quinn::Connection,
    svc: &str,
) -> (
    umbra_proto::stream::Status,
    quinn::SendStream,
    quinn::RecvStream,
) {
    use umbra_proto::stream::{decode_response, encode_request, Op, ServiceRequest};
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let frame = encode_request(Op::Dial, &ServiceRequest { service: name(svc) }).expect("frame");
    send.write_all(&frame).await.expect("request sent");
    let mut answer = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(20), recv.read_exact(&mut answer))
        .await
        .expect("timely")
        .expect("an answer");
    (decode_response(answer).expect("a status"), send, recv)
}

/// A stream to the echo service `svc`, on a raw client connection, that has carried a ping
/// both ways (so the router has spliced it).
pub async fn raw_echo(
    conn: &quinn::Connection,
    svc: &str,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (status, mut send, mut recv) = raw_dial(conn, svc).await;
    assert_eq!(status, umbra_proto::stream::Status::Ok, "{svc}");
    send.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(20), recv.read_exact(&mut back))
        .await
        .expect("timely")
        .expect("echo");
    assert_eq!(&back, b"ping");
    (send, recv)
}
