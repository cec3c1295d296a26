//! Helpers shared by the tests that run the real `quic-report` binary:
//! children killed on drop, free loopback ports, a source and a server
//! started on them, a client's usual flags, temporary paths removed on
//! drop, bounded waits, stdout collected on a thread.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const EXE: &str = env!("CARGO_BIN_EXE_quic-report");

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn(name: &'static str, args: &[&str]) -> Proc {
    spawn_env(name, args, &[])
}

/// [`spawn`] with extra environment variables.
pub fn spawn_env(name: &'static str, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Proc {
    let child = Command::new(EXE)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    Proc { child, name }
}

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free TCP port")
        .port()
}

/// A `source` on a free loopback TCP port, and the URL it serves.
pub fn start_source() -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_tcp_port());
    let source = spawn("source", &["source", "--listen", &addr]);
    (source, format!("http://{addr}/"))
}

/// A `server` on a free loopback UDP port with `extra` flags: the process,
/// its address, and its stdout lines (the records it prints).
pub fn start_server(extra: &[&str]) -> (Proc, String, mpsc::Receiver<String>) {
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let mut args = vec!["server", "--listen", &addr];
    args.extend_from_slice(extra);
    let mut server = spawn("server", &args);
    let records = lines_of(&mut server);
    (server, addr, records)
}

/// The arguments of a `client` reporting to `server` what `source` serves,
/// one fetch every `interval`, then `extra`.
pub fn client_args<'a>(
    server: &'a str,
    source: &'a str,
    interval: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "client",
        "--server",
        server,
        "--source",
        source,
        "--interval",
        interval,
    ];
    args.extend_from_slice(extra);
    args
}

/// Runs the binary with `args` to its end, which must come within 10 s
/// (a refusal at start, a one-shot command); one still running then is
/// killed and fails the test, rather than hanging it.
pub fn run_to_end(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(EXE)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    // Read on threads: a child that fills a pipe must not stall.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waits") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{args:?} still runs after 10 s\n{}",
                String::from_utf8_lossy(&err.join().unwrap_or_default())
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// A path in the temporary directory, unique to this process and moment;
/// whatever is there (a file or a directory) is removed when dropped.
pub struct TempPath(pub PathBuf);

impl TempPath {
    pub fn new(name: &str) -> TempPath {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = TempPath(std::env::temp_dir().join(format!(
            "quic-report-test-{}-{nanos:x}-{name}",
            std::process::id()
        )));
        p.remove();
        p
    }

    /// The path, as an argument.
    pub fn arg(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temporary path")
    }

    /// `name` inside the path (a directory), as an argument.
    pub fn join(&self, name: &str) -> String {
        self.0.join(name).to_str().expect("UTF-8").to_owned()
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Waits for the process to exit, at most `limit`.
pub fn wait(p: &mut Proc, limit: Duration) -> Option<ExitStatus> {
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
pub fn lines_of(p: &mut Proc) -> mpsc::Receiver<String> {
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

pub fn stderr_of(p: &mut Proc) -> String {
    let mut s = String::new();
    if let Some(mut e) = p.child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// Records the server printed so far (JSON lines), waiting up to `limit`
/// for at least `n`.
pub fn records(rx: &mpsc::Receiver<String>, got: &mut Vec<Value>, n: usize, limit: Duration) {
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

/// A minimal HTTP/1.0 GET over std's TcpStream: (status, body).
pub fn http_get(url: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let uri: http::Uri = url.parse().ok()?;
    if uri.scheme_str() != Some("http") {
        return None;
    }
    let host = uri.authority()?.as_str();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
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

/// How long a test waits for a log line or an exit by default.
pub const LIMIT: Duration = Duration::from_secs(30);

/// A child run with `RUST_LOG=info` whose stderr lines are collected (and
/// echoed to the test's stderr as `[name] line`), stdout piped; killed
/// when dropped.
pub struct Logged {
    pub child: Child,
    stderr: mpsc::Receiver<String>,
    /// Every line read from `stderr` so far, skipped ones included.
    read: std::sync::Mutex<Vec<String>>,
}

impl Logged {
    pub fn spawn(name: &'static str, args: &[&str]) -> Logged {
        Logged::spawn_env(name, args, &[])
    }

    /// [`Logged::spawn`] with extra environment variables.
    pub fn spawn_env(name: &'static str, args: &[&str], env: &[(&str, &str)]) -> Logged {
        let mut cmd = Command::new(EXE);
        cmd.args(args).envs(env.iter().copied());
        Logged::spawn_command(name, cmd)
    }

    /// A `source` on a port the system picks, once it serves; and its URL.
    pub fn start_source() -> (Logged, String) {
        let source = Logged::spawn("source", &["source", "--listen", "127.0.0.1:0"]);
        let url = source.wait_for("serving GET / on ");
        (source, url)
    }

    /// Runs `cmd` (the binary, its arguments and environment set up by the
    /// caller) as [`Logged::spawn`] does.
    pub fn spawn_command(name: &'static str, mut cmd: Command) -> Logged {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let err = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("  [{name}] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Logged {
            child,
            stderr: rx,
            read: std::sync::Mutex::default(),
        }
    }

    /// Waits (at most [`LIMIT`]) for a stderr line containing `marker`;
    /// returns the text after it.
    pub fn wait_for(&self, marker: &str) -> String {
        let deadline = Instant::now() + LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .stderr
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line with {marker:?}"));
            self.keep(&line);
            if let Some(i) = line.find(marker) {
                return line[i + marker.len()..].trim().to_owned();
            }
        }
    }

    fn keep(&self, line: &str) {
        self.read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(line.to_owned());
    }

    /// The stderr lines logged so far and not yet read.
    pub fn drain(&self) -> Vec<String> {
        let lines: Vec<String> = self.stderr.try_iter().collect();
        lines.iter().for_each(|l| self.keep(l));
        lines
    }

    /// The stderr lines that arrived and were not consumed yet.
    pub fn lines_so_far(&self) -> Vec<String> {
        self.drain()
    }

    /// Every stderr line that has arrived so far, those [`Logged::wait_for`]
    /// read past included.
    pub fn all_lines(&self) -> Vec<String> {
        self.drain();
        self.read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // SAFETY: kill(2) with our own child's pid has no memory effects.
        unsafe {
            libc::kill(pid, sig);
        }
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// SIGKILL, and reap it (so its port is free again).
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    /// Waits (at most `limit`, else panics) for the exit.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the process did not exit within {limit:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most [`LIMIT`]) for the exit; the status and all of stdout.
    pub fn finish(mut self) -> (ExitStatus, String) {
        let status = self.wait(LIMIT);
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            o.read_to_string(&mut out).expect("stdout is UTF-8");
        }
        (status, out)
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
