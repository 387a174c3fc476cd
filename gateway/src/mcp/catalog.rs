//! What the upstream servers offer, namespaced, and what one identity may see of it.
//!
//! Every tool, resource and prompt is renamed `server<sep>name` (resources: `server<sep>uri`), and
//! the lists are sorted by that name, so paging is deterministic. Visibility is the union over
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
            let name = format!("{server}{sep}{up}");
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

/// Whether a caller with `grants` may see the item `name` of `kind`.
pub fn visible(grants: &[HostedGrant], kind: Kind, name: &str) -> bool {
    grants.iter().any(|g| {
        let p = match kind {
            Kind::Tools => &g.tools,
            Kind::Resources => &g.resources,
            Kind::Prompts => &g.prompts,
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
            models: None,
            tokens: None,
            rpm: None,
            tools: tools.map(|t| t.parse().unwrap()),
            resources: None,
            prompts: None,
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
