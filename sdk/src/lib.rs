//! The Umbra SDK: what a program needs to be an Umbra identity.
//!
//! Today: enrollment (generate a key locally, send only a CSR with the one-time token over TLS
//! pinned to the CA fingerprint the token carries), certificate renewal, and a client for the
//! controller's HTTPS API. The data plane (dial and bind over routers) builds on these.
//!
//! It must never send a private key anywhere, trust a controller whose CA does not match the
//! pinned fingerprint, or log a token or key.
#![forbid(unsafe_code)]

mod client;
mod enroll;
mod error;

pub use client::{ControllerClient, ResponseStream};
pub use enroll::{enroll, renew};
pub use error::SdkError;
