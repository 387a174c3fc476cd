//! YAML documents as `umbra apply` reads them; what parses must write out and parse back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use umbra_policies::parse_document;

fuzz_target!(|data: &[u8]| {
    if let Ok(yaml) = std::str::from_utf8(data) {
        if let Ok(doc) = parse_document(yaml) {
            assert_eq!(parse_document(&doc.to_yaml()).ok(), Some(doc));
        }
    }
});
