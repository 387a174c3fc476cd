//! Edge-view watch frames: bytes split by the first input byte, read as whole views and diffs
//! applied to the view before them (a diff that does not fit is an error, never a panic).
#![no_main]

use libfuzzer_sys::fuzz_target;
use umbra_proto::edge::EdgeWatchDecoder;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = usize::from(split).min(rest.len());
    let mut d = EdgeWatchDecoder::new(4096);
    for chunk in [&rest[..at], &rest[at..]] {
        d.push(chunk);
        while let Ok(Some(_)) = d.next() {}
    }
});
