//! A cgroup's owner removes it with what ran in it: after `shutdown` (which waits), and after a
//! plain drop (which never sleeps and leaves the waiting to a thread of its own). Needs root and
//! a cgroup hierarchy; elsewhere the tests say so and pass without checking.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use umbra_sandbox::cgroup::{Backend, Cgroup, Limits};

/// A group for this test, or `None` where none can be made here.
fn group(tag: &str) -> Option<Cgroup> {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("not root: cgroup ownership not checked");
        return None;
    }
    let name = format!("umbra-test-{tag}-{}", std::process::id());
    let limits = Limits {
        pids: Some(16),
        ..Default::default()
    };
    let cg = Cgroup::create(&name, limits).expect("cgroup");
    if matches!(cg.backend(), Backend::Rlimits) {
        eprintln!("no cgroup hierarchy: cgroup ownership not checked");
        return None;
    }
    Some(cg)
}

fn dirs(cg: &Cgroup) -> Vec<PathBuf> {
    cg.procs_files()
        .iter()
        .filter_map(|f| f.parent().map(PathBuf::from))
        .collect()
}

/// A process that joins the group and sleeps; reaped by a thread, which returns its status.
fn member(cg: &Cgroup) -> std::thread::JoinHandle<std::process::ExitStatus> {
    let files: Vec<String> = cg
        .procs_files()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let script = format!(
        "for f in {}; do echo $$ > $f || exit 1; done; exec sleep 60",
        files.join(" ")
    );
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .spawn()
        .expect("sh");
    let deadline = Instant::now() + Duration::from_secs(5);
    while cg.pids().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the member never joined the group"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::spawn(move || child.wait().expect("wait"))
}

#[tokio::test]
async fn shutdown_kills_what_is_inside_and_removes_the_group() {
    let Some(cg) = group("shutdown") else { return };
    let dirs = dirs(&cg);
    let reaper = member(&cg);
    cg.shutdown().await;
    for d in &dirs {
        assert!(!d.exists(), "{} left behind by shutdown", d.display());
    }
    let status = reaper.join().expect("reaper");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_dropped_group_is_removed_all_the_same() {
    let Some(cg) = group("drop") else { return };
    let dirs = dirs(&cg);
    let reaper = member(&cg);
    drop(cg);
    // On this single-threaded runtime, a drop that slept would hold up the sleeps below just as
    // it would every other task; the removal must happen without this thread's help.
    let deadline = Instant::now() + Duration::from_secs(5);
    while dirs.iter().any(|d| d.exists()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for d in &dirs {
        assert!(!d.exists(), "{} left behind after drop", d.display());
    }
    let status = reaper.join().expect("reaper");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
}
