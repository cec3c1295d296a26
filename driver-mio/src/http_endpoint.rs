//! [`HttpEndpoint`]: a small HTTP/1.1 server on a thread of its own,
//! with bounded resources whoever connects, for fixed answers computed
//! from the request line: the server's `--metrics` ([`crate::metrics_http`])
//! and the `source` program.
//!
//! One mio loop serves every connection without blocking: at most
//! [`MAX_CONNECTIONS`] are open (a new one closes the oldest still waiting
//! for its request, else the oldest), each has [`CONNECTION_TIME`] from its
//! accept (or its previous answer) to the end of its answer and
//! [`MAX_HEAD`] bytes of request head. An HTTP/1.1 request without a body
//! or `Connection: close` leaves its connection open for the next one (a
//! client's keep-alive: a fetch every 2 s reuses one connection); every
//! other answer closes it. A request's body is never read (it is not
//! waited for either: the answer comes once the head is in). So
//! idle or slow peers cost a bounded table, never a thread or memory each,
//! and a request whose head is in is answered whatever idle connections
//! come after it; a peer that keeps opening connections faster than a
//! client sends its request can still keep it out while it goes on.
//!
//! (tiny_http, which the `source` program used before, reads each
//! connection on a thread of its own, started whenever all are busy and
//! never capped, with no timeouts: ten thousand idle connections were ten
//! thousand threads; and it read the body a request announced before
//! taking the next request, so one `POST` whose body never came stopped
//! the source, and a `Content-Length` near 2^64 aborted it.)

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

/// Connections open at once at most; one more closes the oldest.
pub const MAX_CONNECTIONS: usize = 64;

/// From a connection's accept, or its previous answer, to the end of its
/// answer (so also how long a kept-alive connection waits for its next
/// request).
pub const CONNECTION_TIME: Duration = Duration::from_secs(5);

/// Bytes of request line and headers at most (`431` past it).
pub const MAX_HEAD: usize = 8 * 1024;

const LISTENER: Token = Token(0);
const WAKE: Token = Token(1);

/// A request, as far as an answer needs it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Who sent it.
    pub peer: SocketAddr,
    /// `GET`, ... (as sent).
    pub method: &'a str,
    /// The request target, query included (`/`, `/metrics?x=1`).
    pub target: &'a str,
}

impl Request<'_> {
    /// The target without its query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or(self.target)
    }
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// 200, 404, ...
    pub status: u16,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Other headers (`Allow: GET`, ...).
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: String,
}

impl Response {
    /// `status` with a body of `content_type`.
    pub fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// The same with one more header.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// The bytes on the wire: HTTP/1.1, and `Connection: close` unless
    /// `keep_alive`.
    fn encode(&self, keep_alive: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            _ => "",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if !keep_alive {
            head.push_str("Connection: close\r\n");
        }
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

/// What answers each request, on the endpoint's thread.
pub type Handler = Box<dyn FnMut(&Request<'_>) -> Response + Send>;

/// The endpoint: listening, served by its thread until dropped.
pub struct HttpEndpoint {
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl std::fmt::Debug for HttpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpEndpoint")
            .field("addr", &self.addr)
            .finish()
    }
}

impl HttpEndpoint {
    /// Listens on `addr` and answers each request with `handler`, on a
    /// thread named `thread_name`.
    pub fn start(
        addr: SocketAddr,
        thread_name: &str,
        handler: Handler,
    ) -> io::Result<HttpEndpoint> {
        let mut listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let name = thread_name.to_owned();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let mut served = Served {
                    poll,
                    listener,
                    conns: HashMap::new(),
                    next: 2,
                    handler,
                    accept_again: false,
                };
                if let Err(e) = served.run() {
                    log::warn!("{name}: HTTP endpoint stopped: {e}");
                }
            })?;
        Ok(HttpEndpoint {
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

impl Drop for HttpEndpoint {
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
    peer: SocketAddr,
    /// Its accept, or the end of its previous answer.
    since: Instant,
    /// The answer being written leaves the connection open for another.
    keep_alive: bool,
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
    handler: Handler,
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
                .map(|c| c.since + CONNECTION_TIME)
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
                .retain(|_, c| now.saturating_duration_since(c.since) < CONNECTION_TIME);
        }
    }

    fn accept(&mut self) {
        self.accept_again = false;
        loop {
            let (mut stream, peer) = match self.listener.accept() {
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
                    log::debug!("HTTP endpoint: accept: {e}");
                    self.accept_again = true;
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS
                && let Some(oldest) = self
                    .conns
                    .iter()
                    .min_by_key(|(_, c)| (c.answer.is_some(), c.since))
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
                    peer,
                    since: Instant::now(),
                    keep_alive: false,
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
        match conn.advance(&mut self.handler) {
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
    fn advance(&mut self, handler: &mut Handler) -> io::Result<Next> {
        loop {
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
                let (answer, keep) = match head_end(&self.head) {
                    Some(end) => {
                        let head = &self.head[..end];
                        let keep = keeps_alive(head);
                        let answer = answer(head, self.peer, handler);
                        let keep = keep && answer.status != 400;
                        // A request sent behind it stays for the next turn.
                        self.head.drain(..end);
                        (answer, keep)
                    }
                    None if self.head.len() > MAX_HEAD => (
                        Response::new(431, "text/plain", "request head too large\n"),
                        false,
                    ),
                    None => return Ok(Next::Open),
                };
                self.answer = Some((answer.encode(keep), 0));
                self.keep_alive = keep;
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
            if !self.keep_alive {
                break;
            }
            // Kept for the next request, which has CONNECTION_TIME from now
            // (an idle one is the first closed to make room). Readiness is
            // edge-triggered: read on at once, what came meanwhile included.
            self.answer = None;
            self.since = Instant::now();
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

/// Whether the connection may carry another request after this one's
/// answer: HTTP/1.1 without `Connection: close`, and no body (a body is
/// never read, so what follows the head would not be the next request).
fn keeps_alive(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let mut lines = text.lines();
    let http11 = lines
        .next()
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("http/1.1"));
    http11
        && !lines.any(|l| match l.split_once(':') {
            Some((name, value)) => match name.trim() {
                "connection" => value.split(',').any(|v| v.trim() == "close"),
                "content-length" => value.trim() != "0",
                "transfer-encoding" => true,
                _ => false,
            },
            None => false,
        })
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

/// The answer to a complete request head: `handler`'s, for a request line
/// of a method and a target (`400` for anything else).
fn answer(head: &[u8], peer: SocketAddr, handler: &mut Handler) -> Response {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some(method), Some(target)) => handler(&Request {
            peer,
            method,
            target,
        }),
        _ => Response::new(400, "text/plain", "bad request line\n"),
    }
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
        let _ = s.read_to_string(&mut out);
        out
    }

    /// From review (of the `source` on tiny_http): a request whose body
    /// never comes, or whose `Content-Length` is near 2^64, is answered from
    /// its head and holds nothing up; the next request is answered at once.
    #[test]
    fn a_body_announced_and_never_sent_holds_nothing_up() {
        let endpoint = HttpEndpoint::start(
            "127.0.0.1:0".parse().expect("addr"),
            "test-http",
            Box::new(|r: &Request<'_>| {
                Response::new(200, "text/plain", format!("{} {}", r.method, r.path()))
                    .with_header("X-Peer", r.peer.ip().to_string())
            }),
        )
        .expect("starts");
        let addr = endpoint.local_addr();
        let mut held = TcpStream::connect(addr).expect("connect");
        held.write_all(b"POST / HTTP/1.1\r\nContent-Length: 2000\r\n\r\n")
            .expect("write");
        let mut huge = TcpStream::connect(addr).expect("connect");
        huge.write_all(b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\nab")
            .expect("write");
        let text = get(
            addr,
            b"GET /?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("\r\nX-Peer: 127.0.0.1\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nGET /"), "{text}");
        // The held ones were answered from their heads too.
        held.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut out = String::new();
        let _ = held.read_to_string(&mut out);
        assert!(out.ends_with("POST /"), "{out}");
        assert!(get(addr, b"nonsense\r\n\r\n").starts_with("HTTP/1.1 400"));

        // HTTP/1.1 without a body: one connection for several requests,
        // a second sent behind the first included; `Connection: close`
        // ends it.
        let mut kept = TcpStream::connect(addr).expect("connect");
        kept.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        kept.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let mut got = String::new();
        let mut buf = [0u8; 1024];
        while !got.contains("GET /b") {
            let n = kept.read(&mut buf).expect("both answers, connection open");
            assert!(n > 0, "closed after {got:?}");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(!got.contains("Connection: close"), "{got}");
        kept.write_all(b"GET /c HTTP/1.1\r\nConnection: close\r\n\r\n")
            .expect("a third request on it");
        let mut last = String::new();
        let _ = kept.read_to_string(&mut last);
        assert!(
            last.contains("Connection: close\r\n") && last.ends_with("GET /c"),
            "{last}"
        );
        drop(endpoint);
        assert!(TcpStream::connect(addr).is_err(), "stopped when dropped");
    }
}
