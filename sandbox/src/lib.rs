//! Umbra's agent sandbox: one agent process tree in its own user, network, mount, PID, IPC and UTS
//! namespaces, a filesystem that holds only the workspace (read-write), a private /tmp and the
//! system paths (read-only), Landlock and seccomp on top, and cgroup limits around it.
//!
//! The network namespace holds only `lo`. The launcher, which stays outside, creates listening
//! sockets inside it on the tunneler's behalf ([`NetNs`]), so the agent's only way out is the
//! overlay, along the paths its identity was granted, with names from Umbra's own responder
//! ([`dns`]).
//!
//! Layout of the processes: the launcher (`umbra run`, multi-threaded) spawns
//! `umbra __sandbox-init` ([`init::main`]), which makes the namespaces and forks pid 1 of the new
//! PID namespace; pid 1 builds the root filesystem, forks the agent and reaps. The agent confines
//! itself (capabilities, `no_new_privs`, Landlock, seccomp) and executes the command.

pub mod cgroup;
pub mod container_files;
pub mod dns;
pub mod events;
pub mod exposure;
pub mod fdpass;
pub mod idmap;
pub mod init;
pub mod landlock;
mod launch;
pub mod netns_join;
pub mod nofile;
pub mod pidpin;
pub mod probe;

pub mod seccomp;
pub mod sockbuf;
pub mod spec;

pub use cgroup::{Cgroup, Limits};
pub use launch::{hosts_file, NetNs, Prepared, Running, SandboxConfig, SandboxError};

/// The file that marks a controller's directory (`umbra_controller::files::DB`; the binary
/// checks the two agree). A shown path that holds one is refused.
pub const CONTROLLER_DB: &str = "umbra.db";

/// Exit codes of `umbra run` that are its own rather than the agent's. An agent that exits by
/// itself passes its code through; one killed by a signal gives 128 + the signal, as a shell does.
pub mod exit {
    /// The identity was revoked and the agent was terminated (kill switch).
    pub const REVOKED: i32 = 120;
    /// The agent was killed for exceeding its memory limit.
    pub const MEMORY_LIMIT: i32 = 121;
    /// The agent ran longer than `--timeout` and was killed, with everything it started.
    pub const TIMEOUT: i32 = 124;
    /// The sandbox could not be set up (or `umbra run` itself failed); the agent never ran.
    pub const SETUP: i32 = 125;
    /// The command exists but could not be executed.
    pub const NOT_EXECUTABLE: i32 = 126;
    /// The command does not exist inside the sandbox.
    pub const NOT_FOUND: i32 = 127;
}
