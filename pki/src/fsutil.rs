//! File helpers: private directories and bounded reads. Writes go through [`crate::outfile`].

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::Path;

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
