//! The images: root filesystems assembled from this machine's files, tagged by a hash of
//! their contents, loaded with `docker import`.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::cmd::{checked, docker, docker_cmd, output_bounded, wait_bounded, QUICK, SLOW};
use super::{
    ensure_engine, io, DockerError, Result, PG_BIN, PG_UID, POSTGRES_REPO, UMBRA_IN_IMAGE,
    UMBRA_REPO,
};

/// Bumped whenever what goes into an image changes in a way the files' contents do not show.
const RECIPE: &str = "umbra-docker-images-v2";
/// Images of one repository kept after a new one is built (older ones are removed if unused).
const KEEP_IMAGES: usize = 3;

/// An image built here, by its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub(super) tag: String,
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
        let digests = self.digests()?;
        let mut a = DefaultHasher::new();
        let mut b = DefaultHasher::new();
        a.write(b"a");
        b.write(b"b");
        let mut both = |bytes: &[u8]| {
            a.write(bytes);
            b.write(bytes);
        };
        both(RECIPE.as_bytes());
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
                    let digest = digests.get(src).ok_or_else(|| {
                        DockerError::Missing(format!("no digest for {}", src.display()))
                    })?;
                    both(digest.as_bytes());
                }
            }
        }
        Ok(format!("{:016x}{:016x}", a.finish(), b.finish()))
    }

    /// A BLAKE2b digest of every source file, from one `b2sum` (coreutils): this crate is built
    /// without optimization, and hashing a debug `umbra` binary (~300 MB) here took 3.7 s where
    /// `b2sum` takes 0.6 s.
    fn digests(&self) -> Result<BTreeMap<PathBuf, String>> {
        let files: Vec<&PathBuf> = self
            .entries
            .values()
            .filter_map(|e| match e {
                Entry::File { src, .. } => Some(src),
                _ => None,
            })
            .collect();
        let mut out = BTreeMap::new();
        if files.is_empty() {
            return Ok(out);
        }
        let mut cmd = Command::new("b2sum");
        cmd.arg("--").args(&files);
        let text = checked(cmd, Duration::from_secs(120))?;
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() != files.len() {
            return Err(DockerError::Missing(format!(
                "b2sum gave {} digests for {} files",
                lines.len(),
                files.len()
            )));
        }
        // One line per file, in the order given: `DIGEST  PATH`.
        for (file, line) in files.into_iter().zip(lines) {
            let digest = line.split_whitespace().next().unwrap_or_default();
            out.insert(file.clone(), digest.to_owned());
        }
        Ok(out)
    }

    /// Writes the tree under `root`.
    fn materialize(&self, root: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let set_mode = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .map_err(io(format!("chmod {}", p.display())))
        };
        // The image's `/` is this directory (a scratch directory is 0700): open to the
        // unprivileged users containers run as.
        set_mode(root, 0o755)?;
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
        let started = std::time::Instant::now();
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
        // Shown with the test's output: a run that rebuilds every time is worth noticing.
        eprintln!(
            "umbra_tests::docker: built {tag} ({} files) in {:?}",
            self.entries.len(),
            started.elapsed()
        );
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
/// umbra-tests` alone does not, so build it first with `cargo build -p umbra`). Refused if a
/// source it is built from changed after it was built: an image of an old binary would test
/// old code and pass or fail for the wrong reason.
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
    let rebuild = "build it (`cargo build -p umbra`, with the same profile and target \
                   directory; `cargo test --workspace` builds it), or set UMBRA_BIN";
    let built = match std::fs::metadata(&bin).and_then(|m| m.modified()) {
        Ok(t) => t,
        Err(_) => {
            return Err(DockerError::Missing(format!(
                "{} is missing: {rebuild}",
                bin.display()
            )))
        }
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent();
    if let Some(newer) = workspace.and_then(|w| source_newer_than(w, built)) {
        return Err(DockerError::Missing(format!(
            "{} is older than {}: {rebuild}",
            bin.display(),
            newer.display()
        )));
    }
    Ok(bin)
}

/// A Rust source of the `umbra` binary under `workspace` (the `src/` of the root package and of
/// each member crate, not the tests crate's nor the fuzz targets') modified after `built`.
fn source_newer_than(workspace: &Path, built: std::time::SystemTime) -> Option<PathBuf> {
    let mut dirs = vec![workspace.join("src")];
    let mut members: Vec<PathBuf> = std::fs::read_dir(workspace)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !matches!(name, "tests" | "fuzz" | "target" | "benches") && !name.starts_with('.')
        })
        .map(|p| p.join("src"))
        .filter(|p| p.is_dir())
        .collect();
    members.sort();
    dirs.extend(members);
    // Depth-first, bounded: a source tree is a few hundred files a few levels deep.
    let mut budget = 20_000u32;
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.filter_map(|e| e.ok()) {
            budget = budget.checked_sub(1)?;
            let path = e.path();
            let Ok(meta) = e.metadata() else {
                continue;
            };
            if meta.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "rs")
                && meta.modified().is_ok_and(|m| m > built)
            {
                return Some(path);
            }
        }
    }
    None
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

/// The repository of the client image ([`client_image`]).
pub const CLIENT_REPO: &str = "umbra-test-client";

/// A client image for containers that Umbra serves from outside (`umbra tunnel --pid`):
/// `bash` (whose `/dev/tcp` makes TCP round trips), `getent`, `cat`, `sleep`, `timeout`, and
/// `ln` and `umount` for an agent that plants links, with their libraries, and the `base` files (`nsswitch.conf` says `hosts: files dns`).
pub fn client_image() -> Result<Image> {
    ensure_engine()?;
    static IMAGE: OnceLock<std::result::Result<Image, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let build = || -> Result<Image> {
                let mut fs = base()?;
                for bin in ["bash", "getent", "cat", "sleep", "timeout", "ln", "umount"] {
                    let src = ["/usr/bin", "/bin"]
                        .iter()
                        .map(|d| Path::new(d).join(bin))
                        .find(|p| p.exists())
                        .ok_or_else(|| DockerError::Missing(format!("{bin} is not installed")))?;
                    let real = std::fs::canonicalize(&src)
                        .map_err(|e| DockerError::Missing(format!("{}: {e}", src.display())))?;
                    fs.program(&real, &Path::new("/bin").join(bin))?;
                }
                // Docker bind-mounts its own hosts and resolv.conf over these.
                fs.bytes("/etc/hosts", "127.0.0.1\tlocalhost\n", 0o644);
                fs.bytes("/etc/resolv.conf", "", 0o644);
                fs.image(CLIENT_REPO)
            };
            build().map_err(|e| e.to_string())
        })
        .clone()
        .map_err(DockerError::NotReady)
}

/// The PostgreSQL 15 image, from this machine's Debian package (`postgresql-15`): the server
/// and client binaries under [`PG_BIN`], the modules `initdb` needs, `/usr/share/postgresql/15`,
/// UTC time zone data, and a `postgres` user (uid [`PG_UID`]). Start one with
/// [`super::TestNet::postgres`].
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_older_than_its_sources_is_found_out() {
        let w = tempfile::tempdir().expect("tempdir");
        for d in ["src", "pki/src/x509", "tests/src", "fuzz/src"] {
            std::fs::create_dir_all(w.path().join(d)).expect("mkdir");
        }
        std::fs::write(w.path().join("tests/src/lib.rs"), "").expect("write");
        std::fs::write(w.path().join("fuzz/src/lib.rs"), "").expect("write");
        let before = std::time::SystemTime::now() - Duration::from_secs(60);
        // Only the tests crate and the fuzz targets changed: the binary is current.
        assert_eq!(source_newer_than(w.path(), before), None);
        std::fs::write(w.path().join("pki/src/x509/chain.rs"), "").expect("write");
        assert_eq!(
            source_newer_than(w.path(), before),
            Some(w.path().join("pki/src/x509/chain.rs"))
        );
        let after = std::time::SystemTime::now() + Duration::from_secs(60);
        assert_eq!(source_newer_than(w.path(), after), None);
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
        // Files by their contents, whatever their names on this machine.
        let dir = tempfile::tempdir().expect("tempdir");
        let (x, y, z) = (
            dir.path().join("x"),
            dir.path().join("y"),
            dir.path().join("z"),
        );
        std::fs::write(&x, "same").expect("write");
        std::fs::write(&y, "same").expect("write");
        std::fs::write(&z, "other").expect("write");
        let with = |src: &Path| {
            let mut fs = RootFs::default();
            fs.file(src, Path::new("/bin/x")).expect("file");
            fs.hash().expect("hash")
        };
        assert_eq!(with(&x), with(&y));
        assert_ne!(with(&x), with(&z));
    }
}
