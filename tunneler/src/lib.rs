//! Umbra tunneler: runs beside an agent and exposes, on loopback, exactly the services its
//! identity may dial. Each accepted TCP connection becomes one overlay stream. Services the
//! identity may not dial have no listener: from the agent's side they do not exist.
//!
//! It follows the controller's per-identity view (`/v1/edge/watch`), so listeners appear and
//! disappear as grants change, without a restart. It never listens on anything but a loopback
//! address, and never decides access itself: the router authorizes every stream.

pub mod accept;
mod addresses;
mod lanes;
mod metrics;
mod plan;
mod run;

pub use addresses::{AddressBook, AddressError};
pub use plan::{desired, Mapping};
pub use run::{DeniedFn, ListenFn, TunnelError, Tunneler, TunnelerConfig};
