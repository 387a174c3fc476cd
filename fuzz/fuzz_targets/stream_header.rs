//! Data-plane stream frames: a request header, its payload, and a response.
#![no_main]

use libfuzzer_sys::fuzz_target;
use umbra_proto::stream::{
    decode_request_header, decode_response, IncomingRequest, ServiceRequest,
};

fuzz_target!(|data: &[u8]| {
    if let Some(r) = data.first_chunk::<2>() {
        let _ = decode_response(*r);
    }
    let Some(h) = data.first_chunk::<4>() else {
        return;
    };
    if let Ok((_, len)) = decode_request_header(*h) {
        let body = &data[4..];
        let body = &body[..len.min(body.len())];
        let _ = serde_json::from_slice::<ServiceRequest>(body);
        let _ = serde_json::from_slice::<IncomingRequest>(body);
    }
});
