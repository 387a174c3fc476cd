//! Umbra's transport: what both ends of an overlay QUIC connection share, the SDK's clients
//! (and so tunnelers and gateways) and the edge routers. QUIC settings and connection ids
//! ([`quic`]), congestion control that keeps its queue short ([`congestion`]), busy polling
//! of data-plane threads ([`busy_poll`]) and moving bytes between QUIC streams and sockets
//! without copies ([`splice`]).
//!
//! Its own crate so that the SDK's public API is what a program needs (contexts, streams,
//! listeners) and not the router's internals, while both still use one implementation. It
//! knows nothing of identities, policies or the controller.

pub mod busy_poll;
pub mod congestion;
pub mod quic;
pub mod splice;
