//! Reading certificates and keys back: who a certificate names, its serial and lifetime.
//!
//! These functions do not verify signatures or chains; rustls does that during the handshake.
//! They extract the identity from a certificate that has already been verified (or that the
//! caller produced itself), strictly: an Umbra identity certificate has exactly one URI SAN, and
//! it is a valid SPIFFE id.

use std::time::{SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use umbra_policies::Timestamp;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::csr::SecretString;
use crate::error::{CertificateError, KeyError, PkiError};
use crate::serial::Serial;
use crate::spiffe::{SpiffeId, TrustDomain};

/// The most certificates accepted in one PEM chain; Umbra chains have at most three.
pub const MAX_CHAIN_LEN: usize = 8;

/// What an identity certificate says about its subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The identity the certificate was issued to.
    pub spiffe: SpiffeId,
    /// The certificate's serial number, as the controller recorded it at issuance.
    pub serial: Serial,
    /// The end of the certificate's validity.
    pub not_after: Timestamp,
    /// The start of the certificate's validity.
    pub not_before: Timestamp,
}

impl PeerCert {
    /// What the certificate says, as the plain data the policy core's `admit` judges (the
    /// core never parses X.509). Umbra certificates carry no identity id, only the SPIFFE id.
    pub fn presented(&self) -> umbra_policies::Presented<'_> {
        umbra_policies::Presented {
            name: self.spiffe.name().as_str(),
            kind: self.spiffe.kind(),
            serial: self.serial.as_str(),
            identity: None,
            not_after: self.not_after,
        }
    }
}

/// Seconds since the Unix epoch of `t` (0 for times before 1970).
pub fn unix_timestamp(t: SystemTime) -> Timestamp {
    Timestamp(
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

/// Parses a DER certificate completely (no trailing bytes).
pub(crate) fn parse_x509(der: &[u8]) -> Result<X509Certificate<'_>, CertificateError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|_| CertificateError::Malformed)?;
    if !rest.is_empty() {
        return Err(CertificateError::TrailingData);
    }
    Ok(cert)
}

/// The URI SANs of a certificate.
pub(crate) fn uri_sans<'a>(
    cert: &'a X509Certificate<'_>,
) -> Result<Vec<&'a str>, CertificateError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| CertificateError::BadSubjectAltName)?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The trust domain named by a CA certificate's `spiffe://TD` URI SAN.
pub(crate) fn ca_trust_domain(cert: &X509Certificate<'_>) -> Result<TrustDomain, CertificateError> {
    let uris = uri_sans(cert)?;
    let [uri] = uris.as_slice() else {
        return Err(if uris.is_empty() {
            CertificateError::NoSpiffeId
        } else {
            CertificateError::SeveralUris(uris.len())
        });
    };
    TrustDomain::from_id_uri(uri).map_err(CertificateError::BadSpiffeId)
}

fn timestamp(t: &x509_parser::time::ASN1Time) -> Result<Timestamp, CertificateError> {
    u64::try_from(t.timestamp())
        .map(Timestamp)
        .map_err(|_| CertificateError::BadValidity)
}

/// Reads the identity, serial and validity from a DER identity certificate.
///
/// The certificate must have exactly one URI SAN and it must be a valid Umbra SPIFFE id. This
/// does not verify the certificate's signature: use it on certificates rustls has verified.
pub fn parse_peer_cert(der: &[u8]) -> Result<PeerCert, PkiError> {
    let cert = parse_x509(der)?;
    let uris = uri_sans(&cert)?;
    let uri = match uris.as_slice() {
        [] => return Err(CertificateError::NoSpiffeId.into()),
        [uri] => *uri,
        more => return Err(CertificateError::SeveralUris(more.len()).into()),
    };
    let spiffe = uri
        .parse::<SpiffeId>()
        .map_err(CertificateError::BadSpiffeId)?;
    let validity = cert.validity();
    Ok(PeerCert {
        spiffe,
        serial: Serial::from_bytes(cert.raw_serial()),
        not_before: timestamp(&validity.not_before)?,
        not_after: timestamp(&validity.not_after)?,
    })
}

/// Parses PEM text holding one or more certificates (a chain, leaf first), checking that each
/// is a well-formed X.509 certificate. Anything in the text that is not a certificate (comments,
/// other PEM sections) is ignored.
pub fn parse_pem_chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let mut chain = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let der = item?;
        parse_x509(&der)?;
        chain.push(der);
        if chain.len() > MAX_CHAIN_LEN {
            return Err(CertificateError::TooManyCertificates(chain.len()).into());
        }
    }
    if chain.is_empty() {
        return Err(CertificateError::NoCertificates.into());
    }
    Ok(chain)
}

/// Parses exactly one certificate from PEM text.
pub(crate) fn parse_single_pem(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    let mut chain = parse_pem_chain(pem)?;
    if chain.len() != 1 {
        return Err(CertificateError::NotExactlyOne(chain.len()).into());
    }
    Ok(chain.remove(0))
}

/// Parses a PEM private key (PKCS#8, SEC1 or PKCS#1) for rustls. The error never says anything
/// about the key's content.
pub fn parse_private_key_pem(pem: &SecretString) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.expose().as_bytes()).map_err(|e| {
        PkiError::Key(match e {
            pem::Error::NoItemsFound => KeyError::NotAPrivateKey,
            _ => KeyError::Malformed,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn self_signed(sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().expect("ia5"))
    }

    #[test]
    fn peer_cert_needs_exactly_one_spiffe_uri() {
        let ok = self_signed(vec![
            uri("spiffe://umbra.local/agent/a1"),
            SanType::DnsName("x.example".try_into().expect("ia5")),
        ]);
        let p = parse_peer_cert(&ok).expect("parse");
        assert_eq!(p.spiffe.to_string(), "spiffe://umbra.local/agent/a1");
        assert!(p.not_before < p.not_after);

        let none = self_signed(vec![]);
        assert!(matches!(
            parse_peer_cert(&none),
            Err(PkiError::Certificate(CertificateError::NoSpiffeId))
        ));
        let two = self_signed(vec![
            uri("spiffe://umbra.local/agent/a1"),
            uri("spiffe://umbra.local/agent/a2"),
        ]);
        assert!(matches!(
            parse_peer_cert(&two),
            Err(PkiError::Certificate(CertificateError::SeveralUris(2)))
        ));
        let bad = self_signed(vec![uri("spiffe://umbra.local/controller")]);
        assert!(matches!(
            parse_peer_cert(&bad),
            Err(PkiError::Certificate(CertificateError::BadSpiffeId(_)))
        ));
        assert!(matches!(
            parse_peer_cert(b"garbage"),
            Err(PkiError::Certificate(CertificateError::Malformed))
        ));
        let mut trailing = ok.clone();
        trailing.push(0);
        assert!(matches!(
            parse_peer_cert(&trailing),
            Err(PkiError::Certificate(CertificateError::TrailingData))
        ));
    }

    #[test]
    fn pem_chains() {
        let a = self_signed(vec![]);
        let b = self_signed(vec![]);
        let pem = format!(
            "{}{}",
            crate::pem::encode("CERTIFICATE", &a),
            crate::pem::encode("CERTIFICATE", &b)
        );
        let chain = parse_pem_chain(&pem).expect("chain");
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].as_ref(), a.as_slice());
        assert!(matches!(
            parse_single_pem(&pem),
            Err(PkiError::Certificate(CertificateError::NotExactlyOne(2)))
        ));
        assert!(matches!(
            parse_pem_chain(""),
            Err(PkiError::Certificate(CertificateError::NoCertificates))
        ));
        let not_a_cert = crate::pem::encode("CERTIFICATE", b"nope");
        assert!(matches!(
            parse_pem_chain(&not_a_cert),
            Err(PkiError::Certificate(CertificateError::Malformed))
        ));
        let many = crate::pem::encode("CERTIFICATE", &a).repeat(MAX_CHAIN_LEN + 1);
        assert!(matches!(
            parse_pem_chain(&many),
            Err(PkiError::Certificate(
                CertificateError::TooManyCertificates(_)
            ))
        ));
    }

    #[test]
    fn private_keys() {
        let key = KeyPair::generate().expect("key");
        let pem = SecretString::new(key.serialize_pem());
        assert!(matches!(
            parse_private_key_pem(&pem),
            Ok(PrivateKeyDer::Pkcs8(_))
        ));
        assert!(matches!(
            parse_private_key_pem(&SecretString::new("nothing".into())),
            Err(PkiError::Key(KeyError::NotAPrivateKey))
        ));
    }
}
