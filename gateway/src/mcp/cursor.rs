//! Paging cursors: opaque to clients, bound to the identity they were issued to, and
//! tamper-evident. A cursor carries the offset into the caller's own filtered, ordered list and
//! an HMAC over it and the caller's identity id, under a key that never leaves the gateway
//! process. A forged, altered or foreign cursor fails the check and gets invalid-params.

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

fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

fn unb64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        })
    };
    let bytes = s.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

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
        b64(&raw)
    }

    /// The offset a cursor holds, if it is genuine and was issued to `identity` for `kind`.
    pub fn open(&self, kind: &str, identity: &str, cursor: &str) -> Option<u64> {
        if cursor.len() > 128 {
            return None;
        }
        let raw = unb64(cursor)?;
        // Only the canonical spelling: unused low bits of the last character must be zero, so
        // that no two strings name the same cursor.
        if b64(&raw) != cursor {
            return None;
        }
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
        assert_eq!(unb64(&b64(b"hello world!?")).unwrap(), b"hello world!?");
    }
}
