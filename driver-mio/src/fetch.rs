//! The client's HTTP fetch as a Sans-IO state machine, [`Fetch`]: it owns
//! the fixed-rate schedule and one HTTP/1.1 GET at a time (ureq-proto's
//! [`Call`]) over a kept-alive connection. It touches no socket, thread or
//! monotonic clock: the driver passes `now`, carries out its [`Command`]s
//! (look a host name up, connect, close), writes [`Fetch::pending_send`],
//! and feeds back what the connection did (`handle_connected`,
//! `handle_data`, `handle_eof`, `handle_error`, ...). The client loop drives
//! it from its own `mio::Poll` (see `fetch_io.rs`); the only clock it reads
//! is the wall clock, once per good answer, for the sample's stamp.
//!
//! Contract, as for the core: after `new` and after any `handle_*`, carry
//! out every [`Fetch::poll_command`] in order, write
//! [`Fetch::pending_send`] (reporting [`Fetch::handle_sent`]), take the
//! [`Fetch::poll_event`]s, then wait until [`Fetch::poll_timeout`] and call
//! [`Fetch::handle_timeout`].
//!
//! Schedule: fetch `k` starts at `start + k * interval` (the first at once);
//! a fetch that overruns skips the ticks it missed rather than bunching up,
//! and the schedule never drifts. After `count` good samples it stops (and
//! closes its connection). Each request must be answered within
//! [`FetchOptions::request_timeout`] of its tick (lookup, connect, request,
//! response and body together); the body is at most [`MAX_BODY_BYTES`],
//! content-length or chunked. A failed fetch (lookup, connection refused,
//! timeout, non-200 status, body too large, not JSON, not an object) is
//! logged as one warning, reported as [`FetchEvent::Skipped`], and the
//! schedule goes on.
//!
//! States (connection, then exchange):
//!
//! ```text
//!            tick, no connection            addresses (host names only)
//!  Idle ─────────────────────────► Resolving ───────────► Connecting ──connected──┐
//!   ▲  │  (IP literal: straight to Connecting)                 │ refused: next    │
//!   │  │ tick, kept-alive connection                           ▼ address or skip  ▼
//!   │  └───────────────────────────────────────────────► Head (request sent, awaiting status + headers)
//!   │                                                          │ 200
//!   │                 good body: Sample (+ close if asked)     ▼
//!   └──────────────────────────────────────────────────── Body (content-length, chunked, or until EOF)
//!         failure or timeout at any step: Skipped, connection closed
//! ```
//!
//! A request on a reused (kept-alive) connection that dies before any
//! response byte (the source closed it meanwhile) is sent once more on a
//! fresh connection. A connection the source closes while idle is dropped
//! and reopened at the next tick. Redirects are not followed (a 3xx is a
//! non-200 status).

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quic_report_core::Sample;
use ureq_proto::BodyMode;
use ureq_proto::client::state::{RecvBody, RecvResponse};
use ureq_proto::client::{Call, RecvBodyResult, RecvResponseResult, SendRequestResult};
use ureq_proto::http::{Request, StatusCode, Uri};

/// Largest source body we read.
pub const MAX_BODY_BYTES: u64 = 64 * 1024;

/// Largest response head (status line and headers) we buffer.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// What to fetch and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchOptions {
    /// The source's URL (`http://` only: the driver is built without TLS for
    /// HTTP).
    pub url: String,
    /// Time between fetch starts (must not be zero).
    pub interval: Duration,
    /// Stop after this many good samples.
    pub count: Option<u64>,
}

impl FetchOptions {
    /// The timeout of one request: `min(interval, 5 s)`, at least 1 s.
    pub fn request_timeout(&self) -> Duration {
        self.interval
            .min(Duration::from_secs(5))
            .max(Duration::from_secs(1))
    }

    /// Checks the URL and the interval.
    pub fn validate(&self) -> Result<(), String> {
        self.parse().map(drop)
    }

    /// Checks, and returns the URL parsed.
    fn parse(&self) -> Result<Uri, String> {
        if self.interval.is_zero() {
            return Err("the fetch interval must not be zero".into());
        }
        let uri: Uri = self
            .url
            .parse()
            .map_err(|e| format!("source URL {:?}: {e}", self.url))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "source URL {:?}: scheme {other:?} not supported (use http)",
                    self.url
                ));
            }
            None => {
                return Err(format!(
                    "source URL {:?} has no scheme (e.g. http://host:port/)",
                    self.url
                ));
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("source URL {:?} has no host", self.url));
        }
        Ok(uri)
    }
}

/// What the driver must do for a [`Fetch`], in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Look `host` up without blocking the loop, then call
    /// [`Fetch::handle_resolved`] with the same `id`.
    Resolve {
        /// Names this lookup (answers to an older one are ignored).
        id: u64,
        /// The host name.
        host: String,
        /// The port to pair each address with.
        port: u16,
    },
    /// Open a non-blocking TCP connection to the address (closing any
    /// other), then call [`Fetch::handle_connected`] or
    /// [`Fetch::handle_connect_failed`].
    Connect(SocketAddr),
    /// Close the connection (open or being opened).
    Close,
}

/// What came of a fetch.
#[derive(Debug, Clone, PartialEq)]
pub enum FetchEvent {
    /// A good answer.
    Sample(Sample),
    /// The fetch failed (already logged as a warning): why.
    Skipped(String),
}

/// Where the source is.
#[derive(Debug, Clone)]
enum Target {
    /// An IP literal: no lookup.
    Addr(SocketAddr),
    /// A host name, looked up at each (re)connect.
    Name { host: String, port: u16 },
}

/// The connection.
#[derive(Debug)]
enum Conn {
    Closed,
    Resolving {
        id: u64,
    },
    Connecting {
        addr: SocketAddr,
        rest: VecDeque<SocketAddr>,
    },
    /// `used`: exchanges completed on it.
    Open {
        used: u32,
    },
}

/// The exchange of the fetch in progress.
enum Phase {
    /// Waiting for the connection; nothing sent yet.
    Connect,
    /// Request written, awaiting the status line and headers.
    Head(Box<Call<RecvResponse>>),
    /// Status 200, reading the body.
    Body {
        call: Box<Call<RecvBody>>,
        body: Vec<u8>,
    },
}

struct Exchange {
    /// The request timeout, from the tick.
    deadline: Instant,
    /// Sent on a connection used before (it may have gone stale).
    reused: bool,
    /// Already sent once more after a stale connection.
    retried: bool,
    /// A response byte arrived.
    answered: bool,
    /// Received, not yet consumed.
    input: Vec<u8>,
    phase: Phase,
}

/// A request ready to go: the call awaiting its response, and its bytes.
type Prepared = (Box<Call<RecvResponse>>, Vec<u8>);

/// How far the bytes received so far take the exchange.
enum Progress {
    Wait(Phase),
    Complete {
        body: Vec<u8>,
        close: bool,
    },
    /// The connection ended before the response started.
    Broken(String),
    Failed(String),
}

/// The schedule and the HTTP exchange (see the module documentation).
pub struct Fetch {
    url: String,
    /// The GET, built once (with its `host` header, so that ureq-proto
    /// has nothing to format for it at each fetch).
    request: Request<()>,
    target: Target,
    interval: Duration,
    timeout: Duration,
    count: Option<u64>,
    good: u64,
    base: Instant,
    k: u32,
    /// When the next fetch starts (`None` while one runs, or when done).
    next_tick: Option<Instant>,
    conn: Conn,
    exchange: Option<Exchange>,
    resolve_id: u64,
    /// The request bytes, and how many of them went out.
    out: Vec<u8>,
    sent: usize,
    /// The next request, built ahead (see [`Fetch::prepare`]).
    prepared: Option<Prepared>,
    commands: VecDeque<Command>,
    events: VecDeque<FetchEvent>,
}

impl std::fmt::Debug for Fetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetch")
            .field("url", &self.url)
            .field("good", &self.good)
            .field("next_tick", &self.next_tick)
            .field("conn", &self.conn)
            .field("fetching", &self.exchange.is_some())
            .finish_non_exhaustive()
    }
}

impl Fetch {
    /// A fetcher for `opts` whose first fetch is due at `now`.
    pub fn new(opts: &FetchOptions, now: Instant) -> Result<Fetch, String> {
        let uri = opts.parse()?;
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(80);
        // `host[:port]` as the URL gives it, without any user info.
        let authority = uri.authority().map_or("", |a| a.as_str());
        let host_header = authority.rsplit('@').next().unwrap_or(authority);
        let request = Request::get(uri.clone())
            .header(ureq_proto::http::header::HOST, host_header)
            .body(())
            .map_err(|e| format!("source URL {:?}: {e}", opts.url))?;
        let target = match host.parse::<IpAddr>() {
            Ok(ip) => Target::Addr(SocketAddr::new(ip, port)),
            Err(_) => Target::Name {
                host: host.to_owned(),
                port,
            },
        };
        let mut fetch = Fetch {
            url: opts.url.clone(),
            request,
            target,
            interval: opts.interval,
            timeout: opts.request_timeout(),
            count: opts.count,
            good: 0,
            base: now,
            k: 0,
            next_tick: (opts.count != Some(0)).then_some(now),
            conn: Conn::Closed,
            exchange: None,
            resolve_id: 0,
            out: Vec::new(),
            sent: 0,
            prepared: None,
            commands: VecDeque::new(),
            events: VecDeque::new(),
        };
        fetch.prepared = fetch.prepare().ok();
        Ok(fetch)
    }

    /// The next deadline: the running request's timeout, else the next
    /// tick; `None` once done.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.exchange {
            Some(x) => Some(x.deadline),
            None => self.next_tick,
        }
    }

    /// Whether `count` good samples were fetched (nothing more will happen).
    pub fn is_done(&self) -> bool {
        self.exchange.is_none() && self.next_tick.is_none()
    }

    /// The next thing the driver must do.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// The next sample or skipped fetch.
    pub fn poll_event(&mut self) -> Option<FetchEvent> {
        self.events.pop_front()
    }

    /// Request bytes to write to the open connection (empty: nothing).
    pub fn pending_send(&self) -> &[u8] {
        match self.conn {
            Conn::Open { .. } => self.out.get(self.sent..).unwrap_or_default(),
            _ => &[],
        }
    }

    /// `n` bytes of [`Fetch::pending_send`] were written.
    pub fn handle_sent(&mut self, n: usize) {
        self.sent = self.sent.saturating_add(n).min(self.out.len());
    }

    /// The deadline from [`Fetch::poll_timeout`] may have passed: times the
    /// request out, or starts the next fetch.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(x) = &self.exchange
            && now >= x.deadline
        {
            let why = match x.phase {
                Phase::Body { .. } => {
                    format!("body not complete within {}", humanize(self.timeout))
                }
                _ => format!("no answer within {}", humanize(self.timeout)),
            };
            self.fail(now, why);
        }
        if self.exchange.is_none() && self.next_tick.is_some_and(|t| now >= t) {
            self.start(now);
        }
    }

    /// The lookup `id` asked for by [`Command::Resolve`] finished.
    pub fn handle_resolved(
        &mut self,
        now: Instant,
        id: u64,
        addrs: Result<Vec<SocketAddr>, String>,
    ) {
        if !matches!(self.conn, Conn::Resolving { id: want } if want == id) {
            return; // timed out meanwhile
        }
        let host = match &self.target {
            Target::Name { host, .. } => host.clone(),
            Target::Addr(a) => a.to_string(),
        };
        match addrs {
            Ok(addrs) => {
                let mut rest = VecDeque::from(addrs);
                match rest.pop_front() {
                    Some(addr) => {
                        self.conn = Conn::Connecting { addr, rest };
                        self.commands.push_back(Command::Connect(addr));
                    }
                    None => self.fail(now, format!("{host} has no address")),
                }
            }
            Err(e) => self.fail(now, format!("looking up {host}: {e}")),
        }
    }

    /// The connection asked for by [`Command::Connect`] is open.
    pub fn handle_connected(&mut self, now: Instant) {
        if matches!(self.conn, Conn::Connecting { .. }) {
            self.conn = Conn::Open { used: 0 };
            if self
                .exchange
                .as_ref()
                .is_some_and(|x| matches!(x.phase, Phase::Connect))
            {
                self.send_request(now);
            }
        }
    }

    /// The connection asked for by [`Command::Connect`] failed: tries the
    /// next address, or skips this fetch.
    pub fn handle_connect_failed(&mut self, now: Instant, err: io::Error) {
        let Conn::Connecting { addr, rest } = &mut self.conn else {
            return;
        };
        let failed = *addr;
        match rest.pop_front() {
            Some(next) => {
                log::debug!("connecting to {failed}: {err}; trying {next}");
                *addr = next;
                self.commands.push_back(Command::Close);
                self.commands.push_back(Command::Connect(next));
            }
            None => self.fail(now, format!("connecting to {failed}: {err}")),
        }
    }

    /// Bytes read from the connection.
    pub fn handle_data(&mut self, now: Instant, data: &[u8]) {
        match &mut self.exchange {
            None => {
                log::debug!("the source sent {} bytes unasked: closing", data.len());
                self.close();
            }
            Some(x) if matches!(x.phase, Phase::Connect) => {}
            Some(x) => {
                x.answered = true;
                x.input.extend_from_slice(data);
                self.advance(now, false);
            }
        }
    }

    /// The source closed the connection (a read returned 0).
    pub fn handle_eof(&mut self, now: Instant) {
        match &self.exchange {
            None => {
                log::debug!("the source closed the kept-alive connection");
                self.close();
            }
            Some(x) if matches!(x.phase, Phase::Connect) => {}
            Some(_) => self.advance(now, true),
        }
    }

    /// Reading from or writing to the open connection failed.
    pub fn handle_error(&mut self, now: Instant, err: io::Error) {
        match &self.exchange {
            None => {
                log::debug!("the kept-alive connection to the source failed: {err}");
                self.close();
            }
            Some(x) if matches!(x.phase, Phase::Connect) => {}
            Some(_) => self.broken(now, err.to_string()),
        }
    }

    /// Starts the fetch due at `now`.
    fn start(&mut self, now: Instant) {
        self.next_tick = None;
        self.exchange = Some(Exchange {
            deadline: now + self.timeout,
            reused: false,
            retried: false,
            answered: false,
            input: Vec::new(),
            phase: Phase::Connect,
        });
        match self.conn {
            Conn::Open { .. } => self.send_request(now),
            Conn::Closed => self.connect(),
            // Not reached: a fetch that ends closes a connection it was
            // still opening.
            Conn::Resolving { .. } | Conn::Connecting { .. } => {}
        }
    }

    fn connect(&mut self) {
        match &self.target {
            Target::Addr(addr) => {
                self.conn = Conn::Connecting {
                    addr: *addr,
                    rest: VecDeque::new(),
                };
                self.commands.push_back(Command::Connect(*addr));
            }
            Target::Name { host, port } => {
                self.resolve_id += 1;
                self.conn = Conn::Resolving {
                    id: self.resolve_id,
                };
                self.commands.push_back(Command::Resolve {
                    id: self.resolve_id,
                    host: host.clone(),
                    port: *port,
                });
            }
        }
    }

    /// Writes the GET into `out` for the open connection.
    fn send_request(&mut self, now: Instant) {
        let Conn::Open { used } = self.conn else {
            return;
        };
        let prepared = match self.prepared.take() {
            Some(p) => Ok(p),
            None => self.prepare(),
        };
        match prepared {
            Ok((call, bytes)) => {
                self.out = bytes;
                self.sent = 0;
                if let Some(x) = &mut self.exchange {
                    x.reused = used > 0;
                    x.phase = Phase::Head(call);
                }
            }
            Err(why) => self.fail(now, why),
        }
    }

    /// The next GET: its call, awaiting the response, and its bytes.
    ///
    /// Built at the end of the fetch before, while ureq-proto's code and
    /// data are still in the caches, and kept for the next tick (built at
    /// the tick, after 2 s asleep, it took about 6 % of the idle client's
    /// CPU in a profile; built ahead, about 2 %).
    fn prepare(&self) -> Result<Prepared, String> {
        let call =
            Call::new(self.request.clone()).map_err(|e| format!("building the request: {e}"))?;
        let mut call = call.proceed();
        // The request line and the host header each hold at most the URL.
        let mut out = vec![0; 512 + 2 * self.url.len()];
        let mut len = 0;
        while !call.can_proceed() {
            let n = call
                .write(&mut out[len..])
                .map_err(|e| format!("writing the request: {e}"))?;
            len += n;
        }
        out.truncate(len);
        match call.proceed() {
            Ok(Some(SendRequestResult::RecvResponse(call))) => Ok((Box::new(call), out)),
            Ok(_) => Err("a GET with a request body".into()),
            Err(e) => Err(format!("writing the request: {e}")),
        }
    }

    /// Feeds the exchange what was received (`eof`: and then the end).
    fn advance(&mut self, now: Instant, eof: bool) {
        let Some(x) = &mut self.exchange else {
            return;
        };
        let progress = match std::mem::replace(&mut x.phase, Phase::Connect) {
            Phase::Connect => return,
            Phase::Head(call) => head(call, &mut x.input, eof),
            Phase::Body { call, body } => read_body(call, body, &mut x.input, eof),
        };
        match progress {
            Progress::Wait(phase) => x.phase = phase,
            Progress::Broken(why) => self.broken(now, why),
            Progress::Failed(why) => self.fail(now, why),
            Progress::Complete { body, close } => {
                if close {
                    self.close();
                } else if let Conn::Open { used } = &mut self.conn {
                    *used = used.saturating_add(1);
                }
                match Sample::from_json(&body, unix_ms()) {
                    Ok(sample) => {
                        self.good += 1;
                        self.events.push_back(FetchEvent::Sample(sample));
                    }
                    Err(e) => self.skip(e.to_string()),
                }
                self.finish(now);
            }
        }
    }

    /// The connection died before the response started: once, on a reused
    /// connection, that is a stale keep-alive and the request goes again on
    /// a fresh one; otherwise the fetch fails.
    fn broken(&mut self, now: Instant, why: String) {
        let retry = self
            .exchange
            .as_ref()
            .is_some_and(|x| x.reused && !x.retried && !x.answered);
        if !retry {
            return self.fail(now, why);
        }
        log::debug!("kept-alive connection to the source is gone ({why}); reconnecting");
        self.close();
        if let Some(x) = &mut self.exchange {
            x.retried = true;
            x.reused = false;
            x.input.clear();
            x.phase = Phase::Connect;
        }
        self.connect();
    }

    /// This fetch failed: close the connection, warn, go on.
    fn fail(&mut self, now: Instant, why: String) {
        self.close();
        self.skip(why);
        self.finish(now);
    }

    fn skip(&mut self, why: String) {
        log::warn!("fetching {} failed, sample skipped: {why}", self.url);
        self.events.push_back(FetchEvent::Skipped(why));
    }

    fn close(&mut self) {
        match self.conn {
            Conn::Closed => {}
            // A late answer is ignored (its id is no longer awaited).
            Conn::Resolving { .. } => self.conn = Conn::Closed,
            Conn::Connecting { .. } | Conn::Open { .. } => {
                self.conn = Conn::Closed;
                self.commands.push_back(Command::Close);
            }
        }
        self.out.clear();
        self.sent = 0;
    }

    /// The fetch in progress is over: schedule the next tick (skipping ticks
    /// already past), or stop after `count` good samples.
    fn finish(&mut self, now: Instant) {
        self.exchange = None;
        self.out.clear();
        self.sent = 0;
        if self.count.is_some_and(|n| self.good >= n) {
            log::debug!("fetched {} samples: done", self.good);
            self.close();
            self.next_tick = None;
            return;
        }
        self.k = self.k.saturating_add(1);
        let mut next = self.base + self.interval.saturating_mul(self.k);
        if next <= now {
            let behind = now.duration_since(self.base).as_nanos() / self.interval.as_nanos().max(1);
            self.k = u32::try_from(behind + 1).unwrap_or(u32::MAX);
            next = self.base + self.interval.saturating_mul(self.k);
            log::debug!("fetch overran its interval; next fetch at tick {}", self.k);
        }
        if self.k > 1_000_000 {
            // Rebase so `interval * k` stays far from overflow.
            self.base = next;
            self.k = 0;
        }
        self.next_tick = Some(next);
        if self.prepared.is_none() {
            // An error shows again (and is reported) at the next tick.
            self.prepared = self.prepare().ok();
        }
    }
}

/// Parses the response head from `input`; on a 200, goes on to the body.
fn head(mut call: Box<Call<RecvResponse>>, input: &mut Vec<u8>, eof: bool) -> Progress {
    loop {
        let (used, response) = match call.try_response(input, false) {
            Ok(r) => r,
            Err(e) => return Progress::Failed(format!("bad response: {e}")),
        };
        input.drain(..used);
        match response {
            // An informational (1xx) response: the real one follows.
            None if used > 0 => {}
            None if eof && input.is_empty() => {
                return Progress::Broken("connection closed before the response".into());
            }
            None if eof => return Progress::Failed("connection closed in the response".into()),
            None if input.len() > MAX_HEAD_BYTES => {
                return Progress::Failed(format!(
                    "response head larger than {MAX_HEAD_BYTES} bytes"
                ));
            }
            None => return Progress::Wait(Phase::Head(call)),
            Some(resp) if resp.status() != StatusCode::OK => {
                return Progress::Failed(format!("HTTP status {}", resp.status()));
            }
            Some(_) => {
                return match call.proceed() {
                    Some(RecvResponseResult::RecvBody(call)) => {
                        if let BodyMode::LengthDelimited(n) = call.body_mode()
                            && n > MAX_BODY_BYTES
                        {
                            return Progress::Failed(format!(
                                "body of {n} bytes, more than {MAX_BODY_BYTES}"
                            ));
                        }
                        read_body(Box::new(call), Vec::new(), input, eof)
                    }
                    Some(RecvResponseResult::Cleanup(call)) => Progress::Complete {
                        body: Vec::new(),
                        close: call.must_close_connection() || !input.is_empty(),
                    },
                    Some(RecvResponseResult::Redirect(_)) | None => {
                        Progress::Failed("unexpected response state".into())
                    }
                };
            }
        }
    }
}

/// Decodes body bytes from `input` into `body` (at most
/// [`MAX_BODY_BYTES`]) until the body ends.
fn read_body(
    mut call: Box<Call<RecvBody>>,
    mut body: Vec<u8>,
    input: &mut Vec<u8>,
    eof: bool,
) -> Progress {
    const LIMIT: usize = MAX_BODY_BYTES as usize;
    let until_eof = call.body_mode() == BodyMode::CloseDelimited;
    loop {
        // `can_proceed` is always true for a body that ends at EOF.
        if call.can_proceed() && !until_eof {
            break;
        }
        if input.is_empty() {
            if eof && until_eof {
                break;
            }
            if eof {
                return Progress::Failed("connection closed before the body was complete".into());
            }
            return Progress::Wait(Phase::Body { call, body });
        }
        // One byte past the limit tells a body that is too large.
        let start = body.len();
        let room = (LIMIT + 1).saturating_sub(start).min(input.len());
        body.resize(start + room, 0);
        let (used, decoded) = match call.read(input, &mut body[start..]) {
            Ok(r) => r,
            Err(e) => return Progress::Failed(format!("reading the body: {e}")),
        };
        body.truncate(start + decoded);
        input.drain(..used);
        if body.len() > LIMIT {
            return Progress::Failed(format!("body larger than {MAX_BODY_BYTES} bytes"));
        }
        if used == 0 {
            // A chunk header cut in two: wait for the rest.
            if eof {
                return Progress::Failed("connection closed before the body was complete".into());
            }
            if input.len() > MAX_HEAD_BYTES {
                return Progress::Failed("reading the body: bad chunk header".into());
            }
            return Progress::Wait(Phase::Body { call, body });
        }
    }
    match call.proceed() {
        Some(RecvBodyResult::Cleanup(call)) => Progress::Complete {
            body,
            // Bytes past the body: the connection is out of step.
            close: call.must_close_connection() || !input.is_empty(),
        },
        Some(RecvBodyResult::Redirect(_)) | None => {
            Progress::Failed("unexpected response state".into())
        }
    }
}

/// Unix milliseconds now (0 before 1970): a sample's `sampled_at_ms`.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `1s`, `250ms`: a duration as a person writes it.
fn humanize(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{\"value\": 0.5}";

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn fetch(url: &str, interval: Duration, count: Option<u64>, now: Instant) -> Fetch {
        let opts = FetchOptions {
            url: url.into(),
            interval,
            count,
        };
        Fetch::new(&opts, now).expect("valid options")
    }

    fn local(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn commands(f: &mut Fetch) -> Vec<Command> {
        std::iter::from_fn(|| f.poll_command()).collect()
    }

    fn events(f: &mut Fetch) -> Vec<FetchEvent> {
        std::iter::from_fn(|| f.poll_event()).collect()
    }

    /// Takes the request bytes the driver would write.
    fn request(f: &mut Fetch) -> String {
        let bytes = f.pending_send().to_vec();
        f.handle_sent(bytes.len());
        assert!(f.pending_send().is_empty());
        String::from_utf8(bytes).expect("ASCII request")
    }

    fn values(events: &[FetchEvent]) -> Vec<f64> {
        events
            .iter()
            .filter_map(|e| match e {
                FetchEvent::Sample(s) => s.fields["value"].as_f64(),
                FetchEvent::Skipped(_) => None,
            })
            .collect()
    }

    fn skipped(events: &[FetchEvent]) -> Vec<&str> {
        events
            .iter()
            .filter_map(|e| match e {
                FetchEvent::Skipped(why) => Some(why.as_str()),
                FetchEvent::Sample(_) => None,
            })
            .collect()
    }

    /// A fetch of `http://127.0.0.1:8000/` whose first request is written
    /// on a fresh connection at `t0`.
    fn connected(interval: Duration, count: Option<u64>, t0: Instant) -> Fetch {
        let mut f = fetch("http://127.0.0.1:8000/", interval, count, t0);
        assert_eq!(f.poll_timeout(), Some(t0), "the first fetch is due at once");
        f.handle_timeout(t0);
        assert_eq!(commands(&mut f), [Command::Connect(local(8000))]);
        assert!(
            f.pending_send().is_empty(),
            "nothing to send before connecting"
        );
        f.handle_connected(t0);
        let req = request(&mut f);
        assert!(
            req.starts_with("GET / HTTP/1.1\r\nhost: 127.0.0.1:8000\r\n"),
            "{req:?}"
        );
        assert!(req.ends_with("\r\n\r\n"), "{req:?}");
        f
    }

    #[test]
    fn fetches_on_a_fixed_schedule_without_drift() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(2);
        let mut f = connected(interval, None, t0);
        assert_eq!(f.poll_timeout(), Some(t0 + interval), "request timeout");
        f.handle_data(t0 + ms(30), OK.as_bytes());
        assert_eq!(values(&events(&mut f)), [0.5]);
        assert_eq!(f.poll_timeout(), Some(t0 + interval), "tick 1");
        // Woken late, answered late: the next tick stays on the grid.
        f.handle_timeout(t0 + interval + ms(7));
        request(&mut f);
        f.handle_data(t0 + interval + ms(900), OK.as_bytes());
        assert_eq!(values(&events(&mut f)), [0.5]);
        assert_eq!(f.poll_timeout(), Some(t0 + 2 * interval), "tick 2");
        // Early wake-ups do nothing.
        f.handle_timeout(t0 + 2 * interval - ms(1));
        assert!(f.pending_send().is_empty());
        assert_eq!(f.poll_timeout(), Some(t0 + 2 * interval));
    }

    #[test]
    fn an_overrunning_fetch_skips_the_ticks_it_missed() {
        let t0 = Instant::now();
        // 100 ms interval, 1 s request timeout.
        let mut f = connected(ms(100), None, t0);
        f.handle_data(t0 + ms(350), OK.as_bytes());
        assert_eq!(values(&events(&mut f)), [0.5]);
        assert_eq!(f.poll_timeout(), Some(t0 + ms(400)), "ticks 1-3 skipped");
        f.handle_timeout(t0 + ms(400));
        request(&mut f);
        // Answered exactly on a tick: that tick is past, the next one counts.
        f.handle_data(t0 + ms(500), OK.as_bytes());
        assert_eq!(f.poll_timeout(), Some(t0 + ms(600)));
    }

    #[test]
    fn the_connection_is_kept_alive_across_fetches() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(2);
        let mut f = connected(interval, None, t0);
        for k in 1..=4u32 {
            let tick = t0 + interval * k;
            f.handle_data(tick - interval + ms(5), OK.as_bytes());
            f.handle_timeout(tick);
            assert_eq!(commands(&mut f), [], "fetch {k}: no reconnect");
            assert!(request(&mut f).starts_with("GET / "));
        }
        // A chunked answer keeps it alive too.
        f.handle_data(
            t0 + interval * 4 + ms(5),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\ne\r\n{\"value\": 0.5}\r\n0\r\n\r\n",
        );
        assert_eq!(values(&events(&mut f)), [0.5; 5]);
        assert_eq!(commands(&mut f), []);
    }

    #[test]
    fn connection_close_and_http_1_0_reconnect_at_the_next_tick() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(2);
        for answer in [
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 14\r\n\r\n{\"value\": 0.5}",
            "HTTP/1.0 200 OK\r\nContent-Length: 14\r\n\r\n{\"value\": 0.5}",
            // No length: the body ends when the source closes.
            "HTTP/1.1 200 OK\r\n\r\n{\"value\": 0.5}",
        ] {
            let mut f = connected(interval, None, t0);
            f.handle_data(t0 + ms(5), answer.as_bytes());
            if answer.contains("Length") {
                assert_eq!(commands(&mut f), [Command::Close], "{answer}");
            } else {
                assert_eq!(events(&mut f), [], "the body goes on until EOF");
                f.handle_eof(t0 + ms(6));
                assert_eq!(commands(&mut f), [Command::Close], "{answer}");
            }
            assert_eq!(values(&events(&mut f)), [0.5], "{answer}");
            f.handle_timeout(t0 + interval);
            assert_eq!(commands(&mut f), [Command::Connect(local(8000))]);
        }
    }

    #[test]
    fn a_connection_closed_while_idle_is_reopened_at_the_next_tick() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(2);
        let mut f = connected(interval, None, t0);
        f.handle_data(t0 + ms(5), OK.as_bytes());
        f.handle_eof(t0 + ms(500));
        assert_eq!(commands(&mut f), [Command::Close]);
        f.handle_timeout(t0 + interval);
        assert_eq!(commands(&mut f), [Command::Connect(local(8000))]);
        f.handle_connected(t0 + interval);
        assert!(request(&mut f).starts_with("GET / "));
        f.handle_data(t0 + interval + ms(5), OK.as_bytes());
        assert_eq!(values(&events(&mut f)), [0.5, 0.5]);
        assert_eq!(skipped(&events(&mut f)), Vec::<&str>::new());
    }

    #[test]
    fn a_stale_kept_alive_connection_is_retried_once_on_a_fresh_one() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(2);
        let mut f = connected(interval, None, t0);
        f.handle_data(t0 + ms(5), OK.as_bytes());
        // Tick 1 on the kept-alive connection, which the source had closed.
        f.handle_timeout(t0 + interval);
        request(&mut f);
        f.handle_eof(t0 + interval + ms(1));
        assert_eq!(
            commands(&mut f),
            [Command::Close, Command::Connect(local(8000))]
        );
        assert_eq!(events(&mut f).len(), 1, "only the first sample: no skip");
        f.handle_connected(t0 + interval + ms(2));
        assert!(request(&mut f).starts_with("GET / "), "sent again");
        f.handle_data(t0 + interval + ms(3), OK.as_bytes());
        assert_eq!(values(&events(&mut f)), [0.5]);
        assert_eq!(f.poll_timeout(), Some(t0 + 2 * interval));

        // Tick 2: a reset, then the fresh connection fails too: skipped.
        f.handle_timeout(t0 + 2 * interval);
        request(&mut f);
        f.handle_error(
            t0 + 2 * interval,
            io::Error::from(io::ErrorKind::ConnectionReset),
        );
        assert_eq!(
            commands(&mut f),
            [Command::Close, Command::Connect(local(8000))]
        );
        f.handle_connected(t0 + 2 * interval);
        request(&mut f);
        f.handle_eof(t0 + 2 * interval + ms(1));
        assert_eq!(commands(&mut f), [Command::Close]);
        assert_eq!(
            skipped(&events(&mut f)),
            ["connection closed before the response"]
        );
        assert_eq!(f.poll_timeout(), Some(t0 + 3 * interval));
    }

    #[test]
    fn no_retry_once_the_response_started_or_on_a_fresh_connection() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(2);
        let mut f = connected(interval, None, t0);
        f.handle_eof(t0 + ms(1));
        assert_eq!(commands(&mut f), [Command::Close]);
        assert_eq!(
            skipped(&events(&mut f)),
            ["connection closed before the response"]
        );
        f.handle_timeout(t0 + interval);
        assert_eq!(commands(&mut f), [Command::Connect(local(8000))]);
        f.handle_connected(t0 + interval);
        request(&mut f);
        f.handle_data(t0 + interval, OK.as_bytes());
        f.handle_timeout(t0 + 2 * interval);
        request(&mut f);
        f.handle_data(t0 + 2 * interval, b"HTTP/1.1 200 OK\r\nContent-Le");
        f.handle_eof(t0 + 2 * interval);
        assert_eq!(commands(&mut f), [Command::Close]);
        let evs = events(&mut f);
        assert_eq!(values(&evs), [0.5]);
        assert_eq!(skipped(&evs), ["connection closed in the response"]);
    }

    #[test]
    fn a_request_that_is_not_answered_in_time_is_skipped() {
        let t0 = Instant::now();
        // 1.5 s interval: 1.5 s request timeout.
        let interval = ms(1500);
        let mut f = connected(interval, None, t0);
        f.handle_timeout(t0 + ms(1499));
        assert_eq!(events(&mut f), []);
        f.handle_timeout(t0 + interval);
        assert_eq!(commands(&mut f), [Command::Close]);
        assert_eq!(skipped(&events(&mut f)), ["no answer within 1500ms"]);
        // The timeout used the whole interval: tick 1 is past.
        assert_eq!(f.poll_timeout(), Some(t0 + 2 * interval));

        // A body that stops half-way.
        f.handle_timeout(t0 + 2 * interval);
        assert_eq!(commands(&mut f), [Command::Connect(local(8000))]);
        f.handle_connected(t0 + 2 * interval);
        request(&mut f);
        f.handle_data(
            t0 + 2 * interval,
            b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{\"va",
        );
        f.handle_timeout(t0 + 3 * interval);
        assert_eq!(commands(&mut f), [Command::Close]);
        assert_eq!(
            skipped(&events(&mut f)),
            ["body not complete within 1500ms"]
        );

        // A connect that never completes.
        f.handle_timeout(t0 + 4 * interval);
        assert_eq!(commands(&mut f), [Command::Connect(local(8000))]);
        f.handle_timeout(t0 + 5 * interval);
        assert_eq!(commands(&mut f), [Command::Close]);
        assert_eq!(skipped(&events(&mut f)), ["no answer within 1500ms"]);
    }

    #[test]
    fn bad_answers_are_skipped_and_the_schedule_goes_on() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(2);
        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        let chunk = format!("{:x}\r\n{}\r\n", 40_000, " ".repeat(40_000));
        let big_chunked =
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n");
        let cases: [(&str, &str, bool); 6] = [
            (
                "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\n{}",
                "HTTP status 500 Internal Server Error",
                true,
            ),
            (
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
                "HTTP status 404 Not Found",
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nnot json",
                "invalid JSON",
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n[1, 2]",
                "object",
                false,
            ),
            (&big, "more than 65536", true),
            (&big_chunked, "larger than 65536", true),
        ];
        let mut f = connected(interval, None, t0);
        let mut tick = t0;
        for (answer, why, closes) in cases {
            f.handle_data(tick + ms(5), answer.as_bytes());
            let evs = events(&mut f);
            let skips = skipped(&evs);
            assert_eq!(skips.len(), 1, "{why}: {evs:?}");
            assert!(
                skips[0].to_lowercase().contains(&why.to_lowercase()),
                "{why}: {skips:?}"
            );
            tick += interval;
            assert_eq!(f.poll_timeout(), Some(tick), "{why}");
            f.handle_timeout(tick);
            if closes {
                assert_eq!(
                    commands(&mut f),
                    [Command::Close, Command::Connect(local(8000))],
                    "{why}"
                );
                f.handle_connected(tick);
            } else {
                assert_eq!(commands(&mut f), [], "{why}: connection kept");
            }
            request(&mut f);
        }
        // Then a good chunked answer, one byte at a time.
        let good = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    4\r\n{\"va\r\na;ext=1\r\nlue\": 0.25\r\n1\r\n}\r\n0\r\n\r\n";
        for b in good.as_bytes() {
            f.handle_data(tick + ms(5), std::slice::from_ref(b));
        }
        assert_eq!(values(&events(&mut f)), [0.25]);
        assert_eq!(commands(&mut f), []);
    }

    #[test]
    fn a_refused_connection_is_skipped_and_tried_again_at_the_next_tick() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(2);
        let mut f = fetch("http://127.0.0.1:9/", interval, None, t0);
        f.handle_timeout(t0);
        assert_eq!(commands(&mut f), [Command::Connect(local(9))]);
        f.handle_connect_failed(t0, io::ErrorKind::ConnectionRefused.into());
        assert_eq!(commands(&mut f), [Command::Close]);
        let evs = events(&mut f);
        assert!(
            skipped(&evs)[0].starts_with("connecting to 127.0.0.1:9: "),
            "{evs:?}"
        );
        f.handle_timeout(t0 + interval);
        assert_eq!(commands(&mut f), [Command::Connect(local(9))]);
    }

    #[test]
    fn host_names_are_looked_up_by_the_driver_at_each_connect() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(2);
        let mut f = fetch("http://source.example:8000/v?x=1", interval, None, t0);
        f.handle_timeout(t0);
        let resolve = |id| Command::Resolve {
            id,
            host: "source.example".into(),
            port: 8000,
        };
        assert_eq!(commands(&mut f), [resolve(1)]);
        f.handle_resolved(t0, 7, Ok(vec![local(1)]));
        assert_eq!(commands(&mut f), [], "an answer to another lookup");
        let (a, b) = (local(8001), SocketAddr::from(([127, 0, 0, 2], 8000)));
        f.handle_resolved(t0, 1, Ok(vec![a, b]));
        assert_eq!(commands(&mut f), [Command::Connect(a)]);
        f.handle_connect_failed(t0, io::ErrorKind::ConnectionRefused.into());
        assert_eq!(commands(&mut f), [Command::Close, Command::Connect(b)]);
        f.handle_connected(t0);
        let req = request(&mut f);
        assert!(
            req.starts_with("GET /v?x=1 HTTP/1.1\r\nhost: source.example:8000\r\n"),
            "{req:?}"
        );
        // Closed by the source: looked up again at the next connect.
        f.handle_data(
            t0,
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        );
        assert_eq!(commands(&mut f), [Command::Close]);
        f.handle_timeout(t0 + interval);
        assert_eq!(commands(&mut f), [resolve(2)]);
        // A lookup that hangs: timed out, its late answer ignored.
        f.handle_timeout(t0 + 2 * interval);
        assert_eq!(commands(&mut f), []);
        assert_eq!(skipped(&events(&mut f)), ["no answer within 2s"]);
        f.handle_resolved(t0 + 2 * interval, 2, Ok(vec![a]));
        assert_eq!(commands(&mut f), []);
        f.handle_timeout(t0 + 3 * interval);
        assert_eq!(commands(&mut f), [resolve(3)]);
        f.handle_resolved(t0 + 3 * interval, 3, Err("no such host".into()));
        assert_eq!(
            skipped(&events(&mut f)),
            ["looking up source.example: no such host"]
        );
    }

    #[test]
    fn fetching_stops_after_count_good_samples() {
        let t0 = Instant::now();
        let interval = ms(100);
        let mut f = connected(interval, Some(2), t0);
        f.handle_data(t0, OK.as_bytes());
        f.handle_timeout(t0 + interval);
        request(&mut f);
        f.handle_data(
            t0 + interval,
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad",
        );
        assert!(!f.is_done(), "a bad answer does not count");
        f.handle_timeout(t0 + 2 * interval);
        request(&mut f);
        f.handle_data(t0 + 2 * interval, OK.as_bytes());
        assert!(f.is_done());
        assert_eq!(f.poll_timeout(), None);
        assert_eq!(commands(&mut f), [Command::Close]);
        assert_eq!(values(&events(&mut f)), [0.5, 0.5]);
        f.handle_timeout(t0 + 10 * interval);
        assert_eq!(commands(&mut f), []);
        assert!(f.pending_send().is_empty());

        let zero = fetch("http://127.0.0.1:8000/", interval, Some(0), t0);
        assert!(zero.is_done());
    }

    #[test]
    fn options_are_checked() {
        let ok = FetchOptions {
            url: "http://[::1]:8000/".into(),
            interval: Duration::from_secs(2),
            count: None,
        };
        assert!(ok.validate().is_ok());
        let f = Fetch::new(&ok, Instant::now()).expect("valid");
        assert!(
            matches!(f.target, Target::Addr(a) if a == SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 8000)))
        );
        for url in [
            "https://x/",
            "ftp://x/",
            "127.0.0.1:8000",
            "http://",
            "http:///x",
        ] {
            let o = FetchOptions {
                url: url.into(),
                ..ok.clone()
            };
            assert!(o.validate().is_err(), "{url} accepted");
        }
        let f = fetch("http://10.1.2.3/", ok.interval, None, Instant::now());
        assert!(matches!(f.target, Target::Addr(a) if a == SocketAddr::from(([10, 1, 2, 3], 80))));
    }
}
