//! Proxies as users set them: the real `quic-report client` binary with
//! `HTTP_PROXY` / `HTTPS_PROXY` / `NO_PROXY` in its environment, a real
//! `source` (or a small HTTPS source signed by the development CA) and a
//! real `server --out FILE`, and a `CONNECT` proxy in the test on 127.0.0.1
//! that writes down every tunnel and every request line it carried. The
//! tests assert on what went through the proxy and on what the server
//! recorded. Every wait is bounded; every child is killed when its test
//! ends.

mod common;

use common::{EXE, LIMIT, Logged};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;

/// What passed through the proxy.
#[derive(Debug, Default)]
struct Seen {
    /// The target of each `CONNECT` tunnel.
    tunnels: Vec<String>,
    /// Request lines (`GET / HTTP/1.1`) seen inside plain-HTTP tunnels.
    requests: Vec<String>,
}

/// A `CONNECT` proxy on 127.0.0.1 that records what it carries.
fn counting_proxy() -> (SocketAddr, Arc<Mutex<Seen>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let addr = l.local_addr().expect("proxy address");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let log = Arc::clone(&seen);
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(client) = conn else { return };
            let log = Arc::clone(&log);
            thread::spawn(move || tunnel(client, &log));
        }
    });
    (addr, seen)
}

/// One proxied connection: `CONNECT host:port`, then bytes both ways; the
/// client's request lines are written down as they pass.
fn tunnel(client: TcpStream, log: &Mutex<Seen>) {
    let Ok(reader) = client.try_clone() else {
        return;
    };
    let mut from_client = BufReader::new(reader);
    let mut to_client = client;
    let mut head = String::new();
    let _ = from_client.read_line(&mut head);
    let mut line = String::new();
    while from_client.read_line(&mut line).is_ok_and(|n| n > 2) {
        line.clear();
    }
    let mut words = head.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
        let _ =
            to_client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    log.lock().expect("log").tunnels.push(target.to_owned());
    let Ok(upstream) = TcpStream::connect(target) else {
        let _ = to_client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    let _ = to_client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
    let (Ok(mut up_r), mut up_w) = (upstream.try_clone(), upstream) else {
        return;
    };
    thread::spawn(move || {
        let _ = io::copy(&mut up_r, &mut to_client);
        let _ = to_client.shutdown(std::net::Shutdown::Write);
    });
    // Client to upstream, chunk by chunk, noting request lines.
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from_client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                for l in String::from_utf8_lossy(&buf[..n]).lines() {
                    if l.starts_with("GET ") {
                        log.lock().expect("log").requests.push(l.to_owned());
                    }
                }
                if up_w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = up_w.shutdown(std::net::Shutdown::Write);
}

/// An HTTPS source with the development certificate (localhost, 127.0.0.1,
/// ::1; signed by certs/ca.pem): `{"value": 42}`, one request per
/// connection.
fn https_source() -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = certs();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join("localhost.pem"))
            .expect("certificate file")
            .collect::<Result<_, _>>()
            .expect("certificates");
    let key = PrivateKeyDer::from_pem_file(dir.join("localhost.key")).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    let config = Arc::new(config);
    let l = TcpListener::bind("127.0.0.1:0").expect("bind the https source");
    let addr = l.local_addr().expect("address");
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(tcp) = conn else { return };
            let config = Arc::clone(&config);
            thread::spawn(move || {
                let Ok(tls) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut s = BufReader::new(rustls::StreamOwned::new(tls, tcp));
                let mut line = String::new();
                while s.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let body = r#"{"value": 42}"#;
                let s = s.get_mut();
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                s.conn.send_close_notify();
                let _ = s.flush();
            });
        }
    });
    addr
}

fn certs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../certs")
}

/// A directory in the temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d =
            std::env::temp_dir().join(format!("quic-report-proxy-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).expect("mkdir");
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `value` of each complete JSON line the server wrote to `path`.
fn recorded(path: &Path) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            v["value"].as_f64().expect("a value")
        })
        .collect()
}

/// Runs a server on `out`, then `client --count 3` against it fetching
/// `source` with exactly `env` as its proxy settings (the test's own
/// proxy variables are removed); waits for both, returns what was
/// recorded.
fn report_three(name: &str, source: &str, extra: &[&str], env: &[(&str, String)]) -> Vec<f64> {
    let dir = TempDir::new(name);
    let out = dir.0.join("out.jsonl");
    let out_s = out.to_str().expect("UTF-8");
    let mut server = Logged::spawn(
        "server",
        &["server", "--listen", "127.0.0.1:0", "--out", out_s],
    );
    let listen = server.wait_for("listening on ");
    let mut cmd = Command::new(EXE);
    cmd.args([
        "client",
        "--server",
        &listen,
        "--source",
        source,
        "--interval",
        "100ms",
        "--count",
        "3",
    ])
    .args(extra);
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let client = Logged::spawn_command("client", cmd);
    let (status, acks) = client.finish();
    assert!(status.success(), "client: {status}\n{acks}");
    assert_eq!(acks.lines().count(), 3, "three acknowledgements:\n{acks}");
    server.signal(libc::SIGINT);
    assert!(server.wait(LIMIT).success(), "the server stops on SIGINT");
    recorded(&out)
}

#[test]
fn http_proxy_from_the_environment_carries_every_fetch() {
    let source = Logged::spawn("source", &["source", "--listen", "127.0.0.1:0"]);
    let url = source.wait_for("serving GET / on ");
    let source_addr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let (proxy, seen) = counting_proxy();
    let values = report_three(
        "http",
        &url,
        &[],
        &[("HTTP_PROXY", format!("http://{proxy}"))],
    );
    assert_eq!(values.len(), 3, "three reports recorded: {values:?}");
    assert!(values.iter().all(|v| (0.0..1.0).contains(v)), "{values:?}");
    let seen = seen.lock().expect("log");
    assert!(
        !seen.tunnels.is_empty() && seen.tunnels.iter().all(|t| *t == source_addr),
        "every tunnel to the source: {seen:?}"
    );
    assert!(
        seen.requests.len() >= 3 && seen.requests.iter().all(|r| r.starts_with("GET / ")),
        "every GET through the proxy: {seen:?}"
    );
}

#[test]
fn no_proxy_covering_the_source_goes_around_the_proxy() {
    let source = Logged::spawn("source", &["source", "--listen", "127.0.0.1:0"]);
    let url = source.wait_for("serving GET / on ");
    let (proxy, seen) = counting_proxy();
    let values = report_three(
        "no-proxy",
        &url,
        &[],
        &[
            ("HTTP_PROXY", format!("http://{proxy}")),
            ("NO_PROXY", "example.com,127.0.0.1".into()),
        ],
    );
    assert_eq!(values.len(), 3, "three reports recorded: {values:?}");
    let seen = seen.lock().expect("log");
    assert!(
        seen.tunnels.is_empty() && seen.requests.is_empty(),
        "nothing through the proxy: {seen:?}"
    );
}

#[test]
fn https_proxy_from_the_environment_tunnels_an_https_source() {
    let tls = https_source();
    let (proxy, seen) = counting_proxy();
    let ca = certs().join("ca.pem");
    let values = report_three(
        "https",
        &format!("https://localhost:{}/", tls.port()),
        &["--source-ca", ca.to_str().expect("UTF-8")],
        &[
            ("HTTPS_PROXY", format!("http://{proxy}")),
            // Not for https sources: it must not be the one used.
            ("HTTP_PROXY", "http://127.0.0.1:9".into()),
        ],
    );
    assert_eq!(values, [42.0, 42.0, 42.0], "three reports recorded");
    let seen = seen.lock().expect("log");
    let target = format!("localhost:{}", tls.port());
    assert!(
        seen.tunnels.len() >= 3 && seen.tunnels.iter().all(|t| *t == target),
        "one tunnel per fetch (the source closes each connection): {seen:?}"
    );
    assert!(
        seen.requests.is_empty(),
        "TLS inside the tunnel: no plain request line: {seen:?}"
    );
}

/// A proxy URL may carry a password: the client names the proxy in its
/// log and in every failed fetch, never with the password.
#[test]
fn a_proxy_password_never_reaches_the_log() {
    let mut cmd = Command::new(EXE);
    cmd.args([
        "client",
        "--server",
        "127.0.0.1:9",
        "--source",
        "http://192.0.2.1/",
        "--interval",
        "100ms",
        "--count",
        "2",
    ]);
    for var in [
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    // Nothing listens on port 9: every fetch fails at the proxy.
    cmd.env("HTTP_PROXY", "http://alice:s3cret@127.0.0.1:9")
        .env("NO_PROXY", "")
        .env("no_proxy", "");
    let client = Logged::spawn_command("client", cmd);
    let named = client.wait_for("fetching through the proxy ");
    assert!(named.starts_with("http://alice:***@127.0.0.1:9"), "{named}");
    let failed = client.wait_for("failed");
    assert!(failed.contains("alice:***@"), "{failed}");
    // Every line so far, those read past on the way included (the start
    // lines, the beginning of the failure's).
    let seen = client.all_lines();
    assert!(seen.len() >= 2, "{seen:?}");
    client.kill();
    assert!(
        seen.iter().all(|l| !l.contains("s3cret")),
        "the password in the log: {seen:?}"
    );
}
