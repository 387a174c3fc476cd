//! The controller's certificate authority: a root CA that can be kept offline and an intermediate
//! CA that signs every identity and server certificate (all ECDSA P-256).
//!
//! Issuance trusts nothing in the request but the public key, and only after the request has
//! proven possession of the matching private key: the controller decides the subject, the SANs,
//! the key usages, the serial and the lifetime.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use umbra_policies::{IdentityKind, Timestamp};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ED25519};
use x509_parser::prelude::FromDer;

pub use crate::serial::{Serial, SerialError};

use crate::cert::{ca_trust_domain, parse_single_pem, parse_x509, unix_timestamp};
use crate::csr::{load_key_pair, SecretString};
use crate::error::{CertificateError, CsrError, PkiError};
use crate::fingerprint::{fingerprint, Fingerprint};
use crate::fsutil;
use crate::spiffe::{SpiffeId, TrustDomain};

/// The DNS name of the controller's API, as it appears in its server certificate.
pub const CONTROLLER_SERVER_NAME: &str = "controller.umbra";
/// The DNS name under which enrollees reach the controller on first contact.
pub const ENROLL_SERVER_NAME: &str = "enroll.controller.umbra";

/// The largest CSR accepted. An honest P-256 or Ed25519 CSR is a few hundred bytes; the limit
/// bounds the parsing work an unauthenticated enrollee can cause.
pub const MAX_CSR_SIZE: usize = 16 * 1024;

/// How far back `notBefore` is set, so that peers whose clocks lag a little accept a fresh
/// certificate.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// How far back the CA certificates' `notBefore` is set.
const CA_BACKDATE: Duration = Duration::from_secs(60 * 60);
const DAY: u64 = 24 * 60 * 60;
/// Lifetime of the root CA certificate: 10 years.
const ROOT_VALIDITY: Duration = Duration::from_secs(3652 * DAY);
/// Lifetime of the intermediate CA certificate: 5 years.
const INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(1826 * DAY);

/// Bounds for the files this module reads.
const MAX_CA_FILE: u64 = 64 * 1024;

/// File names inside the CA directory.
const ROOT_CERT_FILE: &str = "ca.crt";
const ROOT_KEY_FILE: &str = "root.key";
const INTERMEDIATE_CERT_FILE: &str = "intermediate.crt";
const INTERMEDIATE_KEY_FILE: &str = "intermediate.key";

/// DER prefix of a SubjectPublicKeyInfo for an uncompressed EC P-256 point: SEQUENCE {
/// SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (65 bytes, 0 unused bits) }.
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00, 0x04,
];
/// DER prefix of a SubjectPublicKeyInfo for an Ed25519 key: SEQUENCE { SEQUENCE { id-Ed25519 },
/// BIT STRING (32 bytes, 0 unused bits) }.
const ED25519_SPKI_PREFIX: &[u8] = &[
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The controller's certificate authority. `Debug` does not show the keys.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    root_der: CertificateDer<'static>,
    root_pem: String,
    /// `None` when the root key is kept offline; it is only needed to sign a new intermediate.
    root_key_pem: Option<SecretString>,
    intermediate_pem: String,
    intermediate_key_pem: SecretString,
    intermediate_not_after: Timestamp,
    issuer: Issuer<'static, KeyPair>,
    fingerprint: Fingerprint,
}

/// A certificate issued from a CSR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The serial number, to record for revocation.
    pub serial: Serial,
    /// When the certificate expires.
    pub not_after: Timestamp,
    /// The leaf certificate's PEM followed by the intermediate's PEM: the chain the holder
    /// presents.
    pub cert_pem: String,
}

/// A TLS server certificate chain with its private key. `Debug` does not show the key.
pub struct ServerCredentials {
    /// The chain to present, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl ServerCredentials {
    /// The credentials of an identity that serves TLS with its own certificate (a router).
    pub fn from_identity(identity: &crate::IdentityFile) -> Result<Self, PkiError> {
        Ok(ServerCredentials {
            chain: crate::cert::parse_pem_chain(&identity.cert_pem)?,
            key: crate::cert::parse_private_key_pem(&identity.key_pem)?,
        })
    }
}

impl Clone for ServerCredentials {
    fn clone(&self) -> Self {
        ServerCredentials {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for ServerCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCredentials")
            .field("chain_len", &self.chain.len())
            .field("key", &"...")
            .finish()
    }
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("fingerprint", &self.fingerprint)
            .field("root_key", &self.root_key_pem.as_ref().map(|_| "..."))
            .field("intermediate_key", &"...")
            .finish()
    }
}

/// The subject public key of a CSR, checked to be one of the two accepted kinds.
struct CsrPublicKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

fn odt(t: SystemTime) -> Result<OffsetDateTime, PkiError> {
    // Whole seconds: what X.509 can hold, so that `IssuedCert::not_after` equals the certificate.
    let secs = i64::try_from(unix_timestamp(t).0).map_err(|_| CertificateError::BadValidity)?;
    OffsetDateTime::from_unix_timestamp(secs).map_err(|_| CertificateError::BadValidity.into())
}

fn add(t: OffsetDateTime, d: Duration) -> Result<OffsetDateTime, PkiError> {
    let d = time::Duration::try_from(d).map_err(|_| CertificateError::BadValidity)?;
    t.checked_add(d)
        .ok_or_else(|| CertificateError::BadValidity.into())
}

fn sub(t: OffsetDateTime, d: Duration) -> Result<OffsetDateTime, PkiError> {
    let d = time::Duration::try_from(d).map_err(|_| CertificateError::BadValidity)?;
    t.checked_sub(d)
        .ok_or_else(|| CertificateError::BadValidity.into())
}

fn ts(t: OffsetDateTime) -> Timestamp {
    Timestamp(u64::try_from(t.unix_timestamp()).unwrap_or(0))
}

/// A random positive 128-bit serial: 16 random bytes with the top bit cleared (positive) and the
/// next bit set (so the DER encoding is always exactly 16 bytes), i.e. 126 bits of entropy.
fn random_serial() -> (SerialNumber, Serial) {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    (SerialNumber::from_slice(&bytes), Serial::from_bytes(&bytes))
}

fn uri_san(uri: String) -> Result<SanType, PkiError> {
    Ok(SanType::URI(uri.try_into()?))
}

fn dns_san(name: &str) -> Result<SanType, PkiError> {
    Ok(SanType::DnsName(name.try_into()?))
}

fn ca_params(
    common_name: String,
    trust_domain: &TrustDomain,
    path_len: u8,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Umbra");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![uri_san(trust_domain.id_uri())?];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial().0);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

impl CertificateAuthority {
    /// Generates a new root CA (valid 10 years, pathLen 1) and an intermediate CA signed by it
    /// (valid 5 years, pathLen 0), both ECDSA P-256 with keyCertSign and cRLSign only. Both carry
    /// the URI SAN `spiffe://TD`, which `load` checks against the configured trust domain.
    pub fn generate(trust_domain: &TrustDomain, now: SystemTime) -> Result<Self, PkiError> {
        let now = odt(now)?;
        let not_before = sub(now, CA_BACKDATE)?;

        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let root_params = ca_params(
            format!("Umbra root CA {trust_domain}"),
            trust_domain,
            1,
            not_before,
            add(now, ROOT_VALIDITY)?,
        )?;
        let root_cert = root_params.self_signed(&root_key)?;
        let root_issuer = Issuer::from_params(&root_params, &root_key);

        let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let int_params = ca_params(
            format!("Umbra intermediate CA {trust_domain}"),
            trust_domain,
            0,
            not_before,
            add(now, INTERMEDIATE_VALIDITY)?,
        )?;
        let int_cert = int_params.signed_by(&int_key, &root_issuer)?;

        let root_key_pem = SecretString::new(root_key.serialize_pem());
        let int_key_pem = SecretString::new(int_key.serialize_pem());
        Self::from_parts(
            trust_domain.clone(),
            root_cert.der().clone(),
            Some(root_key_pem),
            int_cert.der().clone(),
            int_key,
            int_key_pem,
        )
    }

    fn from_parts(
        trust_domain: TrustDomain,
        root_der: CertificateDer<'static>,
        root_key_pem: Option<SecretString>,
        int_der: CertificateDer<'static>,
        int_key: KeyPair,
        int_key_pem: SecretString,
    ) -> Result<Self, PkiError> {
        let intermediate_not_after = {
            let cert = parse_x509(&int_der)?;
            ts(cert.validity().not_after.to_datetime())
        };
        let issuer = Issuer::from_ca_cert_der(&int_der, int_key)?;
        Ok(CertificateAuthority {
            trust_domain,
            fingerprint: fingerprint(&root_der),
            root_pem: crate::pem::encode("CERTIFICATE", &root_der),
            root_der,
            root_key_pem,
            intermediate_pem: crate::pem::encode("CERTIFICATE", &int_der),
            intermediate_key_pem: int_key_pem,
            intermediate_not_after,
            issuer,
        })
    }

    /// Writes the CA to `dir` (created 0700 if missing): `ca.crt` (root certificate),
    /// `root.key` (0600; only if this CA holds the root key), `intermediate.crt` and
    /// `intermediate.key` (0600). Each file is replaced atomically.
    ///
    /// To keep the root offline, move `root.key` elsewhere after saving; `load` works without it.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        fsutil::create_private_dir(dir)?;
        if let Some(root_key) = &self.root_key_pem {
            crate::outfile::write_file(
                &dir.join(ROOT_KEY_FILE),
                root_key.expose().as_bytes(),
                fsutil::PRIVATE_MODE,
            )?;
        }
        crate::outfile::write_file(
            &dir.join(INTERMEDIATE_KEY_FILE),
            self.intermediate_key_pem.expose().as_bytes(),
            fsutil::PRIVATE_MODE,
        )?;
        crate::outfile::write_file(
            &dir.join(INTERMEDIATE_CERT_FILE),
            self.intermediate_pem.as_bytes(),
            fsutil::PUBLIC_MODE,
        )?;
        crate::outfile::write_file(
            &dir.join(ROOT_CERT_FILE),
            self.root_pem.as_bytes(),
            fsutil::PUBLIC_MODE,
        )
        .map_err(PkiError::from)
    }

    /// Loads a CA saved by [`save`](Self::save) and checks it: both certificates are CAs of
    /// `trust_domain`, the root is self-signed, the intermediate is signed by the root, and each
    /// key matches its certificate. `root.key` may be absent (root kept offline).
    ///
    /// Errors name the missing or bad file.
    pub fn load(dir: &Path, trust_domain: &TrustDomain) -> Result<Self, PkiError> {
        let root_path = dir.join(ROOT_CERT_FILE);
        let int_path = dir.join(INTERMEDIATE_CERT_FILE);
        let int_key_path = dir.join(INTERMEDIATE_KEY_FILE);
        let root_key_path = dir.join(ROOT_KEY_FILE);

        let root_der = parse_single_pem(&fsutil::read_text(&root_path, MAX_CA_FILE)?)
            .map_err(|e| e.in_file(&root_path))?;
        let int_der = parse_single_pem(&fsutil::read_text(&int_path, MAX_CA_FILE)?)
            .map_err(|e| e.in_file(&int_path))?;

        let int_key_pem = SecretString::new(fsutil::read_text(&int_key_path, MAX_CA_FILE)?);
        let int_key =
            load_key_pair(&int_key_pem).map_err(|e| PkiError::from(e).in_file(&int_key_path))?;
        let root_key = match fsutil::read_text(&root_key_path, MAX_CA_FILE) {
            Ok(pem) => {
                let pem = SecretString::new(pem);
                let key =
                    load_key_pair(&pem).map_err(|e| PkiError::from(e).in_file(&root_key_path))?;
                Some((pem, key))
            }
            Err(PkiError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                None
            }
            Err(e) => return Err(e),
        };
        for p in [&int_key_path, &root_key_path] {
            if fsutil::is_shared(p) {
                tracing::warn!(path = %p.display(), "CA private key file is readable by other users");
            }
        }

        {
            let root = parse_x509(&root_der).map_err(|e| PkiError::from(e).in_file(&root_path))?;
            let int = parse_x509(&int_der).map_err(|e| PkiError::from(e).in_file(&int_path))?;
            check_ca(&root, trust_domain, None)
                .map_err(|e| PkiError::from(e).in_file(&root_path))?;
            check_ca(&int, trust_domain, Some(&root))
                .map_err(|e| PkiError::from(e).in_file(&int_path))?;
            if int.public_key().subject_public_key.data.as_ref() != int_key.public_key_raw() {
                return Err(PkiError::from(CertificateError::KeyMismatch).in_file(&int_key_path));
            }
            if let Some((_, key)) = &root_key {
                if root.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                    return Err(
                        PkiError::from(CertificateError::KeyMismatch).in_file(&root_key_path)
                    );
                }
            }
        }

        Self::from_parts(
            trust_domain.clone(),
            root_der,
            root_key.map(|(pem, _)| pem),
            int_der,
            int_key,
            int_key_pem,
        )
    }

    /// The trust domain this CA issues identities for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root certificate, PEM: what every Umbra process trusts.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// The SHA-256 fingerprint of the root certificate, put in enrollment tokens.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The intermediate certificate, PEM.
    pub fn intermediate_pem(&self) -> &str {
        &self.intermediate_pem
    }

    /// When the intermediate certificate expires; no leaf is issued beyond it.
    pub fn intermediate_not_after(&self) -> Timestamp {
        self.intermediate_not_after
    }

    /// Whether this CA holds the root private key (it does not when the root is kept offline).
    pub fn has_root_key(&self) -> bool {
        self.root_key_pem.is_some()
    }

    /// Signs an identity certificate from a CSR.
    ///
    /// The controller, not the CSR, decides everything: subject CN = the identity's name, the
    /// only SAN is the URI SAN `spiffe`, EKU clientAuth (plus serverAuth for routers), keyUsage
    /// digitalSignature, a random positive 128-bit serial, notBefore = now - 5 min (clock skew),
    /// notAfter = now + `validity`. The CSR's own subject, SANs and extensions are ignored.
    ///
    /// The CSR's self-signature is verified (proof of possession of the private key), and only
    /// EC P-256 keys signed with ECDSA-SHA256 and Ed25519 keys signed with Ed25519 are accepted;
    /// anything else is [`PkiError::Csr`]. CSRs larger than [`MAX_CSR_SIZE`] are not parsed.
    pub fn issue(
        &self,
        csr_der: &[u8],
        spiffe: &SpiffeId,
        validity: Duration,
        now: SystemTime,
    ) -> Result<IssuedCert, PkiError> {
        let public_key = verify_csr(csr_der)?;
        if spiffe.trust_domain() != &self.trust_domain {
            return Err(CertificateError::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                found: spiffe.trust_domain().to_string(),
            }
            .into());
        }
        let now = odt(now)?;
        let not_after = add(now, validity)?;
        if ts(not_after) > self.intermediate_not_after {
            return Err(CertificateError::OutlivesIssuer {
                requested: ts(not_after).0,
                issuer: self.intermediate_not_after.0,
            }
            .into());
        }

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spiffe.name().as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![uri_san(spiffe.to_string())?];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if spiffe.kind() == IdentityKind::Router {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        let (serial_number, serial) = random_serial();
        params.serial_number = Some(serial_number);
        params.not_before = sub(now, CLOCK_SKEW)?;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;

        let cert = params.signed_by(&public_key, &self.issuer)?;
        tracing::info!(spiffe = %spiffe, serial = %serial, not_after = %ts(not_after).0, "issued identity certificate");
        Ok(IssuedCert {
            serial,
            not_after: ts(not_after),
            cert_pem: format!(
                "{}{}",
                crate::pem::encode("CERTIFICATE", cert.der()),
                self.intermediate_pem
            ),
        })
    }

    /// Issues the controller's own TLS server certificate, with a key generated here.
    ///
    /// SANs: DNS [`CONTROLLER_SERVER_NAME`], DNS [`ENROLL_SERVER_NAME`] and URI
    /// `spiffe://TD/controller`; EKU serverAuth. The chain is leaf + intermediate + root: the
    /// root is included on purpose so that an enrollee that pins only the root's fingerprint can
    /// find it in the chain and verify on first contact.
    pub fn issue_server(
        &self,
        validity: Duration,
        now: SystemTime,
    ) -> Result<ServerCredentials, PkiError> {
        let now = odt(now)?;
        let not_after = add(now, validity)?;
        if ts(not_after) > self.intermediate_not_after {
            return Err(CertificateError::OutlivesIssuer {
                requested: ts(not_after).0,
                issuer: self.intermediate_not_after.0,
            }
            .into());
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, CONTROLLER_SERVER_NAME);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            dns_san(CONTROLLER_SERVER_NAME)?,
            dns_san(ENROLL_SERVER_NAME)?,
            uri_san(self.trust_domain.controller_uri())?,
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let (serial_number, serial) = random_serial();
        params.serial_number = Some(serial_number);
        params.not_before = sub(now, CLOCK_SKEW)?;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;

        let cert = params.signed_by(&key, &self.issuer)?;
        tracing::info!(serial = %serial, "issued controller server certificate");
        let int_der = parse_single_pem(&self.intermediate_pem)?;
        Ok(ServerCredentials {
            chain: vec![cert.der().clone(), int_der, self.root_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }
}

/// Checks that `cert` is a CA certificate of `trust_domain`, signed by `issuer` (or by itself
/// when `issuer` is `None`).
fn check_ca(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    trust_domain: &TrustDomain,
    issuer: Option<&x509_parser::certificate::X509Certificate<'_>>,
) -> Result<(), CertificateError> {
    if !cert.is_ca() {
        return Err(CertificateError::NotCa);
    }
    let found = ca_trust_domain(cert)?;
    if &found != trust_domain {
        return Err(CertificateError::WrongTrustDomain {
            expected: trust_domain.clone(),
            found: found.to_string(),
        });
    }
    cert.verify_signature(issuer.map(|i| i.public_key()))
        .map_err(|_| CertificateError::NotSignedByIssuer)
}

/// Parses a CSR, checks its key kind and signature algorithm, and verifies its self-signature.
fn verify_csr(der: &[u8]) -> Result<CsrPublicKey, CsrError> {
    if der.is_empty() {
        return Err(CsrError::Empty);
    }
    if der.len() > MAX_CSR_SIZE {
        return Err(CsrError::TooLarge {
            size: der.len(),
            max: MAX_CSR_SIZE,
        });
    }
    let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|_| CsrError::Malformed)?;
    if !rest.is_empty() {
        return Err(CsrError::TrailingData);
    }
    let info = &csr.certification_request_info;
    if info.version.0 != 0 {
        return Err(CsrError::Malformed);
    }
    let spki = info.subject_pki.raw;
    let (key, expected_sig_oid, ring_alg): (
        CsrPublicKey,
        _,
        &'static dyn ring::signature::VerificationAlgorithm,
    ) = if spki.len() == P256_SPKI_PREFIX.len() + 64 && spki.starts_with(P256_SPKI_PREFIX) {
        (
            CsrPublicKey {
                raw: info.subject_pki.subject_public_key.data.to_vec(),
                alg: &rcgen::PKCS_ECDSA_P256_SHA256,
            },
            OID_SIG_ECDSA_WITH_SHA256,
            &ring::signature::ECDSA_P256_SHA256_ASN1,
        )
    } else if spki.len() == ED25519_SPKI_PREFIX.len() + 32 && spki.starts_with(ED25519_SPKI_PREFIX)
    {
        (
            CsrPublicKey {
                raw: info.subject_pki.subject_public_key.data.to_vec(),
                alg: &rcgen::PKCS_ED25519,
            },
            OID_SIG_ED25519,
            &ring::signature::ED25519,
        )
    } else {
        return Err(CsrError::UnsupportedKey);
    };
    if csr.signature_algorithm.algorithm != expected_sig_oid
        || csr.signature_algorithm.parameters.is_some()
    {
        return Err(CsrError::UnsupportedSignatureAlgorithm);
    }
    if csr.signature_value.unused_bits != 0 {
        return Err(CsrError::Malformed);
    }
    ring::signature::UnparsedPublicKey::new(ring_alg, &key.raw)
        .verify(info.raw, &csr.signature_value.data)
        .map_err(|_| CsrError::BadSignature)?;
    Ok(key)
}
