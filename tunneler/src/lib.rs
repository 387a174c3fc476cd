//! Umbra tunneler: runs beside an agent and exposes, on loopback, exactly the services its
//! identity may dial; unauthorized services do not exist from the agent's side. (Built in the
//! data-plane issue.)
#![forbid(unsafe_code)]
