//! The mio drivers over real UDP on 127.0.0.1 (port 0 everywhere), in one
//! process: server and client loops on their own threads, samples handed in
//! through `SampleSender`, stops through `StopHandle`. Every test is bounded
//! in time (a watchdog stops the loops) and asserts on what was recorded,
//! never on timing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use quic_report_core::{ClientEvent, DisconnectReason, Report, Sample, Verify};
use quic_report_mio::{
    ClientDriver, ClientOptions, DriverError, FetchOptions, Fetcher, ServerDriver, ServerOptions,
    StopHandle,
};

fn certs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../certs")
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn sample(v: f64) -> Sample {
    Sample::from_json(serde_json::json!({ "value": v }).to_string().as_bytes(), 1)
        .expect("an object")
}

/// Starts a server on a free port; its recorded reports come out of the
/// receiver. Returns its address, its stop handle and its thread.
fn start_server() -> (
    SocketAddr,
    StopHandle,
    mpsc::Receiver<Report>,
    thread::JoinHandle<Result<(), DriverError>>,
) {
    let dir = certs();
    let mut opts = ServerOptions::new(
        loopback(),
        dir.join("localhost.pem"),
        dir.join("localhost.key"),
    );
    opts.handle_signals = false;
    let driver = ServerDriver::bind(opts).expect("server binds");
    let addr = driver.local_addr();
    let stop = driver.stop_handle();
    let (tx, rx) = mpsc::channel();
    let thread = thread::spawn(move || {
        let mut sink = move |r: &Report| {
            let _ = tx.send(r.clone());
            Ok(())
        };
        driver.run(&mut sink, &mut |_| {})
    });
    (addr, stop, rx, thread)
}

fn client_options(server: SocketAddr) -> ClientOptions {
    let mut opts = ClientOptions::new(server, Verify::CaFile(certs().join("ca.pem")));
    opts.handle_signals = false;
    opts
}

/// Stops `stop` after `after` unless the returned sender is dropped first.
fn watchdog(stop: StopHandle, after: Duration) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(after) {
            stop.stop();
        }
    });
    tx
}

#[test]
fn reports_are_recorded_once_and_client_closes_after_count() {
    let (addr, server_stop, recorded, server) = start_server();
    let mut opts = client_options(addr);
    opts.count = Some(3);
    let driver = ClientDriver::new(opts).expect("client binds");
    let _dog = watchdog(driver.stop_handle(), Duration::from_secs(20));
    let samples = driver.sample_sender();
    for v in [0.25, 0.5, 0.75] {
        samples.send(sample(v)).expect("loop alive");
    }
    let mut acks = Vec::new();
    let summary = driver
        .run(&mut |ev, _| {
            if let ClientEvent::Acknowledged { seq, .. } = ev {
                acks.push(*seq);
            }
        })
        .expect("client closes cleanly");
    server_stop.stop();
    server.join().expect("server thread").expect("server ok");

    assert_eq!(acks.len(), 3, "acks: {acks:?}");
    assert_eq!(summary.stats.acknowledged, 3);
    assert_eq!(summary.unacknowledged, 0);
    let reports: Vec<Report> = recorded.try_iter().collect();
    let mut seqs: Vec<u64> = reports.iter().filter_map(|r| r.seq).collect();
    seqs.sort_unstable();
    acks.sort_unstable();
    assert_eq!(seqs, acks);
    let mut values: Vec<f64> = reports
        .iter()
        .filter_map(|r| r.fields()["value"].as_f64())
        .collect();
    values.sort_by(f64::total_cmp);
    assert_eq!(values, [0.25, 0.5, 0.75]);
}

#[test]
fn stop_handle_ends_a_client_that_never_connects() {
    // A socket that never answers: no ICMP, so the client keeps retrying.
    let silent = UdpSocket::bind(loopback()).expect("bind");
    let driver = ClientDriver::new(client_options(silent.local_addr().expect("addr")))
        .expect("client binds");
    let stop = driver.stop_handle();
    let _dog = watchdog(stop.clone(), Duration::from_millis(300));
    let started = Instant::now();
    let summary = driver.run(&mut |_, _| {}).expect("a stop is a clean end");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(summary.stats.connections, 0);
    assert!(summary.stats.attempts >= 1);
}

#[test]
fn a_server_stopped_before_it_runs_returns() {
    let dir = certs();
    let mut opts = ServerOptions::new(
        loopback(),
        dir.join("localhost.pem"),
        dir.join("localhost.key"),
    );
    opts.handle_signals = false;
    opts.stop.stop();
    let driver = ServerDriver::bind(opts).expect("server binds");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(driver.run(&mut |_: &Report| Ok(()), &mut |_| {}));
    });
    let res = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the server returns");
    assert!(res.is_ok(), "{res:?}");
}

#[test]
fn refused_certificate_fails_the_client() {
    let (addr, server_stop, _recorded, server) = start_server();
    let mut opts = client_options(addr);
    opts.config.server_name = "not-the-certificate-name.example".into();
    let driver = ClientDriver::new(opts).expect("client binds");
    let _dog = watchdog(driver.stop_handle(), Duration::from_secs(20));
    let err = driver.run(&mut |_, _| {}).expect_err("certificate refused");
    server_stop.stop();
    server.join().expect("server thread").expect("server ok");
    assert!(
        matches!(
            err,
            DriverError::ClientFailed(DisconnectReason::Certificate(_))
        ),
        "{err}"
    );
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[test]
fn missing_certificate_is_a_bind_time_error() {
    let opts = ServerOptions::new(
        loopback(),
        PathBuf::from("/nonexistent/cert.pem"),
        PathBuf::from("/nonexistent/key.pem"),
    );
    let err = ServerDriver::bind(opts).expect_err("no key file");
    assert!(err.to_string().contains("/nonexistent/key.pem"), "{err}");
}

/// A one-connection-per-request HTTP server answering `bodies` in turn.
fn http_server(bodies: Vec<(&'static str, &'static str)>) -> SocketAddr {
    let listener = TcpListener::bind(loopback()).expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for (status, body) in bodies {
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

#[test]
fn fetcher_skips_bad_answers_and_stops_after_count() {
    let addr = http_server(vec![
        ("200 OK", "[1, 2]"),
        ("500 Internal Server Error", "{}"),
        ("200 OK", "not json"),
        ("200 OK", r#"{"value": 0.5}"#),
        ("200 OK", r#"{"value": 0.25}"#),
        ("200 OK", r#"{"value": 0.125}"#),
    ]);
    let poll = mio::Poll::new().expect("poll");
    let waker =
        std::sync::Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker"));
    let (tx, rx) = mpsc::channel();
    let opts = FetchOptions {
        url: format!("http://{addr}/"),
        interval: Duration::from_millis(20),
        count: Some(2),
    };
    opts.validate().expect("valid options");
    let _fetcher = Fetcher::spawn(opts, tx, waker).expect("spawn");
    // The thread drops its sender when it is done: collect until then.
    let mut values = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(s) => values.extend(s.fields["value"].as_f64()),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("the fetcher did not stop after its count")
            }
        }
    }
    assert_eq!(values, [0.5, 0.25]);
}

#[test]
fn fetch_options_are_checked() {
    let ok = FetchOptions {
        url: "http://127.0.0.1:8000/".into(),
        interval: Duration::from_secs(2),
        count: None,
    };
    assert!(ok.validate().is_ok());
    for url in ["ftp://x/", "127.0.0.1:8000", "http://"] {
        let o = FetchOptions {
            url: url.into(),
            ..ok.clone()
        };
        assert!(o.validate().is_err(), "{url} accepted");
    }
    let zero = FetchOptions {
        interval: Duration::ZERO,
        ..ok
    };
    assert!(zero.validate().is_err());
}
