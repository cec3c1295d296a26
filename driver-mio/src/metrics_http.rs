//! The `--metrics` HTTP endpoint: [`MetricsServer`], `GET /metrics`
//! (Prometheus text of the loop's last published [`Snapshot`]), served by
//! an [`HttpEndpoint`] (its own thread, bounded whoever connects).
//!
//! The endpoint has no authentication: bind it to loopback (the address
//! the README shows) or to a network only the scraper reaches.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::http_endpoint::{HttpEndpoint, Request, Response};
use crate::observe::{Snapshot, prometheus};

/// The metrics endpoint: listening, served until dropped.
#[derive(Debug)]
pub struct MetricsServer {
    endpoint: HttpEndpoint,
}

impl MetricsServer {
    /// Listens on `addr` and serves `snapshot`.
    pub fn start(addr: SocketAddr, snapshot: Arc<Mutex<Snapshot>>) -> io::Result<MetricsServer> {
        let endpoint = HttpEndpoint::start(
            addr,
            "metrics",
            Box::new(move |r: &Request<'_>| answer(r, &snapshot)),
        )?;
        log::info!(
            "metrics on http://{}/metrics (no authentication)",
            endpoint.local_addr()
        );
        Ok(MetricsServer { endpoint })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }
}

/// The answer to one request.
fn answer(r: &Request<'_>, snapshot: &Mutex<Snapshot>) -> Response {
    match (r.method, r.path()) {
        ("GET", "/metrics") => {
            let text = snapshot.lock().map(|s| prometheus(&s)).unwrap_or_default();
            Response::new(200, "text/plain; version=0.0.4", text)
        }
        ("GET", "/") => Response::new(200, "text/plain", "quic-report metrics: GET /metrics\n"),
        ("GET", _) => Response::new(404, "text/plain", "not found\n"),
        _ => Response::new(405, "text/plain", "only GET\n").with_header("Allow", "GET"),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::TcpStream;
    use std::time::Duration;

    use super::*;
    use crate::http_endpoint::tests::get;
    use crate::http_endpoint::{MAX_CONNECTIONS, MAX_HEAD};

    #[test]
    fn idle_connections_past_the_cap_never_keep_a_scrape_out() {
        let snap = Arc::new(Mutex::new(Snapshot {
            recorded: 7,
            ..Snapshot::default()
        }));
        let server =
            MetricsServer::start("127.0.0.1:0".parse().expect("addr"), snap).expect("starts");
        let addr = server.local_addr();
        // Twice the cap, idle: the oldest are closed as new ones come.
        let idle: Vec<TcpStream> = (0..2 * MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        let text = get(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.contains("quic_report_reports_recorded_total 7"),
            "{text}"
        );
        // The first idle ones were closed (EOF, or a reset), not kept.
        let mut first = &idle[0];
        first
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut b = [0u8; 1];
        assert!(
            matches!(first.read(&mut b), Ok(0) | Err(_)),
            "the oldest idle connection is closed"
        );
        assert!(get(addr, b"GET /nope HTTP/1.0\n\n").starts_with("HTTP/1.1 404"));
        assert!(
            get(addr, b"POST /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
                .starts_with("HTTP/1.1 405")
        );
        let huge = [b'a'; MAX_HEAD + 10];
        assert!(get(addr, &huge).starts_with("HTTP/1.1 431"));
        drop(server);
        assert!(TcpStream::connect(addr).is_err(), "stopped when dropped");
    }
}
