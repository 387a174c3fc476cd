//! What the upstream servers offer, namespaced, and what one identity may see of it.
//!
//! Every tool and prompt is renamed `server<sep>name`; every resource is offered under a valid
//! URI of its own, `umbra://server/<upstream URI>` ([`offered_uri`]), since `server__file:///x`
//! is no URI and strict clients reject a list holding one. The lists are sorted by that name, so
//! paging is deterministic. Visibility is the union over
//! the caller's grants: a grant without a pattern list shows everything of that kind. A name is
//! only ever looked up exactly in the visible set, so no spelling of a hidden item (other case,
//! Unicode look-alikes, the upstream's raw name) can resolve to it.

use serde_json::Value;
use umbra_proto::api::HostedGrant;

/// Tools, resources or prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `tools/list`, `tools/call`.
    Tools,
    /// `resources/list`, `resources/read`.
    Resources,
    /// `prompts/list`, `prompts/get`.
    Prompts,
}

impl Kind {
    /// The list key in results and the cursor's domain.
    pub fn key(self) -> &'static str {
        match self {
            Kind::Tools => "tools",
            Kind::Resources => "resources",
            Kind::Prompts => "prompts",
        }
    }

    /// The field that names an item upstream.
    pub fn name_field(self) -> &'static str {
        match self {
            Kind::Resources => "uri",
            _ => "name",
        }
    }

    /// The notification that tells a client this kind's list changed.
    pub fn changed_method(self) -> &'static str {
        match self {
            Kind::Tools => "notifications/tools/list_changed",
            Kind::Resources => "notifications/resources/list_changed",
            Kind::Prompts => "notifications/prompts/list_changed",
        }
    }

    /// All kinds.
    pub const ALL: [Kind; 3] = [Kind::Tools, Kind::Resources, Kind::Prompts];
}

/// One offered item.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The namespaced name clients see and use.
    pub name: String,
    /// The upstream server.
    pub server: String,
    /// The upstream's own name (or URI).
    pub upstream: String,
    /// The item as the client sees it (renamed).
    pub item: Value,
}

/// Everything the upstreams offer to one identity, by kind, sorted by name.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Tools.
    pub tools: Vec<Entry>,
    /// Resources.
    pub resources: Vec<Entry>,
    /// Prompts.
    pub prompts: Vec<Entry>,
}

impl Catalog {
    /// The entries of one kind.
    pub fn of(&self, kind: Kind) -> &[Entry] {
        match kind {
            Kind::Tools => &self.tools,
            Kind::Resources => &self.resources,
            Kind::Prompts => &self.prompts,
        }
    }

    /// Adds the items of one server's list, renamed.
    pub fn add(&mut self, kind: Kind, server: &str, sep: &str, items: Vec<Value>) {
        let field = kind.name_field();
        let list = match kind {
            Kind::Tools => &mut self.tools,
            Kind::Resources => &mut self.resources,
            Kind::Prompts => &mut self.prompts,
        };
        for mut item in items {
            let Some(up) = item.get(field).and_then(Value::as_str).map(String::from) else {
                continue;
            };
            let name = match kind {
                Kind::Resources => offered_uri(server, &up),
                _ => format!("{server}{sep}{up}"),
            };
            if let Some(o) = item.as_object_mut() {
                o.insert(field.into(), Value::String(name.clone()));
            }
            list.push(Entry {
                name,
                server: server.to_string(),
                upstream: up,
                item,
            });
        }
    }

    /// Sorts every list by name (deterministic pages) and drops duplicate names.
    pub fn seal(&mut self) {
        for list in [&mut self.tools, &mut self.resources, &mut self.prompts] {
            list.sort_by(|a, b| a.name.cmp(&b.name));
            list.dedup_by(|a, b| a.name == b.name);
        }
    }
}

/// The scheme of the URIs resources are offered under.
pub const RESOURCE_SCHEME: &str = "umbra";

fn has_scheme(uri: &str) -> bool {
    let Some((scheme, _)) = uri.split_once(':') else {
        return false;
    };
    let mut b = scheme.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || b"+-.".contains(&c))
}

/// Whether the path of `uri` has a `.` or `..` segment, which URI normalization would remove.
fn has_dot_segment(uri: &str) -> bool {
    let path = uri.split(['?', '#']).next().unwrap_or("");
    path.split('/').any(|seg| {
        let seg = seg.to_ascii_lowercase().replace("%2e", ".");
        seg == "." || seg == ".."
    })
}

/// The URI a resource of `server` whose upstream URI is `upstream` is offered under: always a
/// valid URI, different for every (server, upstream) pair.
///
/// `umbra://SERVER/UPSTREAM`, the upstream URI kept readable (`umbra://notes/file:///a.txt`)
/// with every byte outside the characters a URI path and query may hold percent-encoded (`%`,
/// `#`, spaces, non-ASCII included), so that grant patterns such as `umbra://notes/*` read
/// naturally. An upstream URI without a scheme, or with `.`/`..` segments that a client's URI
/// normalization would fold away, is encoded whole as one segment instead. Either way each byte
/// maps to a fixed token and no token of one form can appear in the other, so no two upstream
/// resources share an offered URI. Server names are letters, digits, `-` and `_`, all valid in
/// the authority.
pub fn offered_uri(server: &str, upstream: &str) -> String {
    let readable = has_scheme(upstream) && !has_dot_segment(upstream);
    let mut out = format!("{RESOURCE_SCHEME}://{server}/");
    for b in upstream.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || b"-_~".contains(&b)
            || (readable && b".!$&'()*+,;=:@/?".contains(&b));
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Rewrites the URIs in a `resources/read` result to those the client knows: the resource it
/// asked for answers with the URI it asked with (not the upstream's), and any other URI the
/// upstream put there is offered the same way as in the list.
pub fn answer_uris(result: &mut Value, entry: &Entry) {
    let Some(contents) = result.get_mut("contents").and_then(Value::as_array_mut) else {
        return;
    };
    for c in contents {
        let Some(uri) = c.get("uri").and_then(Value::as_str) else {
            continue;
        };
        let mapped = if uri == entry.upstream {
            entry.name.clone()
        } else {
            offered_uri(&entry.server, uri)
        };
        if let Some(o) = c.as_object_mut() {
            o.insert("uri".into(), Value::String(mapped));
        }
    }
}

/// Whether a caller with `grants` may see the item `name` of `kind`.
pub fn visible(grants: &[HostedGrant], kind: Kind, name: &str) -> bool {
    grants.iter().any(|g| {
        let p = match kind {
            Kind::Tools => &g.limits.tools,
            Kind::Resources => &g.limits.resources,
            Kind::Prompts => &g.limits.prompts,
        };
        p.as_ref().is_none_or(|p| p.matches(name))
    })
}

/// The visible entries of a kind, in order.
pub fn visible_list<'a>(c: &'a Catalog, grants: &[HostedGrant], kind: Kind) -> Vec<&'a Entry> {
    c.of(kind)
        .iter()
        .filter(|e| visible(grants, kind, &e.name))
        .collect()
}

/// The visible entry named exactly `name`.
pub fn find<'a>(
    c: &'a Catalog,
    grants: &[HostedGrant],
    kind: Kind,
    name: &str,
) -> Option<&'a Entry> {
    let list = c.of(kind);
    let i = list.binary_search_by(|e| e.name.as_str().cmp(name)).ok()?;
    let e = &list[i];
    visible(grants, kind, &e.name).then_some(e)
}

/// A fingerprint of what a caller sees of one kind, to tell whether a change concerns it.
pub fn fingerprint(c: &Catalog, grants: &[HostedGrant], kind: Kind) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for e in visible_list(c, grants, kind) {
        e.name.hash(&mut h);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn grant(tools: Option<&str>) -> HostedGrant {
        HostedGrant {
            identity: umbra_policies::IdentityId::new("id-1").unwrap(),
            name: umbra_policies::Name::new("agent-1").unwrap(),
            policy: umbra_policies::Name::new("p").unwrap(),
            limits: umbra_policies::GrantLimits {
                tools: tools.map(|t| t.parse().unwrap()),
                ..Default::default()
            },
        }
    }

    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        c.add(
            Kind::Tools,
            "github",
            "__",
            vec![
                json!({"name": "delete_repo", "description": "x"}),
                json!({"name": "create_issue"}),
                json!({"nameless": true}),
            ],
        );
        c.add(Kind::Tools, "notes", "__", vec![json!({"name": "echo"})]);
        c.seal();
        c
    }

    #[test]
    fn names_are_namespaced_sorted_and_filtered() {
        let c = catalog();
        let names: Vec<&str> = c.tools.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["github__create_issue", "github__delete_repo", "notes__echo"]
        );
        assert_eq!(c.tools[0].item["name"], "github__create_issue");
        assert_eq!(c.tools[0].upstream, "create_issue");
        let g = [grant(Some("github__*,!github__delete_*"))];
        let vis: Vec<&str> = visible_list(&c, &g, Kind::Tools)
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(vis, ["github__create_issue"]);
        assert!(visible_list(&c, &[grant(None)], Kind::Tools).len() == 3);
        assert!(
            visible_list(&c, &[], Kind::Tools).is_empty(),
            "no grant, nothing"
        );
    }

    /// An RFC 3986 check of what `offered_uri` produces: scheme, `//`, an authority of
    /// unreserved characters, then path and query characters or `%XX`, and no fragment.
    fn valid_uri(u: &str) -> bool {
        let Some(rest) = u.strip_prefix("umbra://") else {
            return false;
        };
        let Some((host, tail)) = rest.split_once('/') else {
            return false;
        };
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        {
            return false;
        }
        let b = tail.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                if i + 2 >= b.len() {
                    return false;
                }
                if !(b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit()) {
                    return false;
                }
                i += 3;
                continue;
            }
            if !(b[i].is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&b[i])) {
                return false;
            }
            i += 1;
        }
        true
    }

    #[test]
    fn resources_are_offered_under_valid_uris_and_answered_with_them() {
        assert_eq!(
            offered_uri("notes", "file:///readme.txt"),
            "umbra://notes/file:///readme.txt"
        );
        assert_eq!(
            offered_uri("notes", "https://x/a b?q=1#frag"),
            "umbra://notes/https://x/a%20b?q=1%23frag"
        );
        // Dot segments would be folded by a client's normalization: the whole is encoded.
        let dotted = offered_uri("notes", "file:///a/../secret");
        assert!(!dotted.contains(".."), "{dotted}");
        assert!(valid_uri(&dotted));
        assert_ne!(offered_uri("a", "x:%41"), offered_uri("a", "x:A"));
        assert_ne!(offered_uri("a", "x:%"), offered_uri("a", "x:%25"));
        let mut c = Catalog::default();
        c.add(
            Kind::Resources,
            "notes",
            "__",
            vec![json!({"uri": "file:///readme.txt", "name": "readme"})],
        );
        c.seal();
        let e = &c.resources[0];
        assert_eq!(e.name, "umbra://notes/file:///readme.txt");
        assert_eq!(e.item["uri"], e.name);
        assert_eq!(e.upstream, "file:///readme.txt");
        let mut r = json!({"contents": [
            {"uri": "file:///readme.txt", "text": "x"},
            {"uri": "file:///readme.txt#p2", "text": "y"},
            {"text": "no uri"}
        ]});
        answer_uris(&mut r, e);
        assert_eq!(r["contents"][0]["uri"], "umbra://notes/file:///readme.txt");
        assert_eq!(
            r["contents"][1]["uri"],
            "umbra://notes/file:///readme.txt%23p2"
        );
        assert!(r["contents"][2].get("uri").is_none());
    }

    proptest::proptest! {
        #[test]
        fn offered_uris_are_valid_and_never_shared(
            server in "[A-Za-z0-9_-]{1,12}",
            a in "\\PC{0,40}",
            b in "\\PC{0,40}",
            scheme in "[a-z][a-z0-9+.-]{0,6}",
        ) {
            for u in [a.clone(), format!("{scheme}:{a}"), format!("{scheme}:///{a}/../{b}")] {
                let o = offered_uri(&server, &u);
                proptest::prop_assert!(valid_uri(&o), "{} -> {}", u, o);
            }
            if a != b {
                proptest::prop_assert_ne!(offered_uri(&server, &a), offered_uri(&server, &b));
                let (sa, sb) = (format!("{scheme}:{a}"), format!("{scheme}:{b}"));
                proptest::prop_assert_ne!(offered_uri(&server, &sa), offered_uri(&server, &sb));
                proptest::prop_assert_ne!(offered_uri(&server, &sa), offered_uri(&server, &b));
            }
        }
    }

    #[test]
    fn hidden_items_resolve_in_no_spelling() {
        let c = catalog();
        let g = [grant(Some("github__*,!github__delete_*"))];
        assert!(find(&c, &g, Kind::Tools, "github__create_issue").is_some());
        for spelling in [
            "github__delete_repo",
            "delete_repo",
            "GITHUB__DELETE_REPO",
            "github__Delete_repo",
            "github__delete_repo ",
            "github\u{FF3F}\u{FF3F}delete_repo",
            "gіthub__delete_repo", // Cyrillic і
            "github__delete\u{200B}_repo",
            "github__create_issue\u{0000}",
        ] {
            assert!(
                find(&c, &g, Kind::Tools, spelling).is_none(),
                "{spelling:?}"
            );
        }
        assert_ne!(
            fingerprint(&c, &g, Kind::Tools),
            fingerprint(&c, &[grant(None)], Kind::Tools)
        );
    }
}
