//! What a sandbox may show: the rules that keep a workspace or a `--ro` path from exposing a
//! shared or system location, or another principal's secrets.
//!
//! Two checks, both before anything is built. [`refuse_location`] is a pure function of the
//! path and a few facts about the host ([`HostFacts`]), so every rule is unit-tested on literal
//! paths. [`find_secret`] walks the directory (bounded in entries and depth, never following
//! links) for Umbra's own key material and private keys: identity and admin files, enrollment
//! tokens, controller directories, `*.key` files, PEM and OpenSSH private keys. A path that holds
//! any of them is refused, the agent's own identity file included: a renewal replaces that file
//! by rename, and no cover mounted over the old file can cover the new one.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Which kind of shown path is being checked; the rules differ a little.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// The workspace: read-write.
    Workspace,
    /// A `--ro` path: read-only.
    ReadOnly,
}

impl Shown {
    fn what(self) -> &'static str {
        match self {
            Shown::Workspace => "workspace",
            Shown::ReadOnly => "read-only path",
        }
    }
}

/// Facts about the host that the location rules depend on, gathered once by
/// [`HostFacts::gather`] (or written out in tests).
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// Every user's home directory (from the password database), the invoking user's `$HOME`
    /// and `/root`.
    pub homes: Vec<PathBuf>,
    /// Directories that hold Umbra's own state (the sandboxes' state bases).
    pub umbra_state: Vec<PathBuf>,
}

impl HostFacts {
    /// Reads the password database and `$HOME`.
    pub fn gather(umbra_state: Vec<PathBuf>) -> HostFacts {
        let mut homes: Vec<PathBuf> = fs::read_to_string("/etc/passwd")
            .map(|s| homes_in_passwd(&s))
            .unwrap_or_default();
        homes.push(PathBuf::from("/root"));
        if let Some(h) = std::env::var_os("HOME") {
            homes.push(PathBuf::from(h));
        }
        // Compare canonical spellings: a home reached through a link is the same place.
        let homes = homes
            .into_iter()
            .map(|h| fs::canonicalize(&h).unwrap_or(h))
            .collect();
        HostFacts { homes, umbra_state }
    }
}

/// The home directories named in a password file's text.
pub fn homes_in_passwd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| l.split(':').nth(5))
        .filter(|h| h.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// Locations shared by every user or holding the system's own state: a workspace may not be
/// one of them or hold one. (Homes and Umbra's state come from [`HostFacts`].)
const SHARED: &[&str] = &[
    "/tmp",
    "/var/tmp",
    "/dev/shm",
    "/run",
    "/var/run",
    "/var/lock",
    "/var/lib",
    "/var/log",
    "/var/cache",
    "/var/spool",
    "/var/mail",
    "/var/backups",
    "/home",
    "/root",
];

/// System trees: a workspace inside one is refused (it would be written by the agent).
const SYSTEM_FOR_WORKSPACE: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc",
    "/proc",
    "/dev",
    "/sys",
    "/boot",
    "/run",
    "/var/run",
    "/var/lock",
    "/snap",
];

/// Trees that hold the host's secrets or live state: nothing inside them is shown, even
/// read-only (`/etc/ssl/private`, `/proc/kcore`, another sandbox's state in `/run`).
const SYSTEM_FOR_READ_ONLY: &[&str] =
    &["/etc", "/proc", "/dev", "/sys", "/boot", "/run", "/var/run"];

/// Refuses a shown path that is `/`, a top-level directory, inside a system tree, or that is
/// (or holds) a shared location, a home directory or Umbra's state. `path` is canonical.
/// `world_writable` is whether the directory is writable by every user (a shared place by
/// definition). Returns the one-line reason.
pub fn refuse_location(
    path: &Path,
    shown: Shown,
    world_writable: bool,
    host: &HostFacts,
) -> Result<(), String> {
    let what = shown.what();
    if path == Path::new("/") {
        return Err(format!("the {what} cannot be /"));
    }
    let system = match shown {
        Shown::Workspace => SYSTEM_FOR_WORKSPACE,
        Shown::ReadOnly => SYSTEM_FOR_READ_ONLY,
    };
    if let Some(sys) = system.iter().find(|s| path.starts_with(s)) {
        return Err(format!(
            "the {what} {} lies in the system path {sys}",
            path.display()
        ));
    }
    if path.components().count() == 2 {
        return Err(format!(
            "the {what} {} is a top-level directory, shared by the whole system; choose a directory of your own below it",
            path.display()
        ));
    }
    let holds = |place: &Path| place.starts_with(path);
    if let Some(s) = SHARED.iter().map(Path::new).find(|s| holds(s)) {
        return Err(format!(
            "the {what} {} is or holds the shared location {}; choose a directory of your own below it",
            path.display(),
            s.display()
        ));
    }
    if let Some(h) = host.homes.iter().find(|h| holds(h)) {
        return Err(format!(
            "the {what} {} would show the home directory {} inside the sandbox; choose a directory below it",
            path.display(),
            h.display()
        ));
    }
    if let Some(s) = host.umbra_state.iter().find(|s| holds(s)) {
        return Err(format!(
            "the {what} {} holds Umbra's sandbox state {}",
            path.display(),
            s.display()
        ));
    }
    if shown == Shown::Workspace && world_writable {
        return Err(format!(
            "the workspace {} is writable by every user (a shared place); choose a directory of your own",
            path.display()
        ));
    }
    Ok(())
}

/// Whether the directory at `path` is writable by every user.
pub fn world_writable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.mode() & 0o002 != 0)
}

/// At most this many directory entries are looked at for secrets in one shown path. A larger
/// tree is refused: what was not looked at cannot be vouched for.
pub const SCAN_ENTRIES: usize = 200_000;
/// How deep below a shown path the scan goes.
pub const SCAN_DEPTH: usize = 32;
/// How much of a candidate file is read to recognise a key or a token.
const SCAN_READ: u64 = 64 * 1024;

/// A secret found under a shown path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    /// Where it is.
    pub path: PathBuf,
    /// What it is, for the message.
    pub kind: &'static str,
}

/// The result of a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// Nothing was found in the whole tree. `linked` holds the device and inode of every
    /// regular file in it that has other names (hard links), for [`hidden_leak`].
    Clean {
        /// Files with more than one name, by device and inode.
        linked: Vec<(u64, u64)>,
    },
    /// Nothing was found, but the tree was larger than the scan's bounds.
    Partial {
        /// Entries looked at.
        entries: usize,
    },
    /// A secret.
    Found(Secret),
}

/// Walks `root` (not following links) for key material. Bounded by [`SCAN_ENTRIES`] and
/// [`SCAN_DEPTH`]; reads the first 8 KiB of every regular file, 64 KiB of candidates.
///
/// Directories in `covered` are not entered: the sandbox shows an empty directory in their
/// place, whatever is later written or renamed inside them on the host. A covered *file* is no
/// such guarantee (a host-side rename over it, such as an identity's renewal, replaces what the
/// cover covers), so key material in one is still found.
pub fn find_secret(root: &Path, covered: &[PathBuf]) -> Scan {
    let mut entries = 0usize;
    let mut stack: Vec<(PathBuf, usize)> = vec![(root.to_path_buf(), 0)];
    let mut truncated = false;
    let mut linked = Vec::new();
    while let Some((dir, depth)) = stack.pop() {
        let Ok(list) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in list.flatten() {
            entries += 1;
            if entries > SCAN_ENTRIES {
                return Scan::Partial {
                    entries: SCAN_ENTRIES,
                };
            }
            let Ok(ft) = entry.file_type() else {
                continue;
            };
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let path = entry.path();
            if ft.is_dir() {
                if covered.contains(&path) {
                    continue;
                }
                if path.join(crate::CONTROLLER_DB).exists() {
                    return Scan::Found(Secret {
                        path,
                        kind: "a controller's directory (its CA keys and database)",
                    });
                }
                if depth + 1 < SCAN_DEPTH {
                    stack.push((path, depth + 1));
                } else {
                    truncated = true;
                }
                continue;
            }
            if !ft.is_file() {
                continue;
            }
            if name == crate::CONTROLLER_DB {
                return Scan::Found(Secret {
                    path: dir.clone(),
                    kind: "a controller's directory (its CA keys and database)",
                });
            }
            let meta = entry.metadata().ok();
            let nlink = meta.as_ref().map_or(1, |m| m.nlink());
            if let Some(m) = meta.as_ref().filter(|_| nlink > 1) {
                linked.push((m.dev(), m.ino()));
            }
            // A file with other names is read as far as a candidate: what it holds may have been
            // written under another name.
            let sniff = nlink > 1;
            if let Some(kind) = classify(&name, &path, sniff) {
                return Scan::Found(Secret { path, kind });
            }
        }
    }
    if truncated {
        Scan::Partial { entries }
    } else {
        linked.sort_unstable();
        Scan::Clean { linked }
    }
}

/// Normalises `p` without touching the filesystem: `.` dropped, `..` taking off the last part.
fn lexical(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Where a symbolic link at `link` (whose text is `target`) leads, if that is inside a shown
/// path and outside every hidden one: judged on the link's text (what an agent could later
/// redirect, by changing a link of its own on the way) and on the path as the kernel resolves
/// it now. A key written through such a link would be shown.
pub fn reaches_shown(
    link: &Path,
    target: &Path,
    shown: &[PathBuf],
    hidden: &[PathBuf],
) -> Option<PathBuf> {
    let text = lexical(&link.parent().unwrap_or(Path::new("/")).join(target));
    let resolved = fs::canonicalize(link).ok();
    std::iter::once(text)
        .chain(resolved)
        .find(|p| shows(p, shown, hidden))
}

/// Whether `p` is inside a shown path and outside every hidden one.
pub fn shows(p: &Path, shown: &[PathBuf], hidden: &[PathBuf]) -> bool {
    shown.iter().any(|s| p.starts_with(s)) && !hidden.iter().any(|h| p.starts_with(h))
}

/// Refuses a hidden directory (`hidden_dir`, inside a shown path) that reaches what is shown:
/// a symbolic link leading into a shown path ([`reaches_shown`]), or a file that is also one of
/// the shown tree's files under another name (`linked`, from [`find_secret`]). Whatever Umbra
/// later writes through either (an identity's renewal) would be shown. Bounded like
/// [`find_secret`]; a hidden directory too large to check is refused too.
pub fn hidden_leak(
    hidden_dir: &Path,
    shown: &[PathBuf],
    hidden: &[PathBuf],
    linked: &[(u64, u64)],
) -> Option<Secret> {
    let mut entries = 0usize;
    let mut stack: Vec<(PathBuf, usize)> = vec![(hidden_dir.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(list) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in list.flatten() {
            entries += 1;
            let path = entry.path();
            if entries > SCAN_ENTRIES || depth >= SCAN_DEPTH {
                return Some(Secret {
                    path: hidden_dir.to_path_buf(),
                    kind: "a hidden directory too large to check for links to what is shown",
                });
            }
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                let Ok(target) = fs::read_link(&path) else {
                    continue;
                };
                if reaches_shown(&path, &target, shown, hidden).is_some() {
                    return Some(Secret {
                        path,
                        kind: "a link out of a hidden directory to what the sandbox shows",
                    });
                }
            } else if meta.is_dir() {
                stack.push((path, depth + 1));
            } else if meta.nlink() > 1 && linked.binary_search(&(meta.dev(), meta.ino())).is_ok() {
                return Some(Secret {
                    path,
                    kind: "a hidden file that is also shown under another name (a hard link)",
                });
            }
        }
    }
    None
}

/// How much of a file whose name does not mark it as a candidate is read: PEM and OpenSSH keys
/// start at the top of their files.
const SNIFF_READ: u64 = 8 * 1024;

/// What a file is, judged by its name and its first bytes: 64 KiB of a candidate (a name with a
/// key's, certificate's, token's or JSON's extension anywhere in it, as in `agent-1.json.bak` or
/// `root.key~`, or a file with other names when `sniff` is set), 8 KiB of any other file.
fn classify(name: &str, path: &Path, sniff: bool) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    let ext = lower.rsplit_once('.').map(|(_, e)| e);
    if ext == Some("key") {
        return Some("a key file");
    }
    if lower.starts_with(crate::CONTROLLER_DB) {
        return Some("a copy of a controller's database");
    }
    let ssh = [
        "id_rsa",
        "id_dsa",
        "id_ecdsa",
        "id_ed25519",
        "id_ecdsa_sk",
        "id_ed25519_sk",
    ]
    .iter()
    .any(|k| lower.starts_with(k));
    let marked = lower.split(['.', '~', '-', '_']).skip(1).any(|part| {
        matches!(
            part,
            "json" | "pem" | "jwt" | "token" | "p8" | "p12" | "pfx" | "der" | "crt" | "txt" | "key"
        )
    });
    let limit = if sniff || ssh || marked {
        SCAN_READ
    } else {
        SNIFF_READ
    };
    let mut head = Vec::new();
    fs::File::open(path)
        .ok()?
        .take(limit)
        .read_to_end(&mut head)
        .ok()?;
    let text = String::from_utf8_lossy(&head);
    if text.contains("PRIVATE KEY-----") {
        return Some(if lower.contains(".json") {
            "an identity file (its private key)"
        } else {
            "a private key"
        });
    }
    if (marked || sniff) && looks_like_jwt(text.trim()) {
        return Some("an enrollment token");
    }
    None
}

/// A compact JWS: three base64url parts, the first of them a JSON header.
fn looks_like_jwt(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && parts[0].starts_with("eyJ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostFacts {
        HostFacts {
            homes: vec![
                "/root".into(),
                "/home/alice".into(),
                "/var/lib/postgresql".into(),
                "/nonexistent".into(),
            ],
            umbra_state: vec![
                "/run/umbra/sandboxes".into(),
                "/tmp/umbra-sandboxes-0".into(),
            ],
        }
    }

    fn ws(p: &str) -> Result<(), String> {
        refuse_location(Path::new(p), Shown::Workspace, false, &host())
    }

    fn ro(p: &str) -> Result<(), String> {
        refuse_location(Path::new(p), Shown::ReadOnly, false, &host())
    }

    #[test]
    fn shared_and_system_locations_are_refused_as_workspaces() {
        for p in [
            "/",
            "/tmp",
            "/run",
            "/var",
            "/opt",
            "/srv",
            "/mnt",
            "/boot",
            "/home",
            "/work",
            "/media",
            "/var/tmp",
            "/var/lib",
            "/var/log",
            "/dev/shm",
            "/run/user/1000",
            "/usr/lib",
            "/etc/ssl",
            "/proc/self",
            "/home/alice",
            "/var/lib/postgresql",
            "/root",
            "/run/umbra",
            "/sys/fs",
        ] {
            assert!(ws(p).is_err(), "{p} was accepted");
        }
        let e = ws("/tmp").unwrap_err();
        assert!(e.contains("/tmp") && e.contains("top-level"), "{e}");
        let e = ws("/var/lib").unwrap_err();
        assert!(e.contains("shared location /var/lib"), "{e}");
        let e = ws("/home/alice").unwrap_err();
        assert!(e.contains("home directory /home/alice"), "{e}");
    }

    #[test]
    fn directories_of_ones_own_are_accepted() {
        for p in [
            "/home/alice/project",
            "/tmp/umbra-ws-1234",
            "/work/main/agent",
            "/srv/agents/a1",
            "/var/lib/postgresql/scratch",
            "/opt/agents/run-7",
            "/root/project",
        ] {
            assert_eq!(ws(p), Ok(()), "{p}");
        }
        // A world-writable directory is shared, wherever it is.
        let e = refuse_location(
            Path::new("/srv/agents/drop"),
            Shown::Workspace,
            true,
            &host(),
        )
        .unwrap_err();
        assert!(e.contains("writable by every user"), "{e}");
    }

    #[test]
    fn read_only_paths_may_lie_in_system_trees_but_not_in_secret_ones() {
        assert_eq!(ro("/usr/share/doc"), Ok(()));
        assert_eq!(ro("/opt/toolchain"), Ok(()));
        for p in [
            "/etc/ssl",
            "/etc",
            "/proc/kcore",
            "/run/umbra/x",
            "/tmp",
            "/home",
            "/",
        ] {
            assert!(ro(p).is_err(), "{p} was accepted read-only");
        }
    }

    #[test]
    fn homes_come_from_the_password_file() {
        let homes = homes_in_passwd(
            "root:x:0:0:root:/root:/bin/bash\nbad line\npg:x:105:110::/var/lib/postgresql:/bin/sh\nx:x:1:1::relative:/bin/sh\n",
        );
        assert_eq!(
            homes,
            vec![PathBuf::from("/root"), PathBuf::from("/var/lib/postgresql")]
        );
    }

    #[test]
    fn key_material_is_found_and_ordinary_files_are_not() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::write(root.join("README.md"), "hello").unwrap();
        fs::write(root.join("data.json"), r#"{"a": 1}"#).unwrap();
        fs::write(root.join("cert.pem"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        assert!(matches!(find_secret(root, &[]), Scan::Clean { .. }));
        // Nothing is skipped by name: generated and vendored trees are scanned too.
        fs::create_dir_all(root.join("node_modules/x")).unwrap();
        fs::write(root.join("node_modules/x/k.json"), "PRIVATE KEY-----").unwrap();
        assert!(matches!(find_secret(root, &[]), Scan::Found(_)));
        fs::remove_dir_all(root.join("node_modules")).unwrap();

        let cases: &[(&str, &str, &str)] = &[
            (
                "agent-1.json",
                r#"{"key_pem":"-----BEGIN PRIVATE KEY-----\n"}"#,
                "identity file",
            ),
            ("sub/dir/anthropic.key", "sk-ant-123", "key file"),
            (
                "agent-2.jwt",
                "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln\n",
                "enrollment token",
            ),
            (
                ".ssh/id_ed25519",
                "-----BEGIN OPENSSH PRIVATE KEY-----\n",
                "private key",
            ),
            ("ctl/umbra.db", "", "controller"),
        ];
        for (rel, body, kind) in cases {
            let t = tempfile::tempdir().unwrap();
            let p = t.path().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, body).unwrap();
            match find_secret(t.path(), &[]) {
                Scan::Found(s) => assert!(s.kind.contains(kind), "{rel}: {s:?}"),
                other => panic!("{rel}: {other:?}"),
            }
        }
    }

    #[test]
    fn covered_directories_are_not_entered_but_covered_files_are_read() {
        let t = tempfile::tempdir().unwrap();
        let ctl = t.path().join(".umbra");
        fs::create_dir(&ctl).unwrap();
        fs::write(ctl.join("umbra.db"), "").unwrap();
        fs::write(ctl.join("ca.key"), "k").unwrap();
        assert!(matches!(find_secret(t.path(), &[]), Scan::Found(_)));
        assert!(matches!(
            find_secret(t.path(), std::slice::from_ref(&ctl)),
            Scan::Clean { .. }
        ));
        let id = t.path().join("agent-1.json");
        fs::write(&id, "-----BEGIN PRIVATE KEY-----").unwrap();
        assert!(matches!(
            find_secret(t.path(), &[ctl, id]),
            Scan::Found(Secret {
                kind: "an identity file (its private key)",
                ..
            })
        ));
    }

    #[test]
    fn the_scan_is_bounded() {
        let t = tempfile::tempdir().unwrap();
        let mut deep = t.path().to_path_buf();
        for i in 0..SCAN_DEPTH + 2 {
            deep = deep.join(format!("d{i}"));
        }
        fs::create_dir_all(&deep).unwrap();
        // A key below the depth bound is not seen, and the result says the scan was partial.
        fs::write(deep.join("x.key"), "k").unwrap();
        assert!(matches!(find_secret(t.path(), &[]), Scan::Partial { .. }));
        // Links are not followed.
        let t2 = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(t.path(), t2.path().join("link")).unwrap();
        assert!(matches!(find_secret(t2.path(), &[]), Scan::Clean { .. }));
    }

    #[test]
    fn links_are_judged_on_their_text_and_on_where_they_lead() {
        let shown = vec![PathBuf::from("/w/ws"), PathBuf::from("/opt/ro")];
        let hidden = vec![PathBuf::from("/w/ws/.umbra")];
        let reach = |link: &str, target: &str| {
            reaches_shown(Path::new(link), Path::new(target), &shown, &hidden)
        };
        // Out of the hidden directory, into the workspace, however spelled.
        assert_eq!(
            reach("/w/ws/.umbra/agent-1.json", "../.cache/blob"),
            Some(PathBuf::from("/w/ws/.cache/blob"))
        );
        assert!(reach("/w/ws/.umbra/a/b", "../../src/./x").is_some());
        assert!(reach("/w/ws/.umbra/a", "/w/ws/x").is_some());
        assert!(reach("/w/ws/.umbra/a", "/opt/ro/k").is_some());
        // Within the hidden directory, or out of everything shown: fine.
        assert_eq!(reach("/w/ws/.umbra/a", "b/c"), None);
        assert_eq!(reach("/w/ws/.umbra/a", "/w/ws/.umbra/c"), None);
        assert_eq!(reach("/w/ws/.umbra/a", "/home/u/ids/agent-1.json"), None);
        assert_eq!(reach("/w/ws/.umbra/a", "../../other/x"), None);
        // `..` at the root stays at the root.
        assert_eq!(reach("/w/ws/.umbra/a", "../../../../../../etc/x"), None);
    }

    #[test]
    fn hidden_directories_may_not_reach_what_is_shown() {
        let t = tempfile::tempdir().unwrap();
        let ws = t.path().join("ws");
        let hid = ws.join(".umbra");
        fs::create_dir_all(ws.join(".cache")).unwrap();
        fs::create_dir_all(hid.join("deep")).unwrap();
        fs::write(ws.join(".cache/blob"), "").unwrap();
        let shown = vec![ws.clone()];
        let hidden = vec![hid.clone()];
        let linked = |root: &Path| match find_secret(root, std::slice::from_ref(&hid)) {
            Scan::Clean { linked } => linked,
            other => panic!("{other:?}"),
        };
        assert_eq!(hidden_leak(&hid, &shown, &hidden, &linked(&ws)), None);
        // A link to a file inside the hidden directory, or outside everything, is fine.
        fs::write(hid.join("real"), "x").unwrap();
        std::os::unix::fs::symlink("real", hid.join("deep-ok")).unwrap();
        std::os::unix::fs::symlink(t.path(), hid.join("outside")).unwrap();
        assert_eq!(hidden_leak(&hid, &shown, &hidden, &linked(&ws)), None);
        // A link (however deep) to a shown file is refused.
        std::os::unix::fs::symlink("../../.cache/blob", hid.join("deep/agent-1.json")).unwrap();
        let s = hidden_leak(&hid, &shown, &hidden, &linked(&ws)).unwrap();
        assert_eq!(s.path, hid.join("deep/agent-1.json"));
        fs::remove_file(hid.join("deep/agent-1.json")).unwrap();
        // So is a hidden file that is also a shown one under another name; a hard link whose
        // other name is not shown is not.
        fs::hard_link(hid.join("real"), t.path().join("elsewhere")).unwrap();
        assert_eq!(hidden_leak(&hid, &shown, &hidden, &linked(&ws)), None);
        fs::hard_link(hid.join("real"), ws.join("src.rs")).unwrap();
        let s = hidden_leak(&hid, &shown, &hidden, &linked(&ws)).unwrap();
        assert!(s.kind.contains("hard link"), "{s:?}");
    }

    #[test]
    fn every_file_is_read_whatever_its_name() {
        let found = |name: &str, body: &[u8]| {
            let t = tempfile::tempdir().unwrap();
            fs::write(t.path().join(name), body).unwrap();
            matches!(find_secret(t.path(), &[]), Scan::Found(_))
        };
        let key = b"-----BEGIN PRIVATE KEY-----\n";
        for name in [
            "blob",
            "a.bin",
            "agent-1.json.bak",
            "admin.json.orig",
            "root.key~",
            "x",
        ] {
            assert!(found(name, key), "{name}");
        }
        assert!(found("umbra.db.bak", b"SQLite format 3"));
        assert!(found(
            "id_ed25519.old",
            b"-----BEGIN OPENSSH PRIVATE KEY-----"
        ));
        // Deep in a file: read that far for candidates (and files with other names) only.
        let deep: Vec<u8> = [vec![b' '; 20_000], key.to_vec()].concat();
        assert!(found("agent-1.json.bak", &deep));
        assert!(!found("a.bin", &deep));
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("a.bin"), &deep).unwrap();
        fs::hard_link(t.path().join("a.bin"), t.path().join("b.bin")).unwrap();
        assert!(matches!(find_secret(t.path(), &[]), Scan::Found(_)));
        // Ordinary files stay ordinary.
        assert!(!found("notes.txt", b"a private key is not here"));
        assert!(!found("keyboard.layout", b"qwerty"));
    }
}
