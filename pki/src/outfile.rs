//! The one way Umbra writes a file: [`write_file`] for whole files (identity files, keys,
//! tokens, certificates, exports) and [`open_append`] for logs (ledgers, audit and event files).
//!
//! Why this exists: writing "a fresh temporary file renamed over the target" is right for a
//! regular file (a crash leaves the old or the new content, and a key is never readable by others
//! even briefly), but wrong for anything else. `umbra identity create X -o /dev/null`, run as
//! root, once replaced `/dev/null` with a regular 0600 file. So every write first looks at what
//! the path names and applies one rule per kind:
//!
//! | target | what happens |
//! |---|---|
//! | missing | created with `mode` (exactly, whatever the umask): temporary file in the same directory, fsync, rename |
//! | regular file | replaced the same way; the new file's mode is the intersection of the old mode and `mode`, so a rewrite never widens access |
//! | symbolic link | followed to its final target, which is then treated by these same rules (the link stays) |
//! | FIFO, character device | opened for writing and written in place: never renamed over, never chmod'ed |
//! | dangling link, directory, socket, block device, anything else | refused with [`OutFileError::Refused`], nothing written |
//!
//! FIFOs and devices are opened with `O_NONBLOCK` (and `O_NOCTTY`), which is then cleared before
//! writing. For a FIFO this means "nobody is reading" fails at once ([`OutFileError::NoReader`])
//! instead of hanging the command forever; once a reader is there, writes block normally so a slow
//! reader gets every byte. For a terminal it means the open never waits for a carrier line.
//!
//! [`check_target`] applies the same classification without writing, so a command can refuse a
//! bad `-o` before it spends something on the server (an enrollment token, an identity).
//!
//! Races: the kind is checked when the write starts, and again right before the rename (a path
//! that stopped being missing or regular is not renamed over) or on the opened descriptor (a
//! device or FIFO must still be the same inode). Someone who can write to the target's directory
//! can still swap things in the instants between; they could replace our file afterwards anyway.
//!
//! Unix only, like the rest of Umbra.

use std::ffi::OsString;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;
use rustix::fs::{Access, OFlags};

/// Why a path was refused as an output without anything being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// A directory: writing "into" it would need a file name we would have to invent.
    #[error("it is a directory")]
    Directory,
    /// A Unix socket: it cannot be opened as a file, and renaming over it would break its server.
    #[error("it is a socket")]
    Socket,
    /// A block device: writing a few hundred bytes over a disk is never what was meant.
    #[error("it is a block device")]
    BlockDevice,
    /// A symbolic link whose target does not exist. Creating the target behind a link is how a
    /// planted link redirects a secret, so it is refused rather than guessed.
    #[error("it is a symbolic link to nothing")]
    DanglingSymlink,
    /// A symbolic link in a sticky, world-writable directory (such as `/tmp`) owned by neither
    /// us nor the directory's owner: anyone could have planted it to redirect a secret (or a
    /// root-owned write) to a file of their choosing. The kernel's `protected_symlinks` rule,
    /// applied here too because resolving a link with `readlink` would bypass it.
    #[error("it is a symbolic link someone else planted in a shared directory")]
    UntrustedSymlink,
    /// The path ends in `/` or `..`, or is empty: it cannot name a file.
    #[error("it does not name a file")]
    NotAFileName,
    /// A FIFO or device where a database must go: SQLite needs a regular file it can seek and
    /// lock.
    #[error("a database needs a regular file")]
    NotADatabase,
    /// Any other kind of file (for example a Solaris door).
    #[error("it is not a regular file, FIFO or character device")]
    Other,
}

/// Writing an output file failed; every variant names the path the caller gave.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutFileError {
    /// The path names something Umbra must not write to; nothing was written.
    #[error("{}: refusing to write: {reason}", path.display())]
    Refused {
        /// The path as given.
        path: PathBuf,
        /// What the path names.
        reason: Refusal,
    },
    /// The path is a FIFO that no process has open for reading. Waiting would hang the command
    /// with no sign of why, so it fails instead.
    #[error("{}: nobody is reading from this FIFO", path.display())]
    NoReader {
        /// The FIFO.
        path: PathBuf,
    },
    /// What the path names changed kind (or inode) between the check and the write. Nothing was
    /// renamed over it.
    #[error("{}: the file changed while being written; not written", path.display())]
    Changed {
        /// The path as given.
        path: PathBuf,
    },
    /// The operating system refused an operation on the path (or on its directory).
    #[error("{}: {source}", path.display())]
    Io {
        /// The path as given.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
}

/// What an acceptable output path names now, as found by [`check_target`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TargetKind {
    /// Nothing: the file will be created.
    Missing,
    /// A regular file (possibly behind symbolic links): it will be replaced atomically.
    Regular,
    /// A FIFO: it will be written in place, and needs a reader at that time.
    Fifo,
    /// A character device (`/dev/null`, a terminal): it will be written in place.
    CharDevice,
}

/// A path, classified: the kind it names, the path to act on, and what `stat` said.
struct Resolved {
    kind: TargetKind,
    /// For a regular file: its canonical path (symbolic links resolved), so that the temporary
    /// file goes next to the real file and the rename replaces it rather than the link. For a
    /// missing file: the path as given. For a FIFO or device: the path as given, opened through
    /// any links (this keeps `/dev/fd/N` and `/dev/stdout` working: they are links to pipes
    /// that have no path of their own).
    act_on: PathBuf,
    meta: Option<Metadata>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OutFileError + '_ {
    move |source| OutFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn refused(path: &Path, reason: Refusal) -> OutFileError {
    OutFileError::Refused {
        path: path.to_path_buf(),
        reason,
    }
}

/// Maps a file type to a kind we write, or to the reason it is refused.
fn classify(meta: &Metadata) -> Result<TargetKind, Refusal> {
    let t = meta.file_type();
    if t.is_file() {
        Ok(TargetKind::Regular)
    } else if t.is_fifo() {
        Ok(TargetKind::Fifo)
    } else if t.is_char_device() {
        Ok(TargetKind::CharDevice)
    } else if t.is_dir() {
        Err(Refusal::Directory)
    } else if t.is_socket() {
        Err(Refusal::Socket)
    } else if t.is_block_device() {
        Err(Refusal::BlockDevice)
    } else {
        Err(Refusal::Other)
    }
}

/// Whether `path` ends in something that cannot be a file name (`/`, `.`, `..`, nothing).
fn names_no_file(path: &Path) -> bool {
    let bytes = path.as_os_str().as_bytes();
    bytes.is_empty() || bytes.ends_with(b"/") || path.file_name().is_none()
}

fn resolve(path: &Path) -> Result<Resolved, OutFileError> {
    if names_no_file(path) {
        // A directory is the more useful message when the path is one.
        return Err(match fs::metadata(path) {
            Ok(m) if m.is_dir() => refused(path, Refusal::Directory),
            _ => refused(path, Refusal::NotAFileName),
        });
    }
    let lmeta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Resolved {
                kind: TargetKind::Missing,
                act_on: path.to_path_buf(),
                meta: None,
            })
        }
        Err(e) => return Err(io_err(path)(e)),
    };
    if !lmeta.file_type().is_symlink() {
        let kind = classify(&lmeta).map_err(|r| refused(path, r))?;
        return Ok(Resolved {
            kind,
            act_on: path.to_path_buf(),
            meta: Some(lmeta),
        });
    }
    if !may_follow(path, &lmeta)? {
        return Err(refused(path, Refusal::UntrustedSymlink));
    }
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(refused(path, Refusal::DanglingSymlink))
        }
        Err(e) => return Err(io_err(path)(e)),
    };
    let kind = classify(&meta).map_err(|r| refused(path, r))?;
    let act_on = if kind == TargetKind::Regular {
        fs::canonicalize(path).map_err(io_err(path))?
    } else {
        path.to_path_buf()
    };
    Ok(Resolved {
        kind,
        act_on,
        meta: Some(meta),
    })
}

/// Whether the symbolic link `path` (with `lmeta`, its own metadata) may be followed: not if it
/// sits in a sticky world-writable directory and belongs to neither us nor that directory's owner
/// (Linux's `fs.protected_symlinks` rule, for the last component; the kernel checks the others).
fn may_follow(path: &Path, lmeta: &Metadata) -> Result<bool, OutFileError> {
    let dir = fs::metadata(parent_dir(path)).map_err(io_err(path))?;
    let shared = dir.mode() & 0o1002 == 0o1002;
    let me = rustix::process::geteuid().as_raw();
    Ok(!shared || lmeta.uid() == me || lmeta.uid() == dir.uid())
}

/// The directory a file at `path` lives in (`.` for a bare name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Says whether [`write_file`] would accept `path`, without writing anything and without opening
/// it: opening a FIFO for writing and closing it again would hand its reader an early end of file.
///
/// Call it before doing anything that cannot be undone (spending an enrollment token, creating
/// an identity on the controller), so that a bad `-o` fails with no side effect. Besides the kind
/// of file, it checks that the write is permitted: the directory for a new or replaced file must
/// exist and be writable, a FIFO or device must be writable. The result can of course change
/// before the write; the write checks again.
pub fn check_target(path: &Path) -> Result<TargetKind, OutFileError> {
    let r = resolve(path)?;
    match r.kind {
        TargetKind::Missing | TargetKind::Regular => {
            let dir = parent_dir(&r.act_on);
            let meta = fs::metadata(&dir).map_err(io_err(path))?;
            if !meta.is_dir() {
                return Err(OutFileError::Io {
                    path: path.to_path_buf(),
                    source: io::Error::from(io::ErrorKind::NotADirectory),
                });
            }
            rustix::fs::access(&dir, Access::WRITE_OK | Access::EXEC_OK)
                .map_err(|e| io_err(path)(e.into()))?;
        }
        TargetKind::Fifo | TargetKind::CharDevice => {
            rustix::fs::access(&r.act_on, Access::WRITE_OK).map_err(|e| io_err(path)(e.into()))?;
        }
    }
    Ok(r.kind)
}

/// Writes `data` to `path` by the rules in the [module documentation](self): a missing or regular
/// file is replaced atomically with at most `mode` (0600 for anything secret), a FIFO or character
/// device is written in place, anything else is refused. Errors name `path` as given.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), OutFileError> {
    let r = resolve(path)?;
    match r.kind {
        TargetKind::Missing => replace_atomically(path, &r.act_on, data, mode & 0o777),
        TargetKind::Regular => {
            let existing = r.meta.as_ref().map_or(0o600, |m| m.mode());
            replace_atomically(path, &r.act_on, data, mode & existing & 0o777)
        }
        TargetKind::Fifo | TargetKind::CharDevice => {
            let mut file = open_in_place(path, &r, false)?;
            file.write_all(data).map_err(io_err(path))
        }
    }
}

/// Makes a SQLite database at `path` private before SQLite opens it: a missing file is created
/// 0600 (left to SQLite it would get the umask's mode, 0644, and the `-wal` and `-shm` files copy
/// the database's mode), an existing one is narrowed to 0600, and so are `-wal` and `-shm` files
/// left wider by earlier versions. Anything but a regular file (or a link to one) is refused.
pub fn private_database(path: &Path) -> Result<(), OutFileError> {
    match check_target(path)? {
        TargetKind::Missing | TargetKind::Regular => drop(open_append(path, 0o600)?),
        _ => {
            return Err(OutFileError::Refused {
                path: path.to_path_buf(),
                reason: Refusal::NotADatabase,
            })
        }
    }
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let side = PathBuf::from(side);
        if fs::symlink_metadata(&side).is_ok_and(|m| m.is_file() && m.mode() & 0o077 != 0) {
            fs::set_permissions(&side, fs::Permissions::from_mode(0o600)).map_err(io_err(&side))?;
        }
    }
    Ok(())
}

/// Opens `path` for appending by the same rules as [`write_file`]: a missing file is created with
/// `mode` from its first byte (not at the umask's mercy, then fixed); an existing regular file is
/// appended to, and narrowed to the intersection of its mode and `mode` if it was wider (best
/// effort: a file owned by someone else keeps its mode, with a warning); a FIFO or character
/// device is opened in place; anything else is refused.
pub fn open_append(path: &Path, mode: u32) -> Result<File, OutFileError> {
    // A file can appear between the check and `create_new`; then classify it again.
    for _ in 0..3 {
        let r = resolve(path)?;
        match r.kind {
            TargetKind::Missing => {
                match OpenOptions::new()
                    .append(true)
                    .create_new(true)
                    .mode(mode & 0o777)
                    .open(&r.act_on)
                {
                    Ok(file) => {
                        file.set_permissions(fs::Permissions::from_mode(mode & 0o777))
                            .map_err(io_err(path))?;
                        return Ok(file);
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(io_err(path)(e)),
                }
            }
            TargetKind::Regular => {
                let file = OpenOptions::new()
                    .append(true)
                    .open(&r.act_on)
                    .map_err(io_err(path))?;
                let meta = same_file(path, &file, &r)?;
                let existing = meta.mode() & 0o777;
                let narrowed = existing & mode;
                if narrowed != existing {
                    if let Err(e) = file.set_permissions(fs::Permissions::from_mode(narrowed)) {
                        tracing::warn!(
                            path = %path.display(),
                            mode = format!("{existing:o}"),
                            error = %e,
                            "cannot narrow the log file's permissions",
                        );
                    }
                }
                return Ok(file);
            }
            TargetKind::Fifo | TargetKind::CharDevice => return open_in_place(path, &r, true),
        }
    }
    Err(OutFileError::Changed {
        path: path.to_path_buf(),
    })
}

/// Checks that an opened file is still what `resolve` saw (same kind, same inode).
fn same_file(path: &Path, file: &File, r: &Resolved) -> Result<Metadata, OutFileError> {
    let now = file.metadata().map_err(io_err(path))?;
    let same = classify(&now).ok() == Some(r.kind)
        && r.meta
            .as_ref()
            .is_some_and(|m| m.dev() == now.dev() && m.ino() == now.ino());
    if same {
        Ok(now)
    } else {
        Err(OutFileError::Changed {
            path: path.to_path_buf(),
        })
    }
}

/// Opens a FIFO or character device for writing without creating, truncating or chmod'ing it.
fn open_in_place(path: &Path, r: &Resolved, append: bool) -> Result<File, OutFileError> {
    let flags = (OFlags::NONBLOCK | OFlags::NOCTTY).bits();
    let mut options = OpenOptions::new();
    options.write(true).append(append);
    // The flag constants are small positive numbers; the cast cannot wrap.
    options.custom_flags(flags as i32);
    let file = match options.open(&r.act_on) {
        Ok(f) => f,
        Err(e)
            if r.kind == TargetKind::Fifo
                && e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) =>
        {
            return Err(OutFileError::NoReader {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(path)(e)),
    };
    same_file(path, &file, r)?;
    // Non-blocking was for the open only: writes wait for a slow reader rather than fail.
    let fl = rustix::fs::fcntl_getfl(&file).map_err(|e| io_err(path)(e.into()))?;
    rustix::fs::fcntl_setfl(&file, fl - OFlags::NONBLOCK).map_err(|e| io_err(path)(e.into()))?;
    Ok(file)
}

/// Writes `data` to a new temporary file beside `target` with exactly `mode`, syncs it and renames
/// it over `target`, after checking that `target` is still missing or a regular file. The
/// temporary file is removed on any failure. Errors name `shown` (the path the caller gave).
fn replace_atomically(
    shown: &Path,
    target: &Path,
    data: &[u8],
    mode: u32,
) -> Result<(), OutFileError> {
    let dir = parent_dir(target);
    let Some(name) = target.file_name() else {
        return Err(refused(shown, Refusal::NotAFileName));
    };
    let mut suffix = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut suffix);
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", hex::encode(suffix)));
    let tmp = dir.join(tmp_name);

    let result = write_new(&tmp, data, mode)
        .map_err(io_err(shown))
        .and_then(|()| {
            // The last look before the rename: never rename over something that is no longer a
            // regular file (or nothing).
            match fs::symlink_metadata(target) {
                Ok(m) if m.file_type().is_file() => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Ok(_) => Err(OutFileError::Changed {
                    path: shown.to_path_buf(),
                }),
                Err(e) => Err(io_err(shown)(e)),
            }
        })
        .and_then(|()| fs::rename(&tmp, target).map_err(io_err(shown)));
    if result.is_err() {
        // Do not leave a partial (possibly secret) file behind.
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Persist the rename itself; failure here does not undo the write, so it is not an error.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Creates `tmp` (which must not exist) with exactly `mode` and writes `data` to it durably.
fn write_new(tmp: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)?;
    // The umask may have removed bits from `mode`; set it exactly (this never adds any beyond it).
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(data)?;
    file.sync_all()
}
