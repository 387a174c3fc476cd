//! Real rustls handshakes, in memory, with the configurations this crate builds.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use common::{ca, enroll, enroll_at, handshake, name, td, DAY};
use rustls::{CertificateError as TlsCertError, Error as TlsError};
use umbra_pki::{
    client_config, client_config_pinned, client_config_spiffe, fingerprint, peer_identity,
    server_config, CertificateAuthority, CertificateError, ClientAuth, ExpectedServer,
    PeerRejected, RevocationCheck, Serial, ServerCredentials, SpiffeId, CONTROLLER_SERVER_NAME,
    ENROLL_SERVER_NAME,
};
use umbra_policies::IdentityKind;

const ALPN: &[&[u8]] = &[b"umbra/1"];

#[derive(Debug, Default)]
struct Revoked(Mutex<HashSet<Serial>>);

impl RevocationCheck for Revoked {
    fn is_revoked(&self, serial: &Serial) -> bool {
        self.0.lock().expect("lock").contains(serial)
    }
}

fn controller_server(ca: &CertificateAuthority, auth: ClientAuth) -> Arc<rustls::ServerConfig> {
    let creds = ca
        .issue_server(DAY, SystemTime::now())
        .expect("server creds");
    server_config(creds, auth, ALPN).expect("server config")
}

fn mutual(ca: &CertificateAuthority, revoked: Arc<Revoked>) -> ClientAuth {
    ClientAuth::Required {
        roots: vec![ca.root_der().clone()],
        revoked,
    }
}

/// The crate's own reason inside a rustls certificate error.
fn pki_cause(err: TlsError) -> CertificateError {
    match PeerRejected::from_tls_error(&err) {
        Some(e) => e.clone(),
        None => panic!("expected a PeerRejected inside {err:?}"),
    }
}

fn server_refused(err: TlsError) -> TlsCertError {
    match err {
        TlsError::InvalidCertificate(e) => e,
        other => panic!("expected a certificate error, got {other:?}"),
    }
}

#[test]
fn pinned_first_contact() {
    let ca = ca();
    let server = controller_server(&ca, ClientAuth::None);

    let client = client_config_pinned(ca.fingerprint(), ALPN);
    let (c, _s) = handshake(client.clone(), server.clone(), ENROLL_SERVER_NAME).expect("pinned");
    assert_eq!(c.alpn_protocol(), Some(&b"umbra/1"[..]));
    assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    handshake(client.clone(), server.clone(), CONTROLLER_SERVER_NAME).expect("other SAN");

    // A name the certificate does not carry.
    let err = handshake(client, server.clone(), "evil.example").expect_err("wrong name");
    assert!(matches!(
        server_refused(err),
        TlsCertError::NotValidForName | TlsCertError::NotValidForNameContext { .. }
    ));

    // A fingerprint of another CA, and of the server's own leaf.
    let other = common::ca();
    let err = handshake(
        client_config_pinned(other.fingerprint(), ALPN),
        server.clone(),
        ENROLL_SERVER_NAME,
    )
    .expect_err("wrong pin");
    assert_eq!(
        err.to_string(),
        "invalid peer certificate: Other(OtherError(no certificate in the presented chain \
         matches the pinned CA fingerprint))"
    );
    assert_eq!(pki_cause(err), CertificateError::PinMismatch);

    let creds = ca.issue_server(DAY, SystemTime::now()).expect("creds");
    let leaf_pin = fingerprint(&creds.chain[0]);
    let server2 = server_config(creds, ClientAuth::None, ALPN).expect("server");
    assert!(handshake(
        client_config_pinned(leaf_pin, ALPN),
        server2,
        ENROLL_SERVER_NAME
    )
    .is_err());
}

#[test]
fn pinned_client_refuses_a_chain_the_pinned_ca_did_not_sign() {
    // The attacker's chain carries the real root (public) but its leaf and intermediate are its own.
    let real = ca();
    let evil = common::ca();
    let mut creds = evil.issue_server(DAY, SystemTime::now()).expect("creds");
    creds.chain.push(real.root_der().clone());
    let server = server_config(creds, ClientAuth::None, ALPN).expect("server");
    let err = handshake(
        client_config_pinned(real.fingerprint(), ALPN),
        server,
        ENROLL_SERVER_NAME,
    )
    .expect_err("foreign chain");
    assert!(matches!(
        server_refused(err),
        TlsCertError::UnknownIssuer | TlsCertError::BadSignature
    ));
}

#[test]
fn mutual_tls_with_an_issued_identity() {
    let ca = ca();
    let revoked = Arc::new(Revoked::default());
    let server = controller_server(&ca, mutual(&ca, revoked));
    let agent = enroll(&ca, IdentityKind::Agent, "agent-1");
    let client = client_config(&agent, ALPN).expect("client config");
    let (_c, s) = handshake(client, server, CONTROLLER_SERVER_NAME).expect("mutual TLS");
    let peer = peer_identity(&s).expect("peer identity");
    assert_eq!(peer.spiffe, agent.spiffe());
    assert_eq!(
        peer.spiffe,
        SpiffeId::new(&td(), IdentityKind::Agent, &name("agent-1"))
    );
    assert_eq!(peer.serial, agent.leaf().expect("leaf").serial);
}

#[test]
fn ed25519_client_keys_work() {
    let ca = ca();
    let server = controller_server(&ca, mutual(&ca, Arc::default()));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr");
    let mut agent = enroll(&ca, IdentityKind::Agent, "ed");
    let issued = ca
        .issue(csr.der(), &agent.spiffe(), DAY, SystemTime::now())
        .expect("issue");
    agent.cert_pem = issued.cert_pem;
    agent.key_pem = umbra_pki::SecretString::new(key.serialize_pem());
    let (_c, s) = handshake(
        client_config(&agent, ALPN).expect("client"),
        server,
        CONTROLLER_SERVER_NAME,
    )
    .expect("Ed25519 client certificate");
    assert_eq!(peer_identity(&s).expect("peer").spiffe, agent.spiffe());
}

#[test]
fn mutual_tls_refuses_a_missing_client_certificate() {
    let ca = ca();
    let server = controller_server(&ca, mutual(&ca, Arc::default()));
    let err = handshake(
        client_config_pinned(ca.fingerprint(), ALPN),
        server,
        CONTROLLER_SERVER_NAME,
    )
    .expect_err("no client certificate");
    assert!(matches!(err, TlsError::NoCertificatesPresented), "{err:?}");
}

#[test]
fn mutual_tls_refuses_a_certificate_from_another_ca() {
    let ca = ca();
    let other = common::ca();
    let server = controller_server(&ca, mutual(&ca, Arc::default()));
    // Same trust domain and name, but signed by another CA; the client trusts the real server.
    let mut agent = enroll(&other, IdentityKind::Agent, "agent-1");
    agent.ca_pem = ca.root_pem().to_owned();
    let err = handshake(
        client_config(&agent, ALPN).expect("client"),
        server,
        CONTROLLER_SERVER_NAME,
    )
    .expect_err("foreign CA");
    assert!(matches!(
        server_refused(err),
        TlsCertError::UnknownIssuer | TlsCertError::BadSignature
    ));
}

#[test]
fn mutual_tls_refuses_a_revoked_certificate() {
    let ca = ca();
    let revoked = Arc::new(Revoked::default());
    let server = controller_server(&ca, mutual(&ca, revoked.clone()));
    let agent = enroll(&ca, IdentityKind::Agent, "agent-1");
    let client = client_config(&agent, ALPN).expect("client");
    handshake(client.clone(), server.clone(), CONTROLLER_SERVER_NAME).expect("before revocation");

    revoked
        .0
        .lock()
        .expect("lock")
        .insert(agent.leaf().expect("leaf").serial);
    // The same client config again: it would resume the earlier session if the server allowed
    // resumption, skipping the certificate check. The server does not, so revocation applies.
    let err =
        handshake(client.clone(), server.clone(), CONTROLLER_SERVER_NAME).expect_err("revoked");
    assert_eq!(server_refused(err), TlsCertError::Revoked);

    // Another identity of the same CA is unaffected.
    let other = enroll(&ca, IdentityKind::Agent, "agent-2");
    handshake(
        client_config(&other, ALPN).expect("client"),
        server,
        CONTROLLER_SERVER_NAME,
    )
    .expect("not revoked");
}

/// Admits only the names it lists: a router's whole-identity check, in miniature.
#[derive(Debug)]
struct OnlyNamed(&'static [&'static str]);

impl RevocationCheck for OnlyNamed {
    fn is_revoked(&self, _: &Serial) -> bool {
        false
    }

    fn admit(&self, peer: &umbra_pki::PeerCert) -> Result<(), CertificateError> {
        if self.0.contains(&peer.spiffe.name().as_str()) {
            return Ok(());
        }
        Err(CertificateError::NotAdmitted {
            spiffe: peer.spiffe.to_string(),
            reason: "unknown identity",
        })
    }
}

#[test]
fn mutual_tls_asks_the_check_to_admit_the_whole_identity() {
    let ca = ca();
    let server = controller_server(
        &ca,
        ClientAuth::Required {
            roots: vec![ca.root_der().clone()],
            revoked: Arc::new(OnlyNamed(&["agent-1"])),
        },
    );
    let known = enroll(&ca, IdentityKind::Agent, "agent-1");
    handshake(
        client_config(&known, ALPN).expect("client"),
        server.clone(),
        CONTROLLER_SERVER_NAME,
    )
    .expect("admitted");
    // A valid certificate of the right CA, for an identity the check does not admit: refused
    // during the handshake, with the typed reason.
    let stranger = enroll(&ca, IdentityKind::Agent, "agent-2");
    let err = handshake(
        client_config(&stranger, ALPN).expect("client"),
        server,
        CONTROLLER_SERVER_NAME,
    )
    .expect_err("not admitted");
    assert!(
        matches!(
            pki_cause(err),
            CertificateError::NotAdmitted {
                reason: "unknown identity",
                ..
            }
        ),
        "the typed reason reaches the server"
    );
}

#[test]
fn mutual_tls_refuses_an_expired_certificate() {
    let ca = ca();
    let server = controller_server(&ca, mutual(&ca, Arc::default()));
    let two_days_ago = SystemTime::now() - 2 * DAY;
    let agent = enroll_at(&ca, IdentityKind::Agent, "old", DAY, two_days_ago);
    let err = handshake(
        client_config(&agent, ALPN).expect("client"),
        server,
        CONTROLLER_SERVER_NAME,
    )
    .expect_err("expired");
    assert!(matches!(
        server_refused(err),
        TlsCertError::Expired | TlsCertError::ExpiredContext { .. }
    ));
}

#[test]
fn routers_are_checked_by_spiffe_id() {
    let ca = ca();
    let router = enroll(&ca, IdentityKind::Router, "r1");
    let server = server_config(
        ServerCredentials::from_identity(&router).expect("router creds"),
        mutual(&ca, Arc::default()),
        ALPN,
    )
    .expect("router server");
    let agent = enroll(&ca, IdentityKind::Agent, "agent-1");

    for expected in [
        ExpectedServer::AnyOfKind(IdentityKind::Router),
        ExpectedServer::Exact(router.spiffe()),
    ] {
        let client = client_config_spiffe(&agent, expected, ALPN).expect("client");
        let (c, s) = handshake(client, server.clone(), "r1.router.umbra").expect("to router");
        assert_eq!(
            peer_identity(&c).expect("server identity").spiffe,
            router.spiffe()
        );
        assert_eq!(
            peer_identity(&s).expect("client identity").spiffe,
            agent.spiffe()
        );
    }

    for expected in [
        ExpectedServer::AnyOfKind(IdentityKind::Admin),
        ExpectedServer::Exact(SpiffeId::new(&td(), IdentityKind::Router, &name("r2"))),
    ] {
        let client = client_config_spiffe(&agent, expected, ALPN).expect("client");
        let err = handshake(client, server.clone(), "r1.router.umbra").expect_err("wrong router");
        assert_eq!(
            pki_cause(err),
            CertificateError::UnexpectedPeer {
                found: router.spiffe().to_string()
            }
        );
    }

    // A router certificate is not valid for a DNS name.
    let err = handshake(
        client_config(&agent, ALPN).expect("client"),
        server,
        "r1.router.umbra",
    )
    .expect_err("no DNS SAN");
    assert!(matches!(
        server_refused(err),
        TlsCertError::NotValidForName | TlsCertError::NotValidForNameContext { .. }
    ));

    // An agent certificate cannot serve: it lacks the serverAuth EKU.
    let agent_server = server_config(
        ServerCredentials::from_identity(&agent).expect("creds"),
        ClientAuth::None,
        ALPN,
    )
    .expect("server");
    let err = handshake(
        client_config_spiffe(
            &router,
            ExpectedServer::AnyOfKind(IdentityKind::Agent),
            ALPN,
        )
        .expect("client"),
        agent_server,
        "agent",
    )
    .expect_err("agent as server");
    assert!(matches!(
        server_refused(err),
        TlsCertError::InvalidPurpose | TlsCertError::InvalidPurposeContext { .. }
    ));
}

#[test]
fn server_config_needs_spiffe_roots() {
    let ca = ca();
    let creds = ca.issue_server(DAY, SystemTime::now()).expect("creds");
    // A leaf is not a CA with a trust-domain id.
    let agent = enroll(&ca, IdentityKind::Agent, "a");
    let leaf = umbra_pki::parse_pem_chain(&agent.cert_pem).expect("chain")[0].clone();
    assert!(server_config(
        creds.clone(),
        ClientAuth::Required {
            roots: vec![leaf],
            revoked: Arc::new(Revoked::default()),
        },
        ALPN,
    )
    .is_err());
    assert!(server_config(
        creds,
        ClientAuth::Required {
            roots: vec![],
            revoked: Arc::new(Revoked::default()),
        },
        ALPN,
    )
    .is_err());
}

#[test]
fn sessions_are_never_resumed() {
    let ca = ca();
    let server = controller_server(&ca, mutual(&ca, Arc::default()));
    let agent = enroll(&ca, IdentityKind::Agent, "agent-1");
    let client = client_config(&agent, ALPN).expect("client");
    for _ in 0..2 {
        let (c, s) =
            handshake(client.clone(), server.clone(), CONTROLLER_SERVER_NAME).expect("handshake");
        assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Full));
        assert_eq!(s.handshake_kind(), Some(rustls::HandshakeKind::Full));
    }

    // Control: the same server with rustls' default resumption would resume, skipping the
    // client-certificate verifier (and with it the revocation check).
    let mut resuming = (*server).clone();
    resuming.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
    resuming.send_tls13_tickets = 2;
    let resuming = Arc::new(resuming);
    let client = client_config(&agent, ALPN).expect("client");
    handshake(client.clone(), resuming.clone(), CONTROLLER_SERVER_NAME).expect("first");
    let (c, _) = handshake(client, resuming, CONTROLLER_SERVER_NAME).expect("second");
    assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
}
