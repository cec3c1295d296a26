//! [`HttpEndpoint`]: a small HTTP/1.1 server on a thread of its own,
//! with bounded resources whoever connects, for fixed answers computed
//! from the request line: the server's `--metrics` ([`crate::metrics_http`])
//! and the `source` program.
//!
//! One mio loop serves every connection without blocking (the states of a
//! connection are `Phase`'s): at most [`MAX_CONNECTIONS`] are open (a
//! new one closes the oldest lingering one, else the oldest waiting for
//! its request, else the oldest), each has [`CONNECTION_TIME`] for its
//! request head (at most [`MAX_HEAD`] bytes) and again for its answer. An
//! HTTP/1.1 request without a body or `Connection: close` leaves its
//! connection open for the next one, for [`KEEP_ALIVE_TIME`] (a client's
//! keep-alive: a fetch every 2 s reuses one connection); requests sent
//! behind one another are answered in turn, at most [`REQUESTS_PER_TURN`]
//! before the other connections' turn. Every other answer closes its
//! connection, after which what the peer still sends is read and dropped
//! for a moment. A request's body is never read (it is not waited for
//! either: the answer comes once the head is in); a `HEAD` answer has no
//! body. So idle or slow peers cost a bounded table, never a thread or
//! memory each, and a request whose head is in is answered whatever idle
//! connections come after it; a peer that keeps opening connections
//! faster than a client sends its request can still keep it out while it
//! goes on.
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

    /// The bytes on the wire: HTTP/1.1, `Connection: close` unless
    /// `keep_alive`, the body unless `head_only`.
    fn encode(&self, keep_alive: bool, head_only: bool) -> Vec<u8> {
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
        if !head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
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
                    again: Vec::new(),
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

/// A connection's phase.
///
/// *Reading* (its request head) -> *Writing* (the answer) -> back to
/// *Reading* if the request keeps the connection alive, else *Lingering*
/// (our side shut, what the peer still sends read and dropped, so that
/// the kernel does not answer it with a reset that could destroy the
/// answer before the peer reads it) -> closed. Each phase has a deadline.
enum Phase {
    Reading,
    Writing {
        answer: Vec<u8>,
        written: usize,
        keep_alive: bool,
    },
    Lingering {
        dropped: usize,
    },
}

/// One connection.
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    phase: Phase,
    /// When its phase began (the oldest are closed first to make room).
    since: Instant,
    /// When it is closed if still open.
    deadline: Instant,
    /// Request bytes read and not yet answered (a head in progress, and
    /// whatever was sent behind it).
    head: Vec<u8>,
    /// The peer has shut its side: nothing more will come.
    eof: bool,
}

/// What a connection's turn left it as.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Waiting for readiness.
    Open,
    /// More to do at once (its turn's share of requests was used up).
    Again,
    Done,
}

/// Requests answered on one connection per turn at most: a peer that
/// pipelines requests without end does not keep the others waiting.
pub const REQUESTS_PER_TURN: usize = 8;

/// How long a kept-alive connection waits for its next request: past
/// ureq's 15 s pool, so that a client reusing it every 2-15 s never sends
/// into a close.
pub const KEEP_ALIVE_TIME: Duration = Duration::from_secs(20);

/// How long, and how many bytes, a closed answer's connection reads and
/// drops what the peer still sends.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// The endpoint's thread.
struct Served {
    poll: Poll,
    listener: TcpListener,
    conns: HashMap<Token, Conn>,
    next: usize,
    handler: Handler,
    /// Connections with more to do at once ([`Next::Again`]).
    again: Vec<Token>,
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
                .map(|c| c.deadline)
                .min()
                .map(|t| t.saturating_duration_since(Instant::now()));
            let timeout = match (timeout, self.accept_again) {
                (Some(t), true) => Some(t.min(ACCEPT_RETRY)),
                (None, true) => Some(ACCEPT_RETRY),
                (t, false) => t,
            };
            let timeout = if self.again.is_empty() {
                timeout
            } else {
                Some(Duration::ZERO)
            };
            match self.poll.poll(&mut events, timeout) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => other?,
            }
            for token in std::mem::take(&mut self.again) {
                self.turn(token);
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
            self.conns.retain(|_, c| now < c.deadline);
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
                    .min_by_key(|(_, c)| (c.phase.keep_rank(), c.since))
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
                let now = Instant::now();
                let conn = Conn {
                    stream,
                    peer,
                    phase: Phase::Reading,
                    since: now,
                    deadline: now + CONNECTION_TIME,
                    head: Vec::new(),
                    eof: false,
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
            Ok(Next::Again) => self.again.push(token),
            Ok(Next::Done) | Err(_) => {
                self.conns.remove(&token);
            }
        }
    }
}

impl Phase {
    /// Which connections are closed first to make room: lingering ones,
    /// then those waiting for a request, then those with an answer to
    /// write.
    fn keep_rank(&self) -> u8 {
        match self {
            Phase::Lingering { .. } => 0,
            Phase::Reading => 1,
            Phase::Writing { .. } => 2,
        }
    }
}

impl Conn {
    /// Reads what has come, answers each complete request head, writes
    /// what the socket takes; at most [`REQUESTS_PER_TURN`] requests.
    fn advance(&mut self, handler: &mut Handler) -> io::Result<Next> {
        let mut answered = 0;
        loop {
            match &mut self.phase {
                Phase::Reading => {
                    if answered == REQUESTS_PER_TURN {
                        return Ok(Next::Again);
                    }
                    self.read_head()?;
                    let (answer, keep_alive) = match head_end(&self.head) {
                        Some(end) => {
                            let head = &self.head[..end];
                            let (answer, head_only) = answer(head, self.peer, handler);
                            // Nothing more comes after a peer's FIN.
                            let keep = keeps_alive(head) && answer.status != 400 && !self.eof;
                            // A request sent behind it stays for the next.
                            self.head.drain(..end);
                            (answer.encode(keep, head_only), keep)
                        }
                        None if self.head.len() > MAX_HEAD => (
                            Response::new(431, "text/plain", "request head too large\n")
                                .encode(false, false),
                            false,
                        ),
                        None if self.eof => return Ok(Next::Done),
                        None => return Ok(Next::Open),
                    };
                    answered += 1;
                    self.enter(Phase::Writing {
                        answer,
                        written: 0,
                        keep_alive,
                    });
                }
                Phase::Writing {
                    answer,
                    written,
                    keep_alive,
                } => {
                    while *written < answer.len() {
                        match self.stream.write(&answer[*written..]) {
                            Ok(0) => return Ok(Next::Done),
                            Ok(n) => *written += n,
                            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Next::Open),
                            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                            Err(e) => return Err(e),
                        }
                    }
                    if *keep_alive {
                        // Readiness is edge-triggered: read on at once
                        // (what came meanwhile included).
                        self.enter(Phase::Reading);
                        self.deadline = self.since + KEEP_ALIVE_TIME;
                    } else {
                        let _ = self.stream.shutdown(std::net::Shutdown::Write);
                        self.enter(Phase::Lingering { dropped: 0 });
                        self.deadline = self.since + LINGER_TIME;
                    }
                }
                Phase::Lingering { dropped } => {
                    let mut buf = [0u8; 4096];
                    loop {
                        match self.stream.read(&mut buf) {
                            Ok(0) => return Ok(Next::Done),
                            Ok(n) => {
                                *dropped += n;
                                if *dropped > LINGER_BYTES {
                                    return Ok(Next::Done);
                                }
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Next::Open),
                            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                            Err(_) => return Ok(Next::Done),
                        }
                    }
                }
            }
        }
    }

    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        self.since = Instant::now();
        self.deadline = self.since + CONNECTION_TIME;
    }

    /// Reads request bytes until the socket has no more, a head is
    /// complete, or the head is too large; notes the peer's FIN.
    fn read_head(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 2048];
        while !self.eof && head_end(&self.head).is_none() && self.head.len() <= MAX_HEAD {
            match self.stream.read(&mut buf) {
                Ok(0) => self.eof = true,
                Ok(n) => self.head.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
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
/// of a method and a target (`400` for anything else); and whether it goes
/// without its body (a `HEAD` request: the body's length only).
fn answer(head: &[u8], peer: SocketAddr, handler: &mut Handler) -> (Response, bool) {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some(method), Some(target)) => (
            handler(&Request {
                peer,
                method,
                target,
            }),
            method == "HEAD",
        ),
        _ => (
            Response::new(400, "text/plain", "bad request line\n"),
            false,
        ),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;

    /// Sends `request` on a new connection; everything read until it is
    /// closed (10 s at most).
    pub(crate) fn get(addr: SocketAddr, request: &[u8]) -> String {
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

        // From review: requests sent behind one another and then the
        // peer's FIN are all answered (the FIN closed it with the second
        // unanswered), past one turn's share too.
        let mut piped = TcpStream::connect(addr).expect("connect");
        piped
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let many: String = (0..20)
            .map(|i| format!("GET /{i} HTTP/1.1\r\n\r\n"))
            .collect();
        piped.write_all(many.as_bytes()).expect("write");
        piped.shutdown(std::net::Shutdown::Write).expect("FIN");
        let mut all = String::new();
        let _ = piped.read_to_string(&mut all);
        for i in 0..20 {
            assert!(
                all.contains(&format!("\r\n\r\nGET /{i}")),
                "/{i} answered: {all}"
            );
        }

        // From review: a HEAD answer has no body, so the next answer on
        // the connection follows its head directly.
        let head = get(
            addr,
            b"HEAD /h HTTP/1.1\r\n\r\nGET /g HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        let (first, rest) = head.split_once("\r\n\r\n").expect("a head");
        assert!(
            first.starts_with("HTTP/1.1 200 OK") && first.contains("Content-Length: 7"),
            "{head}"
        );
        assert!(
            rest.starts_with("HTTP/1.1 200 OK"),
            "no body after HEAD's: {head}"
        );
        assert!(rest.ends_with("GET /g"), "{head}");

        // From review: a body still coming after the answer is read and
        // dropped, not met with a reset that could destroy the answer.
        let mut post = TcpStream::connect(addr).expect("connect");
        post.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        post.write_all(b"POST /p HTTP/1.1\r\nContent-Length: 400000\r\n\r\n")
            .expect("write");
        std::thread::sleep(Duration::from_millis(50));
        for _ in 0..100 {
            if post.write_all(&[b'x'; 4000]).is_err() {
                break;
            }
        }
        let mut answer = String::new();
        let _ = post.read_to_string(&mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 200 OK") && answer.ends_with("POST /p"),
            "{answer}"
        );
        drop(endpoint);
        assert!(TcpStream::connect(addr).is_err(), "stopped when dropped");
    }
}
