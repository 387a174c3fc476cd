//! Inside the sandbox: the first process makes the namespaces, its child (pid 1 of the new PID
//! namespace) builds the agent's filesystem and reaps, and the agent's process confines itself
//! (capabilities, Landlock, seccomp) and executes the command.
//!
//! This code runs in a fresh, single-threaded process (`umbra __sandbox-init`), because a
//! multi-threaded process cannot enter a new user namespace. Every step that fails ends the
//! sandbox with a one-line message and [`crate::exit::SETUP`]; nothing runs half-confined.

use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::exit;
use crate::landlock::{self, Access, Ruleset};
use crate::seccomp::Filter;
use crate::spec::{read_frame, From, Spec, AGENT_GID, AGENT_UID};

/// The descriptor the launcher hands the spec socket on.
pub const SPEC_FD: i32 = 3;
/// The descriptor of the socket on which the launcher asks for sockets inside the namespace.
pub const NET_FD: i32 = 4;
/// The first descriptor of the detached mounts the launcher passes (see [`crate::idmap`]),
/// numbered on from here in the order of the spec's sources.
pub const FIRST_SOURCE_FD: i32 = 5;

/// System directories shown read-only (or recreated as the symlinks they are on merged-/usr
/// systems).
const SYSTEM: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];
/// Entries of the host's `/etc` that programs need to run; nothing else of `/etc` is shown.
const ETC: &[&str] = &[
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    // Certificates only: /etc/ssl/private and /etc/pki/tls/private hold the host's keys.
    "ssl/certs",
    "ssl/openssl.cnf",
    "ca-certificates",
    "ca-certificates.conf",
    "pki/ca-trust",
    "pki/tls/certs",
    "pki/tls/cert.pem",
    "pki/tls/openssl.cnf",
    "alternatives",
    "localtime",
    "timezone",
    "os-release",
    "debian_version",
    "protocols",
    "services",
    "mime.types",
    "bash.bashrc",
    "profile",
    "inputrc",
    "terminfo",
    "magic",
    "magic.mime",
    "gai.conf",
    "host.conf",
    "python3",
    "perl",
];
/// The devices shown, with the numbers each must have: a host path that is anything else (a
/// regular file someone put at `/dev/null`, say) is refused, not shown.
pub const DEVICES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Entries of `/proc` masked as OCI runtimes mask them (runc's and Docker's `maskedPaths`),
/// and more that tell about the host's kernel and other users: empty and unreadable inside.
pub const PROC_MASKED: &[&str] = &[
    "acpi",
    "asound",
    "bus",
    "config.gz",
    "driver",
    "dynamic_debug",
    "fs",
    "interrupts",
    "iomem",
    "ioports",
    "irq",
    "kallsyms",
    "kcore",
    "key-users",
    "keys",
    "kpagecgroup",
    "kpagecount",
    "kpageflags",
    "latency_stats",
    "mtrr",
    "pagetypeinfo",
    "sched_debug",
    "scsi",
    "slabinfo",
    "sysrq-trigger",
    "timer_list",
    "timer_stats",
    "vmallocinfo",
    "zoneinfo",
];

fn err(what: impl std::fmt::Display, e: io::Error) -> String {
    format!("{what}: {e}")
}

fn check(r: libc::c_int, what: impl std::fmt::Display) -> Result<(), String> {
    if r < 0 {
        Err(err(what, io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

fn cstr(p: impl AsRef<OsStr>) -> Result<CString, String> {
    CString::new(p.as_ref().as_bytes()).map_err(|_| "a path holds a NUL byte".to_string())
}

/// The entry point of `umbra __sandbox-init`; returns the process's exit code. Failures are
/// reported to the launcher over the spec socket (it prints them as one line).
pub fn main() -> i32 {
    // SAFETY: the launcher placed the spec socket on SPEC_FD; nothing else owns it.
    let mut sock = unsafe { UnixStream::from_raw_fd(SPEC_FD) };
    // SAFETY: plain fcntl on descriptors we own; the agent must not inherit them.
    unsafe {
        libc::fcntl(SPEC_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(NET_FD, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    let spec = match namespaces(&mut sock) {
        Ok(Some(spec)) => spec,
        // The launcher gave up (it reports why); leave quietly.
        Ok(None) => return exit::SETUP,
        Err(e) => return fail(&mut sock, &e),
    };
    // SAFETY: single-threaded; the child only calls our own code and then exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return fail(&mut sock, &err("fork", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: pid 1 has no use for the socket service; closing our copy.
        unsafe { libc::close(NET_FD) };
        let code = match pid1(&spec, &mut sock) {
            Ok(code) => code,
            Err(e) => fail(&mut sock, &e),
        };
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    supervise(pid)
}

/// Serves the launcher's socket requests until pid 1 ends (its exit code is ours), or kills the
/// sandbox if the launcher goes away.
fn supervise(pid: libc::pid_t) -> i32 {
    // SAFETY: pidfd_open takes a pid and flags; a pollable descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: SPEC_FD,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: NET_FD,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: pidfd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let n = if pidfd >= 0 { 3 } else { 2 };
        // Without a pidfd (kernels before 5.3), look for the child's end every 20 ms.
        let timeout = if pidfd >= 0 { -1 } else { 20 };
        // SAFETY: a valid array of `n` pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout) };
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
        let mut status = 0;
        // SAFETY: valid out-pointer; WNOHANG never blocks.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            return decode(status);
        }
        let launcher_gone = fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
            || fds[1].revents & (libc::POLLHUP | libc::POLLERR) != 0;
        if fds[1].revents & libc::POLLIN != 0
            && !matches!(crate::fdpass::serve_one(NET_FD), Ok(true))
        {
            break;
        }
        if launcher_gone {
            break;
        }
    }
    // The launcher is gone: nothing of the sandbox may outlive it.
    // SAFETY: kill takes integers.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for(pid)
}

fn fail(sock: &mut UnixStream, msg: &str) -> i32 {
    if sock.write_all(format!("E{msg}").as_bytes()).is_err() {
        eprintln!("umbra run: sandbox set-up failed: {msg}");
    }
    exit::SETUP
}

/// Reads the spec, makes the namespaces and maps the agent's ids; then tells the launcher and
/// waits for its go-ahead (`None`: it gave up).
fn namespaces(sock: &mut UnixStream) -> Result<Option<Spec>, String> {
    let spec = read_frame(sock).map_err(|e| err("reading the sandbox spec", e))?;
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWCGROUP;
    check(
        // SAFETY: unshare takes flags only; this process is single-threaded.
        unsafe { libc::unshare(flags) },
        "creating namespaces (are user namespaces enabled?)",
    )?;
    fs::write("/proc/self/setgroups", "deny").map_err(|e| err("setgroups", e))?;
    fs::write("/proc/self/uid_map", format!("{AGENT_UID} {uid} 1\n"))
        .map_err(|e| err("uid_map", e))?;
    fs::write("/proc/self/gid_map", format!("{AGENT_GID} {gid} 1\n"))
        .map_err(|e| err("gid_map", e))?;
    loopback_up().map_err(|e| err("bringing up lo", e))?;
    // Namespaces exist: the launcher may now ask for sockets in our network namespace, which we
    // serve until it says go.
    sock.write_all(b"R").map_err(|e| err("launcher", e))?;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: SPEC_FD,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: NET_FD,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: a valid array of two pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err("poll", io::Error::last_os_error()));
        }
        if fds[1].revents & libc::POLLIN != 0 {
            match crate::fdpass::serve_one(NET_FD) {
                Ok(true) => {}
                _ => return Ok(None),
            }
        }
        if fds[0].revents != 0 {
            let mut go = [0u8; 1];
            return match sock.read_exact(&mut go) {
                Ok(()) if go[0] == b'G' => Ok(Some(spec)),
                _ => Ok(None),
            };
        }
    }
}

/// Brings up `lo` in our new network namespace (it starts down).
fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain datagram socket used only for interface ioctls, closed below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `s` is a fresh descriptor we own.
    let s = unsafe { std::os::fd::OwnedFd::from_raw_fd(s) };
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: valid ifreq for SIOCGIFFLAGS / SIOCSIFFLAGS.
    unsafe {
        if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Waits for `pid` and turns its end into an exit code (128 + signal for a signal).
fn wait_for(pid: libc::pid_t) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return decode(status);
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return exit::SETUP;
        }
    }
}

fn decode(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        exit::SETUP
    }
}

/// Pid 1 of the sandbox: builds the filesystem, starts the agent, reaps every orphan, and ends
/// with the agent's exit code (its end takes every other process of the namespace with it).
fn pid1(spec: &Spec, sock: &mut UnixStream) -> Result<i32, String> {
    // SAFETY: prctl with integer arguments.
    unsafe {
        // If the first process dies (the launcher killed it), so does the whole sandbox.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    let memfd_sealed = build_root(spec)?;
    let host = cstr(&spec.id)?;
    check(
        // SAFETY: a valid buffer and its length.
        unsafe { libc::sethostname(host.as_ptr(), host.as_bytes().len()) },
        "sethostname",
    )?;
    // Not dumpable: the agent cannot reach pid 1's memory or its /proc entries.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let prepared = Prepared::new(spec, !memfd_sealed)?;
    sock.write_all(b"S").map_err(|e| err("launcher", e))?;
    // SAFETY: single-threaded; the child execs or exits.
    let agent = unsafe { libc::fork() };
    if agent < 0 {
        return Err(err("fork", io::Error::last_os_error()));
    }
    if agent == 0 {
        let code = prepared.exec();
        // SAFETY: exec failed; leave without destructors.
        unsafe { libc::_exit(code) };
    }
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r == agent {
            return Ok(decode(status));
        }
        if r < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                _ => return Ok(exit::SETUP),
            }
        }
    }
}

fn inside(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

fn mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let src_c = src.map(cstr).transpose()?;
    let dst_c = cstr(dst)?;
    let fs_c = fstype.map(cstr).transpose()?;
    let data_c = data.map(cstr).transpose()?;
    // SAFETY: every pointer is a valid C string or null.
    let r = unsafe {
        libc::mount(
            src_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            dst_c.as_ptr(),
            fs_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |c| c.as_ptr().cast()),
        )
    };
    check(r, format_args!("mount {}", dst.display()))
}

/// The mount flags a read-only remount must keep: inside a user namespace the kernel refuses to
/// clear flags the host set (nosuid, nodev, noexec, atime).
fn locked_flags(path: &Path) -> Result<libc::c_ulong, String> {
    let c = cstr(path)?;
    // SAFETY: valid path and out-pointer.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    check(
        // SAFETY: valid path and out-pointer.
        unsafe { libc::statvfs(c.as_ptr(), &mut st) },
        format_args!("statvfs {}", path.display()),
    )?;
    let f = st.f_flag;
    let mut out = libc::MS_NOSUID;
    for (st_flag, ms_flag) in [
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if f & st_flag != 0 {
            out |= ms_flag;
        }
    }
    Ok(out)
}

fn bind(src: &Path, dst: &Path, read_only: bool) -> Result<(), String> {
    bind_with(src, dst, read_only, libc::MS_NODEV)
}

/// Binds `src` at `dst` and remounts it `nosuid` plus `flags` (read-only if asked), keeping the
/// flags the host set (a remount inside a user namespace may not clear them).
fn bind_with(src: &Path, dst: &Path, read_only: bool, flags: libc::c_ulong) -> Result<(), String> {
    mount(Some(src), dst, None, libc::MS_BIND | libc::MS_REC, None)?;
    let keep = locked_flags(dst)?;
    let ro = if read_only { libc::MS_RDONLY } else { 0 };
    mount(
        None,
        dst,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | ro | flags | keep,
        None,
    )
}

/// Opens the device node at `path` without following links and checks that it is the
/// character device `major:minor`. `Ok(None)`: there is none.
pub fn checked_device(
    path: &Path,
    major: u32,
    minor: u32,
) -> Result<Option<std::os::fd::OwnedFd>, String> {
    let c = cstr(path)?;
    // SAFETY: a valid C string; flags only.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::NotFound => Ok(None),
            _ => Err(err(path.display(), e)),
        };
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: stat is plain data; zeroed is valid; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    use std::os::fd::AsRawFd;
    check(
        // SAFETY: a valid descriptor and out-pointer.
        unsafe { libc::fstat(fd.as_raw_fd(), &mut st) },
        path.display(),
    )?;
    let is_char = st.st_mode & libc::S_IFMT == libc::S_IFCHR;
    if !is_char || libc::major(st.st_rdev) != major || libc::minor(st.st_rdev) != minor {
        return Err(format!(
            "{} is not the character device {major}:{minor}; refusing to show it",
            path.display()
        ));
    }
    Ok(Some(fd))
}

/// Opens `path` without following links and checks it is still the file the launcher checked
/// (`dev`, `ino`): a rename since then is refused, not shown.
fn open_checked(path: &Path, dev: u64, ino: u64) -> Result<std::os::fd::OwnedFd, String> {
    let fd = crate::idmap::open_exact(path).map_err(|e| e.to_string())?;
    let seen = crate::idmap::identity_of(&fd).map_err(|e| err(path.display(), e))?;
    if seen != (dev, ino) {
        return Err(format!(
            "{} changed after it was checked; refusing to show it",
            path.display()
        ));
    }
    Ok(fd)
}

/// The path through which a descriptor of ours is reached (a mount source, for one).
fn fd_path(fd: i32) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}

/// Attaches the detached mount on descriptor `fd` (made by the launcher) at `dst`.
fn attach(fd: i32, dst: &Path) -> Result<(), String> {
    let dst_c = cstr(dst)?;
    let empty = c"";
    // SAFETY: a descriptor the launcher passed, an empty path with MOVE_MOUNT_F_EMPTY_PATH and
    // a valid C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd,
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst_c.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    } as i32;
    check(r, format_args!("attaching {}", dst.display()))
}

/// Makes a mount point for `src` at `dst`: a directory or an empty file, parents included.
fn mount_point(src: &Path, dst: &Path) -> Result<(), String> {
    let meta = fs::metadata(src).map_err(|e| err(src.display(), e))?;
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent).map_err(|e| err(parent.display(), e))?;
    }
    if meta.is_dir() {
        fs::create_dir_all(dst).map_err(|e| err(dst.display(), e))
    } else {
        fs::File::create(dst)
            .map(drop)
            .map_err(|e| err(dst.display(), e))
    }
}

/// Shows `src` at `dst`: symlinks are recreated as symlinks, directories and files bound.
fn show(src: &Path, dst: &Path, read_only: bool) -> Result<(), String> {
    let Ok(meta) = fs::symlink_metadata(src) else {
        return Ok(());
    };
    if meta.file_type().is_symlink() {
        let target = fs::read_link(src).map_err(|e| err(src.display(), e))?;
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(|e| err(parent.display(), e))?;
        }
        return symlink(&target, dst).map_err(|e| err(dst.display(), e));
    }
    mount_point(src, dst)?;
    bind(src, dst, read_only)
}

/// Covers what is at `at`: a directory with an empty read-only tmpfs, anything else with the
/// empty `cover_file`, read-only. Nothing there: nothing to cover.
fn cover(at: &Path, cover_file: &Path) -> Result<(), String> {
    match fs::symlink_metadata(at) {
        Ok(m) if m.is_dir() => mount(
            Some(Path::new("tmpfs")),
            at,
            Some("tmpfs"),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some("mode=0,size=4k"),
        ),
        Ok(_) => bind(cover_file, at, true),
        Err(_) => Ok(()),
    }
}

fn write_file(path: &Path, body: &str) -> Result<(), String> {
    fs::write(path, body).map_err(|e| err(path.display(), e))
}

/// Builds the agent's root on a fresh tmpfs and pivots into it. Returns whether memory files
/// are non-executable in the sandbox (`vm.memfd_noexec = 2`).
fn build_root(spec: &Spec) -> Result<bool, String> {
    // Nothing we mount may propagate back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let root = spec.root.as_path();
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755,size=16m"),
    )?;
    for dir in SYSTEM {
        show(Path::new(dir), &inside(root, Path::new(dir)), true)?;
    }
    // An empty file of our own, never a host file, covers hidden files and masked entries. It
    // lives on a tiny read-only tmpfs of its own that is detached once the covers are in place
    // (an unlinked file still bound somewhere would keep the root from becoming read-only).
    let cover_dir = root.join(".cover");
    fs::create_dir_all(&cover_dir).map_err(|e| err("cover", e))?;
    mount(
        Some(Path::new("tmpfs")),
        &cover_dir,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=0700,size=4k,nr_inodes=2"),
    )?;
    let cover_file = cover_dir.join("empty");
    fs::File::create(&cover_file).map_err(|e| err("cover file", e))?;
    fs::set_permissions(&cover_file, fs::Permissions::from_mode(0o0))
        .map_err(|e| err("cover file", e))?;
    mount(
        None,
        &cover_dir,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;

    let etc = root.join("etc");
    fs::create_dir_all(&etc).map_err(|e| err("/etc", e))?;
    for entry in ETC {
        show(&Path::new("/etc").join(entry), &etc.join(entry), true)?;
    }
    write_file(
        &etc.join("passwd"),
        &format!(
            "agent:x:{AGENT_UID}:{AGENT_GID}:Umbra agent:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
    )?;
    write_file(
        &etc.join("group"),
        &format!("agent:x:{AGENT_GID}:\nnogroup:x:65534:\n"),
    )?;
    write_file(
        &etc.join("nsswitch.conf"),
        "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n",
    )?;
    write_file(&etc.join("resolv.conf"), &spec.resolv_conf)?;
    write_file(&etc.join("hostname"), &format!("{}\n", spec.id))?;
    mount_point(&spec.hosts_file, &etc.join("hosts"))?;
    bind(&spec.hosts_file, &etc.join("hosts"), true)?;

    let dev = root.join("dev");
    fs::create_dir_all(&dev).map_err(|e| err("/dev", e))?;
    mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )?;
    for (d, major, minor) in DEVICES {
        if let Some(fd) = checked_device(&Path::new("/dev").join(d), *major, *minor)? {
            use std::os::fd::AsRawFd;
            let src = fd_path(fd.as_raw_fd());
            fs::File::create(dev.join(d)).map_err(|e| err(d, e))?;
            // Devices must stay usable: no nodev here (the tmpfs under them is noexec).
            bind_with(&src, &dev.join(d), false, 0)?;
        }
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(name)).map_err(|e| err(name, e))?;
    }
    let shm = dev.join("shm");
    fs::create_dir_all(&shm).map_err(|e| err("/dev/shm", e))?;
    mount(
        Some(Path::new("tmpfs")),
        &shm,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=1777"),
    )?;

    let proc_dir = root.join("proc");
    fs::create_dir_all(&proc_dir).map_err(|e| err("/proc", e))?;
    mount(
        Some(Path::new("proc")),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    // Memory files can never be executed in this PID namespace (fileless binaries); where the
    // kernel lacks the switch, the seccomp filter refuses memfd_create altogether.
    let memfd_sealed = fs::write(proc_dir.join("sys/vm/memfd_noexec"), "2").is_ok();
    crate::sockbuf::bound_socket_buffers(&proc_dir.join("sys"))?;
    bind(&proc_dir.join("sys"), &proc_dir.join("sys"), true)?;
    for name in PROC_MASKED {
        cover(&proc_dir.join(name), &cover_file)?;
    }

    let tmp = root.join("tmp");
    fs::create_dir_all(&tmp).map_err(|e| err("/tmp", e))?;
    mount(
        Some(Path::new("tmpfs")),
        &tmp,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;

    for source in &spec.sources {
        let dst = inside(root, &source.at);
        match &source.from {
            From::Path { path, dev, ino } => {
                let opened = open_checked(path, *dev, *ino)?;
                let src = fd_path(std::os::fd::AsRawFd::as_raw_fd(&opened));
                mount_point(&src, &dst)?;
                bind(&src, &dst, source.read_only)?;
            }
            From::Fd(fd) => {
                mount_point(&fd_path(*fd), &dst)?;
                attach(*fd, &dst)?;
            }
        }
    }
    // Secrets that a mount above made visible are covered, and every directory between the
    // shown path and the hidden one is pinned (made a mount point), so that renaming it or its
    // parents cannot carry the hidden path out from under its cover, in this run or the next.
    let mut pinned = std::collections::HashSet::new();
    for h in &spec.hide {
        let Some(shown) = spec.sources.iter().find(|s| h.starts_with(&s.at)) else {
            // Below a system path (read-only, so not renamed from inside): covered where it is.
            cover(&inside(root, h), &cover_file)?;
            continue;
        };
        let mut between: Vec<&Path> = h
            .ancestors()
            .skip(1)
            .take_while(|a| *a != shown.at.as_path())
            .collect();
        between.reverse();
        for a in between {
            if pinned.insert(a.to_path_buf()) {
                let at = inside(root, a);
                mount(Some(&at), &at, None, libc::MS_BIND | libc::MS_REC, None)?;
            }
        }
        cover(&inside(root, h), &cover_file)?;
    }
    let cover_c = cstr(&cover_dir)?;
    check(
        // SAFETY: a valid C string.
        unsafe { libc::umount2(cover_c.as_ptr(), libc::MNT_DETACH) },
        "detaching the cover",
    )?;
    fs::remove_dir(&cover_dir).map_err(|e| err("cover", e))?;

    let old = root.join(".oldroot");
    fs::create_dir_all(&old).map_err(|e| err("old root", e))?;
    let (root_c, old_c) = (cstr(root)?, cstr(&old)?);
    check(
        // SAFETY: valid C strings.
        unsafe { libc::syscall(libc::SYS_pivot_root, root_c.as_ptr(), old_c.as_ptr()) as i32 },
        "pivot_root",
    )?;
    std::env::set_current_dir("/").map_err(|e| err("chdir /", e))?;
    let old_in = cstr("/.oldroot")?;
    check(
        // SAFETY: valid C string.
        unsafe { libc::umount2(old_in.as_ptr(), libc::MNT_DETACH) },
        "detaching the host's root",
    )?;
    let _ = fs::remove_dir("/.oldroot");
    // The root itself (and /etc, made on it) become read-only now that they are built.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755,size=16m"),
    )?;
    mount(
        None,
        Path::new("/dev"),
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )?;
    Ok(memfd_sealed)
}

/// Everything the agent's process needs, made before the fork so that the child only makes
/// system calls.
struct Prepared {
    path: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    workspace: PathBuf,
    ruleset: Option<Ruleset>,
    filter: Filter,
    memory: Option<u64>,
    pids: Option<u64>,
    shown: String,
}

impl Prepared {
    fn new(spec: &Spec, deny_memfd: bool) -> Result<Prepared, String> {
        let cmd = spec.argv.first().ok_or("no command given")?;
        let path_var = spec
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or("/usr/bin:/bin");
        let path = resolve(cmd, path_var, &spec.workspace);
        let argv = spec.argv.iter().map(cstr).collect::<Result<Vec<_>, _>>()?;
        let env = spec
            .env
            .iter()
            .map(|(k, v)| cstr(format!("{k}={v}")))
            .collect::<Result<Vec<_>, _>>()?;
        let ruleset = match Ruleset::new() {
            Ok(mut r) => {
                for dir in SYSTEM.iter().chain(&["/etc"]) {
                    r.allow(Path::new(dir), Access::ReadExec)
                        .map_err(|e| err("landlock", e))?;
                }
                r.allow(Path::new("/proc"), Access::Read)
                    .map_err(|e| err("landlock", e))?;
                for (d, _, _) in DEVICES {
                    r.allow(&Path::new("/dev").join(d), Access::Device)
                        .map_err(|e| err("landlock", e))?;
                }
                // Every directory may be listed (the mount namespace holds only what the
                // agent may see); files are read only where a rule below says so.
                r.allow(Path::new("/"), Access::List)
                    .map_err(|e| err("landlock", e))?;
                for rw in [Path::new("/tmp"), Path::new("/dev/shm")] {
                    r.allow(rw, Access::ReadWrite)
                        .map_err(|e| err("landlock", e))?;
                }
                for source in &spec.sources {
                    let access = if source.read_only {
                        Access::ReadExec
                    } else {
                        Access::ReadWrite
                    };
                    r.allow(&source.at, access)
                        .map_err(|e| err("landlock", e))?;
                }
                Some(r)
            }
            Err(e) if spec.allow_degraded => {
                eprintln!("umbra run: warning: running without Landlock ({e})");
                None
            }
            Err(e) => {
                return Err(format!(
                    "Landlock is required: {e} (use --allow-degraded to run without it)"
                ))
            }
        };
        Ok(Prepared {
            path: cstr(&path)?,
            argv,
            env,
            workspace: spec.workspace.clone(),
            ruleset,
            filter: Filter::agent(deny_memfd),
            memory: spec.rlimit_memory,
            pids: spec.rlimit_pids,
            shown: cmd.clone(),
        })
    }

    /// In the agent's process: confine, then execute. Returns only on failure, with the exit
    /// code to leave with.
    fn exec(mut self) -> i32 {
        if let Err(e) = self.confine() {
            eprintln!("umbra run: cannot confine the agent: {e}");
            return exit::SETUP;
        }
        let mut argv: Vec<*const libc::c_char> = self.argv.iter().map(|c| c.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut env: Vec<*const libc::c_char> = self.env.iter().map(|c| c.as_ptr()).collect();
        env.push(std::ptr::null());
        // SAFETY: null-terminated arrays of valid C strings that outlive the call.
        unsafe { libc::execve(self.path.as_ptr(), argv.as_ptr(), env.as_ptr()) };
        let e = io::Error::last_os_error();
        eprintln!("umbra run: cannot run `{}`: {e}", self.shown);
        if e.kind() == io::ErrorKind::NotFound {
            exit::NOT_FOUND
        } else {
            exit::NOT_EXECUTABLE
        }
    }

    fn confine(&mut self) -> Result<(), String> {
        std::env::set_current_dir(&self.workspace).map_err(|e| err("workspace", e))?;
        let limit = |res, v: u64| {
            let l = libc::rlimit {
                rlim_cur: v,
                rlim_max: v,
            };
            // SAFETY: setrlimit with a valid struct.
            check(unsafe { libc::setrlimit(res, &l) }, "setrlimit")
        };
        limit(libc::RLIMIT_CORE, 0)?;
        if let Some(m) = self.memory {
            limit(libc::RLIMIT_AS, m)?;
        }
        if let Some(p) = self.pids {
            limit(libc::RLIMIT_NPROC, p)?;
        }
        check(
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
            "no_new_privs",
        )?;
        if let Some(r) = self.ruleset.take() {
            r.restrict_self().map_err(|e| err("landlock", e))?;
        }
        // No descriptor but stdin, stdout and stderr reaches the agent.
        // SAFETY: close_range takes integers.
        unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
        drop_capabilities()?;
        self.filter.install().map_err(|e| err("seccomp", e))
    }
}

/// Clears every capability set, the bounding set and the ambient set, so that nothing the agent
/// executes can gain a capability (file capabilities included).
fn drop_capabilities() -> Result<(), String> {
    // SAFETY: prctl with integer arguments; unknown capability numbers fail with EINVAL, which
    // ends the loop.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                break;
            }
        }
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [
        Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
        Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
    ];
    // SAFETY: header and two data structs, as version 3 requires.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    check(r as i32, "dropping capabilities")
}

/// Finds the program the way a shell would, on the agent's PATH, as seen inside.
fn resolve(cmd: &str, path_var: &str, cwd: &Path) -> PathBuf {
    if cmd.contains('/') {
        let p = Path::new(cmd);
        return if p.is_absolute() {
            p.to_path_buf()
        } else {
            cwd.join(p)
        };
    }
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(cmd);
        if let Ok(m) = fs::metadata(&candidate) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return candidate;
            }
        }
    }
    // Not found: exec reports ENOENT for this made-up path.
    PathBuf::from(format!("/nonexistent/{cmd}"))
}

/// Whether this kernel offers what the sandbox needs, as lines of what is missing.
pub fn missing_features() -> Vec<String> {
    let mut out = Vec::new();
    if landlock::abi().is_none() {
        out.push("Landlock (filesystem rules)".to_string());
    }
    if !Path::new("/proc/self/ns/user").exists() {
        out.push("user namespaces".to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_expected_character_device_is_shown() {
        assert!(checked_device(Path::new("/dev/null"), 1, 3)
            .unwrap()
            .is_some());
        let e = checked_device(Path::new("/dev/zero"), 1, 3).unwrap_err();
        assert!(e.contains("1:3"), "{e}");
        let t = tempfile::tempdir().unwrap();
        let fake = t.path().join("null");
        fs::write(&fake, b"host data").unwrap();
        assert!(checked_device(&fake, 1, 3).is_err(), "a regular file");
        let link = t.path().join("link");
        symlink("/dev/null", &link).unwrap();
        assert!(
            checked_device(&link, 1, 3).is_err(),
            "a link, even to the device"
        );
        assert!(checked_device(&t.path().join("missing"), 1, 3)
            .unwrap()
            .is_none());
    }
}
