//! Umbra's policy core: the data model (identities, services, service policies), the compiled
//! index that answers "may this identity dial or bind this service", and the declarative
//! document that describes a whole desired state.
//!
//! This crate decides; it never does I/O. It has no async runtime, no sockets and never reads the
//! clock or a random source: time (`Timestamp`) and identifiers are arguments, so that every
//! decision can be unit-tested, property-tested and fuzzed without a network. The controller
//! validates and compiles policy with it, and the routers and gateways enforce with it.

pub mod address;
mod allowance;
mod apply;
mod change;
mod decision;
mod doc;
mod error;
mod index;
mod judge;
mod limits;
mod model;
mod name;
mod plan;
pub mod renewal;
mod roles;
mod rules;
mod selector;
#[cfg(test)]
mod testing;
mod throttle;
mod throughput;

pub use allowance::{AllowanceError, Patterns, Period, TokenBudget};
pub use apply::apply_plan;
pub use change::StateChange;
pub use decision::{Deny, Explanation, Permit};
pub use doc::{export, parse_document, DocIdentity, Document, MAX_DOCUMENT_BYTES};
pub use error::{DocError, DocErrorKind, Entity};
pub use index::Index;
pub use judge::{
    admit, admitted_until, check_stream, CertRecord, Grants, Presented, Roster, StreamPermit,
    StreamRequest, Target,
};
pub use limits::{GrantLimits, Rpm, MAX_RPM};
pub use throttle::{admit_stream, Bucket, GrantBook, GrantLimit, Refill};
pub use throughput::{
    Bandwidth, MaxConnections, Rate, RateUnit, Throughput, MAX_BANDWIDTH, MAX_CONNECTIONS,
    MAX_RATE_COUNT,
};

pub use model::{
    Action, HostPort, Hosting, Identity, IdentityId, IdentityKind, ParseHostPortError, Semantic,
    Service, ServicePolicy, State, Timestamp,
};
pub use name::{Name, NameError, MAX_NAME_LEN};
pub use plan::{plan, Change, Plan, Shown};
pub use roles::Roles;
pub use selector::{Selector, SelectorError};
