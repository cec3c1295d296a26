//! The `--metrics` HTTP endpoint: [`MetricsServer`], `GET /metrics`
//! (Prometheus text of the loop's last published [`Snapshot`]) on a thread
//! of its own, with bounded resources whoever connects.
//!
//! One mio loop serves every connection without blocking: at most
//! [`MAX_CONNECTIONS`] are open (a new one closes the oldest still waiting
//! for its request, else the oldest), each has [`CONNECTION_TIME`] from its
//! accept to the end of its answer and [`MAX_HEAD`] bytes of request head,
//! and every answer closes its connection. So idle or slow peers cost a
//! bounded table, never a thread or memory each, and a scrape whose request
//! is in is answered whatever idle connections come after it; a peer that
//! keeps opening connections faster than the scraper sends its request can
//! still keep it out while it goes on.
//!
//! (tiny_http, which the `source` program uses, reads each connection on a
//! thread of its own, started whenever all are busy and never capped, with
//! no timeouts: ten thousand idle connections were ten thousand threads in
//! the server's process. Two fixed GETs do not need more than this.)
//!
//! The endpoint has no authentication: bind it to loopback (the address
//! the README shows) or to a network only the scraper reaches.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::observe::{Snapshot, prometheus};

/// Connections open at once at most; one more closes the oldest.
pub const MAX_CONNECTIONS: usize = 64;

/// From a connection's accept to the end of its answer.
pub const CONNECTION_TIME: Duration = Duration::from_secs(5);

/// Bytes of request line and headers at most (`431` past it).
pub const MAX_HEAD: usize = 8 * 1024;

const LISTENER: Token = Token(0);
const WAKE: Token = Token(1);

/// The endpoint: listening, served by its thread until dropped.
pub struct MetricsServer {
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl MetricsServer {
    /// Listens on `addr` and serves `snapshot`.
    pub fn start(addr: SocketAddr, snapshot: Arc<Mutex<Snapshot>>) -> io::Result<MetricsServer> {
        let mut listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                let mut served = Served {
                    poll,
                    listener,
                    conns: HashMap::new(),
                    next: 2,
                    snapshot,
                    accept_again: false,
                };
                if let Err(e) = served.run() {
                    log::warn!("metrics endpoint stopped: {e}");
                }
            })?;
        log::info!("metrics on http://{addr}/metrics (no authentication)");
        Ok(MetricsServer {
            waker,
            thread: Some(thread),
            addr,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if self.waker.wake().is_ok()
            && let Some(t) = self.thread.take()
        {
            let _ = t.join();
        }
    }
}

/// One connection: reading its head, then writing its answer.
struct Conn {
    stream: TcpStream,
    accepted: Instant,
    head: Vec<u8>,
    /// The answer and how much of it is written, once the head is read.
    answer: Option<(Vec<u8>, usize)>,
}

/// What a connection's turn left it as.
enum Next {
    Open,
    Done,
}

/// The endpoint's thread.
struct Served {
    poll: Poll,
    listener: TcpListener,
    conns: HashMap<Token, Conn>,
    next: usize,
    snapshot: Arc<Mutex<Snapshot>>,
    /// An accept failed for want of resources: try again after
    /// [`ACCEPT_RETRY`].
    accept_again: bool,
}

/// How soon a failed accept is tried again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

impl Served {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(128);
        loop {
            let timeout = self
                .conns
                .values()
                .map(|c| c.accepted + CONNECTION_TIME)
                .min()
                .map(|t| t.saturating_duration_since(Instant::now()));
            let timeout = match (timeout, self.accept_again) {
                (Some(t), true) => Some(t.min(ACCEPT_RETRY)),
                (None, true) => Some(ACCEPT_RETRY),
                (t, false) => t,
            };
            match self.poll.poll(&mut events, timeout) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => other?,
            }
            for ev in &events {
                match ev.token() {
                    WAKE => return Ok(()),
                    LISTENER => self.accept(),
                    token => self.turn(token),
                }
            }
            if self.accept_again {
                self.accept();
            }
            let now = Instant::now();
            self.conns
                .retain(|_, c| now.saturating_duration_since(c.accepted) < CONNECTION_TIME);
        }
    }

    fn accept(&mut self) {
        self.accept_again = false;
        loop {
            let (mut stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                // Reset before its accept: the next one.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionAborted | ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                // Out of file descriptors: readiness is edge-triggered, so
                // try again shortly rather than at the next connection.
                Err(e) => {
                    log::debug!("metrics: accept: {e}");
                    self.accept_again = true;
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS
                && let Some(oldest) = self
                    .conns
                    .iter()
                    .min_by_key(|(_, c)| (c.answer.is_some(), c.accepted))
                    .map(|(t, _)| *t)
            {
                self.conns.remove(&oldest);
            }
            let token = Token(self.next);
            self.next = self.next.checked_add(1).unwrap_or(2);
            let interest = Interest::READABLE | Interest::WRITABLE;
            if self
                .poll
                .registry()
                .register(&mut stream, token, interest)
                .is_ok()
            {
                let conn = Conn {
                    stream,
                    accepted: Instant::now(),
                    head: Vec::new(),
                    answer: None,
                };
                self.conns.insert(token, conn);
                // Bytes may have arrived with the connection.
                self.turn(token);
            }
        }
    }

    fn turn(&mut self, token: Token) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        match conn.advance(&self.snapshot) {
            Ok(Next::Open) => {}
            Ok(Next::Done) | Err(_) => {
                self.conns.remove(&token);
            }
        }
    }
}

impl Conn {
    /// Reads what has come, answers once the head is complete, writes what
    /// the socket takes.
    fn advance(&mut self, snapshot: &Mutex<Snapshot>) -> io::Result<Next> {
        if self.answer.is_none() {
            let mut buf = [0u8; 2048];
            loop {
                match self.stream.read(&mut buf) {
                    Ok(0) => return Ok(Next::Done),
                    Ok(n) => self.head.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
                if head_end(&self.head).is_some() || self.head.len() > MAX_HEAD {
                    break;
                }
            }
            let answer = match head_end(&self.head) {
                Some(end) => answer(&self.head[..end], snapshot),
                None if self.head.len() > MAX_HEAD => {
                    response(431, "text/plain", "request head too large\n")
                }
                None => return Ok(Next::Open),
            };
            self.answer = Some((answer, 0));
        }
        let Some((answer, written)) = &mut self.answer else {
            return Ok(Next::Open);
        };
        while *written < answer.len() {
            match self.stream.write(&answer[*written..]) {
                Ok(0) => return Ok(Next::Done),
                Ok(n) => *written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Next::Open),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        // Bytes left unread at the close would make the kernel send a reset,
        // which may destroy the answer before the peer reads it.
        let mut buf = [0u8; 2048];
        for _ in 0..32 {
            match self.stream.read(&mut buf) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        Ok(Next::Done)
    }
}

/// Where the head ends (after its blank line), if it has.
fn head_end(head: &[u8]) -> Option<usize> {
    let crlf = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = head.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The answer to a complete request head.
fn answer(head: &[u8], snapshot: &Mutex<Snapshot>) -> Vec<u8> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => {
            let text = snapshot.lock().map(|s| prometheus(&s)).unwrap_or_default();
            response(200, "text/plain; version=0.0.4", &text)
        }
        ("GET", "/") => response(200, "text/plain", "quic-report metrics: GET /metrics\n"),
        ("GET", _) => response(404, "text/plain", "not found\n"),
        _ => response(405, "text/plain", "only GET\n"),
    }
}

/// An HTTP/1.1 response that closes the connection.
fn response(status: u16, content_type: &str, body: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Request Header Fields Too Large",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;

    fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(request).expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    }

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
        let text = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
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
        assert!(get(addr, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        let huge = [b'a'; MAX_HEAD + 10];
        assert!(get(addr, &huge).starts_with("HTTP/1.1 431"));
        drop(server);
        assert!(TcpStream::connect(addr).is_err(), "stopped when dropped");
    }
}
