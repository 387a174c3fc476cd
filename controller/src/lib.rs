//! The Umbra controller: the certificate authority and the source of truth.
//!
//! It enrolls every identity with its own short-lived X.509 certificate (one-time token plus
//! CSR; the private key never leaves the enrollee), stores identities, services and service
//! policies in SQLite or in PostgreSQL shared by several controllers, serves the management API
//! to admins over mutual TLS, and pushes every committed change to routers over the control
//! channel, revocations included.
//!
//! It must never: issue a certificate whose subject or SANs the requester chose, accept a token
//! twice, authorize by anything but the certificate a handshake verified, or publish a change it
//! has not durably committed.

pub mod admission;
pub mod api;
pub mod audit;
mod clock;
mod core;
mod error;
pub mod metrics;
mod server;
pub mod sessions;
pub mod sinks;
pub mod store;

pub use clock::{to_timestamp, Clock};
pub use core::follow::MAX_STREAMS_PER_IDENTITY;
pub use core::hub::{WatchStats, Watcher};
pub use core::{
    files, init, join_dir, Actor, Controller, ControllerConfig, RevokedSerials, Subscription,
};
pub use error::ControllerError;
pub use server::{Server, ALPN};
pub use store::{CommitWatcher, StoreConfig};
