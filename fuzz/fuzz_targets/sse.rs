//! The SSE parser over a provider stream split by the first input byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use umbra_gateway::sse::Parser;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = usize::from(split).min(rest.len());
    let mut p = Parser::new(1024);
    for chunk in [&rest[..at], &rest[at..]] {
        if p.push(chunk).is_err() {
            return;
        }
    }
});
