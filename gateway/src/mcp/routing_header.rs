//! The value of a routing header (`Mcp-Name`) of the stateless MCP revision: verbatim when the
//! name is printable ASCII without edge spaces, else `=?base64?...?=` around the name's UTF-8
//! in standard base64. The gateway decodes what clients send and encodes what it sends
//! upstream, so both directions live here, next to each other and under one property test.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

const PREFIX: &str = "=?base64?";
const SUFFIX: &str = "?=";

/// A name as a header value: verbatim when it is printable ASCII without edge spaces (and does
/// not itself look like the encoded form), else the `=?base64?...?=` form.
pub fn encode(v: &str) -> String {
    let plain = v.bytes().all(|b| (0x20..=0x7e).contains(&b))
        && v == v.trim()
        && !(v.starts_with(PREFIX) && v.ends_with(SUFFIX));
    if plain {
        v.to_string()
    } else {
        format!("{PREFIX}{}{SUFFIX}", STANDARD.encode(v.as_bytes()))
    }
}

/// A header value's name: verbatim, or the UTF-8 inside the `=?base64?...?=` form that carries
/// names HTTP fields cannot (non-ASCII, edge spaces). A malformed or non-canonical form is
/// `None`, which matches nothing, so that no two spellings name the same thing. The result is
/// never longer than `v`.
pub fn decode(v: &str) -> Option<String> {
    let Some(payload) = v.strip_prefix(PREFIX).and_then(|p| p.strip_suffix(SUFFIX)) else {
        return Some(v.to_string());
    };
    let bytes = STANDARD.decode(payload).ok()?;
    // Only the canonical encoding of those bytes is accepted.
    if STANDARD.encode(&bytes) != payload {
        return None;
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_encoded_names() {
        assert_eq!(encode("db__query"), "db__query");
        assert_eq!(encode(" x"), "=?base64?IHg=?=");
        assert_eq!(decode("=?base64?IHg=?=").as_deref(), Some(" x"));
        assert_eq!(
            decode("=?base64?IHg?=").as_deref(),
            None,
            "unpadded is not canonical"
        );
        assert_eq!(decode("=?base64?!!?=").as_deref(), None);
        // A name that looks encoded is itself encoded, so it comes back as it was.
        let tricky = "=?base64?IHg=?=";
        assert_eq!(decode(&encode(tricky)).as_deref(), Some(tricky));
    }
}
