//! The sandbox's DNS responder, and the response parser the escape probe uses.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use umbra_sandbox::dns::{answer, parse_response};

fuzz_target!(|data: &[u8]| {
    let lookup = |name: &str| name.starts_with('a').then_some(Ipv4Addr::LOCALHOST);
    if let Some((reply, _)) = answer(data, lookup) {
        // An answer record and a header at most: no amplification.
        assert!(reply.len() <= data.len().max(12) + 28);
    }
    let _ = parse_response(data);
});
