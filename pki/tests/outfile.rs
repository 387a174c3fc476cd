//! `outfile`: what every file Umbra writes goes through, tested against each kind of target.
//!
//! Every test works in its own temporary directory, except the `/dev/null` one (root only).

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use umbra_pki::outfile::{
    check_target, open_append, write_file, OutFileError, Refusal, TargetKind,
};

fn mode(p: &Path) -> u32 {
    fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

/// The names in `dir`, sorted: used to show that no temporary file was left behind.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Whether we run as root: files we create are owned by uid 0.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    let f = tempfile::NamedTempFile::new().expect("tempfile");
    f.as_file().metadata().expect("stat").uid() == 0
}

fn mkfifo(p: &Path) {
    rustix::fs::mkfifoat(rustix::fs::CWD, p, rustix::fs::Mode::from_raw_mode(0o600))
        .expect("mkfifo");
}

fn assert_refused(r: Result<(), OutFileError>, want: Refusal) {
    match r {
        Err(OutFileError::Refused { reason, .. }) => assert_eq!(reason, want),
        other => panic!("expected a refusal ({want:?}), got {other:?}"),
    }
}

#[test]
fn new_file_gets_exactly_the_requested_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("k.key");
    write_file(&key, b"secret", 0o600).expect("write");
    assert_eq!(fs::read(&key).expect("read"), b"secret");
    assert_eq!(mode(&key), 0o600);
    let crt = dir.path().join("c.crt");
    write_file(&crt, b"public", 0o644).expect("write");
    assert_eq!(mode(&crt), 0o644);
    assert_eq!(names(dir.path()), ["c.crt", "k.key"]);
}

#[test]
fn existing_regular_file_is_replaced_and_never_widened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("f");

    // 0600 existing, 0644 requested: stays 0600.
    fs::write(&p, b"old").expect("write");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).expect("chmod");
    write_file(&p, b"new", 0o644).expect("write");
    assert_eq!(fs::read(&p).expect("read"), b"new");
    assert_eq!(mode(&p), 0o600);

    // 0644 existing, 0600 requested: the stricter one, 0600.
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
    write_file(&p, b"newer", 0o600).expect("write");
    assert_eq!(fs::read(&p).expect("read"), b"newer");
    assert_eq!(mode(&p), 0o600);

    // 0640 existing, 0604 requested: the intersection.
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).expect("chmod");
    write_file(&p, b"x", 0o604).expect("write");
    assert_eq!(mode(&p), 0o600);

    // Replaced by rename: a file that had been opened keeps the old content.
    assert_eq!(names(dir.path()), ["f"]);
}

#[test]
fn symlink_is_followed_and_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let real_dir = dir.path().join("real");
    fs::create_dir(&real_dir).expect("mkdir");
    let real = real_dir.join("id.json");
    fs::write(&real, b"old").expect("write");
    fs::set_permissions(&real, fs::Permissions::from_mode(0o644)).expect("chmod");
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");

    write_file(&link, b"new", 0o600).expect("write");
    assert!(fs::symlink_metadata(&link)
        .expect("lstat")
        .file_type()
        .is_symlink());
    assert_eq!(fs::read(&real).expect("read"), b"new");
    assert_eq!(mode(&real), 0o600);
    // The temporary file went next to the real file, and is gone.
    assert_eq!(names(&real_dir), ["id.json"]);
    assert_eq!(names(dir.path()), ["link.json", "real"]);
}

#[test]
fn dangling_symlink_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).expect("symlink");
    assert_refused(
        write_file(&link, b"secret", 0o600),
        Refusal::DanglingSymlink,
    );
    assert!(matches!(
        check_target(&link),
        Err(OutFileError::Refused {
            reason: Refusal::DanglingSymlink,
            ..
        })
    ));
    assert!(open_append(&link, 0o600).is_err());
    assert_eq!(names(dir.path()), ["link"]);
}

#[test]
fn foreign_symlink_in_a_sticky_shared_directory_is_refused() {
    if !is_root() {
        eprintln!("note: not root; cannot give a symlink to another user, skipped");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = dir.path().join("tmp");
    fs::create_dir(&shared).expect("mkdir");
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).expect("chmod");
    let victim = dir.path().join("victim");
    fs::write(&victim, b"precious").expect("write");
    let link = shared.join("agent.jwt");
    std::os::unix::fs::symlink(&victim, &link).expect("symlink");
    std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).expect("lchown");
    assert_refused(
        write_file(&link, b"token", 0o600),
        Refusal::UntrustedSymlink,
    );
    assert!(open_append(&link, 0o600).is_err());
    assert!(check_target(&link).is_err());
    assert_eq!(fs::read(&victim).expect("read"), b"precious");
    // Our own link there is followed.
    std::os::unix::fs::lchown(&link, Some(0), Some(0)).expect("lchown");
    write_file(&link, b"token", 0o600).expect("write");
    assert_eq!(fs::read(&victim).expect("read"), b"token");
}

#[test]
fn directory_is_refused_and_left_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sub = dir.path().join("sub");
    fs::create_dir(&sub).expect("mkdir");
    assert_refused(write_file(&sub, b"secret", 0o600), Refusal::Directory);
    // Trailing slash, and `..`: also not files.
    let slash = format!("{}/", sub.display());
    assert_refused(
        write_file(Path::new(&slash), b"secret", 0o600),
        Refusal::Directory,
    );
    assert_refused(
        write_file(&dir.path().join("new/"), b"secret", 0o600),
        Refusal::NotAFileName,
    );
    assert!(open_append(&sub, 0o600).is_err());
    assert!(check_target(&sub).is_err());
    let err = write_file(&sub, b"x", 0o600).expect_err("refused");
    assert!(err.to_string().contains("is a directory"), "{err}");
    assert!(names(&sub).is_empty());
    assert_eq!(names(dir.path()), ["sub"]);
}

#[test]
fn unix_socket_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    assert_refused(write_file(&sock, b"secret", 0o600), Refusal::Socket);
    assert!(open_append(&sock, 0o600).is_err());
    assert!(fs::symlink_metadata(&sock)
        .expect("lstat")
        .file_type()
        .is_socket());
    assert_eq!(names(dir.path()), ["s.sock"]);
}

#[test]
fn fifo_is_written_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("out");
    mkfifo(&fifo);
    assert_eq!(check_target(&fifo).expect("check"), TargetKind::Fifo);

    // A reader in another thread; the write may race its open, so retry "no reader" for a while.
    let reader_path = fifo.clone();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        fs::File::open(&reader_path)
            .expect("open for reading")
            .read_to_end(&mut got)
            .expect("read");
        got
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match write_file(&fifo, b"token\n", 0o600) {
            Ok(()) => break,
            Err(OutFileError::NoReader { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("write to FIFO: {e}"),
        }
    }
    assert_eq!(reader.join().expect("reader"), b"token\n");
    let meta = fs::symlink_metadata(&fifo).expect("lstat");
    assert!(meta.file_type().is_fifo(), "the FIFO was replaced");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(names(dir.path()), ["out"]);
}

#[test]
fn fifo_without_reader_fails_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("out");
    mkfifo(&fifo);
    let started = Instant::now();
    match write_file(&fifo, b"x", 0o600) {
        Err(OutFileError::NoReader { path }) => assert_eq!(path, fifo),
        other => panic!("expected NoReader, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(fs::symlink_metadata(&fifo)
        .expect("lstat")
        .file_type()
        .is_fifo());
    assert_eq!(names(dir.path()), ["out"]);
}

#[test]
fn dev_null_stays_a_character_device() {
    let null = Path::new("/dev/null");
    assert_eq!(check_target(null).expect("check"), TargetKind::CharDevice);
    if !is_root() {
        eprintln!("note: not root; writing to /dev/null cannot replace it anyway, skipped");
        return;
    }
    let before = fs::metadata(null).expect("stat");
    write_file(null, b"secret", 0o600).expect("write");
    drop(open_append(null, 0o600).expect("append"));
    let after = fs::symlink_metadata(null).expect("lstat");
    assert!(after.file_type().is_char_device(), "/dev/null was replaced");
    assert_eq!(
        before.permissions().mode(),
        after.permissions().mode(),
        "/dev/null was chmod'ed"
    );
}

#[test]
fn nothing_is_left_behind_on_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A missing directory: the temporary file cannot even be made.
    let p = dir.path().join("missing").join("f");
    match write_file(&p, b"x", 0o600) {
        Err(OutFileError::Io { path, .. }) => assert_eq!(path, p),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert!(check_target(&p).is_err());
    assert!(names(dir.path()).is_empty());

    // A directory we may not write to (root may, so only as another user).
    if !is_root() {
        let ro = dir.path().join("ro");
        fs::create_dir(&ro).expect("mkdir");
        fs::write(ro.join("f"), b"old").expect("write");
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o500)).expect("chmod");
        assert!(check_target(&ro.join("f")).is_err());
        assert!(write_file(&ro.join("f"), b"new", 0o600).is_err());
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o700)).expect("chmod");
        assert_eq!(names(&ro), ["f"]);
        assert_eq!(fs::read(ro.join("f")).expect("read"), b"old");
    }
}

#[test]
fn append_creates_private_and_narrows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("events.jsonl");
    {
        use std::io::Write;
        let mut f = open_append(&log, 0o600).expect("open");
        f.write_all(b"one\n").expect("write");
        let mut f = open_append(&log, 0o600).expect("reopen");
        f.write_all(b"two\n").expect("write");
    }
    assert_eq!(fs::read(&log).expect("read"), b"one\ntwo\n");
    assert_eq!(mode(&log), 0o600);

    // A log made by an older version at 0644 is narrowed, not widened back.
    fs::set_permissions(&log, fs::Permissions::from_mode(0o644)).expect("chmod");
    drop(open_append(&log, 0o600).expect("open"));
    assert_eq!(mode(&log), 0o600);
    fs::set_permissions(&log, fs::Permissions::from_mode(0o400)).expect("chmod");
    if is_root() {
        drop(open_append(&log, 0o600).expect("open"));
        assert_eq!(mode(&log), 0o400);
    }
    assert_eq!(names(dir.path()), ["events.jsonl"]);
}

#[test]
fn check_target_kinds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("f");
    assert_eq!(check_target(&p).expect("missing"), TargetKind::Missing);
    fs::write(&p, b"").expect("write");
    assert_eq!(check_target(&p).expect("regular"), TargetKind::Regular);
    // A bare file name resolves against the working directory.
    assert!(check_target(Path::new("umbra-outfile-test-nonexistent")).is_ok());
}

#[test]
fn databases_are_private_before_sqlite_sees_them() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("x.db");
    umbra_pki::private_database(&db).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&db), 0o600);
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0);
    // Left wide by an earlier version: the database and its companions are narrowed, the
    // content kept.
    std::fs::write(&db, b"data").unwrap();
    let wal = dir.path().join("x.db-wal");
    let shm = dir.path().join("x.db-shm");
    for p in [&db, &wal, &shm] {
        std::fs::write(p, b"data").unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    umbra_pki::private_database(&db).unwrap();
    for p in [&db, &wal, &shm] {
        assert_eq!(mode(p), 0o600, "{}", p.display());
        assert_eq!(std::fs::read(p).unwrap(), b"data");
    }
    // A device or a directory is refused, untouched.
    assert!(umbra_pki::private_database(std::path::Path::new("/dev/null")).is_err());
    assert!(umbra_pki::private_database(dir.path()).is_err());
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
}
