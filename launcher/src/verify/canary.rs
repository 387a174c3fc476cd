//! What `umbra verify` watches from the host: a canary listener on the host's loopback, the
//! hidden directory under its cover, set-id bits in the workspace.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use umbra_sandbox::probe::Attempt;

use super::{held, VerifyError};

/// Connections the canary reads at once.
const CANARY_READERS: usize = 256;

/// Listeners on the host's loopback (TCP and UDP, one port) that count what reaches them
/// carrying the run's secret token, which only the probe knows: an unrelated host process that
/// happens to connect is not mistaken for an escape. Owns its tasks: they stop when it is
/// dropped.
pub(super) struct Canary {
    addr: std::net::SocketAddr,
    hits: Arc<AtomicUsize>,
    _tasks: JoinSet<()>,
}

impl Canary {
    /// Starts listening on an ephemeral port of 127.0.0.1 for `token`.
    pub(super) fn start(token: &str) -> std::io::Result<Canary> {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        tcp.set_nonblocking(true)?;
        let addr = tcp.local_addr()?;
        let hits = Arc::new(AtomicUsize::new(0));
        let tcp = tokio::net::TcpListener::from_std(tcp)?;
        let mut tasks = JoinSet::new();
        let h = hits.clone();
        let want = token.as_bytes().to_vec();
        // Every connection is read (for a bounded time), a bounded number at once: when all
        // readers are busy the loop waits before accepting more, and the kernel's backlog holds
        // the rest. None is dropped unread, so a flood from some other host process cannot hide
        // the probe's own connection among dropped ones.
        let readers = Arc::new(tokio::sync::Semaphore::new(CANARY_READERS));
        tasks.spawn(async move {
            let mut reading = JoinSet::new();
            loop {
                while reading.try_join_next().is_some() {}
                let Ok(permit) = readers.clone().acquire_owned().await else {
                    return;
                };
                let Ok((mut s, _)) = tcp.accept().await else {
                    return;
                };
                let (h, want) = (h.clone(), want.clone());
                reading.spawn(async move {
                    use tokio::io::AsyncReadExt as _;
                    let mut got = vec![0u8; want.len()];
                    let read = tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut got));
                    if matches!(read.await, Ok(Ok(_))) && got == want {
                        h.fetch_add(1, Ordering::SeqCst);
                    }
                    drop(permit);
                });
            }
        });
        if let Ok(udp) = std::net::UdpSocket::bind(addr) {
            udp.set_nonblocking(true)?;
            let udp = tokio::net::UdpSocket::from_std(udp)?;
            let h = hits.clone();
            let want = token.as_bytes().to_vec();
            tasks.spawn(async move {
                let mut b = [0u8; 512];
                while let Ok((n, _)) = udp.recv_from(&mut b).await {
                    if b[..n] == want[..] {
                        h.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
        Ok(Canary {
            addr,
            hits,
            _tasks: tasks,
        })
    }

    /// Where it listens.
    pub(super) fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Connections and datagrams that carried the token so far.
    pub(super) fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// The `--hide` canary: `HIDDEN_DIR/secret` below the workspace, removed when dropped.
pub(super) struct HideCanary {
    top: PathBuf,
    pub(super) dir: PathBuf,
}

impl HideCanary {
    pub(super) fn make(workspace: &Path) -> Result<HideCanary, VerifyError> {
        use umbra_sandbox::probe::privilege::{HIDDEN_DIR, HIDDEN_SECRET};
        let dir = workspace.join(HIDDEN_DIR);
        let top = workspace.join(
            Path::new(HIDDEN_DIR)
                .components()
                .next()
                .map(|c| c.as_os_str().to_owned())
                .unwrap_or_default(),
        );
        let _ = std::fs::remove_dir_all(&top);
        std::fs::create_dir_all(&dir).map_err(|e| {
            VerifyError::io(format!("making {} in the workspace", dir.display()), e)
        })?;
        std::fs::write(dir.join(HIDDEN_SECRET), b"umbra verify: hidden canary\n")
            .map_err(|e| VerifyError::io("writing the hidden canary", e))?;
        Ok(HideCanary { top, dir })
    }

    /// On the host: the hidden file is still where it was (no rename carried it out).
    pub(super) fn check(&self) -> Vec<Attempt> {
        use umbra_sandbox::probe::privilege::HIDDEN_SECRET;
        let there = self.dir.join(HIDDEN_SECRET).is_file();
        let strays: Vec<String> = std::fs::read_dir(&self.top)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| Some(n.as_str()) != self.dir.file_name().and_then(|f| f.to_str()))
                    .collect()
            })
            .unwrap_or_default();
        let ok = there && strays.is_empty();
        vec![held(
            "carry a --hide path out from under its cover (seen from the host)",
            "still in place",
            if ok {
                "in place".into()
            } else {
                format!(
                    "in place: {there}; new entries beside it: [{}]",
                    strays.join(" ")
                )
            },
            !ok,
        )]
    }
}

impl Drop for HideCanary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.top);
    }
}

/// On the host: the probe's file in the workspace carries no set-id bit; removed afterwards.
pub(super) fn setid_on_host(workspace: &Path) -> Attempt {
    use std::os::unix::fs::MetadataExt as _;
    let file = workspace.join(umbra_sandbox::probe::privilege::SETID_FILE);
    let meta = std::fs::symlink_metadata(&file);
    let _ = std::fs::remove_file(&file);
    let (observed, escaped) = match meta {
        Ok(m) if m.mode() & 0o6000 != 0 => (
            format!("mode {:o}, owner {}", m.mode() & 0o7777, m.uid()),
            true,
        ),
        Ok(m) => (
            format!("mode {:o}, owner {}", m.mode() & 0o7777, m.uid()),
            false,
        ),
        Err(_) => ("no file".into(), false),
    };
    held(
        "a set-id file in the workspace (seen from the host)",
        "no set-id bit",
        observed,
        escaped,
    )
}
