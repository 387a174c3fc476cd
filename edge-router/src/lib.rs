//! Umbra edge router: accepts only mutually authenticated QUIC connections, authorizes every
//! stream against the policy the controller pushes, and dials the service on the caller's behalf
//! or hands the stream to an SDK host. (Built in the data-plane issue.)
#![forbid(unsafe_code)]
