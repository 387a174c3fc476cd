//! The document exactly as written in YAML. Names, selectors and addresses stay strings here so
//! that the conversion can report every invalid one, not just the first serde meets.

use serde::{Deserialize, Serialize};

use super::Document;
use crate::limits::RawLimits;
use crate::model::{Action, Hosting, IdentityKind, Semantic};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DocumentDto {
    #[serde(default)]
    pub(super) identities: Vec<IdentityDto>,
    #[serde(default)]
    pub(super) services: Vec<ServiceDto>,
    #[serde(default)]
    pub(super) policies: Vec<PolicyDto>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IdentityDto {
    pub(super) name: String,
    #[serde(default = "agent")]
    pub(super) kind: IdentityKind,
    #[serde(default)]
    pub(super) roles: Vec<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub(super) disabled: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub(super) revoked: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceDto {
    pub(super) name: String,
    #[serde(default)]
    pub(super) roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) address: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub(super) hosted: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) intercepts: Vec<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub(super) proxy_protocol: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyDto {
    pub(super) name: String,
    #[serde(default = "dial")]
    pub(super) action: Action,
    #[serde(default)]
    pub(super) identities: Vec<String>,
    #[serde(default)]
    pub(super) services: Vec<String>,
    #[serde(default)]
    pub(super) semantic: Semantic,
    #[serde(flatten)]
    pub(super) limits: RawLimits,
}

fn agent() -> IdentityKind {
    IdentityKind::Agent
}

fn dial() -> Action {
    Action::Dial
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn strings<T: ToString>(items: impl IntoIterator<Item = T>) -> Vec<String> {
    items.into_iter().map(|x| x.to_string()).collect()
}

impl From<&Document> for DocumentDto {
    fn from(doc: &Document) -> Self {
        DocumentDto {
            identities: (doc.identities.iter())
                .map(|i| IdentityDto {
                    name: i.name.to_string(),
                    kind: i.kind,
                    roles: strings(&i.roles),
                    disabled: i.disabled,
                    revoked: i.revoked,
                })
                .collect(),
            services: (doc.services.iter())
                .map(|s| ServiceDto {
                    name: s.name.to_string(),
                    roles: strings(&s.roles),
                    address: match &s.hosting {
                        Hosting::Address(a) => Some(a.to_string()),
                        Hosting::Sdk => None,
                    },
                    hosted: s.hosting == Hosting::Sdk,
                    intercepts: strings(&s.intercepts),
                    proxy_protocol: s.proxy_protocol,
                })
                .collect(),
            policies: (doc.policies.iter())
                .map(|p| PolicyDto {
                    name: p.name.to_string(),
                    action: p.action,
                    identities: strings(&p.identities),
                    services: strings(&p.services),
                    semantic: p.semantic,
                    limits: RawLimits::from(&p.limits),
                })
                .collect(),
        }
    }
}
