//! `umbra tunnel --netns PATH | --pid PID`: Umbra as the only network of a namespace it did not
//! make: a `docker run --network none` container, a Podman one, a Kubernetes pod's sandbox, or
//! one made with `ip netns add`.
//!
//! The same parts as `umbra run` (`inside`): listeners that follow the identity's view
//! live, made inside the namespace by a thread that joined it, the DNS responder at
//! [`crate::DNS_ADDR`] inside, refused dials and names as events for the events file and the
//! controller's audit. The tunneler itself (its key, its connections to controller and routers)
//! stays in the host's namespace. A namespace with any interface but `lo` is refused unless
//! allowed: Umbra would not be its only path. With `--pid`, the container's `/etc/hosts` gains
//! Umbra's block and its `resolv.conf` names the responder, both restored at the end.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use umbra_sandbox::container_files::{self, ContainerRoot};
use umbra_sandbox::events::{EventKind, EventSink};
use umbra_sandbox::netns_join::{JoinError, JoinedNetNs};
use umbra_sandbox::pidpin::Pinned;
use umbra_sdk::Context;
use umbra_tunneler::{Mapping, Tunneler, TunnelerConfig};

use crate::inside::{start_tunneler, HostsWriter, NameService, Namespace};

/// How often the namespace's name is checked (one `stat`).
const GONE_POLL: Duration = Duration::from_millis(250);

/// Which namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A network namespace by path (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
    NetNs(PathBuf),
    /// A container's process: its network namespace, and its `/etc` through `/proc/PID/root`.
    Pid(u32),
}

impl Target {
    /// The path of the namespace.
    pub fn netns_path(&self) -> PathBuf {
        match self {
            Target::NetNs(p) => p.clone(),
            Target::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        }
    }

    /// The name its events carry (as `sandbox`): `pid-PID`, or `netns-` and the path's last
    /// part, in the characters the controller's audit takes.
    pub fn event_id(&self) -> String {
        let raw = match self {
            Target::Pid(pid) => format!("pid-{pid}"),
            Target::NetNs(p) => format!(
                "netns-{}",
                p.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            ),
        };
        raw.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect()
    }
}

/// How to attach.
#[derive(Debug)]
pub struct AttachOptions {
    /// The namespace.
    pub target: Target,
    /// Accept a namespace with interfaces other than `lo` (warned about: Umbra is then not its
    /// only path).
    pub allow_network: bool,
    /// Keep Umbra's block of hosts lines in this host file (e.g. one bind-mounted as a
    /// container's `/etc/hosts`), besides what `--pid` writes.
    pub hosts_file: Option<PathBuf>,
    /// Where events go.
    pub events: EventSink,
    /// The tunneler's settings (its `listen` and `on_denied` are set here).
    pub tunnel: TunnelerConfig,
}

/// Why the namespace could not be served.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The namespace could not be joined.
    #[error(transparent)]
    Join(#[from] JoinError),
    /// `lo` is down and could not be brought up.
    #[error("cannot bring up lo in {path}: {source}")]
    Loopback {
        /// The namespace.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The namespace has other interfaces, so Umbra would not be its only path.
    #[error("{path} has network interfaces besides lo ({names}): its processes have routes Umbra does not see. Start the container with --network none, or pass --allow-network to serve it anyway")]
    NotOnlyPath {
        /// The namespace.
        path: PathBuf,
        /// The other interfaces.
        names: String,
    },
    /// `--pid` named a process in this host's own mount namespace, or one whose root is the
    /// host's, so that its `/etc/hosts` and `resolv.conf` are the host's.
    #[error("process {0} shares this host's filesystem, so its /etc is the host's: give --netns /proc/{0}/ns/net (with --hosts-file if wanted) instead")]
    NotAContainer(u32),
    /// The container's files could not be opened or written.
    #[error("the container of pid {pid}: {source}")]
    Container {
        /// The container's process.
        pid: u32,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The `--hosts-file` could not be opened.
    #[error("the hosts file {path}: {source}")]
    HostsFile {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The tunneler could not start or never heard from the controller.
    #[error("{0}")]
    Tunnel(String),
}

/// Why [`Attached::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detached {
    /// The namespace's name is gone (the container's process exited, `ip netns delete`).
    Gone,
    /// The identity was revoked: every listener is gone.
    Revoked,
    /// Interrupted (SIGINT or SIGTERM).
    Interrupted,
}

/// A namespace being served: the owner of the tunneler, the names and the namespace's thread.
/// Dropping it stops them all; [`Attached::stop`] also restores the container's files.
pub struct Attached {
    ns: Arc<JoinedNetNs>,
    tunneler: Tunneler,
    names: NameService,
    files: Option<ContainerFiles>,
    /// The hosts files Umbra's block is written to, for taking it out at the end.
    hosts: Vec<std::fs::File>,
    events: EventSink,
}

/// Joins the namespace, checks it, and serves it.
pub async fn attach(ctx: Context, opts: AttachOptions) -> Result<Attached, AttachError> {
    let path = opts.target.netns_path();
    // The process is pinned first and checked once its root, id maps and namespace are open:
    // had it exited in between, its PID could have been another process's (another
    // container's) for some of them.
    let pin = match opts.target {
        Target::Pid(pid) => {
            Some(Pinned::open(pid).map_err(|source| AttachError::Container { pid, source })?)
        }
        Target::NetNs(_) => None,
    };
    // The container's root is opened before its namespace, both while the process lives.
    let root = match opts.target {
        Target::Pid(pid) => {
            // A process that shares our filesystem is no container: its /etc is the host's.
            // So is one in a mount namespace of its own whose root is still the host's
            // (`unshare -m`, a systemd service with `PrivateTmp=`): the same /etc, at most with
            // files mounted over it, which the tunnel, root outside, must not rewrite.
            if same_file("/proc/self/ns/mnt", &format!("/proc/{pid}/ns/mnt"))
                || same_file("/", &format!("/proc/{pid}/root"))
            {
                return Err(AttachError::NotAContainer(pid));
            }
            Some((
                pid,
                ContainerRoot::open(pid)
                    .map_err(|source| AttachError::Container { pid, source })?,
            ))
        }
        Target::NetNs(_) => None,
    };
    let ns = Arc::new(JoinedNetNs::open(&path)?);
    match ns.loopback_up() {
        Ok(true) => tracing::info!(netns = %path.display(), "brought lo up"),
        Ok(false) => {}
        Err(source) => return Err(AttachError::Loopback { path, source }),
    }
    let others: Vec<String> = ns
        .interfaces()
        .map_err(|source| AttachError::Loopback {
            path: path.clone(),
            source,
        })?
        .into_iter()
        .filter(|n| n != "lo")
        .collect();
    if !others.is_empty() {
        if !opts.allow_network {
            return Err(AttachError::NotOnlyPath {
                path,
                names: others.join(", "),
            });
        }
        tracing::warn!(netns = %path.display(), interfaces = %others.join(", "),
            "the namespace has other interfaces: Umbra is NOT its only path (--allow-network)");
    }
    let files = match root {
        Some((pid, root)) => Some(
            ContainerFiles::open(pid, &root)
                .map_err(|source| AttachError::Container { pid, source })?,
        ),
        None => None,
    };
    if let Some(pin) = &pin {
        if !pin.alive() {
            return Err(AttachError::Container {
                pid: pin.pid(),
                source: std::io::Error::other("the process exited while it was being attached"),
            });
        }
    }
    let namespace: Arc<dyn Namespace> = ns.clone();
    let tunneler = start_tunneler(
        ctx,
        opts.tunnel,
        namespace.clone(),
        &opts.events,
        crate::SANDBOX_CONNECTIONS,
    )
    .await
    .map_err(AttachError::Tunnel)?;
    let (write, hosts) = hosts_writer(files.as_ref(), opts.hosts_file)?;
    let names = NameService::start(tunneler.mappings(), &*namespace, opts.events.clone(), write)
        .map_err(|e| AttachError::Tunnel(format!("cannot start the DNS responder: {e}")))?;
    if let Some(f) = &files {
        f.point_resolver()
            .map_err(|source| AttachError::Container { pid: f.pid, source })?;
    }
    opts.events.emit(EventKind::Started {
        command: format!("umbra tunnel {}", opts.target.event_id()),
    });
    Ok(Attached {
        ns,
        tunneler,
        names,
        files,
        hosts,
        events: opts.events,
    })
}

impl Attached {
    /// The listeners, as they change.
    pub fn mappings(&self) -> watch::Receiver<Vec<Mapping>> {
        self.tunneler.mappings()
    }

    /// Serves until the namespace is gone, the identity is revoked or we are interrupted.
    pub async fn wait(&self) -> Detached {
        let mut refused = self.tunneler.refused();
        let revoked = async {
            loop {
                if *refused.borrow_and_update() {
                    return;
                }
                if refused.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let gone = async {
            loop {
                if self.ns.is_gone() {
                    return;
                }
                tokio::time::sleep(GONE_POLL).await;
            }
        };
        tokio::select! {
            _ = revoked => {
                self.events.emit(EventKind::Revoked { terminated: false });
                Detached::Revoked
            }
            _ = gone => Detached::Gone,
            _ = crate::interrupted() => Detached::Interrupted,
        }
    }

    /// Stops serving: the responder, the listeners (cutting what they carry), then the
    /// container's files go back to what they were (when it still runs).
    pub async fn stop(self, code: i32) {
        self.names.stop();
        self.tunneler.shutdown().await;
        for f in &self.hosts {
            let r = container_files::read_all(f)
                .and_then(|old| container_files::rewrite(f, &container_files::without_block(&old)));
            if let Err(e) = r {
                tracing::debug!(error = %e, "cannot take Umbra's lines out of a hosts file");
            }
        }
        if let Some(f) = &self.files {
            f.restore_resolver();
        }
        self.events.emit(EventKind::Exited { code });
    }
}

/// Whether two paths name the same file (two namespace files: the same namespace).
fn same_file(a: &str, b: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// The writer of the hosts lines: into the container's `/etc/hosts` and/or a host file, as
/// Umbra's block (the other lines kept).
fn hosts_writer(
    files: Option<&ContainerFiles>,
    host_file: Option<PathBuf>,
) -> Result<(HostsWriter, Vec<std::fs::File>), AttachError> {
    let mut targets: Vec<std::fs::File> = Vec::new();
    if let Some(f) = files {
        targets.push(
            f.hosts
                .try_clone()
                .map_err(|source| AttachError::Container { pid: f.pid, source })?,
        );
    }
    if let Some(p) = host_file {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&p)
            .and_then(|f| {
                // Read back at every change, so a FIFO (or a device) there would hang the
                // writer, or worse: only a regular file is taken.
                if f.metadata()?.file_type().is_file() {
                    Ok(f)
                } else {
                    Err(std::io::Error::other("not a regular file"))
                }
            })
            .map_err(|source| AttachError::HostsFile {
                path: p.clone(),
                source,
            })?;
        targets.push(f);
    }
    let cleanup = targets
        .iter()
        .map(std::fs::File::try_clone)
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|source| AttachError::HostsFile {
            path: PathBuf::from("/etc/hosts"),
            source,
        })?;
    let write: HostsWriter = Box::new(move |pairs: &[(String, IpAddr)]| {
        let lines: Vec<String> = pairs.iter().map(|(n, ip)| format!("{ip}\t{n}")).collect();
        for f in &targets {
            let r = container_files::read_all(f).and_then(|old| {
                container_files::rewrite(f, &container_files::with_block(&old, &lines))
            });
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot update a hosts file");
            }
        }
    });
    Ok((write, cleanup))
}

/// A container's `/etc/hosts` and `/etc/resolv.conf`, opened once beneath its root.
struct ContainerFiles {
    pid: u32,
    hosts: std::fs::File,
    resolv: std::fs::File,
}

impl ContainerFiles {
    fn open(pid: u32, root: &ContainerRoot) -> std::io::Result<ContainerFiles> {
        Ok(ContainerFiles {
            pid,
            hosts: root.open_file("etc/hosts")?,
            resolv: root.open_file("etc/resolv.conf")?,
        })
    }

    /// Makes the responder the container's only name server.
    fn point_resolver(&self) -> std::io::Result<()> {
        let file = &self.resolv;
        let old = container_files::read_all(file)?;
        container_files::rewrite(
            file,
            &container_files::resolv_with(&old, crate::DNS_ADDR.ip()),
        )
    }

    /// Gives the container its own name servers back.
    fn restore_resolver(&self) {
        let file = &self.resolv;
        let r = container_files::read_all(file).and_then(|now| {
            container_files::rewrite(file, &container_files::resolv_restored(&now))
        });
        if let Err(e) = r {
            tracing::debug!(error = %e, "cannot restore the container's resolv.conf");
        }
    }
}
