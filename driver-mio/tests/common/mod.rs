//! Helpers shared by the driver tests: the development certificates,
//! samples, server and client options for loopback, servers run on a
//! thread, and a watchdog that stops a loop which runs too long.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use quic_report_core::{Report, Sample, Verify};
use quic_report_mio::{
    ClientOptions, DriverError, ReportSink, ServerDriver, ServerOptions, StopHandle,
};

/// The repository's `certs/`.
pub fn certs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../certs")
}

/// 127.0.0.1, port 0.
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub fn sample(v: f64) -> Sample {
    Sample::from_json(serde_json::json!({ "value": v }).to_string().as_bytes(), 1)
        .expect("an object")
}

/// A server on a free loopback port with the development certificate,
/// not handling signals.
pub fn server_options() -> ServerOptions {
    let dir = certs();
    let mut opts = ServerOptions::new(
        loopback(),
        dir.join("localhost.pem"),
        dir.join("localhost.key"),
    );
    opts.handle_signals = false;
    opts
}

/// A client of `server` trusting the development CA, not handling signals.
pub fn client_options(server: SocketAddr) -> ClientOptions {
    let mut opts = ClientOptions::new(server, Verify::CaFile(certs().join("ca.pem")));
    opts.handle_signals = false;
    opts
}

/// Runs a server with `opts` and `sink` on a thread: its address, its stop
/// handle and its thread.
pub fn start_server_with(
    opts: ServerOptions,
    mut sink: impl ReportSink + Send + 'static,
) -> (
    SocketAddr,
    StopHandle,
    thread::JoinHandle<Result<(), DriverError>>,
) {
    let driver = ServerDriver::bind(opts).expect("server binds");
    let addr = driver.local_addr();
    let stop = driver.stop_handle();
    let thread = thread::spawn(move || driver.run(&mut sink, &mut |_| {}));
    (addr, stop, thread)
}

/// Starts a server on a free port; its recorded reports come out of the
/// receiver. Returns its address, its stop handle and its thread.
pub fn start_server() -> (
    SocketAddr,
    StopHandle,
    mpsc::Receiver<Report>,
    thread::JoinHandle<Result<(), DriverError>>,
) {
    let (tx, rx) = mpsc::channel();
    let sink = move |r: &Report| -> std::io::Result<()> {
        let _ = tx.send(r.clone());
        Ok(())
    };
    let (addr, stop, thread) = start_server_with(server_options(), sink);
    (addr, stop, rx, thread)
}

/// Stops `stop` after `after` unless the returned sender is dropped first.
pub fn watchdog(stop: StopHandle, after: Duration) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(after) {
            stop.stop();
        }
    });
    tx
}
