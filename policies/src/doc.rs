//! The declarative document: the whole desired state in one YAML file, for
//! `umbra apply -f umbra.yaml [--dry-run]` and `umbra export`.
//!
//! ```yaml
//! identities:
//!   - name: agent-1
//!     kind: agent          # agent (default), admin, or router (a reference, see below)
//!     roles: [analysts]
//!     disabled: false      # optional
//!   - name: old-agent
//!     revoked: true        # a revoked record: kept, never reused, never revoked by a document
//! services:
//!   - name: llm
//!     roles: [ai]
//!     address: api.internal:443     # exactly one of `address` or `hosted: true`
//!     intercepts: ["llm.umbra:443"]
//!     proxy_protocol: false         # optional
//! policies:
//!   - name: analysts-llm
//!     action: dial                  # dial (default) or bind
//!     identities: ["#analysts"]
//!     services: ["@llm"]
//!     semantic: anyOf               # anyOf (default) or allOf
//! ```
//!
//! A document names identities and never carries ids: the controller assigns ids, and a
//! document can be applied to any controller.
//!
//! A document holds every identity its policies name, so that whatever `umbra export` writes,
//! `umbra apply` accepts and plans as no change on the same controller. Revoked identities are
//! listed with `revoked: true` (on a controller without them they are recreated as revoked
//! records, so their names stay taken). Routers are enrolled through the controller, never by a
//! document; one appears (`kind: router`) only when a policy names it, as a reference the plan
//! checks.

mod dto;
mod parse;

use crate::roles::Roles;

use crate::error::{DocError, DocErrorKind, Problems};
use crate::model::{Identity, IdentityKind, Service, ServicePolicy, State};
use crate::name::Name;
use crate::rules::{At, Catalog, PolicyRefs, Side};

/// The largest document accepted, so that a careless or hostile input cannot make the parser
/// use unbounded memory: about two and a half times a document of a million identities, a
/// hundred thousand services and a hundred thousand policies.
pub const MAX_DOCUMENT_BYTES: usize = 256 << 20;

/// A whole desired state: every agent and admin identity, service and policy, with the routers
/// its policies name. What is not in it is deleted by `umbra apply` (routers and revoked
/// identities excepted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Document {
    /// Agent and admin identities.
    pub identities: Vec<DocIdentity>,
    /// Services.
    pub services: Vec<Service>,
    /// Service policies.
    pub policies: Vec<ServicePolicy>,
}

/// An identity as a document declares it: by name, without the id the controller assigns and
/// without the expiry that only the controller manages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocIdentity {
    /// Unique name.
    pub name: Name,
    /// Agent or admin; a router only as a reference to an enrolled router that a policy names
    /// (plans never create, change or delete routers).
    pub kind: IdentityKind,
    /// Role attributes.
    pub roles: Roles,
    /// Whether the identity is disabled.
    pub disabled: bool,
    /// Whether the identity is revoked: its record is kept and its name never reused, so a
    /// round trip through a document keeps it (and the policies naming it). A plan recreates a
    /// missing one as a revoked record but never revokes an active identity: revocation also
    /// revokes certificates and is a command of its own.
    pub revoked: bool,
}

impl From<&Identity> for DocIdentity {
    fn from(i: &Identity) -> Self {
        DocIdentity {
            name: i.name.clone(),
            kind: i.kind,
            roles: i.roles.clone(),
            disabled: i.disabled,
            revoked: i.revoked,
        }
    }
}

/// Parses and checks a document, reporting every problem found rather than the first.
///
/// An input with no content is refused, so that an empty or truncated file is never taken to
/// mean "delete everything"; an empty state is written `{}`.
///
/// YAML syntax errors, unknown fields and values of the wrong type come from the YAML parser
/// as a single error; every other problem (invalid names, selectors and addresses, hosting,
/// duplicate names, dangling `@name` references, empty selector lists, intercepts used by two
/// services) is collected with its path.
pub fn parse_document(yaml: &str) -> Result<Document, Vec<DocError>> {
    if yaml.len() > MAX_DOCUMENT_BYTES {
        let kind = DocErrorKind::TooLarge {
            size: yaml.len(),
            max: MAX_DOCUMENT_BYTES,
        };
        return Err(vec![DocError::new("", kind)]);
    }
    let dto: Option<dto::DocumentDto> = serde_yaml_ng::from_str(yaml)
        .map_err(|e| vec![DocError::new("", DocErrorKind::Syntax(e.to_string()))])?;
    parse::convert(dto.ok_or_else(|| vec![DocError::new("", DocErrorKind::Empty)])?)
}

/// The document describing `state`, for `umbra export`, which [`crate::plan`] plans as no change
/// against the same state: every agent and admin, revoked ones marked `revoked`; routers (which
/// enroll themselves) only when a policy names them with `@name`, so that the document holds
/// every identity it names. Every list is sorted by name so that exports diff cleanly.
pub fn export(state: &State) -> Document {
    let named: std::collections::HashSet<&Name> = (state.policies.values())
        .flat_map(|p| &p.identities)
        .filter_map(|s| match s {
            crate::Selector::Named(n) => Some(n),
            _ => None,
        })
        .collect();
    let mut identities: Vec<DocIdentity> = (state.identities.values())
        .filter(|i| i.kind != IdentityKind::Router || named.contains(&i.name))
        .map(DocIdentity::from)
        .collect();
    identities.sort_by(|a, b| a.name.cmp(&b.name));
    Document {
        identities,
        services: state.services.values().cloned().collect(),
        policies: state.policies.values().cloned().collect(),
    }
}

impl Document {
    /// The document as YAML that [`parse_document`] reads back to an equal document.
    pub fn to_yaml(&self) -> String {
        // Only strings, booleans, lists and unit enum variants are serialized, which YAML can
        // always represent; a failure here would be a bug in the DTOs, not bad input.
        serde_yaml_ng::to_string(&dto::DocumentDto::from(self))
            .expect("a document of plain strings, booleans and lists always serializes")
    }

    /// Checks the rules a parsed document keeps, for documents built in code: names unique
    /// within each list, every `@name` naming an entry of this document, no empty selector
    /// list, and no intercept used by two services.
    pub fn validate(&self) -> Result<(), Vec<DocError>> {
        let mut problems = Problems::default();
        let catalog = Catalog {
            identities: (self.identities.iter().enumerate())
                .map(|(i, x)| (At::Pos(i), Some(&x.name)))
                .collect(),
            services: (self.services.iter().enumerate())
                .map(|(i, x)| (At::Pos(i), Some(&x.name)))
                .collect(),
            policies: (self.policies.iter().enumerate())
                .map(|(i, p)| PolicyRefs {
                    at: At::Pos(i),
                    name: Some(&p.name),
                    identities: Side::of(&p.identities),
                    services: Side::of(&p.services),
                })
                .collect(),
            intercepts: (self.services.iter().enumerate())
                .map(|(i, s)| (At::Pos(i), &s.name, s.intercepts.as_slice()))
                .collect(),
        };
        catalog.check(&mut problems);
        problems.finish(|| ())
    }

    /// The same document with every list sorted by name, for comparing documents that list
    /// the same entries in different orders.
    pub fn normalized(&self) -> Document {
        let mut doc = self.clone();
        doc.identities.sort_by(|a, b| a.name.cmp(&b.name));
        doc.services.sort_by(|a, b| a.name.cmp(&b.name));
        doc.policies.sort_by(|a, b| a.name.cmp(&b.name));
        doc
    }
}

#[cfg(test)]
mod tests;
