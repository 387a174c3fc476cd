//! The Umbra SDK: what a program needs to be an Umbra identity.
//!
//! Enrollment (generate a key locally, send only a CSR with the one-time token over TLS pinned to
//! the CA fingerprint the token carries), certificate renewal (automatic in a [`Context`], or
//! for any long-running process with [`RenewingIdentity`]), a client for the controller's
//! HTTPS API, and the data plane: [`Context::dial`] opens a stream to a service through an edge
//! router, [`Context::bind`] hosts one with no listening port.
//!
//! It must never send a private key anywhere, trust a controller whose CA does not match the
//! pinned fingerprint, trust a router that is not a router of its own trust domain, or log a
//! token or key. A router at an address the controller lists must be exactly the router listed
//! there (its SPIFFE id), not just any router.

mod client;
mod context;
mod credentials;
mod enroll;
mod error;
mod failover;
mod listener;
mod renewal;
mod splice;
mod stream;
mod sync;

pub use client::{ControllerClient, ResponseStream};
pub use context::{Caller, Context, Early, EdgeWatch};
pub use credentials::Credentials;
pub use enroll::{enroll, renew};
pub use error::SdkError;
pub use listener::Listener;
pub use renewal::{renewal_delay, RenewingIdentity, ISSUE_BACKDATE, MIN_RENEW_INTERVAL};
pub use splice::{splice, splice_metered, Meter};
pub use stream::Stream;
