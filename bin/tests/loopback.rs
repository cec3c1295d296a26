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
