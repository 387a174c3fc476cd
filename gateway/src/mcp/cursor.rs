//! Paging cursors: opaque to clients, bound to the identity they were issued to, and
//! tamper-evident. A cursor carries the offset into the caller's own filtered, ordered list and
//! an HMAC over it and the caller's identity id, under a key that never leaves the gateway
//! process. A forged, altered or foreign cursor fails the check and gets invalid-params.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;

/// Signs and checks cursors.
pub struct Cursors {
    key: hmac::Key,
}

impl std::fmt::Debug for Cursors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cursors(key redacted)")
    }
}

const TAG: usize = 32;

/// The longest cursor looked at: an offset and a tag take 56 characters.
pub const MAX_CURSOR_LEN: usize = 128;

impl Cursors {
    /// A fresh random key (cursors do not survive a gateway restart; clients list again).
    pub fn new() -> Cursors {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).unwrap_or_else(|_| {
            // The system RNG does not fail on Linux; a fixed key would still only let a
            // client page its own list.
            hmac::Key::new(hmac::HMAC_SHA256, b"umbra-cursor-fallback")
        });
        Cursors { key }
    }

    fn message(kind: &str, identity: &str, offset: u64) -> Vec<u8> {
        let mut m = Vec::with_capacity(kind.len() + identity.len() + 10);
        m.extend_from_slice(kind.as_bytes());
        m.push(0);
        m.extend_from_slice(identity.as_bytes());
        m.push(0);
        m.extend_from_slice(&offset.to_be_bytes());
        m
    }

    /// A cursor for `offset` into the list `kind` (tools, resources, prompts) of `identity`.
    pub fn issue(&self, kind: &str, identity: &str, offset: u64) -> String {
        let mut raw = offset.to_be_bytes().to_vec();
        let tag = hmac::sign(&self.key, &Self::message(kind, identity, offset));
        raw.extend_from_slice(tag.as_ref());
        URL_SAFE_NO_PAD.encode(&raw)
    }

    /// The offset a cursor holds, if it is genuine and was issued to `identity` for `kind`.
    pub fn open(&self, kind: &str, identity: &str, cursor: &str) -> Option<u64> {
        if cursor.len() > MAX_CURSOR_LEN {
            return None;
        }
        // Only the canonical spelling: no padding, and unused low bits of the last character
        // must be zero (the engine refuses them), so that no two strings name the same cursor.
        let raw = URL_SAFE_NO_PAD.decode(cursor).ok()?;
        if raw.len() != 8 + TAG {
            return None;
        }
        let offset = u64::from_be_bytes(raw[..8].try_into().ok()?);
        // ring compares the tag in constant time.
        hmac::verify(&self.key, &Self::message(kind, identity, offset), &raw[8..]).ok()?;
        Some(offset)
    }
}

impl Default for Cursors {
    fn default() -> Self {
        Cursors::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_bound_and_tamper_evident() {
        let c = Cursors::new();
        let cur = c.issue("tools", "id-1", 100);
        assert_eq!(c.open("tools", "id-1", &cur), Some(100));
        assert_eq!(
            c.open("tools", "id-2", &cur),
            None,
            "another identity's cursor"
        );
        assert_eq!(
            c.open("prompts", "id-1", &cur),
            None,
            "another list's cursor"
        );
        assert_eq!(
            Cursors::new().open("tools", "id-1", &cur),
            None,
            "another gateway's"
        );
        // Flip every character in turn.
        for i in 0..cur.len() {
            let mut b = cur.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let s = String::from_utf8(b).unwrap();
            if s != cur {
                assert_eq!(c.open("tools", "id-1", &s), None, "{s}");
            }
        }
        for bad in [
            "",
            "x",
            "!!!!",
            &"A".repeat(200),
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(c.open("tools", "id-1", bad), None, "{bad}");
        }
        // The same offset and tag with an unused low bit of the last character set: its value
        // is a multiple of 16 (A, Q, g or w), and the next letter sets the lowest bit.
        let mut bits = cur.clone().into_bytes();
        let last = bits.len() - 1;
        assert!(matches!(bits[last], b'A' | b'Q' | b'g' | b'w'), "{cur}");
        bits[last] += 1;
        let bits = String::from_utf8(bits).unwrap();
        assert_eq!(c.open("tools", "id-1", &bits), None, "{bits}");
    }
}
