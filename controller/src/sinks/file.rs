//! The file sink: JSON lines appended to a 0600 file, rotated by size into `PATH.1` (newest)
//! to `PATH.<keep>`; older ones are deleted.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::SinkError;

/// An open file sink (blocking: call it off the runtime's workers).
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Option<(File, u64)>,
}

fn rotated(path: &Path, i: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

impl FileSink {
    /// A sink writing to `path`; nothing is opened until the first write.
    pub fn new(path: PathBuf, max_bytes: u64, keep: u32) -> FileSink {
        FileSink {
            path,
            max_bytes,
            keep,
            file: None,
        }
    }

    fn rotate(&mut self) -> Result<(), SinkError> {
        self.file = None;
        let io = |e: std::io::Error| SinkError::Io(e.to_string());
        if self.keep == 0 {
            return std::fs::remove_file(&self.path).map_err(io);
        }
        let _ = std::fs::remove_file(rotated(&self.path, self.keep));
        for i in (1..self.keep).rev() {
            let from = rotated(&self.path, i);
            if from.exists() {
                std::fs::rename(&from, rotated(&self.path, i + 1)).map_err(io)?;
            }
        }
        std::fs::rename(&self.path, rotated(&self.path, 1)).map_err(io)
    }

    /// Appends `lines` (each one JSON document and `\n`), rotating first if they would take the
    /// file past its size, and syncs, so that a delivered batch is on disk before the sink's
    /// cursor moves past it.
    pub fn write(&mut self, lines: &[u8]) -> Result<(), SinkError> {
        if self.file.is_none() {
            let f = umbra_pki::outfile::open_append(&self.path, 0o600)
                .map_err(|e| SinkError::Io(e.to_string()))?;
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            self.file = Some((f, len));
        }
        if let Some((_, len)) = &self.file {
            if *len > 0 && len + lines.len() as u64 > self.max_bytes {
                self.rotate()?;
                return self.write(lines);
            }
        }
        let Some((f, len)) = self.file.as_mut() else {
            return Err(SinkError::Io("file not open".into()));
        };
        let r = f.write_all(lines).and_then(|()| f.sync_data());
        match r {
            Ok(()) => {
                *len += lines.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.file = None;
                Err(SinkError::Io(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn rotation_keeps_n_files_all_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut s = FileSink::new(path.clone(), 1024, 3);
        let line = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(290));
        for _ in 0..40 {
            s.write(line.as_bytes()).unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "events.jsonl",
                "events.jsonl.1",
                "events.jsonl.2",
                "events.jsonl.3"
            ]
        );
        for n in names {
            let meta = std::fs::metadata(dir.path().join(&n)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{n}");
            assert!(meta.len() <= 1024, "{n} is {}", meta.len());
            assert_eq!(meta.len() % line.len() as u64, 0, "{n}: whole lines only");
        }
    }
}
