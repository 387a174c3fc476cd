//! Properties of enrollment-token splitting, which reads whatever an enrollee presents: any
//! text is refused or accepted without a panic, nothing over the size bound is even split, and
//! what the signer writes verifies and decodes to the claims it signed. The fuzz target in
//! `fuzz/` drives the same functions with coverage guidance.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use proptest::prelude::*;
use umbra_pki::token::{
    decode_unverified, EnrollmentClaims, TokenError, TokenSigner, MAX_TOKEN_LEN,
};
use umbra_pki::{fingerprint, TrustDomain};
use umbra_policies::{IdentityId, IdentityKind, Name, Timestamp};

fn claims() -> impl Strategy<Value = EnrollmentClaims> {
    (
        "[a-z0-9.-]{1,40}:[0-9]{1,5}",
        "[A-Za-z0-9_-]{1,64}",
        "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?",
        prop_oneof![
            Just(IdentityKind::Agent),
            Just(IdentityKind::Admin),
            Just(IdentityKind::Router)
        ],
        "[a-z0-9]{1,20}(\\.[a-z0-9]{1,10}){0,2}",
        any::<[u8; 8]>(),
        0u64..(1 << 40),
        1u64..(1 << 20),
        "[A-Za-z0-9_-]{22}",
    )
        .prop_map(
            |(iss, sub, name, kind, td, ca, iat, life, jti)| EnrollmentClaims {
                iss,
                sub: IdentityId::new(sub).expect("the regex is an id"),
                name: Name::new(name).expect("the regex is a name"),
                kind,
                td: TrustDomain::new(td).expect("the regex is a trust domain"),
                ca: fingerprint(&ca),
                iat: Timestamp(iat),
                exp: Timestamp(iat + life),
                jti,
            },
        )
}

/// Three parts of arbitrary base64url, with the real header now and then, so that splitting
/// gets past its first checks.
fn token_like() -> impl Strategy<Value = String> {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA","typ":"JWT"}"#);
    let part =
        proptest::collection::vec(any::<u8>(), 0..100).prop_map(|b| URL_SAFE_NO_PAD.encode(b));
    (prop_oneof![Just(header), part.clone()], part.clone(), part)
        .prop_map(|(h, p, s)| format!("{h}.{p}.{s}"))
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(text in ".{0,300}", token in token_like()) {
        let verifier = TokenSigner::generate().verifying_key();
        for t in [&text, &token] {
            let _ = decode_unverified(t);
            // No key signed these: nothing verifies.
            prop_assert!(verifier.verify(t, Timestamp(0)).is_err());
        }
    }

    #[test]
    fn tokens_over_the_bound_are_refused_before_splitting(extra in 1usize..64, c in "[A-Za-z0-9_.-]") {
        let t = c.repeat(MAX_TOKEN_LEN + extra);
        prop_assert_eq!(decode_unverified(&t), Err(TokenError::TooLarge));
    }

    #[test]
    fn signed_tokens_round_trip(claims in claims()) {
        let signer = TokenSigner::generate();
        let token = signer.sign(&claims);
        prop_assert!(token.len() <= MAX_TOKEN_LEN);
        prop_assert_eq!(decode_unverified(&token), Ok(claims.clone()));
        prop_assert_eq!(signer.verifying_key().verify(&token, claims.iat), Ok(claims.clone()));
        // Another key's verifier refuses it.
        prop_assert_eq!(
            TokenSigner::generate().verifying_key().verify(&token, claims.iat),
            Err(TokenError::BadSignature)
        );
    }
}
