//! The real `quic-report` binary over loopback: source, server and client as
//! separate processes on free ports (port 0; the addresses are read from the
//! logs), and the demo. Every process is bounded in time and killed if it
//! overstays; the tests assert on what the server recorded.

mod common;

use common::{LIMIT, Logged, TempPath};
use std::collections::BTreeSet;
use std::thread;
use std::time::{Duration, Instant};

fn start_source() -> (Logged, String) {
    let source = Logged::spawn("source", &["source", "--listen", "127.0.0.1:0"]);
    let url = source.wait_for("serving GET / on ");
    (source, url)
}

fn start_server(listen: &str) -> (Logged, String) {
    let server = Logged::spawn("server", &["server", "--listen", listen]);
    let addr = server.wait_for("listening on ");
    (server, addr)
}

/// A client of `addr` fetching from `url` every 100 ms, `count` reports.
fn start_client(addr: &str, url: &str, count: u32) -> Logged {
    let count = count.to_string();
    Logged::spawn(
        "client",
        &[
            "client",
            "--server",
            addr,
            "--source",
            url,
            "--interval",
            "100ms",
            "--count",
            &count,
        ],
    )
}

/// The `seq` and `value` of each JSON line; checks the values.
fn recorded(jsonl: &str) -> Vec<u64> {
    jsonl
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            let value = v["value"].as_f64().expect("a value");
            assert!((0.0..1.0).contains(&value), "value {value} out of [0, 1)");
            v["seq"].as_u64().expect("a seq")
        })
        .collect()
}

/// (`loopback.rs` checks the records in detail; this checks that SIGINT
/// ends the server and the source cleanly, after a client is done.)
#[test]
fn sigint_stops_server_and_source_with_status_zero() {
    let (source, url) = start_source();
    let (server, addr) = start_server("127.0.0.1:0");
    let client = start_client(&addr, &url, 3);
    let (status, out) = client.finish();
    assert!(status.success(), "client: {status}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ack seq=")).count(),
        3,
        "{out}"
    );

    server.signal(libc::SIGINT);
    let (status, jsonl) = server.finish();
    assert!(status.success(), "server: {status}");
    let seqs = recorded(&jsonl);
    assert_eq!(seqs.len(), 3, "{jsonl}");
    assert_eq!(seqs.iter().collect::<BTreeSet<_>>().len(), 3, "{jsonl}");
    source.signal(libc::SIGINT);
    assert!(source.finish().0.success());
}

/// SIGKILLed mid-run and started again on the same `file:` sink (read back
/// at start, so the restarted server knows what was recorded): the client
/// reconnects by itself, and every report is in the file exactly once.
/// (With stdout, a report recorded just before the kill, whose answer
/// never left, is recorded again by the new process: nothing remembers it.)
#[test]
fn client_delivers_everything_across_a_server_restart() {
    let out = TempPath::new("restart.jsonl");
    let sink = format!("file:{}", out.0.display());
    let serve = |listen: &str| {
        let server = Logged::spawn("server", &["server", "--listen", listen, "--sink", &sink]);
        let addr = server.wait_for("listening on ");
        (server, addr)
    };
    let (_source, url) = start_source();
    let (server, addr) = serve("127.0.0.1:0");
    let client = start_client(&addr, &url, 20);
    client.wait_for("connected");
    thread::sleep(Duration::from_millis(500));
    server.signal(libc::SIGKILL);
    let _ = server.finish();
    thread::sleep(Duration::from_millis(500));
    let (server, _) = serve(&addr);
    let (status, client_out) = client.finish();
    assert!(status.success(), "client: {status}\n{client_out}");
    server.signal(libc::SIGINT);
    let _ = server.finish();

    let jsonl = std::fs::read_to_string(&out.0).expect("the sink's file");
    let seqs = recorded(&jsonl);
    let distinct: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(distinct, (1..=20).collect(), "{jsonl}");
    assert_eq!(seqs.len(), 20, "a report was recorded twice:\n{jsonl}");
}

/// A client of the server at `addr` that refuses its certificate (the
/// wrong name), so that it fails at its first handshake; `source` and
/// `extra` as given.
fn refusing_client(addr: &str, source: &str, extra: &[&str]) -> Logged {
    let mut args = vec![
        "client",
        "--server",
        addr,
        "--source",
        source,
        "--server-name",
        "wrong.example",
    ];
    args.extend_from_slice(extra);
    Logged::spawn("client", &args)
}

#[test]
fn client_fails_with_a_message_when_the_certificate_is_refused() {
    let (server, addr) = start_server("127.0.0.1:0");
    let client = refusing_client(&addr, "http://127.0.0.1:9/", &[]);
    // The message is on stderr: wait for it before the process is reaped.
    let msg = client.wait_for("error: ");
    let (status, _) = client.finish();
    assert!(!status.success());
    assert!(msg.contains("certificate"), "{msg}");
    server.signal(libc::SIGINT);
    assert!(server.finish().0.success());
}

/// A source URL's password and token are not logged: not in the start
/// line, not in the warnings of the fetches that fail, not in the error.
#[test]
fn the_source_urls_secrets_stay_out_of_the_log() {
    let (server, addr) = start_server("127.0.0.1:0");
    let mut client = refusing_client(
        &addr,
        "http://u:s3cret@127.0.0.1:9/value?token=t0k3n",
        &["--interval", "100ms"],
    );
    let status = client.wait(LIMIT);
    assert!(!status.success());
    // Every line, up to the error (the reader thread may lag the exit).
    let mut lines = Vec::new();
    let until = Instant::now() + LIMIT;
    while !lines.iter().any(|l: &String| l.contains("error: ")) {
        assert!(Instant::now() < until, "no error line: {lines:#?}");
        lines.extend(client.lines_so_far());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("http://u:***@127.0.0.1:9/value?token=***")),
        "{lines:#?}"
    );
    for l in &lines {
        assert!(!l.contains("s3cret") && !l.contains("t0k3n"), "{l}");
    }
    server.signal(libc::SIGINT);
    assert!(server.finish().0.success());
}

/// A fixed `--client-id` without a spool starts its seqs at 1 on every
/// start, which the server takes for duplicates of an earlier run: the
/// client says so at start.
#[test]
fn a_fixed_client_id_without_a_spool_is_warned_about() {
    let (server, addr) = start_server("127.0.0.1:0");
    let client = refusing_client(&addr, "http://127.0.0.1:9/", &["--client-id", "c0ffee"]);
    let warning = client.wait_for("--client-id c0ffee without --spool: ");
    assert!(warning.contains("duplicate"), "{warning}");
    assert!(!client.finish().0.success());
    server.signal(libc::SIGINT);
    assert!(server.finish().0.success());
}

/// The run after that one: its first seqs are the earlier run's, the
/// server answers them `duplicate` at their first send, and the client
/// says the first is lost and counts them all at exit; its seqs past the earlier
/// run's are recorded. (The same server: its duplicate memory is the key.)
#[test]
fn a_run_whose_seqs_an_earlier_run_used_says_each_is_lost() {
    let (_source, url) = start_source();
    let (server, addr) = start_server("127.0.0.1:0");
    let run = |count: &str| {
        Logged::spawn(
            "client",
            &[
                "client",
                "--server",
                &addr,
                "--source",
                &url,
                "--interval",
                "50ms",
                "--client-id",
                "c0ffee",
                "--count",
                count,
            ],
        )
    };
    let (status, _) = run("3").finish();
    assert!(status.success());
    let again = run("5");
    let lost = again.wait_for("report seq=1 is lost: ");
    assert!(
        lost.contains("another client uses this client id"),
        "{lost}"
    );
    // The others at debug; the count at exit, where the lost are not
    // counted as acknowledged.
    let done = again.wait_for("done: ");
    assert!(
        done.starts_with("2 acknowledged, 3 lost (seq reused), "),
        "{done}"
    );
    let total = again.wait_for(" 3 report(s) lost: ");
    assert!(total.starts_with("the server had their seq"), "{total}");
    let (status, out) = again.finish();
    assert!(status.success());
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("(duplicate) (lost: the seq was used before)"))
            .count(),
        3,
        "{out}"
    );
    server.signal(libc::SIGINT);
    let (status, records) = server.finish();
    assert!(status.success());
    assert_eq!(recorded(&records), [1, 2, 3, 4, 5]);
}

/// `--ca FILE` is the whole trust store. quiche also loads BoringSSL's
/// default roots (the file named by SSL_CERT_FILE, else the system bundle);
/// here that file holds the server's real CA, and `--ca` an unrelated one:
/// the client must refuse the server, and nothing is recorded.
#[test]
fn ca_flag_is_the_only_trust_store() {
    let (source, url) = start_source();
    let (server, addr) = start_server("127.0.0.1:0");
    let certs = concat!(env!("CARGO_MANIFEST_DIR"), "/../certs");
    let (dev_ca, other) = (
        format!("{certs}/ca.pem"),
        format!("{certs}/test/untrusted.pem"),
    );
    let client = Logged::spawn_env(
        "client",
        &[
            "client", "--server", &addr, "--source", &url, "--count", "1", "--ca", &other,
        ],
        &[("SSL_CERT_FILE", &dev_ca)],
    );
    let msg = client.wait_for("error: ");
    let (status, _) = client.finish();
    assert!(!status.success());
    assert!(msg.contains("unknown issuer"), "{msg}");
    server.signal(libc::SIGINT);
    let (status, records) = server.finish();
    assert!(status.success());
    assert_eq!(records.trim(), "", "nothing is recorded");
    source.kill();
}

#[test]
fn demo_with_count_prints_labelled_lines_and_exits_zero() {
    let demo = Logged::spawn("demo", &["demo", "--count", "2", "--interval", "100ms"]);
    let (status, out) = demo.finish();
    assert!(status.success(), "demo: {status}\n{out}");
    for label in [
        "[source] GET / -> ",
        "[server] c0: recorded report client=",
        "[client] ack seq=",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(label)),
            "no {label:?} in:\n{out}"
        );
    }
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("[client] ack seq="))
            .count(),
        2,
        "{out}"
    );
    // Logs go to stderr: stdout carries only labelled lines.
    assert!(out.lines().all(|l| l.starts_with('[')), "{out}");
}

/// `demo --chaos` kills its client at random and restarts it after a pause:
/// a Ctrl-C that lands in that pause ends the demo cleanly (the end-of-demo
/// check, the "stopped" lines, status 0), as one at any other time does.
#[test]
fn demo_chaos_stops_cleanly_on_ctrl_c_between_client_restarts() {
    let child = std::process::Command::new(common::EXE)
        .args(["demo", "--chaos", "--interval", "100ms"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start the demo");
    let mut demo = common::Proc {
        child,
        name: "demo",
    };
    let lines = common::lines_of(&mut demo);
    let mut out = Vec::new();
    // The client is killed 4-20 s after it starts; the line is printed
    // just before a pause of at least 200 ms.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no client restart within 40 s:\n{}", out.join("\n")));
        let pause = line.starts_with("[client] killed abruptly");
        out.push(line);
        if pause {
            break;
        }
    }
    let pid = libc::pid_t::try_from(demo.child.id()).expect("pid fits");
    // SAFETY: kill(2) with our own child's pid has no memory effects.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let status = common::wait(&mut demo, LIMIT);
    // The reader thread ends at end of stdout (the demo has exited).
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
        out.push(line);
    }
    let out = out.join("\n");
    let status = status.unwrap_or_else(|| panic!("the demo did not stop on Ctrl-C:\n{out}"));
    assert!(status.success(), "demo: {status}\n{out}");
    for line in ["[server] stopped", "[source] stopped", "[server] check: "] {
        assert!(
            out.lines().any(|l| l.starts_with(line)),
            "no {line:?} in:\n{out}"
        );
    }
    assert!(
        !out.lines()
            .skip_while(|l| !l.starts_with("[client] SIGINT"))
            .any(|l| l.starts_with("[client] connecting")),
        "no client restarted after Ctrl-C:\n{out}"
    );
}

/// `quic-report demo | head -1`: when the reader of stdout goes away the
/// demo ends by SIGPIPE, as other Unix tools do, without a panic message
/// and without leaving its source, server or client behind.
#[test]
fn demo_whose_stdout_is_closed_ends_quietly() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    // Killed when dropped, should an assertion fail first.
    let mut demo = common::Proc {
        child: Command::new(common::EXE)
            .args(["demo", "--count", "50", "--interval", "100ms"])
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn demo"),
        name: "demo",
    };
    let stdout = demo.child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    // The first line, read on a thread (bounded below); the reader is
    // dropped with the thread's end: the demo's next line meets a closed
    // pipe.
    thread::spawn(move || {
        let mut first = String::new();
        let read = BufReader::new(stdout).read_line(&mut first);
        let _ = tx.send(read.map(|_| first));
    });
    let first = rx
        .recv_timeout(LIMIT)
        .expect("a first line within the limit")
        .expect("the first line");
    assert!(first.starts_with("[source] "), "{first:?}");
    let mut stderr_pipe = demo.child.stderr.take().expect("stderr");
    let stderr = thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr_pipe, &mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = demo.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < LIMIT,
            "the demo went on for {LIMIT:?} with its stdout closed"
        );
        thread::sleep(Duration::from_millis(20));
    };
    let stderr = stderr.join().unwrap_or_default();
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
