//! Umbra's wire messages: what the controller sends routers on the control channel (a full
//! snapshot, then ordered deltas) and what clients send routers at the start of a stream.
//!
//! Pure data and framing: no sockets, no runtime. Every decoder bounds what a peer can make it
//! allocate and refuses unknown versions instead of guessing.

pub mod api;
pub mod control;
pub mod edge;
pub mod follow;
pub mod frame;
pub mod snapshot;
pub mod stream;
pub mod verdict;

pub use control::{
    ApplyError, ChangeEvent, ControlMessage, Delta, Replica, RevokedCert, RouterInfo,
    CONTROL_PROTOCOL_VERSION,
};
pub use frame::{encode, FrameDecoder, FrameError, KEEPALIVE, MAX_CONTROL_FRAME};
pub use snapshot::{SnapshotChunk, SnapshotCounts, SnapshotMessages};
