//! The controller's only source of time, so tests can move it: the workspace's one [`Clock`]
//! (`umbra-clock`), re-exported so that callers configuring a controller need not name it.

pub use umbra_clock::{to_timestamp, Clock};
