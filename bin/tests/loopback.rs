//! The real binary over loopback UDP: `source`, `server` and `client` as
//! separate processes on free ports, asserting on what the server recorded.
//! Every wait is bounded; every child is killed when its test ends.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, UdpSocket};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_quic-report");

/// A child process killed when dropped.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(name: &'static str, args: &[&str]) -> Proc {
    let child = Command::new(EXE)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    Proc { child, name }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free TCP port")
        .port()
}

/// Waits for the process to exit, at most `limit`.
fn wait(p: &mut Proc, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if let Ok(Some(status)) = p.child.try_wait() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Collects a child's stdout lines on a thread, so the pipe never fills.
fn lines_of(p: &mut Proc) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = p.child.stdout.take().expect("stdout is piped");
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn stderr_of(p: &mut Proc) -> String {
    let mut s = String::new();
    if let Some(mut e) = p.child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// Records the server printed so far (JSON lines), waiting up to `limit`
/// for at least `n`.
fn records(rx: &mpsc::Receiver<String>, got: &mut Vec<Value>, n: usize, limit: Duration) {
    let end = Instant::now() + limit;
    while got.len() < n {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => got.push(
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}")),
            ),
            Err(_) => break,
        }
    }
}

#[test]
fn loopback_binaries_end_to_end() {
    let (sp, qp) = (free_tcp_port(), free_udp_port());
    let source_addr = format!("127.0.0.1:{sp}");
    let server_addr = format!("127.0.0.1:{qp}");
    let _source = spawn("source", &["source", "--listen", &source_addr]);
    let mut server = spawn("server", &["server", "--listen", &server_addr]);
    let rx = lines_of(&mut server);
    let url = format!("http://{source_addr}/");
    let mut client = spawn(
        "client",
        &[
            "client",
            "--server",
            &server_addr,
            "--source",
            &url,
            "--interval",
            "200ms",
            "--count",
            "5",
        ],
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

/// A minimal HTTP/1.0 GET over std's TcpStream: (status, body).
fn http_get(url: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}
