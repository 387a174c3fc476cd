//! The enrollee's side of issuance: generate a key pair locally and ask for a certificate with a
//! CSR, so that the private key never leaves the machine.

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use crate::error::{KeyError, PkiError};

/// The longest common name put in a CSR (the X.520 upper bound).
const MAX_CN_LEN: usize = 64;

/// A secret string (a PEM private key), wiped from memory when dropped.
///
/// `Debug` prints `"..."` so that a secret cannot reach a log line through `{:?}`; equality is
/// constant-time. Serialization writes the secret in clear: it exists so that an identity file
/// can hold its key, and that file is written 0600.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps `s`; the caller should not keep other copies.
    pub fn new(s: String) -> SecretString {
        SecretString(s)
    }

    /// The secret itself. Every use of this is a place where the secret could leak: keep it to
    /// handing the secret to a parser.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretString {
    fn from(s: String) -> SecretString {
        SecretString(s)
    }
}

impl Drop for SecretString {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"...\"")
    }
}

impl PartialEq for SecretString {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for SecretString {}

/// A freshly generated private key (PKCS#8 PEM) and a CSR for it (DER).
#[derive(Debug)]
pub struct KeyAndCsr {
    /// The private key, PKCS#8 PEM. Store it 0600; never send it.
    pub key_pem: SecretString,
    /// The certification request to send to the controller.
    pub csr_der: Vec<u8>,
}

/// Generates an ECDSA P-256 key pair and a CSR signed with it.
///
/// `name_hint` becomes the CSR's common name for the benefit of a human reading the request; the
/// CA ignores it and decides the certificate's subject itself.
pub fn generate_key_and_csr(name_hint: &str) -> Result<KeyAndCsr, PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr_der = csr_with(&key, name_hint)?;
    Ok(KeyAndCsr {
        key_pem: SecretString(key.serialize_pem()),
        csr_der,
    })
}

/// A new CSR for an existing key, to renew a certificate without changing the key.
///
/// The key must be PKCS#8 PEM, EC P-256 or Ed25519 (the two kinds the CA accepts).
pub fn csr_for_key(key_pem: &SecretString, name_hint: &str) -> Result<Vec<u8>, PkiError> {
    let key = load_key_pair(key_pem)?;
    csr_with(&key, name_hint)
}

/// Parses a PKCS#8 PEM key of a kind the CA accepts, without revealing anything about the key in
/// the error.
pub(crate) fn load_key_pair(key_pem: &SecretString) -> Result<KeyPair, KeyError> {
    if !key_pem.expose().contains("-----BEGIN PRIVATE KEY-----") {
        return Err(KeyError::NotAPrivateKey);
    }
    let key = KeyPair::from_pem(key_pem.expose()).map_err(|e| match e {
        rcgen::Error::UnsupportedSignatureAlgorithm => KeyError::UnsupportedAlgorithm,
        _ => KeyError::Malformed,
    })?;
    let alg = key.algorithm();
    if alg != &rcgen::PKCS_ECDSA_P256_SHA256 && alg != &rcgen::PKCS_ED25519 {
        return Err(KeyError::UnsupportedAlgorithm);
    }
    Ok(key)
}

fn csr_with(key: &KeyPair, name_hint: &str) -> Result<Vec<u8>, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let cn: String = name_hint
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(MAX_CN_LEN)
        .collect();
    if !cn.trim().is_empty() {
        dn.push(DnType::CommonName, cn.trim());
    }
    params.distinguished_name = dn;
    let csr = params.serialize_request(key)?;
    Ok(csr.der().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::FromDer;

    #[test]
    fn secret_string_is_redacted_and_compared() {
        let s = SecretString::new("hunter2".into());
        assert_eq!(format!("{s:?}"), "\"...\"");
        assert_eq!(s, SecretString::from("hunter2".to_owned()));
        assert_ne!(s, SecretString::from("hunter3".to_owned()));
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn generated_csr_verifies_and_renewal_keeps_the_key() {
        let k = generate_key_and_csr("agent-1").expect("generate");
        let (rest, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&k.csr_der)
                .expect("parse");
        assert!(rest.is_empty());
        csr.verify_signature().expect("self-signature");
        let renewed = csr_for_key(&k.key_pem, "agent-1").expect("renew");
        let (_, csr2) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&renewed)
                .expect("parse");
        assert_eq!(
            csr.certification_request_info.subject_pki.raw,
            csr2.certification_request_info.subject_pki.raw
        );
        assert!(format!("{k:?}").contains("..."));
        assert!(!format!("{k:?}").contains("PRIVATE"));
    }

    #[test]
    fn refuses_bad_keys() {
        let bad = SecretString::new("not a key".into());
        assert!(matches!(
            csr_for_key(&bad, "x"),
            Err(PkiError::Key(KeyError::NotAPrivateKey))
        ));
        let garbled = SecretString::new(
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
        );
        assert!(matches!(csr_for_key(&garbled, "x"), Err(PkiError::Key(_))));
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("p384");
        let p384 = SecretString::new(p384.serialize_pem());
        assert!(matches!(
            csr_for_key(&p384, "x"),
            Err(PkiError::Key(KeyError::UnsupportedAlgorithm))
        ));
    }
}
