//! Attempts on the powers the agent must not hold over host files: being root on the host,
//! making set-id files, reading the host's private keys or kernel internals, trusting a device
//! node that is not one, and carrying a hidden path out from under its cover.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::{attempt, must_fail, os_err, Attempt, ProbeConfig};
use crate::init::{DEVICES, PROC_MASKED};

/// The file the probe tries to make set-user-ID in the workspace; the launcher looks at it on
/// the host afterwards.
pub const SETID_FILE: &str = ".umbra-escape-setid";
/// The directory `umbra verify` hides below the workspace (`--hide`), with [`HIDDEN_SECRET`]
/// inside; the probe tries to read it and to rename it and its parent away.
pub const HIDDEN_DIR: &str = ".umbra-verify-hide/inner";
/// The file inside [`HIDDEN_DIR`].
pub const HIDDEN_SECRET: &str = "secret";

/// Runs the attempts of this module.
pub fn attempts(cfg: &ProbeConfig, out: &mut Vec<Attempt>) {
    out.push(host_uid());
    setid(&cfg.workspace, out);
    out.push(host_keys());
    out.push(masked_proc());
    out.push(devices());
    if let Some(hidden) = &cfg.hidden {
        hidden_path(hidden, out);
    }
}

/// The agent's uid seen from the host, from `/proc/self/uid_map` (inside, outside, count).
fn host_uid() -> Attempt {
    let name = "be root on the host (uid map)";
    let expected = "an unprivileged host uid";
    let text = match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(t) => t,
        Err(e) => return attempt(name, expected, format!("unreadable: {}", os_err(&e)), true),
    };
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    let host = text.lines().find_map(|l| {
        let f: Vec<u64> = l
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        match f[..] {
            [inside, outside, count] if (inside..inside + count).contains(&u64::from(me)) => {
                Some(outside + (u64::from(me) - inside))
            }
            _ => None,
        }
    });
    match host {
        Some(0) => attempt(name, expected, "host uid 0".into(), true),
        Some(h) => attempt(name, expected, format!("host uid {h}"), false),
        None => attempt(name, expected, format!("no mapping in {text:?}"), true),
    }
}

/// Set-id bits by every route: chmod, fchmod, creating with the bits, a set-gid directory.
fn setid(ws: &Path, out: &mut Vec<Attempt>) {
    let file = ws.join(SETID_FILE);
    let _ = std::fs::remove_file(&file);
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o6755)
        .open(&file);
    let bits = |p: &Path| std::fs::metadata(p).map(|m| m.mode() & 0o6000).unwrap_or(0);
    out.push(match made {
        Ok(_) if bits(&file) != 0 => attempt(
            "create a set-id file",
            "refused or created without the bits",
            format!("mode {:o}", bits(&file)),
            true,
        ),
        Ok(_) => attempt(
            "create a set-id file",
            "refused or created without the bits",
            "created without set-id bits".into(),
            false,
        ),
        Err(e) => attempt(
            "create a set-id file",
            "refused or created without the bits",
            format!("refused: {}", os_err(&e)),
            false,
        ),
    });
    let _ = std::fs::write(&file, b"#!/bin/sh\nid\n");
    out.push(must_fail(
        "chmod u+s a file in the workspace",
        "refused",
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o4755)),
    ));
    out.push(must_fail(
        "fchmod g+s a file in the workspace",
        "refused",
        std::fs::File::open(&file)
            .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(0o2755))),
    ));
    let dir = ws.join(".umbra-escape-setgid-dir");
    let _ = std::fs::remove_dir(&dir);
    let r = std::fs::DirBuilder::new()
        .mode(0o2755)
        .create(&dir)
        .map(|()| bits(&dir));
    let _ = std::fs::remove_dir(&dir);
    out.push(match r {
        Ok(0) => attempt(
            "make a set-gid directory",
            "refused",
            "made without the bit".into(),
            false,
        ),
        Ok(b) => attempt(
            "make a set-gid directory",
            "refused",
            format!("mode {b:o}"),
            true,
        ),
        Err(e) => attempt(
            "make a set-gid directory",
            "refused",
            format!("refused: {}", os_err(&e)),
            false,
        ),
    });
    // What is left (the plain file) is checked on the host by the launcher, then removed.
}

/// Private keys of the host that a curated `/etc` leaves out.
fn host_keys() -> Attempt {
    let name = "read the host's private keys in /etc";
    let mut read = Vec::new();
    for dir in ["/etc/ssl/private", "/etc/pki/tls/private", "/etc/ssh"] {
        if let Ok(list) = std::fs::read_dir(dir) {
            for e in list.flatten() {
                if std::fs::read(e.path()).is_ok_and(|b| !b.is_empty()) {
                    read.push(e.path().display().to_string());
                }
            }
        }
    }
    for f in ["/etc/shadow", "/etc/gshadow", "/etc/sudoers"] {
        if std::fs::read(f).is_ok_and(|b| !b.is_empty()) {
            read.push(f.to_string());
        }
    }
    attempt(
        name,
        "none there",
        if read.is_empty() {
            "none readable".into()
        } else {
            format!("read [{}]", read.join(" "))
        },
        !read.is_empty(),
    )
}

/// The kernel's internals and other users' keys, masked in `/proc` as OCI runtimes mask them.
fn masked_proc() -> Attempt {
    let mut leaked = Vec::new();
    for name in PROC_MASKED {
        let p = Path::new("/proc").join(name);
        let shown = match std::fs::symlink_metadata(&p) {
            Err(_) => false,
            Ok(m) if m.is_dir() => std::fs::read_dir(&p).is_ok_and(|mut d| d.next().is_some()),
            Ok(_) => {
                let mut buf = [0u8; 64];
                std::fs::File::open(&p)
                    .and_then(|mut f| std::io::Read::read(&mut f, &mut buf))
                    .is_ok_and(|n| n > 0)
            }
        };
        if shown {
            leaked.push(*name);
        }
    }
    let sysrq = std::fs::write("/proc/sysrq-trigger", b"h").is_ok();
    if sysrq {
        leaked.push("sysrq-trigger (written)");
    }
    attempt(
        "read masked /proc files",
        "empty or refused",
        if leaked.is_empty() {
            format!("{} entries empty or refused", PROC_MASKED.len())
        } else {
            format!("readable: [{}]", leaked.join(" "))
        },
        !leaked.is_empty(),
    )
}

/// Every device shown is the character device it claims to be.
fn devices() -> Attempt {
    let mut wrong = Vec::new();
    for (name, major, minor) in DEVICES {
        let p = Path::new("/dev").join(name);
        match std::fs::symlink_metadata(&p) {
            Err(_) => {}
            Ok(m) => {
                let rdev = m.rdev();
                let ok = m.file_type().is_char_device()
                    && libc::major(rdev) == *major
                    && libc::minor(rdev) == *minor;
                if !ok {
                    wrong.push(name.to_string());
                }
            }
        }
    }
    let nul = std::fs::read("/dev/null").map(|b| b.len());
    if !matches!(nul, Ok(0)) {
        wrong.push(format!("/dev/null reads {nul:?}"));
    }
    attempt(
        "device nodes are what they claim",
        "only the expected character devices",
        if wrong.is_empty() {
            "all checked".into()
        } else {
            format!("wrong: [{}]", wrong.join(" "))
        },
        !wrong.is_empty(),
    )
}

/// Reads the hidden directory, then tries to carry it (or its parent) out from under its
/// cover by renaming, so that a later run would show it.
fn hidden_path(hidden: &Path, out: &mut Vec<Attempt>) {
    let secret = hidden.join(HIDDEN_SECRET);
    let r = std::fs::read(&secret);
    out.push(attempt(
        "read a --hide path",
        "refused",
        match &r {
            Ok(b) => format!("read {} bytes", b.len()),
            Err(e) => format!("refused: {}", os_err(e)),
        },
        r.is_ok_and(|b| !b.is_empty()),
    ));
    for p in [hidden, hidden.parent().unwrap_or(hidden)] {
        let moved = p.with_extension("moved");
        let r = std::fs::rename(p, &moved);
        if r.is_ok() {
            // Put it back so the host-side check sees what the rename did, not a second move.
            let _ = std::fs::rename(&moved, p);
        }
        out.push(must_fail(
            &format!("rename {} away", p.display()),
            "refused",
            r,
        ));
    }
}
