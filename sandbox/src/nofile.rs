//! The launcher's descriptor limit, raised for the launcher and not for the agent.
//!
//! The launcher holds a descriptor for every connection the agent makes to its tunneler and DNS
//! responder, plus its own. A soft limit of 1024 (the usual default) is then a resource the
//! agent can exhaust, after which the launcher cannot even reach its controller to learn of a
//! revocation. So the launcher raises its soft limit to the hard limit. The agent must still
//! start with the limit it would have had without Umbra: programs that use `select(2)` break on
//! descriptors past 1024, which is why the soft limit is low by default. A child spawned before
//! [`raise`] keeps the original; one spawned after calls [`restore_in_child`] between fork and
//! exec.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// The soft limit before [`raise`], or `u64::MAX` when it was never raised.
static ORIGINAL_SOFT: AtomicU64 = AtomicU64::new(u64::MAX);

fn get() -> io::Result<libc::rlimit> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(l)
}

fn set(l: &libc::rlimit) -> io::Result<()> {
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, l) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises this process's soft descriptor limit to its hard limit; returns the new soft limit.
/// Idempotent: the original is remembered from the first call.
pub fn raise() -> io::Result<u64> {
    let l = get()?;
    if l.rlim_cur >= l.rlim_max {
        return Ok(l.rlim_cur);
    }
    let _ =
        ORIGINAL_SOFT.compare_exchange(u64::MAX, l.rlim_cur, Ordering::SeqCst, Ordering::SeqCst);
    set(&libc::rlimit {
        rlim_cur: l.rlim_max,
        rlim_max: l.rlim_max,
    })?;
    Ok(l.rlim_max)
}

/// The soft limit this process had before [`raise`], if it raised it.
pub fn original_soft() -> Option<u64> {
    let v = ORIGINAL_SOFT.load(Ordering::SeqCst);
    (v != u64::MAX).then_some(v)
}

/// Puts the soft limit back to what it was before [`raise`]. Async-signal-safe (two system
/// calls and an atomic load), for a `pre_exec` hook between fork and exec.
pub fn restore_in_child() -> io::Result<()> {
    let Some(soft) = original_soft() else {
        return Ok(());
    };
    let l = get()?;
    set(&libc::rlimit {
        rlim_cur: soft.min(l.rlim_max),
        rlim_max: l.rlim_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_then_restore_in_a_child() {
        // Start from a low soft limit, as most systems give one, so the test means something.
        let hard = get().unwrap().rlim_max;
        set(&libc::rlimit {
            rlim_cur: hard.min(1024),
            rlim_max: hard,
        })
        .unwrap();
        let before = get().unwrap();
        let raised = raise().unwrap();
        assert_eq!(raised, before.rlim_max);
        assert_eq!(get().unwrap().rlim_cur, before.rlim_max);
        // The restore runs in a forked child, as a pre_exec hook would.
        let out = std::process::Command::new("/bin/sh")
            .args(["-c", "ulimit -n"])
            .output()
            .unwrap();
        let inherited: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        assert_eq!(
            inherited, before.rlim_max,
            "without a restore the child inherits"
        );
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", "ulimit -n"]);
        // SAFETY: restore_in_child is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, restore_in_child);
        }
        let out = cmd.output().unwrap();
        let soft: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        assert_eq!(soft, original_soft().unwrap_or(before.rlim_cur));
    }
}
