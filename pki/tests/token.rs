//! Enrollment tokens: what is accepted, and that everything else is refused for the right reason.

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ed25519_dalek::Signer as _;
use rustls_pki_types::pem::PemObject;
use umbra_pki::{
    decode_unverified, fingerprint, new_nonce, EnrollmentClaims, Malformation, TokenError,
    TokenSigner, MAX_TOKEN_LEN,
};
use umbra_policies::{IdentityId, IdentityKind, Name, Timestamp};

const NOW: Timestamp = Timestamp(1_700_000_000);

fn claims() -> EnrollmentClaims {
    EnrollmentClaims {
        iss: "controller.example:7443".into(),
        sub: IdentityId::new("id-1").expect("id"),
        name: Name::new("agent-1").expect("name"),
        kind: IdentityKind::Agent,
        td: "umbra.local".parse().expect("td"),
        ca: fingerprint(b"root"),
        iat: NOW,
        exp: NOW.plus(3600),
        jti: new_nonce(),
    }
}

fn parts(token: &str) -> Vec<String> {
    token.split('.').map(str::to_owned).collect()
}

fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// The signer's raw key, read back from its PKCS#8 file, to forge tokens with exactly the
/// content a test needs but a valid signature.
fn raw_key(signer: &TokenSigner) -> ed25519_dalek::SigningKey {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("k");
    signer.save(&path).expect("save");
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_file(&path).expect("pem");
    let seed: [u8; 32] = der.secret_pkcs8_der()[16..].try_into().expect("seed");
    ed25519_dalek::SigningKey::from_bytes(&seed)
}

fn forge(key: &ed25519_dalek::SigningKey, header: &[u8], payload: &[u8]) -> String {
    let signed = format!("{}.{}", b64(header), b64(payload));
    let sig = key.sign(signed.as_bytes());
    format!("{signed}.{}", b64(&sig.to_bytes()))
}

#[test]
fn round_trip() {
    let signer = TokenSigner::generate();
    let c = claims();
    let token = signer.sign(&c);
    assert!(token.len() < MAX_TOKEN_LEN);
    assert_eq!(signer.verifying_key().verify(&token, NOW), Ok(c.clone()));
    assert_eq!(
        signer.verifying_key().verify(&token, NOW.plus(3599)),
        Ok(c.clone())
    );
    assert_eq!(decode_unverified(&token), Ok(c));
    assert_eq!(
        String::from_utf8(URL_SAFE_NO_PAD.decode(&parts(&token)[0]).expect("b64")).expect("utf8"),
        r#"{"alg":"EdDSA","typ":"JWT"}"#
    );
}

#[test]
fn tampered_payload_and_signature() {
    let signer = TokenSigner::generate();
    let verifier = signer.verifying_key();
    let token = signer.sign(&claims());
    let p = parts(&token);

    let mut evil = claims();
    evil.kind = IdentityKind::Admin;
    let evil_payload = b64(&serde_json::to_vec(&evil).expect("json"));
    let tampered = format!("{}.{}.{}", p[0], evil_payload, p[2]);
    assert_eq!(
        verifier.verify(&tampered, NOW),
        Err(TokenError::BadSignature)
    );
    // The enrollee's unverified read still parses it: it must only use iss and ca.
    assert!(decode_unverified(&tampered).is_ok());

    let mut sig = URL_SAFE_NO_PAD.decode(&p[2]).expect("b64");
    sig[10] ^= 0x20;
    let tampered = format!("{}.{}.{}", p[0], p[1], b64(&sig));
    assert_eq!(
        verifier.verify(&tampered, NOW),
        Err(TokenError::BadSignature)
    );

    let other = TokenSigner::generate();
    assert_eq!(
        other.verifying_key().verify(&token, NOW),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn other_algorithms_are_refused() {
    let signer = TokenSigner::generate();
    let verifier = signer.verifying_key();
    let key = raw_key(&signer);
    let payload = serde_json::to_vec(&claims()).expect("json");

    // alg=none with an empty signature, as the classic attack sends it.
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(&payload)
    );
    assert_eq!(
        verifier.verify(&none, NOW),
        Err(TokenError::UnsupportedAlgorithm)
    );
    assert_eq!(
        decode_unverified(&none),
        Err(TokenError::UnsupportedAlgorithm)
    );

    // HS256, even with a valid EdDSA signature over the text.
    let hs = forge(&key, br#"{"alg":"HS256","typ":"JWT"}"#, &payload);
    assert_eq!(
        verifier.verify(&hs, NOW),
        Err(TokenError::UnsupportedAlgorithm)
    );

    // The right algorithm but any other header is refused too: extra fields, other order,
    // whitespace.
    for header in [
        &br#"{"alg":"EdDSA","typ":"JWT","kid":"x"}"#[..],
        br#"{"typ":"JWT","alg":"EdDSA"}"#,
        br#"{"alg":"EdDSA", "typ":"JWT"}"#,
        br#"{"alg":"EdDSA"}"#,
        b"not json",
    ] {
        let t = forge(&key, header, &payload);
        assert_eq!(
            verifier.verify(&t, NOW),
            Err(TokenError::Malformed(Malformation::Header)),
            "{}",
            String::from_utf8_lossy(header)
        );
    }
}

#[test]
fn lifetime() {
    let signer = TokenSigner::generate();
    let verifier = signer.verifying_key();
    let token = signer.sign(&claims());
    assert_eq!(
        verifier.verify(&token, NOW.plus(3600)),
        Err(TokenError::Expired)
    );
    assert_eq!(
        verifier.verify(&token, NOW.plus(100_000)),
        Err(TokenError::Expired)
    );
    // Issued in the future (beyond the allowed skew).
    assert_eq!(
        verifier.verify(&token, Timestamp(NOW.0 - 61)),
        Err(TokenError::NotYetValid)
    );
    assert!(verifier.verify(&token, Timestamp(NOW.0 - 60)).is_ok());

    let mut backwards = claims();
    backwards.exp = backwards.iat;
    assert_eq!(
        verifier.verify(&signer.sign(&backwards), NOW),
        Err(TokenError::BadLifetime)
    );
}

#[test]
fn size_and_encoding() {
    let signer = TokenSigner::generate();
    let verifier = signer.verifying_key();
    let key = raw_key(&signer);
    let token = signer.sign(&claims());
    let p = parts(&token);

    let mut big = claims();
    big.iss = "a".repeat(MAX_TOKEN_LEN);
    let big = signer.sign(&big);
    assert_eq!(verifier.verify(&big, NOW), Err(TokenError::TooLarge));
    assert_eq!(decode_unverified(&big), Err(TokenError::TooLarge));

    let malformed = |t: &str| match verifier.verify(t, NOW) {
        Err(TokenError::Malformed(m)) => m,
        other => panic!("{t}: expected Malformed, got {other:?}"),
    };
    assert_eq!(malformed(""), Malformation::Segments);
    assert_eq!(
        malformed(&format!("{}.{}", p[0], p[1])),
        Malformation::Segments
    );
    assert_eq!(malformed(&format!("{token}.x")), Malformation::Segments);
    assert_eq!(
        malformed(&format!("{}=.{}.{}", p[0], p[1], p[2])),
        Malformation::HeaderEncoding
    );
    // Padded base64url of the signature (64 bytes need one '=' of padding).
    let sig = URL_SAFE_NO_PAD.decode(&p[2]).expect("b64");
    assert_eq!(
        malformed(&format!("{}.{}.{}", p[0], p[1], URL_SAFE.encode(&sig))),
        Malformation::SignatureEncoding
    );
    // Standard (not URL-safe) alphabet characters.
    assert_eq!(
        malformed(&format!("{}.{}.{}+", p[0], p[1], &p[2][..p[2].len() - 1])),
        Malformation::SignatureEncoding
    );
    // Non-canonical trailing bits: the last character of 64 bytes encodes 4 bits, the rest must
    // be zero.
    let last = p[2].chars().last().expect("last");
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let idx = alphabet.find(last).expect("in alphabet");
    let sloppy = alphabet.chars().nth(idx | 1).expect("char");
    assert_ne!(sloppy, last, "the canonical last char has zero low bits");
    assert_eq!(
        malformed(&format!(
            "{}.{}.{}{sloppy}",
            p[0],
            p[1],
            &p[2][..p[2].len() - 1]
        )),
        Malformation::SignatureEncoding
    );
    assert_eq!(
        malformed(&format!("{}.{}.{}", p[0], p[1], b64(&[0u8; 63]))),
        Malformation::SignatureEncoding
    );
    // Payload that is not base64, and payload that is not claims, both validly signed.
    assert_eq!(
        malformed(&format!(
            "{}.{}",
            format_args!("{}.*", p[0]),
            b64(&key.sign(format!("{}.*", p[0]).as_bytes()).to_bytes())
        )),
        Malformation::PayloadEncoding
    );
    let header = br#"{"alg":"EdDSA","typ":"JWT"}"#;
    let mut extra = serde_json::to_value(claims()).expect("json");
    extra["admin"] = serde_json::Value::Bool(true);
    let t = forge(&key, header, &serde_json::to_vec(&extra).expect("json"));
    assert_eq!(malformed(&t), Malformation::Claims);
    let mut missing = serde_json::to_value(claims()).expect("json");
    missing.as_object_mut().expect("object").remove("jti");
    let t = forge(&key, header, &serde_json::to_vec(&missing).expect("json"));
    assert_eq!(malformed(&t), Malformation::Claims);
    let mut bad_kind = serde_json::to_value(claims()).expect("json");
    bad_kind["kind"] = "controller".into();
    let t = forge(&key, header, &serde_json::to_vec(&bad_kind).expect("json"));
    assert_eq!(malformed(&t), Malformation::Claims);
    // And a forged token with exactly the right content verifies (the helper is sound).
    let ok = forge(&key, header, &serde_json::to_vec(&claims()).expect("json"));
    assert!(verifier.verify(&ok, NOW).is_ok());
}

#[test]
fn signer_save_and_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token.key");
    let signer = TokenSigner::generate();
    signer.save(&path).expect("save");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let loaded = TokenSigner::load(&path).expect("load");
    assert_eq!(loaded.verifying_key(), signer.verifying_key());
    let token = loaded.sign(&claims());
    assert!(signer.verifying_key().verify(&token, NOW).is_ok());
    assert!(!format!("{signer:?}").contains(&hex::encode(raw_key(&signer).to_bytes())));

    let verifier = umbra_pki::TokenVerifier::from_bytes(&signer.verifying_key().to_bytes())
        .expect("from bytes");
    assert_eq!(verifier, signer.verifying_key());

    std::fs::write(&path, "nope").expect("write");
    let err = TokenSigner::load(&path).expect_err("garbage key");
    assert!(err.to_string().contains("token.key"), "{err}");

    // An EC key is not an Ed25519 token key.
    let ec = rcgen::KeyPair::generate().expect("ec");
    std::fs::write(&path, ec.serialize_pem()).expect("write");
    assert!(TokenSigner::load(&path).is_err());
    assert!(TokenSigner::load(&dir.path().join("missing")).is_err());
}

#[test]
fn nonces() {
    let a = new_nonce();
    assert_eq!(a.len(), 22);
    assert_eq!(URL_SAFE_NO_PAD.decode(&a).expect("b64").len(), 16);
    assert_ne!(a, new_nonce());
}

#[test]
fn errors_are_one_line() {
    for e in [
        TokenError::TooLarge,
        TokenError::Malformed(Malformation::Header),
        TokenError::UnsupportedAlgorithm,
        TokenError::BadSignature,
        TokenError::Expired,
        TokenError::NotYetValid,
        TokenError::BadLifetime,
    ] {
        let s = e.to_string();
        assert!(!s.is_empty() && !s.contains('\n'), "{s}");
    }
}
