//! rustls configurations for every Umbra connection: TLS 1.3 only, the `ring` provider named
//! explicitly, and certificate verifiers that know about SPIFFE ids and revocation.
//!
//! - [`server_config`]: the controller's and routers' servers, optionally requiring a client
//!   certificate that chains to the CA, carries a SPIFFE id of the CA's trust domain and is
//!   admitted by a [`RevocationCheck`] (not revoked, and for a router: a known, active
//!   identity), checked at the handshake so that a refused identity cannot even connect.
//! - [`client_config_pinned`]: an enrollee's first contact, trusting only the CA whose
//!   fingerprint came in the enrollment token.
//! - [`client_config`]: an enrolled identity talking to the controller (checked by DNS name).
//! - [`client_config_spiffe`]: an enrolled identity talking to a peer that is identified by its
//!   SPIFFE id rather than a DNS name (a router).
//!
//! rustls checks certificate validity against the time its config's
//! [`TimeProvider`](rustls::time_provider::TimeProvider) reports, and hands that same `now` to
//! our verifiers. Each builder has a `*_with_clock` form that takes an injected
//! [`Clock`] (wrapped as [`ClockTime`]), so that components that run on a manual clock in tests
//! also judge certificates by it; the plain forms use [`Clock::system`], which is what every
//! caller without a clock of its own (the CLI, first enrollment) means.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError as TlsCertError, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, SignatureScheme,
};
use umbra_clock::Clock;
use umbra_policies::IdentityKind;

use crate::ca::ServerCredentials;
use crate::cert::{
    ca_trust_domain, parse_peer_cert, parse_pem_chain, parse_private_key_pem, parse_x509, PeerCert,
};
use crate::error::{CertificateError, PkiError};
use crate::fingerprint::{fingerprint, Fingerprint};
use crate::identity_file::IdentityFile;
use crate::serial::Serial;
use crate::spiffe::{SpiffeId, TrustDomain};

/// Decides, during a handshake, whether a verified client certificate may connect. The
/// controller implements it over its revocation list; a router over its whole policy, so that an
/// unknown or disabled identity is refused at the handshake rather than just after it. It is
/// consulted on every handshake, so it must be fast and must not block.
pub trait RevocationCheck: Send + Sync + fmt::Debug {
    /// Whether the certificate with `serial` has been revoked.
    fn is_revoked(&self, serial: &Serial) -> bool;

    /// Whether the holder of `peer` (a certificate that already chains to a trusted root and
    /// names a SPIFFE id of a trusted trust domain) may complete the handshake.
    ///
    /// The default refuses revoked serials only, which is all a revocation list knows.
    /// Implementations that know more (which identities exist and are active) override it and
    /// return [`CertificateError::NotAdmitted`] for identities they refuse; a revoked
    /// certificate should still be [`CertificateError::Revoked`], so that the client learns
    /// that it was revoked.
    fn admit(&self, peer: &PeerCert) -> Result<(), CertificateError> {
        if self.is_revoked(&peer.serial) {
            return Err(CertificateError::Revoked);
        }
        Ok(())
    }
}

/// Whether and how a server authenticates its clients.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    /// No client certificate is requested (the enrollment endpoint: enrollees have none yet).
    None,
    /// A client certificate is mandatory. It must chain to one of `roots` (webpki, clientAuth
    /// EKU, validity), carry exactly one SPIFFE id whose trust domain is one of the roots'
    /// (`spiffe://TD` URI SAN of the CA certificate), and `revoked` must admit it (see
    /// [`RevocationCheck::admit`]).
    Required {
        /// The CA certificates to trust (normally the one root).
        roots: Vec<CertificateDer<'static>>,
        /// The revocation list, consulted at every handshake.
        revoked: Arc<dyn RevocationCheck>,
    },
}

/// The peer identity a client expects from a server identified by SPIFFE id (see
/// [`client_config_spiffe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedServer {
    /// Exactly this identity.
    Exact(SpiffeId),
    /// Any identity of this kind in the client's trust domain.
    AnyOfKind(IdentityKind),
}

/// The injected [`Clock`] as rustls's time source, so that the handshake's validity checks
/// (webpki's and our verifiers', which receive rustls's `now`) move with the clock that the rest
/// of the component uses, rather than reading the system time behind its back.
#[derive(Debug, Clone)]
pub struct ClockTime(pub Clock);

impl rustls::time_provider::TimeProvider for ClockTime {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(self.0.since_epoch()))
    }
}

fn time(clock: &Clock) -> Arc<ClockTime> {
    Arc::new(ClockTime(clock.clone()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn alpn_list(alpn: &[&[u8]]) -> Vec<Vec<u8>> {
    alpn.iter().map(|p| p.to_vec()).collect()
}

/// Why one of this crate's verifiers refused a peer's certificate during a handshake.
///
/// rustls reports it as `Error::InvalidCertificate(CertificateError::Other(OtherError(..)))`;
/// callers that want the typed reason downcast the inner error to `PeerRejected`. Its `Debug`
/// is its `Display`, because rustls formats the inner error with `{:?}` in its own message and
/// that message is what an operator sees.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PeerRejected(pub CertificateError);

impl fmt::Debug for PeerRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl PeerRejected {
    /// The typed reason inside a rustls error, if one of this crate's verifiers produced it.
    pub fn from_tls_error(e: &rustls::Error) -> Option<&CertificateError> {
        match e {
            rustls::Error::InvalidCertificate(TlsCertError::Other(OtherError(inner))) => {
                inner.downcast_ref::<PeerRejected>().map(|r| &r.0)
            }
            _ => None,
        }
    }
}

/// Wraps a refusal as a rustls certificate error, keeping the typed cause.
fn tls_cert_error(e: CertificateError) -> rustls::Error {
    rustls::Error::InvalidCertificate(TlsCertError::Other(OtherError(Arc::new(PeerRejected(e)))))
}

/// The certificate error inside a crate error (parsing a peer certificate only fails with one).
fn certificate_cause(e: PkiError) -> CertificateError {
    match e {
        PkiError::Certificate(c) => c,
        _ => CertificateError::Malformed,
    }
}

/// A server config: TLS 1.3 only, `ring`, presenting `creds`, authenticating clients as
/// `client_auth` says, offering `alpn`.
///
/// Session resumption is disabled: a resumed session would skip client-certificate
/// verification, and with it the revocation check.
pub fn server_config(
    creds: ServerCredentials,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    server_config_with_clock(creds, client_auth, alpn, &Clock::system())
}

/// [`server_config`] judging client certificates' validity at `clock`'s time.
pub fn server_config_with_clock(
    creds: ServerCredentials,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
    clock: &Clock,
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_details(provider.clone(), time(clock))
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Required { roots, revoked } => {
            let mut store = RootCertStore::empty();
            let mut trust_domains = BTreeSet::new();
            for root in roots {
                trust_domains.insert(ca_trust_domain(&parse_x509(&root)?)?);
                store.add(root)?;
            }
            let inner =
                WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider).build()?;
            builder.with_client_cert_verifier(Arc::new(SpiffeClientVerifier {
                inner,
                trust_domains,
                revoked,
            }))
        }
    };
    let mut config = builder.with_single_cert(creds.chain, creds.key)?;
    config.alpn_protocols = alpn_list(alpn);
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client config for first contact with the controller, before the enrollee has a CA
/// certificate: the server's chain is accepted only if one of its CA certificates (not the
/// leaf) has SHA-256 fingerprint `ca`; the chain is then verified with webpki with that
/// certificate as the only trust anchor, including the server-name check. No client certificate.
pub fn client_config_pinned(ca: Fingerprint, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    client_config_pinned_with_clock(ca, alpn, &Clock::system())
}

/// [`client_config_pinned`] judging the server's certificates at `clock`'s time.
pub fn client_config_pinned_with_clock(
    ca: Fingerprint,
    alpn: &[&[u8]],
    clock: &Clock,
) -> Arc<rustls::ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(PinnedServerVerifier {
        ca,
        provider: provider.clone(),
    });
    // The ring provider supports TLS 1.3, so this cannot fail; a test covers it.
    #[allow(clippy::expect_used)]
    let builder = rustls::ClientConfig::builder_with_details(provider, time(clock))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3");
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = alpn_list(alpn);
    Arc::new(config)
}

/// A client config for an enrolled identity talking to a server identified by DNS name (the
/// controller): trusts only `identity.ca_pem`, presents the identity's chain and key.
pub fn client_config(
    identity: &IdentityFile,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    client_config_with_clock(identity, alpn, &Clock::system())
}

/// [`client_config`] judging the server's certificates at `clock`'s time.
pub fn client_config_with_clock(
    identity: &IdentityFile,
    alpn: &[&[u8]],
    clock: &Clock,
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let roots = root_store(identity)?;
    let chain = parse_pem_chain(&identity.cert_pem)?;
    let key = parse_private_key_pem(&identity.key_pem)?;
    let mut config = rustls::ClientConfig::builder_with_details(provider(), time(clock))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = alpn_list(alpn);
    Ok(Arc::new(config))
}

/// A client config for an enrolled identity talking to a server identified by SPIFFE id (a
/// router, whose certificate has no DNS name): the chain must verify to `identity.ca_pem` with the
/// serverAuth EKU, and the leaf's SPIFFE id must be in the identity's trust domain and match
/// `expected`. The TLS server name is only sent as SNI, not checked. Presents the identity's
/// chain and key.
pub fn client_config_spiffe(
    identity: &IdentityFile,
    expected: ExpectedServer,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    client_config_spiffe_with_clock(identity, expected, alpn, &Clock::system())
}

/// [`client_config_spiffe`] judging the server's certificates at `clock`'s time.
pub fn client_config_spiffe_with_clock(
    identity: &IdentityFile,
    expected: ExpectedServer,
    alpn: &[&[u8]],
    clock: &Clock,
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let provider = provider();
    let roots = Arc::new(root_store(identity)?);
    let chain = parse_pem_chain(&identity.cert_pem)?;
    let key = parse_private_key_pem(&identity.key_pem)?;
    let verifier = Arc::new(SpiffeServerVerifier {
        roots,
        trust_domain: identity.trust_domain.clone(),
        expected,
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_details(provider, time(clock))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = alpn_list(alpn);
    Ok(Arc::new(config))
}

fn root_store(identity: &IdentityFile) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for ca in parse_pem_chain(&identity.ca_pem)? {
        roots.add(ca)?;
    }
    Ok(roots)
}

/// The identity of the peer of an established connection, from its verified leaf certificate.
pub fn peer_identity(conn: &rustls::CommonState) -> Result<PeerCert, PkiError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(CertificateError::NoPeerCertificate)?;
    parse_peer_cert(leaf)
}

/// Wraps the webpki client verifier with the SPIFFE and revocation checks.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domains: BTreeSet<TrustDomain>,
    revoked: Arc<dyn RevocationCheck>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| tracing::info!(error = %e, "client certificate refused"))?;
        let peer = parse_peer_cert(end_entity).map_err(|e| {
            tracing::info!(error = %e, "client certificate without a valid SPIFFE id refused");
            tls_cert_error(certificate_cause(e))
        })?;
        if !self.trust_domains.contains(peer.spiffe.trust_domain()) {
            tracing::info!(spiffe = %peer.spiffe, "client certificate from a foreign trust domain refused");
            return Err(tls_cert_error(CertificateError::UnexpectedPeer {
                found: peer.spiffe.to_string(),
            }));
        }
        match self.revoked.admit(&peer) {
            Ok(()) => Ok(verified),
            Err(CertificateError::Revoked) => {
                tracing::info!(spiffe = %peer.spiffe, serial = %peer.serial, "revoked client certificate refused");
                Err(rustls::Error::InvalidCertificate(TlsCertError::Revoked))
            }
            Err(e) => {
                tracing::info!(spiffe = %peer.spiffe, serial = %peer.serial, reason = %e, "client identity not admitted");
                Err(tls_cert_error(e))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Verifies a server chain against a single anchor found by fingerprint in the chain itself.
#[derive(Debug)]
struct PinnedServerVerifier {
    ca: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Every certificate is hashed and compared (constant-time) even after a match.
        let mut anchor = None;
        for cert in intermediates {
            if fingerprint(cert) == self.ca && anchor.is_none() {
                anchor = Some(cert);
            }
        }
        let Some(anchor) = anchor else {
            tracing::info!(pinned = %self.ca, "server chain does not contain the pinned CA");
            return Err(tls_cert_error(CertificateError::PinMismatch));
        };
        let mut roots = RootCertStore::empty();
        roots.add(anchor.clone().into_owned())?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        verify_server_name(&cert, server_name)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies a server chain to the identity's CA and checks the leaf's SPIFFE id instead of a
/// DNS name.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: TrustDomain,
    expected: ExpectedServer,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let peer = parse_peer_cert(end_entity).map_err(|e| tls_cert_error(certificate_cause(e)))?;
        let ok = peer.spiffe.trust_domain() == &self.trust_domain
            && match &self.expected {
                ExpectedServer::Exact(id) => &peer.spiffe == id,
                ExpectedServer::AnyOfKind(kind) => peer.spiffe.kind() == *kind,
            };
        if !ok {
            tracing::info!(spiffe = %peer.spiffe, expected = ?self.expected, "unexpected server identity");
            return Err(tls_cert_error(CertificateError::UnexpectedPeer {
                found: peer.spiffe.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
