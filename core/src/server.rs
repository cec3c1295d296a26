//! The collecting server: many QUIC connections, routed by destination
//! connection ID, each carrying report streams.
//!
//! ```text
//!  datagram ──► parse header ──► known DCID? ──yes──► conn.recv ──► read streams
//!                                   │ no                               │ objects
//!                                   ▼                                  ▼
//!             short header ─► stateless reset                      dedup ─► Report event
//!             long header, unknown version ─► Version Negotiation         │ app writes it,
//!             Initial >= 1200 bytes ─► limit: max connections              ▼ then respond()
//!                 with a token ─► valid? accept : drop         answers in order per stream, FIN
//!                 no token, retry required ─► Retry
//!                 no token ─► accept
//!             anything else ─► dropped
//! ```
//!
//! ## Hostile input
//!
//! Nothing a peer sends is answered with more bytes than it carried unless
//! it reaches a connection, whose answers quiche bounds to 3x everything
//! received from that address until the address is validated: a Version Negotiation or a Retry is far
//! smaller than the 1200-byte Initial that earns it, a stateless reset is
//! smaller than the packet that caused it (and rate limited), everything
//! else is dropped. An Initial quiche cannot use leaves no connection behind
//! and is not answered. [`RetryMode`] decides when a new client must first
//! prove its address (the Retry token is HMAC-signed; see
//! [`crate::token::RetryTokens`]).
//!
//! Every configured limit that is hit is counted in [`ServerStats::limits`]
//! and reported as [`ServerEvent::LimitHit`]: connections
//! ([`ServerConfig::max_connections`]), streams per connection
//! ([`ServerConfig::max_streams`], enforced by quiche, which closes a
//! connection that opens more with STREAM_LIMIT_ERROR), bytes per report,
//! unanswered bytes per connection ([`ServerConfig::max_unanswered_bytes`],
//! and apart from them [`ServerConfig::max_response_bytes`] for HTTP/0.9
//! answers; closed with [`codes::EXCESSIVE_LOAD`]), the handshake deadline
//! and the idle timeout.
//!
//! Per connection: handshake (reaped after the handshake timeout) ->
//! established ([`ServerEvent::ConnectionOpened`]) -> closed (idle timeout,
//! peer close, [`Server::close_all`]; [`ServerEvent::ConnectionClosed`] with
//! quiche's stats).
//!
//! Per stream: an [`ObjectSplitter`] cuts the bytes into JSON objects. Each
//! object takes the next *slot*; slots are answered strictly in order, so a
//! client that writes several objects on one stream reads its answers in the
//! same order. A slot is answered by the core (duplicates, bad fields, fatal
//! stream errors) or by the application through [`Server::respond`] after it
//! recorded the report. The server FINs its side once the client's FIN
//! arrived and every slot is answered.
//!
//! Connections live in a [`table::ConnTable`], which keeps the indexes that
//! find one (by connection ID, by deadline, by having something to send)
//! consistent, so finding what is due costs O(log n) and nothing is scanned
//! per datagram. HTTP/0.9 requests are read in [`hq`].

mod hq;
mod table;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use self::table::{Conn, ConnTable};
use crate::config::{HQ_ALPN, RetryMode, ServerConfig, codes};
use crate::dedup::Dedup;
use crate::error::{ConfigError, DatagramError, RespondError, StreamError};
use crate::identity::{Identity, IdentityError, RecordKey};
use crate::report::{CODE_NOT_RECORDED, CODE_UNSTORABLE, Report, Response};
use crate::rng::CoreRng;
use crate::stream::ObjectSplitter;
use crate::token::{MIN_RESET_LEN, RetryTokens, SecretKeys, ServerSecret, stateless_reset};
use crate::{DebugLogs, LOCAL_CID_LEN, Transmit, attach_debug_logs};

/// Names a connection for the lifetime of the [`Server`] (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnKey(pub u64);

impl fmt::Display for ConnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// Names one report waiting for [`Server::respond`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReportHandle {
    /// Its connection.
    pub conn: ConnKey,
    /// Its stream.
    pub stream: u64,
    /// Its position on the stream (0 for the first object).
    pub index: u64,
}

/// What the application did with a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written to the sink: acknowledge it.
    Recorded,
    /// Could not be written: the client keeps it and sends it again.
    NotRecorded(String),
    /// The store refuses it for what it holds, and always will (e.g. a
    /// value its column cannot take): answered `unstorable`, permanent, so
    /// the client drops it instead of sending it again; counted as
    /// rejected.
    Unstorable(String),
    /// Recorded before, by this process or another one sharing its store
    /// (a database's key refused the row): answered `"duplicate":true`, so
    /// the client forgets it, and counted as a duplicate.
    Duplicate,
}

/// Transport counters of a connection, from quiche, when it closed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// Packets sent.
    pub sent: usize,
    /// Packets received.
    pub recv: usize,
    /// Packets declared lost.
    pub lost: usize,
    /// Bytes sent.
    pub sent_bytes: u64,
    /// Bytes received.
    pub recv_bytes: u64,
    /// Smoothed RTT of the active path.
    pub rtt: Option<Duration>,
    /// Reports received on the connection (objects, including rejected).
    pub reports: u64,
}

/// Why a connection closed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// Idle timeout.
    IdleTimeout,
    /// The handshake did not finish within the handshake timeout.
    HandshakeTimeout,
    /// The client closed it.
    PeerClosed {
        /// Its error code.
        code: u64,
        /// Its reason phrase.
        reason: String,
    },
    /// We closed it (shutdown, protocol error); code and reason as sent.
    LocalClosed {
        /// The error code.
        code: u64,
        /// The reason phrase.
        reason: String,
    },
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::IdleTimeout => f.write_str("idle timeout"),
            CloseReason::HandshakeTimeout => f.write_str("handshake timeout"),
            CloseReason::PeerClosed { code, reason } => {
                write!(f, "closed by peer ({code:#x} {reason})")
            }
            CloseReason::LocalClosed { code, reason } => {
                write!(f, "closed by us ({code:#x} {reason})")
            }
        }
    }
}

/// A configured limit of the server (see [`ServerEvent::LimitHit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// [`ServerConfig::max_connections`]: a new connection was refused.
    Connections,
    /// [`ServerConfig::max_streams`]: the client opened more streams than
    /// it was allowed; quiche closed the connection (STREAM_LIMIT_ERROR).
    Streams,
    /// [`ServerConfig::max_report_bytes`]: an object over the limit was
    /// refused (error answer, STOP_SENDING); the connection carries on.
    ReportBytes,
    /// [`ServerConfig::max_unanswered_bytes`]: the connection was closed
    /// with [`codes::EXCESSIVE_LOAD`].
    UnansweredBytes,
    /// [`ServerConfig::handshake_timeout`]: a half-open connection was
    /// reaped.
    HandshakeTimeout,
    /// [`ServerConfig::idle_timeout`]: an idle connection was closed.
    IdleTimeout,
    /// [`ServerConfig::max_connections_per_identity`]: a connection of an
    /// identity that had that many was closed after its handshake, with
    /// [`codes::EXCESSIVE_LOAD`].
    IdentityConnections,
    /// [`MAX_HANDSHAKES_FROM`]: a new connection from an origin with that
    /// many handshakes in progress was refused (its Initial dropped; the
    /// client sends it again).
    HandshakesFrom,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::Connections => "connection limit reached: new connection refused",
            Limit::Streams => "stream limit exceeded: connection closed",
            Limit::ReportBytes => "report over the size limit: refused",
            Limit::UnansweredBytes => "too many unanswered bytes: connection closed",
            Limit::HandshakeTimeout => "handshake not done in time: connection reaped",
            Limit::IdleTimeout => "idle timeout: connection closed",
            Limit::IdentityConnections => {
                "connection limit of its identity reached: connection closed"
            }
            Limit::HandshakesFrom => {
                "too many handshakes in progress from one address: new connection refused"
            }
        })
    }
}

/// How often each [`Limit`] was hit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitCounts {
    /// [`Limit::Connections`]: new connections refused (every refused
    /// Initial counts).
    pub connections: u64,
    /// [`Limit::Streams`]: connections closed for opening too many streams.
    pub streams: u64,
    /// [`Limit::ReportBytes`]: objects refused as too large.
    pub report_bytes: u64,
    /// [`Limit::UnansweredBytes`]: connections closed with
    /// [`codes::EXCESSIVE_LOAD`].
    pub unanswered_bytes: u64,
    /// [`Limit::HandshakeTimeout`]: half-open connections reaped.
    pub handshake_timeouts: u64,
    /// [`Limit::IdleTimeout`]: connections closed by the idle timeout.
    pub idle_timeouts: u64,
    /// [`Limit::IdentityConnections`]: connections closed as one too many
    /// of their identity.
    pub identity_connections: u64,
    /// [`Limit::HandshakesFrom`]: new connections refused (every refused
    /// Initial counts).
    pub handshakes_from: u64,
}

impl LimitCounts {
    /// The count of one limit.
    pub fn get(&self, limit: Limit) -> u64 {
        match limit {
            Limit::Connections => self.connections,
            Limit::Streams => self.streams,
            Limit::ReportBytes => self.report_bytes,
            Limit::UnansweredBytes => self.unanswered_bytes,
            Limit::HandshakeTimeout => self.handshake_timeouts,
            Limit::IdleTimeout => self.idle_timeouts,
            Limit::IdentityConnections => self.identity_connections,
            Limit::HandshakesFrom => self.handshakes_from,
        }
    }

    fn bump(&mut self, limit: Limit) {
        let n = match limit {
            Limit::Connections => &mut self.connections,
            Limit::Streams => &mut self.streams,
            Limit::ReportBytes => &mut self.report_bytes,
            Limit::UnansweredBytes => &mut self.unanswered_bytes,
            Limit::HandshakeTimeout => &mut self.handshake_timeouts,
            Limit::IdleTimeout => &mut self.idle_timeouts,
            Limit::IdentityConnections => &mut self.identity_connections,
            Limit::HandshakesFrom => &mut self.handshakes_from,
        };
        *n += 1;
    }
}

/// What the server can tell its application.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A handshake completed.
    ConnectionOpened {
        /// The connection.
        conn: ConnKey,
        /// The client's address.
        peer: SocketAddr,
        /// The TLS session was resumed.
        resumed: bool,
        /// Who it is: its client certificate's common name, or the
        /// anonymous identity (see [`crate::identity`]); every report and
        /// request on it is bound to it.
        identity: Identity,
        /// From the client's first Initial to the end of the handshake.
        handshake: Duration,
    },
    /// A report to record; answer it with [`Server::respond`] once written.
    Report {
        /// Pass it to [`Server::respond`].
        handle: ReportHandle,
        /// The client's address.
        peer: SocketAddr,
        /// The report.
        report: Report,
    },
    /// An object or a stream was refused (already answered with an error).
    StreamRejected {
        /// The connection.
        conn: ConnKey,
        /// The stream.
        stream: u64,
        /// Why.
        error: StreamError,
    },
    /// A report seen before arrived again; answered `"duplicate":true`.
    Duplicate {
        /// The connection.
        conn: ConnKey,
        /// The report's key (its identity is the connection's).
        key: RecordKey,
    },
    /// A handshake was refused for its client certificate (only with
    /// [`ServerConfig::client_ca`]): none, one that does not verify, or one
    /// whose name cannot be an identity. Nothing of the connection was
    /// read; it closes with a TLS alert (CRYPTO_ERROR).
    HandshakeRefused {
        /// The connection (it never opened).
        conn: ConnKey,
        /// The peer's address.
        peer: SocketAddr,
        /// Why.
        reason: CertRefusal,
    },
    /// A configured limit was hit (also counted in
    /// [`ServerStats::limits`]); the event that describes the consequence
    /// ([`ServerEvent::StreamRejected`], [`ServerEvent::ConnectionClosed`])
    /// follows as usual. [`Limit::Connections`] is reported once each time
    /// the server reaches its limit, not for every refused packet, so a
    /// flood does not flood the log.
    LimitHit {
        /// The connection, if the limit is about one.
        conn: Option<ConnKey>,
        /// The client's address.
        peer: SocketAddr,
        /// Which limit.
        limit: Limit,
    },
    /// An HTTP/0.9 (`hq-interop`) request; answer it with
    /// [`Server::respond_request`].
    Request {
        /// Pass it to [`Server::respond_request`].
        handle: ReportHandle,
        /// The client's address.
        peer: SocketAddr,
        /// The requested path (e.g. `/latest`), without the query string.
        path: String,
        /// Who asks (the connection's identity): the application decides
        /// what it may read.
        identity: Identity,
    },
    /// A connection is gone.
    ConnectionClosed {
        /// The connection.
        conn: ConnKey,
        /// The client's last address.
        peer: SocketAddr,
        /// Whether its handshake had completed.
        established: bool,
        /// Why it closed.
        reason: CloseReason,
        /// quiche's counters.
        stats: ConnStats,
    },
}

/// Why a handshake was refused for its client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertRefusal {
    /// The peer presented no certificate (closed with
    /// [`codes::CERTIFICATE_REQUIRED`]).
    Missing,
    /// TLS refused the certificate (not signed by a `--client-ca`, expired,
    /// ...): the TLS alert sent.
    Invalid {
        /// The TLS alert (RFC 8446 6.2), e.g. 48 unknown_ca.
        alert: u8,
    },
    /// The certificate verified but its subject name cannot be an identity
    /// (closed with [`codes::BAD_CERTIFICATE`]).
    UnusableName(IdentityError),
}

impl CertRefusal {
    /// A short machine-readable name (a metrics label).
    pub fn label(&self) -> &'static str {
        match self {
            CertRefusal::Missing => "no_certificate",
            CertRefusal::Invalid { .. } => "bad_certificate",
            CertRefusal::UnusableName(_) => "unusable_name",
        }
    }
}

impl fmt::Display for CertRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertRefusal::Missing => f.write_str("no client certificate"),
            CertRefusal::Invalid { alert } => write!(
                f,
                "client certificate refused by TLS (alert {alert}{})",
                match alert {
                    42 => " bad_certificate",
                    43 => " unsupported_certificate",
                    44 => " certificate_revoked",
                    45 => " certificate_expired",
                    46 => " certificate_unknown",
                    48 => " unknown_ca: not signed by a --client-ca",
                    _ => "",
                }
            ),
            CertRefusal::UnusableName(e) => write!(f, "client certificate name unusable: {e}"),
        }
    }
}

/// Server-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections accepted since the start.
    pub connections_total: u64,
    /// Reports handed to the application.
    pub reports: u64,
    /// Reports answered as duplicates.
    pub duplicates: u64,
    /// Objects or streams refused.
    pub rejected: u64,
    /// Datagrams dropped.
    pub dropped_datagrams: u64,
    /// Version negotiation packets sent.
    pub version_negotiations: u64,
    /// Stateless resets sent.
    pub resets_sent: u64,
    /// Retry packets sent.
    pub retries_sent: u64,
    /// Initials dropped for an invalid or expired Retry token.
    pub invalid_tokens: u64,
    /// How often each configured limit was hit.
    pub limits: LimitCounts,
    /// Handshakes refused for their client certificate
    /// ([`ServerEvent::HandshakeRefused`]).
    pub handshakes_refused: u64,
}

/// One answer slot on a stream.
#[derive(Debug)]
enum Slot {
    /// Waiting for the application (or for the first copy of a duplicate),
    /// with what it holds against the connection's read budget
    /// ([`StreamState::pending_bytes`]; 0 for a parked copy or a request).
    Pending(usize),
    /// The encoded answer.
    Ready(Vec<u8>),
}

#[derive(Debug)]
struct StreamState {
    splitter: ObjectSplitter,
    /// Answers in stream order; `slots[0]` is object number `first_index`.
    slots: VecDeque<Slot>,
    first_index: u64,
    next_index: u64,
    /// Encoded answers quiche has not taken yet.
    out: Vec<u8>,
    /// Bytes of the `Ready` slots still in `slots`.
    ready_bytes: usize,
    /// Bytes of the answers of this stream's parked copies (`Pending`
    /// slots waiting on another copy the application holds), kept in
    /// `Server::awaiting` until that copy's fate is known.
    parked_bytes: usize,
    /// What this stream's reports in the application's hands hold
    /// ([`pending_charge`] each), against the connection's read budget
    /// ([`Server::read_streams`]).
    pending_bytes: usize,
    /// On an HTTP/0.9 connection: the request line so far.
    request: Option<Vec<u8>>,
    /// The client's side is done (FIN, reset, or we stopped reading).
    read_done: bool,
    /// Our FIN is sent (or the client stopped our side): nothing more to do.
    write_done: bool,
}

impl StreamState {
    fn new(max: usize) -> StreamState {
        StreamState {
            splitter: ObjectSplitter::new(max),
            slots: VecDeque::new(),
            first_index: 0,
            next_index: 0,
            out: Vec::new(),
            ready_bytes: 0,
            parked_bytes: 0,
            pending_bytes: 0,
            request: None,
            read_done: false,
            write_done: false,
        }
    }
}

/// How a new connection came to be.
enum Origin {
    /// A client's first Initial: we pick a fresh connection ID, and route
    /// the destination the client picked too (it sends there until it
    /// hears from us).
    Fresh {
        first_dcid: quiche::ConnectionId<'static>,
    },
    /// A client that answered our Retry with a valid token: its destination
    /// is the connection ID we chose in the Retry (the token binds it),
    /// which becomes the connection's own; `odcid` is its first pick.
    Retried {
        scid: quiche::ConnectionId<'static>,
        odcid: quiche::ConnectionId<'static>,
    },
}

/// A report handed to the application, waiting for [`Server::respond`].
#[derive(Debug)]
struct Awaiting {
    key: Option<RecordKey>,
    /// The answer if it is recorded (built when the report arrived, around
    /// its bytes; `duplicate` for a parked copy).
    ok: Vec<u8>,
}

/// The Sans-IO collecting server.
///
/// Methods, by kind:
/// - inputs, each taking `now`: [`Server::handle_datagram`],
///   [`Server::handle_timeout`], [`Server::respond`], [`Server::close_all`];
/// - outputs, drained after every input as the crate's contract says (see
///   the [crate] docs): [`Server::poll_event`], [`Server::poll_transmit`],
///   events again until they are empty, then [`Server::poll_timeout`];
/// - getters: [`Server::stats`], [`Server::connections`], ...
pub struct Server {
    cfg: ServerConfig,
    quic_cfg: quiche::Config,
    rng: CoreRng,
    /// The first byte of every connection ID issued (see
    /// [`Server::set_cid_prefix`]).
    cid_prefix: Option<u8>,
    conns: ConnTable,
    events: VecDeque<ServerEvent>,
    /// Version negotiation, Retry and stateless reset packets.
    endpoint_out: VecDeque<EndpointPacket>,
    dedup: Dedup,
    awaiting: BTreeMap<ReportHandle, Awaiting>,
    /// Copies of a report that arrived while its first copy was with the
    /// application: answered when it is.
    parked: HashMap<RecordKey, Vec<ReportHandle>>,
    stats: ServerStats,
    scratch: Vec<u8>,
    /// Reused list of objects read in one pass.
    items: Vec<(u64, crate::stream::Item)>,
    debug_logs: Option<Box<dyn DebugLogs>>,
    /// [`Server::close_all`] was called.
    shutting_down: bool,
    keys: SecretKeys,
    tokens: RetryTokens,
    /// [`Limit::Connections`] was reported and the server has not been
    /// below the limit since.
    conn_limit_reported: bool,
    /// Connections holding each certificate identity (none for the
    /// anonymous one; [`ServerConfig::max_connections_per_identity`]).
    identity_conns: HashMap<Identity, usize>,
    reset_budget: ResetBudget,
}

/// A packet of the endpoint rather than of a connection, waiting to be sent.
#[derive(Debug)]
struct EndpointPacket {
    bytes: Vec<u8>,
    to: SocketAddr,
    from: SocketAddr,
}

/// Token bucket for stateless resets, [`ServerConfig::max_resets_per_sec`]
/// deep and refilled at that rate.
#[derive(Debug)]
struct ResetBudget {
    /// Resets that may be sent now.
    tokens: f64,
    /// When `tokens` was last refilled.
    refilled: Option<Instant>,
}

impl ResetBudget {
    fn full(rate: u32) -> ResetBudget {
        ResetBudget {
            tokens: f64::from(rate),
            refilled: None,
        }
    }

    /// Takes one reset if the budget allows it at `now`.
    fn take(&mut self, now: Instant, rate: u32) -> bool {
        let rate = f64::from(rate);
        if let Some(last) = self.refilled.replace(now) {
            self.tokens =
                (self.tokens + now.saturating_duration_since(last).as_secs_f64() * rate).min(rate);
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("connections", &self.conns.len())
            .field("stats", &self.stats)
            .finish()
    }
}

/// Most endpoint packets (version negotiation) queued at once.
const MAX_ENDPOINT_QUEUE: usize = 1024;

impl Server {
    /// A server with no connections.
    pub fn new(cfg: ServerConfig, mut rng: CoreRng) -> Result<Server, ConfigError> {
        let mut quic_cfg = cfg.quiche_config()?;
        let secret = cfg
            .secret
            .clone()
            .unwrap_or_else(|| ServerSecret::random(&mut rng));
        let keys = secret.keys();
        let mut instance = [0u8; 16];
        rng.fill(&mut instance);
        let tokens = RetryTokens::new(&keys, instance, cfg.retry_token_lifetime);
        quic_cfg
            .set_ticket_key(keys.ticket_key())
            .map_err(|err| ConfigError::Quiche {
                what: "setting the session ticket key",
                err,
            })?;
        Ok(Server {
            keys,
            shutting_down: false,
            tokens,
            conn_limit_reported: false,
            identity_conns: HashMap::new(),
            reset_budget: ResetBudget::full(cfg.max_resets_per_sec),
            dedup: Dedup::new(cfg.dedup),
            cfg,
            quic_cfg,
            rng,
            cid_prefix: None,
            conns: ConnTable::default(),
            events: VecDeque::new(),
            endpoint_out: VecDeque::new(),
            awaiting: BTreeMap::new(),
            parked: HashMap::new(),
            stats: ServerStats::default(),
            scratch: vec![0; 64 * 1024],
            items: Vec::new(),
            debug_logs: None,
        })
    }

    /// Installs debugging hooks (TLS key log, qlog) for every connection
    /// made from now on.
    pub fn set_debug_logs(&mut self, logs: Box<dyn DebugLogs>) {
        self.quic_cfg.log_keys();
        self.debug_logs = Some(logs);
    }

    /// Counters.
    pub fn stats(&self) -> ServerStats {
        self.stats
    }

    /// The mean smoothed RTT over established connections (for a summary
    /// line; walks every connection).
    pub fn mean_rtt(&self) -> Option<Duration> {
        let (mut sum, mut n) = (Duration::ZERO, 0u32);
        for c in self.conns.values().filter(|c| c.opened()) {
            if let Some(p) = c.quic.path_stats().next() {
                sum += p.rtt;
                n += 1;
            }
        }
        sum.checked_div(n)
    }

    /// Open connections (including handshakes in progress).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Streams whose state the server holds, over every connection: each
    /// stays until both sides are done and its every answer is taken (a
    /// number that only grows points at a stream never let go).
    pub fn streams_held(&self) -> usize {
        self.conns.values().map(|c| c.streams.len()).sum()
    }

    /// Bytes held for the connections' streams: answers quiche has not
    /// taken, parts of reports, request lines (what the unanswered-bytes
    /// limits count).
    pub fn bytes_held(&self) -> usize {
        self.conns
            .values()
            .flat_map(|c| c.streams.values())
            .map(StreamState::unanswered)
            .sum()
    }

    /// Reports not yet answered: those handed to the application, and the
    /// copies parked on one of them.
    pub fn awaiting(&self) -> usize {
        self.awaiting.len()
    }

    /// Connections whose handshake is in progress (what
    /// [`RetryMode::Auto`] compares with its threshold).
    pub fn handshakes_in_progress(&self) -> usize {
        self.conns.handshaking()
    }

    /// Makes `prefix` the first byte of every connection ID issued from now
    /// on (`None`: all bytes random, the default). Several server processes
    /// sharing one UDP port (`SO_REUSEPORT`) each put their own byte there,
    /// so a reuseport BPF program can steer a client's short-header packets
    /// to the process that holds its connection whatever address they come
    /// from. Connection IDs issued before keep their byte.
    pub fn set_cid_prefix(&mut self, prefix: Option<u8>) {
        self.cid_prefix = prefix;
    }

    /// The first byte connection IDs are issued with, if set.
    pub fn cid_prefix(&self) -> Option<u8> {
        self.cid_prefix
    }

    /// Marks `key` as recorded before this server started (e.g. read back
    /// from its sink), so a resend is answered as a duplicate.
    pub fn mark_recorded(&mut self, key: &RecordKey) {
        self.dedup.insert(key);
    }

    /// Whether every connection is gone after [`Server::close_all`]: each
    /// sent its CONNECTION_CLOSE and was reported in
    /// [`ServerEvent::ConnectionClosed`] (or there were none).
    pub fn is_closed(&self) -> bool {
        self.conns.is_empty()
    }

    // ----- inputs ---------------------------------------------------------

    /// A UDP datagram arrived from `from` on our local address `to`.
    ///
    /// Unusable datagrams are dropped (and reported as an error); they never
    /// disturb other connections and are never answered with more bytes
    /// than they carried.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        to: SocketAddr,
        data: &mut [u8],
    ) -> Result<(), DatagramError> {
        let res = self.route(now, from, to, data);
        if res.is_err() {
            self.stats.dropped_datagrams += 1;
        }
        res
    }

    fn route(
        &mut self,
        now: Instant,
        from: SocketAddr,
        to: SocketAddr,
        data: &mut [u8],
    ) -> Result<(), DatagramError> {
        let len = data.len();
        if let Some(LongHeader {
            version,
            dcid,
            scid,
        }) = long_header_invariants(data)
            && !quiche::version_is_supported(version)
        {
            // Only the invariants (RFC 8999) of a version we do not speak
            // are read: quiche would parse the rest as if it were ours. Only
            // a datagram the size of a client's Initial earns an answer, and
            // the answer is smaller than it (no amplification): at most
            // 7 + 2 * 255 + 4 bytes. Never to a Version Negotiation.
            if len >= 1200 && version != 0 {
                let mut out = vec![0u8; 600];
                let (scid, dcid) = (
                    quiche::ConnectionId::from_ref(scid),
                    quiche::ConnectionId::from_ref(dcid),
                );
                if let Ok(n) = quiche::negotiate_version(&scid, &dcid, &mut out) {
                    out.truncate(n);
                    if self.queue_endpoint(out, from, to) {
                        self.stats.version_negotiations += 1;
                    }
                }
            }
            return Err(DatagramError::UnsupportedVersion(version));
        }
        let hdr = quiche::Header::from_slice(data, LOCAL_CID_LEN)
            .map_err(|_| DatagramError::BadHeader)?;
        if let Some(key) = self.conns.lookup(&hdr.dcid) {
            return self.recv_on(now, key, from, to, data);
        }
        if hdr.ty == quiche::Type::Short {
            // A connection we do not know (we restarted, or it is long
            // gone): tell the client at once with a stateless reset. Not
            // for junk without QUIC's fixed bit, nor for a packet too short
            // to answer smaller (which must not use up the budget).
            if data[0] & 0x40 != 0
                && len > MIN_RESET_LEN
                && self.reset_budget.take(now, self.cfg.max_resets_per_sec)
                && let Some(p) = stateless_reset(&self.keys, &hdr.dcid, len, &mut self.rng)
                && self.queue_endpoint(p, from, to)
            {
                self.stats.resets_sent += 1;
            }
            return Err(DatagramError::UnknownConnection);
        }
        if hdr.ty != quiche::Type::Initial {
            return Err(DatagramError::UnknownConnection);
        }
        if len < 1200 {
            return Err(DatagramError::InitialTooSmall(len));
        }
        // Full, and no handshake stale enough to give its place (see
        // `accept`, which takes it only once the new one is accepted).
        if self.conns.len() >= self.cfg.max_connections && self.stale_half_open(now).is_none() {
            self.stats.limits.bump(Limit::Connections);
            if !self.conn_limit_reported {
                self.conn_limit_reported = true;
                self.events.push_back(ServerEvent::LimitHit {
                    conn: None,
                    peer: from,
                    limit: Limit::Connections,
                });
            }
            return Err(DatagramError::TooManyConnections);
        }
        self.conn_limit_reported = false;
        let token = hdr.token.as_deref().unwrap_or_default();
        if !token.is_empty() {
            // The client answers our Retry: its address is proven if the
            // token is ours, for this address, and fresh. Its destination
            // is the connection ID we chose in the Retry (the token binds
            // it), which becomes the connection's own.
            let odcid = match self.tokens.verify(now, from, &hdr.dcid, token) {
                Ok(odcid) => quiche::ConnectionId::from_vec(odcid),
                Err(e) => {
                    self.stats.invalid_tokens += 1;
                    return Err(DatagramError::InvalidToken(e));
                }
            };
            // Only handshakes from a proven address count against its
            // origin: a spoofer cannot use them to lock an address out.
            if !from.ip().to_canonical().is_loopback()
                && self.conns.handshakes_from(from) >= MAX_HANDSHAKES_FROM
            {
                self.stats.limits.bump(Limit::HandshakesFrom);
                return Err(DatagramError::TooManyHandshakes);
            }
            let scid = hdr.dcid.into_owned();
            return self.accept(now, Origin::Retried { scid, odcid }, from, to, data);
        }
        if hdr.dcid.len() < 8 {
            // RFC 9000 7.2: a client's first destination has 8 bytes or more.
            return Err(DatagramError::InvalidInitial);
        }
        if self.retry_required() {
            return self.send_retry(now, &hdr, from, to);
        }
        // Until it hears from us, the client still sends to the
        // destination it picked: route that too.
        let first_dcid = hdr.dcid.into_owned();
        self.accept(now, Origin::Fresh { first_dcid }, from, to, data)
    }

    /// The oldest handshake in progress for [`HALF_OPEN_EVICTABLE`] or
    /// more.
    fn stale_half_open(&mut self, now: Instant) -> Option<ConnKey> {
        let stale = now
            + self
                .cfg
                .handshake_timeout
                .saturating_sub(HALF_OPEN_EVICTABLE);
        self.conns.stalest_half_open(stale)
    }

    /// Whether a new client must prove its address first.
    fn retry_required(&self) -> bool {
        match self.cfg.retry {
            RetryMode::Always => true,
            RetryMode::Never => false,
            RetryMode::Auto { threshold } => self.conns.handshaking() >= threshold,
        }
    }

    /// Answers a token-less Initial with a Retry (about 120 bytes, for an
    /// Initial of at least 1200): no state is kept.
    fn send_retry(
        &mut self,
        now: Instant,
        hdr: &quiche::Header<'_>,
        from: SocketAddr,
        to: SocketAddr,
    ) -> Result<(), DatagramError> {
        let new_scid = new_cid(&mut self.rng, self.cid_prefix);
        let token = self
            .tokens
            .mint(now, from, &hdr.dcid, &new_scid)
            .ok_or(DatagramError::BadHeader)?;
        let mut out = vec![0u8; 256];
        let n = quiche::retry(
            &hdr.scid,
            &hdr.dcid,
            &quiche::ConnectionId::from_ref(&new_scid),
            &token,
            hdr.version,
            &mut out,
        )
        .map_err(DatagramError::Quic)?;
        out.truncate(n);
        if self.queue_endpoint(out, from, to) {
            self.stats.retries_sent += 1;
        }
        Ok(())
    }

    /// Creates a connection for a client Initial and feeds it the datagram.
    /// If quiche can use nothing in the datagram, the connection is
    /// forgotten at once without a word (no event, nothing sent, no timer):
    /// junk costs no state.
    fn accept(
        &mut self,
        now: Instant,
        origin: Origin,
        from: SocketAddr,
        to: SocketAddr,
        data: &mut [u8],
    ) -> Result<(), DatagramError> {
        let (scid, odcid, also_route) = match origin {
            Origin::Fresh { first_dcid } => {
                let scid = new_cid(&mut self.rng, self.cid_prefix);
                let scid = quiche::ConnectionId::from_vec(scid.to_vec());
                (scid, None, Some(first_dcid))
            }
            Origin::Retried { scid, odcid } => (scid, Some(odcid), None),
        };
        self.quic_cfg
            .set_stateless_reset_token(Some(self.keys.reset_token(&scid)));
        let mut quic = quiche::accept(&scid, odcid.as_ref(), to, from, &mut self.quic_cfg)
            .map_err(DatagramError::Quic)?;
        attach_debug_logs(&mut self.debug_logs, &mut quic);
        let res = quic.recv(data, quiche::RecvInfo { from, to });
        match res {
            Err(e) => return Err(DatagramError::Quic(e)),
            Ok(_) if quic.stats().recv == 0 => return Err(DatagramError::InvalidInitial),
            Ok(_) => {}
        }
        if self.conns.len() >= self.cfg.max_connections
            && let Some(key) = self.stale_half_open(now)
        {
            // Full: a handshake in progress for longer than any honest one
            // takes gives its place, now that the new one is accepted
            // (peers that answer the Retry and go no further would
            // otherwise keep every slot from honest clients).
            let peer = self.conns.get(key).map_or(from, |c| c.peer);
            self.limit_hit(Some(key), peer, Limit::HandshakeTimeout);
            self.reap(key, CloseReason::HandshakeTimeout);
        }
        self.stats.connections_total += 1;
        let validated = also_route.is_none();
        let mut cids = vec![scid];
        cids.extend(also_route);
        let mut conn = Conn::new(quic, from, now + self.cfg.handshake_timeout);
        conn.validated = validated;
        let key = self.conns.insert(conn, cids);
        self.after_io(now, key);
        Ok(())
    }

    fn recv_on(
        &mut self,
        now: Instant,
        key: ConnKey,
        from: SocketAddr,
        to: SocketAddr,
        data: &mut [u8],
    ) -> Result<(), DatagramError> {
        let conn = self
            .conns
            .get_mut(key)
            .expect("routes only name live connections");
        let res = conn.quic.recv(data, quiche::RecvInfo { from, to });
        if from != conn.peer {
            // Undecryptable junk from anywhere is "received" too: believe
            // only the path quiche uses.
            if let Some(p) = conn.quic.path_stats().find(|p| p.active) {
                conn.peer = p.peer_addr;
            }
        }
        if res == Err(quiche::Error::StreamLimit) {
            let peer = conn.peer;
            self.limit_hit(Some(key), peer, Limit::Streams);
        }
        self.after_io(now, key);
        match res {
            Ok(_) | Err(quiche::Error::Done) => Ok(()),
            Err(e) => Err(DatagramError::Quic(e)),
        }
    }

    /// Counts a limit hit and reports it.
    fn limit_hit(&mut self, conn: Option<ConnKey>, peer: SocketAddr, limit: Limit) {
        self.stats.limits.bump(limit);
        self.events
            .push_back(ServerEvent::LimitHit { conn, peer, limit });
    }

    /// A deadline from [`Server::poll_timeout`] passed (early is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(key) = self.conns.pop_due(now) {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.quic.timeout_instant().is_some_and(|t| t <= now) {
                conn.quic.on_timeout();
            }
            if !conn.opened() && conn.handshake_deadline <= now && !conn.quic.is_closed() {
                // Half-open: reap it without a word (the client may be a spoofer).
                let peer = conn.peer;
                self.limit_hit(Some(key), peer, Limit::HandshakeTimeout);
                self.reap(key, CloseReason::HandshakeTimeout);
                continue;
            }
            self.after_io(now, key);
        }
    }

    /// Answers a report the application has handled: `Recorded` once it is
    /// written (the client then forgets it), `NotRecorded` if it could not
    /// be (the client sends it again later), `Unstorable` if the store
    /// refuses it for good (the client drops it). Drain
    /// [`Server::poll_transmit`] afterwards.
    ///
    /// A report whose connection is gone still counts as recorded for the
    /// duplicate filter, so the client's resend is not recorded twice.
    pub fn respond(
        &mut self,
        now: Instant,
        handle: ReportHandle,
        outcome: Outcome,
    ) -> Result<(), RespondError> {
        let aw = self
            .awaiting
            .remove(&handle)
            .ok_or(RespondError::UnknownReport)?;
        // Recorded now or before: either way the store holds it.
        let stored = matches!(outcome, Outcome::Recorded | Outcome::Duplicate);
        match outcome {
            Outcome::Duplicate => self.stats.duplicates += 1,
            Outcome::Unstorable(_) => self.stats.rejected += 1,
            Outcome::Recorded | Outcome::NotRecorded(_) => {}
        }
        if let Some(k) = aw.key {
            if stored {
                self.dedup.insert(&k);
            }
            // Copies that waited on this one get the same fate.
            for h in self.parked.remove(&k).unwrap_or_default() {
                let Some(copy) = self.awaiting.remove(&h) else {
                    continue;
                };
                if stored {
                    self.stats.duplicates += 1;
                } else if matches!(outcome, Outcome::Unstorable(_)) {
                    self.stats.rejected += 1;
                }
                if let Some(c) = self.conns.get_mut(h.conn) {
                    c.parked = c.parked.saturating_sub(1);
                    if c.parked == 0 {
                        c.parked_keys.clear();
                    }
                    if let Some(st) = c.streams.get_mut(&h.stream) {
                        st.parked_bytes = st.parked_bytes.saturating_sub(copy.ok.len());
                    }
                }
                // A copy's answer says `duplicate` already.
                let a = if stored {
                    copy.ok
                } else {
                    answer(&outcome, copy.ok)
                };
                self.fill_slot(h, a);
                self.after_io(now, h.conn);
            }
        }
        let delivered = self.fill_slot(handle, answer(&outcome, aw.ok));
        self.after_io(now, handle.conn);
        if delivered {
            Ok(())
        } else {
            Err(RespondError::ConnectionGone)
        }
    }

    /// Answers an HTTP/0.9 request ([`ServerEvent::Request`]) with `body`;
    /// the stream is FINed after it. Drain [`Server::poll_transmit`] after.
    pub fn respond_request(
        &mut self,
        now: Instant,
        handle: ReportHandle,
        body: Vec<u8>,
    ) -> Result<(), RespondError> {
        if !self.conns.contains(handle.conn) {
            return Err(RespondError::ConnectionGone);
        }
        if !self.fill_slot(handle, body) {
            return Err(RespondError::UnknownReport);
        }
        self.after_io(now, handle.conn);
        Ok(())
    }

    /// Closes every connection (CONNECTION_CLOSE, [`codes::SHUTTING_DOWN`]).
    /// Drain [`Server::poll_transmit`]; then [`Server::is_closed`] is true.
    pub fn close_all(&mut self, now: Instant) {
        self.shutting_down = true;
        for key in self.conns.keys() {
            if let Some(c) = self.conns.get_mut(key) {
                let _ = c
                    .quic
                    .close(true, codes::SHUTTING_DOWN, b"server shutting down");
            }
            self.after_io(now, key);
        }
    }

    // ----- outputs --------------------------------------------------------

    /// The next datagram to send, written into `buf`. Call until `None`.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        if let Some(EndpointPacket { bytes, to, from }) = self.endpoint_out.pop_front() {
            let len = bytes.len().min(buf.len());
            buf[..len].copy_from_slice(&bytes[..len]);
            return Some(Transmit { len, to, from });
        }
        while let Some((key, conn)) = self.conns.next_to_send() {
            write_due_fins(conn);
            match conn.quic.send(buf) {
                Ok((len, info)) => return Some(Transmit::sent(len, &info)),
                Err(_) => {
                    self.conns.sent_all(key);
                    self.settle(now, key);
                }
            }
        }
        None
    }

    /// The next event for the application. Call until `None`.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// The earliest time [`Server::handle_timeout`] wants to run, if any.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conns.next_deadline()
    }

    // ----- internals ------------------------------------------------------

    /// Forgets the connection IDs the client retired and gives an
    /// established connection spare ones (each with its reset token), so
    /// the client can change address.
    fn manage_cids(&mut self, key: ConnKey) {
        let (rng, keys, prefix) = (&mut self.rng, &self.keys, self.cid_prefix);
        self.conns.manage_cids(key, || {
            let b = new_cid(rng, prefix);
            let cid = quiche::ConnectionId::from_vec(b.to_vec());
            let reset_token = keys.reset_token(&cid);
            (cid, reset_token)
        });
    }

    /// Queues an endpoint packet; false if the queue is full (dropped).
    fn queue_endpoint(&mut self, bytes: Vec<u8>, to: SocketAddr, from: SocketAddr) -> bool {
        if self.endpoint_out.len() < MAX_ENDPOINT_QUEUE {
            self.endpoint_out
                .push_back(EndpointPacket { bytes, to, from });
            true
        } else {
            false
        }
    }

    /// After any input on a connection: notice the handshake, read and
    /// answer streams, queue it for sending, reap it if closed, re-arm its
    /// timer.
    fn after_io(&mut self, now: Instant, key: ConnKey) {
        let readable = self.settle_identity(key);
        if self.conns.note_established(key)
            && let Some(conn) = self.conns.get(key)
            && let Some(identity) = conn.identity.clone()
        {
            let (peer, resumed) = (conn.peer, conn.quic.is_resumed());
            let started = conn.handshake_deadline - self.cfg.handshake_timeout;
            self.events.push_back(ServerEvent::ConnectionOpened {
                conn: key,
                peer,
                resumed,
                identity,
                handshake: now.saturating_duration_since(started),
            });
        }
        self.manage_cids(key);
        if readable {
            self.read_streams(key);
        }
        self.write_streams(key);
        self.check_unanswered(key);
        self.conns.queue_send(key);
        self.settle(now, key);
    }

    /// Settles the identity of a connection before any of its streams is
    /// read, and says whether they may be read now.
    ///
    /// It is settled once the handshake is complete, and not before: 0-RTT
    /// reports wait in quiche until then, so a replayed 0-RTT flight (an
    /// on-path copy of a client's first packets, which cannot finish the
    /// handshake) is never read. A resumed session carries the client
    /// certificate of the session it resumes (BoringSSL keeps the peer's
    /// chain in the session ticket), so the identity is that one. With
    /// [`ServerConfig::client_ca`],
    /// a peer without a certificate is closed with
    /// [`codes::CERTIFICATE_REQUIRED`] (quiche's `verify_peer` alone lets
    /// it through), one whose name cannot be an identity with
    /// [`codes::BAD_CERTIFICATE`]; a handshake TLS itself failed on a
    /// certificate alert is reported too. Without `client_ca` every peer
    /// is anonymous.
    fn settle_identity(&mut self, key: ConnKey) -> bool {
        let Some(conn) = self.conns.get_mut(key) else {
            return false;
        };
        if conn.identity.is_some() {
            return true;
        }
        if let Some(e) = conn.quic.local_error() {
            // TLS failed the handshake (a certificate that does not verify).
            let alert = e
                .error_code
                .checked_sub(0x100)
                .and_then(|a| u8::try_from(a).ok());
            if !conn.refused
                && !e.is_app
                && self.cfg.client_ca.is_some()
                && let Some(alert @ (42..=46 | 48 | 116)) = alert
            {
                conn.refused = true;
                let peer = conn.peer;
                self.refuse(key, peer, CertRefusal::Invalid { alert });
            }
            return false;
        }
        if !conn.quic.is_established() {
            return false;
        }
        if self.cfg.client_ca.is_none() {
            conn.identity = Some(Identity::anonymous());
            return true;
        }
        let refusal = match conn.quic.peer_cert().map(Identity::from_certificate) {
            Some(Ok(identity)) => {
                let held = self.identity_conns.entry(identity.clone()).or_default();
                if *held >= self.cfg.max_connections_per_identity {
                    let _ = conn.quic.close(
                        true,
                        codes::EXCESSIVE_LOAD,
                        b"too many connections of this identity",
                    );
                    conn.refused = true;
                    let peer = conn.peer;
                    self.limit_hit(Some(key), peer, Limit::IdentityConnections);
                    return false;
                }
                // Counted while the connection holds its identity: until reaped.
                *held += 1;
                conn.identity = Some(identity);
                return true;
            }
            None => {
                let _ = conn.quic.close(
                    false,
                    codes::CERTIFICATE_REQUIRED,
                    b"client certificate required",
                );
                CertRefusal::Missing
            }
            Some(Err(e)) => {
                let _ = conn.quic.close(
                    false,
                    codes::BAD_CERTIFICATE,
                    b"client certificate name unusable",
                );
                CertRefusal::UnusableName(e)
            }
        };
        conn.refused = true;
        let peer = conn.peer;
        self.refuse(key, peer, refusal);
        false
    }

    fn refuse(&mut self, conn: ConnKey, peer: SocketAddr, reason: CertRefusal) {
        self.stats.handshakes_refused += 1;
        self.events
            .push_back(ServerEvent::HandshakeRefused { conn, peer, reason });
    }

    /// Reaps a closed connection, or re-arms its timer.
    fn settle(&mut self, now: Instant, key: ConnKey) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        // Shutting down, a connection is done once its CONNECTION_CLOSE is
        // out: nobody waits out the draining period.
        let closed_by_shutdown = self.shutting_down && conn.quic.is_draining() && !conn.queued();
        if conn.quic.is_closed() || closed_by_shutdown {
            let reason = close_reason(&conn.quic);
            if conn.quic.is_timed_out() {
                let peer = conn.peer;
                self.limit_hit(Some(key), peer, Limit::IdleTimeout);
            }
            self.reap(key, reason);
            return;
        }
        let mut next = conn.quic.timeout_instant();
        if !conn.opened() {
            let hs = conn.handshake_deadline;
            next = Some(next.map_or(hs, |q| q.min(hs)));
        }
        self.conns.rearm(key, next);
        let _ = now;
    }

    /// Drops the parked copies of connection `key` (closed, or its streams
    /// cleared): no answer of theirs can reach the client, and their kept
    /// answers must not outlive the connection's bound.
    fn forget_parked(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if std::mem::take(&mut conn.parked) == 0 {
            return;
        }
        for k in std::mem::take(&mut conn.parked_keys) {
            let Some(copies) = self.parked.get_mut(&k) else {
                continue;
            };
            let awaiting = &mut self.awaiting;
            copies.retain(|h| {
                if h.conn == key {
                    awaiting.remove(h);
                    false
                } else {
                    true
                }
            });
        }
    }

    /// Removes a closed connection and reports it.
    fn reap(&mut self, key: ConnKey, reason: CloseReason) {
        self.forget_parked(key);
        let Some(conn) = self.conns.remove(key) else {
            return;
        };
        if let Some(identity) = conn.identity.as_ref().filter(|i| !i.is_anonymous())
            && let Some(held) = self.identity_conns.get_mut(identity)
        {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.identity_conns.remove(identity);
            }
        }
        let s = conn.quic.stats();
        let rtt = conn.quic.path_stats().next().map(|p| p.rtt);
        self.events.push_back(ServerEvent::ConnectionClosed {
            conn: key,
            peer: conn.peer,
            established: conn.opened(),
            reason,
            stats: ConnStats {
                sent: s.sent,
                recv: s.recv,
                lost: s.lost,
                sent_bytes: s.sent_bytes,
                recv_bytes: s.recv_bytes,
                rtt,
                reports: conn.reports,
            },
        });
    }

    /// Reads the readable streams of `key` and turns their objects into
    /// slots and events, within the connection's read budget
    /// ([`ServerConfig::max_unanswered_bytes`] of reports in the
    /// application's hands, [`pending_charge`] each, those of this pass
    /// included). Past the budget the rest stays in quiche, whose flow
    /// control holds the client back, and is read once the application
    /// answers ([`Server::respond`] comes back here). Reads are cut to the
    /// budget left ([`read_size`]), so that a window of tiny objects
    /// (`{}{}{}...`, all there at once when the first packet of a stream
    /// comes last) cannot become more reports in one pass than the budget
    /// allows. What the client leaves unanswered (answers it does not take,
    /// values in progress) has its own limit: [`Server::check_unanswered`].
    fn read_streams(&mut self, key: ConnKey) {
        let max = self.cfg.max_report_bytes;
        let budget = self.cfg.max_unanswered_bytes;
        let mut items = std::mem::take(&mut self.items);
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.quic.local_error().is_some() {
            // We are closing it (shutdown, a limit, a protocol error): no
            // answer could reach the client, which sends again elsewhere.
            self.items = items;
            return;
        }
        let peer = conn.peer;
        let Some(identity) = conn.identity.clone() else {
            self.items = items;
            return;
        };
        if conn.quic.application_proto() == HQ_ALPN {
            self.items = items;
            hq::read_requests(key, conn, &mut self.scratch, &mut self.events);
            return;
        }
        let mut held: usize = conn.streams.values().map(|st| st.pending_bytes).sum();
        for sid in conn.quic.readable() {
            if held >= budget {
                break;
            }
            if refuse_unless_client_bidi(&mut conn.quic, sid) {
                continue;
            }
            let st = conn
                .streams
                .entry(sid)
                .or_insert_with(|| StreamState::new(max));
            while !st.read_done && held < budget {
                let want = read_size(budget - held, self.scratch.len());
                match conn.quic.stream_recv(sid, &mut self.scratch[..want]) {
                    Ok((n, fin)) => {
                        st.splitter.push(&self.scratch[..n]);
                        if fin {
                            st.splitter.finish();
                            st.read_done = true;
                        }
                    }
                    Err(quiche::Error::Done) => break,
                    Err(_) => {
                        // Reset by the client: what came complete is
                        // answered, the partial object is dropped, and our
                        // FIN follows, so quiche can free the stream.
                        st.splitter.abandon();
                        st.read_done = true;
                    }
                }
                while let Some(item) = st.splitter.next_item() {
                    // Counted as a report in the application's hands (an
                    // error or a duplicate, answered at once, is counted
                    // too, for this pass only).
                    let len = item.as_ref().map_or(0, |o| o.json().len());
                    held = held.saturating_add(pending_charge(len));
                    items.push((sid, item));
                }
                if st.splitter.is_failed() {
                    break;
                }
            }
        }
        for (sid, item) in items.drain(..) {
            let Some(conn) = self.conns.get_mut(key) else {
                break;
            };
            let Some(st) = conn.streams.get_mut(&sid) else {
                continue;
            };
            let index = st.next_index;
            st.next_index += 1;
            conn.reports += 1;
            let handle = ReportHandle {
                conn: key,
                stream: sid,
                index,
            };
            let slot = match item
                .and_then(Report::from_json_object)
                .and_then(|r| r.bind_identity(&identity))
            {
                Ok(report) => self.take_report(handle, peer, report),
                Err(error) => self.reject(key, sid, error),
            };
            if let Some(st) = self
                .conns
                .get_mut(key)
                .and_then(|c| c.streams.get_mut(&sid))
            {
                match &slot {
                    Slot::Ready(a) => st.ready_bytes += a.len(),
                    Slot::Pending(charge) => st.pending_bytes += charge,
                }
                st.slots.push_back(slot);
            }
        }
        self.items = items;
    }

    /// An object or a stream the protocol refuses: the error answer, and
    /// for a fatal error, no more reading (STOP_SENDING if the client is
    /// still sending).
    fn reject(&mut self, key: ConnKey, sid: u64, error: StreamError) -> Slot {
        self.stats.rejected += 1;
        let mut answer = Vec::new();
        Response::from_stream_error(&error).encode(&mut answer);
        if let StreamError::TooLarge { .. } = error
            && let Some(conn) = self.conns.get(key)
        {
            let peer = conn.peer;
            self.limit_hit(Some(key), peer, Limit::ReportBytes);
        }
        if error.is_fatal()
            && let Some(conn) = self.conns.get_mut(key)
            && let Some(st) = conn.streams.get_mut(&sid)
        {
            if !st.read_done {
                let code = match error {
                    StreamError::TooLarge { .. } => codes::REPORT_TOO_LARGE,
                    _ => codes::STREAM_REJECTED,
                };
                let _ = conn.quic.stream_shutdown(sid, quiche::Shutdown::Read, code);
            }
            st.read_done = true;
        }
        self.events.push_back(ServerEvent::StreamRejected {
            conn: key,
            stream: sid,
            error,
        });
        Slot::Ready(answer)
    }

    /// A well-formed report: answer a duplicate at once, park a copy of one
    /// the application holds, or hand it to the application.
    fn take_report(&mut self, handle: ReportHandle, peer: SocketAddr, report: Report) -> Slot {
        let key = report.record_key();
        if let Some(k) = &key {
            if self.dedup.contains(k) {
                self.stats.duplicates += 1;
                let a = ok_answer(report.json(), true);
                self.events.push_back(ServerEvent::Duplicate {
                    conn: handle.conn,
                    key: k.clone(),
                });
                return Slot::Ready(a);
            }
            if let Some(waiting) = self.parked.get_mut(k) {
                waiting.push(handle);
                let ok = ok_answer(report.json(), true);
                // Counted as the stream's until answered: a flood of copies
                // meets the unanswered-bytes limit.
                if let Some(c) = self.conns.get_mut(handle.conn) {
                    c.parked += 1;
                    c.parked_keys.push(k.clone());
                    if c.parked_keys.len() > 2 * c.parked + 64 {
                        // Keys answered since: only those still waiting.
                        let parked = &self.parked;
                        c.parked_keys.retain(|k| {
                            parked
                                .get(k)
                                .is_some_and(|hs| hs.iter().any(|h| h.conn == handle.conn))
                        });
                        c.parked_keys.dedup();
                    }
                    if let Some(st) = c.streams.get_mut(&handle.stream) {
                        st.parked_bytes += ok.len();
                    }
                }
                self.awaiting.insert(handle, Awaiting { key: None, ok });
                return Slot::Pending(0);
            }
            self.parked.insert(k.clone(), Vec::new());
        }
        self.stats.reports += 1;
        let ok = ok_answer(report.json(), false);
        let charge = pending_charge(report.json().len());
        self.awaiting.insert(handle, Awaiting { key, ok });
        self.events.push_back(ServerEvent::Report {
            handle,
            peer,
            report,
        });
        Slot::Pending(charge)
    }

    /// Puts an answer in its slot. Returns false if the stream is gone.
    fn fill_slot(&mut self, h: ReportHandle, answer: Vec<u8>) -> bool {
        let Some(st) = self
            .conns
            .get_mut(h.conn)
            .and_then(|c| c.streams.get_mut(&h.stream))
        else {
            return false;
        };
        let Some(pos) = h.index.checked_sub(st.first_index) else {
            return false;
        };
        match st.slots.get_mut(pos as usize) {
            Some(slot) if let Slot::Pending(charge) = *slot => {
                st.pending_bytes -= charge;
                st.ready_bytes += answer.len();
                *slot = Slot::Ready(answer);
                true
            }
            _ => false,
        }
    }

    /// Closes a connection that makes us hold more than
    /// [`ServerConfig::max_unanswered_bytes`] for its reports (a client that
    /// sends reports but does not read the answers, or keeps many half-sent
    /// reports) or [`ServerConfig::max_response_bytes`] for its HTTP/0.9
    /// answers (a reader that does not read): CONNECTION_CLOSE with
    /// [`codes::EXCESSIVE_LOAD`], and its buffers are freed at once.
    fn check_unanswered(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.quic.local_error().is_some() {
            return;
        }
        let (reports, responses) = conn.streams.values().fold((0, 0), |(r, h), st| {
            if st.request.is_some() {
                (r, h + st.unanswered())
            } else {
                (r + st.unanswered(), h)
            }
        });
        if reports <= self.cfg.max_unanswered_bytes && responses <= self.cfg.max_response_bytes {
            return;
        }
        let _ = conn
            .quic
            .close(true, codes::EXCESSIVE_LOAD, b"too many unanswered bytes");
        conn.streams.clear();
        let peer = conn.peer;
        self.forget_parked(key);
        self.limit_hit(Some(key), peer, Limit::UnansweredBytes);
    }

    /// Moves ready answers (in order) into quiche, sends FIN when all is
    /// answered (with the last answer, or on its own just before the next
    /// packet: [`write_due_fins`]), and forgets finished streams.
    fn write_streams(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let mut finished = Vec::new();
        for (&sid, st) in conn.streams.iter_mut() {
            while let Some(Slot::Ready(_)) = st.slots.front() {
                if let Some(Slot::Ready(a)) = st.slots.pop_front() {
                    st.ready_bytes -= a.len();
                    if st.write_done {
                        // Nobody reads our side any more: dropped.
                    } else if st.out.is_empty() {
                        st.out = a;
                    } else {
                        st.out.extend_from_slice(&a);
                    }
                }
                st.first_index += 1;
            }
            let all_answered = st.read_done && st.slots.is_empty() && st.splitter_done();
            if st.write_done {
                // Nothing more to write.
            } else if !st.out.is_empty() {
                match conn.quic.stream_send(sid, &st.out, all_answered) {
                    Ok(n) => {
                        st.out.drain(..n);
                        if all_answered && st.out.is_empty() {
                            st.write_done = true;
                        }
                    }
                    // No credit now; or the stream is gone: quiche answers
                    // `Done` for a stream it has collected (the client
                    // stopped our side and finished its own).
                    Err(quiche::Error::Done) if !conn.quic.stream_closed(sid) => {}
                    Err(_) => {
                        // The client stopped reading (STOP_SENDING) or the
                        // stream is gone: nothing more to write.
                        st.out.clear();
                        st.write_done = true;
                    }
                }
            } else if all_answered && !conn.fins_due.contains(&sid) {
                // A FIN without data waits for the connection's next packet
                // (`write_due_fins`): quiche 0.30 collects a stream whose
                // data is all acknowledged as soon as its FIN is written,
                // so an ACK read in between (a later datagram of the same
                // batch) would drop a FIN written now before it is ever
                // sent (cloudflare/quiche#2525).
                conn.fins_due.push(sid);
            }
            if st.finished() {
                finished.push(sid);
            }
        }
        for sid in finished {
            conn.streams.remove(&sid);
        }
    }
}

impl StreamState {
    /// Both sides done and every answer taken: the stream can be forgotten.
    fn finished(&self) -> bool {
        self.write_done && self.read_done && self.slots.is_empty()
    }

    fn splitter_done(&self) -> bool {
        self.request.is_some() || self.splitter.is_done() || self.splitter.is_failed()
    }

    /// Bytes held for this stream: answers not yet taken by quiche (or
    /// kept for its parked copies), and the report in progress.
    fn unanswered(&self) -> usize {
        self.out.len()
            + self.ready_bytes
            + self.parked_bytes
            + self.splitter.buffered()
            + self.request.as_ref().map_or(0, Vec::capacity)
    }
}

/// What every QUIC version's long header starts with (the invariants of
/// RFC 8999).
struct LongHeader<'a> {
    version: u32,
    dcid: &'a [u8],
    scid: &'a [u8],
}

/// The invariants of a long-header packet, if `data` starts with one.
fn long_header_invariants(data: &[u8]) -> Option<LongHeader<'_>> {
    if data.first()? & 0x80 == 0 {
        return None;
    }
    let version = u32::from_be_bytes(data.get(1..5)?.try_into().ok()?);
    let dcid_len = usize::from(*data.get(5)?);
    let dcid = data.get(6..6 + dcid_len)?;
    let scid_len = usize::from(*data.get(6 + dcid_len)?);
    let scid = data.get(7 + dcid_len..7 + dcid_len + scid_len)?;
    Some(LongHeader {
        version,
        dcid,
        scid,
    })
}

/// Only client-initiated bidirectional streams carry reports or requests
/// (the transport parameters allow no others): stop reading any other.
/// Returns whether `sid` was refused.
fn refuse_unless_client_bidi(quic: &mut quiche::Connection, sid: u64) -> bool {
    if sid.is_multiple_of(4) {
        return false;
    }
    let _ = quic.stream_shutdown(sid, quiche::Shutdown::Read, codes::STREAM_REJECTED);
    true
}

/// The answer to a report: `ok` (its answer if recorded, from
/// [`ok_answer`]), or the `not_recorded` or `unstorable` error.
fn answer(outcome: &Outcome, ok: Vec<u8>) -> Vec<u8> {
    match outcome {
        Outcome::Recorded => ok,
        Outcome::Duplicate => {
            // `ok` is `{"ok":true,...`: the duplicate answer is the same
            // with `"duplicate":true,` after the first field.
            let at = OK_HEAD.len();
            let mut a = Vec::with_capacity(ok.len() + DUPLICATE_FIELD.len());
            a.extend_from_slice(&ok[..at.min(ok.len())]);
            if ok.starts_with(OK_HEAD) {
                a.extend_from_slice(DUPLICATE_FIELD);
            }
            a.extend_from_slice(&ok[at.min(ok.len())..]);
            a
        }
        Outcome::NotRecorded(why) => {
            let mut a = Vec::new();
            not_recorded(why).encode(&mut a);
            a
        }
        Outcome::Unstorable(why) => {
            let mut a = Vec::new();
            Response::Error {
                code: CODE_UNSTORABLE.into(),
                error: format!("cannot be stored, not sent again: {why}"),
            }
            .encode(&mut a);
            a
        }
    }
}

/// A connection ID to issue: random, with `prefix` as its first byte if set.
fn new_cid(rng: &mut CoreRng, prefix: Option<u8>) -> [u8; LOCAL_CID_LEN] {
    let mut b = [0u8; LOCAL_CID_LEN];
    rng.fill(&mut b);
    if let Some(p) = prefix {
        b[0] = p;
    }
    b
}

/// The start of every positive answer.
const OK_HEAD: &[u8] = b"{\"ok\":true,";
/// What a duplicate answer has after [`OK_HEAD`].
const DUPLICATE_FIELD: &[u8] = b"\"duplicate\":true,";

/// Handshakes in progress from one origin (an IPv4 address, an IPv6 /64:
/// `table::origin_of`) whose address a Retry proved, at most (spoofed
/// Initials cannot count against an address; the Retry threshold bounds
/// the unproven ones); loopback is not limited (this host's own
/// processes, the benchmarks' thousands of connections). More from there
/// are refused until some finish: a host cannot take every connection slot
/// with handshakes it never completes, while a site behind one NAT still
/// gets its devices in (a handshake takes a round trip or two; a refused
/// Initial is sent again within a second or so).
pub const MAX_HANDSHAKES_FROM: usize = 256;

/// How long a handshake must have been in progress before a new
/// connection may take its place when the table is full.
const HALF_OPEN_EVICTABLE: Duration = Duration::from_secs(2);

/// What a report in the application's hands costs beyond its bytes: its
/// event, its `awaiting` entry, its slot and what a driver keeps for it
/// (an estimate, on the high side).
const PENDING_OVERHEAD: usize = 256;

/// What a report of `len` bytes holds while the application has it: its
/// bytes, its prepared answer (a copy of them) and [`PENDING_OVERHEAD`].
fn pending_charge(len: usize) -> usize {
    len.saturating_mul(2)
        .saturating_add(OK_HEAD.len() + 14)
        .saturating_add(PENDING_OVERHEAD)
}

/// The smallest read [`read_size`] asks quiche for: at most 64 objects
/// past the budget.
const MIN_READ: usize = 128;

/// How many bytes to read from a stream with `left` of the read budget: as
/// many as could not take the connection past it were they all 2-byte
/// objects ([`pending_charge`] each), `MIN_READ` at least, `scratch` at
/// most.
fn read_size(left: usize, scratch: usize) -> usize {
    (left / pending_charge(2) * 2)
        .clamp(MIN_READ, scratch.max(MIN_READ))
        .min(scratch)
}

/// `{"ok":true,["duplicate":true,]"received":<received>}` and `\n`.
fn ok_answer(received: &[u8], duplicate: bool) -> Vec<u8> {
    let mut a = Vec::with_capacity(OK_HEAD.len() + DUPLICATE_FIELD.len() + received.len() + 14);
    a.extend_from_slice(OK_HEAD);
    if duplicate {
        a.extend_from_slice(DUPLICATE_FIELD);
    }
    a.extend_from_slice(b"\"received\":");
    a.extend_from_slice(received);
    a.extend_from_slice(b"}\n");
    a
}

fn not_recorded(why: &str) -> Response {
    Response::Error {
        code: CODE_NOT_RECORDED.into(),
        error: format!("not recorded: {why}"),
    }
}

fn close_reason(q: &quiche::Connection) -> CloseReason {
    if q.is_timed_out() {
        return CloseReason::IdleTimeout;
    }
    if let Some(e) = q.peer_error() {
        return CloseReason::PeerClosed {
            code: e.error_code,
            reason: String::from_utf8_lossy(&e.reason).into_owned(),
        };
    }
    if let Some(e) = q.local_error() {
        return CloseReason::LocalClosed {
            code: e.error_code,
            reason: String::from_utf8_lossy(&e.reason).into_owned(),
        };
    }
    CloseReason::IdleTimeout
}

/// Writes the FINs `Server::write_streams` left due, right before quiche
/// builds the connection's next packet (nothing can acknowledge the
/// stream in between), and forgets the streams that are then finished.
fn write_due_fins(conn: &mut Conn) {
    for sid in std::mem::take(&mut conn.fins_due) {
        let Some(st) = conn.streams.get_mut(&sid) else {
            continue;
        };
        match conn.quic.stream_send(sid, &[], true) {
            // Not now (no credit for a frame): at the next packet. (A
            // stream quiche collected answers `Done` too, for good.)
            Err(quiche::Error::Done) if !conn.quic.stream_closed(sid) => {
                conn.fins_due.push(sid);
                continue;
            }
            // Written; or the client stopped our side or the stream is gone.
            Ok(_) | Err(_) => st.write_done = true,
        }
        if st.finished() {
            conn.streams.remove(&sid);
        }
    }
}
