//! The launcher's side: checks the request, makes the cgroup and the state directory, starts the
//! sandbox's first process, opens its network namespace, and later waits for it or kills it.
//!
//! Start-up is two-phase so that the tunneler's listeners exist before the agent runs:
//! [`Prepared::new`] returns once the namespaces exist (the agent has not started), and
//! [`Prepared::start`] lets it run.

use std::ffi::CString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cgroup::{Cgroup, Limits};
use crate::exposure::{self, HostFacts, Scan, Shown};
use crate::fdpass::{self, Request};
use crate::idmap::{self, AgentIds};
use crate::init::{FIRST_SOURCE_FD, NET_FD, SPEC_FD};
use crate::spec::{write_frame, From, Source, Spec};
use crate::{exit, landlock};

/// What to run and how to confine it.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The `umbra` executable, which runs the sandbox's first process (`__sandbox-init`).
    pub program: PathBuf,
    /// The sandbox's id: its host name, cgroup name and state directory.
    pub id: String,
    /// The workspace (must exist): read-write at the same path inside, and the working directory.
    pub workspace: PathBuf,
    /// Extra read-only paths.
    pub ro: Vec<PathBuf>,
    /// Paths that must never be visible inside (the identity file, the controller's directory).
    pub hide: Vec<PathBuf>,
    /// Host files shown read-only inside at another path.
    pub extra: Vec<(PathBuf, PathBuf)>,
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// The agent's whole environment.
    pub env: Vec<(String, String)>,
    /// Memory, CPU and process limits.
    pub limits: Limits,
    /// Run without Landlock where the kernel lacks it.
    pub allow_degraded: bool,
    /// Capture the agent's standard output instead of passing it through.
    pub capture_stdout: bool,
}

/// Why a sandbox could not be made or run.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The request itself is wrong (missing workspace, a path that would expose a secret...).
    #[error("{0}")]
    Invalid(String),
    /// The kernel lacks a feature the sandbox needs.
    #[error("this kernel lacks {0}; refusing to start (use --allow-degraded to run without it)")]
    Missing(String),
    /// The limits could not be set up.
    #[error("cannot set up limits: {0}")]
    Limits(io::Error),
    /// The sandbox's own processes reported a failure while building it.
    #[error("sandbox set-up failed: {0}")]
    Setup(String),
    /// Anything else the launcher's system calls reported.
    #[error("{0}")]
    Io(#[from] io::Error),
}

fn contains(outer: &Path, inner: &Path) -> bool {
    inner.starts_with(outer)
}

/// Opens a path the user named (made absolute against the current directory), refusing any
/// symbolic link on the way, and returns its real path and the descriptor everything after the
/// check uses. A link in a shown path is refused rather than followed: an agent could have made
/// it in an earlier run (in a workspace's parent it was shown) to aim this one anywhere.
fn opened(p: &Path, what: &str) -> Result<(PathBuf, OwnedFd), SandboxError> {
    let abs = std::path::absolute(p)
        .map_err(|e| SandboxError::Invalid(format!("{what} {}: {e}", p.display())))?;
    let fd = idmap::open_exact(&abs).map_err(|e| {
        let real = std::fs::canonicalize(&abs)
            .map(|r| format!("; its real path is {}", r.display()))
            .unwrap_or_default();
        SandboxError::Invalid(format!("{what} {}{real}", e))
    })?;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| SandboxError::Invalid(format!("{what} {}: {e}", p.display())))?;
    Ok((real, fd))
}

/// At most this many `--ro` paths (each is a mount, and a descriptor on the way in).
const MAX_RO: usize = 32;

/// Checks the request: paths exist and are absolute; nothing shown is a shared or system
/// location or holds key material ([`exposure`]); every hidden path exists.
#[allow(clippy::type_complexity)]
fn validate(
    cfg: &SandboxConfig,
    host: &HostFacts,
) -> Result<(PathBuf, Vec<PathBuf>, Vec<PathBuf>, Vec<OwnedFd>), SandboxError> {
    if cfg.argv.is_empty() {
        return Err(SandboxError::Invalid("no command given".into()));
    }
    if cfg.ro.len() > MAX_RO {
        return Err(SandboxError::Invalid(format!(
            "at most {MAX_RO} --ro paths are accepted"
        )));
    }
    let (ws, ws_fd) = opened(&cfg.workspace, "workspace")?;
    if !ws.is_dir() {
        return Err(SandboxError::Invalid(format!(
            "workspace {} is not a directory",
            ws.display()
        )));
    }
    let mut fds = vec![ws_fd];
    let mut ro = Vec::new();
    for p in &cfg.ro {
        let (real, fd) = opened(p, "read-only path")?;
        ro.push(real);
        fds.push(fd);
    }
    exposure::refuse_location(&ws, Shown::Workspace, exposure::world_writable(&ws), host)
        .map_err(SandboxError::Invalid)?;
    for p in &ro {
        exposure::refuse_location(p, Shown::ReadOnly, false, host)
            .map_err(SandboxError::Invalid)?;
    }
    // A hidden path is covered where a mount shows it. One that holds the workspace or a
    // read-only path is only a chain of empty directories leading to them inside, and covering
    // it would hide them too. A hidden path that does not exist is an error: dropping it would
    // let whatever is later renamed to that path out.
    let mut hide = Vec::new();
    for p in &cfg.hide {
        let h = std::fs::canonicalize(p)
            .map_err(|e| SandboxError::Invalid(format!("the hidden path {}: {e}", p.display())))?;
        if !std::iter::once(&ws)
            .chain(ro.iter())
            .any(|shown| contains(&h, shown))
        {
            hide.push(h);
        }
    }
    // A hidden file with other names (hard links) would still be shown under those.
    for h in &hide {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::symlink_metadata(h) {
            if !m.is_dir() && m.nlink() > 1 {
                return Err(SandboxError::Invalid(format!(
                    "the hidden file {} has {} names (hard links); hide the directory that holds it, or remove the other links",
                    h.display(),
                    m.nlink()
                )));
            }
        }
    }
    Ok((ws, ro, hide, fds))
}

/// Refuses to start without Landlock unless degraded operation was asked for.
fn require_landlock(abi: Option<u32>, allow_degraded: bool) -> Result<(), SandboxError> {
    match abi {
        Some(_) => Ok(()),
        None if allow_degraded => {
            tracing::warn!("this kernel lacks Landlock; running without filesystem rules");
            Ok(())
        }
        None => Err(SandboxError::Missing("Landlock (filesystem rules)".into())),
    }
}

/// The per-sandbox state directory (its root mount point and its hosts file), outside every path
/// the sandbox shows. Its `lock` file is held locked for as long as the sandbox lives, so state
/// left by a launcher that was killed outright (SIGKILL runs no destructor) is recognised, and
/// removed with its cgroup, by the next launcher.
///
/// Directories are `0711`: others can neither list nor change them, but a sandbox that runs as
/// another user than the launcher (see [`crate::idmap`]) can reach its own root mount point and
/// hosts file, whose random names it is told.
fn state_dir(id: &str, shown: &[&Path]) -> Result<StateDir, SandboxError> {
    let mut passed = Vec::new();
    for base in state_bases() {
        if shown
            .iter()
            .any(|s| contains(s, &base) || contains(&base, s))
        {
            passed.push(format!("{} is shown", base.display()));
            continue;
        }
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&base)
        {
            passed.push(format!("{}: {e}", base.display()));
            continue;
        }
        // Bases made by earlier versions were 0700; open them (and an own parent) to traversal.
        for dir in [Some(base.as_path()), base.parent()].into_iter().flatten() {
            if private_to_us(dir) {
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711));
            }
        }
        // A base someone else made (a shared temporary directory) is not ours to trust: its
        // owner could tamper with the state, or plant entries for `reclaim` to act on. The next
        // candidate is used instead, so another user cannot stop our sandboxes by making it.
        if !private_to_us(&base) {
            tracing::warn!(base = %base.display(), "not owned by us or open to others: not used for sandbox state");
            passed.push(format!(
                "{} is not a directory of ours closed to others",
                base.display()
            ));
            continue;
        }
        reclaim(&base);
        let dir = base.join(id);
        std::fs::DirBuilder::new().mode(0o711).create(&dir)?;
        let state = StateDir {
            lock: Some(hold_lock(&dir)?),
            path: dir,
        };
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(state.path.join("root"))?;
        return Ok(state);
    }
    Err(SandboxError::Invalid(format!(
        "no place for the sandbox's state: {}",
        passed.join("; ")
    )))
}

/// Where sandbox state may live: the first of these that is ours and closed to others. Root's
/// is in `/run`; another user's in its runtime directory, the temporary directory, or its home
/// (each tried in turn, so a name squatted by someone else in a shared `/tmp` costs nothing).
pub fn state_bases() -> Vec<PathBuf> {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let mut bases = vec![PathBuf::from("/run/umbra/sandboxes")];
    if let Some(rt) = std::env::var_os("XDG_RUNTIME_DIR").filter(|r| Path::new(r).is_absolute()) {
        bases.push(PathBuf::from(rt).join("umbra-sandboxes"));
    }
    bases.push(std::env::temp_dir().join(format!("umbra-sandboxes-{uid}")));
    if let Some(home) = std::env::var_os("HOME").filter(|h| Path::new(h).is_absolute()) {
        bases.push(PathBuf::from(home).join(".cache/umbra/sandboxes"));
    }
    bases
}

/// Whether `dir` is a real directory (not a link) owned by this user that no one else can
/// list or change (traversal is allowed).
fn private_to_us(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(dir).is_ok_and(|m| {
        // SAFETY: getuid cannot fail.
        m.is_dir() && m.uid() == unsafe { libc::getuid() } && m.mode() & 0o066 == 0
    })
}

/// Creates `dir/lock` already locked: it is locked under a temporary name and renamed into
/// place, so no other launcher ever finds it unlocked while this one lives.
fn hold_lock(dir: &Path) -> io::Result<std::fs::File> {
    let tmp = dir.join(".lock");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::fs::rename(&tmp, dir.join("lock"))?;
    Ok(f)
}

/// Removes the state (and cgroup) of every sandbox under `base` whose launcher is gone: its lock
/// can be taken. Directories without a lock file are being made right now, or are not ours.
fn reclaim(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(lock) = std::fs::File::open(dir.join("lock")) else {
            continue;
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        let Some(id) = entry.file_name().to_str().map(String::from) else {
            continue;
        };
        tracing::info!(sandbox = %id, "removing what a killed launcher left behind");
        // Waited for here, so the state goes after the processes, as it does for a live one.
        if let Some(cgroup) = Cgroup::left_behind(&id) {
            cgroup.remove_blocking();
        }
        drop(StateDir {
            path: dir,
            lock: Some(lock),
        });
    }
}

/// Removes the state directory when the sandbox is gone.
#[derive(Debug)]
struct StateDir {
    path: PathBuf,
    /// Held (locked) for the sandbox's lifetime; released after the directory is removed.
    lock: Option<std::fs::File>,
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        self.lock.take();
    }
}

/// A sandbox whose namespaces exist but whose agent has not started.
#[derive(Debug)]
pub struct Prepared {
    child: tokio::process::Child,
    sock: tokio::net::UnixStream,
    cgroup: Cgroup,
    netns: NetNs,
    hosts: PathBuf,
    // Declared last: removed after the processes and cgroup are gone.
    state: StateDir,
}

/// A running sandbox.
#[derive(Debug)]
pub struct Running {
    child: tokio::process::Child,
    // The first process ends the sandbox when this closes: no agent outlives its launcher.
    _sock: tokio::net::UnixStream,
    cgroup: Cgroup,
    _netns: NetNs,
    hosts: PathBuf,
    _state: StateDir,
}

impl Prepared {
    /// Checks the request and builds the sandbox up to the point where the agent would start.
    pub async fn new(cfg: SandboxConfig) -> Result<Prepared, SandboxError> {
        let host = HostFacts::gather(state_bases());
        let (workspace, ro, hide, opened) = validate(&cfg, &host)?;
        require_landlock(landlock::abi(), cfg.allow_degraded)?;
        if !Path::new("/proc/self/ns/user").exists() {
            return Err(SandboxError::Missing("user namespaces".into()));
        }
        // SAFETY: getuid cannot fail.
        // The seed: the sandbox's random id, through a randomly keyed hasher.
        let seed = {
            use std::hash::BuildHasher;
            std::collections::hash_map::RandomState::new().hash_one(&cfg.id)
        };
        // SAFETY: getuid cannot fail.
        let ids = AgentIds::for_launcher(unsafe { libc::getuid() }, seed);
        let mut shown: Vec<&Path> = vec![&workspace];
        shown.extend(ro.iter().map(PathBuf::as_path));
        let state = state_dir(&cfg.id, &shown)?;
        let hosts = state.path.join("hosts");
        write_hosts(&hosts, &cfg.id, ids)?;
        let (sources, detached) = sources(&workspace, &ro, opened, &cfg.extra, ids, &hide)?;
        let cgroup = Cgroup::create(&cfg.id, cfg.limits).map_err(SandboxError::Limits)?;
        let fallback = cgroup.rlimit_fallback();
        let spec = Spec {
            id: cfg.id.clone(),
            root: state.path.join("root"),
            workspace,
            hide,
            sources,
            hosts_file: hosts.clone(),
            resolv_conf: "nameserver 127.0.0.53\noptions edns0 trust-ad\n".into(),
            argv: cfg.argv.clone(),
            env: cfg.env.clone(),
            allow_degraded: cfg.allow_degraded,
            rlimit_memory: fallback.memory,
            rlimit_pids: fallback.pids,
        };

        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let theirs = high_copy(&OwnedFd::from(theirs))?;
        let (net_ours, net_theirs) = fdpass::seqpacket_pair()?;
        let net_theirs = high_copy(&net_theirs)?;
        let net_fd = net_theirs.as_raw_fd();
        let detached_fds: Vec<i32> = detached.iter().map(AsRawFd::as_raw_fd).collect();
        let procs: Vec<CString> = cgroup
            .procs_files()
            .iter()
            .map(|p| CString::new(p.as_os_str().as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| SandboxError::Invalid("cgroup path holds a NUL byte".into()))?;
        let their_fd = theirs.as_raw_fd();
        // The program is executed through a descriptor opened now: a sandbox that runs as
        // another user may not be able to reach its path (under /root, say).
        let program = std::fs::File::open(&cfg.program).map_err(|e| {
            SandboxError::Setup(format!("cannot open {}: {e}", cfg.program.display()))
        })?;
        let program = high_copy(&OwnedFd::from(program))?;
        let mut cmd =
            tokio::process::Command::new(format!("/proc/self/fd/{}", program.as_raw_fd()));
        cmd.arg0("umbra")
            .arg("__sandbox-init")
            .env_clear()
            .kill_on_drop(true);
        if cfg.capture_stdout {
            cmd.stdout(std::process::Stdio::piped());
        }
        // SAFETY: getpid cannot fail.
        let launcher = unsafe { libc::getpid() };
        // SAFETY: the closure makes only async-signal-safe system calls on memory prepared
        // before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // Join the cgroup first: everything the sandbox ever starts is counted.
                for f in &procs {
                    let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                    libc::close(fd);
                    if !ok {
                        return Err(io::Error::last_os_error());
                    }
                }
                // Started by root: the whole sandbox runs as an unprivileged user, with no
                // supplementary groups.
                if let Some(ids) = ids {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setresgid(ids.gid, ids.gid, ids.gid) != 0
                        || libc::setresuid(ids.uid, ids.uid, ids.uid) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                // If `umbra run` dies, the sandbox dies with it: no agent outlives its launcher.
                // (Set after the change of user, which clears it.)
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                if libc::getppid() != launcher {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                // The launcher may have raised its descriptor limit; the sandbox gets the one
                // the launcher was given.
                crate::nofile::restore_in_child()?;
                // Every source is numbered 64 or above (high_copy): no dup2 clobbers another,
                // and dup2 clears close-on-exec on the copies.
                if libc::dup2(their_fd, SPEC_FD) < 0 || libc::dup2(net_fd, NET_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                for (i, fd) in detached_fds.iter().enumerate() {
                    if libc::dup2(*fd, FIRST_SOURCE_FD + i as i32) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            SandboxError::Setup(format!("cannot start {}: {e}", cfg.program.display()))
        })?;
        drop(theirs);
        drop(net_theirs);
        drop(detached);
        drop(program);
        if child.id().is_none() {
            return Err(SandboxError::Setup("the sandbox exited at once".into()));
        }
        let mut frame = Vec::new();
        write_frame(&mut frame, &spec)?;
        ours.set_nonblocking(true)?;
        let mut sock = tokio::net::UnixStream::from_std(ours)?;
        let handshake = async {
            sock.write_all(&frame).await?;
            reply(&mut sock, b'R').await
        };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(20), handshake)
            .await
            .unwrap_or_else(|_| Err(SandboxError::Setup("timed out".into())))
        {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e);
        }
        let netns = NetNs::new(net_ours)?;
        Ok(Prepared {
            child,
            sock,
            cgroup,
            netns,
            hosts,
            state,
        })
    }

    /// The sandbox's network namespace, where the tunneler listens.
    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    /// The host file shown inside as `/etc/hosts`.
    pub fn hosts_path(&self) -> &Path {
        &self.hosts
    }

    /// Builds the filesystem and starts the agent; returns once it runs.
    pub async fn start(self) -> Result<Running, SandboxError> {
        let Prepared {
            mut child,
            mut sock,
            cgroup,
            netns,
            hosts,
            state,
        } = self;
        let go = async {
            sock.write_all(b"G").await?;
            reply(&mut sock, b'S').await
        };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(20), go)
            .await
            .unwrap_or_else(|_| Err(SandboxError::Setup("timed out".into())))
        {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e);
        }
        Ok(Running {
            child,
            _sock: sock,
            cgroup,
            _netns: netns,
            hosts,
            _state: state,
        })
    }
}

/// Creates the sandbox's hosts file, readable by the sandbox alone: it lists the services the
/// identity may reach, which is nobody else's business. Started by root, the file is root's
/// (the launcher rewrites it) and readable by the agent's group; otherwise it is the user's
/// own, as is the sandbox.
fn write_hosts(path: &Path, id: &str, ids: Option<AgentIds>) -> io::Result<()> {
    use std::io::Write as _;
    let mode = if ids.is_some() { 0o640 } else { 0o600 };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    if let Some(ids) = ids {
        std::os::unix::fs::fchown(&f, None, Some(ids.gid))?;
    }
    // The umask may have narrowed the mode; it is set exactly.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(hosts_file(id, &[]).as_bytes())
}

/// Where the workspace, the read-only paths and the extra files come from. Started by root,
/// the launcher prepares each as a detached mount (the workspace idmapped so that root's files
/// are the agent's and the agent's are root's); otherwise the sandbox binds the host paths.
/// Returns the sources and the descriptors to pass, in the order of their numbers.
/// Opens every shown path once, without following links ([`idmap::open_exact`]), scans what
/// that descriptor names for key material, and turns it into a source for the sandbox: for
/// root, a detached (and for the workspace, idmapped) mount made from the descriptor; for an
/// unprivileged launcher, the path with the device and inode the sandbox must find there. Nothing
/// checked here is looked up by path again without that check, so a rename between the check and
/// the mount (by an agent in a sandbox that shows a parent) cannot change what is shown.
fn sources(
    workspace: &Path,
    ro: &[PathBuf],
    opened: Vec<OwnedFd>,
    extra: &[(PathBuf, PathBuf)],
    ids: Option<AgentIds>,
    hide: &[PathBuf],
) -> Result<(Vec<Source>, Vec<OwnedFd>), SandboxError> {
    let shown: Vec<(PathBuf, PathBuf, bool, Option<&str>)> = std::iter::once((
        workspace.to_path_buf(),
        workspace.to_path_buf(),
        false,
        Some("workspace"),
    ))
    .chain(
        ro.iter()
            .map(|p| (p.clone(), p.clone(), true, Some("read-only path"))),
    )
    .chain(
        extra
            .iter()
            .map(|(src, at)| (src.clone(), at.clone(), true, None)),
    )
    .collect();
    let userns = match ids {
        Some(ids) => Some(
            idmap::userns_mapping_root_to(ids)
                .map_err(|e| SandboxError::Setup(format!("mapping the workspace: {e}")))?,
        ),
        None => None,
    };
    let mut sources = Vec::new();
    let mut fds = Vec::new();
    let mut linked = Vec::new();
    let mut checked = opened.into_iter();
    for (i, (src, at, read_only, what)) in shown.into_iter().enumerate() {
        // The workspace and `--ro` paths were opened when they were checked; the extra files
        // (the probe's binary) are the launcher's own.
        let opened = match checked.next() {
            Some(fd) => fd,
            None => idmap::open_exact(&src).map_err(|e| SandboxError::Invalid(e.to_string()))?,
        };
        let (dev, ino) = idmap::identity_of(&opened)?;
        // Root scans the detached copy itself: exactly what the agent will see (a mount on the
        // host below the workspace is not part of it).
        let tree =
            match &userns {
                Some(_) => Some(idmap::clone_tree(&opened).map_err(|e| {
                    SandboxError::Setup(format!("preparing {}: {e}", src.display()))
                })?),
                None => None,
            };
        if let Some(what) = what {
            let walk = PathBuf::from(format!(
                "/proc/self/fd/{}",
                tree.as_ref().unwrap_or(&opened).as_raw_fd()
            ));
            linked.extend(scan(&src, &walk, what, hide)?);
        }
        match (&userns, tree) {
            (Some(ns), Some(tree)) => {
                let attrs = idmap::Attrs {
                    read_only,
                    idmap: (i == 0).then(|| ns.as_raw_fd()),
                };
                idmap::set_attrs(&tree, attrs, &src)
                    .map_err(|e| SandboxError::Setup(e.to_string()))?;
                fds.push(high_copy(&tree)?);
                sources.push(Source {
                    at,
                    from: From::Fd(FIRST_SOURCE_FD + (fds.len() - 1) as i32),
                    read_only,
                });
            }
            _ => sources.push(Source {
                at,
                from: From::Path {
                    path: src,
                    dev,
                    ino,
                },
                read_only,
            }),
        }
    }
    linked.sort_unstable();
    let mut shown_paths = vec![workspace.to_path_buf()];
    shown_paths.extend(ro.iter().cloned());
    check_hidden(&shown_paths, hide, &linked)?;
    Ok((sources, fds))
}

/// Refuses a shown path (`shown`, walked through `walk`) that holds key material outside the
/// hidden directories in `hide`, or that is too large to check completely (what was not looked
/// at cannot be vouched for). Returns the files in it that have other names (hard links).
fn scan(
    shown: &Path,
    walk: &Path,
    what: &str,
    hide: &[PathBuf],
) -> Result<Vec<(u64, u64)>, SandboxError> {
    let covered: Vec<PathBuf> = hide
        .iter()
        .filter(|h| h.is_dir())
        .filter_map(|h| h.strip_prefix(shown).ok())
        .map(|rel| walk.join(rel))
        .collect();
    match exposure::find_secret(walk, &covered) {
        Scan::Found(s) => {
            let at = s
                .path
                .strip_prefix(walk)
                .map(|rel| shown.join(rel))
                .unwrap_or(s.path);
            Err(SandboxError::Invalid(format!(
                "the {what} {} holds {} ({}); keep identities, keys and tokens outside what the sandbox shows (or --hide the directory that holds them), or choose another --workspace",
                shown.display(),
                at.display(),
                s.kind
            )))
        }
        Scan::Partial { entries } => Err(SandboxError::Invalid(format!(
            "the {what} {} holds more than {entries} entries or is deeper than {} levels, too much to check for key material; --hide the directories that hold generated files, or choose a smaller {what}",
            shown.display(),
            exposure::SCAN_DEPTH
        ))),
        Scan::Clean { linked } => Ok(linked),
    }
}

/// Refuses hidden directories inside what is shown that reach it through a link
/// ([`exposure::hidden_leak`]): whatever is written through the link is shown.
fn check_hidden(
    shown: &[PathBuf],
    hide: &[PathBuf],
    linked: &[(u64, u64)],
) -> Result<(), SandboxError> {
    for h in hide {
        if !h.is_dir() || !shown.iter().any(|s| h.starts_with(s)) {
            continue;
        }
        if let Some(s) = exposure::hidden_leak(h, shown, hide, linked) {
            return Err(SandboxError::Invalid(format!(
                "the hidden directory {} holds {} ({}); whatever is written there would be shown",
                h.display(),
                s.path.display(),
                s.kind
            )));
        }
    }
    Ok(())
}

/// Reads the sandbox's answer: `want` to go on, `E` and a message for a failure.
async fn reply(sock: &mut tokio::net::UnixStream, want: u8) -> Result<(), SandboxError> {
    let mut b = [0u8; 1];
    match sock.read(&mut b).await? {
        0 => Err(SandboxError::Setup(
            "the sandbox's first process ended without a word".into(),
        )),
        _ if b[0] == want => Ok(()),
        _ if b[0] == b'E' => {
            let mut msg = Vec::new();
            let _ = (&mut *sock).take(4096).read_to_end(&mut msg).await;
            Err(SandboxError::Setup(
                String::from_utf8_lossy(&msg).trim().to_string(),
            ))
        }
        _ => Err(SandboxError::Setup(
            "unexpected reply from the sandbox".into(),
        )),
    }
}

impl Running {
    /// Waits for the agent to end; its exit code (128 + signal when a signal killed it).
    pub async fn wait(&mut self) -> io::Result<i32> {
        let status = self.child.wait().await?;
        use std::os::unix::process::ExitStatusExt;
        Ok(status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(exit::SETUP))
    }

    /// Kills the agent and everything it started, without waiting ([`Running::shutdown`] waits
    /// until they are gone).
    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
        self.cgroup.kill();
    }

    /// Kills what is left of the sandbox and waits until its processes, its cgroup and its state
    /// are gone. Dropping a `Running` does the same without waiting (the cgroup is removed by a
    /// thread of its own once it has emptied); this is the way out that is known to be done.
    pub async fn shutdown(self) {
        let Running {
            mut child,
            _sock,
            cgroup,
            _netns,
            hosts: _,
            _state,
        } = self;
        let _ = child.start_kill();
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            tracing::warn!("the sandbox's first process outlived SIGKILL for 5 s");
        }
        drop(_sock);
        cgroup.shutdown().await;
        // Declared last in `Running` for the same reason: the state goes after the processes.
        drop(_netns);
        drop(_state);
    }

    /// The sandbox's cgroup (to read what limits were hit).
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// The host file shown inside as `/etc/hosts`.
    pub fn hosts_path(&self) -> &Path {
        &self.hosts
    }

    /// The agent's standard output, when [`SandboxConfig::capture_stdout`] was set (once).
    pub fn take_stdout(&mut self) -> Option<tokio::process::ChildStdout> {
        self.child.stdout.take()
    }
}

/// The `/etc/hosts` the agent sees: its own names, then the authorized services.
pub fn hosts_file(id: &str, names: &[(String, std::net::IpAddr)]) -> String {
    let mut out = format!(
        "# Umbra sandbox {id}: only authorized services resolve\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{id}\n"
    );
    for (name, ip) in names {
        out.push_str(&format!("{ip}\t{name}\n"));
    }
    out
}

/// The launcher's handle on the sandbox's network namespace: asks the sandbox's first process
/// for sockets made inside it (see [`crate::fdpass`]).
#[derive(Debug, Clone)]
pub struct NetNs {
    sock: Arc<Mutex<OwnedFd>>,
}

impl NetNs {
    fn new(sock: OwnedFd) -> io::Result<NetNs> {
        // A sandbox that stops answering must not hang the launcher.
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: a valid option value of the right size on a socket we own.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        Ok(NetNs {
            sock: Arc::new(Mutex::new(sock)),
        })
    }

    fn ask(&self, req: Request) -> io::Result<OwnedFd> {
        let sock = self
            .sock
            .lock()
            .map_err(|_| io::Error::other("sandbox network handle poisoned"))?;
        fdpass::ask(sock.as_raw_fd(), req)
    }

    /// A non-blocking TCP listener at `addr` inside the namespace.
    pub fn listen_tcp(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        let l = std::net::TcpListener::from(self.ask(Request::Tcp(addr))?);
        l.set_nonblocking(true)?;
        Ok(l)
    }

    /// A non-blocking UDP socket bound at `addr` inside the namespace.
    pub fn bind_udp(&self, addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
        let s = std::net::UdpSocket::from(self.ask(Request::Udp(addr))?);
        s.set_nonblocking(true)?;
        Ok(s)
    }
}

/// A copy of `fd` numbered 64 or above, so that moving it to 3, 4 or a source's number (below
/// 64) in the child cannot clobber another one.
fn high_copy(fd: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new one or -1.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_private_directory_of_ours_holds_sandbox_state() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("base");
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        assert!(private_to_us(&dir));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(!private_to_us(&dir), "readable by others");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o733)).unwrap();
        assert!(!private_to_us(&dir), "writable by others");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        assert!(private_to_us(&dir), "traversable only");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(!private_to_us(&link), "a link");
        assert!(!private_to_us(&t.path().join("missing")));
        // Owned by someone else (root can hand it over; others cannot make one to test).
        // SAFETY: getuid takes nothing and cannot fail.
        if unsafe { libc::getuid() } == 0 {
            std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
            assert!(!private_to_us(&dir), "another user's");
        }
    }

    fn cfg(ws: &Path) -> SandboxConfig {
        SandboxConfig {
            program: "/bin/false".into(),
            id: "t".into(),
            workspace: ws.into(),
            ro: vec![],
            hide: vec![],
            extra: vec![],
            argv: vec!["true".into()],
            env: vec![],
            limits: Limits::default(),
            allow_degraded: false,
            capture_stdout: false,
        }
    }

    #[test]
    fn requests_that_would_expose_secrets_are_refused() {
        let host = HostFacts::gather(state_bases());
        let dir = tempfile::tempdir().unwrap();
        assert!(validate(&cfg(dir.path()), &host).is_ok());
        let link = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(dir.path(), link.path().join("ws")).unwrap();
        let e = validate(&cfg(&link.path().join("ws")), &host).unwrap_err();
        assert!(
            e.to_string().contains("real path"),
            "a link is not followed: {e}"
        );
        for bad in ["/", "/root", "/usr/lib", "/tmp", "/nonexistent-umbra-ws"] {
            let e = validate(&cfg(Path::new(bad)), &host).unwrap_err();
            assert!(matches!(e, SandboxError::Invalid(_)), "{bad}: {e}");
        }
        let mut c = cfg(dir.path());
        c.argv.clear();
        assert!(validate(&c, &host).is_err());
        let mut c = cfg(dir.path());
        c.ro = vec!["/".into()];
        assert!(validate(&c, &host).is_err());
        // Key material in the workspace, and a hidden path that does not exist.
        let mut c = cfg(dir.path());
        c.hide = vec![dir.path().join("gone")];
        let e = validate(&c, &host).unwrap_err().to_string();
        assert!(e.contains("gone"), "{e}");
        std::fs::write(
            dir.path().join("agent-1.json"),
            "-----BEGIN PRIVATE KEY-----",
        )
        .unwrap();
        // Found by the scan of what was opened, on the way to the sandbox's sources.
        let (ws, ro, hide, fds) = validate(&cfg(dir.path()), &host).unwrap();
        let e = sources(&ws, &ro, fds, &[], None, &hide)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("agent-1.json") && e.contains("identity file"),
            "{e}"
        );
    }

    #[test]
    fn landlock_is_required_unless_degraded_is_asked_for() {
        assert!(require_landlock(Some(7), false).is_ok());
        let e = require_landlock(None, false).unwrap_err();
        assert!(e.to_string().contains("Landlock"), "{e}");
        assert!(e.to_string().contains("--allow-degraded"), "{e}");
        assert!(require_landlock(None, true).is_ok());
    }

    #[test]
    fn hosts_file_lists_only_what_it_is_given() {
        let h = hosts_file(
            "sb-1",
            &[("llm.umbra".into(), "127.77.0.1".parse().unwrap())],
        );
        assert!(h.contains("127.77.0.1\tllm.umbra\n"));
        assert!(h.contains("127.0.1.1\tsb-1\n"));
        assert_eq!(h.lines().filter(|l| !l.starts_with('#')).count(), 4);
    }
}
