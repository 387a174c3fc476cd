//! Test hosts of their own: the real `umbra` binary and PostgreSQL as Docker containers on a
//! private network per test, so that a test can cut one host off (`docker network disconnect`)
//! and heal it, which loopback processes cannot show.
//!
//! The machines these tests run on have a Docker engine but no registry, so nothing is pulled:
//! each image is a small root filesystem assembled here from files of this machine (the
//! `umbra` binary this test run uses, the PostgreSQL binaries of Debian's `postgresql-15`, the
//! shared libraries `ldd` lists for them, Debian's `/bin/sh`) and loaded with `docker import`.
//! An image is tagged with a hash of everything put in it, so a second run (or another test of
//! the same run) finds it and builds nothing.
//!
//! Everything a test makes carries the labels [`LABEL_SCOPE`] (one per [`TestNet`]) and
//! [`LABEL_OWNER`] (the test process's id). Dropping the [`TestNet`], on success or during a
//! panic's unwinding, removes its containers and its network; objects left by a test process
//! that died without unwinding (SIGKILL) are removed by the next [`TestNet::create`].
//!
//! Traffic stays on the networks made here: they are `--internal` (no route out of the host)
//! and their subnet is one that no route of the host already covers.
//!
//! Set `UMBRA_DOCKER_TESTS=skip` to skip the Docker tests on a machine without an engine
//! ([`skip_requested`]); otherwise an unreachable engine fails them with one clear message.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::Hasher;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The label every container and network made here carries: the [`TestNet`] that owns it.
pub const LABEL_SCOPE: &str = "umbra-test.scope";
/// The label that names the test process that made an object ([`owner_label`]), so that the
/// leftovers of a process that died without unwinding can be told from those of one still
/// running.
pub const LABEL_OWNER: &str = "umbra-test.owner";

/// The repository of the `umbra` image.
pub const UMBRA_REPO: &str = "umbra-test";
/// The repository of the PostgreSQL image.
pub const POSTGRES_REPO: &str = "umbra-test-postgres";
/// Where the `umbra` binary is inside the `umbra` image (on `PATH`).
pub const UMBRA_IN_IMAGE: &str = "/usr/local/bin/umbra";
/// The PostgreSQL binaries' directory, in this machine's Debian package and in the image.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The port PostgreSQL listens on in its container.
pub const PG_PORT: u16 = 5432;
/// The uid and gid of the `postgres` user inside the PostgreSQL image (postgres refuses root).
pub const PG_UID: u32 = 999;

/// Bumped whenever what goes into an image changes in a way the files' contents do not show.
const RECIPE: &str = "umbra-docker-images-v1";
/// Images of one repository kept after a new one is built (older ones are removed if unused).
const KEEP_IMAGES: usize = 3;
/// A docker command that manages objects (run, rm, network): answered in well under this.
const QUICK: Duration = Duration::from_secs(60);
/// Building and importing an image.
const SLOW: Duration = Duration::from_secs(300);

/// What went wrong talking to Docker or assembling an image.
#[derive(Debug)]
pub enum DockerError {
    /// The `docker` CLI is missing or the engine does not answer; the message says what to do.
    Unreachable(String),
    /// A docker (or helper) command exited with an error.
    Failed {
        /// The command line.
        command: String,
        /// Its exit code (`None`: killed by a signal).
        code: Option<i32>,
        /// What it printed on standard error.
        stderr: String,
    },
    /// A command did not finish in its time bound (it was killed).
    Timeout {
        /// The command line.
        command: String,
        /// The bound.
        after: Duration,
    },
    /// A file an image needs is not on this machine; the message says how to get it.
    Missing(String),
    /// Reading or writing a local file failed.
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A condition a caller waited for did not come in time.
    NotReady(String),
}

impl fmt::Display for DockerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DockerError::Unreachable(m) => write!(f, "the Docker engine is not reachable: {m}"),
            DockerError::Failed {
                command,
                code,
                stderr,
            } => write!(
                f,
                "`{command}` failed ({}): {}",
                code.map_or_else(|| "killed".to_owned(), |c| format!("exit {c}")),
                stderr.trim()
            ),
            DockerError::Timeout { command, after } => {
                write!(f, "`{command}` did not finish within {after:?}")
            }
            DockerError::Missing(m) => write!(f, "cannot build the test image: {m}"),
            DockerError::Io { what, source } => write!(f, "{what}: {source}"),
            DockerError::NotReady(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for DockerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DockerError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The result of everything here.
pub type Result<T> = std::result::Result<T, DockerError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DockerError {
    let what = what.into();
    move |source| DockerError::Io { what, source }
}

/// Whether the Docker tests were asked to be skipped (`UMBRA_DOCKER_TESTS=skip`), for a
/// developer's machine without an engine. CI does not set it: there they must run.
pub fn skip_requested() -> bool {
    std::env::var("UMBRA_DOCKER_TESTS").is_ok_and(|v| v == "skip")
}

// ---------------------------------------------------------------------------------------------
// Running commands with a bound

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    // Enrollment tokens and such can be long: the start says which command it was.
    if s.len() > 300 {
        s.truncate(300);
        s.push('…');
    }
    s
}

/// Waits for `child` (whose stdout and stderr are piped) for at most `bound`, reading both
/// pipes meanwhile; kills it at the bound.
fn wait_bounded(mut child: Child, what: String, bound: Duration) -> Result<Output> {
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    });
    let start = Instant::now();
    let status = loop {
        match child
            .try_wait()
            .map_err(io(format!("waiting for `{what}`")))?
        {
            Some(status) => break status,
            None if start.elapsed() >= bound => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(DockerError::Timeout {
                    command: what,
                    after: bound,
                });
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs `cmd` to completion within `bound`; its output whatever its exit status.
fn output_bounded(mut cmd: Command, bound: Duration) -> Result<Output> {
    let what = describe(&cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DockerError::Unreachable(format!(
                    "`{}` is not installed",
                    cmd.get_program().to_string_lossy()
                ))
            } else {
                DockerError::Io {
                    what: format!("starting `{what}`"),
                    source: e,
                }
            }
        })?;
    wait_bounded(child, what, bound)
}

/// Runs `cmd` within `bound`; its standard output if it succeeded.
fn checked(cmd: Command, bound: Duration) -> Result<String> {
    let what = describe(&cmd);
    let o = output_bounded(cmd, bound)?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(DockerError::Failed {
            command: what,
            code: o.status.code(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        })
    }
}

fn docker_cmd<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new("docker");
    c.args(args);
    c
}

/// `docker ARGS` within the quick bound; its trimmed standard output.
fn docker<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    ensure_engine()?;
    checked(docker_cmd(args), QUICK).map(|s| s.trim().to_owned())
}

// ---------------------------------------------------------------------------------------------
// The engine

/// Asks the engine behind `docker` (as `cmd` is set up) for its version; the reason if it
/// does not answer.
fn probe_engine(mut cmd: Command) -> std::result::Result<String, String> {
    cmd.args(["version", "--format", "{{.Server.Version}}"]);
    match output_bounded(cmd, Duration::from_secs(20)) {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().into()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// The error for an engine that did not answer, saying what to do about it.
fn unreachable(why: &str) -> DockerError {
    let why = why.lines().next().unwrap_or("no answer");
    DockerError::Unreachable(format!(
        "{why} (start the engine: `systemctl start docker`, or `dockerd &`; or point \
         DOCKER_HOST at one; UMBRA_DOCKER_TESTS=skip skips these tests)"
    ))
}

/// Checks, once per process, that the engine answers; the same error every time if it does not.
pub fn ensure_engine() -> Result<()> {
    static ENGINE: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    match ENGINE.get_or_init(|| probe_engine(Command::new("docker"))) {
        Ok(_) => Ok(()),
        Err(why) => Err(unreachable(why)),
    }
}

/// The engine's version (`docker version`), or why it cannot be reached.
pub fn engine_version() -> Result<String> {
    ensure_engine()?;
    docker(["version", "--format", "{{.Server.Version}}"])
}

// ---------------------------------------------------------------------------------------------
// Images

/// An image built here, by its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    tag: String,
}

impl Image {
    /// `repository:hash`.
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

/// One file, directory or link of an image's root filesystem.
#[derive(Debug, Clone)]
enum Entry {
    Dir { mode: u32 },
    File { src: PathBuf, mode: u32 },
    Bytes { data: Vec<u8>, mode: u32 },
}

/// A root filesystem to assemble: paths inside the image and what goes there. Its hash is the
/// image's tag, so that the same files make the same image and any change makes another.
#[derive(Debug, Default)]
struct RootFs {
    entries: BTreeMap<PathBuf, Entry>,
}

impl RootFs {
    fn dir(&mut self, path: &str, mode: u32) {
        self.entries
            .insert(PathBuf::from(path), Entry::Dir { mode });
    }

    fn bytes(&mut self, path: &str, data: &str, mode: u32) {
        self.entries.insert(
            PathBuf::from(path),
            Entry::Bytes {
                data: data.as_bytes().to_vec(),
                mode,
            },
        );
    }

    /// `src` (symbolic links followed) at `dest`, keeping its permission bits.
    fn file(&mut self, src: &Path, dest: &Path) -> Result<()> {
        let meta = std::fs::metadata(src)
            .map_err(|e| DockerError::Missing(format!("{}: {e}", src.display())))?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
        self.entries.insert(
            dest.to_path_buf(),
            Entry::File {
                src: src.to_path_buf(),
                mode,
            },
        );
        Ok(())
    }

    /// An executable at `dest` and every shared library `ldd` lists for it, at the paths the
    /// dynamic loader will look for them.
    fn program(&mut self, src: &Path, dest: &Path) -> Result<()> {
        self.file(src, dest)?;
        self.libraries_of(src)
    }

    /// The shared libraries `ldd` lists for `src`, each at the path it is found at here.
    fn libraries_of(&mut self, src: &Path) -> Result<()> {
        let mut cmd = Command::new("ldd");
        cmd.arg(src);
        let o = output_bounded(cmd, Duration::from_secs(30))?;
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        if !o.status.success() {
            // A static executable: nothing to add.
            if text.contains("not a dynamic executable")
                || String::from_utf8_lossy(&o.stderr).contains("not a dynamic executable")
            {
                return Ok(());
            }
            return Err(DockerError::Failed {
                command: format!("ldd {}", src.display()),
                code: o.status.code(),
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            });
        }
        for lib in
            parse_ldd(&text).map_err(|m| DockerError::Missing(format!("{}: {m}", src.display())))?
        {
            let dest = lib.clone();
            self.file(&lib, &dest)?;
        }
        Ok(())
    }

    /// Every file under `src` at the same place under `dest`, but those `skip` names.
    fn tree(&mut self, src: &Path, dest: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(src)
            .map_err(|e| DockerError::Missing(format!("{}: {e}", src.display())))?
            .collect::<std::result::Result<_, _>>()
            .map_err(io(format!("listing {}", src.display())))?;
        entries.sort_by_key(|e| e.file_name());
        self.dir(&dest.to_string_lossy(), 0o755);
        for e in entries {
            let path = e.path();
            if skip(&path) {
                continue;
            }
            let to = dest.join(e.file_name());
            if std::fs::metadata(&path)
                .map_err(io(format!("reading {}", path.display())))?
                .is_dir()
            {
                self.tree(&path, &to, skip)?;
            } else {
                self.file(&path, &to)?;
            }
        }
        Ok(())
    }

    /// A hash of every path, mode and byte: the image's tag.
    fn hash(&self) -> Result<String> {
        let mut a = DefaultHasher::new();
        let mut b = DefaultHasher::new();
        a.write(b"a");
        b.write(b"b");
        let mut both = |bytes: &[u8]| {
            a.write(bytes);
            b.write(bytes);
        };
        both(RECIPE.as_bytes());
        let mut buf = vec![0u8; 1 << 20];
        for (path, entry) in &self.entries {
            both(path.as_os_str().as_encoded_bytes());
            both(&[0]);
            match entry {
                Entry::Dir { mode } => {
                    both(b"d");
                    both(&mode.to_le_bytes());
                }
                Entry::Bytes { data, mode } => {
                    both(b"b");
                    both(&mode.to_le_bytes());
                    both(&(data.len() as u64).to_le_bytes());
                    both(data);
                }
                Entry::File { src, mode } => {
                    both(b"f");
                    both(&mode.to_le_bytes());
                    let mut f = std::fs::File::open(src)
                        .map_err(io(format!("reading {}", src.display())))?;
                    let mut len = 0u64;
                    loop {
                        let n = f
                            .read(&mut buf)
                            .map_err(io(format!("reading {}", src.display())))?;
                        if n == 0 {
                            break;
                        }
                        len += n as u64;
                        both(&buf[..n]);
                    }
                    both(&len.to_le_bytes());
                }
            }
        }
        Ok(format!("{:016x}{:016x}", a.finish(), b.finish()))
    }

    /// Writes the tree under `root`.
    fn materialize(&self, root: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let set_mode = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .map_err(io(format!("chmod {}", p.display())))
        };
        for (path, entry) in &self.entries {
            let rel = path.strip_prefix("/").unwrap_or(path);
            let to = root.join(rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(io(format!("mkdir {}", parent.display())))?;
            }
            match entry {
                Entry::Dir { mode } => {
                    std::fs::create_dir_all(&to).map_err(io(format!("mkdir {}", to.display())))?;
                    set_mode(&to, *mode)?;
                }
                Entry::Bytes { data, mode } => {
                    std::fs::write(&to, data).map_err(io(format!("writing {}", to.display())))?;
                    set_mode(&to, *mode)?;
                }
                Entry::File { src, mode } => {
                    std::fs::copy(src, &to).map_err(io(format!(
                        "copying {} to {}",
                        src.display(),
                        to.display()
                    )))?;
                    set_mode(&to, *mode)?;
                }
            }
        }
        Ok(())
    }

    /// The image `repo:hash`, imported from this tree unless the engine has it already.
    fn image(&self, repo: &str) -> Result<Image> {
        ensure_engine()?;
        let tag = format!("{repo}:{}", self.hash()?);
        let have = output_bounded(
            docker_cmd(["image", "inspect", "--format", "{{.Id}}", &tag]),
            QUICK,
        )?;
        if have.status.success() {
            return Ok(Image { tag });
        }
        let dir = tempfile::Builder::new()
            .prefix("umbra-image-")
            .tempdir()
            .map_err(io("making a scratch directory"))?;
        self.materialize(dir.path())?;
        import(dir.path(), &tag)?;
        prune(repo, &tag);
        Ok(Image { tag })
    }
}

/// The libraries an `ldd` listing names (the loader included), or the first it could not find.
fn parse_ldd(text: &str) -> std::result::Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(format!("a library is missing: {line}"));
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// `tar -C dir -c . | docker import - tag`, both bounded.
fn import(dir: &Path, tag: &str) -> Result<()> {
    let mut tar = Command::new("tar")
        .args(["--numeric-owner", "-C"])
        .arg(dir)
        .args(["-c", "."])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("starting tar"))?;
    let tar_out = tar
        .stdout
        .take()
        .ok_or_else(|| DockerError::Missing("tar gave no output pipe".into()))?;
    let imported = Command::new("docker")
        .args(["import", "-", tag])
        .stdin(Stdio::from(tar_out))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("starting docker import"))?;
    let what = format!("tar -C {} -c . | docker import - {tag}", dir.display());
    let imported = wait_bounded(imported, what.clone(), SLOW)?;
    let tar_done = wait_bounded(tar, "tar".into(), Duration::from_secs(10))?;
    if !tar_done.status.success() {
        return Err(DockerError::Failed {
            command: what,
            code: tar_done.status.code(),
            stderr: String::from_utf8_lossy(&tar_done.stderr).into_owned(),
        });
    }
    if !imported.status.success() {
        return Err(DockerError::Failed {
            command: what,
            code: imported.status.code(),
            stderr: String::from_utf8_lossy(&imported.stderr).into_owned(),
        });
    }
    Ok(())
}

/// Removes the images of `repo` beyond the newest [`KEEP_IMAGES`] (never `keep`); an image a
/// container still uses is not removed (no `--force`), and a failure only leaves it there.
fn prune(repo: &str, keep: &str) {
    let Ok(list) = docker(["image", "ls", repo, "--format", "{{.Repository}}:{{.Tag}}"]) else {
        return;
    };
    // `docker image ls` lists the newest first.
    for tag in list.lines().filter(|t| *t != keep).skip(KEEP_IMAGES - 1) {
        let _ = docker(["image", "rm", tag]);
    }
}

/// The `umbra` binary the images are built from: `UMBRA_BIN` if set, else the one cargo built
/// beside this test executable (`cargo test --workspace` builds it; `cargo test -p
/// umbra-tests` alone does not, so build it first with `cargo build -p umbra`).
pub fn umbra_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("UMBRA_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(io("locating the test executable"))?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("umbra"))
        .ok_or_else(|| DockerError::Missing("no target directory above the test".into()))?;
    if !bin.exists() {
        return Err(DockerError::Missing(format!(
            "{} is missing: build it first (`cargo build -p umbra`, with the same profile and \
             target directory; `cargo test --workspace` builds it), or set UMBRA_BIN",
            bin.display()
        )));
    }
    Ok(bin)
}

/// The files every image here has: `/bin/sh` (Debian's dash, for `sh -c` command lines),
/// `/tmp`, and a passwd and group file naming root, `postgres` and nobody.
fn base() -> Result<RootFs> {
    let mut fs = RootFs::default();
    let sh = std::fs::canonicalize("/bin/sh")
        .map_err(|e| DockerError::Missing(format!("/bin/sh: {e}")))?;
    fs.program(&sh, Path::new("/bin/sh"))?;
    fs.dir("/tmp", 0o1777);
    fs.dir("/etc", 0o755);
    fs.bytes(
        "/etc/passwd",
        &format!(
            "root:x:0:0:root:/root:/bin/sh\npostgres:x:{PG_UID}:{PG_UID}:PostgreSQL:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
        ),
        0o644,
    );
    fs.bytes(
        "/etc/group",
        &format!("root:x:0:\npostgres:x:{PG_UID}:\nnogroup:x:65534:\n"),
        0o644,
    );
    fs.bytes(
        "/etc/nsswitch.conf",
        "passwd: files\ngroup: files\nhosts: files dns\n",
        0o644,
    );
    fs.dir("/root", 0o700);
    Ok(fs)
}

/// The `umbra` image: the binary of this test run at [`UMBRA_IN_IMAGE`] with its libraries,
/// and `/bin/sh`. Built once per test process (and reused across runs while the binary is the
/// same).
pub fn umbra_image() -> Result<Image> {
    ensure_engine()?;
    static IMAGE: OnceLock<std::result::Result<Image, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let build = || -> Result<Image> {
                let bin = umbra_binary()?;
                let mut fs = base()?;
                fs.program(&bin, Path::new(UMBRA_IN_IMAGE))?;
                fs.dir("/data", 0o755);
                fs.image(UMBRA_REPO)
            };
            build().map_err(|e| e.to_string())
        })
        .clone()
        .map_err(DockerError::NotReady)
}

/// The PostgreSQL 15 image, from this machine's Debian package (`postgresql-15`): the server
/// and client binaries under [`PG_BIN`], the modules `initdb` needs, `/usr/share/postgresql/15`,
/// UTC time zone data, and a `postgres` user (uid [`PG_UID`]). Start one with
/// [`TestNet::postgres`].
pub fn postgres_image() -> Result<Image> {
    ensure_engine()?;
    static IMAGE: OnceLock<std::result::Result<Image, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let build = || -> Result<Image> {
                if !Path::new(PG_BIN).join("postgres").exists() {
                    return Err(DockerError::Missing(format!(
                        "{PG_BIN}/postgres is missing: install Debian's postgresql-15 \
                         (`apt-get install -y postgresql-15`)"
                    )));
                }
                let mut fs = base()?;
                for bin in [
                    "postgres",
                    "initdb",
                    "pg_ctl",
                    "pg_isready",
                    "psql",
                    "pg_basebackup",
                    "pg_controldata",
                    "pg_dump",
                ] {
                    let p = Path::new(PG_BIN).join(bin);
                    fs.program(&p, &p)?;
                }
                // Loadable modules (plpgsql, the snowball dictionaries initdb installs...), not
                // the JIT, which would pull in all of LLVM (`jit` is off in the image's clusters).
                let lib = Path::new("/usr/lib/postgresql/15/lib");
                let mut modules = Vec::new();
                for e in std::fs::read_dir(lib)
                    .map_err(|e| DockerError::Missing(format!("{}: {e}", lib.display())))?
                {
                    let p = e.map_err(io(format!("listing {}", lib.display())))?.path();
                    let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                    if name
                        .as_deref()
                        .is_some_and(|n| n.ends_with(".so") && !n.starts_with("llvmjit"))
                    {
                        modules.push(p);
                    }
                }
                modules.sort();
                for m in modules {
                    fs.program(&m, &m)?;
                }
                let share = Path::new("/usr/share/postgresql/15");
                fs.tree(share, share, &|_| false)?;
                for tz in ["UTC", "Etc/UTC", "GMT", "Etc/GMT"] {
                    let p = Path::new("/usr/share/zoneinfo").join(tz);
                    if p.exists() {
                        fs.file(&p, &p)?;
                    }
                }
                fs.dir("/var/run/postgresql", 0o1777);
                fs.image(POSTGRES_REPO)
            };
            build().map_err(|e| e.to_string())
        })
        .clone()
        .map_err(DockerError::NotReady)
}

// ---------------------------------------------------------------------------------------------
// Networks and containers

/// A private Docker network for one test (`--internal`, a /24 of its own) and every container
/// started on it. Dropping it removes them all, also while a panic unwinds.
#[derive(Debug)]
pub struct TestNet {
    name: String,
    scope: String,
    subnet: Ipv4Addr,
}

/// What [`TestNet::run`] starts.
#[derive(Debug, Clone)]
pub struct RunSpec {
    image: Image,
    host: u8,
    user: Option<String>,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl RunSpec {
    /// A container of `image` at host number `host` of the network (its address is
    /// [`TestNet::ip`]`(host)`; 2 to 254, 1 is the host machine's side of the bridge).
    pub fn new(image: &Image, host: u8) -> RunSpec {
        RunSpec {
            image: image.clone(),
            host,
            user: None,
            env: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Runs the command as `user` (a name from the image's passwd, or `uid:gid`).
    pub fn user(mut self, user: &str) -> RunSpec {
        self.user = Some(user.to_owned());
        self
    }

    /// Sets an environment variable (a secret such as a token passes here rather than on a
    /// command line that `docker inspect` shows).
    pub fn env(mut self, key: &str, value: &str) -> RunSpec {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The command and its arguments.
    pub fn args<I, S>(mut self, args: I) -> RunSpec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The command is `/bin/sh -c script` (for an init step followed by `exec` of a server).
    pub fn shell(self, script: &str) -> RunSpec {
        self.args(["/bin/sh", "-c", script])
    }
}

/// A container started by [`TestNet::run`]. Removed with its network.
#[derive(Debug, Clone)]
pub struct Container {
    name: String,
    network: String,
    ip: Ipv4Addr,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name Docker accepts, from a test's name.
fn sanitize(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    out.truncate(24);
    out.trim_matches('-').to_owned()
}

/// The IPv4 routes of this host, as (network, mask), from /proc/net/route.
fn host_routes() -> Vec<(u32, u32)> {
    let Ok(text) = std::fs::read_to_string("/proc/net/route") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            // The kernel prints the address's bytes as a number in this machine's byte order.
            let addr = |v: u32| u32::from(Ipv4Addr::from(v.to_ne_bytes()));
            Some((addr(dest), addr(mask)))
        })
        .collect()
}

/// Whether the /24 at `net` overlaps a route of this host other than the default route.
fn overlaps_route(net: Ipv4Addr, routes: &[(u32, u32)]) -> bool {
    let n = u32::from(net);
    let m24 = 0xffff_ff00u32;
    routes
        .iter()
        .filter(|(_, mask)| *mask != 0)
        .any(|(dest, mask)| {
            let m = mask & m24;
            (n & m) == (dest & m)
        })
}

/// When process `pid` started (clock ticks after boot, field 22 of `/proc/PID/stat`), if it runs.
fn started(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// This machine's host name (of its UTS namespace).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// The value of [`LABEL_OWNER`] on what this process makes: `HOST:PID:START`, so that a
/// leftover is reaped only by a test process of the same host, and only once its maker is gone
/// (a pid reused by a later process has another start time).
pub fn owner_label() -> String {
    static OWNER: OnceLock<String> = OnceLock::new();
    OWNER
        .get_or_init(|| {
            let pid = std::process::id();
            format!("{}:{pid}:{}", hostname(), started(pid).unwrap_or(0))
        })
        .clone()
}

/// Whether an owner label names a test process of this host that is no longer running.
fn owner_gone(label: &str) -> bool {
    let mut parts = label.rsplitn(3, ':');
    let (Some(start), Some(pid), Some(host)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(start), Ok(pid)) = (start.parse::<u64>(), pid.parse::<u32>()) else {
        return false;
    };
    host == hostname() && started(pid) != Some(start)
}

/// Removes the containers and networks that a test process of this host made and left when
/// it died without unwinding (SIGKILL, abort, a timeout's kill).
fn reap_orphans() {
    let format = format!("{{{{.ID}}}} {{{{.Label \"{LABEL_OWNER}\"}}}}");
    let filter = format!("label={LABEL_OWNER}");
    let gone = |listing: String| -> Vec<String> {
        listing
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, owner)| owner_gone(owner))
            .map(|(id, _)| id.to_owned())
            .collect()
    };
    if let Ok(cs) = docker(["ps", "-a", "--filter", &filter, "--format", &format]) {
        for id in gone(cs) {
            let _ = docker(["rm", "-f", "-v", &id]);
        }
    }
    if let Ok(ns) = docker(["network", "ls", "--filter", &filter, "--format", &format]) {
        for id in gone(ns) {
            let _ = docker(["network", "rm", &id]);
        }
    }
}

/// Address number `host` of the /24 at `subnet`.
fn host_ip(subnet: Ipv4Addr, host: u8) -> Ipv4Addr {
    let [a, b, c, _] = subnet.octets();
    Ipv4Addr::new(a, b, c, host)
}

/// Creates the `--internal` network `name` with the labels of `scope`, on a /24 of
/// 10.213.0.0/16 that neither another Docker network nor a route of this host uses; its subnet.
fn create_network(name: &str, scope: &str) -> Result<Ipv4Addr> {
    let pid = std::process::id();
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let routes = host_routes();
    // Start at a place of this process's own, so that tests running at once rarely try the
    // same subnet first.
    let start = (pid.wrapping_mul(31).wrapping_add(n.wrapping_mul(7))) % 256;
    let mut last = None;
    for i in 0..64u32 {
        let third = ((start + i * 37) % 256) as u8;
        let subnet = Ipv4Addr::new(10, 213, third, 0);
        if overlaps_route(subnet, &routes) {
            continue;
        }
        let r = docker([
            "network",
            "create",
            "--internal",
            "--driver",
            "bridge",
            "--subnet",
            &format!("{subnet}/24"),
            "--gateway",
            &host_ip(subnet, 1).to_string(),
            "--label",
            &format!("{LABEL_SCOPE}={scope}"),
            "--label",
            &format!("{LABEL_OWNER}={}", owner_label()),
            name,
        ]);
        match r {
            Ok(_) => return Ok(subnet),
            Err(DockerError::Failed { stderr, .. }) if stderr.contains("overlap") => {
                last = Some(stderr);
            }
            Err(e) => return Err(e),
        }
    }
    Err(DockerError::NotReady(format!(
        "no free /24 in 10.213.0.0/16 for a test network (last: {})",
        last.unwrap_or_default().trim()
    )))
}

/// Another network of a test ([`TestNet::segment`]), removed with its [`TestNet`]: for
/// partitions that cut some links and keep others.
#[derive(Debug, Clone)]
pub struct Segment {
    name: String,
    subnet: Ipv4Addr,
}

impl Segment {
    /// The network's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address of host number `host` on this segment.
    pub fn ip(&self, host: u8) -> Ipv4Addr {
        host_ip(self.subnet, host)
    }

    /// This machine's own address on the segment (the bridge's).
    pub fn gateway(&self) -> Ipv4Addr {
        self.ip(1)
    }
}

impl TestNet {
    /// Creates a private network for the test `test` (a name for people reading `docker ps`),
    /// with a /24 subnet that neither another Docker network nor a route of this host uses.
    /// Leftovers of test processes that died without unwinding are removed first.
    pub fn create(test: &str) -> Result<TestNet> {
        ensure_engine()?;
        reap_orphans();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("umbra-{}-{}-{n}", sanitize(test), std::process::id());
        let subnet = create_network(&name, &name)?;
        Ok(TestNet {
            scope: name.clone(),
            name,
            subnet,
        })
    }

    /// Another network of this test (its own `--internal` /24, removed with this one), for
    /// partitions that cut one link and keep another: controllers cut off from their database
    /// but not from their routers, say. Containers join it with [`Container::join`].
    pub fn segment(&self, name: &str) -> Result<Segment> {
        let full = format!("{}-{}", self.name, sanitize(name));
        let subnet = create_network(&full, &self.scope)?;
        Ok(Segment { name: full, subnet })
    }

    /// The network's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address of host number `host` on this network.
    pub fn ip(&self, host: u8) -> Ipv4Addr {
        host_ip(self.subnet, host)
    }

    /// This machine's own address on the network (the bridge's): a test process listens here
    /// for containers to reach it, and reaches containers from it.
    pub fn gateway(&self) -> Ipv4Addr {
        self.ip(1)
    }

    /// Starts a container called `name` (unique within this network) as `spec` says, in the
    /// background, with its address fixed so that a container disconnected and connected
    /// again keeps it.
    pub fn run(&self, name: &str, spec: RunSpec) -> Result<Container> {
        if !(2..=254).contains(&spec.host) {
            return Err(DockerError::NotReady(format!(
                "host number {} is not 2 to 254",
                spec.host
            )));
        }
        let full = format!("{}-{}", self.name, sanitize(name));
        let ip = self.ip(spec.host);
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            full.clone(),
            "--hostname".into(),
            sanitize(name),
            "--network".into(),
            self.name.clone(),
            "--ip".into(),
            ip.to_string(),
            "--label".into(),
            format!("{LABEL_SCOPE}={}", self.scope),
            "--label".into(),
            format!("{LABEL_OWNER}={}", owner_label()),
        ];
        if let Some(u) = &spec.user {
            args.push("--user".into());
            args.push(u.clone());
        }
        for (k, v) in &spec.env {
            args.push("--env".into());
            args.push(format!("{k}={v}"));
        }
        args.push(spec.image.tag.clone());
        args.extend(spec.args.iter().cloned());
        docker(&args)?;
        Ok(Container {
            name: full,
            network: self.name.clone(),
            ip,
        })
    }

    /// Starts PostgreSQL (the [`postgres_image`]) as `name` at host number `host`: a fresh
    /// cluster (`initdb`, superuser `postgres`, trust authentication from this network) on
    /// port [`PG_PORT`]. Returns once it accepts connections (`pg_isready`), within `bound`.
    pub fn postgres(&self, name: &str, host: u8, bound: Duration) -> Result<Container> {
        let image = postgres_image()?;
        let script = format!(
            "set -e; export PATH={PG_BIN}:/bin; \
             initdb -D /tmp/pgdata -U postgres -A trust -E UTF8 --locale=C -N; \
             echo 'host all all all trust' >> /tmp/pgdata/pg_hba.conf; \
             exec postgres -D /tmp/pgdata -c listen_addresses='*' -c port={PG_PORT} -c jit=off"
        );
        let c = self.run(
            name,
            RunSpec::new(&image, host).user("postgres").shell(&script),
        )?;
        let start = Instant::now();
        loop {
            let o = c.exec(&[
                &format!("{PG_BIN}/pg_isready"),
                "-h",
                "127.0.0.1",
                "-p",
                &PG_PORT.to_string(),
                "-U",
                "postgres",
            ])?;
            if o.status.success() {
                return Ok(c);
            }
            if !c.running()? {
                return Err(DockerError::NotReady(format!(
                    "postgres in {} exited: {}",
                    c.name,
                    c.logs().unwrap_or_default()
                )));
            }
            if start.elapsed() > bound {
                return Err(DockerError::NotReady(format!(
                    "postgres in {} not ready within {bound:?}: {}",
                    c.name,
                    c.logs().unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The names of the containers that exist now with this network's scope label.
    pub fn containers(&self) -> Result<Vec<String>> {
        Ok(docker([
            "ps",
            "-a",
            "--filter",
            &format!("label={LABEL_SCOPE}={}", self.scope),
            "--format",
            "{{.Names}}",
        ])?
        .lines()
        .map(str::to_owned)
        .collect())
    }

    /// Removes every container of this network and the network itself. Also what `Drop` does;
    /// call it to see the errors.
    pub fn remove(&self) -> Result<()> {
        let ids = docker([
            "ps",
            "-aq",
            "--filter",
            &format!("label={LABEL_SCOPE}={}", self.scope),
        ])?;
        let ids: Vec<&str> = ids.lines().filter(|l| !l.is_empty()).collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids);
            docker(args)?;
        }
        // This network and its segments.
        let nets = docker([
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("label={LABEL_SCOPE}={}", self.scope),
        ])?;
        for id in nets.lines().filter(|l| !l.is_empty()) {
            docker(["network", "rm", id])?;
        }
        Ok(())
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("cleaning up the test network {}: {e}", self.name);
        }
    }
}

impl Container {
    /// The container's name (`docker ps`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its address on the test network (kept across [`Container::disconnect`] and
    /// [`Container::connect`]).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Runs a command inside (`docker exec`), within a minute; its output whatever its status.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        ensure_engine()?;
        let mut c = docker_cmd(["exec", &self.name]);
        c.args(args);
        output_bounded(c, QUICK)
    }

    /// Runs a command inside as `user`; its output whatever its status.
    pub fn exec_as(&self, user: &str, args: &[&str]) -> Result<Output> {
        ensure_engine()?;
        let mut c = docker_cmd(["exec", "--user", user, &self.name]);
        c.args(args);
        output_bounded(c, QUICK)
    }

    /// Runs a command inside; its standard output if it exited 0, else an error with its
    /// standard error.
    pub fn exec_ok(&self, args: &[&str]) -> Result<String> {
        ensure_engine()?;
        let mut c = docker_cmd(["exec", &self.name]);
        c.args(args);
        checked(c, QUICK)
    }

    /// What the container has written to standard output and standard error so far.
    pub fn logs(&self) -> Result<String> {
        ensure_engine()?;
        let o = output_bounded(docker_cmd(["logs", &self.name]), QUICK)?;
        let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&o.stderr));
        Ok(s)
    }

    /// Waits, within `bound`, until the logs contain `needle`; returns them.
    pub fn wait_for_log(&self, needle: &str, bound: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            let logs = self.logs()?;
            if logs.contains(needle) {
                return Ok(logs);
            }
            if start.elapsed() > bound {
                return Err(DockerError::NotReady(format!(
                    "{} did not log {needle:?} within {bound:?}; its logs:\n{logs}",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether it is running.
    pub fn running(&self) -> Result<bool> {
        Ok(docker(["inspect", "--format", "{{.State.Running}}", &self.name])? == "true")
    }

    /// Cuts it off the test network (a partition): it keeps running, with loopback only.
    pub fn disconnect(&self) -> Result<()> {
        docker(["network", "disconnect", &self.network, &self.name]).map(drop)
    }

    /// Puts it back on the test network at the same address (the partition heals).
    pub fn connect(&self) -> Result<()> {
        docker([
            "network",
            "connect",
            "--ip",
            &self.ip.to_string(),
            &self.network,
            &self.name,
        ])
        .map(drop)
    }

    /// Waits, within `bound`, until it exits; its exit code.
    pub fn wait(&self, bound: Duration) -> Result<i64> {
        ensure_engine()?;
        let code = checked(docker_cmd(["wait", &self.name]), bound)?;
        code.trim().parse().map_err(|_| {
            DockerError::NotReady(format!("`docker wait {}` printed {code:?}", self.name))
        })
    }

    /// Connects it to `segment` too, as host number `host` there (another interface).
    pub fn join(&self, segment: &Segment, host: u8) -> Result<()> {
        docker([
            "network",
            "connect",
            "--ip",
            &segment.ip(host).to_string(),
            &segment.name,
            &self.name,
        ])
        .map(drop)
    }

    /// Cuts it off `segment` only: a partition of that link, its other networks kept.
    pub fn leave(&self, segment: &Segment) -> Result<()> {
        docker(["network", "disconnect", &segment.name, &self.name]).map(drop)
    }

    /// Kills it (SIGKILL), as a crash or the loss of its host would.
    pub fn kill(&self) -> Result<()> {
        docker(["kill", &self.name]).map(drop)
    }

    /// Starts it again after [`Container::kill`] (same command, same files, same address).
    pub fn start(&self) -> Result<()> {
        docker(["start", &self.name]).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_engine_is_reported_in_one_line_that_says_what_to_do() {
        let mut cmd = Command::new("docker");
        cmd.env("DOCKER_HOST", "unix:///nonexistent/umbra-test-docker.sock");
        let why = probe_engine(cmd).expect_err("no engine there");
        let e = unreachable(&why).to_string();
        assert!(e.starts_with("the Docker engine is not reachable: "), "{e}");
        assert!(e.contains("UMBRA_DOCKER_TESTS=skip"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    #[test]
    fn only_a_gone_owner_of_this_host_is_reaped() {
        let me = owner_label();
        assert!(!owner_gone(&me), "{me}");
        let pid = std::process::id();
        let host = hostname();
        // The same pid with another start time: a reused pid, its maker gone.
        assert!(owner_gone(&format!("{host}:{pid}:1")));
        // Another host's objects are never this process's to judge.
        assert!(!owner_gone(&format!("{host}-elsewhere:{pid}:1")));
        assert!(!owner_gone("garbage"));
    }

    #[test]
    fn ldd_listings_are_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text).expect("parses"),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn a_subnet_under_a_route_is_not_used() {
        let routes = vec![
            (u32::from(Ipv4Addr::new(10, 213, 4, 0)), 0xffff_ff00),
            (0, 0),
        ];
        assert!(overlaps_route(Ipv4Addr::new(10, 213, 4, 0), &routes));
        assert!(!overlaps_route(Ipv4Addr::new(10, 213, 5, 0), &routes));
        // A wider route covers it too.
        let wide = vec![(u32::from(Ipv4Addr::new(10, 0, 0, 0)), 0xff00_0000)];
        assert!(overlaps_route(Ipv4Addr::new(10, 213, 5, 0), &wide));
    }

    #[test]
    fn names_are_what_docker_accepts() {
        assert_eq!(sanitize("A router_fails/closed"), "a-router-fails-closed");
        assert!(sanitize("x".repeat(100).as_str()).len() <= 24);
    }

    #[test]
    fn the_hash_changes_with_any_byte() {
        let mut a = RootFs::default();
        a.bytes("/etc/x", "one", 0o644);
        let mut b = RootFs::default();
        b.bytes("/etc/x", "two", 0o644);
        let mut c = RootFs::default();
        c.bytes("/etc/x", "one", 0o600);
        let (ha, hb, hc) = (
            a.hash().expect("a"),
            b.hash().expect("b"),
            c.hash().expect("c"),
        );
        assert_ne!(ha, hb);
        assert_ne!(ha, hc);
        assert_eq!(ha, a.hash().expect("again"));
    }
}
