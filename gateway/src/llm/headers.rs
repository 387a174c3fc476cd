//! Which of the client's headers reach the provider: none, unless the configuration names the
//! header and the value.
//!
//! Some provider headers switch on features billed to (and acting under) the organization's key:
//! `anthropic-beta` enables the Files API or the provider-side MCP connector, `anthropic-version`
//! changes the API's behaviour, `openai-beta` opens beta APIs. An agent must not choose them. So
//! a header goes upstream only if its name is in the provider's `forward_headers` and only with
//! the values listed there; each comma-separated item of a value is judged on its own (a beta
//! header lists several features), and the rest are dropped.
//!
//! Pure: the decision takes the allowlist and the client's headers and returns what to send.

use std::collections::{BTreeMap, BTreeSet};

use http::HeaderMap;

/// Header names the gateway sets itself or that carry credentials: never taken from a client,
/// whatever the configuration says.
pub const RESERVED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "host",
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "accept",
    "user-agent",
];

/// The `anthropic-version` sent when the client's is not allowed (or absent).
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// Allowed values by lower-case header name.
pub type Allowlist = BTreeMap<String, BTreeSet<String>>;

/// The headers (lower-case name, value) to send upstream: for each allowed name, the client's
/// items that are allowed, in the client's order, without repeats, joined with `,`.
pub fn forwarded(allow: &Allowlist, client: &HeaderMap) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, values) in allow {
        if RESERVED.contains(&name.as_str()) {
            continue;
        }
        let mut kept: Vec<&str> = Vec::new();
        for v in client.get_all(name.as_str()) {
            let Ok(v) = v.to_str() else { continue };
            for item in v.split(',').map(str::trim) {
                if values.contains(item) && !kept.contains(&item) {
                    kept.push(item);
                }
            }
        }
        if !kept.is_empty() {
            out.push((name.clone(), kept.join(",")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn allow(pairs: &[(&str, &[&str])]) -> Allowlist {
        pairs
            .iter()
            .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.to_string()).collect()))
            .collect()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn nothing_is_forwarded_without_an_allowlist() {
        let h = headers(&[
            (
                "anthropic-beta",
                "files-api-2025-04-14,mcp-client-2025-04-04",
            ),
            ("anthropic-version", "2023-06-01"),
            ("openai-beta", "assistants=v2"),
        ]);
        assert!(forwarded(&Allowlist::new(), &h).is_empty());
    }

    #[test]
    fn only_listed_items_of_listed_headers_go_up() {
        let a = allow(&[
            ("anthropic-beta", &["prompt-caching-2024-07-31"]),
            ("anthropic-version", &["2023-06-01"]),
        ]);
        let h = headers(&[
            (
                "anthropic-beta",
                "files-api-2025-04-14, prompt-caching-2024-07-31",
            ),
            (
                "anthropic-beta",
                "mcp-client-2025-04-04,prompt-caching-2024-07-31",
            ),
            ("anthropic-version", "2099-01-01"),
            ("openai-beta", "assistants=v2"),
        ]);
        assert_eq!(
            forwarded(&a, &h),
            [(
                "anthropic-beta".to_string(),
                "prompt-caching-2024-07-31".to_string()
            )]
        );
        let h = headers(&[("anthropic-version", "2023-06-01")]);
        assert_eq!(
            forwarded(&a, &h),
            [("anthropic-version".to_string(), "2023-06-01".to_string())]
        );
    }

    #[test]
    fn credentials_are_never_forwarded_even_if_listed() {
        let a = allow(&[
            ("x-api-key", &["sk-agent"]),
            ("authorization", &["Bearer x"]),
        ]);
        let h = headers(&[("x-api-key", "sk-agent"), ("authorization", "Bearer x")]);
        assert!(forwarded(&a, &h).is_empty());
    }

    proptest! {
        /// Whatever the client sends, every item forwarded is one the allowlist names, under a
        /// name it names.
        #[test]
        fn forwarded_items_are_always_allowed(
            sent in proptest::collection::vec(("(anthropic-beta|anthropic-version|openai-beta|x-other)", "[a-z0-9=, -]{0,40}"), 0..6),
            allowed in proptest::collection::vec("[a-z0-9=-]{1,12}", 0..4),
        ) {
            let a: Allowlist = [("anthropic-beta".to_string(), allowed.iter().cloned().collect())].into();
            let mut h = HeaderMap::new();
            for (k, v) in &sent {
                if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
                    h.append(k, v);
                }
            }
            for (name, value) in forwarded(&a, &h) {
                prop_assert_eq!(name.as_str(), "anthropic-beta");
                for item in value.split(',') {
                    prop_assert!(allowed.iter().any(|x| x == item), "{} not allowed", item);
                }
            }
        }
    }
}
