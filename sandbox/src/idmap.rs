//! When root starts a sandbox, the agent must still hold no more than an unprivileged user's
//! power over host files. The sandbox then runs as an unprivileged host user (the first of
//! root's subordinate ids in `/etc/subuid` and `/etc/subgid`, or `nobody`), and what it shows
//! of the host is prepared here, by the launcher, while it is still root:
//!
//! - the workspace as an **idmapped** mount (Linux 5.12+; ext4, xfs, btrfs, tmpfs…): files the
//!   invoking user (root) owns appear owned by the agent, and what the agent writes is stored as
//!   the invoking user's, so the workspace stays root's own without the agent being root;
//! - the workspace, `--ro` paths and extra files as detached mounts (`open_tree`), which the
//!   sandbox attaches inside without needing to reach their host paths itself;
//! - `nosuid` and `nodev` on all of them, read-only where asked.
//!
//! Nothing here runs without privilege; [`AgentIds::for_launcher`] says whether it is needed.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// The host user and group the sandbox runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentIds {
    /// Host uid.
    pub uid: u32,
    /// Host gid.
    pub gid: u32,
}

/// Where a sandbox's own host ids are drawn from when root has no subordinate ids: a range no
/// distribution gives to accounts (far above `nobody`, below the 32-bit ids of systemd's
/// dynamic users and container ranges in common use).
pub const SANDBOX_ID_BASE: u32 = 0x6000_0000;
/// How many ids that range holds.
pub const SANDBOX_ID_COUNT: u32 = 1 << 24;

impl AgentIds {
    /// The ids to run as when the launcher's uid is `launcher_uid`: `None` for an unprivileged
    /// launcher (the sandbox runs as that user, who holds nothing more).
    ///
    /// For root, an id of the sandbox's own, chosen by `seed` (random per sandbox): never
    /// `nobody` or any account's id, since every host process running as the same uid could
    /// enter the sandbox through `/proc` or `setns` and, through an idmapped workspace, write
    /// files as root. The first range of root's subordinate ids is used when there is one,
    /// [`SANDBOX_ID_BASE`] otherwise; ids named in the password or group file are skipped.
    pub fn for_launcher(launcher_uid: u32, seed: u64) -> Option<AgentIds> {
        if launcher_uid != 0 {
            return None;
        }
        let read = |f: &str| std::fs::read_to_string(f).unwrap_or_default();
        let taken = |text: &str| -> std::collections::HashSet<u32> {
            text.lines()
                .filter_map(|l| l.split(':').nth(2)?.parse().ok())
                .collect()
        };
        let (users, groups) = (taken(&read("/etc/passwd")), taken(&read("/etc/group")));
        let (uid_range, gid_range) = (
            subordinate(&read("/etc/subuid"), "root", 0),
            subordinate(&read("/etc/subgid"), "root", 0),
        );
        let pick = |range: Option<(u32, u32)>, taken: &std::collections::HashSet<u32>| {
            let (start, count) = range.unwrap_or((SANDBOX_ID_BASE, SANDBOX_ID_COUNT));
            (0..64u64)
                .map(|i| start + ((seed.wrapping_add(i)) % u64::from(count)) as u32)
                .find(|id| !taken.contains(id) && *id != 0 && *id != u32::MAX)
                .unwrap_or(start)
        };
        Some(AgentIds {
            uid: pick(uid_range, &users),
            gid: pick(gid_range, &groups),
        })
    }
}

/// The first range (start, count) of `user`'s (or `id`'s) subordinate ids in a
/// `/etc/subuid`-style text, if it does not hold root.
pub fn subordinate(text: &str, user: &str, id: u32) -> Option<(u32, u32)> {
    let id = id.to_string();
    text.lines().find_map(|l| {
        let mut f = l.trim().split(':');
        let (who, start, count) = (f.next()?, f.next()?, f.next()?);
        let start: u32 = start.parse().ok()?;
        let count: u32 = count.parse().ok()?;
        start.checked_add(count)?;
        ((who == user || who == id) && count > 0 && start > 0).then_some((start, count))
    })
}

fn last_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A user namespace whose uid and gid maps send 0 to `ids`: the mapping an idmapped mount
/// needs to show the invoking user's (root's) files as the agent's.
///
/// A short-lived child makes the namespace and waits; we write its maps (we are root) and
/// keep a descriptor of it. The child only makes system calls, so forking this
/// multi-threaded process is safe.
pub fn userns_mapping_root_to(ids: AgentIds) -> io::Result<OwnedFd> {
    let mut ready = [0 as libc::c_int; 2];
    let mut done = [0 as libc::c_int; 2];
    // SAFETY: two-element out-arrays for pipe2.
    unsafe {
        if libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(last_err("pipe"));
        }
        if libc::pipe2(done.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            libc::close(ready[0]);
            libc::close(ready[1]);
            return Err(last_err("pipe"));
        }
    }
    // SAFETY: fresh descriptors we own from here on.
    let (ready_r, ready_w, done_r, done_w) = unsafe {
        (
            OwnedFd::from_raw_fd(ready[0]),
            OwnedFd::from_raw_fd(ready[1]),
            OwnedFd::from_raw_fd(done[0]),
            OwnedFd::from_raw_fd(done[1]),
        )
    };
    // SAFETY: the child makes only async-signal-safe system calls and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_err("fork"));
    }
    if pid == 0 {
        // SAFETY: plain system calls on descriptors inherited from the parent.
        unsafe {
            // Our copy of the write end would keep the read below from ever seeing EOF.
            libc::close(done_w.as_raw_fd());
            libc::close(ready_r.as_raw_fd());
            let ok: u8 = u8::from(libc::unshare(libc::CLONE_NEWUSER) == 0);
            libc::write(ready_w.as_raw_fd(), (&ok as *const u8).cast(), 1);
            let mut b = 0u8;
            libc::read(done_r.as_raw_fd(), (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        }
    }
    drop(ready_w);
    drop(done_r);
    let result = (|| {
        let mut ok = [0u8; 1];
        // SAFETY: reading one byte into a valid buffer.
        let n = unsafe { libc::read(ready_r.as_raw_fd(), ok.as_mut_ptr().cast(), 1) };
        if n != 1 || ok[0] != 1 {
            return Err(io::Error::other(
                "cannot create a user namespace for the idmapped workspace",
            ));
        }
        std::fs::write(format!("/proc/{pid}/uid_map"), format!("0 {} 1\n", ids.uid))?;
        std::fs::write(format!("/proc/{pid}/gid_map"), format!("0 {} 1\n", ids.gid))?;
        let f = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
        Ok(OwnedFd::from(f))
    })();
    drop(done_w);
    let mut status = 0;
    // SAFETY: reaping our own child; status is a valid out-pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    result
}

/// What a detached mount prepared by [`set_attrs`] looks like.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attrs {
    /// Read-only.
    pub read_only: bool,
    /// Show files through this user namespace's mapping (see [`userns_mapping_root_to`]).
    pub idmap: Option<std::os::fd::RawFd>,
}

/// Opens `path` (canonical) as an `O_PATH` descriptor, refusing any symbolic link on the way:
/// a path that was checked is then shown by what this descriptor names, never by a second walk
/// of the path that a concurrent rename (an agent in a sandbox that shows a parent) could
/// redirect.
pub fn open_exact(path: &Path) -> io::Result<OwnedFd> {
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .map_err(|_| io::Error::other("a path holds a NUL byte"))?;
    // SAFETY: open_how is plain data; zeroed is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: a valid C string and an open_how of its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "{}: {e} (it changed while being checked, or a part of it is a symbolic link)",
                path.display()
            ),
        ));
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The device and inode `fd` names: what the sandbox checks a path it opens itself against.
pub fn identity_of(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    // SAFETY: `stat` is plain data, for which all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(last_err("fstat"));
    }
    Ok((st.st_dev, st.st_ino))
}

/// A detached copy of the mount that `fd` (from [`open_exact`]) names: this directory or file
/// only, not what is mounted below it, so what a scan of it sees is what the sandbox shows.
pub fn clone_tree(fd: &OwnedFd) -> io::Result<OwnedFd> {
    let empty = c"";
    // SAFETY: a valid descriptor, an empty path with AT_EMPTY_PATH; flags only.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            fd.as_raw_fd(),
            empty.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_EMPTY_PATH as u32,
        )
    };
    if tree < 0 {
        return Err(last_err("open_tree"));
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(tree as i32) })
}

/// Makes the detached mount `tree` `nosuid` and `nodev`, with `attrs`. The sandbox attaches it
/// with `move_mount`. `path` names it in errors.
pub fn set_attrs(tree: &OwnedFd, attrs: Attrs, path: &Path) -> io::Result<()> {
    let mut set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if attrs.read_only {
        set |= libc::MOUNT_ATTR_RDONLY;
    }
    // SAFETY: mount_attr is plain data; zeroed is valid.
    let mut attr: libc::mount_attr = unsafe { std::mem::zeroed() };
    if let Some(ns) = attrs.idmap {
        set |= libc::MOUNT_ATTR_IDMAP;
        attr.userns_fd = ns as u64;
    }
    attr.attr_set = set;
    let empty = c"";
    // SAFETY: valid descriptor, empty path with AT_EMPTY_PATH, and a mount_attr of its size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        let hint = if attrs.idmap.is_some() && e.raw_os_error() == Some(libc::EINVAL) {
            " (its filesystem cannot map file owners; run `umbra run` as an unprivileged user, or use a workspace on ext4, xfs, btrfs or tmpfs)"
        } else {
            ""
        };
        return Err(io::Error::new(
            e.kind(),
            format!("preparing {}: {e}{hint}", path.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ids_come_from_the_first_matching_range() {
        let text = "alice:100000:65536\nroot:200000:65536\n0:300000:10\n";
        assert_eq!(subordinate(text, "root", 0), Some((200_000, 65536)));
        assert_eq!(subordinate("0:300000:10\n", "root", 0), Some((300_000, 10)));
        assert_eq!(
            subordinate("root:0:65536\n", "root", 0),
            None,
            "starts at root"
        );
        assert_eq!(subordinate("root:x:1\nroot:5:0\n", "root", 0), None);
        assert_eq!(
            subordinate("root:4294967000:65536\n", "root", 0),
            None,
            "overflows"
        );
        assert_eq!(subordinate("", "root", 0), None);
    }

    #[test]
    fn roots_sandboxes_get_ids_of_their_own() {
        assert_eq!(AgentIds::for_launcher(1000, 7), None);
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        for seed in 0..200u64 {
            let ids = AgentIds::for_launcher(0, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)).unwrap();
            assert_ne!(ids.uid, 0);
            assert_ne!(ids.gid, 0);
            assert_ne!(ids.uid, 65534, "never nobody");
            assert!(
                !passwd
                    .lines()
                    .any(|l| l.split(':').nth(2) == Some(&ids.uid.to_string())),
                "{} is an account's uid",
                ids.uid
            );
            seen.insert(ids.uid);
        }
        assert!(seen.len() > 190, "ids repeat: {}", seen.len());
    }
}
