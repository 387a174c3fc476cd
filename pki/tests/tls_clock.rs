//! The handshake judges certificates' validity by the injected clock, not by the system time:
//! what lets the end-to-end tests age certificates by moving a manual clock.

mod common;

use std::sync::Arc;
use std::time::SystemTime;

use common::{ca, enroll, enroll_at, handshake, td, DAY};
use rustls::{CertificateError as TlsCertError, Error as TlsError};
use umbra_clock::ManualClock;
use umbra_pki::{
    client_config_with_clock, server_config_with_clock, ClientAuth, CONTROLLER_SERVER_NAME,
};
use umbra_policies::IdentityKind;

const ALPN: &[&[u8]] = &[b"umbra/1"];

#[derive(Debug, Default)]
struct NoneRevoked;

impl umbra_pki::RevocationCheck for NoneRevoked {
    fn is_revoked(&self, _: &umbra_pki::Serial) -> bool {
        false
    }
}

fn server(ca: &umbra_pki::CertificateAuthority, clock: &ManualClock) -> Arc<rustls::ServerConfig> {
    let creds = ca
        .issue_server(DAY, SystemTime::now())
        .expect("server creds");
    let auth = ClientAuth::Required {
        roots: vec![ca.root_der().clone()],
        revoked: Arc::new(NoneRevoked),
    };
    server_config_with_clock(creds, auth, ALPN, &clock.clock()).expect("server config")
}

#[test]
fn a_server_judges_client_certificates_on_its_clock() {
    let two_days_ago = SystemTime::now() - 2 * DAY;
    // A CA as old as the certificate, so that the chain is valid at the server's time.
    let ca = umbra_pki::CertificateAuthority::generate(&td(), two_days_ago - DAY).expect("CA");
    // Valid for a day, two days ago: expired on the present time.
    let old = enroll_at(&ca, IdentityKind::Agent, "old", DAY, two_days_ago);
    // The client judges the server's certificate (issued now) on the present time.
    let present = ManualClock::starting_now();
    let client = client_config_with_clock(&old, ALPN, &present.clock()).expect("client");

    let err = handshake(
        client.clone(),
        server(&ca, &present),
        CONTROLLER_SERVER_NAME,
    )
    .expect_err("expired on the present time");
    assert!(matches!(
        err,
        TlsError::InvalidCertificate(TlsCertError::Expired | TlsCertError::ExpiredContext { .. })
    ));

    // A server whose clock reads a day and a half ago admits it.
    let back = ManualClock::new(two_days_ago + DAY / 2);
    handshake(client, server(&ca, &back), CONTROLLER_SERVER_NAME)
        .expect("valid on the server's clock");
}

#[test]
fn a_client_judges_the_server_certificate_on_its_clock() {
    let ca = ca();
    let agent = enroll(&ca, IdentityKind::Agent, "agent-1");
    let present = ManualClock::starting_now();
    // Two days on, the server's day-long certificate has expired for the client.
    let ahead = ManualClock::new(SystemTime::now() + 2 * DAY);
    let client = client_config_with_clock(&agent, ALPN, &ahead.clock()).expect("client");
    let err = handshake(client, server(&ca, &present), CONTROLLER_SERVER_NAME)
        .expect_err("the server certificate expired on the client's clock");
    assert!(matches!(
        err,
        TlsError::InvalidCertificate(TlsCertError::Expired | TlsCertError::ExpiredContext { .. })
    ));
    let client = client_config_with_clock(&agent, ALPN, &present.clock()).expect("client");
    handshake(client, server(&ca, &present), CONTROLLER_SERVER_NAME)
        .expect("valid on the present time");
}
