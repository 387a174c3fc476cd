//! Problems found in a document, a state or a plan, each tied to the field that caused it.
//!
//! One error type serves `umbra apply`, the controller's write checks and plan application, so
//! that a rule broken anywhere is reported in the same words.

use std::fmt;

use crate::model::{IdentityId, IdentityKind, ParseHostPortError};
use crate::name::{Name, NameError};
use crate::selector::SelectorError;

/// Which list of the model an entry belongs to; names are unique within each list only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entity {
    /// An identity (agents and admins in documents; also routers in a state).
    Identity,
    /// A service.
    Service,
    /// A service policy.
    Policy,
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Entity::Identity => "identity",
            Entity::Service => "service",
            Entity::Policy => "policy",
        })
    }
}

/// One problem and where it is, so that a person can fix every problem of a document in one go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{kind}", prefix(path))]
pub struct DocError {
    /// Where the problem is: `policies[2].services[0]` in a document, `services["llm"]` in a
    /// state, `changes[3]` in a plan; empty when it concerns the input as a whole.
    pub path: String,
    /// What is wrong.
    pub kind: DocErrorKind,
}

fn prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

impl DocError {
    /// An error at `path`.
    pub fn new(path: impl Into<String>, kind: impl Into<DocErrorKind>) -> Self {
        DocError {
            path: path.into(),
            kind: kind.into(),
        }
    }
}

/// What is wrong with a document, a state or a plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocErrorKind {
    /// The input is larger than we are willing to parse.
    #[error("the document is {size} bytes; at most {max} are accepted")]
    TooLarge {
        /// The input's size in bytes.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The input holds no YAML value at all.
    #[error("the document is empty; an empty desired state is written `{{}}`")]
    Empty,
    /// The YAML is malformed, has an unknown field or a value of the wrong type. The message
    /// comes from the YAML parser and carries its own path and line.
    #[error("{0}")]
    Syntax(String),
    /// A name (of an entity or a role) is invalid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A selector is invalid.
    #[error(transparent)]
    Selector(#[from] SelectorError),
    /// An address or intercept is not a valid `host:port`.
    #[error(transparent)]
    HostPort(#[from] ParseHostPortError),
    /// A service has both an address and `hosted: true`.
    #[error("set either `address` or `hosted: true`, not both")]
    AddressAndHosted,
    /// A service has neither an address nor `hosted: true`.
    #[error("set `address` (the router dials it) or `hosted: true` (an SDK identity binds it)")]
    NoHosting,
    /// A document declares a router; routers are enrolled through the controller.
    #[error("routers are enrolled through the controller and cannot be declared in a document")]
    RouterInDocument,
    /// Two entries of one list share a name.
    #[error("duplicate {entity} name {name:?}; it is already used at {first}")]
    Duplicate {
        /// The list.
        entity: Entity,
        /// The name used twice.
        name: Name,
        /// Where it was used first.
        first: String,
    },
    /// An `@name` selector names nothing.
    #[error("@{name}: there is no {entity} named {name:?}")]
    Dangling {
        /// What the selector must name.
        entity: Entity,
        /// The missing name.
        name: Name,
    },
    /// A policy has an empty identity or service list, which could only ever grant nothing.
    #[error("a policy needs at least one selector here")]
    EmptySelectors,
    /// The name belongs to a router, which documents and plans never manage.
    #[error("{name:?} is a router; documents and plans never manage routers")]
    RouterName {
        /// The router's name.
        name: Name,
    },
    /// The name belongs to a revoked identity, whose record is kept for audit and whose name
    /// is never reused, so that old logs stay unambiguous.
    #[error("{name:?} is a revoked identity; its record is kept and its name is not reused")]
    RevokedName {
        /// The revoked identity's name.
        name: Name,
    },
    /// A document changes an identity's kind, which is part of its SPIFFE id and certificates.
    #[error("{name:?} is an existing {current}; delete it and create a new {desired} instead")]
    KindChange {
        /// The identity.
        name: Name,
        /// Its kind now.
        current: IdentityKind,
        /// The kind the document asks for.
        desired: IdentityKind,
    },
    /// A state entry is stored under a key that is not its own id or name.
    #[error("stored under {key:?} but its own id or name is {own:?}")]
    KeyMismatch {
        /// The map key.
        key: String,
        /// The entry's id or name.
        own: String,
    },
    /// A plan refers to an identity id that does not exist (the plan is stale).
    #[error("there is no identity with id {0}")]
    UnknownIdentityId(IdentityId),
    /// A plan deletes a service that does not exist (the plan is stale).
    #[error("there is no service named {0:?}")]
    UnknownService(Name),
    /// A plan deletes a policy that does not exist (the plan is stale).
    #[error("there is no policy named {0:?}")]
    UnknownPolicy(Name),
    /// A model pattern list or a token budget is invalid.
    #[error(transparent)]
    Allowance(#[from] crate::AllowanceError),
    /// Two services list the same intercept address; a tunneler could expose only one of them
    /// there, so the second would silently be unreachable.
    #[error("intercept {intercept} of service {by} is already used by service {service}")]
    InterceptTaken {
        /// The address listed twice.
        intercept: crate::HostPort,
        /// The service that lists it first.
        service: Name,
        /// The service that lists it again (the entry the error's path points at).
        by: Name,
    },
    /// A document lists a router this controller does not have. Routers are enrolled through
    /// the controller; a document only names them, for the policies that refer to them.
    #[error("{name:?} is not a router of this controller; create it with `umbra router create {name}` first (documents never create routers)")]
    RouterNotEnrolled {
        /// The router's name.
        name: Name,
    },
    /// A document marks an active identity as revoked. Revocation also revokes certificates
    /// and cuts connections, which is a command of its own.
    #[error("{name:?} is active; revoke it with `umbra identity revoke {name}` (a document never revokes)")]
    RevokeInDocument {
        /// The identity's name.
        name: Name,
    },
    /// The id generator returned an id that is already in use.
    #[error("the new identity id {0} is already in use")]
    IdTaken(IdentityId),
}

/// Collects problems while a check goes on, so that all of them are reported together.
#[derive(Debug, Default)]
pub(crate) struct Problems(Vec<DocError>);

impl Problems {
    /// Records a problem at `path`.
    pub(crate) fn push(&mut self, path: impl Into<String>, kind: impl Into<DocErrorKind>) {
        self.0.push(DocError::new(path, kind));
    }

    /// The value of `result`, or `None` after recording its error at `path`.
    pub(crate) fn take<T, E: Into<DocErrorKind>>(
        &mut self,
        path: impl FnOnce() -> String,
        result: Result<T, E>,
    ) -> Option<T> {
        result.map_err(|e| self.push(path(), e)).ok()
    }

    /// Adds problems found elsewhere.
    pub(crate) fn extend(&mut self, other: Vec<DocError>) {
        self.0.extend(other);
    }

    /// `Ok(value)` if nothing was recorded, else every problem.
    pub(crate) fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, Vec<DocError>> {
        if self.0.is_empty() {
            Ok(value())
        } else {
            Err(self.0)
        }
    }
}
