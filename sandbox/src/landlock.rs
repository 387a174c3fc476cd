//! Landlock: the filesystem rules the agent runs under, at the best ABI the kernel offers.
//!
//! The mount namespace already shows the agent only what it may see; Landlock is the second,
//! independent wall: even a path that a mount mistake left visible cannot be written unless a rule
//! here names it. Rules are few and coarse on purpose: read-write beneath the workspace, the
//! private /tmp and a handful of devices; read and execute beneath the system paths and the `--ro`
//! paths; nothing else. From ABI 6 the agent also cannot signal processes outside its domain or
//! connect to abstract Unix sockets created outside it.
//!
//! The system calls and their structures are the `landlock` crate's (by the LSM's author), which
//! knows each ABI's rights. Which rights are handled is decided here from the kernel's ABI, and
//! the crate is told to treat every one of them as a hard requirement, so that nothing is dropped
//! silently: a ruleset either holds exactly these rules or is not built.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use landlock::{
    Access as _, AccessFs, BitFlags, CompatLevel, Compatible as _, PathBeneath, RulesetAttr as _,
    RulesetCreated, RulesetCreatedAttr as _, Scope, ABI,
};

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
    // SAFETY: the version query (LANDLOCK_CREATE_RULESET_VERSION) takes no pointer and returns
    // a number or -1; the crate does not expose it.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    u32::try_from(v).ok().filter(|v| *v > 0)
}

/// The newest ABI whose rights these rules were written and tested against. A newer kernel (or
/// crate) brings new rights, such as ABI 9's right to connect to pathname Unix sockets; handling
/// one denies it everywhere no rule grants it, so each is adopted deliberately, with tests, and
/// never by upgrading a crate.
const NEWEST_ABI: u32 = 6;

/// The crate's name for a kernel ABI, capped at [`NEWEST_ABI`].
fn crate_abi(abi: u32) -> ABI {
    ABI::from(i32::try_from(abi.min(NEWEST_ABI)).unwrap_or(1))
}

/// Every filesystem right the ABI knows: all are handled, so all are denied unless granted.
fn handled_fs(abi: u32) -> BitFlags<AccessFs> {
    AccessFs::from_all(crate_abi(abi))
}

/// The scopes the ABI knows (none before ABI 6).
fn scopes(abi: u32) -> BitFlags<Scope> {
    Scope::from_all(crate_abi(abi))
}

fn rights(access: Access, handled: BitFlags<AccessFs>) -> BitFlags<AccessFs> {
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let r = match access {
        Access::Read => read,
        Access::ReadExec => read | AccessFs::Execute,
        Access::Device => {
            AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev
        }
        Access::List => AccessFs::ReadDir.into(),
        // Devices cannot be made inside the workspace: MakeChar and MakeBlock stay out.
        Access::ReadWrite => {
            handled & !(AccessFs::MakeChar | AccessFs::MakeBlock | AccessFs::IoctlDev)
        }
    };
    r & handled
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// A ruleset being built; [`Ruleset::restrict_self`] applies it to the calling thread for good.
#[derive(Debug)]
pub struct Ruleset {
    created: RulesetCreated,
    abi: u32,
    handled: BitFlags<AccessFs>,
}

impl Ruleset {
    /// A ruleset that handles every filesystem right the kernel knows, and from ABI 6 the
    /// signal and abstract-socket scopes.
    pub fn new() -> io::Result<Ruleset> {
        let abi = abi().ok_or_else(|| io::Error::other("Landlock is not available"))?;
        let handled = handled_fs(abi);
        let mut ruleset = landlock::Ruleset::default()
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(handled)
            .map_err(other)?;
        let scoped = scopes(abi);
        if !scoped.is_empty() {
            ruleset = ruleset.scope(scoped).map_err(other)?;
        }
        let created = ruleset.create().map_err(other)?;
        Ok(Ruleset {
            created,
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
        // O_PATH opens without reading (and without the right to), only to name the file.
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut allowed = rights(access, self.handled);
        // Directory-only rights on a file are refused by the kernel.
        if !File::metadata(&file).is_ok_and(|m| m.is_dir()) {
            allowed &= AccessFs::from_file(crate_abi(self.abi));
        }
        (&mut self.created)
            .add_rule(PathBeneath::new(&file, allowed))
            .map_err(|e| other(format!("landlock rule for {}: {e}", path.display())))?;
        Ok(())
    }

    /// Applies the rules to this thread and everything it starts. Requires `no_new_privs`.
    pub fn restrict_self(self) -> io::Result<()> {
        self.created.restrict_self().map_err(other)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rights' bit values as the kernel's uapi header numbers them: the crate must hand the
    /// kernel exactly the sets the hand-written rules did.
    const EXECUTE: u64 = 1 << 0;
    const WRITE_FILE: u64 = 1 << 1;
    const MAKE_CHAR: u64 = 1 << 6;
    const MAKE_BLOCK: u64 = 1 << 11;
    const REFER: u64 = 1 << 13;

    #[test]
    fn handled_rights_are_the_kernels_per_abi() {
        assert_eq!(
            handled_fs(1).bits(),
            (1 << 13) - 1,
            "execute through make_sym"
        );
        assert_eq!(handled_fs(2).bits(), (1 << 14) - 1, "and refer");
        assert_eq!(handled_fs(3).bits(), (1 << 15) - 1, "and truncate");
        assert_eq!(
            handled_fs(4).bits(),
            (1 << 15) - 1,
            "ABI 4 adds network rights only"
        );
        assert_eq!(handled_fs(5).bits(), (1 << 16) - 1, "and ioctl_dev");
        assert_eq!(
            handled_fs(9).bits(),
            (1 << 16) - 1,
            "newer rights are not handled"
        );
        assert_eq!(scopes(5).bits(), 0);
        assert_eq!(scopes(6).bits(), 0b11, "abstract unix sockets and signals");
        assert_eq!(scopes(9).bits(), 0b11);
    }

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
                assert_eq!(rights(a, h) & !h, BitFlags::EMPTY, "abi {abi} {a:?}");
            }
            assert_eq!(rights(Access::Read, h).bits() & (WRITE_FILE | EXECUTE), 0);
            assert_eq!(
                rights(Access::ReadWrite, h).bits() & (MAKE_CHAR | MAKE_BLOCK),
                0
            );
        }
        assert_eq!(handled_fs(1).bits() & REFER, 0);
        assert_ne!(handled_fs(2).bits() & REFER, 0);
    }
}
