//! The certificate authority: generation, persistence, and what it will and will not sign.

mod common;

use std::fs;
use std::time::{Duration, SystemTime};

use common::{ca, name, td, DAY};
use rcgen::{CertificateParams, DnType, KeyPair, SanType, SigningKey};
use umbra_pki::{
    fingerprint, generate_key_and_csr, parse_peer_cert, parse_pem_chain, unix_timestamp,
    CertificateAuthority, CertificateError, CsrError, PkiError, SpiffeId, TrustDomain,
    CONTROLLER_SERVER_NAME, ENROLL_SERVER_NAME, MAX_CSR_SIZE,
};
use umbra_policies::IdentityKind;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

fn agent(n: &str) -> SpiffeId {
    SpiffeId::new(&td(), IdentityKind::Agent, &name(n))
}

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn generate_save_load_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca");
    let ca = ca();
    assert!(ca.has_root_key());
    ca.save(&ca_dir).expect("save");
    for f in ["ca.crt", "root.key", "intermediate.crt", "intermediate.key"] {
        assert!(ca_dir.join(f).is_file(), "{f}");
    }
    #[cfg(unix)]
    {
        assert_eq!(mode(&ca_dir.join("root.key")), 0o600);
        assert_eq!(mode(&ca_dir.join("intermediate.key")), 0o600);
        assert_eq!(mode(&ca_dir), 0o700);
    }
    let loaded = CertificateAuthority::load(&ca_dir, &td()).expect("load");
    assert_eq!(loaded.fingerprint(), ca.fingerprint());
    assert_eq!(loaded.root_pem(), ca.root_pem());
    assert_eq!(loaded.root_der(), ca.root_der());
    assert_eq!(loaded.intermediate_pem(), ca.intermediate_pem());
    assert_eq!(loaded.trust_domain(), &td());
    assert_eq!(loaded.fingerprint(), fingerprint(ca.root_der()));
    assert!(loaded.has_root_key());

    // The loaded CA issues certificates that chain to the same root.
    let k = generate_key_and_csr("a1").expect("csr");
    let issued = loaded
        .issue(&k.csr_der, &agent("a1"), DAY, SystemTime::now())
        .expect("issue");
    let chain = parse_pem_chain(&issued.cert_pem).expect("chain");
    let (_, int) = X509Certificate::from_der(&chain[1]).expect("intermediate");
    let (_, leaf) = X509Certificate::from_der(&chain[0]).expect("leaf");
    leaf.verify_signature(Some(int.public_key()))
        .expect("leaf signed by intermediate");

    // Debug never shows a key.
    let dbg = format!("{ca:?}");
    assert!(!dbg.contains("PRIVATE"), "{dbg}");
    assert!(dbg.contains("..."));
}

#[test]
fn root_key_can_stay_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca();
    ca.save(dir.path()).expect("save");
    fs::rename(dir.path().join("root.key"), dir.path().join("offline.key")).expect("mv");
    let loaded = CertificateAuthority::load(dir.path(), &td()).expect("load without root key");
    assert!(!loaded.has_root_key());
    let k = generate_key_and_csr("a1").expect("csr");
    loaded
        .issue(&k.csr_der, &agent("a1"), DAY, SystemTime::now())
        .expect("issue without root key");
    let out = tempfile::tempdir().expect("tempdir");
    loaded.save(out.path()).expect("save");
    assert!(!out.path().join("root.key").exists());
}

fn expect_file_error(err: PkiError, file: &str) -> PkiError {
    match err {
        PkiError::File { path, cause } => {
            assert!(path.ends_with(file), "{} vs {file}", path.display());
            *cause
        }
        PkiError::Io { path, .. } => {
            assert!(path.ends_with(file), "{} vs {file}", path.display());
            PkiError::Io {
                path,
                source: std::io::ErrorKind::NotFound.into(),
            }
        }
        other => panic!("expected an error naming {file}, got {other:?}"),
    }
}

#[test]
fn load_names_the_missing_or_bad_file() {
    let ca = ca();
    let fresh = || {
        let dir = tempfile::tempdir().expect("tempdir");
        ca.save(dir.path()).expect("save");
        dir
    };

    for f in ["ca.crt", "intermediate.crt", "intermediate.key"] {
        let dir = fresh();
        fs::remove_file(dir.path().join(f)).expect("rm");
        let err = CertificateAuthority::load(dir.path(), &td()).expect_err("missing file");
        assert!(err.to_string().contains(f), "{err}");
        assert!(matches!(expect_file_error(err, f), PkiError::Io { .. }));
    }

    let dir = fresh();
    fs::write(dir.path().join("ca.crt"), "garbage").expect("write");
    let err = CertificateAuthority::load(dir.path(), &td()).expect_err("bad root");
    assert!(err.to_string().contains("ca.crt"), "{err}");
    assert!(matches!(
        expect_file_error(err, "ca.crt"),
        PkiError::Certificate(CertificateError::NoCertificates)
    ));

    let dir = fresh();
    fs::write(dir.path().join("intermediate.key"), "garbage").expect("write");
    let err = CertificateAuthority::load(dir.path(), &td()).expect_err("bad key");
    assert!(matches!(
        expect_file_error(err, "intermediate.key"),
        PkiError::Key(_)
    ));

    // The right files for another trust domain.
    let dir = fresh();
    let other: TrustDomain = "other.local".parse().expect("td");
    let err = CertificateAuthority::load(dir.path(), &other).expect_err("wrong trust domain");
    assert!(matches!(
        expect_file_error(err, "ca.crt"),
        PkiError::Certificate(CertificateError::WrongTrustDomain { .. })
    ));

    // Files mixed from two CAs.
    let other_ca = common::ca();
    let other_dir = tempfile::tempdir().expect("tempdir");
    other_ca.save(other_dir.path()).expect("save");

    let dir = fresh();
    fs::copy(
        other_dir.path().join("intermediate.key"),
        dir.path().join("intermediate.key"),
    )
    .expect("cp");
    let err = CertificateAuthority::load(dir.path(), &td()).expect_err("key mismatch");
    assert!(matches!(
        expect_file_error(err, "intermediate.key"),
        PkiError::Certificate(CertificateError::KeyMismatch)
    ));

    let dir = fresh();
    fs::copy(
        other_dir.path().join("root.key"),
        dir.path().join("root.key"),
    )
    .expect("cp");
    let err = CertificateAuthority::load(dir.path(), &td()).expect_err("root key mismatch");
    assert!(matches!(
        expect_file_error(err, "root.key"),
        PkiError::Certificate(CertificateError::KeyMismatch)
    ));

    let dir = fresh();
    for f in ["intermediate.crt", "intermediate.key"] {
        fs::copy(other_dir.path().join(f), dir.path().join(f)).expect("cp");
    }
    let err = CertificateAuthority::load(dir.path(), &td()).expect_err("foreign intermediate");
    assert!(matches!(
        expect_file_error(err, "intermediate.crt"),
        PkiError::Certificate(CertificateError::NotSignedByIssuer)
    ));

    // A leaf certificate where the root should be.
    let dir = fresh();
    let k = generate_key_and_csr("a1").expect("csr");
    let issued = ca
        .issue(&k.csr_der, &agent("a1"), DAY, SystemTime::now())
        .expect("issue");
    let leaf_pem = issued
        .cert_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .expect("leaf pem")
        .to_owned();
    fs::write(dir.path().join("ca.crt"), leaf_pem).expect("write");
    let err = CertificateAuthority::load(dir.path(), &td()).expect_err("leaf as root");
    assert!(matches!(
        expect_file_error(err, "ca.crt"),
        PkiError::Certificate(CertificateError::NotCa)
    ));
}

fn sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .expect("san")
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::URI(u) => format!("URI:{u}"),
                    GeneralName::DNSName(d) => format!("DNS:{d}"),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A CSR that asks for much more than it should get.
fn greedy_csr(key: &KeyPair) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "root-of-all-evil");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Evil Corp");
    params.subject_alt_names = vec![
        SanType::URI("spiffe://umbra.local/admin/boss".try_into().expect("ia5")),
        SanType::DnsName(CONTROLLER_SERVER_NAME.try_into().expect("ia5")),
        SanType::DnsName("*.example.com".try_into().expect("ia5")),
    ];
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::CodeSigning,
    ];
    params.serialize_request(key).expect("csr").der().to_vec()
}

#[test]
fn issued_leaf_is_decided_by_the_ca_not_the_csr() {
    let ca = ca();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let now = SystemTime::now();
    let validity = Duration::from_secs(3600);
    let issued = ca
        .issue(&greedy_csr(&key), &agent("a1"), validity, now)
        .expect("issue");

    let chain = parse_pem_chain(&issued.cert_pem).expect("chain");
    assert_eq!(chain.len(), 2, "leaf then intermediate");
    assert_eq!(
        parse_pem_chain(ca.intermediate_pem()).expect("int")[0],
        chain[1]
    );
    let (_, cert) = X509Certificate::from_der(&chain[0]).expect("parse");

    assert_eq!(sans(&cert), vec!["URI:spiffe://umbra.local/agent/a1"]);
    let cn: Vec<_> = cert
        .subject()
        .iter_common_name()
        .map(|c| c.as_str().expect("utf8").to_owned())
        .collect();
    assert_eq!(cn, vec!["a1"]);
    assert!(cert.subject().iter_organization().next().is_none());
    assert!(!cert.is_ca());
    let ku = cert.key_usage().expect("ku").expect("ku present").value;
    assert!(ku.digital_signature());
    assert!(!ku.key_cert_sign() && !ku.crl_sign());
    let eku = cert
        .extended_key_usage()
        .expect("eku")
        .expect("eku present")
        .value;
    assert!(eku.client_auth);
    assert!(!eku.server_auth && !eku.code_signing && !eku.any);
    assert!(!cert
        .extensions()
        .iter()
        .any(|e| matches!(e.parsed_extension(), ParsedExtension::NameConstraints(_))));

    // The public key is the CSR's.
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );

    // Serial: positive, 128 bits, recorded as the certificate has it.
    assert_eq!(cert.raw_serial().len(), 16);
    assert!(cert.raw_serial()[0] < 0x80);
    let peer = parse_peer_cert(&chain[0]).expect("peer");
    assert_eq!(peer.serial, issued.serial);
    assert_eq!(peer.spiffe, agent("a1"));

    // Validity: five minutes of back-dating, then exactly `validity`.
    let now_ts = unix_timestamp(now).0;
    assert_eq!(peer.not_before.0, now_ts - 300);
    assert_eq!(peer.not_after.0, now_ts + 3600);
    assert_eq!(issued.not_after, peer.not_after);

    // Two issuances never share a serial.
    let again = ca
        .issue(&greedy_csr(&key), &agent("a1"), validity, now)
        .expect("issue");
    assert_ne!(again.serial, issued.serial);
}

#[test]
fn routers_also_get_server_auth() {
    let ca = ca();
    let k = generate_key_and_csr("r1").expect("csr");
    let id = SpiffeId::new(&td(), IdentityKind::Router, &name("r1"));
    let issued = ca
        .issue(&k.csr_der, &id, DAY, SystemTime::now())
        .expect("issue");
    let chain = parse_pem_chain(&issued.cert_pem).expect("chain");
    let (_, cert) = X509Certificate::from_der(&chain[0]).expect("parse");
    let eku = cert.extended_key_usage().expect("eku").expect("eku").value;
    assert!(eku.client_auth && eku.server_auth);
    assert_eq!(sans(&cert), vec!["URI:spiffe://umbra.local/router/r1"]);
}

#[test]
fn ed25519_csr_is_accepted() {
    let ca = ca();
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .expect("csr");
    let issued = ca
        .issue(csr.der(), &agent("ed"), DAY, SystemTime::now())
        .expect("issue");
    let chain = parse_pem_chain(&issued.cert_pem).expect("chain");
    let (_, cert) = X509Certificate::from_der(&chain[0]).expect("parse");
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
}

/// Minimal DER writer for hand-built CSRs.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

const ECDSA_SHA256_ALG: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];
const ED25519_ALG: &[u8] = &[0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];

/// The CertificationRequestInfo of a CSR made with `subject_key`.
fn request_info(subject_key: &KeyPair) -> Vec<u8> {
    let csr = CertificateParams::default()
        .serialize_request(subject_key)
        .expect("csr");
    let (_, parsed) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr.der())
            .expect("parse");
    parsed.certification_request_info.raw.to_vec()
}

/// A CSR whose info is `info`, signed by `signer` and labelled with `alg`.
fn assemble(info: &[u8], alg: &[u8], signer: &KeyPair) -> Vec<u8> {
    let sig = signer.sign(info).expect("sign");
    let mut bits = vec![0u8];
    bits.extend(sig);
    let mut body = info.to_vec();
    body.extend_from_slice(alg);
    body.extend(der(0x03, &bits));
    der(0x30, &body)
}

#[test]
fn csr_without_proof_of_possession_is_refused() {
    let ca = ca();
    let now = SystemTime::now();
    let victim = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let attacker = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let info = request_info(&victim);

    // Sanity: the hand-built CSR is accepted when the key's owner signs it.
    let honest = assemble(&info, ECDSA_SHA256_ALG, &victim);
    ca.issue(&honest, &agent("a1"), DAY, now)
        .expect("hand-built CSR signed by its own key");

    // Someone else's public key, signed with the attacker's key.
    let forged = assemble(&info, ECDSA_SHA256_ALG, &attacker);
    assert!(matches!(
        ca.issue(&forged, &agent("a1"), DAY, now),
        Err(PkiError::Csr(CsrError::BadSignature))
    ));

    // A valid CSR with one signature byte changed.
    let mut flipped = generate_key_and_csr("a1").expect("csr").csr_der;
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    assert!(matches!(
        ca.issue(&flipped, &agent("a1"), DAY, now),
        Err(PkiError::Csr(CsrError::BadSignature))
    ));

    // A valid CSR with a byte of the signed info (the subject) changed.
    let k = generate_key_and_csr("aaaa").expect("csr");
    let mut edited = k.csr_der.clone();
    let pos = edited
        .windows(4)
        .position(|w| w == b"aaaa")
        .expect("CN in CSR");
    edited[pos] = b'b';
    assert!(matches!(
        ca.issue(&edited, &agent("a1"), DAY, now),
        Err(PkiError::Csr(CsrError::BadSignature))
    ));
}

#[test]
fn csr_with_refused_algorithms() {
    let ca = ca();
    let now = SystemTime::now();

    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
    let csr = CertificateParams::default()
        .serialize_request(&p384)
        .expect("csr");
    assert!(matches!(
        ca.issue(csr.der(), &agent("a1"), DAY, now),
        Err(PkiError::Csr(CsrError::UnsupportedKey))
    ));

    // An Ed25519 key, but the signature claims to be ECDSA (made with another key).
    let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mixed = assemble(&request_info(&ed), ECDSA_SHA256_ALG, &p256);
    assert!(matches!(
        ca.issue(&mixed, &agent("a1"), DAY, now),
        Err(PkiError::Csr(CsrError::UnsupportedSignatureAlgorithm))
    ));
    // A P-256 key with an Ed25519 label.
    let mixed = assemble(&request_info(&p256), ED25519_ALG, &ed);
    assert!(matches!(
        ca.issue(&mixed, &agent("a1"), DAY, now),
        Err(PkiError::Csr(CsrError::UnsupportedSignatureAlgorithm))
    ));
}

#[test]
fn garbage_and_oversized_csrs_are_refused() {
    let ca = ca();
    let now = SystemTime::now();
    let issue = |csr: &[u8]| ca.issue(csr, &agent("a1"), DAY, now);
    assert!(matches!(issue(&[]), Err(PkiError::Csr(CsrError::Empty))));
    assert!(matches!(
        issue(b"definitely not a CSR"),
        Err(PkiError::Csr(CsrError::Malformed))
    ));
    assert!(matches!(
        issue(&vec![0x30; MAX_CSR_SIZE + 1]),
        Err(PkiError::Csr(CsrError::TooLarge { .. }))
    ));
    let good = generate_key_and_csr("a1").expect("csr").csr_der;
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0, 0]);
    assert!(matches!(
        issue(&trailing),
        Err(PkiError::Csr(CsrError::TrailingData))
    ));
    assert!(matches!(
        issue(&good[..good.len() - 1]),
        Err(PkiError::Csr(CsrError::Malformed))
    ));
    // A certificate is not a CSR.
    assert!(matches!(
        issue(ca.root_der()),
        Err(PkiError::Csr(CsrError::Malformed))
    ));
    issue(&good).expect("the untouched CSR is fine");
}

#[test]
fn issue_refuses_foreign_trust_domain_and_overlong_lifetimes() {
    let ca = ca();
    let now = SystemTime::now();
    let csr = generate_key_and_csr("a1").expect("csr").csr_der;
    let other: TrustDomain = "other.local".parse().expect("td");
    let foreign = SpiffeId::new(&other, IdentityKind::Agent, &name("a1"));
    assert!(matches!(
        ca.issue(&csr, &foreign, DAY, now),
        Err(PkiError::Certificate(
            CertificateError::WrongTrustDomain { .. }
        ))
    ));
    assert!(matches!(
        ca.issue(&csr, &agent("a1"), DAY * 365 * 6, now),
        Err(PkiError::Certificate(
            CertificateError::OutlivesIssuer { .. }
        ))
    ));
    assert!(matches!(
        ca.issue(&csr, &agent("a1"), Duration::MAX, now),
        Err(PkiError::Certificate(CertificateError::BadValidity))
    ));
}

#[test]
fn controller_server_certificate() {
    let ca = ca();
    let creds = ca
        .issue_server(DAY * 30, SystemTime::now())
        .expect("server");
    assert_eq!(creds.chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(&creds.chain[2], ca.root_der());
    assert_eq!(fingerprint(&creds.chain[2]), ca.fingerprint());
    let (_, leaf) = X509Certificate::from_der(&creds.chain[0]).expect("parse");
    assert_eq!(
        sans(&leaf),
        vec![
            format!("DNS:{CONTROLLER_SERVER_NAME}"),
            format!("DNS:{ENROLL_SERVER_NAME}"),
            "URI:spiffe://umbra.local/controller".to_owned(),
        ]
    );
    let eku = leaf.extended_key_usage().expect("eku").expect("eku").value;
    assert!(eku.server_auth && !eku.client_auth);
    // The controller's certificate does not parse as an identity.
    assert!(parse_peer_cert(&creds.chain[0]).is_err());
    let dbg = format!("{creds:?}");
    assert!(dbg.contains("...") && !dbg.contains("Pkcs8"), "{dbg}");

    let (_, root) = X509Certificate::from_der(&creds.chain[2]).expect("root");
    let (_, int) = X509Certificate::from_der(&creds.chain[1]).expect("int");
    let bc = |c: &X509Certificate<'_>| {
        c.basic_constraints()
            .expect("bc")
            .expect("bc present")
            .value
            .path_len_constraint
    };
    assert_eq!(bc(&root), Some(1));
    assert_eq!(bc(&int), Some(0));
    for c in [&root, &int] {
        let ku = c.key_usage().expect("ku").expect("ku").value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
        assert_eq!(sans(c), vec!["URI:spiffe://umbra.local"]);
    }
}
