//! Landlock: the filesystem rules the agent runs under, at the best ABI the kernel offers.
//!
//! The mount namespace already shows the agent only what it may see; Landlock is the second,
//! independent wall: even a path that a mount mistake left visible cannot be written unless a rule
//! here names it. Rules are few and coarse on purpose: read-write beneath the workspace, the
//! private /tmp and a handful of devices; read and execute beneath the system paths and the `--ro`
//! paths; nothing else. From ABI 6 the agent also cannot signal processes outside its domain or
//! connect to abstract Unix sockets created outside it.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: libc::c_int = 1;

const EXECUTE: u64 = 1 << 0;
const WRITE_FILE: u64 = 1 << 1;
const READ_FILE: u64 = 1 << 2;
const READ_DIR: u64 = 1 << 3;
const REMOVE_DIR: u64 = 1 << 4;
const REMOVE_FILE: u64 = 1 << 5;
const MAKE_CHAR: u64 = 1 << 6;
const MAKE_DIR: u64 = 1 << 7;
const MAKE_REG: u64 = 1 << 8;
const MAKE_SOCK: u64 = 1 << 9;
const MAKE_FIFO: u64 = 1 << 10;
const MAKE_BLOCK: u64 = 1 << 11;
const MAKE_SYM: u64 = 1 << 12;
const REFER: u64 = 1 << 13;
const TRUNCATE: u64 = 1 << 14;
const IOCTL_DEV: u64 = 1 << 15;

const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;

/// What a rule grants beneath a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read files and list directories.
    Read,
    /// Read and execute.
    ReadExec,
    /// Everything, including creating, removing and executing files.
    ReadWrite,
    /// Read and write existing files (devices such as `/dev/null`), nothing else.
    Device,
    /// List directories, read no file: lets `ls /` work without granting what lies below.
    List,
}

/// The kernel's Landlock ABI version, or `None` when Landlock is absent or disabled.
pub fn abi() -> Option<u32> {
    // SAFETY: the version query takes no pointer and returns a number or -1.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(v).ok().filter(|v| *v > 0)
}

fn handled_fs(abi: u32) -> u64 {
    let mut a = EXECUTE
        | WRITE_FILE
        | READ_FILE
        | READ_DIR
        | REMOVE_DIR
        | REMOVE_FILE
        | MAKE_CHAR
        | MAKE_DIR
        | MAKE_REG
        | MAKE_SOCK
        | MAKE_FIFO
        | MAKE_BLOCK
        | MAKE_SYM;
    if abi >= 2 {
        a |= REFER;
    }
    if abi >= 3 {
        a |= TRUNCATE;
    }
    if abi >= 5 {
        a |= IOCTL_DEV;
    }
    a
}

fn rights(access: Access, handled: u64) -> u64 {
    let read = READ_FILE | READ_DIR;
    let r = match access {
        Access::Read => read,
        Access::ReadExec => read | EXECUTE,
        Access::Device => READ_FILE | WRITE_FILE | TRUNCATE | IOCTL_DEV,
        Access::List => READ_DIR,
        // Devices cannot be made inside the workspace: MAKE_CHAR and MAKE_BLOCK stay out.
        Access::ReadWrite => handled & !(MAKE_CHAR | MAKE_BLOCK | IOCTL_DEV),
    };
    r & handled
}

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// A ruleset being built; [`Ruleset::restrict_self`] applies it to the calling thread for good.
#[derive(Debug)]
pub struct Ruleset {
    fd: libc::c_int,
    abi: u32,
    handled: u64,
}

impl Ruleset {
    /// A ruleset that handles every filesystem right the kernel knows, and from ABI 6 the
    /// signal and abstract-socket scopes.
    pub fn new() -> io::Result<Ruleset> {
        let abi = abi().ok_or_else(|| io::Error::other("Landlock is not available"))?;
        let handled = handled_fs(abi);
        let attr = RulesetAttr {
            handled_access_fs: handled,
            handled_access_net: 0,
            scoped: if abi >= 6 {
                SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
            } else {
                0
            },
        };
        // Older kernels reject fields they do not know: pass only the prefix they understand.
        let size = if abi >= 6 {
            24
        } else if abi >= 4 {
            16
        } else {
            8
        };
        // SAFETY: `attr` is a valid ruleset attribute of at least `size` bytes.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                size as libc::size_t,
                0u32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Ruleset {
            fd: fd as libc::c_int,
            abi,
            handled,
        })
    }

    /// The ABI in use.
    pub fn abi(&self) -> u32 {
        self.abi
    }

    /// Grants `access` beneath `path`. A path that does not exist is skipped: there is
    /// nothing beneath it to grant.
    pub fn allow(&mut self, path: &Path, access: Access) -> io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::other("path holds a NUL byte"))?;
        // SAFETY: `c` is a valid C string; O_PATH opens without reading.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::NotFound {
                return Ok(());
            }
            return Err(e);
        }
        let mut allowed = rights(access, self.handled);
        // Directory-only rights on a file are refused by the kernel.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is open and `st` is a valid out-pointer.
        if unsafe { libc::fstat(fd, &mut st) } == 0 && (st.st_mode & libc::S_IFMT) != libc::S_IFDIR
        {
            allowed &= EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;
        }
        let attr = PathBeneathAttr {
            allowed_access: allowed,
            parent_fd: fd,
        };
        // SAFETY: `attr` is a valid rule for the ruleset fd we own.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                self.fd,
                RULE_PATH_BENEATH,
                &attr as *const PathBeneathAttr,
                0u32,
            )
        };
        let e = io::Error::last_os_error();
        // SAFETY: we opened `fd` above.
        unsafe { libc::close(fd) };
        if r != 0 {
            return Err(io::Error::new(
                e.kind(),
                format!("landlock rule for {}: {e}", path.display()),
            ));
        }
        Ok(())
    }

    /// Applies the rules to this thread and everything it starts. Requires `no_new_privs`.
    pub fn restrict_self(self) -> io::Result<()> {
        // SAFETY: the fd is the ruleset we built.
        let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, self.fd, 0u32) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Ruleset {
    fn drop(&mut self) {
        // SAFETY: the fd is ours and closed once.
        unsafe { libc::close(self.fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_never_exceed_what_is_handled() {
        for abi in 1..=7 {
            let h = handled_fs(abi);
            for a in [
                Access::Read,
                Access::ReadExec,
                Access::ReadWrite,
                Access::Device,
                Access::List,
            ] {
                assert_eq!(rights(a, h) & !h, 0, "abi {abi} {a:?}");
            }
            assert_eq!(rights(Access::Read, h) & (WRITE_FILE | EXECUTE), 0);
            assert_eq!(rights(Access::ReadWrite, h) & (MAKE_CHAR | MAKE_BLOCK), 0);
        }
        assert_eq!(handled_fs(1) & REFER, 0);
        assert_ne!(handled_fs(2) & REFER, 0);
    }
}
