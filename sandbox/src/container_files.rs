//! A running container's `/etc/hosts` and `/etc/resolv.conf`, rewritten in place from the host
//! through `/proc/PID/root` (Docker, Podman and the kubelet bind-mount host files there).
//!
//! The container's root is the agent's to shape: it may have made `/etc/hosts` a symbolic link
//! to a file the container only reads (a volume of host files mounted read-only), or a hard link
//! to one. We write as root outside, where read-only mounts inside mean nothing, so a file is
//! opened with `openat2` beneath the container's root (`RESOLVE_IN_ROOT`), refusing every
//! symbolic link on the way (`RESOLVE_NO_SYMLINKS`, so no link is followed at all, even one that
//! stays inside), and used only if it is a regular file with one name. Reads are bounded: the
//! agent may have filled the file.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// The line that opens Umbra's block in a file it shares with the container.
pub const BEGIN: &str = "# BEGIN umbra tunnel (rewritten as grants change; do not edit)";
/// The line that closes it.
pub const END: &str = "# END umbra tunnel";

/// The largest file read back (a hosts file of tens of thousands of lines).
const MAX_FILE: u64 = 4 << 20;

/// A container's root directory, held open: the files are found beneath it, never by a path
/// walked again from the host's root. With it, the user namespace of the container's process:
/// we write only files its root could write itself.
#[derive(Debug)]
pub struct ContainerRoot {
    root: OwnedFd,
    /// The host ids the container's user namespace maps (`/proc/PID/uid_map`, `gid_map`).
    uids: IdMap,
    gids: IdMap,
}

/// The ranges of host ids a user namespace maps (the lines of `/proc/PID/uid_map`: inside,
/// outside, count). An inode whose owner or group is outside them is one the namespace's root
/// holds no capability over (the kernel's `capable_wrt_inode_uidgid`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMap(Vec<(u64, u64)>);

impl IdMap {
    /// Parses a map file's text; lines that are not three numbers are skipped.
    pub fn parse(text: &str) -> IdMap {
        let ranges = text
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace().map(str::parse::<u64>);
                let (_inside, outside, count) =
                    (it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?);
                Some((outside, outside.saturating_add(count)))
            })
            .collect();
        IdMap(ranges)
    }

    /// The initial namespace's map: every id.
    pub fn all() -> IdMap {
        IdMap::parse("0 0 4294967295")
    }

    /// Whether the host id `id` is mapped.
    pub fn maps(&self, id: u32) -> bool {
        let id = u64::from(id);
        self.0.iter().any(|&(lo, hi)| lo <= id && id < hi)
    }
}

impl ContainerRoot {
    /// Opens the root of process `pid`'s mount namespace (`/proc/PID/root`) and reads its
    /// user namespace's id maps.
    pub fn open(pid: u32) -> io::Result<ContainerRoot> {
        let path = format!("/proc/{pid}/root\0");
        // SAFETY: a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                path.as_ptr().cast(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        let map = |name: &str| -> io::Result<IdMap> {
            let text = std::fs::read_to_string(format!("/proc/{pid}/{name}"))?;
            Ok(IdMap::parse(&text))
        };
        Ok(ContainerRoot {
            root,
            uids: map("uid_map")?,
            gids: map("gid_map")?,
        })
    }

    /// Opens `rel` (e.g. `etc/hosts`) beneath the root for reading and writing: no symbolic
    /// link anywhere on the way, a regular file, one name, owned by ids the container's user
    /// namespace maps. Everything is checked on an `O_PATH` descriptor, which opens nothing:
    /// only a file that passes is opened for writing, so a device node the agent made there
    /// (a watchdog arms when opened, a tape rewinds when closed) or a FIFO is never opened.
    pub fn open_file(&self, rel: &str) -> io::Result<File> {
        let c = std::ffi::CString::new(rel).map_err(|_| io::Error::other("NUL in a path"))?;
        // SAFETY: open_how is plain data; zeroed is valid.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        // No O_NOFOLLOW: with O_PATH it would open a trailing link itself; RESOLVE_NO_SYMLINKS
        // refuses it (ELOOP) as it refuses every link on the way.
        how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
        how.resolve =
            libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: a valid directory descriptor, C string and open_how of its size.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.root.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("the container's /{rel}: {e} (a symbolic link on its path is refused)"),
            ));
        }
        // SAFETY: a fresh descriptor we own.
        let path_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let meta = fstat(&path_fd)?;
        if meta.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::other(format!(
                "the container's /{rel} is not a regular file"
            )));
        }
        if meta.st_nlink != 1 {
            return Err(io::Error::other(format!(
                "the container's /{rel} has other names (hard links); refusing to write it"
            )));
        }
        if !self.uids.maps(meta.st_uid) || !self.gids.maps(meta.st_gid) {
            return Err(io::Error::other(format!(
                "the container's /{rel} belongs to a user or group its user namespace does not map (a file mounted from the host?); refusing to write what its root could not"
            )));
        }
        // The inode just checked, opened for writing (the O_PATH descriptor pins it).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(format!("/proc/self/fd/{}", path_fd.as_raw_fd()))?;
        let again = fstat(&file)?;
        if (again.st_dev, again.st_ino) != (meta.st_dev, meta.st_ino) {
            return Err(io::Error::other(format!(
                "the container's /{rel} changed while it was opened"
            )));
        }
        Ok(file)
    }
}

/// `fstat` of a descriptor (an `O_PATH` one too).
fn fstat(fd: &impl AsRawFd) -> io::Result<libc::stat> {
    // SAFETY: `stat` is plain data, for which all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Reads the whole file (bounded) from its start.
pub fn read_all(mut file: &File) -> io::Result<String> {
    file.rewind()?;
    let mut s = String::new();
    file.take(MAX_FILE + 1).read_to_string(&mut s)?;
    if s.len() as u64 > MAX_FILE {
        return Err(io::Error::other("the file is larger than 4 MiB"));
    }
    Ok(s)
}

/// Replaces the file's content in place (the inode stays: it is what is bind-mounted).
pub fn rewrite(mut file: &File, content: &str) -> io::Result<()> {
    file.rewind()?;
    file.write_all(content.as_bytes())?;
    file.set_len(content.len() as u64)?;
    file.flush()
}

/// `text` without Umbra's block (an unterminated block runs to the end).
pub fn without_block(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if bare == BEGIN {
            inside = true;
        } else if bare == END && inside {
            inside = false;
        } else if !inside {
            out.push_str(line);
        }
    }
    out
}

/// `text` with Umbra's block replaced by `lines` (the container's own lines kept as they are,
/// in front of it); with no lines, without the block.
pub fn with_block(text: &str, lines: &[String]) -> String {
    let mut out = without_block(text);
    if lines.is_empty() {
        return out;
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(BEGIN);
    out.push('\n');
    for l in lines {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(END);
    out.push('\n');
    out
}

/// A `resolv.conf` whose only name server is `server` (in Umbra's block, first): the
/// container's own name servers are commented out, its `search` and `options` lines kept.
pub fn resolv_with(text: &str, server: std::net::IpAddr) -> String {
    let mut out = String::new();
    out.push_str(BEGIN);
    out.push('\n');
    out.push_str(&format!("nameserver {server}\n"));
    out.push_str(END);
    out.push('\n');
    for line in without_block(text).lines() {
        if line.trim_start().starts_with("nameserver") {
            out.push_str(COMMENTED);
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// What [`resolv_with`] changed, undone: Umbra's block out, the container's name servers back.
/// Works on the file as found, so a tunnel that died before undoing it is undone by the next.
pub fn resolv_restored(text: &str) -> String {
    let mut out = String::new();
    for line in without_block(text).lines() {
        out.push_str(line.strip_prefix(COMMENTED).unwrap_or(line));
        out.push('\n');
    }
    out
}

/// How [`resolv_with`] comments out the container's own name servers.
const COMMENTED: &str = "# umbra: ";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_is_replaced_and_the_containers_lines_kept() {
        let orig = "127.0.0.1\tlocalhost\n172.17.0.2\tabc123";
        let one = with_block(orig, &["127.77.0.1\techo.umbra".into()]);
        assert_eq!(
            one,
            format!("127.0.0.1\tlocalhost\n172.17.0.2\tabc123\n{BEGIN}\n127.77.0.1\techo.umbra\n{END}\n")
        );
        let two = with_block(&one, &["127.77.0.2\tdb.umbra".into()]);
        assert!(two.contains("db.umbra") && !two.contains("echo.umbra"));
        assert!(two.starts_with("127.0.0.1\tlocalhost\n172.17.0.2\tabc123\n"));
        assert_eq!(
            with_block(&two, &[]),
            "127.0.0.1\tlocalhost\n172.17.0.2\tabc123\n"
        );
    }

    #[test]
    fn a_lone_end_marker_is_the_containers_line() {
        let text = format!("{END}\n1.2.3.4 x\n");
        assert_eq!(without_block(&text), text);
    }

    #[test]
    fn resolv_points_at_the_responder_only() {
        let orig = "search corp\nnameserver 8.8.8.8\noptions ndots:5\n";
        let r = resolv_with(orig, "127.0.0.53".parse().unwrap());
        let servers: Vec<&str> = r.lines().filter(|l| l.starts_with("nameserver")).collect();
        assert_eq!(servers, ["nameserver 127.0.0.53"]);
        assert!(r.contains("search corp") && r.contains("options ndots:5"));
        // Applied twice, still one.
        let again = resolv_with(&r, "127.0.0.53".parse().unwrap());
        assert_eq!(
            again
                .lines()
                .filter(|l| l.starts_with("nameserver"))
                .count(),
            1
        );
    }

    #[test]
    fn links_and_non_files_are_refused_beneath_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::os::unix::fs::symlink(outside.path(), etc.join("hosts")).unwrap();
        std::fs::create_dir(etc.join("resolv.conf")).unwrap();
        std::fs::write(etc.join("a"), "x").unwrap();
        std::fs::hard_link(etc.join("a"), etc.join("b")).unwrap();
        std::fs::write(etc.join("ok"), "x").unwrap();
        let root = File::open(dir.path()).unwrap();
        let root = ContainerRoot {
            root: OwnedFd::from(root),
            uids: IdMap::all(),
            gids: IdMap::all(),
        };
        assert!(root.open_file("etc/hosts").is_err());
        assert!(root.open_file("etc/resolv.conf").is_err());
        assert!(root.open_file("etc/a").is_err());
        let ok = root.open_file("etc/ok").unwrap();
        rewrite(&ok, "longer content\n").unwrap();
        rewrite(&ok, "y\n").unwrap();
        assert_eq!(read_all(&ok).unwrap(), "y\n");
    }

    fn root_of(dir: &std::path::Path, uids: &str, gids: &str) -> ContainerRoot {
        ContainerRoot {
            root: OwnedFd::from(File::open(dir).unwrap()),
            uids: IdMap::parse(uids),
            gids: IdMap::parse(gids),
        }
    }

    /// The agent makes its `/etc/hosts` a FIFO (or a device node: a watchdog arms when
    /// opened). The tunnel must refuse it without opening it: a reader waiting on the FIFO
    /// would be released by any open for writing.
    #[test]
    fn a_fifo_or_device_is_refused_without_being_opened() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        let fifo = dir.path().join("etc/hosts");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let reader_path = fifo.clone();
        let reader = std::thread::spawn(move || {
            // Blocks until something opens the FIFO for writing.
            let f = File::open(&reader_path);
            let _ = tx.send(());
            f.is_ok()
        });
        let root = root_of(dir.path(), "0 0 4294967295", "0 0 4294967295");
        let e = root.open_file("etc/hosts").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "the FIFO was opened for writing"
        );
        // Release the reader.
        let _w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        assert!(reader.join().unwrap());
    }

    /// A file owned by a host user the container's user namespace does not map (a host file
    /// the agent bind-mounted over its `/etc/hosts`) is one its root cannot write: neither may
    /// the tunnel, root outside.
    #[test]
    fn a_file_owned_outside_the_containers_ids_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        let theirs = dir.path().join("etc/hosts");
        std::fs::write(&theirs, "x\n").unwrap();
        std::os::unix::fs::chown(&theirs, Some(100_000), Some(100_000)).unwrap();
        let host = dir.path().join("etc/resolv.conf");
        std::fs::write(&host, "x\n").unwrap();
        std::os::unix::fs::chown(&host, Some(0), Some(100_000)).unwrap();
        let root = root_of(dir.path(), "0 100000 65536\n", "0 100000 65536\n");
        assert!(root.open_file("etc/hosts").is_ok());
        let e = root.open_file("etc/resolv.conf").unwrap_err();
        assert!(e.to_string().contains("does not map"), "{e}");
        // The group too.
        std::os::unix::fs::chown(&host, Some(100_000), Some(0)).unwrap();
        assert!(root.open_file("etc/resolv.conf").is_err());
    }

    #[test]
    fn id_maps_cover_their_ranges_only() {
        let m = IdMap::parse("         0     100000      65536\n 65536 1000 1\nbad line\n");
        assert!(m.maps(100_000) && m.maps(165_535) && m.maps(1000));
        assert!(!m.maps(0) && !m.maps(165_536) && !m.maps(999) && !m.maps(1001));
        assert!(IdMap::all().maps(0) && IdMap::all().maps(u32::MAX - 1));
        assert!(!IdMap::parse("").maps(0));
    }
}
