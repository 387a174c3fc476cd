//! The Docker harness itself (`umbra_tests::docker`): the PostgreSQL image starts and accepts
//! connections across a test network, and a test that panics leaves no container or network
//! behind. Needs a Docker engine (`UMBRA_DOCKER_TESTS=skip` skips it).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use umbra_tests::docker::{self, RunSpec, TestNet, PG_BIN, PG_PORT, UMBRA_IN_IMAGE};

fn must<T>(r: docker::Result<T>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Whether a network of this name exists.
fn network_exists(name: &str) -> bool {
    std::process::Command::new("docker")
        .args(["network", "inspect", name])
        .output()
        .expect("run docker")
        .status
        .success()
}

/// The containers labelled with this scope.
fn containers_of(scope: &str) -> String {
    let o = std::process::Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label={}={scope}", docker::LABEL_SCOPE),
            "--format",
            "{{.Names}}",
        ])
        .output()
        .expect("run docker");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_image_accepts_connections_across_a_test_network() {
    if docker::skip_requested() {
        eprintln!("UMBRA_DOCKER_TESTS=skip: skipped");
        return;
    }
    let start = Instant::now();
    let (pg, client_out, net) = tokio::task::block_in_place(|| {
        let image = must(docker::postgres_image(), "the postgres image");
        let net = must(TestNet::create("postgres"), "a test network");
        let started = Instant::now();
        let pg = must(
            net.postgres("pg", 10, Duration::from_secs(60)),
            "postgres starts",
        );
        println!(
            "postgres accepted connections {:?} after docker run",
            started.elapsed()
        );
        // Inside its own container, as the superuser.
        let one = must(
            pg.exec_as(
                "postgres",
                &[&format!("{PG_BIN}/psql"), "-At", "-c", "select 1"],
            ),
            "psql",
        );
        assert!(
            one.status.success(),
            "{}",
            String::from_utf8_lossy(&one.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&one.stdout).trim(), "1");
        // From another container, over the network.
        let client = must(
            net.run(
                "client",
                RunSpec::new(&image, 11).user("postgres").args([
                    format!("{PG_BIN}/psql"),
                    "-h".into(),
                    pg.ip().to_string(),
                    "-U".into(),
                    "postgres".into(),
                    "-At".into(),
                    "-c".into(),
                    "select 40 + 2".into(),
                ]),
            ),
            "a psql container",
        );
        let code = must(client.wait(Duration::from_secs(30)), "psql exits");
        let out = must(client.logs(), "psql's output");
        assert_eq!(code, 0, "{out}");
        (pg, out, net)
    });
    assert_eq!(client_out.trim(), "42");

    // And from this process, on this machine's side of the network: PostgreSQL answers an
    // SSLRequest with one byte, 'N' (no TLS configured).
    let addr = SocketAddr::from((pg.ip(), PG_PORT));
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect to postgres");
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .expect("SSLRequest");
    let mut answer = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut answer))
        .await
        .expect("answer in time")
        .expect("an answer");
    assert_eq!(&answer, b"N");

    let name = net.name().to_owned();
    tokio::task::block_in_place(|| drop(net));
    assert!(!network_exists(&name), "{name} removed");
    assert_eq!(containers_of(&name), "", "containers of {name} removed");
    println!("postgres smoke: {:?}", start.elapsed());
}

#[test]
fn a_test_that_panics_leaves_no_container_or_network_behind() {
    if docker::skip_requested() {
        eprintln!("UMBRA_DOCKER_TESTS=skip: skipped");
        return;
    }
    let image = must(docker::umbra_image(), "the umbra image");
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let net = must(TestNet::create("panics"), "a test network");
        tx.send(net.name().to_owned()).expect("send the name");
        // One that runs on, one that has exited: both must go.
        let server = must(
            net.run(
                "server",
                RunSpec::new(&image, 10).shell(&format!(
                    "set -e; {UMBRA_IN_IMAGE} controller init --dir /data/c --address 127.0.0.1:1280; \
                     exec {UMBRA_IN_IMAGE} controller run --dir /data/c"
                )),
            ),
            "a server container",
        );
        let done = must(
            net.run(
                "done",
                RunSpec::new(&image, 11).args([UMBRA_IN_IMAGE, "--version"]),
            ),
            "a short container",
        );
        assert_eq!(must(done.wait(Duration::from_secs(30)), "exits"), 0);
        assert!(must(done.logs(), "logs").contains("umbra"));
        must(
            server.wait_for_log("controller listening", Duration::from_secs(20)),
            "the server starts",
        );
        assert_eq!(
            containers_of(net.name()).lines().count(),
            2,
            "both containers exist before the panic"
        );
        panic!("the test fails here");
    }));
    assert!(result.is_err(), "the closure panicked");
    let name = rx
        .recv_timeout(Duration::from_secs(1))
        .expect("the network's name");
    assert!(!network_exists(&name), "{name} left behind");
    assert_eq!(containers_of(&name), "", "containers of {name} left behind");
}

/// What a test process killed without unwinding leaves (objects whose owner label names a
/// process that is gone) is removed by the next test's [`TestNet::create`]; what a running
/// process owns is not.
#[test]
fn leftovers_of_a_killed_test_are_reaped_by_the_next_one() {
    if docker::skip_requested() {
        eprintln!("UMBRA_DOCKER_TESTS=skip: skipped");
        return;
    }
    let image = must(docker::umbra_image(), "the umbra image");
    let me = docker::owner_label();
    let (host_pid, _) = me.rsplit_once(':').expect("HOST:PID:START");
    // This pid with another start time: a process that is gone.
    let dead = format!("{host_pid}:1");
    let docker_ok = |args: &[&str]| {
        let o = std::process::Command::new("docker")
            .args(args)
            .output()
            .expect("run docker");
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let pid = std::process::id();
    let (orphan, alive) = (format!("umbra-orphan-{pid}"), format!("umbra-alive-{pid}"));
    for (name, owner) in [(&orphan, &dead), (&alive, &me)] {
        docker_ok(&[
            "network",
            "create",
            "--internal",
            "--label",
            &format!("{}={name}", docker::LABEL_SCOPE),
            "--label",
            &format!("{}={owner}", docker::LABEL_OWNER),
            name,
        ]);
        docker_ok(&[
            "create",
            "--name",
            name,
            "--network",
            name,
            "--label",
            &format!("{}={name}", docker::LABEL_SCOPE),
            "--label",
            &format!("{}={owner}", docker::LABEL_OWNER),
            image.tag(),
            UMBRA_IN_IMAGE,
            "--version",
        ]);
    }
    let net = must(TestNet::create("reaper"), "a test network");
    let orphan_left = (network_exists(&orphan), containers_of(&orphan));
    let alive_left = (network_exists(&alive), containers_of(&alive));
    // Remove the live one by hand before asserting, so that a failure leaves nothing either.
    let _ = std::process::Command::new("docker")
        .args(["rm", "-f", &alive])
        .output();
    let _ = std::process::Command::new("docker")
        .args(["network", "rm", &alive])
        .output();
    drop(net);
    assert_eq!(
        orphan_left,
        (false, String::new()),
        "the orphans are reaped"
    );
    assert_eq!(
        alive_left,
        (true, alive.clone()),
        "a live owner's objects are kept"
    );
}

/// Whether a TCP connection to `addr` is accepted within a second.
async fn reachable(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// Whether `addr` accepts a connection within `bound`, trying again while it refuses: a
/// container just connected to a network answers once the engine has set its interface up.
async fn reachable_within(addr: SocketAddr, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if reachable(addr).await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A second network of a test: a container on both is cut off one and keeps the other, then
/// joins again at the same address; killed and started again, it is back on both; both
/// networks go with the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_is_cut_while_the_main_network_stays() {
    if docker::skip_requested() {
        eprintln!("UMBRA_DOCKER_TESTS=skip: skipped");
        return;
    }
    let (net, seg, server) = tokio::task::block_in_place(|| {
        let image = must(docker::umbra_image(), "the umbra image");
        let net = must(TestNet::create("segments"), "a test network");
        let seg = must(net.segment("db"), "a segment");
        let addr = format!("{}:1280", net.ip(10));
        let server = must(
            net.run(
                "server",
                RunSpec::new(&image, 10).shell(&format!(
                    "set -e; [ -e /data/c/admin.json ] || \
                     {UMBRA_IN_IMAGE} controller init --dir /data/c --address {addr}; \
                     exec {UMBRA_IN_IMAGE} controller run --dir /data/c --listen 0.0.0.0:1280"
                )),
            ),
            "a server",
        );
        must(
            server.wait_for_log("controller listening", Duration::from_secs(20)),
            "the server starts",
        );
        must(server.join(&seg, 20), "join the segment");
        (net, seg, server)
    });
    let main = SocketAddr::from((net.ip(10), 1280));
    let other = SocketAddr::from((seg.ip(20), 1280));
    assert!(reachable(main).await, "on the main network");
    assert!(reachable(other).await, "on the segment");

    tokio::task::block_in_place(|| must(server.leave(&seg), "leave the segment"));
    assert!(!reachable(other).await, "cut off the segment");
    assert!(reachable(main).await, "still on the main network");

    tokio::task::block_in_place(|| must(server.join(&seg, 20), "join again"));
    assert!(
        reachable_within(other, Duration::from_secs(10)).await,
        "back on the segment, same address"
    );

    // Killed (a lost host), then started again: same files, same addresses on both networks.
    tokio::task::block_in_place(|| must(server.kill(), "kill"));
    assert!(!reachable(main).await, "killed");
    tokio::task::block_in_place(|| must(server.start(), "start again"));
    let back = Instant::now();
    while !(reachable(main).await && reachable(other).await) {
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "not back on both networks after a restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (net_name, seg_name) = (net.name().to_owned(), seg.name().to_owned());
    tokio::task::block_in_place(|| drop(net));
    assert!(!network_exists(&net_name), "{net_name} removed");
    assert!(!network_exists(&seg_name), "{seg_name} removed");
}
