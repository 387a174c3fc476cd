//! `Mcp-Name` routing-header values as a client sends them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use umbra_gateway::mcp::routing_header::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = std::str::from_utf8(data) {
        if let Some(name) = decode(v) {
            assert!(name.len() <= v.len());
            assert_eq!(decode(&encode(&name)).as_deref(), Some(name.as_str()));
        }
    }
});
