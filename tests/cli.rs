//! The `umbra` binary, as an operator uses it, against a real controller.

use std::os::unix::fs::PermissionsExt;

use umbra_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_workflow_through_the_cli() {
    let t = TestController::start().await;
    let token_path = t.path("agent-1.jwt");
    let tp = token_path.to_str().unwrap();

    let o = t.umbra(&[
        "identity",
        "create",
        "agent-1",
        "--role",
        "analysts,ops",
        "-o",
        tp,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let id_path = t.path("agent-1.json");
    let o = t.umbra(&["enroll", tp, "-o", id_path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("spiffe://test.umbra/agent/agent-1"),
        "{}",
        stdout(&o)
    );
    assert_eq!(
        std::fs::metadata(&id_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The token works once.
    let o = t.umbra(&["enroll", tp, "-o", t.path("again.json").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already used"), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).trim().lines().count(),
        1,
        "one-line error: {}",
        stderr(&o)
    );

    let o = t.umbra(&[
        "service",
        "create",
        "llm",
        "--address",
        "127.0.0.1:8080",
        "--intercept",
        "llm.umbra:443",
        "--role",
        "ai",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = t.umbra(&[
        "policy",
        "grant",
        "--identity",
        "#analysts",
        "--service",
        "@llm",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let policy = stdout(&o).trim().to_owned();
    assert_eq!(policy, "dial-analysts-llm");

    // Grant limits parse once, on the command line as in YAML, and print on one line.
    let limited = |rpm: &str| {
        t.umbra(&[
            "policy",
            "grant",
            "--name",
            "limited",
            "--identity",
            "@agent-1",
            "--service",
            "@llm",
            "--models",
            "gpt-4o-mini",
            "--tokens",
            "1000/day",
            "--rpm",
            rpm,
        ])
    };
    for bad in ["0", "1000001", "x"] {
        let o = limited(bad);
        assert_eq!(o.status.code(), Some(2), "--rpm {bad}");
        assert!(
            stderr(&o).contains("rpm must be between 1 and 1000000"),
            "{}",
            stderr(&o)
        );
    }
    let o = limited("60");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = t.umbra(&["policy", "list"]);
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("limited")
                && l.contains("models=gpt-4o-mini tokens=1000/day rpm=60")),
        "{}",
        stdout(&o)
    );
    let o = t.umbra(&["policy", "revoke", "limited"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let o = t.umbra(&[
        "policy",
        "explain",
        "--identity",
        "agent-1",
        "--service",
        "llm",
    ]);
    assert!(stdout(&o).starts_with("allowed"), "{}", stdout(&o));
    assert!(stdout(&o).contains(&policy));

    let o = t.umbra(&["identity", "list"]);
    let out = stdout(&o);
    assert!(out.lines().next().unwrap().starts_with("NAME"), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("agent-1")
            && l.contains("enrolled")
            && l.contains("analysts,ops")),
        "{out}"
    );
    let o = t.umbra(&["identity", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v.as_array().unwrap().len(), 2);

    // The agent renews its own certificate with the CLI.
    let o = t.umbra(&["identity", "renew", "--identity", id_path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));

    let o = t.umbra(&["policy", "revoke", &policy]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = t.umbra(&[
        "policy",
        "explain",
        "--identity",
        "agent-1",
        "--service",
        "llm",
    ]);
    assert!(stdout(&o).starts_with("denied"), "{}", stdout(&o));

    let o = t.umbra(&["identity", "revoke", "agent-1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = t.umbra(&["identity", "show", "agent-1"]);
    assert!(stdout(&o).contains("revoked:  true"), "{}", stdout(&o));

    let o = t.umbra(&["export"]);
    assert!(stdout(&o).contains("llm.umbra:443"), "{}", stdout(&o));
    let o = t.umbra(&["audit"]);
    assert!(stdout(&o).contains("identity.revoke"), "{}", stdout(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_messages() {
    let t = TestController::start().await;
    // Usage errors exit 2.
    let o = t.umbra(&["identity", "frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    let o = t.umbra(&["service", "create", "x"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "--address or --hosted is required"
    );
    // User errors exit 1 with one line.
    for args in [
        vec!["identity", "show", "nobody"],
        vec!["identity", "create", "Bad_Name"],
        vec!["policy", "grant", "--identity", "agent", "--service", "@x"],
        vec!["service", "create", "x", "--address", "no-port"],
        vec!["identity", "create", "x", "--token-ttl", "5w"],
    ] {
        let o = t.umbra(&args);
        assert_ne!(o.status.code(), Some(0), "{args:?}");
        let err = stderr(&o);
        assert!(
            err.starts_with("error: ") || o.status.code() == Some(2),
            "{args:?}: {err}"
        );
        assert!(err.trim().lines().count() <= 3, "{args:?}: {err}");
    }
    let o = t.umbra(&["identity", "show", "nobody"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no identity named nobody"),
        "{}",
        stderr(&o)
    );
    // A missing admin file is a clear error.
    let o = umbra_cmd(
        &["identity", "list"],
        &[("UMBRA_ADMIN", t.path("missing.json").as_os_str())],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("missing.json"), "{}", stderr(&o));
}

#[test]
fn init_refuses_an_initialized_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("c");
    let o = umbra_cmd(&["controller", "init", "--dir", d.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    for key in ["root.key", "intermediate.key", "token.key", "admin.json"] {
        let mode = std::fs::metadata(d.join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let o = umbra_cmd(&["controller", "init", "--dir", d.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already initialized"), "{}", stderr(&o));
    let o = umbra_cmd(
        &[
            "controller",
            "init",
            "--dir",
            dir.path().join("e").to_str().unwrap(),
            "--trust-domain",
            "Not Valid",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_identity_file_is_a_clear_error() {
    let t = TestController::start().await;
    let bad = t.path("bad.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.admin_path()).unwrap()).unwrap();
    v["cert_pem"] = serde_json::Value::String(
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
    );
    std::fs::write(&bad, v.to_string()).unwrap();
    for file in [&bad, &t.path("nothing.json")] {
        let o = umbra_cmd(
            &["identity", "list"],
            &[
                ("UMBRA_ADMIN", file.as_os_str()),
                ("UMBRA_CONTROLLER", t.addr().as_ref()),
            ],
        );
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).starts_with("error: "), "{}", stderr(&o));
        assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    }
    std::fs::write(&bad, "{not json").unwrap();
    let o = umbra_cmd(&["identity", "list"], &[("UMBRA_ADMIN", bad.as_os_str())]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

/// README's main command: `umbra quickstart` initializes on first use and serves; an operator
/// can then manage it with the admin file it wrote.
#[test]
fn quickstart_initializes_and_serves() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("q");
    let mut child = std::process::Command::new(umbra_bin())
        .args([
            "quickstart",
            "--dir",
            d.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .env("UMBRA_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addr = None;
    let mut seen = Vec::new();
    for line in lines.by_ref().take(30) {
        let line = line.unwrap();
        if let Some(a) = line.strip_prefix("controller listening on ") {
            addr = Some(a.trim().to_owned());
            break;
        }
        seen.push(line);
    }
    let addr = addr.unwrap_or_else(|| panic!("no listening line in {seen:?}"));
    assert!(seen.iter().any(|l| l.contains("initialized")), "{seen:?}");
    let admin = d.join("admin.json");
    let o = umbra_cmd(&["identity", "list"], &[("UMBRA_ADMIN", admin.as_os_str())]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("admin"), "{}", stdout(&o));
    // The database (identities, policies, audit) and SQLite's files beside it are private,
    // whatever the umask (the test's is the usual 022).
    for f in ["umbra.db", "umbra.db-wal", "umbra.db-shm"] {
        let m = std::fs::metadata(d.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f}");
    }
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "a clean shutdown on SIGTERM: {status:?}");
    let _ = addr;
}

/// A `umbra controller run` process on a free loopback port, and the address it serves.
fn run_controller(dir: &std::path::Path, store: &str) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(umbra_bin())
        .args(["controller", "run", "--dir", dir.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0"])
        .env("UMBRA_STORE", store)
        .env("UMBRA_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.take(10) {
        if let Some(a) = line.unwrap().strip_prefix("controller listening on ") {
            return (child, a.trim().to_owned());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the controller in {} did not start", dir.display());
}

fn stop(mut child: std::process::Child) {
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "a clean shutdown on SIGTERM: {status:?}");
}

/// Controllers on PostgreSQL: `init --store` once, `join` a second directory, and a controller
/// run from either directory serves the same state; a directory with another CA is refused.
#[test]
fn controllers_on_postgres_share_state_through_join() {
    let url = umbra_tests::pg::PgServer::shared().database();
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let o = umbra_cmd(
        &["controller", "init", "--dir", &s(&a), "--store", &url],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("--store URL"), "{}", stdout(&o));
    assert!(!a.join("umbra.db").exists(), "the state went to PostgreSQL");
    let o = umbra_cmd(
        &[
            "controller",
            "join",
            "--dir",
            &s(&b),
            "--from",
            &s(&a),
            "--store",
            &url,
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    let admin = a.join("admin.json");
    let (first, _) = run_controller(&a, &url);
    let o = umbra_cmd(
        &[
            "identity",
            "create",
            "agent-1",
            "-o",
            &s(&dir.path().join("t.jwt")),
        ],
        &[("UMBRA_ADMIN", admin.as_os_str())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    stop(first);

    let (second, addr) = run_controller(&b, &url);
    let o = umbra_cmd(
        &["identity", "list"],
        &[
            ("UMBRA_ADMIN", admin.as_os_str()),
            ("UMBRA_CONTROLLER", addr.as_ref()),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("agent-1"), "{}", stdout(&o));
    stop(second);

    let o = umbra_cmd(&["controller", "init", "--dir", &s(&c)], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = umbra_cmd(
        &[
            "controller",
            "run",
            "--dir",
            &s(&c),
            "--listen",
            "127.0.0.1:0",
        ],
        &[("UMBRA_STORE", url.as_ref())],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("CA"), "{}", stderr(&o));
    let o = umbra_cmd(
        &["controller", "run", "--dir", &s(&c), "--store", "mysql://x"],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("invalid --store"), "{}", stderr(&o));
}

/// `umbra demo` plays enroll, grant, dial, deny and revoke on real components and checks each.
#[test]
fn the_demo_runs_its_whole_story() {
    let o = umbra_cmd(&["demo"], &[]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    for needle in [
        "echoed \"hello, overlay\"",
        "refused identically",
        "access revoked",
        "demo complete",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_never_lands_in_a_readable_file() {
    let t = TestController::start().await;
    let path = t.path("agent.jwt");
    std::fs::write(&path, "old").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = t.umbra(&[
        "identity",
        "create",
        "agent-1",
        "-o",
        path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(std::fs::read_to_string(&path).unwrap().starts_with("eyJ"));
}

/// Whether this test runs as root: only root could replace `/dev/null`, so only root can show
/// that it is not replaced.
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().metadata().unwrap().uid() == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_to_dev_null_leaves_it_a_device() {
    use std::os::unix::fs::FileTypeExt;
    if !running_as_root() {
        eprintln!("note: not root; skipped (only root could replace /dev/null)");
        return;
    }
    let t = TestController::start().await;
    let before = std::fs::metadata("/dev/null").unwrap();
    let o = t.umbra(&["identity", "create", "agent-null", "-o", "/dev/null"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let after = std::fs::symlink_metadata("/dev/null").unwrap();
    assert!(
        after.file_type().is_char_device(),
        "/dev/null is no longer a character device"
    );
    assert_eq!(before.permissions().mode(), after.permissions().mode());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_to_a_directory_fails_before_anything_is_created() {
    let t = TestController::start().await;
    let dir = t.path("outdir");
    std::fs::create_dir(&dir).unwrap();
    let d = dir.to_str().unwrap();

    let o = t.umbra(&["identity", "create", "agent-dir", "-o", d]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("is a directory"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    let o = t.umbra(&["identity", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).contains("agent-dir"), "{}", stdout(&o));

    // Same for a router, and for `enroll`: the one-time token is not spent on a bad -o.
    let o = t.umbra(&["router", "create", "router-dir", "-o", d]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let o = t.umbra(&["router", "list"]);
    assert!(!stdout(&o).contains("router-dir"), "{}", stdout(&o));

    let tp = t.path("agent-2.jwt");
    let tp = tp.to_str().unwrap();
    let o = t.umbra(&["identity", "create", "agent-2", "-o", tp]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = t.umbra(&["enroll", tp, "-o", d]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("is a directory"), "{}", stderr(&o));
    let id = t.path("agent-2.json");
    let o = t.umbra(&["enroll", tp, "-o", id.to_str().unwrap()]);
    assert!(o.status.success(), "token was spent: {}", stderr(&o));
}

/// Logs written anywhere but a terminal carry no escape codes, and `--log-format json` writes
/// one JSON object per log line (for log shippers).
#[test]
fn logs_are_plain_off_a_terminal_and_json_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    // An identity file others can read draws a warning before it is refused.
    let id = dir.path().join("id.json");
    std::fs::write(&id, "{}").unwrap();
    std::fs::set_permissions(&id, std::fs::Permissions::from_mode(0o644)).unwrap();
    let warn = std::ffi::OsStr::new("warn");
    let args = ["run", "--identity", id.to_str().unwrap(), "--", "true"];
    let o = umbra_cmd(&args, &[("UMBRA_LOG", warn)]);
    let text = stderr(&o);
    assert!(text.contains("WARN"), "{text}");
    assert!(!text.contains('\x1b'), "escape codes in a pipe: {text:?}");

    let mut json_args = vec!["--log-format", "json"];
    json_args.extend_from_slice(&args);
    let o = umbra_cmd(&json_args, &[("UMBRA_LOG", warn)]);
    let text = stderr(&o);
    let logged: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(
        logged
            .iter()
            .any(|l| l["level"] == "WARN" && l["fields"]["message"].is_string()),
        "{text}"
    );
    let o = umbra_cmd(
        &args,
        &[
            ("UMBRA_LOG", warn),
            ("UMBRA_LOG_FORMAT", std::ffi::OsStr::new("json")),
        ],
    );
    assert!(
        stderr(&o).lines().any(|l| l.starts_with('{')),
        "{}",
        stderr(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_apply_round_trips_a_revoked_identity_named_by_a_policy() {
    let t = TestController::start().await;
    for args in [
        vec!["identity", "create", "a1", "--role", "analysts"],
        vec!["identity", "create", "a2"],
        vec![
            "service",
            "create",
            "llm",
            "--address",
            "127.0.0.1:8080",
            "--intercept",
            "llm.umbra:443",
            "--role",
            "ai",
        ],
        vec!["policy", "grant", "--identity", "@a2", "--service", "@llm"],
        vec![
            "policy",
            "grant",
            "--identity",
            "#analysts",
            "--service",
            "#ai",
        ],
        vec!["identity", "revoke", "a2"],
    ] {
        let o = t.umbra(&args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    let o = t.umbra(&["export"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let first = stdout(&o);
    assert!(first.contains("revoked: true"), "{first}");
    let file = t.path("exported.yaml");
    std::fs::write(&file, &first).unwrap();

    // Before, this failed with "@a2: there is no identity named a2".
    let o = t.umbra(&["apply", "-f", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "no changes");
    let o = t.umbra(&["export"]);
    assert_eq!(stdout(&o), first, "a second export is identical");
    assert!(t.ctrl.state().identity_by_name("a2").unwrap().revoked);
}

/// `apply` sends the document as it is, so one larger than the 16 MiB a JSON request may be
/// goes through; a dry run changes nothing; a plan of more than a thousand changes is shown in
/// part, with the rest counted, so the answer stays small whatever the document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_takes_a_document_larger_than_a_json_request_and_shows_a_long_plan_in_part() {
    let t = TestController::start().await;
    // The admin applying it is in it: a document may not delete its applier.
    let mut doc = String::from("identities:\n  - {name: admin, kind: admin}\n");
    for i in 0..1200 {
        doc.push_str(&format!("  - {{name: bulk-{i:04}, roles: [r{}]}}\n", i % 7));
    }
    doc.push_str("services:\n  - {name: llm, address: \"127.0.0.1:8080\", roles: [ai]}\n");
    doc.push_str("policies:\n  - {name: all-llm, identities: [\"#r1\"], services: [\"#ai\"]}\n");
    // Comments take the document past the JSON request bound without costing the parser much.
    let pad = format!("# {}\n", "x".repeat(1021));
    while doc.len() <= umbra_proto::api::MAX_REQUEST_BODY + 1024 * 1024 {
        doc.push_str(&pad);
    }
    let file = t.path("bulk.yaml");
    std::fs::write(&file, &doc).unwrap();

    let o = t.umbra(&["apply", "--dry-run", "-f", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("dry run: 1202 change(s) not applied"),
        "{}",
        stdout(&o)
    );
    assert!(t.ctrl.state().identity_by_name("bulk-0000").is_none());

    let o = t.umbra(&["apply", "-f", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1002, "{}", &out[..out.len().min(2000)]);
    assert_eq!(
        lines[1000],
        "... and 202 more change(s): 200 to identities, 1 to services, 1 to policies"
    );
    assert_eq!(lines[1001], "applied 1202 change(s)");
    let state = t.ctrl.state();
    assert_eq!(
        (state.identities.values())
            .filter(|i| i.name.as_str().starts_with("bulk-"))
            .count(),
        1200
    );
    // The same document again is no change.
    let o = t.umbra(&["apply", "-f", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "no changes");
}

/// A controller on PostgreSQL killed (SIGKILL) in the middle of writes: every write it
/// acknowledged is there after a restart, and a command of thousands of changes (an apply) is
/// there whole or not at all, never in part.
#[test]
fn a_controller_killed_mid_write_loses_no_acknowledged_write_and_no_command_is_half_written() {
    let url = umbra_tests::pg::PgServer::shared().database();
    let dir = tempfile::tempdir().unwrap();
    let ctrl = dir.path().join("ctrl");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let o = umbra_cmd(
        &["controller", "init", "--dir", &s(&ctrl), "--store", &url],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let admin = ctrl.join("admin.json");
    let cli = |addr: &str, args: &[&str]| {
        umbra_cmd(
            args,
            &[
                ("UMBRA_ADMIN", admin.as_os_str()),
                ("UMBRA_CONTROLLER", addr.as_ref()),
            ],
        )
    };
    let count = |addr: &str, prefix: &str| {
        let o = cli(addr, &["export"]);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
            .lines()
            .filter(|l| l.contains(&format!("name: {prefix}")))
            .count()
    };

    // Single writes, one after another, until the controller dies under them.
    let (mut child, addr) = run_controller(&ctrl, &url);
    let writer = {
        let (addr, admin) = (addr.clone(), admin.clone());
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            for k in 0..2_000 {
                let name = format!("svc-{k:04}");
                let o = umbra_cmd(
                    &["service", "create", &name, "--address", "127.0.0.1:9"],
                    &[
                        ("UMBRA_ADMIN", admin.as_os_str()),
                        ("UMBRA_CONTROLLER", addr.as_ref()),
                    ],
                );
                if !o.status.success() {
                    break;
                }
                acked.push(name);
            }
            acked
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    child.kill().unwrap();
    child.wait().unwrap();
    let acked = writer.join().unwrap();
    assert!(
        !acked.is_empty(),
        "no write was acknowledged before the kill"
    );
    let (child, addr) = run_controller(&ctrl, &url);
    let kept = count(&addr, "svc-");
    assert!(
        kept == acked.len() || kept == acked.len() + 1,
        "{} writes acknowledged, {kept} kept (at most the one in flight may be extra)",
        acked.len()
    );
    stop(child);

    // Large commands killed at different moments: whole or nothing.
    const N: usize = 2_000;
    let mut seen = (0, 0);
    for (round, delay_ms) in [50u64, 400, 800, 1000, 1200, 2500].into_iter().enumerate() {
        let doc = dir.path().join(format!("round-{round}.yaml"));
        let mut text = String::from("identities:\n  - {name: admin, kind: admin}\n");
        for i in 0..N {
            text.push_str(&format!("  - {{name: r{round}-{i:05}}}\n"));
        }
        std::fs::write(&doc, text).unwrap();
        let (mut child, addr) = run_controller(&ctrl, &url);
        let mut apply = std::process::Command::new(umbra_bin())
            .args(["apply", "-f", &s(&doc)])
            .env("UMBRA_ADMIN", &admin)
            .env("UMBRA_CONTROLLER", &addr)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        let acked = apply.wait().unwrap().success();
        let (child, addr) = run_controller(&ctrl, &url);
        let n = count(&addr, &format!("r{round}-"));
        assert!(
            n == 0 || n == N,
            "round {round} (killed after {delay_ms} ms): {n} of {N} identities written"
        );
        if acked {
            assert_eq!(n, N, "round {round}: an acknowledged apply was lost");
        }
        if n == N {
            seen.1 += 1;
        } else {
            seen.0 += 1;
        }
        stop(child);
    }
    println!(
        "applies killed: {} lost whole, {} kept whole",
        seen.0, seen.1
    );
}
