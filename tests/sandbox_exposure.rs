//! What `umbra run` agrees to show an agent, and the powers the agent holds over what it is
//! shown: shared and system locations and key material are refused as workspaces, hidden paths
//! stay hidden across renames and runs, device nodes are checked, and an agent started by root
//! holds no more than an unprivileged user's power over host files. Each runs both as root and
//! as an unprivileged user (setpriv), with the real binary, controller and router.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use umbra_tests::dataplane::*;
use umbra_tests::*;

/// A controller, a router and an identity `agent-1`, plus a launcher's home: a copy of the
/// binary and of the identity that root and `nobody` can both use.
struct World {
    t: TestController,
    _router: umbra_edge_router::RouterHandle,
    home: tempfile::TempDir,
}

#[derive(Clone, Copy, Debug)]
enum As {
    Root,
    Nobody,
}

const NOBODY: u32 = 65534;

async fn world() -> World {
    world_with(|_| {}).await
}

async fn world_with(tweak: impl FnOnce(&mut umbra_controller::ControllerConfig)) -> World {
    let t = TestController::start_with(tweak).await;
    let router = start_router(&t, "router-1", |_| {}).await;
    let file = agent(&t, "agent-1").await;
    let home = tempfile::Builder::new()
        .prefix("umbra-home-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = home.path().join("umbra");
    std::fs::copy(umbra_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ids = home.path().join("ids");
    std::fs::create_dir(&ids).unwrap();
    file.save(ids.join("agent-1.json")).unwrap();
    World {
        t,
        _router: router,
        home,
    }
}

impl World {
    /// A private directory for `who`, owned by it.
    fn dir(&self, who: As, name: &str) -> PathBuf {
        let d = self.home.path().join(format!("{who:?}-{name}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        self.own(who, &d);
        d
    }

    fn own(&self, who: As, p: &Path) {
        if let As::Nobody = who {
            let ok = std::process::Command::new("chown")
                .args(["-R", &format!("{NOBODY}:{NOBODY}")])
                .arg(p)
                .status()
                .unwrap();
            assert!(ok.success());
        }
    }

    /// The identity file `who` may read.
    fn identity(&self, who: As) -> PathBuf {
        let d = self.dir(who, "identity");
        let p = d.join("agent-1.json");
        std::fs::copy(self.home.path().join("ids/agent-1.json"), &p).unwrap();
        self.own(who, &p);
        p
    }

    fn umbra(&self, who: As, args: &[&str]) -> tokio::process::Command {
        let bin = self.home.path().join("umbra");
        let mut c = match who {
            As::Root => tokio::process::Command::new(&bin),
            As::Nobody => {
                let mut c = tokio::process::Command::new("setpriv");
                c.arg(format!("--reuid={NOBODY}"))
                    .arg(format!("--regid={NOBODY}"))
                    .arg("--clear-groups")
                    .arg(&bin);
                c
            }
        };
        c.args(args)
            .env("UMBRA_CONTROLLER", self.t.addr())
            .env("UMBRA_LOG", "error")
            .env("HOME", self.home.path())
            .current_dir(self.home.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    async fn run(&self, who: As, ws: &Path, extra: &[&str], script: &str) -> std::process::Output {
        let identity = self.identity(who);
        let mut args = vec![
            "run",
            "--identity",
            identity.to_str().unwrap(),
            "--workspace",
            ws.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "/bin/sh", "-c", script]);
        tokio::time::timeout(Duration::from_secs(60), self.umbra(who, &args).output())
            .await
            .expect("umbra run ends")
            .expect("umbra run starts")
    }
}

/// `umbra run` with `identity`, `ws` and a shell script.
fn run_args<'a>(identity: &'a Path, ws: &'a Path, script: &'a str) -> [&'a str; 9] {
    [
        "run",
        "--identity",
        identity.to_str().unwrap(),
        "--workspace",
        ws.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        script,
    ]
}

fn one_line_125(o: &std::process::Output, what: &str) {
    assert_eq!(o.status.code(), Some(125), "{what}: {}", stderr(o));
    assert_eq!(stderr(o).trim().lines().count(), 1, "{what}: {}", stderr(o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_and_system_locations_are_refused_as_workspaces() {
    let w = world().await;
    for who in [As::Root, As::Nobody] {
        for ws in [
            "/",
            "/tmp",
            "/run",
            "/var",
            "/var/tmp",
            "/opt",
            "/srv",
            "/mnt",
            "/boot",
            "/home",
            "/work",
            "/etc",
            "/usr",
            "/usr/local",
            "/dev/shm",
            "/root",
            "/proc",
        ] {
            if !Path::new(ws).is_dir() {
                continue;
            }
            let o = w.run(who, Path::new(ws), &[], "touch umbra-escaped").await;
            one_line_125(&o, &format!("{who:?} {ws}"));
            assert!(!Path::new(ws).join("umbra-escaped").exists(), "{ws}");
        }
        // A world-writable directory is shared too, whoever made it.
        let open = w.dir(who, "open");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let o = w.run(who, &open, &[], "touch ran").await;
        one_line_125(&o, &format!("{who:?} world-writable"));
        assert!(!open.join("ran").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspaces_holding_key_material_are_refused() {
    let w = world().await;
    let cases: &[(&str, &[u8])] = &[
        (".umbra/umbra.db", b""),
        ("routers/r1/umbra.db", b""),
        ("keys/root.key", b"k"),
        (
            "deep/a/b/c/admin.json",
            b"{\"key_pem\":\"-----BEGIN PRIVATE KEY-----\"}",
        ),
        ("agent-2.jwt", b"eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln"),
        (".ssh/id_ed25519", b"-----BEGIN OPENSSH PRIVATE KEY-----"),
    ];
    for who in [As::Root, As::Nobody] {
        for (rel, body) in cases {
            let ws = w.dir(who, &format!("ws-{}", rel.replace('/', "_")));
            let p = ws.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, body).unwrap();
            w.own(who, &ws);
            let o = w.run(who, &ws, &[], "touch ran").await;
            one_line_125(&o, &format!("{who:?} {rel}"));
            let first = rel.split('/').next().unwrap();
            assert!(stderr(&o).contains(first), "{who:?} {rel}: {}", stderr(&o));
            assert!(!ws.join("ran").exists(), "{who:?} {rel}: the agent ran");
        }
        // As a read-only path too.
        let ws = w.dir(who, "clean-ws");
        let ro = w.dir(who, "ro-with-key");
        std::fs::write(ro.join("service.key"), "k").unwrap();
        w.own(who, &ro);
        let o = w
            .run(who, &ws, &["--ro", ro.to_str().unwrap()], "touch ran")
            .await;
        one_line_125(&o, &format!("{who:?} --ro"));
        // A clean workspace runs.
        let o = w.run(who, &ws, &[], "touch ran").await;
        assert_eq!(o.status.code(), Some(0), "{who:?}: {}", stderr(&o));
        assert!(ws.join("ran").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_paths_must_exist_and_stay_hidden_across_renames_and_runs() {
    let w = world().await;
    for who in [As::Root, As::Nobody] {
        let ws = w.dir(who, "hide-ws");
        let cfg = ws.join("config/private");
        std::fs::create_dir_all(&cfg).unwrap();
        std::fs::write(cfg.join("secret.txt"), "the hidden text").unwrap();
        w.own(who, &ws);
        // A hidden path that does not exist is an error, not a silent no-op.
        let o = w
            .run(
                who,
                &ws,
                &["--hide", ws.join("nothing-here").to_str().unwrap()],
                "touch ran",
            )
            .await;
        one_line_125(&o, &format!("{who:?} missing --hide"));
        assert!(!ws.join("ran").exists());
        // Run 1 tries to carry it out by renaming it or its parent, and to read it.
        let hide = cfg.to_str().unwrap();
        let o = w
            .run(
                who,
                &ws,
                &["--hide", hide],
                "mv config/private config/moved 2>>log; mv config conf2 2>>log; \
                 rm -rf config/private 2>>log; \
                 cat config/private/secret.txt conf2/private/secret.txt config/moved/secret.txt > seen 2>&1; \
                 true",
            )
            .await;
        assert_eq!(o.status.code(), Some(0), "{who:?}: {}", stderr(&o));
        let seen = std::fs::read_to_string(ws.join("seen")).unwrap();
        assert!(!seen.contains("hidden text"), "{who:?} run 1: {seen}");
        assert!(
            cfg.join("secret.txt").exists(),
            "{who:?}: the hidden directory was moved or removed: {}",
            std::fs::read_to_string(ws.join("log")).unwrap_or_default()
        );
        // Run 2 looks again, wherever it might have gone.
        let o = w
            .run(
                who,
                &ws,
                &["--hide", hide],
                "cat config/private/secret.txt conf2/private/secret.txt config/moved/secret.txt > seen2 2>&1; \
                 grep -r 'hidden text' . >> seen2 2>&1; true",
            )
            .await;
        assert_eq!(o.status.code(), Some(0), "{who:?}: {}", stderr(&o));
        let seen = std::fs::read_to_string(ws.join("seen2")).unwrap();
        assert!(!seen.contains("hidden text"), "{who:?} run 2: {seen}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_by_root_holds_no_root_power_over_host_files() {
    let w = world().await;
    let ws = w.dir(As::Root, "root-ws");
    let script = r#"
        awk '{print $2}' /proc/self/uid_map > host-uid
        cp /bin/sh ./shell 2>/dev/null
        chmod 4755 ./shell 2>>log; chmod g+s ./shell 2>>log
        python3 -c 'import os; os.open("made", os.O_CREAT|os.O_WRONLY, 0o6755)' 2>>log
        ls /etc/ssl/private > ssl 2>&1
        cat /proc/keys /proc/timer_list /proc/kpageflags /proc/sched_debug > proc 2>&1
        head -c 100 /proc/slabinfo >> proc 2>&1
        echo written > mine
        true
    "#;
    let o = w.run(As::Root, &ws, &[], script).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let read = |f: &str| std::fs::read_to_string(ws.join(f)).unwrap_or_default();
    let host_uid: u32 = read("host-uid").trim().parse().unwrap();
    assert_ne!(host_uid, 0, "the agent is root on the host");
    for f in ["shell", "made", "mine"] {
        if let Ok(m) = std::fs::metadata(ws.join(f)) {
            assert_eq!(m.mode() & 0o6000, 0, "{f} has a set-id bit: {:o}", m.mode());
            // What the agent writes stays the invoking user's (the idmapped workspace).
            assert_eq!(m.uid(), 0, "{f} owner");
        }
    }
    assert!(ws.join("mine").exists());
    assert!(
        !read("ssl").contains(".key") && !read("ssl").contains(".pem"),
        "{}",
        read("ssl")
    );
    let proc_text = read("proc");
    for leak in [
        "timer_list",
        "Timer List",
        "slabinfo",
        "sched_debug",
        "cpu#",
    ] {
        assert!(
            !proc_text.contains(leak) || proc_text.contains("No such file"),
            "/proc leaked {leak}: {proc_text}"
        );
    }
    assert!(proc_text.len() < 2000, "/proc leaked: {proc_text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_node_that_is_not_the_device_stops_the_sandbox() {
    // Only root can put a fake /dev/null in a mount namespace of its own.
    let w = world().await;
    let ws = w.dir(As::Root, "dev-ws");
    let fake = w.home.path().join("fake-null");
    std::fs::write(&fake, "what host processes wrote to /dev/null").unwrap();
    let identity = w.identity(As::Root);
    let bin = w.home.path().join("umbra");
    let script = format!(
        "mount --bind {fake} /dev/null && exec {bin} run --identity {id} --workspace {ws} -- /bin/sh -c 'cat /dev/null > seen'",
        fake = fake.display(),
        bin = bin.display(),
        id = identity.display(),
        ws = ws.display()
    );
    let o = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "/bin/sh", "-c", &script])
            .env("UMBRA_CONTROLLER", w.t.addr())
            .env("UMBRA_LOG", "error")
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    one_line_125(&o, "fake /dev/null");
    assert!(stderr(&o).contains("/dev/null"), "{}", stderr(&o));
    assert!(!ws.join("seen").exists(), "the agent ran");
    // The real one is untouched and still a character device.
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_launcher_writes_nothing_where_the_agent_could_redirect_it() {
    let w = world().await;
    for who in [As::Root, As::Nobody] {
        let ws = w.dir(who, "events-ws");
        // An earlier agent left a link where the events file would go.
        let target = w.dir(who, "events-target");
        std::os::unix::fs::symlink(target.join("made-by-launcher"), ws.join("events.jsonl"))
            .unwrap();
        let ev = ws.join("events.jsonl");
        let o = w
            .run(who, &ws, &["--events", ev.to_str().unwrap()], "touch ran")
            .await;
        one_line_125(&o, &format!("{who:?} --events in the workspace"));
        assert!(!target.join("made-by-launcher").exists());
        assert!(!ws.join("ran").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_files_with_other_names_and_hidden_system_paths() {
    let w = world().await;
    for who in [As::Root, As::Nobody] {
        let ws = w.dir(who, "links-ws");
        std::fs::write(ws.join(".env"), "API_TOKEN=hidden").unwrap();
        std::fs::create_dir(ws.join(".cache")).unwrap();
        std::fs::hard_link(ws.join(".env"), ws.join(".cache/blob")).unwrap();
        w.own(who, &ws);
        let env = ws.join(".env");
        let o = w
            .run(
                who,
                &ws,
                &["--hide", env.to_str().unwrap()],
                "cat .cache/blob > seen",
            )
            .await;
        one_line_125(&o, &format!("{who:?} hard-linked hidden file"));
        assert!(stderr(&o).contains("hard link"), "{}", stderr(&o));
        assert!(!ws.join("seen").exists());
        // A hidden path below a system directory is covered too, not ignored.
        let o = w
            .run(
                who,
                &ws,
                &["--hide", "/etc/ssl/certs"],
                "ls -A /etc/ssl/certs > certs 2>&1; true",
            )
            .await;
        assert_eq!(o.status.code(), Some(0), "{who:?}: {}", stderr(&o));
        let listed = std::fs::read_to_string(ws.join("certs")).unwrap();
        assert!(
            !listed.contains(".pem") && !listed.contains(".0"),
            "{who:?}: {listed}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_sandboxes_run_as_ids_no_one_else_holds() {
    let w = world().await;
    let mut uids = std::collections::HashSet::new();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    for i in 0..3 {
        let ws = w.dir(As::Root, &format!("uid-ws-{i}"));
        let o = w
            .run(
                As::Root,
                &ws,
                &[],
                "awk '{print $2}' /proc/self/uid_map > host-uid",
            )
            .await;
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let uid: u32 = std::fs::read_to_string(ws.join("host-uid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_ne!(uid, 0);
        assert_ne!(uid, NOBODY, "nobody's processes could enter the sandbox");
        assert!(
            !passwd
                .lines()
                .any(|l| l.split(':').nth(2) == Some(uid.to_string().as_str())),
            "{uid} belongs to an account"
        );
        uids.insert(uid);
    }
    assert_eq!(uids.len(), 3, "sandboxes share a host uid: {uids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_swapped_for_a_link_after_the_check_is_not_followed() {
    // The launcher opens what it checked, without following links: a path that is a link (or
    // leads through one) by the time it is opened is refused, never mounted. The swap is made
    // by a loop on the host racing many launches; no launch may show the target.
    let w = world().await;
    let secret_dir = w.dir(As::Root, "swap-secret");
    std::fs::write(secret_dir.join("data.txt"), "ROOT-ONLY-SECRET").unwrap();
    let parent = w.dir(As::Root, "swap-parent");
    let real = parent.join("ws");
    let link = parent.join("ws-link");
    std::fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&secret_dir, &link).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (stop, real, link) = (stop.clone(), real.clone(), link.clone());
        std::thread::spawn(move || {
            // Bounded: at most 200,000 exchanges, and never after the launches end.
            for _ in 0..200_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let _ = exchange(&real, &link);
            }
        })
    };
    let mut shown = 0;
    for _ in 0..15 {
        let o = w
            .run(As::Root, &real, &[], "cat data.txt 2>/dev/null; true")
            .await;
        if stdout(&o).contains("ROOT-ONLY-SECRET") {
            shown += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    assert_eq!(shown, 0, "a launch showed the link's target");
}

/// Swaps two names atomically (renameat2 RENAME_EXCHANGE), as an agent could.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let o = std::process::Command::new("python3")
        .arg("-c")
        .arg("import ctypes,os,sys; l=ctypes.CDLL(None,use_errno=True); r=l.renameat2(-100,sys.argv[1].encode(),-100,sys.argv[2].encode(),2); sys.exit(0 if r==0 else 1)")
        .arg(a)
        .arg(b)
        .status()?;
    if o.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("renameat2"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_that_would_carry_a_renewed_key_into_what_is_shown_are_refused() {
    let w = world().await;
    for who in [As::Root, As::Nobody] {
        // An earlier agent planted `.umbra/agent-1.json -> ../.cache/blob` (with an empty blob,
        // so that the link is not dangling) before `.umbra` was hidden: a renewal through the
        // link would write the key into the shown blob.
        let ws = w.dir(who, "hidden-link-ws");
        std::fs::create_dir_all(ws.join(".cache")).unwrap();
        std::fs::create_dir_all(ws.join(".umbra")).unwrap();
        std::fs::write(ws.join(".cache/blob"), "").unwrap();
        std::os::unix::fs::symlink("../.cache/blob", ws.join(".umbra/agent-1.json")).unwrap();
        w.own(who, &ws);
        let hidden = ws.join(".umbra");
        let o = w
            .run(who, &ws, &["--hide", hidden.to_str().unwrap()], "touch ran")
            .await;
        one_line_125(&o, &format!("{who:?} link out of a hidden directory"));
        assert!(stderr(&o).contains(".umbra/agent-1.json"), "{}", stderr(&o));
        assert!(!ws.join("ran").exists());
        // A hidden file that is also a shown one under another name.
        std::fs::remove_file(ws.join(".umbra/agent-1.json")).unwrap();
        std::fs::hard_link(ws.join(".cache/blob"), ws.join(".umbra/token")).unwrap();
        let o = w
            .run(who, &ws, &["--hide", hidden.to_str().unwrap()], "touch ran")
            .await;
        one_line_125(&o, &format!("{who:?} hard link out of a hidden directory"));
        assert!(stderr(&o).contains("hard link"), "{}", stderr(&o));
        std::fs::remove_file(ws.join(".umbra/token")).unwrap();
        // Nothing leads out: it runs.
        let o = w
            .run(who, &ws, &["--hide", hidden.to_str().unwrap()], "touch ran")
            .await;
        assert_eq!(o.status.code(), Some(0), "{who:?}: {}", stderr(&o));

        // An identity file outside the workspace that is a link into it.
        let identity = w.identity(who);
        let blob = ws.join(".cache/id-blob");
        std::fs::copy(&identity, &blob).unwrap();
        w.own(who, &blob);
        let link = identity.with_file_name("linked.json");
        std::os::unix::fs::symlink(&blob, &link).unwrap();
        let args = run_args(&link, &ws, "cat .cache/id-blob");
        let o = w.umbra(who, &args).output().await.unwrap();
        one_line_125(&o, &format!("{who:?} identity linked into the workspace"));
        assert!(!stdout(&o).contains("PRIVATE KEY"));
        std::fs::remove_file(&blob).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_file_reached_through_a_link_is_refused() {
    let w = world().await;
    for who in [As::Root, As::Nobody] {
        let ws = w.dir(who, "events-link-ws");
        let out = w.dir(who, "events-link-out");
        // The events directory is named through a link (an agent that was shown its parent
        // could switch it after the check).
        let link = w.home.path().join(format!("{who:?}-events-link"));
        std::os::unix::fs::symlink(&out, &link).unwrap();
        let ev = link.join("events.jsonl");
        let o = w
            .run(who, &ws, &["--events", ev.to_str().unwrap()], "touch ran")
            .await;
        one_line_125(&o, &format!("{who:?} events through a link"));
        assert!(stderr(&o).contains("symbolic link"), "{}", stderr(&o));
        assert!(!out.join("events.jsonl").exists());
        assert!(!ws.join("ran").exists());
        // Named directly, it is written, private.
        let ev = out.join("events.jsonl");
        let o = w
            .run(who, &ws, &["--events", ev.to_str().unwrap()], "touch ran")
            .await;
        assert_eq!(o.status.code(), Some(0), "{who:?}: {}", stderr(&o));
        let m = std::fs::metadata(&ev).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600);
        assert!(std::fs::read_to_string(&ev).unwrap().contains("exited"));
    }
}

/// The sandbox's state (its hosts file lists the services it may reach) is the sandbox's alone,
/// and a state location squatted by another user in a shared temporary directory does not stop
/// an unprivileged user's sandboxes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_state_is_private_and_cannot_be_squatted() {
    let w = world().await;
    for who in [As::Root, As::Nobody] {
        let ws = w.dir(who, "state-ws");
        let script = "echo \"$UMBRA_SANDBOX\" > id.tmp; cat /etc/hosts > hosts-in; mv id.tmp id; \
                      i=0; while [ ! -e go ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done";
        let identity = w.identity(who);
        let args = run_args(&identity, &ws, script);
        let child = w.umbra(who, &args).spawn().unwrap();
        let id = eventually(Duration::from_secs(30), || {
            std::fs::read_to_string(ws.join("id")).ok()
        })
        .await
        .expect("the agent starts");
        let id = id.trim();
        let base = match who {
            As::Root => PathBuf::from("/run/umbra/sandboxes"),
            As::Nobody => std::env::temp_dir().join(format!("umbra-sandboxes-{NOBODY}")),
        };
        let hosts = base.join(id).join("hosts");
        let m = std::fs::metadata(&hosts).unwrap();
        assert_eq!(m.mode() & 0o007, 0, "{who:?}: hosts is {:o}", m.mode());
        // Another user cannot read it (nobody's own sandbox is nobody's: try a third user).
        let other = match who {
            As::Root => NOBODY,
            As::Nobody => 65533,
        };
        let read = std::process::Command::new("setpriv")
            .arg(format!("--reuid={other}"))
            .arg(format!("--regid={other}"))
            .arg("--clear-groups")
            .arg("cat")
            .arg(&hosts)
            .output()
            .unwrap();
        assert!(
            !read.status.success(),
            "{who:?}: another user read {hosts:?}"
        );
        std::fs::write(ws.join("go"), "").unwrap();
        let o = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{who:?}: {}", stderr(&o));
        assert!(
            std::fs::read_to_string(ws.join("hosts-in"))
                .unwrap()
                .contains("localhost"),
            "{who:?}: the agent reads its hosts file"
        );
    }

    // Another user made nobody's usual state location first: the next one is used.
    let tmp = tempfile::Builder::new()
        .prefix("umbra-tmp-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let squatted = tmp.path().join(format!("umbra-sandboxes-{NOBODY}"));
    std::fs::create_dir(&squatted).unwrap();
    let home = w.dir(As::Nobody, "squat-home");
    let ws = w.dir(As::Nobody, "squat-ws");
    let identity = w.identity(As::Nobody);
    let args = run_args(&identity, &ws, "touch ran");
    let o = w
        .umbra(As::Nobody, &args)
        .env("TMPDIR", tmp.path())
        .env("HOME", &home)
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(ws.join("ran").exists());
    assert_eq!(std::fs::read_dir(&squatted).unwrap().count(), 0);
    assert!(home.join(".cache/umbra/sandboxes").is_dir());
}

/// The launcher renews the identity where its real path was when the run started: an agent that
/// re-aims a link (or a `..`) on the path as given gets neither its own key nor a launcher write
/// outside the identity's directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_go_where_the_identity_really_is_whatever_the_agent_relinks() {
    // 6 s certificates: renewed about 4 s into each run.
    let w = world_with(|c| c.cert_validity = Duration::from_secs(6)).await;
    // The agent watches for a file to appear where it could read it, for at most 12 s.
    let watch = |at: &str| {
        format!(
            "i=0; while [ $i -lt 120 ] && [ ! -s {at} ]; do sleep 0.1; i=$((i+1)); done; \
             cat {at} > seen 2>/dev/null; true"
        )
    };
    // Certificates this short expire between runs: each run starts from the latest renewal.
    let mut latest = w.identity(As::Root);
    let fresh = |who: As, from: &Path| {
        let d = w.dir(who, "renewing-identity");
        let p = d.join("agent-1.json");
        std::fs::copy(from, &p).unwrap();
        w.own(who, &p);
        p
    };
    for who in [As::Root, As::Nobody] {
        // Through a link in the workspace to the identity's own directory, which the agent
        // then points at a directory of its own.
        let identity = fresh(who, &latest);
        let before = std::fs::read(&identity).unwrap();
        let ws = w.dir(who, "relink-ws");
        std::os::unix::fs::symlink(identity.parent().unwrap(), ws.join("link")).unwrap();
        let given = ws.join("link/agent-1.json");
        let script = format!(
            "rm link; mkdir exposed; ln -s exposed link; {}",
            watch("exposed/agent-1.json")
        );
        let args = run_args(&given, &ws, &script);
        let o = tokio::time::timeout(Duration::from_secs(60), w.umbra(who, &args).output())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{who:?}: {}", stderr(&o));
        let seen = std::fs::read_to_string(ws.join("seen")).unwrap_or_default();
        assert!(
            !seen.contains("PRIVATE KEY"),
            "{who:?} read its renewed key"
        );
        assert!(!ws.join("exposed/agent-1.json").exists(), "{who:?}");
        assert_ne!(
            std::fs::read(&identity).unwrap(),
            before,
            "{who:?}: the renewal was saved where the identity is"
        );

        // Through `..` past a directory the agent replaces, into a hidden directory.
        let ws = w.dir(who, "dotdot-ws");
        std::fs::create_dir_all(ws.join(".umbra")).unwrap();
        std::fs::create_dir_all(ws.join("sub")).unwrap();
        let hidden_id = ws.join(".umbra/agent-1.json");
        std::fs::copy(&identity, &hidden_id).unwrap();
        w.own(who, &ws);
        let before = std::fs::read(&hidden_id).unwrap();
        let given = ws.join("sub/../.umbra/agent-1.json");
        let hidden = ws.join(".umbra");
        let script = format!(
            "rmdir sub; mkdir -p x/y x/.umbra; ln -s x/y sub; {}",
            watch("x/.umbra/agent-1.json")
        );
        let mut args = run_args(&given, &ws, &script).to_vec();
        args.splice(5..5, ["--hide", hidden.to_str().unwrap()]);
        let o = tokio::time::timeout(Duration::from_secs(60), w.umbra(who, &args).output())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{who:?}: {}", stderr(&o));
        let seen = std::fs::read_to_string(ws.join("seen")).unwrap_or_default();
        assert!(
            !seen.contains("PRIVATE KEY"),
            "{who:?} read its renewed key"
        );
        assert!(!ws.join("x/.umbra/agent-1.json").exists(), "{who:?}");
        assert_ne!(std::fs::read(&hidden_id).unwrap(), before, "{who:?}");
        latest = hidden_id;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_file_that_is_a_link_is_refused() {
    let w = world().await;
    for who in [As::Root, As::Nobody] {
        let ws = w.dir(who, "events-final-ws");
        let out = w.dir(who, "events-final-out");
        std::os::unix::fs::symlink(ws.join("ev.jsonl"), out.join("ev.jsonl")).unwrap();
        let ev = out.join("ev.jsonl");
        let o = w
            .run(who, &ws, &["--events", ev.to_str().unwrap()], "touch ran")
            .await;
        one_line_125(&o, &format!("{who:?} events file is a link"));
        assert!(!ws.join("ev.jsonl").exists());
        assert!(!ws.join("ran").exists());
    }
}
