//! Shared test helpers: a CA, enrolled identities, and an in-memory TLS handshake.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};
use umbra_pki::{
    generate_key_and_csr, CertificateAuthority, IdentityFile, SpiffeId, TrustDomain,
    IDENTITY_FILE_VERSION,
};
use umbra_policies::{IdentityId, IdentityKind, Name};

pub const DAY: Duration = Duration::from_secs(24 * 60 * 60);

pub fn td() -> TrustDomain {
    "umbra.local".parse().expect("trust domain")
}

pub fn name(s: &str) -> Name {
    Name::new(s).expect("name")
}

pub fn ca() -> CertificateAuthority {
    CertificateAuthority::generate(&td(), SystemTime::now()).expect("generate CA")
}

/// Enrolls `name` of `kind` with `ca`, the way `umbra enroll` does: key and CSR here, the
/// certificate from the CA.
pub fn enroll_at(
    ca: &CertificateAuthority,
    kind: IdentityKind,
    n: &str,
    validity: Duration,
    now: SystemTime,
) -> IdentityFile {
    let k = generate_key_and_csr(n).expect("key and CSR");
    let spiffe = SpiffeId::new(ca.trust_domain(), kind, &name(n));
    let issued = ca.issue(&k.csr_der, &spiffe, validity, now).expect("issue");
    IdentityFile {
        version: IDENTITY_FILE_VERSION,
        id: IdentityId::new(format!("id-{n}")).expect("id"),
        name: name(n),
        kind,
        trust_domain: ca.trust_domain().clone(),
        controller: "127.0.0.1:7443".into(),
        ca_pem: ca.root_pem().to_owned(),
        cert_pem: issued.cert_pem,
        key_pem: k.key_pem,
    }
}

pub fn enroll(ca: &CertificateAuthority, kind: IdentityKind, n: &str) -> IdentityFile {
    enroll_at(ca, kind, n, DAY, SystemTime::now())
}

/// Runs a TLS handshake between `client` and `server` in memory, then sends one message each
/// way. Returns the first error either side reports.
pub fn handshake(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    server_name: &str,
) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
    let name = ServerName::try_from(server_name.to_owned()).expect("server name");
    let mut c = ClientConnection::new(client, name)?;
    let mut s = ServerConnection::new(server)?;
    for _ in 0..32 {
        transfer(&mut *c, &mut *s)?;
        transfer(&mut *s, &mut *c)?;
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            break;
        }
    }
    if c.is_handshaking() || s.is_handshaking() {
        return Err(rustls::Error::General("handshake did not finish".into()));
    }
    // Application data both ways proves the session keys agree.
    use std::io::{Read, Write};
    c.writer().write_all(b"ping").expect("write");
    transfer(&mut *c, &mut *s)?;
    let mut buf = [0u8; 4];
    s.reader().read_exact(&mut buf).expect("server reads");
    assert_eq!(&buf, b"ping");
    s.writer().write_all(b"pong").expect("write");
    transfer(&mut *s, &mut *c)?;
    c.reader().read_exact(&mut buf).expect("client reads");
    assert_eq!(&buf, b"pong");
    Ok((c, s))
}

fn transfer<A, B>(
    from: &mut rustls::ConnectionCommon<A>,
    to: &mut rustls::ConnectionCommon<B>,
) -> Result<(), rustls::Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).expect("write_tls to a Vec");
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).expect("read_tls from a slice");
        to.process_new_packets()?;
    }
    Ok(())
}
