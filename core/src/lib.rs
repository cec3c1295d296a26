//! # quic-report core: the Sans-IO protocol
//!
//! Two state machines, [`Client`] and [`Server`], each wrapping quiche
//! connections. They never touch a socket, read a clock, spawn a thread or
//! print: the caller passes `now`, feeds datagrams in, and drains what comes
//! out. Any event loop can drive them (the `quic-report-mio` crate is one;
//! the simulation in `quic-report-tests` is another, on virtual time).
//!
//! ## The contract
//!
//! This is the one place it is written; the drivers, the simulation, the
//! fuzz harness and the example say "the core's contract" and point here.
//! After any input (`handle_datagram`, `handle_timeout`,
//! `handle_unreachable`, `submit`, `respond`, `respond_request`, `close`,
//! `close_all`):
//!
//! 1. **events:** call `poll_event` until `None`, handling each one
//!    (handling is an input too: a server's `respond`, a client's `close`);
//! 2. **transmits:** call `poll_transmit` until `None`, sending each datagram;
//! 3. **events again:** sending can finish a state and report it (a
//!    connection is closed once its CONNECTION_CLOSE is out, even when
//!    `poll_transmit` returned nothing), so drain the events once more; if
//!    there were any, go back to 2;
//! 4. **wait** until a datagram arrives or `poll_timeout` passes, then call
//!    `handle_timeout` (early is harmless).
//!
//! A client's `set_path` (where its next attempt goes and comes from: a new
//! socket, the server's name resolved anew) is a setting, not an input: it
//! changes no state and emits nothing, so it needs no drain.
//!
//! ```text
//! loop {
//!     wait for a datagram or until core.poll_timeout()
//!     now = Instant::now()
//!     datagram   -> core.handle_datagram(now, from, to, &mut buf)
//!     deadline   -> core.handle_timeout(now)
//!     handle_events()          // while let Some(e) = core.poll_event() { handle e }: any?
//!     loop {
//!         while let Some(t) = core.poll_transmit(now, &mut out) { send out[..t.len] to t.to }
//!         if !handle_events() { break }
//!     }
//! }
//! ```
//!
//! Why events first: a server answers a report read in this turn before
//! anything is sent, so quiche puts its ACK and the answer in one packet
//! (one datagram per report instead of two at one in flight, and one
//! wake-up less for the client). Nothing is lost in the other order, but
//! production and the simulation both drain in this one, so the order the
//! tests run is the order that ships. (The bench's load generator sends
//! first on purpose: see `bench/src/quic.rs`.)
//!
//! ## Two clocks
//!
//! quiche reads `Instant::now()` itself (recv, send, its timers) and no API
//! takes a time. So the core's own timers (backoff, connect deadline,
//! response deadline, keep-alive, handshake deadline) follow the caller's
//! `now`, while quiche's (loss recovery, idle timeout, draining) follow
//! `Instant::now()`; [`Client::poll_timeout`] and [`Server::poll_timeout`]
//! give the earlier of both. In production the two are the same clock. The
//! simulation makes them the same clock too, by giving its test binary a
//! `clock_gettime` that returns virtual time.
//!
//! ## Randomness
//!
//! Connection IDs, backoff jitter and client IDs come from a [`CoreRng`]
//! the caller seeds: the same seed takes the same path. (TLS randomness is
//! BoringSSL's own, so packet bytes differ between runs; timings and
//! decisions do not.)
#![warn(missing_docs, unreachable_pub)]

pub mod backoff;
pub mod client;
pub mod config;
pub mod dedup;
pub mod error;
pub mod get;
pub mod identity;
pub mod object;
pub mod per_identity;
pub mod queue;
pub mod report;
pub mod rng;
pub mod seqs;
pub mod server;
pub mod stream;
pub mod timer;
pub mod token;

use std::net::SocketAddr;

pub use client::{Client, ClientEvent, ClientState, ClientStats, DisconnectReason};
pub use config::{
    ALPN, CertFiles, ClientConfig, MAX_DATAGRAM_SIZE, RetryMode, ServerConfig, Verify,
};
pub use error::{ConfigError, DatagramError, RespondError, StreamError, TokenError};
pub use get::{GetConfig, GetOutcome, HqGet};
pub use identity::{Identity, IdentityError, RecordKey};
pub use object::JsonObject;
pub use queue::Seq;
pub use report::{Report, Response, Sample};
pub use rng::CoreRng;
pub use seqs::SeqSet;
pub use server::{
    CertRefusal, CloseReason, ConnKey, ConnStats, Limit, LimitCounts, Outcome, ReportHandle,
    Server, ServerEvent, ServerStats,
};
pub use timer::{Deadline, TimerKind};
pub use token::ServerSecret;

/// Where a connection's debugging output goes.
pub type LogWriter = Box<dyn std::io::Write + Send + Sync>;

/// Debugging hooks, as quiche's own apps have them: the application decides
/// where each new connection's TLS key log (`SSLKEYLOGFILE`, so Wireshark
/// can decrypt a capture) and qlog (`QLOGDIR`, JSON-SEQ) go. The core only
/// hands the writers to quiche; it opens no file itself.
pub trait DebugLogs: Send {
    /// The TLS key-log writer for a new connection, or `None`.
    fn keylog(&mut self) -> Option<LogWriter> {
        None
    }
    /// The qlog writer for a new connection (`trace_id` is quiche's, hex of
    /// our connection ID), or `None`.
    fn qlog(&mut self, trace_id: &str, is_server: bool) -> Option<LogWriter> {
        let _ = (trace_id, is_server);
        None
    }
}

/// Installs the hooks on a new connection.
pub(crate) fn attach_debug_logs(
    logs: &mut Option<Box<dyn DebugLogs>>,
    quic: &mut quiche::Connection,
) {
    let Some(logs) = logs else { return };
    if let Some(w) = logs.keylog() {
        quic.set_keylog(w);
    }
    let trace_id = quic.trace_id().to_owned();
    let is_server = quic.is_server();
    if let Some(w) = logs.qlog(&trace_id, is_server) {
        let role = if is_server { "server" } else { "client" };
        quic.set_qlog(
            w,
            format!("quic-report {role}"),
            format!("quic-report {role} {trace_id}"),
        );
    }
}

/// Length of the connection IDs we issue.
pub const LOCAL_CID_LEN: usize = 16;

/// A datagram to send: its bytes are `buf[..len]` of the buffer passed to
/// `poll_transmit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Transmit {
    /// Bytes written into the caller's buffer.
    pub len: usize,
    /// Destination.
    pub to: SocketAddr,
    /// Local address to send from.
    pub from: SocketAddr,
}

impl Transmit {
    /// The datagram quiche just wrote: `len` bytes, addressed by `info`.
    pub(crate) fn sent(len: usize, info: &quiche::SendInfo) -> Transmit {
        Transmit {
            len,
            to: info.to,
            from: info.from,
        }
    }
}
