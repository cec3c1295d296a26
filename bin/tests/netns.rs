//! The real binaries on a network the test makes itself: the test's thread
//! moves into a network namespace of its own (`unshare(CLONE_NEWNET)`), in
//! which only a loopback interface exists, down until the test brings it
//! up; the processes it starts live there with it. Needs root
//! (CAP_SYS_ADMIN), as `make test` has. Bounded by [`common::LIMIT`];
//! asserts on what the server recorded and how the client ended.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{LIMIT, Logged, client_args, lines_of, records, spawn};

/// A file of the repository's `certs/`.
fn certs(path: &str) -> String {
    format!("{}/../certs/{path}", env!("CARGO_MANIFEST_DIR"))
}

/// Moves this thread (and the processes it starts from now on) into a new
/// network namespace: one loopback interface, down.
fn private_network() {
    // SAFETY: unshare(2) changes only the calling thread's namespaces; no
    // memory is touched.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "cannot make a network namespace (this test needs root): {}",
        std::io::Error::last_os_error()
    );
}

fn loopback_up() {
    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip(8) runs");
    assert!(status.success(), "ip link set lo up: {status}");
}

/// Anonymous mode off loopback, allowed: the server serves, warns, and
/// refuses reads to everyone (`0.0.0.0` here is this namespace's only).
#[test]
fn an_allowed_anonymous_server_off_loopback_serves_and_refuses_reads() {
    private_network();
    loopback_up();
    let srv = Logged::spawn(
        "server",
        &[
            "server",
            "--listen",
            "0.0.0.0:4433",
            "--allow-anonymous",
            "--cert",
            &certs("localhost.pem"),
            "--key",
            &certs("localhost.key"),
        ],
    );
    let warning = srv.wait_for("anonymous mode");
    assert!(warning.contains("refused"), "{warning}");
    srv.wait_for("listening on");
    let out = common::run_to_end(&["get", "https://127.0.0.1:4433/latest"]);
    assert!(
        !out.status.success(),
        "reads are closed to anonymous peers off loopback"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("forbidden"), "{err}");
    srv.kill();
}

/// A device whose client starts before its network is up (no route at
/// all: sending says ENETUNREACH). The client keeps going, fetching and
/// reconnecting with backoff, and once the network is up it reports
/// everything, once. An earlier build exited with an error at start.
#[test]
fn a_client_started_before_the_network_is_up_reports_once_it_is() {
    private_network();
    // Fixed ports: nothing else lives in this namespace.
    let server_addr = "127.0.0.1:4433";
    let source_addr = "127.0.0.1:8080";
    let source_url = format!("http://{source_addr}/");
    let mut client = Logged::spawn(
        "client",
        &client_args(server_addr, &source_url, "200ms", &["--count", "3"]),
    );
    // A failed attempt, then more: it did not give up at the first.
    client.wait_for("(attempt 2)");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(client.running(), "the client gave up without a network");
    loopback_up();
    let _source = Logged::spawn("source", &["source", "--listen", source_addr]);
    let mut server = spawn("server", &["server", "--listen", server_addr]);
    let recorded = lines_of(&mut server);
    let mut got = Vec::new();
    records(&recorded, &mut got, 3, LIMIT);
    let status = client.wait(LIMIT);
    assert!(status.success(), "the client ended with {status}");
    let mut seqs: Vec<u64> = got.iter().filter_map(|r| r["seq"].as_u64()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, [1, 2, 3], "records: {got:?}");
    // Nothing more arrives (no report twice).
    records(&recorded, &mut got, 4, Duration::from_millis(500));
    assert_eq!(got.len(), 3, "records: {got:?}");
}

/// A child killed and reaped when dropped.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `ip` with `args` in this thread's namespace, or in `pid`'s.
fn ip(pid: Option<u32>, args: &[&str]) {
    let mut cmd = match pid {
        Some(pid) => {
            let mut c = Command::new("nsenter");
            c.args(["-t", &pid.to_string(), "-n", "ip"]);
            c
        }
        None => Command::new("ip"),
    };
    let status = cmd.args(args).status().expect("ip(8) runs");
    assert!(status.success(), "ip {args:?}: {status}");
}

/// A client whose own address changes mid-run (a new DHCP lease, another
/// network): the socket it had is bound to an address that is gone, so
/// its connection dies; the next attempt goes out on a new socket from
/// the new address, and every report is recorded once. The server lives in
/// a second namespace joined to the client's by a veth pair: 10.9.0.1,
/// the client 10.9.0.2, then 10.9.0.3. An earlier build kept its first
/// socket for ever and reported nothing after the change.
#[test]
fn a_client_whose_own_address_changes_reports_from_the_new_one() {
    private_network();
    loopback_up();
    // The server's namespace, held by a process while the test runs.
    let holder = Reap(
        Command::new("unshare")
            .args(["-n", "sleep", "infinity"])
            .spawn()
            .expect("unshare(1) runs"),
    );
    let pid = holder.0.id();
    // Wait until `sleep` runs in its own namespace (unshare has execed).
    let deadline = std::time::Instant::now() + LIMIT;
    while std::fs::read_to_string(format!("/proc/{pid}/comm")).map_or(true, |c| c.trim() != "sleep")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "unshare did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    ip(
        None,
        &["link", "add", "vc", "type", "veth", "peer", "name", "vs"],
    );
    ip(None, &["link", "set", "vs", "netns", &pid.to_string()]);
    ip(None, &["addr", "add", "10.9.0.2/24", "dev", "vc"]);
    ip(None, &["link", "set", "vc", "up"]);
    ip(Some(pid), &["addr", "add", "10.9.0.1/24", "dev", "vs"]);
    ip(Some(pid), &["link", "set", "vs", "up"]);
    ip(Some(pid), &["link", "set", "lo", "up"]);

    let mut cmd = Command::new("nsenter");
    cmd.args(["-t", &pid.to_string(), "-n", "--", common::EXE])
        .args(["server", "--listen", "10.9.0.1:4433", "--allow-anonymous"])
        // Off loopback: its own certificate, and the client names its CA
        // (the built-in ones stay on loopback).
        .args([
            "--cert",
            &certs("localhost.pem"),
            "--key",
            &certs("localhost.key"),
        ]);
    let mut server = Logged::spawn_command("server", cmd);
    server.wait_for("listening on");
    let mut out = server.child.stdout.take().expect("stdout is piped");
    let (tx, recorded) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(&mut out)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let source_addr = "127.0.0.1:8080";
    let _source = Logged::spawn("source", &["source", "--listen", source_addr]);
    let source_url = format!("http://{source_addr}/");
    let client = Logged::spawn(
        "client",
        &client_args(
            "10.9.0.1:4433",
            &source_url,
            "200ms",
            &[
                "--server-name",
                "localhost",
                "--ca",
                &certs("ca.pem"),
                "--count",
                "40",
            ],
        ),
    );
    let mut got = Vec::new();
    records(&recorded, &mut got, 5, LIMIT);
    assert_eq!(got.len(), 5, "reports flowed before the change: {got:?}");
    // The old address goes (and the route with it), a new one comes.
    ip(None, &["addr", "del", "10.9.0.2/24", "dev", "vc"]);
    ip(None, &["addr", "add", "10.9.0.3/24", "dev", "vc"]);
    records(&recorded, &mut got, 40, LIMIT);
    let mut seqs: Vec<u64> = got.iter().filter_map(|r| r["seq"].as_u64()).collect();
    seqs.sort_unstable();
    let want: Vec<u64> = (1..=40).collect();
    assert_eq!(seqs, want, "every report once");
    let mut client = client;
    let status = client.wait(LIMIT);
    assert!(status.success(), "the client ended with {status}");
    // Abandoned at once (the kernel refuses the old source address), not
    // after the 5 s answer timeout.
    let lines = client.lines_so_far();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("disconnected: server unreachable")),
        "{lines:#?}"
    );
}
