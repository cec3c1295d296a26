//! What a person running the real server can see: `quic-report get` over
//! HTTP/0.9, Prometheus metrics that move, and qlog files from QLOGDIR.

mod common;

use std::time::Duration;

use common::{
    EXE, client_args, free_tcp_port, http_get, records, spawn_env, start_server, start_source,
    stderr_of, wait,
};
use serde_json::Value;

#[test]
fn get_metrics_and_qlog_show_the_servers_state() {
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let (_source, url) = start_source();
    let (_srv, server, rx) = start_server(&["--metrics", &metrics]);
    let scrape = |what: &str| -> Option<u64> {
        let (_, body) = http_get(&format!("http://{metrics}/metrics"))?;
        body.lines()
            .find_map(|l| l.strip_prefix(what)?.trim().parse().ok())
    };
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while scrape("quic_report_reports_recorded_total ").is_none() && std::time::Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = scrape("quic_report_reports_recorded_total ");
    assert_eq!(before, Some(0), "the metrics endpoint answers");

    // Removed however the test ends.
    let qlog = common::TempPath::new("qlog");
    let qlogdir = qlog.0.clone();
    let mut client_proc = spawn_env(
        "client",
        &client_args(&server, &url, "200ms", &["--count", "3"]),
        &[("QLOGDIR", qlogdir.as_os_str())],
    );
    let status = wait(&mut client_proc, Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        stderr_of(&mut client_proc)
    );
    let mut got = Vec::new();
    records(&rx, &mut got, 3, Duration::from_secs(5));
    assert_eq!(got.len(), 3);

    // quic-report get, over our own core.
    let out = std::process::Command::new(EXE)
        .args(["get", &format!("https://{server}/latest")])
        .output()
        .expect("get runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let latest: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let client_id = got[0]["client"].as_str().expect("client id");
    // Keyed by identity ("": anonymous), then client.
    assert_eq!(latest[""][client_id]["seq"], 3, "{latest}");

    // The counters moved: published within 100 ms of a change, so polled
    // until the count is 3, for at most 10 s (a count off by one either
    // way never settles on 3).
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let mut recorded = scrape("quic_report_reports_recorded_total ");
    while recorded != Some(3) && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
        recorded = scrape("quic_report_reports_recorded_total ");
    }
    assert_eq!(recorded, Some(3));
    assert!(scrape("quic_report_handshake_seconds_count ").is_some_and(|n| n >= 1));
    assert!(scrape("quic_report_bytes_received_total ").is_some_and(|n| n > 0));

    // One qlog per connection, JSON-SEQ.
    let files: Vec<_> = std::fs::read_dir(&qlogdir)
        .expect("QLOGDIR made")
        .flatten()
        .collect();
    assert!(!files.is_empty(), "qlog files in {}", qlogdir.display());
    for f in &files {
        let text = std::fs::read_to_string(f.path()).expect("readable");
        let records: Vec<_> = text
            .split('\u{1e}')
            .filter(|r| !r.trim().is_empty())
            .collect();
        assert!(records.len() > 5, "{} has events", f.path().display());
        for r in records {
            let _: Value =
                serde_json::from_str(r).unwrap_or_else(|e| panic!("not JSON-SEQ ({e}): {r}"));
        }
    }
}
