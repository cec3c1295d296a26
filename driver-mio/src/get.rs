//! `quic-report get`: one HTTP/0.9 GET over our own core ([`HqGet`]) on a
//! connected UDP socket, blocking until the body or a failure.
//!
//! One request, one connection: a plain loop over a `std` socket with a
//! read timeout is all it needs (the core's contract is the same as
//! anywhere: feed, drain `poll_transmit`, wait until `poll_timeout`).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use quic_report_core::{
    CertFiles, CoreRng, GetConfig, GetOutcome, HqGet, MAX_DATAGRAM_SIZE, Response, Verify,
};

use crate::turn::Wait;
use crate::{DriverError, RECV_BUF_SIZE, debuglog, os_seed};

/// What to fetch.
#[derive(Debug, Clone)]
pub struct GetOptions {
    /// The server.
    pub server: SocketAddr,
    /// The name to verify in its certificate.
    pub server_name: String,
    /// Certificate verification.
    pub verify: Verify,
    /// Our client certificate, for a server that requires one.
    pub client_cert: Option<CertFiles>,
    /// The path (`/latest`, `/stats`, ...).
    pub path: String,
    /// Give up after this long.
    pub timeout: Duration,
}

/// Fetches `opts.path`; the body, or an error naming what went wrong. A
/// body that is an error object (`{"ok":false,"code":"forbidden",...}`: the
/// server refused this identity the read) is [`DriverError::ReadRefused`].
pub fn run_get(opts: GetOptions) -> Result<Vec<u8>, DriverError> {
    let any = crate::udp::unspecified(opts.server);
    let sock = UdpSocket::bind(any).map_err(|source| DriverError::Bind { addr: any, source })?;
    sock.connect(opts.server)
        .map_err(DriverError::io("connecting the UDP socket"))?;
    let local = sock
        .local_addr()
        .map_err(DriverError::io("reading the socket address"))?;
    let cfg = GetConfig {
        server: opts.server,
        local,
        server_name: opts.server_name,
        verify: opts.verify,
        client_cert: opts.client_cert,
        path: opts.path,
        timeout: opts.timeout,
    };
    let logs = debuglog::from_env().map_err(DriverError::io("opening debug logs"))?;
    let mut get = HqGet::new(
        cfg,
        CoreRng::from_seed_bytes(os_seed()?),
        Instant::now(),
        logs,
    )?;
    let (mut buf, mut out) = (vec![0u8; RECV_BUF_SIZE], vec![0u8; MAX_DATAGRAM_SIZE]);
    while !get.is_finished() {
        while let Some(t) = get.poll_transmit(&mut out) {
            // A lost send is QUIC's to repair; an unreachable server shows
            // up as a receive error below.
            let _ = sock.send(&out[..t.len]);
        }
        if get.is_finished() {
            break;
        }
        let wait = Wait::new(Instant::now(), get.poll_timeout(), Duration::from_millis(1));
        sock.set_read_timeout(Some(wait.timeout().unwrap_or(Duration::from_millis(100))))
            .map_err(DriverError::io("setting the read timeout"))?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                let now = Instant::now();
                let _ = get.handle_datagram(now, opts.server, local, &mut buf[..n]);
                // Datagrams that keep coming (junk sent faster than the
                // read timeout) must not keep the timers from firing, the
                // overall deadline among them.
                if get.poll_timeout().is_some_and(|t| t <= now) {
                    get.handle_timeout(now);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                get.handle_timeout(Instant::now());
            }
            Err(e) if crate::udp::is_unreachable(&e) => {
                return Err(DriverError::Io {
                    what: "reaching the server",
                    source: e,
                });
            }
            Err(e) => {
                return Err(DriverError::Io {
                    what: "receiving",
                    source: e,
                });
            }
        }
    }
    // Send the CONNECTION_CLOSE before returning.
    while let Some(t) = get.poll_transmit(&mut out) {
        let _ = sock.send(&out[..t.len]);
    }
    match get.outcome() {
        Some(GetOutcome::Done(body)) => match Response::parse(body) {
            Ok(Response::Error { code, error }) => Err(DriverError::ReadRefused { code, error }),
            _ => Ok(body.clone()),
        },
        Some(GetOutcome::Failed(reason)) => Err(DriverError::ClientFailed(reason.clone())),
        None => Err(DriverError::InvalidOption(
            "the GET ended without an outcome".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From review: a "server" that answers junk every 0.5 ms (faster than
    /// the read timeout's 1 ms floor) kept `get` from ever reaching its
    /// deadline. It now fails at its timeout.
    #[test]
    fn junk_arriving_faster_than_the_read_timeout_does_not_outlast_the_timeout() {
        let junk = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let server = junk.local_addr().expect("addr");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let blaster = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            junk.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let Ok((_, client)) = junk.recv_from(&mut buf) else {
                return;
            };
            // At most 10 s: the get's end without the fix.
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end && !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = junk.send_to(&[0x40; 40], client);
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        let started = Instant::now();
        let res = run_get(GetOptions {
            server,
            server_name: "localhost".into(),
            verify: Verify::Insecure,
            client_cert: None,
            path: "/latest".into(),
            timeout: Duration::from_secs(1),
        });
        let took = started.elapsed();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(res.is_err(), "no answer: {res:?}");
        // Without the fix it ends only when the junk stops, after 10 s; at
        // its 1 s timeout with it. 8 s leaves a slow machine room.
        assert!(took < Duration::from_secs(8), "ended after {took:?}");
        let _ = blaster.join();
    }
}
