//! Control-channel frames: bytes split by the first input byte, decoded as control messages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use umbra_proto::{ControlMessage, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = usize::from(split).min(rest.len());
    let mut d = FrameDecoder::new(4096);
    for chunk in [&rest[..at], &rest[at..]] {
        d.push(chunk);
        while let Ok(Some(_)) = d.next::<ControlMessage>() {}
    }
});
