//! The real binary across server crashes: `server --out FILE` SIGKILLed and
//! restarted on the same port and file while a client reports every 200 ms.
//! Every seq must be in FILE exactly once and the client must never give
//! up. Also the flags that go with it: `--secret-file`, the lock on
//! `--out`, and the client's warning when its queue overflows. Every wait
//! is bounded; every child is killed when its test ends.

mod common;

use common::{LIMIT, Logged, TempPath, client_args, free_udp_port};
use std::collections::BTreeMap;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// The seqs of the complete lines of `path`, in file order.
fn seqs(path: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["seq"].as_u64())
        .collect()
}

/// Waits (bounded) until `path` holds at least `n` records.
fn wait_records(path: &Path, n: usize) -> Duration {
    let started = Instant::now();
    while seqs(path).len() < n {
        assert!(
            started.elapsed() < LIMIT,
            "{} holds {} records, not {n}",
            path.display(),
            seqs(path).len()
        );
        thread::sleep(Duration::from_millis(5));
    }
    started.elapsed()
}

#[test]
fn every_seq_is_recorded_once_across_sigkilled_servers() {
    let (_source, url) = Logged::start_source();
    let out = TempPath::new("restart.jsonl");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let server_args = ["server", "--listen", &listen, "--out", out.arg()];
    let server = Logged::spawn("server 1", &server_args);
    server.wait_for("listening on ");
    let mut client = Logged::spawn(
        "client",
        &client_args(
            &listen,
            &url,
            "200ms",
            &["--idle-timeout", "2s", "--count", "40"],
        ),
    );

    let mut server = Some(server);
    let mut first_records = Vec::new();
    for (round, down) in [(2, Duration::from_secs(1)), (3, Duration::from_secs(3))] {
        let before = seqs(&out.0).len();
        wait_records(&out.0, before + 5);
        server.take().expect("a server runs").kill();
        thread::sleep(down);
        assert!(
            client.running(),
            "the client exited while the server was down"
        );
        let recorded = seqs(&out.0).len();
        let started = Instant::now();
        let next = Logged::spawn(
            if round == 2 { "server 2" } else { "server 3" },
            &server_args,
        );
        let loaded = next.wait_for("recorded report key(s) of ");
        wait_records(&out.0, recorded + 1);
        let first = started.elapsed();
        println!(
            "server {round} (after {down:?} down, {recorded} records loaded): first new record {first:?} after the restart"
        );
        assert!(loaded.contains("client(s) loaded"), "{loaded}");
        first_records.push(first);
        server = Some(next);
    }

    let status = client.wait(LIMIT);
    assert!(status.success(), "client: {status}");
    drop(server);
    let got = seqs(&out.0);
    let mut counts = BTreeMap::new();
    for s in &got {
        *counts.entry(*s).or_insert(0u32) += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "recorded more than once: {twice:?}");
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>(),
        "every seq 1..=40, in {got:?}"
    );
    println!("time from restart to first new record: {first_records:?}");
}

#[test]
fn a_second_server_on_the_same_out_file_is_refused() {
    let out = TempPath::new("locked.jsonl");
    let first = Logged::spawn(
        "server 1",
        &["server", "--listen", "127.0.0.1:0", "--out", out.arg()],
    );
    first.wait_for("listening on ");
    let mut second = Logged::spawn(
        "server 2",
        &["server", "--listen", "127.0.0.1:0", "--out", out.arg()],
    );
    let msg = second.wait_for("error: ");
    assert!(!second.wait(LIMIT).success());
    assert!(msg.contains("another"), "{msg}");
}

#[test]
fn secret_file_is_raw_or_hex_and_checked() {
    let secret = TempPath::new("secret");
    std::fs::write(&secret.0, format!("{}\n", "ab".repeat(32))).expect("write");
    let with_secret = || {
        Logged::spawn(
            "server",
            &[
                "server",
                "--listen",
                "127.0.0.1:0",
                "--secret-file",
                secret.arg(),
            ],
        )
    };
    let ok = with_secret();
    ok.wait_for("listening on ");

    std::fs::write(&secret.0, [7u8; 31]).expect("write");
    let mut bad = with_secret();
    let msg = bad.wait_for("error: ");
    assert!(!bad.wait(LIMIT).success());
    assert!(msg.contains("32 bytes") && msg.contains("31"), "{msg}");

    let mut missing = Logged::spawn(
        "server",
        &["server", "--secret-file", "/nonexistent/quic-report-secret"],
    );
    let msg = missing.wait_for("error: ");
    assert!(!missing.wait(LIMIT).success());
    assert!(msg.contains("/nonexistent/quic-report-secret"), "{msg}");
}

#[test]
fn a_full_queue_is_said_out_loud_with_a_count() {
    let (_source, url) = Logged::start_source();
    // Nobody listens on this port: every report stays queued.
    let nowhere = format!("127.0.0.1:{}", free_udp_port());
    let client = Logged::spawn(
        "client",
        &client_args(
            &nowhere,
            &url,
            "50ms",
            &[
                "--queue",
                "2",
                "--keep-alive",
                "0s",
                "--backoff-max",
                "200ms",
            ],
        ),
    );
    let first = client.wait_for("queue full: ");
    assert!(
        first.contains("seq=1") && first.contains("1 dropped"),
        "{first}"
    );
    let second = client.wait_for("queue full: ");
    assert!(
        second.contains("seq=2") && second.contains("2 dropped"),
        "{second}"
    );
}
