//! MCP paging cursors as a client sends them.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use umbra_gateway::mcp::cursor::Cursors;

fuzz_target!(|data: &[u8]| {
    static CURSORS: OnceLock<Cursors> = OnceLock::new();
    let cursors = CURSORS.get_or_init(Cursors::new);
    if let Ok(cursor) = std::str::from_utf8(data) {
        // No key signed it, so nothing opens (a forgery found here is a real finding).
        assert_eq!(cursors.open("tools", "id", cursor), None);
    }
});
