//! What the sandbox's first process is told: the plan for the agent's world, sent over a socket
//! (never the environment or the command line, which the agent could read back).

use std::io::{self, Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The uid and gid the agent has inside its namespace. It maps to the invoking user outside, so
/// the files it writes in the workspace belong to whoever ran `umbra run`.
pub const AGENT_UID: u32 = 1000;
/// See [`AGENT_UID`].
pub const AGENT_GID: u32 = 1000;

/// Largest spec accepted, so that a confused peer cannot make the init allocate without bound.
const MAX_SPEC: u32 = 1 << 20;

/// The plan for one sandbox, as the init process receives it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// The sandbox's id (also its host name and cgroup name).
    pub id: String,
    /// An empty host directory the new root is mounted on (inside the new mount namespace only).
    pub root: PathBuf,
    /// The workspace: read-write, at the same path inside, and the working directory.
    pub workspace: PathBuf,
    /// Paths that must never be visible: covered with an empty file or directory if a mount
    /// above would show them.
    pub hide: Vec<PathBuf>,
    /// Where the workspace, `--ro` paths and extra files come from: host paths the sandbox binds
    /// itself, or mounts the launcher prepared (see [`crate::idmap`]), in that order.
    pub sources: Vec<Source>,
    /// The host file shown as `/etc/hosts` (rewritten in place as grants change).
    pub hosts_file: PathBuf,
    /// `/etc/resolv.conf` inside.
    pub resolv_conf: String,
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// The agent's whole environment.
    pub env: Vec<(String, String)>,
    /// Run without Landlock if the kernel lacks it.
    pub allow_degraded: bool,
    /// Memory limit enforced by `RLIMIT_AS` because no cgroup controller can.
    pub rlimit_memory: Option<u64>,
    /// Process limit enforced by `RLIMIT_NPROC` because no cgroup controller can.
    pub rlimit_pids: Option<u64>,
}

/// One host path shown inside.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Source {
    /// Where it appears inside.
    pub at: PathBuf,
    /// Where it comes from.
    pub from: From,
    /// Shown read-only.
    pub read_only: bool,
}

/// Where a shown path comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum From {
    /// A host path, bound by the sandbox itself (`nosuid`, `nodev`) only if, opened without
    /// following links, it is still the file the launcher checked (device and inode).
    Path {
        /// The host path.
        path: PathBuf,
        /// Its device, as the launcher saw it.
        dev: u64,
        /// Its inode, as the launcher saw it.
        ino: u64,
    },
    /// A detached mount the launcher made, passed on this descriptor.
    Fd(i32),
}

/// Writes one length-prefixed frame.
pub fn write_frame(w: &mut impl Write, spec: &Spec) -> io::Result<()> {
    let body = serde_json::to_vec(spec).map_err(io::Error::other)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_SPEC)
        .ok_or_else(|| io::Error::other("sandbox spec too large"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(&body)?;
    w.flush()
}

/// Reads one length-prefixed frame.
pub fn read_frame(r: &mut impl Read) -> io::Result<Spec> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len > MAX_SPEC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "sandbox spec too large",
        ));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_refuse_garbage() {
        let spec = Spec {
            id: "t".into(),
            root: "/r".into(),
            workspace: "/w".into(),
            hide: vec!["/root".into()],
            sources: vec![Source {
                at: "/w".into(),
                from: From::Fd(5),
                read_only: false,
            }],
            hosts_file: "/h".into(),
            resolv_conf: "nameserver 127.0.0.53\n".into(),
            argv: vec!["true".into()],
            env: vec![("PATH".into(), "/bin".into())],
            allow_degraded: false,
            rlimit_memory: None,
            rlimit_pids: None,
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &spec).unwrap();
        let back = read_frame(&mut buf.as_slice()).unwrap();
        assert_eq!(back.argv, spec.argv);
        assert_eq!(back.sources, spec.sources);
        assert!(read_frame(&mut [0xff, 0xff, 0xff, 0xff].as_slice()).is_err());
        assert!(read_frame(&mut [0, 0, 0, 2, b'{', b'x'].as_slice()).is_err());
        assert!(read_frame(&mut [0, 0].as_slice()).is_err());
    }
}
