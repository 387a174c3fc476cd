//! Memory, CPU and process-count limits: cgroup v2 where its controllers are available, cgroup v1
//! where they are not, rlimits as the last resort.
//!
//! The sandbox's first process joins the group before it makes its namespaces, so nothing the
//! agent starts ever runs outside it, and the group is how the whole tree is killed at the end
//! (a process that double-forked away from its parent is still in the group).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Limits for one sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of memory (and no swap).
    pub memory: Option<u64>,
    /// CPU time as thousandths of one core (1500 = one and a half cores).
    pub cpu_millis: Option<u64>,
    /// Processes and threads at once.
    pub pids: Option<u64>,
}

/// Which mechanism enforces the limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// One cgroup v2 directory.
    V2(PathBuf),
    /// One directory per v1 controller (memory, pids, cpu), any of which may be missing.
    V1 {
        /// The memory controller's group.
        memory: Option<PathBuf>,
        /// The pids controller's group.
        pids: Option<PathBuf>,
        /// The cpu controller's group.
        cpu: Option<PathBuf>,
    },
    /// No cgroup could be made: rlimits only.
    Rlimits,
}

/// A sandbox's cgroup, the owner of its directories: whatever it holds is killed and the group
/// removed by [`Cgroup::shutdown`] (async, waits until the group is gone) or, on any other path
/// out, on drop. Drop never sleeps (it may run on an async worker): it kills and tries once, and
/// hands what needs waiting for (a group empties a moment after its last process is reaped) to a
/// thread of its own.
#[derive(Debug)]
pub struct Cgroup {
    backend: Backend,
    limits: Limits,
}

const ROOT: &str = "/sys/fs/cgroup";

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Where a cgroup v2 hierarchy with the memory, pids and cpu controllers is mounted, if any.
fn v2_root() -> Option<PathBuf> {
    for root in [PathBuf::from(ROOT), Path::new(ROOT).join("unified")] {
        let Ok(controllers) = fs::read_to_string(root.join("cgroup.controllers")) else {
            continue;
        };
        let have: Vec<&str> = controllers.split_whitespace().collect();
        if ["memory", "pids", "cpu"].iter().all(|c| have.contains(c)) {
            return Some(root);
        }
    }
    None
}

fn v1_dir(controller: &str) -> Option<PathBuf> {
    let p = Path::new(ROOT).join(controller);
    p.join("cgroup.procs").exists().then_some(p)
}

impl Cgroup {
    /// Makes the group `umbra/<name>` with `limits` on the best backend available.
    pub fn create(name: &str, limits: Limits) -> io::Result<Cgroup> {
        if let Some(root) = v2_root() {
            match Self::create_v2(&root, name, &limits) {
                Ok(path) => {
                    return Ok(Cgroup {
                        backend: Backend::V2(path),
                        limits,
                    })
                }
                Err(e) => tracing::debug!(error = %e, "cgroup v2 not usable; trying v1"),
            }
        }
        let made = |controller: &str| -> io::Result<Option<PathBuf>> {
            let Some(base) = v1_dir(controller) else {
                return Ok(None);
            };
            let dir = base.join("umbra").join(name);
            match fs::create_dir_all(&dir) {
                Ok(()) => Ok(Some(dir)),
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(None),
                Err(e) => Err(e),
            }
        };
        let (memory, pids, cpu) = (made("memory")?, made("pids")?, made("cpu")?);
        if memory.is_none() && pids.is_none() && cpu.is_none() {
            tracing::warn!("no cgroup can be made here; limits fall back to rlimits (memory as address space, processes per user, no CPU limit)");
            return Ok(Cgroup {
                backend: Backend::Rlimits,
                limits,
            });
        }
        let cg = Cgroup {
            backend: Backend::V1 { memory, pids, cpu },
            limits,
        };
        cg.apply_v1()?;
        Ok(cg)
    }

    /// The group `umbra/<name>` left behind by a launcher that died without removing it (it
    /// was killed outright), if any; dropping it kills what is left inside and removes it.
    pub fn left_behind(name: &str) -> Option<Cgroup> {
        let find = |base: PathBuf| {
            let dir = base.join("umbra").join(name);
            dir.join("cgroup.procs").exists().then_some(dir)
        };
        let backend = match v2_root().and_then(find) {
            Some(dir) => Backend::V2(dir),
            None => Backend::V1 {
                memory: v1_dir("memory").and_then(find),
                pids: v1_dir("pids").and_then(find),
                cpu: v1_dir("cpu").and_then(find),
            },
        };
        let cg = Cgroup {
            backend,
            limits: Limits::default(),
        };
        (!cg.dirs().is_empty()).then_some(cg)
    }

    fn create_v2(root: &Path, name: &str, limits: &Limits) -> io::Result<PathBuf> {
        if limits.memory.is_some() {
            let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
            if socket_memory_unaccounted(&cmdline) {
                tracing::warn!("the kernel runs with cgroup.memory=nosocket: socket buffers are not counted in --memory");
            }
        }
        let parent = root.join("umbra");
        fs::create_dir_all(&parent)?;
        // Controllers must be enabled on the way down before a child can use them.
        for dir in [root, parent.as_path()] {
            write(&dir.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
        }
        let dir = parent.join(name);
        fs::create_dir_all(&dir)?;
        let apply = || -> io::Result<()> {
            if let Some(m) = limits.memory {
                write(&dir.join("memory.max"), &m.to_string())?;
                let _ = write(&dir.join("memory.swap.max"), "0");
            }
            if let Some(p) = limits.pids {
                write(&dir.join("pids.max"), &p.to_string())?;
            }
            if let Some(c) = limits.cpu_millis {
                write(&dir.join("cpu.max"), &format!("{} 100000", c * 100))?;
            }
            Ok(())
        };
        if let Err(e) = apply() {
            let _ = fs::remove_dir(&dir);
            return Err(e);
        }
        Ok(dir)
    }

    fn apply_v1(&self) -> io::Result<()> {
        let Backend::V1 { memory, pids, cpu } = &self.backend else {
            return Ok(());
        };
        if let (Some(dir), Some(m)) = (memory, self.limits.memory) {
            write(&dir.join("memory.limit_in_bytes"), &m.to_string())?;
            // Swap accounting is optional; where it exists, no swap either.
            let _ = write(&dir.join("memory.memsw.limit_in_bytes"), &m.to_string());
            // v1 does not count socket buffers in `memory.limit_in_bytes`: without this an agent
            // under a 64 MiB limit parked hundreds of MiB in loopback TCP buffers. Accounting
            // starts when the limit is first written, so it is written before anyone joins;
            // and it is required, because without it `--memory` would not mean what it says.
            write(
                &dir.join("memory.kmem.tcp.limit_in_bytes"),
                &tcp_limit(m).to_string(),
            )
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot bound socket memory under cgroup v1 ({e})"),
                )
            })?;
        }
        if let (Some(dir), Some(p)) = (pids, self.limits.pids) {
            write(&dir.join("pids.max"), &p.to_string())?;
        }
        if let (Some(dir), Some(c)) = (cpu, self.limits.cpu_millis) {
            write(&dir.join("cpu.cfs_period_us"), "100000")?;
            write(&dir.join("cpu.cfs_quota_us"), &(c * 100).to_string())?;
        }
        Ok(())
    }

    /// The backend in use.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The `cgroup.procs` files a process writes `0` into to join, before it does anything else.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Limits that only rlimits enforce here (no cgroup controller for them).
    pub fn rlimit_fallback(&self) -> Limits {
        match &self.backend {
            Backend::V2(_) => Limits::default(),
            Backend::V1 { memory, pids, .. } => Limits {
                memory: if memory.is_none() {
                    self.limits.memory
                } else {
                    None
                },
                pids: if pids.is_none() {
                    self.limits.pids
                } else {
                    None
                },
                cpu_millis: None,
            },
            Backend::Rlimits => Limits {
                cpu_millis: None,
                ..self.limits
            },
        }
    }

    fn dirs(&self) -> Vec<PathBuf> {
        match &self.backend {
            Backend::V2(p) => vec![p.clone()],
            Backend::V1 { memory, pids, cpu } => {
                [memory, pids, cpu].into_iter().flatten().cloned().collect()
            }
            Backend::Rlimits => Vec::new(),
        }
    }

    /// Processes still in the group.
    pub fn pids(&self) -> Vec<i32> {
        let mut out: Vec<i32> = self
            .procs_files()
            .iter()
            .filter_map(|f| fs::read_to_string(f).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok())
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether the kernel killed a process of the group for exceeding its memory.
    pub fn oom_killed(&self) -> bool {
        let file = match &self.backend {
            Backend::V2(p) => p.join("memory.events"),
            Backend::V1 {
                memory: Some(p), ..
            } => p.join("memory.oom_control"),
            _ => return false,
        };
        counter(&file, "oom_kill") > 0
    }

    /// Whether a fork was refused at the process limit.
    pub fn pids_limit_hit(&self) -> bool {
        let file = match &self.backend {
            Backend::V2(p) => p.join("pids.events"),
            Backend::V1 { pids: Some(p), .. } => p.join("pids.events"),
            _ => return false,
        };
        counter(&file, "max") > 0
    }

    /// Sends every process in the group SIGKILL, without waiting: returns whether any was left.
    /// A process forked meanwhile escapes one pass under v1 (v2's `cgroup.kill` takes the whole
    /// group at once), which is why the waiting callers repeat it until the group is empty.
    pub fn kill(&self) -> bool {
        if let Backend::V2(p) = &self.backend {
            let _ = fs::write(p.join("cgroup.kill"), "1");
        }
        let pids = self.pids();
        for &pid in &pids {
            // SAFETY: kill takes plain integers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        !pids.is_empty()
    }

    /// Kills every process in the group and waits (bounded) until it is empty. Blocks the
    /// thread: for a blocking thread only (see [`Cgroup::emptied`] on an async one).
    pub fn kill_all(&self) {
        for _ in 0..KILL_ROUNDS {
            if !self.kill() {
                return;
            }
            std::thread::sleep(PAUSE);
        }
        tracing::warn!("processes survived in the sandbox's cgroup");
    }

    /// [`Cgroup::kill_all`] for an async caller: the same rounds, sleeping without blocking.
    pub async fn emptied(&self) {
        for _ in 0..KILL_ROUNDS {
            if !self.kill() {
                return;
            }
            tokio::time::sleep(PAUSE).await;
        }
        tracing::warn!("processes survived in the sandbox's cgroup");
    }

    /// Kills what is left in the group, waits until it is empty and removes it.
    pub async fn shutdown(mut self) {
        self.emptied().await;
        for _ in 0..REMOVE_ROUNDS {
            if self.try_remove() {
                return;
            }
            tokio::time::sleep(PAUSE).await;
        }
        tracing::warn!("cannot remove the sandbox's cgroup");
        self.forget();
    }

    /// What [`Cgroup::shutdown`] does, blocking the thread.
    pub fn remove_blocking(mut self) {
        self.kill_all();
        for _ in 0..REMOVE_ROUNDS {
            if self.try_remove() {
                return;
            }
            std::thread::sleep(PAUSE);
        }
        tracing::warn!("cannot remove the sandbox's cgroup");
        self.forget();
    }

    /// Removes the group's directories that can be removed now; whether none is left. The
    /// removed ones are forgotten, so nothing tries again.
    fn try_remove(&mut self) -> bool {
        let gone = |dir: &Path| match fs::remove_dir(dir) {
            Ok(()) => true,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        };
        match &mut self.backend {
            Backend::V2(p) => {
                if !gone(p) {
                    return false;
                }
            }
            Backend::V1 { memory, pids, cpu } => {
                for dir in [memory, pids, cpu] {
                    if dir.as_deref().is_some_and(gone) {
                        *dir = None;
                    }
                }
                if self.dirs().is_empty() {
                    self.forget();
                }
                return self.dirs().is_empty();
            }
            Backend::Rlimits => return true,
        }
        self.forget();
        true
    }

    /// Stops owning any directory (they are gone, or past saving).
    fn forget(&mut self) {
        self.backend = Backend::Rlimits;
    }
}

/// How many times the group is killed, a [`PAUSE`] apart, before survivors are reported.
const KILL_ROUNDS: u32 = 200;
/// How many times removing the group is tried, a [`PAUSE`] apart.
const REMOVE_ROUNDS: u32 = 100;
/// Between two rounds.
const PAUSE: Duration = Duration::from_millis(5);

/// The v1 socket-memory limit (`memory.kmem.tcp.limit_in_bytes`) for a memory limit of
/// `memory`: a quarter of it, at least 4 MiB (below that a few idle connections would hit it),
/// never more than the memory limit itself.
pub fn tcp_limit(memory: u64) -> u64 {
    (memory / 4).max(4 << 20).min(memory)
}

/// Whether the kernel command line turns socket accounting off in cgroup v2 (`memory.max` then
/// does not count socket buffers, and nothing in the cgroup can make it).
pub fn socket_memory_unaccounted(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|arg| {
        arg.strip_prefix("cgroup.memory=")
            .is_some_and(|v| v.split(',').any(|o| o == "nosocket"))
    })
}

fn counter(file: &Path, key: &str) -> u64 {
    fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(key))
                    .then(|| it.next().and_then(|v| v.parse().ok()))
                    .flatten()
            })
        })
        .unwrap_or(0)
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if self.dirs().is_empty() {
            return;
        }
        // Never sleeps here: one kill and one try, and if the group has not emptied yet (it
        // does a moment after its last process is reaped), a thread of its own waits for it.
        self.kill();
        if self.try_remove() {
            return;
        }
        // The thread takes the directories over; the closure holds them as plain data, so a
        // thread that cannot be started drops nothing that would come back here.
        let (backend, limits) = (
            std::mem::replace(&mut self.backend, Backend::Rlimits),
            self.limits,
        );
        let spawned = std::thread::Builder::new()
            .name("umbra-cgroup-rm".into())
            .spawn(move || Cgroup { backend, limits }.remove_blocking());
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a thread to remove the sandbox's cgroup");
        }
    }
}

/// Parses a size such as `512M`, `2G`, `1048576` or `64k`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let mult = match s[i..].to_ascii_lowercase().as_str() {
                "k" | "kb" | "kib" => 1 << 10,
                "m" | "mb" | "mib" => 1 << 20,
                "g" | "gb" | "gib" => 1 << 30,
                "b" => 1,
                other => return Err(format!("unknown size unit `{other}` (use K, M or G)")),
            };
            (&s[..i], mult)
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 512M"))?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("size `{s}` is out of range"))
}

/// Parses a CPU count such as `1`, `0.5` or `2.25` into thousandths of a core.
pub fn parse_cpus(s: &str) -> Result<u64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a CPU count such as 1 or 0.5"))?;
    if !(0.01..=1024.0).contains(&v) {
        return Err(format!("CPU count `{s}` is out of range (0.01 to 1024)"));
    }
    Ok((v * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_cpus_parse() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        for bad in ["", "M", "12X", "-1", "0", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_cpus("1"), Ok(1000));
        assert_eq!(parse_cpus("0.5"), Ok(500));
        for bad in ["0", "x", "-1", "NaN", "inf"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn socket_memory_is_a_quarter_of_memory_at_least_4_mib() {
        assert_eq!(tcp_limit(64 << 20), 16 << 20);
        assert_eq!(tcp_limit(8 << 20), 4 << 20);
        assert_eq!(tcp_limit(1 << 20), 1 << 20);
        assert_eq!(tcp_limit(4 << 30), 1 << 30);
        assert!(socket_memory_unaccounted(
            "ro quiet cgroup.memory=nokmem,nosocket"
        ));
        assert!(socket_memory_unaccounted("cgroup.memory=nosocket"));
        assert!(!socket_memory_unaccounted("cgroup.memory=nokmem quiet"));
        assert!(!socket_memory_unaccounted("xcgroup.memory=nosocketx"));
    }

    #[test]
    fn counters_read_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("memory.events");
        fs::write(&f, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n").unwrap();
        assert_eq!(counter(&f, "oom_kill"), 2);
        assert_eq!(counter(&f, "max"), 3);
        assert_eq!(counter(&f, "absent"), 0);
    }
}
