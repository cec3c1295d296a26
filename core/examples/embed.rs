//! Embedding the core in your own event loop: a `Server` and a `Client`
//! driven by plain `std::net::UdpSocket`s with read timeouts, no mio, no
//! async runtime. It reports three values and exits.
//!
//! ```sh
//! cargo run -p quic-report-core --example embed
//! ```
//!
//! The loop is the core's contract (the crate docs of `quic_report_core`),
//! nothing more: feed what arrives (or the timeout) in; drain the events,
//! the transmits, and the events again until none; then sleep until
//! `poll_timeout`.

// This file is the application side of the Sans-IO boundary: it owns the
// clock, the sockets and the thread that the core may not touch.
#![allow(clippy::disallowed_methods, clippy::disallowed_macros)]

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use quic_report_core::{
    Client, ClientConfig, ClientEvent, CoreRng, MAX_DATAGRAM_SIZE, Outcome, Sample, Server,
    ServerConfig, ServerEvent, Verify,
};

fn certs(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../certs")
        .join(name)
}

/// Waits for one datagram until `deadline` (or briefly, with no deadline).
fn recv_until(
    sock: &UdpSocket,
    buf: &mut [u8],
    deadline: Option<Instant>,
) -> Option<(usize, SocketAddr)> {
    let wait = deadline.map_or(Duration::from_millis(50), |d| {
        d.saturating_duration_since(Instant::now())
    });
    sock.set_read_timeout(Some(wait.max(Duration::from_millis(1))))
        .ok()?;
    sock.recv_from(buf).ok()
}

fn run_server(sock: UdpSocket, stop: Arc<AtomicBool>) -> Result<(), Box<dyn std::error::Error>> {
    let local = sock.local_addr()?;
    let cfg = ServerConfig::new(certs("localhost.pem"), certs("localhost.key"));
    let mut server = Server::new(cfg, CoreRng::from_seed(1))?;
    let (mut buf, mut out) = (vec![0u8; 65535], vec![0u8; MAX_DATAGRAM_SIZE]);
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        match recv_until(&sock, &mut buf, server.poll_timeout()) {
            Some((n, from)) => {
                let _ = server.handle_datagram(now, from, local, &mut buf[..n]);
            }
            None => server.handle_timeout(Instant::now()),
        }
        server_events(&mut server)?;
        loop {
            while let Some(t) = server.poll_transmit(now, &mut out) {
                sock.send_to(&out[..t.len], t.to)?;
            }
            if !server_events(&mut server)? {
                break;
            }
        }
    }
    Ok(())
}

/// Records (here: prints) and acknowledges every report the server has;
/// false if it had no event.
fn server_events(server: &mut Server) -> Result<bool, Box<dyn std::error::Error>> {
    let mut any = false;
    while let Some(ev) = server.poll_event() {
        any = true;
        if let ServerEvent::Report { handle, report, .. } = ev {
            println!(
                "server recorded {}",
                String::from_utf8_lossy(&report.to_json_line()).trim_end()
            );
            server.respond(Instant::now(), handle, Outcome::Recorded)?;
        }
    }
    Ok(any)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server_sock = UdpSocket::bind("127.0.0.1:0")?;
    let server_addr = server_sock.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || run_server(server_sock, stop).map_err(|e| e.to_string()))
    };

    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(server_addr)?;
    let local = sock.local_addr()?;
    let cfg = ClientConfig::new(server_addr, local, Verify::CaFile(certs("ca.pem")));
    let mut client = Client::new(cfg, CoreRng::from_seed(2), Instant::now())?;
    for v in [0.25, 0.5, 0.75] {
        let mut fields = serde_json::Map::new();
        fields.insert("value".into(), v.into());
        client.submit(
            Instant::now(),
            Sample {
                fields,
                sampled_at_ms: 0,
            },
        );
    }
    let (mut buf, mut out) = (vec![0u8; 65535], vec![0u8; MAX_DATAGRAM_SIZE]);
    let (mut acked, give_up) = (0, Instant::now() + Duration::from_secs(20));
    while !client.is_finished() && Instant::now() < give_up {
        let now = Instant::now();
        let mut client_events = |client: &mut Client| {
            let mut any = false;
            while let Some(ev) = client.poll_event() {
                any = true;
                println!("client event: {ev:?}");
                if let ClientEvent::Acknowledged { .. } = ev {
                    acked += 1;
                    if acked == 3 {
                        client.close(Instant::now());
                    }
                }
            }
            any
        };
        client_events(&mut client);
        loop {
            while let Some(t) = client.poll_transmit(now, &mut out) {
                sock.send(&out[..t.len])?;
            }
            if !client_events(&mut client) {
                break;
            }
        }
        match recv_until(&sock, &mut buf, client.poll_timeout()) {
            Some((n, from)) => {
                let _ = client.handle_datagram(Instant::now(), from, local, &mut buf[..n]);
            }
            None => client.handle_timeout(Instant::now()),
        }
    }
    // Send the CONNECTION_CLOSE and stop the server.
    while let Some(t) = client.poll_transmit(Instant::now(), &mut out) {
        sock.send(&out[..t.len])?;
    }
    stop.store(true, Ordering::Relaxed);
    server.join().map_err(|_| "server thread panicked")??;
    if acked != 3 {
        return Err(format!("only {acked} of 3 reports acknowledged").into());
    }
    println!("3 reports acknowledged");
    Ok(())
}
