//! The mio drivers over real UDP on 127.0.0.1 (port 0 everywhere), in one
//! process: server and client loops on their own threads, samples handed in
//! through `SampleSender`, stops through `StopHandle`. Every test is bounded
//! in time (a watchdog stops the loops) and asserts on what was recorded,
//! never on timing.

mod common;

use common::{client_options, loopback, sample, server_options, start_server, watchdog};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use quic_report_core::{ClientEvent, DisconnectReason, Report};
use quic_report_mio::{ClientDriver, DriverError, FetchOptions, ServerDriver, ServerOptions};

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
    let opts = server_options();
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

/// An HTTP/1.1 server answering `answers` in turn, one connection at a
/// time, keeping each connection open across requests unless the answer
/// says `Connection: close` (`close`). Counts connections and requests.
struct HttpSource {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

fn http_source(answers: Vec<(&'static str, &'static str, bool)>) -> HttpSource {
    let listener = TcpListener::bind(loopback()).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (c, r) = (Arc::clone(&connections), Arc::clone(&requests));
    thread::spawn(move || {
        let mut answers = answers.into_iter();
        'accept: loop {
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let mut buf = Vec::new();
            loop {
                // One request: up to the blank line (GETs have no body).
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut chunk = [0u8; 1024];
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => continue 'accept,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                buf.clear();
                r.fetch_add(1, Ordering::SeqCst);
                let Some((status, body, close)) = answers.next() else {
                    return;
                };
                let connection = if close { "close" } else { "keep-alive" };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
                    body.len()
                );
                if close {
                    continue 'accept;
                }
            }
        }
    });
    HttpSource {
        addr,
        connections,
        requests,
    }
}

/// Runs a client that fetches `url` every 20 ms until `count` reports are
/// acknowledged; returns the values the server recorded, sorted.
fn fetch_and_report(url: String, count: u64) -> Vec<f64> {
    let (addr, server_stop, recorded, server) = start_server();
    let mut opts = client_options(addr);
    let fetch = FetchOptions {
        count: Some(count),
        ..FetchOptions::new(url, Duration::from_millis(20))
    };
    fetch.validate().expect("valid options");
    opts.fetch = Some(fetch);
    opts.count = Some(count);
    let driver = ClientDriver::new(opts).expect("client binds");
    let _dog = watchdog(driver.stop_handle(), Duration::from_secs(20));
    let summary = driver.run(&mut |_, _| {}).expect("client closes cleanly");
    server_stop.stop();
    server.join().expect("server thread").expect("server ok");
    assert_eq!(
        summary.stats.acknowledged, count,
        "stopped by the watchdog?"
    );
    let mut values: Vec<f64> = recorded
        .try_iter()
        .filter_map(|r| r.fields()["value"].as_f64())
        .collect();
    values.sort_by(f64::total_cmp);
    values
}

#[test]
fn the_client_fetches_on_its_schedule_skips_bad_answers_and_stops_after_count() {
    let source = http_source(vec![
        ("200 OK", "[1, 2]", false),
        ("500 Internal Server Error", "{}", false),
        ("200 OK", "not json", true),
        ("200 OK", r#"{"value": 0.5}"#, false),
        ("200 OK", r#"{"value": 0.25}"#, false),
        ("200 OK", r#"{"value": 0.125}"#, false),
    ]);
    let values = fetch_and_report(format!("http://{}/", source.addr), 2);
    assert_eq!(values, [0.25, 0.5]);
    // Each bad answer took a tick; nothing was fetched after the count.
    assert_eq!(source.requests.load(Ordering::SeqCst), 5);
    // Kept alive except after the 500 (the client closes) and the
    // `Connection: close`: requests 1-2, 3, 4-5.
    assert_eq!(source.connections.load(Ordering::SeqCst), 3);
}

#[test]
fn a_source_given_by_host_name_is_looked_up_and_kept_alive() {
    let source = http_source(vec![
        ("200 OK", r#"{"value": 1.5}"#, false),
        ("200 OK", r#"{"value": 2.5}"#, false),
        ("200 OK", r#"{"value": 3.5}"#, false),
    ]);
    let url = format!("http://localhost:{}/value", source.addr.port());
    assert_eq!(fetch_and_report(url, 3), [1.5, 2.5, 3.5]);
    assert_eq!(source.requests.load(Ordering::SeqCst), 3);
    assert_eq!(source.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn a_client_whose_source_refuses_keeps_running_until_stopped() {
    let (addr, server_stop, recorded, server) = start_server();
    let closed = TcpListener::bind(loopback()).expect("bind");
    let url = format!("http://{}/", closed.local_addr().expect("addr"));
    drop(closed);
    let mut opts = client_options(addr);
    opts.fetch = Some(FetchOptions {
        count: Some(1),
        ..FetchOptions::new(url, Duration::from_millis(20))
    });
    let driver = ClientDriver::new(opts).expect("client binds");
    let _dog = watchdog(driver.stop_handle(), Duration::from_millis(300));
    let summary = driver.run(&mut |_, _| {}).expect("a stop is a clean end");
    server_stop.stop();
    server.join().expect("server thread").expect("server ok");
    assert_eq!(summary.stats.acknowledged, 0);
    assert_eq!(recorded.try_iter().count(), 0);
}
