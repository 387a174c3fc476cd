//! A process held by a pidfd, so that what is opened through `/proc/PID/...` in several steps
//! is known to be one process's: a PID is only a number, and the process behind it may exit
//! between two steps and the number be given to another (an agent can exit on purpose, and
//! fork until its number comes round in another container).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A process, pinned: its PID cannot name another process while [`Pinned::alive`] says yes.
#[derive(Debug)]
pub struct Pinned {
    fd: OwnedFd,
    pid: u32,
}

impl Pinned {
    /// Pins the process `pid` now.
    pub fn open(pid: u32) -> io::Result<Pinned> {
        let raw = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("no such process"))?;
        // SAFETY: pidfd_open takes a pid and flags; the result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Pinned { fd, pid })
    }

    /// The PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process has not been reaped yet (a zombie keeps its number too): while it
    /// has not, its PID names it and nothing else, so `/proc/PID` is still its.
    pub fn alive(&self) -> bool {
        // SAFETY: signal 0 only checks; no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        r == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_process_is_alive_until_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pin = Pinned::open(child.id()).expect("pidfd");
        assert_eq!(pin.pid(), child.id());
        assert!(pin.alive());
        child.kill().expect("kill");
        child.wait().expect("reaped");
        assert!(!pin.alive());
    }
}
