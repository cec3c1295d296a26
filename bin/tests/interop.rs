//! Interop with another QUIC stack: aioquic (Python), from PyPI at the
//! version pinned in `tests/interop/requirements.txt`. The peers are the
//! scripts in `tests/interop/`; each prints JSON on stdout.
//!
//! - `aioquic_client.py` against our `server`: every case of the protocol
//!   (README, "Protocol quic-report/1"), then what our server recorded.
//! - our `client` against `aioquic_server.py`: what the aioquic server
//!   recorded, and how our client used its streams.
//! - `aioquic_h0_get.py` (aioquic's own HTTP/0.9) against our server's
//!   `hq-interop` side: `/latest`, `/stats`, and a path that does not exist.
//!
//! The first run creates a virtualenv in `<target>/interop-venv` with
//! `python3 -m venv` (`$PYTHON` names another interpreter) and installs the
//! pin with pip (about 10 s, needs PyPI); later runs reuse it, offline, as
//! long as the pinned version imports. Without python3, venv or pip, or if
//! the install fails, every test here fails and says what is missing: they
//! are never skipped.
//!
//! Every process is killed when its test ends; every wait is bounded, and
//! each test takes at most [`LIMIT`].

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_quic-report");
/// The longest a test may take once the virtualenv exists.
const LIMIT: Duration = Duration::from_secs(60);
/// The longest the virtualenv may take to make (pip downloads).
const VENV_LIMIT: Duration = Duration::from_secs(600);

// ----- the virtualenv ----------------------------------------------------------

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bin/ has a parent")
        .to_owned()
}

fn interop_dir() -> PathBuf {
    root().join("tests/interop")
}

/// The target directory the binary was built in (`.../target/debug/quic-report`
/// -> `.../target`), so `CARGO_TARGET_DIR` is honoured.
fn target_dir() -> PathBuf {
    Path::new(BIN)
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| root().join("target"), Path::to_owned)
}

/// The venv's python, made on first use (once per test binary; a lock
/// file keeps other processes out while one makes it). Panics with what is
/// missing if it cannot be made.
fn python() -> &'static Path {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match VENV.get_or_init(prepare_venv) {
        Ok(p) => p,
        Err(e) => panic!("interop tests need aioquic in a Python virtualenv: {e}"),
    }
}

/// The pin (`aioquic==X.Y.Z`) from the requirements file.
fn pinned_version(requirements: &Path) -> Result<String, String> {
    let text = fs::read_to_string(requirements)
        .map_err(|e| format!("cannot read {}: {e}", requirements.display()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("aioquic=="))
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| format!("no aioquic==VERSION line in {}", requirements.display()))
}

fn prepare_venv() -> Result<PathBuf, String> {
    let requirements = interop_dir().join("requirements.txt");
    let pin = pinned_version(&requirements)?;
    let target = target_dir();
    fs::create_dir_all(&target).map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    let _lock = FileLock::acquire(&target.join("interop-venv.lock"))?;
    let venv = target.join("interop-venv");
    let py = venv.join("bin/python");
    if installed_version(&py).as_deref() == Some(pin.as_str()) {
        return Ok(py);
    }

    let started = Instant::now();
    let base = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    let shown = base.to_string_lossy().into_owned();
    run_bounded(
        Command::new(&base).arg("--version"),
        Duration::from_secs(30),
    )
    .map_err(|e| {
        format!(
            "{shown} is missing ({e}); install Python 3 with venv and pip \
             (Debian: apt-get install python3 python3-venv python3-pip)"
        )
    })?;
    run_bounded(
        Command::new(&base)
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
        Duration::from_secs(120),
    )
    .map_err(|e| {
        format!(
            "`{shown} -m venv {}` failed ({e}); on Debian install python3-venv",
            venv.display()
        )
    })?;
    run_bounded(
        Command::new(&py).args(["-m", "pip", "--version"]),
        Duration::from_secs(60),
    )
    .map_err(|e| format!("pip is missing in the virtualenv ({e}); install python3-pip"))?;
    run_bounded(
        Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--quiet",
                "-r",
            ])
            .arg(&requirements),
        VENV_LIMIT,
    )
    .map_err(|e| {
        format!(
            "pip could not install {} (is PyPI reachable?): {e}",
            requirements.display()
        )
    })?;
    match installed_version(&py) {
        Some(v) if v == pin => {
            eprintln!(
                "interop: made {} with aioquic {pin} in {:.1?}",
                venv.display(),
                started.elapsed()
            );
            Ok(py)
        }
        other => Err(format!(
            "after pip install, aioquic is {other:?} in {}, not {pin}",
            venv.display()
        )),
    }
}

/// The aioquic version the venv's python imports, if it does.
fn installed_version(py: &Path) -> Option<String> {
    if !py.exists() {
        return None;
    }
    let out = run_bounded(
        Command::new(py).args([
            "-c",
            "import aioquic, importlib.metadata as m; print(m.version('aioquic'))",
        ]),
        Duration::from_secs(30),
    )
    .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs a command to completion within `limit`: its output if it exits 0,
/// else what went wrong (with its stderr).
fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let (out, err) = (
        drain(child.stdout.take().expect("piped")),
        drain(child.stderr.take().expect("piped")),
    );
    let end = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < end => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{:?} did not finish within {limit:?}",
                    cmd.get_program()
                ));
            }
        }
    };
    let output = Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    if status.success() {
        Ok(output)
    } else {
        Err(format!(
            "{status}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn drain(mut r: impl std::io::Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// An exclusive lock on a file ([`File::lock`], `flock(2)` on Linux),
/// released when dropped (the file is closed).
struct FileLock {
    _file: File,
}

impl FileLock {
    fn acquire(path: &Path) -> Result<FileLock, String> {
        let file =
            File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        file.lock()
            .map_err(|e| format!("cannot lock {}: {e}", path.display()))?;
        Ok(FileLock { _file: file })
    }
}

// ----- processes ---------------------------------------------------------------

/// A child process, killed when dropped. Its stderr lines are echoed to
/// the test's output (shown when it fails) and arrive on a channel, as do
/// its stdout lines.
struct Proc {
    name: &'static str,
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Proc {
    fn ours(name: &'static str, args: &[&str]) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args(args).env("RUST_LOG", "info");
        Proc::spawn(name, cmd)
    }

    fn python(name: &'static str, script: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new(python());
        cmd.arg(interop_dir().join(script))
            .args(args)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1");
        Proc::spawn(name, cmd)
    }

    fn spawn(name: &'static str, mut cmd: Command) -> Proc {
        let mut child = cmd
            .current_dir(root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({:?}): {e}", cmd.get_program()));
        let stdout = lines(child.stdout.take().expect("piped"), None);
        let stderr = lines(child.stderr.take().expect("piped"), Some(name));
        Proc {
            name,
            child,
            stdout,
            stderr,
        }
    }

    /// Waits for a stderr line containing `marker`; returns the first word
    /// after it.
    fn wait_stderr(&self, marker: &str, end: Instant) -> String {
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let line = self
                .stderr
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("{}: no log line with {marker:?} in time", self.name));
            if let Some(i) = line.find(marker) {
                let rest = &line[i + marker.len()..];
                return rest.split_whitespace().next().unwrap_or("").to_owned();
            }
        }
    }

    /// Waits for a JSON line on stdout for which `pick` says yes.
    fn wait_stdout_json(&self, end: Instant, pick: impl Fn(&Value) -> bool) -> Value {
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let line = self
                .stdout
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("{}: no such line on stdout in time", self.name));
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && pick(&v)
            {
                return v;
            }
        }
    }

    /// Waits (until `end`) for the exit; returns the status and the rest
    /// of stdout.
    fn finish(mut self, end: Instant) -> (ExitStatus, Vec<String>) {
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(Instant::now() < end, "{} did not exit in time", self.name);
            thread::sleep(Duration::from_millis(20));
        };
        let mut out = Vec::new();
        // The reader thread ends at EOF, which follows the exit.
        while let Ok(line) = self
            .stdout
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            out.push(line);
        }
        (status, out)
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // SAFETY: kill(2) on our own child; no memory is involved.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines of a pipe, on a channel; echoed to stderr (the test's
/// captured output) when `echo` names the process.
fn lines(
    pipe: impl std::io::Read + Send + 'static,
    echo: Option<&'static str>,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if let Some(name) = echo {
                eprintln!("  [{name}] {line}");
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn start_our_server(end: Instant) -> (Proc, String) {
    start_our_server_with(end, &[])
}

/// [`start_our_server`] with more flags.
fn start_our_server_with(end: Instant, extra: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "server",
        "--listen",
        "127.0.0.1:0",
        "--cert",
        "certs/localhost.pem",
        "--key",
        "certs/localhost.key",
    ];
    args.extend_from_slice(extra);
    let server = Proc::ours("server", &args);
    let addr = server.wait_stderr("listening on ", end);
    (server, addr)
}

fn start_source(end: Instant) -> (Proc, String) {
    let source = Proc::ours("source", &["source", "--listen", "127.0.0.1:0"]);
    let url = source.wait_stderr("serving GET / on ", end);
    (source, url)
}

/// Runs our client until it has `count` acknowledgements; asserts it exits 0.
fn run_our_client(server: &str, source: &str, count: u64, end: Instant) -> Vec<String> {
    let count = count.to_string();
    let client = Proc::ours(
        "client",
        &common::client_args(
            server,
            source,
            "200ms",
            &["--count", &count, "--ca", "certs/ca.pem"],
        ),
    );
    let (status, out) = client.finish(end);
    assert!(status.success(), "our client: {status} (its log is above)");
    out
}

fn port_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(_, p)| p)
}

/// Parses JSON lines, panicking with the line that is not JSON.
fn json_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line: {l:?}: {e}")))
        .collect()
}

/// Runs the Python peer `script` against our server at `addr` (trusting
/// the development CA, each wait bounded by `timeout` seconds) with `extra`
/// arguments until it exits: its status and its result, as [`result_of`].
fn run_peer(
    script: &'static str,
    addr: &str,
    timeout: &str,
    extra: &[&str],
    end: Instant,
) -> (ExitStatus, Value) {
    let mut args = vec![
        "--port",
        port_of(addr),
        "--ca",
        "certs/ca.pem",
        "--timeout",
        timeout,
    ];
    args.extend_from_slice(extra);
    let (status, out) = Proc::python(script, script, &args).finish(end);
    (status, result_of(script, status, &out))
}

/// The last stdout line of a Python peer, as JSON.
fn result_of(name: &str, status: ExitStatus, out: &[String]) -> Value {
    let last = out
        .iter()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("{name} printed nothing ({status})"));
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{name}: not JSON: {last:?}: {e}"))
}

// ----- the tests ---------------------------------------------------------------

/// Every case of `aioquic_client.py` against our server (one report per
/// stream, several objects on one stream, each bad input with its code,
/// 1-byte frames, an oversized object with STOP_SENDING, key updates, new
/// connection IDs, 0-RTT, version negotiation); then our server must have
/// recorded exactly the good reports, each once.
#[test]
fn aioquic_client_against_our_server() {
    python(); // made (or checked) before the clock starts
    let end = Instant::now() + LIMIT;
    let (server, addr) = start_our_server(end);
    let (status, result) = run_peer("aioquic_client.py", &addr, "5", &["--deadline", "40"], end);
    let failed: Vec<&Value> = result["cases"]
        .as_array()
        .map(|c| c.iter().filter(|c| c["ok"] != Value::Bool(true)).collect())
        .unwrap_or_default();
    assert!(
        result["ok"] == Value::Bool(true) && status.success(),
        "aioquic client ({status}): error {}, failed cases: {failed:#?}",
        result["error"],
    );
    assert_eq!(result["alpn"], "quic-report/1");
    let names: BTreeSet<&str> = result["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for must in [
        "one_report_per_stream",
        "several_objects_one_stream_no_fin",
        "bad_empty",
        "bad_not_utf8",
        "bad_not_json",
        "bad_nan",
        "bad_not_object_array",
        "bad_truncated",
        "bad_invalid_field_seq",
        "one_byte_frames",
        "oversized",
        "zero_rtt",
        "version_negotiation",
    ] {
        assert!(names.contains(must), "case {must} did not run: {names:?}");
    }

    server.signal(libc::SIGINT);
    let (status, lines) = server.finish(end);
    assert!(status.success(), "our server: {status}");
    let mut recorded = json_lines(&lines);
    let mut good: Vec<Value> = result["good"].as_array().expect("good").clone();
    // Recorded bound to the anonymous identity (the aioquic client has no
    // certificate).
    for g in &mut good {
        g["identity"] = Value::from("");
    }
    let seq = |v: &Value| v["seq"].as_u64().unwrap_or(u64::MAX);
    recorded.sort_by_key(seq);
    good.sort_by_key(seq);
    assert!(
        good.len() >= 20,
        "the client reported its good reports: {good:?}"
    );
    assert_eq!(
        recorded, good,
        "our server must record exactly the good reports, each once"
    );
}

/// Our real client (fed by our source) against `aioquic_server.py`: it
/// exits 0 after 5 acknowledgements, and the aioquic server recorded 5
/// reports with distinct seq and values in [0, 1), one per stream, each
/// stream FINed by our client.
#[test]
fn our_client_against_aioquic_server() {
    python(); // made (or checked) before the clock starts
    let end = Instant::now() + LIMIT;
    // Removed however the test ends.
    let records = common::TempPath::new("interop-records.jsonl");
    let records_arg = records.arg();
    let server = Proc::python(
        "aioquic server",
        "aioquic_server.py",
        &[
            "--port",
            "0",
            "--cert",
            "certs/localhost.pem",
            "--key",
            "certs/localhost.key",
            "--records",
            records_arg,
            "--lifetime",
            "60",
        ],
    );
    let listening = server.wait_stdout_json(end, |v| v["event"] == "listening");
    let addr = listening["addr"].as_str().expect("addr").to_owned();
    let (_source, url) = start_source(end);

    let acks = run_our_client(&addr, &url, 5, end);
    assert_eq!(
        acks.iter().filter(|l| l.starts_with("ack seq=")).count(),
        5,
        "{acks:?}"
    );

    server.signal(libc::SIGTERM);
    let (status, events) = server.finish(end);
    assert!(status.success(), "aioquic server: {status}");
    let text = fs::read_to_string(&records.0).expect("the aioquic server wrote its records");
    let reports = json_lines(&text.lines().map(str::to_owned).collect::<Vec<_>>());
    assert_eq!(reports.len(), 5, "five reports: {reports:?}");
    let seqs: BTreeSet<u64> = reports.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(seqs.len(), 5, "distinct seq: {reports:?}");
    let clients: BTreeSet<&str> = reports
        .iter()
        .filter_map(|r| r["client"].as_str())
        .collect();
    assert_eq!(clients.len(), 1, "one client: {reports:?}");
    for r in &reports {
        let v = r["value"].as_f64().expect("a numeric value");
        assert!((0.0..1.0).contains(&v), "value in [0, 1): {r}");
        assert!(r["id"].is_string() && r["sampled_at_ms"].is_u64(), "{r}");
    }

    // The protocol: a new client-initiated bidirectional stream per report,
    // one object on it, then FIN.
    let events = json_lines(&events);
    let streams: Vec<&Value> = events.iter().filter(|e| e["event"] == "stream").collect();
    assert_eq!(streams.len(), 5, "five streams: {events:?}");
    for s in &streams {
        assert_eq!(s["objects"], 1, "one object per stream: {s}");
        assert_eq!(s["fin"], true, "FIN from our client: {s}");
        assert_eq!(s["stream"].as_u64().map(|id| id % 4), Some(0), "{s}");
    }
    let alpns: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "connection")
        .map(|e| &e["alpn"])
        .collect();
    assert_eq!(alpns, vec!["quic-report/1"], "one connection: {events:?}");
}

/// aioquic's HTTP/0.9 client (`hq-interop`) against our server, after our
/// client has reported seq 1..3: `/latest` holds seq 3 for that client,
/// `/stats` is a JSON object, and another path answers "not found".
#[test]
fn aioquic_h0_client_reads_latest() {
    python(); // made (or checked) before the clock starts
    let end = Instant::now() + LIMIT;
    let (server, addr) = start_our_server(end);
    let (_source, url) = start_source(end);
    run_our_client(&addr, &url, 3, end);
    let client_id = server.wait_stdout_json(end, |v| v["seq"] == 3)["client"]
        .as_str()
        .expect("a client field")
        .to_owned();

    let (status, result) = run_peer(
        "aioquic_h0_get.py",
        &addr,
        "5",
        &["/latest", "/stats", "/nope"],
        end,
    );
    assert!(
        result["ok"] == Value::Bool(true) && status.success(),
        "HTTP/0.9 GETs ({status}): {result:#}"
    );
    assert_eq!(result["alpn"], "hq-interop");
    let body = |path: &str| -> String {
        result["responses"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["path"] == path))
            .and_then(|r| r["body"].as_str())
            .unwrap_or_else(|| panic!("no response for {path}: {result}"))
            .to_owned()
    };

    let latest_body = body("/latest");
    let latest: Value = serde_json::from_str(&latest_body)
        .unwrap_or_else(|e| panic!("/latest is not JSON: {latest_body:?}: {e}"));
    assert!(latest.is_object(), "/latest is a JSON object: {latest}");
    assert_eq!(
        latest[""][client_id.as_str()]["seq"],
        3,
        "/latest holds seq 3 for client {client_id}: {latest}"
    );
    let stats_body = body("/stats");
    let stats: Value = serde_json::from_str(&stats_body)
        .unwrap_or_else(|e| panic!("/stats is not JSON: {stats_body:?}: {e}"));
    assert!(stats.is_object(), "/stats is a JSON object: {stats}");
    let nope = body("/nope");
    assert!(nope.contains("not found"), "/nope: {nope:?}");
}

/// Streams the client resets (RESET_STREAM) before their FIN are released
/// by the server: their unfinished bytes no longer count as unanswered (20
/// streams reset after 60 KB each used to get the connection closed with
/// EXCESSIVE_LOAD), and the server ends its side, so quiche frees them and
/// their stream credit returns (after 100 of them, the stream limit, the
/// connection used to be unable to open a stream).
#[test]
fn aioquic_client_reset_streams_are_released() {
    python(); // made (or checked) before the clock starts
    let end = Instant::now() + LIMIT;
    let (_server, addr) = start_our_server(end);
    let (status, result) = run_peer(
        "aioquic_client.py",
        &addr,
        "5",
        &[
            "--only",
            "reset_streams_free_their_bytes",
            "reset_streams_return_their_credit",
        ],
        end,
    );
    assert!(
        result["ok"] == Value::Bool(true) && status.success(),
        "{:#}",
        result["cases"]
    );
}

/// Against a server with `--client-ca`, aioquic's HTTP/0.9 client: without
/// a certificate the handshake is refused (CONNECTION_CLOSE with
/// CRYPTO_ERROR 0x174, certificate_required) and nothing is answered; with
/// a development client certificate it reads its own entries.
#[test]
fn aioquic_peer_without_certificate_is_refused_at_the_handshake() {
    python();
    let end = Instant::now() + LIMIT;
    let (_server, addr) = start_our_server_with(end, &["--client-ca", "certs/ca.pem"]);
    let get = |extra: &[&str]| {
        let mut args = extra.to_vec();
        args.push("/latest");
        run_peer("aioquic_h0_get.py", &addr, "3", &args, end)
    };
    let (status, refused) = get(&[]);
    assert!(
        !status.success(),
        "refused without a certificate: {refused:#}"
    );
    let responses = refused["responses"]
        .as_array()
        .unwrap_or_else(|| panic!("the peer's result has its responses: {refused:#}"));
    assert!(
        responses
            .iter()
            .all(|r| r["status"] != "complete" && r["body"] == ""),
        "nothing was answered: {refused:#}"
    );
    assert_eq!(
        refused["closed"]["code"],
        0x100 + 116,
        "closed with CRYPTO_ERROR 0x174 (certificate_required): {refused:#}"
    );
    let (status, ok) = get(&[
        "--cert",
        "certs/clients/device-1.pem",
        "--key",
        "certs/clients/device-1.key",
    ]);
    assert!(status.success(), "with a certificate: {ok:#}");
    assert_eq!(
        ok["responses"][0]["body"], "{}\n",
        "nothing of its own yet: {ok:#}"
    );
}
