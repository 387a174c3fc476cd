//! Socket buffer bounds inside the sandbox's network namespace.
//!
//! An agent that writes to a loopback connection nobody reads parks the data in kernel socket
//! buffers, which are not the agent's pages: with only an address-space rlimit (no cgroup) they
//! are not counted at all, and each socket may grow to the host's `tcp_rmem`/`tcp_wmem`
//! maximum (tens of MiB on a tuned host). The maxima are per network namespace since Linux
//! 4.15, so the sandbox's init, root in the namespace's owner, lowers them in its own namespace
//! before `/proc/sys` is made read-only. The sockets the launcher accepts there (the tunneler's
//! and the DNS responder's) are bounded by the same values. This bounds each socket; the total
//! is bounded by the memory cgroup (v1 `memory.kmem.tcp`, v2 `memory.max`), see
//! [`crate::cgroup`].

use std::path::Path;

/// The largest receive or send buffer one socket in the sandbox may grow to. Loopback has
/// microsecond round trips, so a few MiB is still more than a full-speed transfer needs.
pub const MAX_SOCKET_BUFFER: u64 = 4 << 20;

/// `min default max` with `max` (and `default`, which may not exceed it) lowered to `cap`;
/// `None` when the text is not three numbers.
pub fn bounded(current: &str, cap: u64) -> Option<String> {
    let v: Vec<u64> = current
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    let [min, default, max] = v[..] else {
        return None;
    };
    let max = max.min(cap);
    Some(format!("{} {} {}", min.min(max), default.min(max), max))
}

/// Lowers `net/ipv4/tcp_rmem` and `tcp_wmem` under `proc_sys` (the sandbox's `/proc/sys`, in
/// its own network namespace) to [`MAX_SOCKET_BUFFER`]. A kernel without the files (no IPv4)
/// has nothing to bound; one that refuses the write fails the sandbox, since the bound is what
/// the caller relies on.
pub fn bound_socket_buffers(proc_sys: &Path) -> Result<(), String> {
    for name in ["tcp_rmem", "tcp_wmem"] {
        let path = proc_sys.join("net/ipv4").join(name);
        let Ok(current) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Some(value) = bounded(&current, MAX_SOCKET_BUFFER) else {
            return Err(format!(
                "{}: unexpected contents {current:?}",
                path.display()
            ));
        };
        std::fs::write(&path, value)
            .map_err(|e| format!("bounding socket buffers: {}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maxima_are_lowered_and_never_raised() {
        assert_eq!(
            bounded("4096\t131072\t33554432\n", 4 << 20).as_deref(),
            Some("4096 131072 4194304")
        );
        assert_eq!(
            bounded("4096 16384 1048576", 4 << 20).as_deref(),
            Some("4096 16384 1048576")
        );
        assert_eq!(
            bounded("4096 8388608 16777216", 1 << 20).as_deref(),
            Some("4096 1048576 1048576")
        );
        for bad in ["", "1 2", "a b c", "1 2 3 4"] {
            assert_eq!(bounded(bad, 1), None, "{bad}");
        }
    }
}
