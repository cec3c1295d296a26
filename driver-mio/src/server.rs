//! The server loop: one UDP socket, SIGINT/SIGTERM, a [`StopHandle`], a
//! [`quic_report_core::Server`] driven per the core's contract, and a
//! [`ReportSink`] that records reports.
//!
//! **An acknowledgement means "recorded":** the loop collects the core's
//! events, records every [`ServerEvent::Report`] among them as the
//! [`ReportSink`] contract says (each recorded, then one flush), and only
//! then [`Server::respond`]s with [`Outcome::Recorded`] for those the sink
//! kept, [`Outcome::NotRecorded`] with the error for the others (the client
//! sends them again). Responding makes more to send and maybe
//! more events, so the loop drains `poll_transmit` and `poll_event` again
//! until both are empty. The sink's own deadline
//! ([`ReportSink::sync_deadline`], e.g. a periodic fsync) is part of the
//! loop's wait, and the sink is synced once more when the loop ends.
//!
//! **Batches:** datagrams are read 32 at a time (`recvmmsg`), each batch is
//! handled and answered (events, then everything to send, 32 datagrams per
//! `sendmmsg`) before the next is read, until the socket is empty; see
//! [`crate::batch`]. With a database sink, what it committed meanwhile is
//! answered with each batch too (not only once per turn), so a commit's
//! answers leave with the next `sendmmsg` instead of after the whole read.
//!
//! Before serving, the keys in [`ServerOptions::recorded`] (reports a
//! previous process recorded, read back from its file) are marked recorded
//! in the core, so their resends are answered `duplicate`.
//!
//! Shutdown (signal or [`StopHandle::stop`]): [`Server::close_all`], send the
//! CONNECTION_CLOSEs, and return `Ok` once [`Server::is_closed`], or after
//! [`ServerOptions::shutdown_grace`] at most. A second signal returns at
//! once, and so does [`StopHandle::abort`] (without closing anything).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quic_report_core::{
    CoreRng, Outcome, Report, ReportHandle, RespondError, Server, ServerConfig, ServerEvent,
    ServerSecret,
};

use crate::batch::{BATCH, RECV_SLOT, RecvBatch, SendBatch};
use crate::database::writer::{Read, Writer};
use crate::database::{Connect, DbError};
use crate::debuglog;
use crate::event_loop::{self, SOCKET, Sources, Steps};
use crate::held::{Held, ReadQueued, Settled, WaitLimits, Waiting};
use crate::metrics_http::MetricsServer;
use crate::observe::{Observer, ReadPolicy, Throttle, more_since};
use crate::reuseport::{self, Steering};
use crate::show::{self, ReportText};
use crate::sink::{RecordedKeys, record_batch};
pub use crate::sink::{ReportSink, WriterSink};
use crate::turn::Wait;
use crate::udp::{UdpIo, is_unreachable};
use crate::{DriverError, StopHandle, os_seed};

/// The worker byte before this process knows its index: past every index
/// the steering program uses, so the kernel's hash decides.
const UNSTEERED: u8 = 0xff;

/// How long the server waits at start for its database's first answer
/// before it serves without it (the connection goes on being made).
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Datagrams read per wake-up before the loop services timers and sends.
const RECV_BUDGET: usize = 1024;

/// What the server loop needs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The UDP address to listen on (port 0: any free port; see
    /// [`ServerDriver::local_addr`]).
    pub listen: SocketAddr,
    /// The core's configuration.
    pub config: ServerConfig,
    /// Catch SIGINT and SIGTERM and shut down gracefully (default `true`).
    pub handle_signals: bool,
    /// Stops the loop from another thread (shuts down gracefully).
    pub stop: StopHandle,
    /// Longest wait for connections to close at shutdown (default 1 s).
    pub shutdown_grace: Duration,
    /// When `config.secret` is `None`, derive it from the private key file
    /// ([`ServerSecret::from_private_key`]) so stateless resets and session
    /// tickets survive a restart (default `true`; `false` leaves the core to
    /// draw a random secret).
    pub derive_secret: bool,
    /// Reports recorded before this server started (e.g. read back from its
    /// file with [`crate::FileSink::read_recorded`]): marked recorded in the
    /// core before serving, so a resend is answered `duplicate` and not
    /// recorded twice (default: none).
    pub recorded: RecordedKeys,
    /// Serve Prometheus metrics over plain HTTP on this address (`/metrics`).
    pub metrics: Option<SocketAddr>,
    /// Share the port with other server processes (`SO_REUSEPORT`) and
    /// steer each client's packets to the process holding its connection
    /// (see [`crate::reuseport`]; default `false`).
    pub reuseport: bool,
    /// Honour `SSLKEYLOGFILE` and `QLOGDIR` (default `true`; see
    /// [`crate::debuglog`]).
    pub env_debug_logs: bool,
    /// Who may read `/latest` and `/stats` (default: no `--reader`, and
    /// anonymous peers may read nothing).
    pub read_policy: ReadPolicy,
}

impl ServerOptions {
    /// Defaults for a server on `listen` with this certificate chain and key.
    pub fn new(listen: SocketAddr, cert_chain: PathBuf, private_key: PathBuf) -> ServerOptions {
        ServerOptions {
            listen,
            config: ServerConfig::new(cert_chain, private_key),
            handle_signals: true,
            stop: StopHandle::new(),
            shutdown_grace: Duration::from_secs(1),
            derive_secret: true,
            recorded: RecordedKeys::new(),
            metrics: None,
            reuseport: false,
            env_debug_logs: true,
            read_policy: ReadPolicy::default(),
        }
    }
}

/// Where the server loop records reports.
pub enum Sink<'a> {
    /// Written by the loop itself, then flushed once per batch, before the
    /// answers (stdout, a file): see [`ReportSink`].
    Inline(&'a mut dyn ReportSink),
    /// A database, committed by a helper thread while the loop serves on;
    /// each report is answered after its commit (see [`crate::held`]).
    Database(DatabaseSink),
}

impl std::fmt::Debug for Sink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::Inline(_) => f.write_str("Sink::Inline"),
            Sink::Database(d) => write!(f, "Sink::Database({})", d.connect.describe()),
        }
    }
}

impl<'a, S: ReportSink + 'a> From<&'a mut S> for Sink<'a> {
    fn from(sink: &'a mut S) -> Sink<'a> {
        Sink::Inline(sink)
    }
}

impl From<DatabaseSink> for Sink<'_> {
    fn from(sink: DatabaseSink) -> Self {
        Sink::Database(sink)
    }
}

/// A database sink: how to connect, and what may wait for a commit.
pub struct DatabaseSink {
    /// Opens the database (again after a failure).
    pub connect: Box<dyn Connect>,
    /// Deadline and bounds of the reports waiting for their commit.
    pub limits: WaitLimits,
}

impl DatabaseSink {
    /// A sink on `connect` with the default [`WaitLimits`].
    pub fn new(connect: Box<dyn Connect>) -> DatabaseSink {
        DatabaseSink {
            connect,
            limits: WaitLimits::default(),
        }
    }
}

/// A server loop, bound and ready to run.
#[derive(Debug)]
pub struct ServerDriver {
    opts: ServerOptions,
    sources: Sources,
    io: UdpIo,
    /// With `--reuseport`: learns the worker byte for connection IDs.
    steering: Option<Steering>,
    observer: Observer,
    metrics: Option<MetricsServer>,
}

/// Binds, then runs the server until it is stopped (see [`ServerDriver`]).
/// `on_event` sees every core event after the loop handled it (a report is
/// recorded and answered by then).
pub fn run_server<'a>(
    opts: ServerOptions,
    sink: impl Into<Sink<'a>>,
    on_event: &mut dyn FnMut(&ServerEvent),
) -> Result<(), DriverError> {
    ServerDriver::bind(opts)?.run(sink, on_event)
}

impl ServerDriver {
    /// Binds the UDP socket, checks the configuration (certificate and key
    /// load), and sets up the poll (socket, waker, signals).
    pub fn bind(mut opts: ServerOptions) -> Result<ServerDriver, DriverError> {
        if opts.derive_secret && opts.config.secret.is_none() {
            let key =
                std::fs::read(&opts.config.private_key).map_err(|source| DriverError::File {
                    path: opts.config.private_key.clone(),
                    source,
                })?;
            opts.config.secret = Some(ServerSecret::from_private_key(&key));
        }
        // Fail here rather than in `run`, which often runs on another thread.
        drop(Server::new(opts.config.clone(), CoreRng::from_seed(0))?);
        let sources = Sources::new(opts.stop.clone(), opts.handle_signals)?;
        let poll = &sources.poll;
        let (io, steering) = if opts.reuseport {
            let addr = opts.listen;
            let sock = reuseport::bind_reuseport(addr)
                .map_err(|source| DriverError::Bind { addr, source })?;
            let steering = match reuseport::attach_steering(&sock) {
                // The bound address: with port 0 the kernel chose the port
                // the probes must go to.
                Ok(()) => Some(
                    Steering::new(sock.local_addr().unwrap_or(addr), Instant::now())
                        .map_err(DriverError::io("binding the reuseport probe socket"))?,
                ),
                Err(e) => {
                    log::warn!(
                        "cannot attach the reuseport steering program ({e}): clients whose \
                         address changes get a stateless reset from another process and reconnect"
                    );
                    None
                }
            };
            (UdpIo::from_std(sock, poll.registry(), SOCKET)?, steering)
        } else {
            (UdpIo::bind(opts.listen, poll.registry(), SOCKET)?, None)
        };
        let mut observer = Observer::new(Instant::now());
        observer.set_read_policy(opts.read_policy.clone());
        observer.set_answer_cap(opts.config.max_response_bytes);
        let metrics = match opts.metrics {
            Some(addr) => Some(
                MetricsServer::start(addr, observer.shared())
                    .map_err(DriverError::io("starting the metrics endpoint"))?,
            ),
            None => None,
        };
        Ok(ServerDriver {
            opts,
            sources,
            io,
            steering,
            observer,
            metrics,
        })
    }

    /// The address of the `--metrics` endpoint, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.io.local_addr()
    }

    /// A handle that stops the loop from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.opts.stop.clone()
    }

    /// Runs the loop until stopped (signal or [`StopHandle::stop`]) and every
    /// connection is closed (bounded by [`ServerOptions::shutdown_grace`]).
    ///
    /// A database sink is connected to first, on this thread: a schema
    /// this build does not understand is an error here; a database that is
    /// down is not (the server serves, answers `not_recorded`, and
    /// reconnects in the background).
    pub fn run<'a>(
        mut self,
        sink: impl Into<Sink<'a>>,
        on_event: &mut dyn FnMut(&ServerEvent),
    ) -> Result<(), DriverError> {
        let sink = match sink.into() {
            Sink::Inline(s) => Recorder::Inline(s),
            Sink::Database(db) => {
                self.observer.read_latest_from_database();
                Recorder::Database(self.start_database(db)?)
            }
        };
        let seed = os_seed()?;
        let mut server = Server::new(self.opts.config.clone(), CoreRng::from_seed_bytes(seed))?;
        if self.opts.env_debug_logs
            && let Some(logs) =
                debuglog::from_env().map_err(DriverError::io("opening debug logs"))?
        {
            server.set_debug_logs(logs);
        }
        if self.steering.is_some() {
            // Until the index is known: a byte no socket has (the hash).
            server.set_cid_prefix(Some(UNSTEERED));
        }
        let recorded = std::mem::take(&mut self.opts.recorded);
        if !recorded.is_empty() {
            let (keys, clients) = (recorded.len(), recorded.clients());
            recorded.mark_recorded(&mut server);
            log::debug!("{keys} report key(s) of {clients} client(s) marked as recorded");
        }
        log::info!("listening on {}", self.io.local_addr());
        let observer = std::mem::replace(&mut self.observer, Observer::new(Instant::now()));
        let throttles = Throttles::default();
        let mut state = Loop {
            server,
            sink,
            on_event,
            sends: SendBatch::new(),
            recvs: RecvBatch::new(),
            batch: Vec::new(),
            settled: Vec::new(),
            observer,
            throttles,
            db_reads: std::collections::HashMap::new(),
            closing_since: None,
            next_tick: Instant::now(),
            fatal: None,
        };
        let res = event_loop::run(&mut state, &mut self);
        if let Recorder::Inline(sink) = &mut state.sink
            && let Err(e) = sink.sync(Instant::now())
        {
            log::error!("{e}");
        }
        res
    }

    /// Starts the database's helper thread, which connects first, and
    /// waits up to [`FIRST_CONNECT_WAIT`] for that: a schema this build
    /// does not understand is refused at start, a database that is down
    /// or does not answer is served around (reports answered
    /// `not_recorded` until it is back).
    fn start_database(&mut self, db: DatabaseSink) -> Result<Box<Held>, DriverError> {
        let what = db.connect.describe();
        let seed = os_seed()?;
        let (writer, first) =
            Writer::start_connecting(db.connect, Arc::clone(&self.sources.waker), seed)
                .map_err(DriverError::io("starting the database thread"))?;
        match first.recv_timeout(FIRST_CONNECT_WAIT) {
            Ok(Ok(())) => {
                // Up before the first commit: an idle server is not down.
                self.observer.database().up = true;
                log::info!("recording into {what}");
            }
            Ok(Err(DbError::Schema(e))) => return Err(DriverError::Database(e)),
            Ok(Err(e)) => log::warn!(
                "database unavailable at start: {e}; serving anyway: reports are answered \
                 not_recorded (the clients keep them) until it is back; reconnecting with backoff"
            ),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(DriverError::Database(format!(
                    "{what}: the database thread ended before its first connection"
                )));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => log::warn!(
                "database {what} has not answered within {}s at start; serving anyway: reports \
                 are answered not_recorded (the clients keep them) until it answers",
                FIRST_CONNECT_WAIT.as_secs()
            ),
        }
        let mut instance = [0u8; 16];
        instance.copy_from_slice(&os_seed()?[..16]);
        Ok(Box::new(Held::new(writer, db.limits, instance)))
    }
}

/// The sink as the loop uses it.
enum Recorder<'a> {
    /// Written and flushed in the loop.
    Inline(&'a mut dyn ReportSink),
    /// Committed by the helper thread; answered when it is done (boxed:
    /// it is large, and there is one per loop).
    Database(Box<Held>),
}

impl Recorder<'_> {
    fn deadline(&self) -> Option<Instant> {
        match self {
            Recorder::Inline(s) => s.sync_deadline(),
            Recorder::Database(h) => h.deadline(),
        }
    }
}

struct Loop<'a> {
    server: Server,
    sink: Recorder<'a>,
    on_event: &'a mut dyn FnMut(&ServerEvent),
    sends: SendBatch,
    recvs: RecvBatch,
    /// The events of one drain, reused.
    batch: Vec<ServerEvent>,
    /// Answers from the database sink, reused.
    settled: Vec<Settled>,
    observer: Observer,
    throttles: Throttles,
    /// Per read sent to the database: whose entries it may show (`None`:
    /// everyone's), and whether it is `/stats` (answered with the server's
    /// own counters when the database cannot be read).
    db_reads: std::collections::HashMap<ReportHandle, (Option<quic_report_core::Identity>, bool)>,
    /// When the shutdown started, if it did.
    closing_since: Option<Instant>,
    /// When the observer wants its next tick.
    next_tick: Instant,
    /// The database thread's fatal error, met while reading: returned by
    /// the turn's [`Steps::drain`].
    fatal: Option<DriverError>,
}

impl Steps for Loop<'_> {
    type Driver = ServerDriver;
    const EVENTS: usize = 256;

    fn sources(d: &mut ServerDriver) -> &mut Sources {
        &mut d.sources
    }

    fn grace(d: &ServerDriver) -> Duration {
        d.opts.shutdown_grace
    }

    fn core_deadline(&self) -> Option<Instant> {
        self.server.poll_timeout()
    }

    /// The sink's deadline (a periodic fsync, a commit waited for), the
    /// steering probe's, the observer's tick.
    fn wait(&mut self, d: &mut ServerDriver, _: Instant, wait: Wait) -> Wait {
        wait.until(self.sink.deadline())
            .until(d.steering.as_ref().map(Steering::deadline))
            .until(Some(self.next_tick))
    }

    fn on_writable(&mut self, d: &mut ServerDriver, _: Instant) {
        d.io.flush(d.sources.poll.registry());
    }

    fn on_readable(&mut self, d: &mut ServerDriver, now: Instant) -> bool {
        self.read(d, now)
    }

    /// Nothing of its own: the database thread's answers are settled every
    /// turn ([`Steps::drain`]), the stop flag is read by the skeleton.
    fn on_wake(&mut self, _: &mut ServerDriver, _: Instant) {}

    fn close(&mut self, _: &mut ServerDriver, now: Instant, _: &str) {
        self.closing_since = Some(now);
        self.server.close_all(now);
    }

    fn closing_since(&self) -> Option<Instant> {
        self.closing_since
    }

    /// The core's deadline, then the steering probe's.
    fn on_deadline(&mut self, d: &mut ServerDriver, now: Instant, core_due: bool) {
        if core_due {
            self.server.handle_timeout(now);
        }
        if let Some(st) = d.steering.as_mut()
            && st.deadline() <= now
            && let Some(index) = st.probe(now, rand::random())
        {
            log::info!("reuseport: this process is worker {index} of its group");
            self.server.set_cid_prefix(Some(index));
        }
    }

    /// Answers what the database committed, drains the core, then the
    /// observer's tick and the sink's periodic sync.
    fn drain(&mut self, d: &mut ServerDriver, now: Instant) -> Result<(), DriverError> {
        if let Some(e) = self.fatal.take() {
            return Err(e);
        }
        self.settle(now)?;
        self.drain_core(d, now);
        let now = Instant::now();
        let server = &self.server;
        self.next_tick = self
            .observer
            .tick(now, server.stats(), server.connections(), || {
                server.mean_rtt()
            });
        if let Recorder::Inline(sink) = &mut self.sink
            && sink.sync_deadline().is_some_and(|t| t <= now)
            && let Err(e) = sink.sync(now)
        {
            log::error!("{e}");
        }
        Ok(())
    }

    /// Shutting down, every connection closed and every datagram sent.
    fn done(&mut self, d: &mut ServerDriver) -> bool {
        let done = self.closing_since.is_some() && self.server.is_closed() && d.io.held() == 0;
        if done {
            log::info!("all connections closed");
        }
        done
    }

    fn closes(&self) -> String {
        format!("{} connection(s)", self.server.connections())
    }

    fn deadline_name(&self) -> String {
        "core deadline".into()
    }
}

/// One [`Throttle`] per kind of refusal a peer can cause at will, and for
/// the reports an inline sink could not record (one per report and per
/// resend while it fails).
#[derive(Debug, Default)]
struct Throttles {
    handshakes: Throttle,
    forbidden: Throttle,
    reads: Throttle,
    unstorable: Throttle,
    not_recorded: Throttle,
}

impl Loop<'_> {
    /// Reads datagrams into the core a batch (one `recvmmsg`) at a time and
    /// answers each batch ([`Loop::drain_core`]) before reading the next, until a
    /// call finds none or the budget is spent. Returns whether datagrams may
    /// be left.
    fn read(&mut self, d: &mut ServerDriver, now: Instant) -> bool {
        let local = d.io.local_addr();
        for _ in 0..RECV_BUDGET / BATCH {
            let n = match d.io.recv_batch(&mut self.recvs) {
                Ok(n) => n,
                // Unconnected sockets rarely see these; nothing to do.
                Err(e) if is_unreachable(&e) => {
                    log::debug!("ICMP error on the socket: {e}");
                    continue;
                }
                Err(e) => {
                    log::warn!("receiving on the UDP socket: {e}");
                    return false;
                }
            };
            for i in 0..n {
                let (data, from, cut) = self.recvs.get(i);
                let len = data.len();
                self.observer.bytes(len, 0);
                if cut {
                    log::debug!("datagram from {from} over {RECV_SLOT} bytes dropped");
                    continue;
                }
                if let Some(st) = d.steering.as_mut()
                    && st.intercept(data)
                {
                    continue;
                }
                if let Err(e) = self.server.handle_datagram(now, from, local, data) {
                    log::debug!("datagram of {len} bytes from {from} dropped: {e}");
                }
            }
            if n == 0 {
                return false;
            }
            // Answer this batch now (its ACKs and answers go out before the
            // next batch is handled), with what the database committed
            // meanwhile, then read on: datagrams that arrived meanwhile are
            // taken in this turn, without an epoll_wait.
            if self.fatal.is_none()
                && let Err(e) = self.settle(now)
            {
                self.fatal = Some(e);
            }
            self.drain_core(d, now);
        }
        true
    }

    /// Events (recording and answering reports), then transmits, then
    /// events again until a drain of events after the transmits finds none:
    /// the core's contract (the crate docs of `quic_report_core`).
    fn drain_core(&mut self, d: &mut ServerDriver, now: Instant) {
        let mut batch = std::mem::take(&mut self.batch);
        self.handle_events(now, &mut batch);
        loop {
            self.send_all(d, now);
            if !self.handle_events(now, &mut batch) {
                break;
            }
        }
        self.batch = batch;
    }

    /// Takes every event of the core and handles them as one batch; false
    /// if there were none.
    fn handle_events(&mut self, now: Instant, batch: &mut Vec<ServerEvent>) -> bool {
        batch.clear();
        while let Some(ev) = self.server.poll_event() {
            batch.push(ev);
        }
        if batch.is_empty() {
            return false;
        }
        self.handle_batch(now, batch);
        true
    }

    /// Sends everything the core has, [`BATCH`] datagrams per `sendmmsg`.
    fn send_all(&mut self, d: &mut ServerDriver, now: Instant) {
        while let Some(t) = self.server.poll_transmit(now, self.sends.slot()) {
            self.sends.push(t.len, t.to);
            self.observer.bytes(0, t.len);
            if self.sends.is_full() {
                d.io.send_batch(d.sources.poll.registry(), &mut self.sends);
            }
        }
        if !self.sends.is_empty() {
            d.io.send_batch(d.sources.poll.registry(), &mut self.sends);
        }
    }

    /// Logs a batch of events in the core's order ("connection opened"
    /// before the reports it carried), records its reports with one flush,
    /// answers its HTTP/0.9 requests, and shows every event to `on_event`.
    fn handle_batch(&mut self, now: Instant, batch: &[ServerEvent]) {
        for ev in batch {
            // A report's line is logged when it is answered (`answer`), and
            // not built at all here: this is once per report. A request's
            // once it is let in (a refused one's warning is throttled).
            if !matches!(ev, ServerEvent::Report { .. } | ServerEvent::Request { .. }) {
                show::server_event(ev).log();
            }
            self.log_refusal(now, ev);
        }
        self.record(now, batch);
        for ev in batch {
            self.observer.event(ev);
            if let ServerEvent::Request {
                handle,
                peer,
                path,
                identity,
            } = ev
            {
                let only = match self.observer.authorize(path, identity) {
                    Ok(only) => {
                        show::server_event(ev).log();
                        only
                    }
                    Err(refused) => {
                        if let Some(more) = self.throttles.reads.allow(now) {
                            log::warn!(
                                "{}: GET {} from {peer} refused to {identity}{}",
                                handle.conn,
                                show::FromPeer(path),
                                more_since(more)
                            );
                        }
                        if let Err(e) = self.server.respond_request(now, *handle, refused.body) {
                            log::debug!(
                                "{}: cannot answer GET {}: {e}",
                                handle.conn,
                                show::FromPeer(path)
                            );
                        }
                        (self.on_event)(ev);
                        continue;
                    }
                };
                // With a database, the reads come from it (every server's).
                let read = match path.as_str() {
                    // Only its own: selected by the database, not after
                    // its row limit.
                    "/latest" => Some(Read::Latest {
                        limit: self.observer.latest_limit(),
                        identity: only.as_ref().map(|i| i.as_str().to_owned()),
                    }),
                    "/stats" => Some(Read::Counts),
                    _ => None,
                };
                let mut body = None;
                if let (Recorder::Database(held), Some(read)) = (&mut self.sink, read) {
                    let stats = read == Read::Counts;
                    match held.read(now, *handle, read) {
                        ReadQueued::Sent => {
                            self.db_reads.insert(*handle, (only, stats));
                            (self.on_event)(ev);
                            continue;
                        }
                        ReadQueued::Busy(n) => {
                            body = Some(self.observer.read_failed(
                                stats,
                                &format!("database busy: {n} reads wait for it; try again"),
                            ));
                        }
                        // Its fatal error stops the server.
                        ReadQueued::Gone => {
                            body = Some(
                                self.observer
                                    .read_failed(stats, "the database sink has stopped"),
                            );
                        }
                    }
                }
                let body = body.unwrap_or_else(|| self.observer.body(path, only.as_ref()));
                if let Err(e) = self.server.respond_request(now, *handle, body) {
                    log::debug!(
                        "{}: cannot answer GET {}: {e}",
                        handle.conn,
                        show::FromPeer(path)
                    );
                }
            }
            (self.on_event)(ev);
        }
    }

    /// The rate-limited warning for a refused handshake or a `forbidden`
    /// report (a peer can cause those as often as it likes).
    fn log_refusal(&mut self, now: Instant, ev: &ServerEvent) {
        match ev {
            ServerEvent::HandshakeRefused { conn, peer, reason } => {
                if let Some(more) = self.throttles.handshakes.allow(now) {
                    log::warn!(
                        "{conn}: handshake from {peer} refused: {reason}{}",
                        more_since(more)
                    );
                }
            }
            ServerEvent::StreamRejected {
                conn,
                error: error @ quic_report_core::StreamError::Forbidden { .. },
                ..
            } => {
                if let Some(more) = self.throttles.forbidden.allow(now) {
                    log::warn!("{conn}: report refused: {error}{}", more_since(more));
                }
            }
            _ => {}
        }
    }

    /// Records every report of `batch`: written and flushed at once by an
    /// inline sink, or handed to the database thread (answered later, by
    /// [`Loop::settle`]).
    fn record(&mut self, turn: Instant, batch: &[ServerEvent]) {
        let reports = batch.iter().filter_map(|ev| match ev {
            ServerEvent::Report {
                handle,
                peer,
                report,
            } => Some((*handle, *peer, report)),
            _ => None,
        });
        let held = match &mut self.sink {
            Recorder::Inline(_) => return self.record_inline(turn, reports.collect()),
            Recorder::Database(held) => held,
        };
        let waiting: Vec<Waiting> = reports
            .map(|(handle, peer, report)| Waiting {
                handle,
                peer,
                report: report.clone(),
                line: report.to_json_line(),
                turn,
            })
            .collect();
        if waiting.is_empty() {
            return;
        }
        let mut refused = std::mem::take(&mut self.settled);
        held.submit(turn, waiting, &mut refused, self.observer.database());
        self.answer_settled(&mut refused);
        self.settled = refused;
    }

    /// Writes each report, flushes the sink once, then answers each:
    /// recorded, or not recorded if its write failed or the flush did not
    /// keep it ([`crate::sink::record_batch`]).
    fn record_inline(&mut self, turn: Instant, reports: Vec<(ReportHandle, SocketAddr, &Report)>) {
        let Recorder::Inline(sink) = &mut self.sink else {
            return;
        };
        // Serialised once: the sink writes it, /latest keeps it.
        let lines: Vec<Vec<u8>> = reports.iter().map(|(_, _, r)| r.to_json_line()).collect();
        let results = record_batch(
            &mut **sink,
            reports
                .iter()
                .zip(&lines)
                .map(|((_, _, report), line)| (*report, line.as_slice())),
        );
        // The sink may have taken a while: answer with a fresh `now`.
        let now = Instant::now();
        for ((handle, peer, report), (line, result)) in
            reports.into_iter().zip(lines.into_iter().zip(results))
        {
            let outcome = match result {
                Ok(()) => Outcome::Recorded,
                Err(e) => Outcome::NotRecorded(e),
            };
            self.answer(now, turn, handle, peer, report, line, outcome);
        }
    }

    /// Answers what the database thread finished, and the reports whose
    /// deadline passed. A fatal database error stops the server.
    fn settle(&mut self, now: Instant) -> Result<(), DriverError> {
        let Recorder::Database(held) = &mut self.sink else {
            return Ok(());
        };
        let mut settled = std::mem::take(&mut self.settled);
        let res = held.poll(now, &mut settled, self.observer.database());
        self.answer_settled(&mut settled);
        self.settled = settled;
        res.map_err(|e| DriverError::Database(e.to_string()))
    }

    fn answer_settled(&mut self, settled: &mut Vec<Settled>) {
        let now = Instant::now();
        for s in settled.drain(..) {
            match s {
                Settled::Report(w, outcome) => {
                    self.answer(now, w.turn, w.handle, w.peer, &w.report, w.line, outcome);
                }
                Settled::Read(handle, result) => {
                    let (only, stats) = self.db_reads.remove(&handle).unwrap_or((None, false));
                    let body = match result {
                        Ok(r) => self.observer.http_body_from(r, only.as_ref()),
                        Err(e) => self
                            .observer
                            .read_failed(stats, &format!("database unavailable: {e}")),
                    };
                    if let Err(e) = self.server.respond_request(now, handle, body) {
                        log::debug!("{}: cannot answer a read: {e}", handle.conn);
                    }
                }
            }
        }
    }

    /// Answers one report and counts it.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &mut self,
        now: Instant,
        turn: Instant,
        handle: ReportHandle,
        peer: SocketAddr,
        report: &Report,
        line: Vec<u8>,
        outcome: Outcome,
    ) {
        let took = now.saturating_duration_since(turn);
        self.observer.answered(report, line, &outcome, took);
        match &outcome {
            Outcome::Recorded => {
                log::info!(
                    "{}",
                    show::Recorded {
                        conn: handle.conn,
                        report,
                        peer
                    }
                );
            }
            Outcome::Duplicate => log::info!(
                "{}: {} from {peer} was recorded before (the database has its key)",
                handle.conn,
                ReportText(report)
            ),
            // A database outage is logged once by the sink, not per report.
            Outcome::NotRecorded(e) if matches!(self.sink, Recorder::Database(_)) => log::debug!(
                "{}: could not record {}: {e}; the client will send it again",
                handle.conn,
                ReportText(report)
            ),
            // Every report and every resend while a file or stdout fails.
            Outcome::NotRecorded(e) => {
                if let Some(more) = self.throttles.not_recorded.allow(now) {
                    log::warn!(
                        "{}: could not record {}: {e}; the client will send it again{}",
                        handle.conn,
                        ReportText(report),
                        more_since(more)
                    );
                }
            }
            // A client can send these as often as it likes.
            Outcome::Unstorable(e) => {
                if let Some(more) = self.throttles.unstorable.allow(now) {
                    log::warn!(
                        "{}: {} from {peer} refused (unstorable, the client drops it): {e}{}",
                        handle.conn,
                        ReportText(report),
                        more_since(more)
                    );
                }
            }
        }
        match self.server.respond(now, handle, outcome) {
            Ok(()) => {}
            Err(RespondError::ConnectionGone) => {
                log::debug!("{}: connection gone before the answer", handle.conn);
            }
            Err(e) => log::warn!("{}: cannot answer report: {e}", handle.conn),
        }
    }
}
