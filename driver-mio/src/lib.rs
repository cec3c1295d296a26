//! # quic-report-mio: the core over real UDP
//!
//! [mio] loops, one thread each, that drive the Sans-IO core
//! ([`quic_report_core::Client`] and [`quic_report_core::Server`]) over a real
//! UDP socket, in the order of the core's contract (the crate docs of
//! `quic_report_core`). Each loop owns one `mio::Poll` with three sources: the UDP
//! socket, a `mio::Waker` (samples handed in from other threads, stop
//! requests) and, optionally, SIGINT/SIGTERM through signal-hook-mio.
//!
//! ```text
//! loop:
//!   wait = core.poll_timeout() minus Instant::now(), floored at 0 (None = block)
//!   poll.poll(&mut events, wait); on Interrupted, retry
//!   now = Instant::now()
//!   for ev in events:  SOCKET readable -> recv until WouldBlock -> core.handle_datagram(now, ..)
//!                                         (ECONNREFUSED on the client -> core.handle_unreachable(now))
//!                      SOCKET writable -> flush held datagrams
//!                      WAKER           -> drain sample channel -> core.submit(now, s); stop request?
//!                      SIGNAL          -> core.close(now) / server.close_all(now)
//!   if the deadline has passed: core.handle_timeout(now)
//!   drain core.poll_event() -> app   (server: write to the sink first, then core.respond(..))
//!   drain core.poll_transmit(now, &mut out) -> send (WouldBlock: hold it, add WRITABLE interest)
//!   again until neither gives anything
//!   exit once closing is finished
//! ```
//!
//! The client's HTTP fetch ([`fetch`]) runs ureq on a helper thread that
//! hands samples to the loop through the sample channel and the waker; with
//! `--spool` the loop writes each sample to its [`spool`] before sending it.
//! Nothing spins: an idle loop sleeps until the core's next deadline.
//!
//! Entry points: [`run_client`] / [`ClientDriver`] and [`run_server`] /
//! [`ServerDriver`]. The `*Driver` forms bind first, so the caller can learn
//! the bound address and take a [`StopHandle`] (to stop the loop from another
//! thread) before running it.
//!
//! Sinks ([`sink`]): [`WriterSink`] (stdout) and [`FileSink`] (an
//! append-only JSON-lines file with an [`Fsync`] policy, read back at start
//! into [`RecordedKeys`] so a restarted server does not record a report
//! twice), written inline by the loop ([`Sink::Inline`]); and databases
//! ([`database`]: SQLite, PostgreSQL) committed by a helper thread while the
//! loop serves on ([`Sink::Database`]; the reports waiting for their commit
//! are [`held`]). [`reuseport`] lets several server processes share a port
//! and steers each client to its process. [`read_secret_file`] reads a
//! `--secret-file`.
//!
//! [mio]: https://docs.rs/mio

pub mod batch;
pub mod client;
pub mod database;
pub mod debuglog;
pub mod error;
pub mod event_loop;
pub mod fetch;
pub mod get;
pub mod held;
pub mod http_endpoint;
pub mod lookup;
pub mod metrics_http;
pub mod name_lookups;
pub mod observe;
pub mod redact;
pub mod reuseport;
pub mod secret;
pub mod server;
pub mod show;
pub mod signal;
pub mod sink;
pub mod source_resolver;
pub mod spool;
pub mod stop;
pub mod turn;
pub mod udp;

pub use client::{ClientDriver, ClientOptions, ClientSummary, SampleSender, run_client};
pub use error::DriverError;
pub use fetch::{FetchError, FetchOptions, Source, SourceProxy, SourceTrust};
pub use get::{GetOptions, run_get};
pub use held::WaitLimits;
pub use http_endpoint::HttpEndpoint;
pub use lookup::ServerLookup;
pub use metrics_http::MetricsServer;
pub use observe::{Observer, ReadPolicy};
pub use secret::read_secret_file;
pub use server::{DatabaseSink, ServerDriver, ServerOptions, Sink, run_server};
pub use sink::{
    DEFAULT_FSYNC_INTERVAL, FileSink, FlushError, Fsync, RecordedKeys, ReportSink, SinkUrl,
    WriterSink,
};
pub use spool::{Spool, SpoolError, SpoolOptions};
pub use stop::StopHandle;

use rand::TryRngCore;

/// 32 bytes of OS randomness to seed a [`quic_report_core::CoreRng`].
pub fn os_seed() -> Result<[u8; 32], DriverError> {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut seed)
        .map_err(|e| DriverError::Io {
            what: "reading OS randomness",
            source: std::io::Error::other(e),
        })?;
    Ok(seed)
}

/// Size of the receive buffer: the largest UDP payload.
pub const RECV_BUF_SIZE: usize = 65535;
