//! The reporting client: one QUIC connection at a time to one server, a
//! queue of reports not yet acknowledged, and the reconnect loop.
//!
//! ```text
//!            new()                     handshake done
//!   ┌────────────────► Connecting ──────────────────────► Connected
//!   │                     │  connect deadline,               │ idle timeout, reset,
//!   │ backoff deadline    │  handshake failed,               │ peer close, no answer,
//!   │                     │  unreachable                     │ unreachable
//!   │                     ▼                                  ▼
//!   └──────────────── Waiting ◄──────────────────────────────┘
//!
//!   close() from any state ──► Closing (CONNECTION_CLOSE queued) ──► Closed
//!   certificate rejected   ──► Failed (no retry: it would fail the same way)
//! ```
//!
//! The path, our address and the server's, is an input too
//! ([`Client::set_path`]): a driver gives a new one when its own address
//! changed (a new socket) or the server's name resolves anew, and the next
//! attempt takes it; a connection under way keeps its own. Without a
//! server address (a name that does not resolve yet) an attempt fails at
//! once with [`DisconnectReason::NoAddress`], sending nothing, and the
//! backoff runs as after any failed attempt.
//!
//! A server certificate refused only for its dates (expired, or not yet
//! valid) is the exception: the attempt fails and is retried with backoff
//! like any other. Our clock may be wrong (a device without a battery
//! clock starts in 1970 until NTP sets it), or the server's certificate
//! is about to be renewed; either heals by itself, and a fleet that
//! stopped for good would need every device restarted by hand.
//!
//! Every sample handed to [`Client::submit`] becomes a report with the next
//! `seq` and waits in the [`ReportQueue`] until the server acknowledges it.
//! Each report goes on a fresh client-initiated bidirectional stream (IDs
//! 0, 4, 8, ...). Reports in flight when a connection ends go back to the
//! queue and are sent again, oldest first, on the next connection: delivery
//! is at-least-once, and the server drops duplicates by `(client, seq)`.
//!
//! The client keeps the latest TLS session ticket and offers it on every
//! reconnect, so reports queued during an outage go out in 0-RTT.
//!
//! The backoff between attempts starts over once a connection has carried
//! an answer, not once its handshake is done: a server that accepts and
//! closes at once (overloaded, shutting down) meets a growing delay, not a
//! reconnect every first step. A stateless reset (the server restarted)
//! brings the client back at once, but only the first since an answer.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::config::{ClientConfig, codes};
use crate::error::{ConfigError, DatagramError};
use crate::queue::{ReportQueue, Seq};
use crate::report::{Response, Sample};
use crate::rng::CoreRng;
use crate::timer::{self, Deadline, TimerKind};
use crate::{DebugLogs, LOCAL_CID_LEN, Transmit, attach_debug_logs};

/// What the client can tell its application.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// A connection attempt started (1 for the first).
    Connecting {
        /// Attempts since the client started.
        attempt: u32,
    },
    /// The handshake completed.
    Connected {
        /// Hex of our source connection ID (the reports' `id`).
        conn_id: String,
        /// The TLS session was resumed from a ticket.
        resumed: bool,
        /// The server accepted our 0-RTT data.
        early_data: bool,
    },
    /// The server recorded a report.
    Acknowledged {
        /// The report.
        seq: Seq,
        /// It had been recorded before: a resend whose earlier answer was
        /// lost, or a seq reused (then [`ClientEvent::SeqReused`] came
        /// first).
        duplicate: bool,
        /// The server's full answer.
        response: Response,
    },
    /// The server already had this seq before any send of this report could
    /// have reached it: the client id's numbering was used before, by
    /// another client with the same id or by this one before its numbering
    /// started over (no spool, or a lost one). The server answers it
    /// `duplicate` (an [`ClientEvent::Acknowledged`] follows) and this
    /// report is not recorded: it is lost.
    ///
    /// Said only when it is certain: a report handed whole to an earlier
    /// connection that was lost before the answer may have been recorded
    /// then, so its `duplicate` is taken as that. Reused seqs are at least
    /// as many as these events.
    SeqReused {
        /// The report.
        seq: Seq,
    },
    /// The server refused a report for good (it is malformed); it is dropped.
    Rejected {
        /// The report.
        seq: Seq,
        /// The server's error code.
        code: String,
        /// The server's reason.
        reason: String,
    },
    /// A report was not recorded this time; it stays queued and is sent again.
    Retrying {
        /// The report.
        seq: Seq,
        /// Why.
        reason: String,
    },
    /// The connection ended.
    Disconnected {
        /// Why.
        reason: DisconnectReason,
    },
    /// The next attempt is scheduled.
    ReconnectScheduled {
        /// When it starts.
        at: Instant,
        /// Its attempt number.
        attempt: u32,
    },
    /// The queue was full: the oldest report was dropped and is lost.
    ReportDropped {
        /// The lost report.
        seq: Seq,
    },
    /// [`Client::close`] finished: CONNECTION_CLOSE sent (if connected).
    Closed,
    /// The client stopped for good: retrying cannot help.
    Failed {
        /// Why.
        reason: DisconnectReason,
    },
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// Nothing was heard for the idle timeout.
    IdleTimeout,
    /// The server closed the connection.
    PeerClosed {
        /// Its error code.
        code: u64,
        /// Whether `code` is an application code (quic-report's
        /// `config::codes`), not a QUIC transport error.
        app: bool,
        /// Its reason phrase.
        reason: String,
    },
    /// The server no longer knows the connection (stateless reset: it
    /// restarted).
    Reset,
    /// The handshake did not finish within the connect timeout.
    ConnectTimeout,
    /// The handshake failed for a reason other than the certificate.
    HandshakeFailed(String),
    /// The server's certificate was refused; the string names the problem.
    Certificate(String),
    /// The server's certificate was refused for its dates only (expired or
    /// not yet valid, by our clock): retried, as the module says.
    CertificateOutOfDate(String),
    /// The server refused our client certificate (none given, not signed
    /// by a CA it trusts, or a name it cannot use): a TLS alert from the
    /// server; the string names it.
    ClientCertificate(String),
    /// The server refused our client certificate for its dates only (TLS
    /// alert certificate_expired): retried with backoff, as
    /// [`DisconnectReason::CertificateOutOfDate`] is, since the server's
    /// clock may be the one that is wrong (one server with a bad clock would
    /// otherwise stop every client of a fleet for good).
    ClientCertificateOutOfDate(String),
    /// The oldest report had no answer within the response timeout.
    NoResponse,
    /// The network said the server is unreachable (ICMP).
    Unreachable,
    /// The server has no address yet (its name does not resolve): nothing
    /// was sent (see [`Client::set_path`]).
    NoAddress,
    /// quiche closed the connection on a protocol error of its own.
    Protocol(String),
    /// We closed it ([`Client::close`]).
    Closed,
}

impl DisconnectReason {
    /// Whether reconnecting cannot help (the certificate will be refused again).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            DisconnectReason::Certificate(_) | DisconnectReason::ClientCertificate(_)
        )
    }
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::IdleTimeout => f.write_str("idle timeout"),
            DisconnectReason::PeerClosed { code, app, reason } => {
                let kind = if *app { "code" } else { "QUIC transport error" };
                write!(f, "server closed the connection ({kind} {code:#x}")?;
                if !reason.is_empty() {
                    write!(f, ": {reason}")?;
                }
                f.write_str(")")
            }
            DisconnectReason::Reset => {
                f.write_str("stateless reset: the server does not know the connection (restarted?)")
            }
            DisconnectReason::ConnectTimeout => {
                f.write_str("no handshake within the connect timeout")
            }
            DisconnectReason::HandshakeFailed(why) => write!(f, "handshake failed: {why}"),
            DisconnectReason::Certificate(why) => write!(f, "server certificate refused: {why}"),
            DisconnectReason::CertificateOutOfDate(why) => write!(
                f,
                "server certificate refused: {why}; retrying (is this machine's clock right?)"
            ),
            DisconnectReason::ClientCertificate(why) => {
                write!(f, "the server refused our client certificate: {why}")
            }
            DisconnectReason::ClientCertificateOutOfDate(why) => write!(
                f,
                "the server refused our client certificate: {why}; retrying \
                 (has it expired, or is the server's clock wrong?)"
            ),
            DisconnectReason::NoResponse => f.write_str("no answer within the response timeout"),
            DisconnectReason::Unreachable => f.write_str("server unreachable"),
            DisconnectReason::NoAddress => {
                f.write_str("no address for the server (its name does not resolve)")
            }
            DisconnectReason::Protocol(why) => write!(f, "protocol error: {why}"),
            DisconnectReason::Closed => f.write_str("closed by us"),
        }
    }
}

/// The client's state, as in the module's diagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Waiting out a backoff delay.
    Waiting,
    /// Handshake in progress.
    Connecting,
    /// Connected: reports flow.
    Connected,
    /// [`Client::close`] called; CONNECTION_CLOSE not yet sent.
    Closing,
    /// Closed by [`Client::close`].
    Closed,
    /// Stopped for good (see [`ClientEvent::Failed`]).
    Failed,
}

/// Counters for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Connection attempts.
    pub attempts: u32,
    /// Handshakes completed.
    pub connections: u32,
    /// Handshakes that resumed a session.
    pub resumed: u32,
    /// Connections whose 0-RTT data the server accepted.
    pub early_data_accepted: u32,
    /// Reports acknowledged (including duplicates).
    pub acknowledged: u64,
    /// Reports sent (including resends).
    pub sent: u64,
    /// Reports rejected for good.
    pub rejected: u64,
    /// Reports whose seq the server had before they could have reached it
    /// ([`ClientEvent::SeqReused`]): lost. A lower bound.
    pub seq_reused: u64,
}

impl ClientStats {
    /// Reports acknowledged as recorded, now or before: `acknowledged`
    /// without those lost to a reused seq.
    pub fn acknowledged_kept(&self) -> u64 {
        self.acknowledged - self.seq_reused
    }
}

/// One report on its stream, waiting for its answer.
#[derive(Debug)]
struct InFlight {
    seq: Seq,
    /// An earlier send may have been recorded (so a `duplicate` answer is
    /// not news).
    resend: bool,
    sent_at: Instant,
    /// The report's length.
    len: usize,
    /// Bytes quiche has not taken yet (flow control); written on writable.
    unsent: Vec<u8>,
    /// The answer so far.
    response: Vec<u8>,
}

struct Conn {
    quic: quiche::Connection,
    /// The server's address for this connection (a later
    /// [`Client::set_path`] does not move it).
    peer: SocketAddr,
    id_hex: String,
    /// Give up the attempt then if the server has said nothing; once it
    /// answers, quiche's own timers govern the handshake.
    connect_deadline: Option<Instant>,
    in_flight: BTreeMap<u64, InFlight>,
    next_stream: u64,
    last_send: Instant,
    /// Do not send reports before this (the server could not record one).
    hold_until: Option<Instant>,
    /// Since when reports have been waiting with none in flight and no
    /// stream to send them on (the server gives no stream credit): past
    /// the response timeout the connection is given up.
    starved_since: Option<Instant>,
}

enum State {
    Waiting { until: Instant },
    Connecting(Box<Conn>),
    Connected(Box<Conn>),
    Closing(Box<Conn>),
    Closed,
    Failed,
}

/// BoringSSL's `ssl_early_data_accepted` (`ssl_early_data_reason_t`).
const SSL_EARLY_DATA_ACCEPTED: u32 = 2;

/// How long to wait before sending again after a retryable answer.
const RETRY_HOLD: Duration = Duration::from_millis(500);

/// Longest answer the client reads without finding its end (`\n`): a
/// server's answer is one short line (its `id` echoed, at most a report's
/// length); past this the stream is garbage, refused, and the report sent
/// again.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// The Sans-IO reporting client.
///
/// Methods, by kind (as quinn-proto sorts them):
/// - inputs, each taking `now`: [`Client::handle_datagram`],
///   [`Client::handle_timeout`], [`Client::handle_unreachable`],
///   [`Client::submit`], [`Client::close`];
/// - outputs, drained after every input as the crate's contract says (see
///   the [crate] docs): [`Client::poll_event`], [`Client::poll_transmit`],
///   events again until they are empty, then [`Client::poll_timeout`];
/// - getters: [`Client::state`], [`Client::stats`], [`Client::queued`], ...
pub struct Client {
    cfg: ClientConfig,
    quic_cfg: quiche::Config,
    rng: CoreRng,
    client_id: String,
    queue: ReportQueue,
    backoff: Backoff,
    /// A stateless reset brought us back at once since a connection last
    /// carried an answer (the next one waits out the backoff).
    reset_skipped_backoff: bool,
    state: State,
    /// An abandoned connection whose CONNECTION_CLOSE is still to be sent.
    retiring: Option<quiche::Connection>,
    events: VecDeque<ClientEvent>,
    session: Option<Vec<u8>>,
    stats: ClientStats,
    scratch: Vec<u8>,
    debug_logs: Option<Box<dyn DebugLogs>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("client_id", &self.client_id)
            .field("state", &self.state())
            .field("queued", &self.queue.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl Client {
    /// A client that starts its first connection attempt at once: drain
    /// [`Client::poll_transmit`] after this.
    pub fn new(cfg: ClientConfig, rng: CoreRng, now: Instant) -> Result<Client, ConfigError> {
        Client::with_debug_logs(cfg, rng, now, None)
    }

    /// [`Client::new`], with debugging hooks (TLS key log, qlog) installed
    /// before the first connection starts.
    pub fn with_debug_logs(
        cfg: ClientConfig,
        mut rng: CoreRng,
        now: Instant,
        logs: Option<Box<dyn DebugLogs>>,
    ) -> Result<Client, ConfigError> {
        let quic_cfg = cfg.quiche_config()?;
        let client_id = match &cfg.client_id {
            Some(id) if !id.is_empty() => id.clone(),
            Some(_) => return Err(ConfigError::Invalid("client id must not be empty".into())),
            None => {
                let mut b = [0u8; 8];
                rng.fill(&mut b);
                hex::encode(b)
            }
        };
        let mut client = Client {
            queue: ReportQueue::new(cfg.queue_limit, 1).with_byte_limit(cfg.queue_limit_bytes),
            backoff: Backoff::new(cfg.backoff),
            reset_skipped_backoff: false,
            cfg,
            quic_cfg,
            rng,
            client_id,
            state: State::Waiting { until: now },
            retiring: None,
            events: VecDeque::new(),
            session: None,
            stats: ClientStats::default(),
            scratch: vec![0; 64 * 1024],
            debug_logs: None,
        };
        if let Some(logs) = logs {
            client.set_debug_logs(logs);
        }
        client.start_connect(now);
        Ok(client)
    }

    /// Installs debugging hooks (TLS key log, qlog) for every connection
    /// made from now on.
    pub fn set_debug_logs(&mut self, logs: Box<dyn DebugLogs>) {
        self.quic_cfg.log_keys();
        self.debug_logs = Some(logs);
    }

    /// The `client` field of every report: random hex unless configured.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Where the client is in its life (see the module's diagram).
    pub fn state(&self) -> ClientState {
        match self.state {
            State::Waiting { .. } => ClientState::Waiting,
            State::Connecting(_) => ClientState::Connecting,
            State::Connected(_) => ClientState::Connected,
            State::Closing(_) => ClientState::Closing,
            State::Closed => ClientState::Closed,
            State::Failed => ClientState::Failed,
        }
    }

    /// Counters.
    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    /// Reports not yet acknowledged (waiting or in flight).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Reports dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.queue.dropped()
    }

    /// Smoothed RTT of the current connection, if connected.
    pub fn rtt(&self) -> Option<Duration> {
        let conn = self.conn()?;
        conn.quic.path_stats().next().map(|p| p.rtt)
    }

    /// Whether the client is finished ([`ClientState::Closed`] or
    /// [`ClientState::Failed`]): the caller may stop driving it.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Closed | State::Failed)
    }

    // ----- inputs ---------------------------------------------------------

    /// Queues a fetched sample as the next report and sends it if connected.
    /// Returns its `seq`. May emit [`ClientEvent::ReportDropped`].
    pub fn submit(&mut self, now: Instant, sample: Sample) -> Seq {
        let (seq, dropped) = self.queue.push(sample);
        for old in dropped {
            self.events
                .push_back(ClientEvent::ReportDropped { seq: old });
        }
        self.pump(now);
        seq
    }

    /// Picks up where a previous process of this client left off (its
    /// spool, read back): the reports it never had acknowledged, in
    /// ascending seq order, are queued under their own seq and go out
    /// before anything submitted later; new reports are numbered from
    /// `next_seq` (and above every restored one), so no seq is reused. Call
    /// before the first [`Client::submit`]. Emits
    /// [`ClientEvent::ReportDropped`] for those that do not fit the queue.
    pub fn resume(
        &mut self,
        now: Instant,
        next_seq: Seq,
        unacknowledged: impl IntoIterator<Item = (Seq, Sample)>,
    ) {
        for (seq, sample) in unacknowledged {
            for old in self.queue.restore(seq, sample) {
                self.events
                    .push_back(ClientEvent::ReportDropped { seq: old });
            }
        }
        self.queue.continue_from(next_seq);
        self.pump(now);
    }

    /// The seq the next submitted sample will get.
    pub fn next_seq(&self) -> Seq {
        self.queue.next_seq()
    }

    /// A UDP datagram arrived from `from` on our local address `to`.
    ///
    /// A datagram that is not for us or that quiche refuses is reported as
    /// an error and changes nothing else.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        to: SocketAddr,
        data: &mut [u8],
    ) -> Result<(), DatagramError> {
        let Some(conn) = self.conn_mut() else {
            return Err(DatagramError::NoConnection);
        };
        if from != conn.peer {
            return Err(DatagramError::UnexpectedPeer);
        }
        let before = conn
            .connect_deadline
            .map(|_| conn.quic.destination_id().into_owned());
        let res = conn.quic.recv(data, quiche::RecvInfo { from, to });
        // The server answered once quiche has processed a packet of it, or
        // a Retry (which replaces the destination ID, uncounted): `recv`
        // says `Ok` for a datagram it dropped too (one it cannot decrypt:
        // a stray packet of an old connection, garbage).
        if let Some(dcid) = before
            && res.is_ok()
            && (conn.quic.stats().recv > 0 || conn.quic.destination_id() != dcid)
        {
            conn.connect_deadline = None;
        }
        self.pump(now);
        match res {
            Ok(_) | Err(quiche::Error::Done) => Ok(()),
            Err(e) => Err(DatagramError::Quic(e)),
        }
    }

    /// The deadline from [`Client::poll_timeout`] passed (calling it early
    /// is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.state {
            State::Waiting { until } if *until <= now => {
                self.start_connect(now);
                return;
            }
            State::Connecting(c) | State::Connected(c) | State::Closing(c)
                if c.quic.timeout_instant().is_some_and(|t| t <= now) =>
            {
                c.quic.on_timeout();
            }
            _ => {}
        }
        let mut abandon = None;
        match &mut self.state {
            State::Connecting(c)
                if c.connect_deadline.is_some_and(|d| d <= now) && !c.quic.is_closed() =>
            {
                abandon = Some(DisconnectReason::ConnectTimeout);
            }
            State::Connected(c) => {
                let oldest = c.in_flight.values().map(|f| f.sent_at).min();
                let waiting_since = oldest.or(c.starved_since);
                if waiting_since.is_some_and(|t| t + self.cfg.response_timeout <= now) {
                    abandon = Some(DisconnectReason::NoResponse);
                } else if let Some(ka) = self.cfg.keep_alive
                    && c.in_flight.is_empty()
                    && c.last_send + ka <= now
                {
                    // Cannot fail on an established connection.
                    let _ = c.quic.send_ack_eliciting();
                    c.last_send = now;
                }
                if c.hold_until.is_some_and(|t| t <= now) {
                    c.hold_until = None;
                }
            }
            _ => {}
        }
        if let Some(reason) = abandon {
            self.abandon(now, reason);
        } else {
            self.pump(now);
        }
    }

    /// The network reported the server unreachable (an ICMP error on a
    /// connected socket, e.g. `ECONNREFUSED`). A hint: the current attempt
    /// or connection is abandoned at once rather than timing out.
    pub fn handle_unreachable(&mut self, now: Instant) {
        if matches!(self.state, State::Connecting(_) | State::Connected(_)) {
            self.abandon(now, DisconnectReason::Unreachable);
        }
    }

    /// The path the next connection attempt takes: `local`, the address
    /// the caller now sends from (a new socket), and `server`, the server's
    /// address (`None`: unknown, its name does not resolve). A connection
    /// under way keeps its own path and is not disturbed; one whose path is
    /// gone fails as usual (no answer, unreachable) and the next attempt
    /// takes this one.
    pub fn set_path(&mut self, local: SocketAddr, server: Option<SocketAddr>) {
        self.cfg.local = local;
        self.cfg.server = server;
    }

    /// The path the next attempt takes: our address and the server's.
    pub fn path(&self) -> (SocketAddr, Option<SocketAddr>) {
        (self.cfg.local, self.cfg.server)
    }

    /// Closes the connection cleanly (CONNECTION_CLOSE, code 0) and stops.
    /// Reports not yet acknowledged are given up. Drain [`Client::poll_transmit`]
    /// to send the close, then [`Client::poll_event`] shows
    /// [`ClientEvent::Closed`].
    pub fn close(&mut self, now: Instant) {
        let state = std::mem::replace(&mut self.state, State::Closed);
        match state {
            State::Connecting(mut c) | State::Connected(mut c) => {
                match c.quic.close(true, codes::NO_ERROR, b"client closing") {
                    Ok(()) => self.state = State::Closing(c),
                    Err(_) => self.events.push_back(ClientEvent::Closed),
                }
            }
            State::Closing(c) => self.state = State::Closing(c),
            State::Waiting { .. } => self.events.push_back(ClientEvent::Closed),
            State::Closed => {}
            State::Failed => self.state = State::Failed,
        }
        let _ = now;
    }

    // ----- outputs --------------------------------------------------------

    /// The next datagram to send, written into `buf` (at least
    /// [`crate::config::MAX_DATAGRAM_SIZE`] bytes). Call until `None`.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        if let Some(old) = &mut self.retiring {
            match old.send(buf) {
                Ok((len, info)) => return Some(Transmit::sent(len, &info)),
                Err(_) => self.retiring = None,
            }
        }
        loop {
            // quiche writes the ClientHello in the first `send`: only then is
            // a resumed connection in early data, and the queued reports can
            // go out in 0-RTT, right behind it.
            if matches!(&self.state, State::Connecting(c) if c.quic.is_in_early_data()) {
                self.write_reports(now);
            }
            let closing = matches!(self.state, State::Closing(_));
            let conn = match &mut self.state {
                State::Connecting(c) | State::Connected(c) | State::Closing(c) => c,
                _ => return None,
            };
            match conn.quic.send(buf) {
                Ok((len, info)) => return Some(Transmit::sent(len, &info)),
                Err(e) => {
                    if closing {
                        // CONNECTION_CLOSE is out: no need to wait for draining.
                        self.state = State::Closed;
                        self.events.push_back(ClientEvent::Closed);
                        return None;
                    }
                    // `Done`, or a local error on which quiche closed.
                    if conn.quic.is_closed()
                        || (e != quiche::Error::Done && conn.quic.is_draining())
                    {
                        self.on_closed(now);
                        continue;
                    }
                    return None;
                }
            }
        }
    }

    /// The next event for the application. Call until `None`.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// The earliest time [`Client::handle_timeout`] wants to run, if any.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline().map(|d| d.at)
    }

    /// The earliest deadline with its reason.
    #[must_use]
    pub fn deadline(&self) -> Option<Deadline> {
        match &self.state {
            State::Waiting { until } => timer::at(Some(*until), TimerKind::Backoff),
            State::Connecting(c) => timer::earliest(
                timer::at(c.quic.timeout_instant(), TimerKind::Quic),
                timer::at(c.connect_deadline, TimerKind::Connect),
            ),
            State::Connected(c) => {
                let mut d = timer::at(c.quic.timeout_instant(), TimerKind::Quic);
                let oldest = c.in_flight.values().map(|f| f.sent_at).min();
                d = timer::earliest(
                    d,
                    timer::at(
                        oldest
                            .or(c.starved_since)
                            .map(|t| t + self.cfg.response_timeout),
                        TimerKind::AckWait,
                    ),
                );
                if c.in_flight.is_empty() {
                    let ka = self.cfg.keep_alive.map(|ka| c.last_send + ka);
                    d = timer::earliest(d, timer::at(ka, TimerKind::KeepAlive));
                }
                timer::earliest(d, timer::at(c.hold_until, TimerKind::AckWait))
            }
            State::Closing(c) => timer::at(c.quic.timeout_instant(), TimerKind::Quic),
            State::Closed | State::Failed => None,
        }
    }

    // ----- internals ------------------------------------------------------

    fn conn(&self) -> Option<&Conn> {
        match &self.state {
            State::Connecting(c) | State::Connected(c) | State::Closing(c) => Some(c),
            _ => None,
        }
    }

    fn conn_mut(&mut self) -> Option<&mut Conn> {
        match &mut self.state {
            State::Connecting(c) | State::Connected(c) | State::Closing(c) => Some(c),
            _ => None,
        }
    }

    fn start_connect(&mut self, now: Instant) {
        self.stats.attempts += 1;
        let attempt = self.stats.attempts;
        self.events.push_back(ClientEvent::Connecting { attempt });
        let Some(server) = self.cfg.server else {
            self.disconnected(now, DisconnectReason::NoAddress);
            return;
        };
        let mut scid = [0u8; LOCAL_CID_LEN];
        self.rng.fill(&mut scid);
        let cid = quiche::ConnectionId::from_ref(&scid);
        let res = quiche::connect(
            Some(&self.cfg.server_name),
            &cid,
            self.cfg.local,
            server,
            &mut self.quic_cfg,
        );
        let mut quic = match res {
            Ok(q) => q,
            Err(e) => {
                // Only a bad server name gets here; it will not get better.
                let reason = DisconnectReason::HandshakeFailed(format!("cannot connect: {e}"));
                self.events.push_back(ClientEvent::Failed { reason });
                self.state = State::Failed;
                return;
            }
        };
        if let Some(session) = &self.session {
            // A stale or foreign ticket only costs the resumption.
            let _ = quic.set_session(session);
        }
        attach_debug_logs(&mut self.debug_logs, &mut quic);
        let conn = Conn {
            quic,
            peer: server,
            id_hex: hex::encode(scid),
            connect_deadline: Some(now + self.cfg.connect_timeout),
            in_flight: BTreeMap::new(),
            next_stream: 0,
            last_send: now,
            hold_until: None,
            starved_since: None,
        };
        self.state = State::Connecting(Box::new(conn));
        self.pump(now);
    }

    /// After any input: notice the handshake, read answers, send reports,
    /// notice a closed connection.
    fn pump(&mut self, now: Instant) {
        let Some(conn) = self.conn_mut() else { return };
        if conn.quic.is_closed() {
            self.on_closed(now);
            return;
        }
        if let State::Connecting(c) = &self.state
            && c.quic.is_established()
        {
            let State::Connecting(mut c) = std::mem::replace(&mut self.state, State::Closed) else {
                unreachable!("matched Connecting just above");
            };
            // Reports sent in 0-RTT wait for their answer from now on: the
            // server reads them only once the handshake is done, which on a
            // bad link can take longer than the answer timeout.
            for f in c.in_flight.values_mut() {
                f.sent_at = f.sent_at.max(now);
            }
            let resumed = c.quic.is_resumed();
            let early_data = c.quic.early_data_reason() == SSL_EARLY_DATA_ACCEPTED;
            self.stats.connections += 1;
            self.stats.resumed += u32::from(resumed);
            self.stats.early_data_accepted += u32::from(early_data);
            self.events.push_back(ClientEvent::Connected {
                conn_id: c.id_hex.clone(),
                resumed,
                early_data,
            });
            self.state = State::Connected(c);
        }
        self.save_session();
        self.read_answers(now);
        self.write_reports(now);
    }

    fn save_session(&mut self) {
        let Some(conn) = self.conn() else { return };
        if let Some(s) = conn.quic.session()
            && self.session.as_deref() != Some(s)
        {
            self.session = Some(s.to_vec());
        }
    }

    fn read_answers(&mut self, now: Instant) {
        let (conn, events, queue, stats, scratch) = match &mut self.state {
            State::Connecting(c) | State::Connected(c) => (
                c,
                &mut self.events,
                &mut self.queue,
                &mut self.stats,
                &mut self.scratch,
            ),
            _ => return,
        };
        let mut hold = false;
        let mut answered = false;
        for sid in conn.quic.readable() {
            loop {
                let (n, fin) = match conn.quic.stream_recv(sid, scratch) {
                    Ok(r) => r,
                    Err(quiche::Error::Done) => break,
                    Err(_) => {
                        // Reset by the server without an answer: send again,
                        // after the same pause as any answer to retry (a
                        // server resetting every stream is not a busy loop).
                        if let Some(f) = conn.in_flight.remove(&sid) {
                            queue.requeue(f.seq);
                            hold = true;
                            events.push_back(ClientEvent::Retrying {
                                seq: f.seq,
                                reason: "stream reset by the server".into(),
                            });
                        }
                        break;
                    }
                };
                let Some(f) = conn.in_flight.get_mut(&sid) else {
                    continue;
                };
                // Only the new bytes are searched for the end of the line:
                // an answer read in many pieces costs its length, once.
                let searched = f.response.len();
                f.response.extend_from_slice(&scratch[..n]);
                let line_end = f.response[searched..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map(|at| searched + at);
                if line_end.is_none() && !fin {
                    if f.response.len() > MAX_ANSWER_BYTES {
                        // Garbage without end: give up this answer, and
                        // the rest of the stream, and send the report again.
                        let seq = f.seq;
                        conn.in_flight.remove(&sid);
                        let _ = conn.quic.stream_shutdown(
                            sid,
                            quiche::Shutdown::Read,
                            codes::STREAM_REJECTED,
                        );
                        // A report still partly unsent is abandoned too.
                        let _ = conn.quic.stream_shutdown(
                            sid,
                            quiche::Shutdown::Write,
                            codes::STREAM_REJECTED,
                        );
                        queue.requeue(seq);
                        hold = true;
                        events.push_back(ClientEvent::Retrying {
                            seq,
                            reason: format!("answer longer than {MAX_ANSWER_BYTES} bytes"),
                        });
                        break;
                    }
                    continue;
                }
                let f = conn.in_flight.remove(&sid).expect("looked up just above");
                let line = &f.response[..line_end.unwrap_or(f.response.len())];
                let parsed = Response::parse(line);
                answered |= parsed.is_ok();
                match parsed {
                    Ok(response) if response.is_retryable() => {
                        queue.requeue(f.seq);
                        hold = true;
                        let reason = match response {
                            Response::Error { error, .. } => error,
                            Response::Ok { .. } => String::new(),
                        };
                        events.push_back(ClientEvent::Retrying { seq: f.seq, reason });
                    }
                    Ok(response) => {
                        if queue.ack(f.seq).is_some() {
                            if let Response::Ok {
                                duplicate: true, ..
                            } = response
                                && !f.resend
                            {
                                stats.seq_reused += 1;
                                events.push_back(ClientEvent::SeqReused { seq: f.seq });
                            }
                            events.push_back(match response {
                                Response::Ok { duplicate, .. } => {
                                    stats.acknowledged += 1;
                                    ClientEvent::Acknowledged {
                                        seq: f.seq,
                                        duplicate,
                                        response,
                                    }
                                }
                                Response::Error { code, error } => {
                                    stats.rejected += 1;
                                    ClientEvent::Rejected {
                                        seq: f.seq,
                                        code,
                                        reason: error,
                                    }
                                }
                            });
                        }
                    }
                    Err(e) => {
                        queue.requeue(f.seq);
                        hold = true;
                        events.push_back(ClientEvent::Retrying {
                            seq: f.seq,
                            reason: e.to_string(),
                        });
                    }
                }
                // Nothing more is expected on this stream; if the server's
                // FIN has not come with the answer, say so.
                if !fin {
                    let _ = conn
                        .quic
                        .stream_shutdown(sid, quiche::Shutdown::Read, codes::NO_ERROR);
                }
                break;
            }
        }
        if hold {
            conn.hold_until = Some(now + RETRY_HOLD);
        }
        if answered {
            // A working connection: the next outage's backoff starts over.
            self.backoff.reset();
            self.reset_skipped_backoff = false;
        }
    }

    fn write_reports(&mut self, now: Instant) {
        let (conn, queue, stats) = match &mut self.state {
            State::Connected(c) => (c, &mut self.queue, &mut self.stats),
            State::Connecting(c) if c.quic.is_in_early_data() => {
                (c, &mut self.queue, &mut self.stats)
            }
            _ => return,
        };
        // Finish reports that flow control cut short.
        for sid in conn.quic.writable() {
            if let Some(f) = conn.in_flight.get_mut(&sid)
                && !f.unsent.is_empty()
                && let Ok(n) = conn.quic.stream_send(sid, &f.unsent, true)
            {
                f.unsent.drain(..n);
                conn.last_send = now;
                if f.unsent.is_empty() {
                    queue.handed(f.seq);
                }
            }
        }
        if conn.hold_until.is_some_and(|t| t > now) {
            conn.starved_since = None;
            return;
        }
        let mut bytes: usize = conn.in_flight.values().map(|f| f.len).sum();
        while conn.in_flight.len() < self.cfg.max_in_flight
            && conn.quic.peer_streams_left_bidi() > 0
        {
            // Past the byte limit the next waits (one report always goes):
            // the server counts the reports it has in part against its
            // unanswered-bytes limit, and a backlog of large reports all
            // on the way at once closed every connection before any was
            // answered.
            if !conn.in_flight.is_empty()
                && queue
                    .next_waiting_bytes()
                    .is_some_and(|b| bytes.saturating_add(b) > self.cfg.max_in_flight_bytes)
            {
                break;
            }
            let Some(entry) = queue.take_waiting() else {
                break;
            };
            let seq = entry.seq;
            let resend = entry.maybe_recorded;
            let mut body = Vec::with_capacity(128);
            entry
                .sample
                .encode_report(&conn.id_hex, &self.client_id, seq, &mut body);
            let sid = conn.next_stream;
            // Sent whole, one after another in seq order (quiche's default
            // interleaves open streams a packet each, so every report
            // arrives in part until the last packets of all of them).
            let _ = conn.quic.stream_priority(sid, 127, false);
            let len = body.len();
            bytes = bytes.saturating_add(len);
            match conn.quic.stream_send(sid, &body, true) {
                Ok(n) => {
                    body.drain(..n);
                    if body.is_empty() {
                        queue.handed(seq);
                    }
                }
                Err(quiche::Error::Done) => {}
                Err(_) => {
                    queue.requeue(seq);
                    break;
                }
            }
            conn.next_stream += 4;
            conn.last_send = now;
            stats.sent += 1;
            conn.in_flight.insert(
                sid,
                InFlight {
                    seq,
                    resend,
                    sent_at: now,
                    len,
                    unsent: body,
                    response: Vec::new(),
                },
            );
        }
        let starved =
            conn.in_flight.is_empty() && queue.waiting() > 0 && conn.quic.is_established();
        conn.starved_since = if starved {
            conn.starved_since.or(Some(now))
        } else {
            None
        };
    }

    /// Gives up the current connection (closing it politely if it was up)
    /// and schedules the next attempt.
    fn abandon(&mut self, now: Instant, reason: DisconnectReason) {
        let state = std::mem::replace(&mut self.state, State::Closed);
        let (conn, was_connected) = match state {
            State::Connecting(c) => (*c, false),
            State::Connected(c) => (*c, true),
            other => {
                self.state = other;
                return;
            }
        };
        self.requeue_in_flight(&conn);
        if was_connected {
            // Tell the server, so it frees the connection at once.
            let mut quic = conn.quic;
            if quic
                .close(true, codes::NO_RESPONSE, b"client gives up")
                .is_ok()
            {
                self.retiring = Some(quic);
            }
        }
        self.disconnected(now, reason);
    }

    fn requeue_in_flight(&mut self, conn: &Conn) {
        for f in conn.in_flight.values() {
            self.queue.requeue(f.seq);
        }
    }

    /// quiche says the connection is closed: find out why and move on.
    fn on_closed(&mut self, now: Instant) {
        let state = std::mem::replace(&mut self.state, State::Closed);
        let (conn, was_established) = match state {
            State::Connecting(c) => (c, false),
            State::Connected(c) => (c, true),
            State::Closing(_) => {
                self.events.push_back(ClientEvent::Closed);
                return;
            }
            other => {
                self.state = other;
                return;
            }
        };
        let reason = classify_close(&conn.quic, was_established, &self.cfg.server_name);
        self.save_session_from(&conn);
        self.requeue_in_flight(&conn);
        self.disconnected(now, reason);
    }

    fn save_session_from(&mut self, conn: &Conn) {
        if let Some(s) = conn.quic.session() {
            self.session = Some(s.to_vec());
        }
    }

    fn disconnected(&mut self, now: Instant, reason: DisconnectReason) {
        let permanent = reason.is_permanent();
        self.events.push_back(ClientEvent::Disconnected {
            reason: reason.clone(),
        });
        if permanent {
            self.state = State::Failed;
            self.events.push_back(ClientEvent::Failed { reason });
            return;
        }
        // A stateless reset proves the server is up (it restarted): come
        // back at once, once. A reset again before any answer (a server
        // that resets every connection: a stale steering byte, forged
        // resets) and anything else wait out the backoff.
        let at = if reason == DisconnectReason::Reset && !self.reset_skipped_backoff {
            self.reset_skipped_backoff = true;
            now
        } else {
            now + self.backoff.next_delay(&mut self.rng)
        };
        self.state = State::Waiting { until: at };
        self.events.push_back(ClientEvent::ReconnectScheduled {
            at,
            attempt: self.stats.attempts + 1,
        });
    }
}

/// Why quiche closed a connection, in our words.
pub(crate) fn classify_close(
    q: &quiche::Connection,
    was_established: bool,
    server_name: &str,
) -> DisconnectReason {
    if q.is_timed_out() {
        return if was_established {
            DisconnectReason::IdleTimeout
        } else {
            DisconnectReason::ConnectTimeout
        };
    }
    if let Some(e) = q.local_error()
        && !e.is_app
    {
        if let Some(alert) = e.error_code.checked_sub(0x100).filter(|a| *a < 0x100) {
            if let Some(why) = certificate_alert(alert, server_name) {
                return if alert == ALERT_CERTIFICATE_EXPIRED {
                    DisconnectReason::CertificateOutOfDate(why)
                } else {
                    DisconnectReason::Certificate(why)
                };
            }
            return DisconnectReason::HandshakeFailed(format!("TLS alert {alert}"));
        }
        return DisconnectReason::Protocol(format!(
            "error {:#x} {}",
            e.error_code,
            String::from_utf8_lossy(&e.reason)
        ));
    }
    if let Some(e) = q.peer_error() {
        let reason = String::from_utf8_lossy(&e.reason).into_owned();
        // Only a server that proved who it is (our side of the handshake
        // is done: its certificate and Finished checked) can stop us for
        // good: before that, anyone who saw our Initial (its keys are
        // public) can send this close.
        if !e.is_app
            && (was_established || q.is_established())
            && let Some(alert) = e.error_code.checked_sub(0x100)
            && let Some(why) = client_certificate_alert(alert)
        {
            return if alert == ALERT_CERTIFICATE_EXPIRED {
                DisconnectReason::ClientCertificateOutOfDate(why)
            } else {
                DisconnectReason::ClientCertificate(why)
            };
        }
        if !was_established {
            return DisconnectReason::HandshakeFailed(format!(
                "server closed with code {:#x} {reason}",
                e.error_code
            ));
        }
        return DisconnectReason::PeerClosed {
            code: e.error_code,
            app: e.is_app,
            reason,
        };
    }
    // Closed with no error on either side and not timed out: quiche's
    // signature of a stateless reset.
    if !was_established {
        // While connecting, that is a reset meant for the connection
        // before (a resumed session brings back its reset token, and a
        // restarted server answers each of its packets still on the way):
        // a failed attempt, with its backoff, not "come back at once".
        return DisconnectReason::HandshakeFailed(
            "closed by a stateless reset while connecting (one meant for the previous connection)"
                .into(),
        );
    }
    DisconnectReason::Reset
}

/// The TLS alerts a server sends about the client's certificate, named for
/// a person (with `--cert`/`--key` to suggest when it had none).
fn client_certificate_alert(alert: u64) -> Option<String> {
    Some(match alert {
        116 => "the server requires a client certificate (TLS alert certificate_required): give --cert and --key".into(),
        42 => "bad certificate (TLS alert bad_certificate; e.g. a subject name the server cannot use as an identity)".into(),
        45 => "certificate expired or not yet valid (TLS alert certificate_expired)".into(),
        48 => "not signed by a CA the server trusts (TLS alert unknown_ca)".into(),
        43 | 44 | 46 => format!("certificate not accepted (TLS alert {alert})"),
        _ => return None,
    })
}

/// TLS alert `certificate_expired`: BoringSSL's for a certificate out of
/// date either way (expired, or not yet valid).
const ALERT_CERTIFICATE_EXPIRED: u64 = 45;

/// The TLS alerts (RFC 8446 6.2) that mean "your certificate is not
/// acceptable", named for a person. BoringSSL sends `bad_certificate` when
/// the certificate does not name the server, `unknown_ca` when no trusted CA
/// signed it, and `certificate_expired` when it is out of date.
fn certificate_alert(alert: u64, server_name: &str) -> Option<String> {
    Some(match alert {
        42 => format!(
            "name mismatch: the certificate is not valid for \"{server_name}\" (TLS alert bad_certificate)"
        ),
        43 => "unsupported certificate (TLS alert unsupported_certificate)".into(),
        44 => "certificate revoked (TLS alert certificate_revoked)".into(),
        45 => "certificate expired or not yet valid (TLS alert certificate_expired)".into(),
        46 => "certificate unknown (TLS alert certificate_unknown)".into(),
        48 => "unknown issuer: not signed by a trusted CA (TLS alert unknown_ca)".into(),
        _ => return None,
    })
}
