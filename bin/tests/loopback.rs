//! The real binary over loopback UDP: `source`, `server` and `client` as
//! separate processes on free ports, asserting on what the server recorded.
//! Every wait is bounded; every child is killed when its test ends.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{
    client_args, free_tcp_port, http_get, records, spawn, start_server, start_source, stderr_of,
    wait,
};
use serde_json::Value;

#[test]
fn loopback_binaries_end_to_end() {
    let (_source, url) = start_source();
    let (_server, server_addr, rx) = start_server(&[]);
    let mut client = spawn(
        "client",
        &client_args(&server_addr, &url, "200ms", &["--count", "5"]),
    );
    let status = wait(&mut client, Duration::from_secs(60));
    let client_err = stderr_of(&mut client);
    assert!(
        status.is_some_and(|s| s.success()),
        "{} exits 0 after 5 acknowledgements, got {status:?}; stderr:\n{client_err}",
        client.name
    );
    let mut got = Vec::new();
    records(&rx, &mut got, 5, Duration::from_secs(5));
    assert_eq!(got.len(), 5, "five records: {got:?}");
    let mut seqs: Vec<u64> = got
        .iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect();
    for r in &got {
        let v = r["value"].as_f64().expect("value is a number");
        assert!((0.0..1.0).contains(&v), "value in [0,1): {r}");
        assert!(
            r["client"].is_string() && r["id"].is_string() && r["sampled_at_ms"].is_u64(),
            "{r}"
        );
    }
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 5, "distinct seq: {got:?}");
}

#[test]
fn source_serves_values_and_404s() {
    let sp = free_tcp_port();
    let addr = format!("127.0.0.1:{sp}");
    let _source = spawn("source", &["source", "--listen", &addr]);
    let get = |path: &str| -> Option<(u16, String)> {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            match http_get(&format!("http://{addr}{path}")) {
                Some(r) => return Some(r),
                None => thread::sleep(Duration::from_millis(50)),
            }
        }
        None
    };
    let (status, body) = get("/").expect("source answers");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).expect("JSON body");
    let x = v["value"].as_f64().expect("a number");
    assert!((0.0..1.0).contains(&x));
    let (status, _) = get("/nope").expect("source answers");
    assert_eq!(status, 404);
}

/// From review: a server whose stdout nobody reads blocks in `write(2)`
/// once the pipe is full, and its loop with it; SIGTERM, once or twice,
/// only woke a loop that never came to take it, so nothing but SIGKILL
/// ended the process. Now a signal that finds the one before it untaken
/// ends the process at once, with the status the default disposition
/// gives (128 + 15).
#[test]
fn a_server_stuck_writing_to_stdout_ends_on_a_second_sigterm() {
    let (_source, url) = common::Logged::start_source();
    let port = common::free_udp_port();
    let server_addr = format!("127.0.0.1:{port}");
    let mut server = common::Logged::spawn("server", &["server", "--listen", &server_addr]);
    server.wait_for("listening on");
    // Nobody reads the server's stdout: 64 KiB of pipe and the buffer fill.
    let _client = common::Logged::spawn("client", &client_args(&server_addr, &url, "2ms", &[]));
    let pid = server.child.id();
    let deadline = Instant::now() + common::LIMIT;
    loop {
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        if wchan.contains("pipe_write") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server never blocked on its stdout (wchan {wchan:?})"
        );
        thread::sleep(Duration::from_millis(20));
    }
    server.signal(libc::SIGTERM);
    thread::sleep(Duration::from_millis(200));
    server.signal(libc::SIGTERM);
    let status = server.wait(common::LIMIT);
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status}");
}
