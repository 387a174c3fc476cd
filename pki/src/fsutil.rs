//! File helpers: atomic writes with explicit permissions, and bounded reads.
//!
//! Key files are written 0600 from the first byte: the data goes to a temporary file created with
//! mode 0600 in the same directory, is synced, and is renamed over the target. A crash leaves
//! either the old file or the new one, and the key is never readable by others, not even briefly.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use rand::RngCore;

use crate::error::PkiError;

/// Permissions of files holding private keys.
pub(crate) const PRIVATE_MODE: u32 = 0o600;
/// Permissions of files holding only public data (certificates).
pub(crate) const PUBLIC_MODE: u32 = 0o644;

fn io_err(path: &Path, source: io::Error) -> PkiError {
    PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Atomically replaces `path` with `data`, the new file having exactly `mode` (on Unix).
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        io_err(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
        )
    })?;
    let mut suffix = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut suffix);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{}.tmp", hex::encode(suffix)));
    let tmp = dir.join(tmp_name);

    let result = write_new(&tmp, data, mode)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| io_err(path, e));
    if result.is_err() {
        // Best effort: do not leave a partial key file behind.
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Persist the rename itself; failure here does not undo the write, so it is not an error.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Creates `tmp` (which must not exist) with `mode` and writes `data` to it durably. The caller
/// reports errors against the target path: the temporary name means nothing to a user.
fn write_new(tmp: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    let mut file = options.open(tmp)?;
    // The umask may have removed bits from `mode`; set it exactly (it never adds any).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    file.write_all(data)?;
    file.sync_all()
}

/// Creates `dir` (and parents) if missing; a newly created leaf directory gets mode 0700.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| io_err(dir, e))
}

/// Reads at most `max` bytes of `path`; a larger file is refused without being read.
pub(crate) fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>, PkiError> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let mut data = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| io_err(path, e))?;
    if data.len() as u64 > max {
        return Err(PkiError::FileTooLarge {
            path: path.to_path_buf(),
            max,
        });
    }
    Ok(data)
}

/// Reads a UTF-8 text file of at most `max` bytes.
pub(crate) fn read_text(path: &Path, max: u64) -> Result<String, PkiError> {
    let data = read_limited(path, max)?;
    String::from_utf8(data).map_err(|e| {
        let mut bytes = e.into_bytes();
        zeroize::Zeroize::zeroize(&mut bytes);
        io_err(
            path,
            io::Error::new(io::ErrorKind::InvalidData, "file is not UTF-8 text"),
        )
    })
}

/// Whether the file at `path` can be read by group or others (always `false` off Unix).
pub(crate) fn is_shared(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o077 != 0)
            .unwrap_or(false)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.key");
        fs::write(&path, b"old").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        write_atomic(&path, b"new", PRIVATE_MODE).expect("write_atomic");
        assert_eq!(fs::read(&path).expect("read"), b"new");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary files left behind.
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn errors_name_the_target() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing-dir").join("k.key");
        match write_atomic(&path, b"x", PRIVATE_MODE) {
            Err(PkiError::Io { path: p, .. }) => assert_eq!(p, path),
            other => panic!("expected an I/O error, got {other:?}"),
        }
    }

    #[test]
    fn bounded_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        fs::write(&path, [b'a'; 11]).expect("write");
        assert!(read_limited(&path, 11).is_ok());
        assert!(matches!(
            read_limited(&path, 10),
            Err(PkiError::FileTooLarge { max: 10, .. })
        ));
        assert!(matches!(
            read_limited(&dir.path().join("missing"), 10),
            Err(PkiError::Io { .. })
        ));
    }
}
