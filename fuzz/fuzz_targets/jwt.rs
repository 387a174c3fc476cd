//! Enrollment-token splitting and claims decoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use umbra_pki::token::decode_unverified;

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = decode_unverified(token);
    }
});
