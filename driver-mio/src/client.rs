//! The client loop: a UDP socket (renewed for every reconnect attempt, see
//! below), the samples handed in by the
//! fetch thread ([`crate::fetch::Fetcher`]) or a [`SampleSender`],
//! SIGINT/SIGTERM, and a [`quic_report_core::Client`] driven per the core's
//! contract.
//!
//! ```text
//!  fetch thread (ureq) ──Sample──┐
//!  SampleSender ──────Sample──► channel ──► Waker ───┐
//!  StopHandle::stop ─────────────────────► Waker ───┤
//!  SIGINT / SIGTERM ─────────────────────► Signals ─┼──► mio::Poll ──► Client (core) ──► UDP socket
//!  UDP socket (datagrams, ECONNREFUSED) ────────────┘        ▲  poll_timeout           │
//!                                                            └─────────────────────────┘
//! ```
//!
//! A sample is submitted (and, with a spool, written to it first) in the
//! turn of the loop that the waker started, and its report goes out in that
//! turn. With a spool, a sample is never reported before it is in it: when
//! the spool cannot take it (a full disk), it is held back in memory, in
//! order, with one warning naming the cause, and written again every
//! [`SPOOL_RETRY`] (and before any newer sample) until the spool takes it;
//! then its report goes out. At most `queue_limit` samples, and
//! `queue_limit_bytes`, are held so; past that the oldest is dropped and counted (as a full queue drops). The
//! loop wakes for the earliest of the core's deadline, the spool's (a
//! deferred fsync, a retry) and, when info logs are on, the summary line.
//!
//! Every reconnect attempt gets a new socket, bound afresh and connected
//! to the server's address (left unconnected while there is no route to
//! it) right before the attempt starts, so a client
//! whose own address changed (a new network, a renewed DHCP lease, a
//! network that was not up at boot) sends from the address it has now.
//! With a [`ServerLookup`], the server's name is looked up when the driver
//! is made and again, on a helper thread, whenever an attempt is
//! scheduled; the first attempt to start after the answer goes where it
//! points (see [`crate::lookup`]). A name that does not resolve at start is no error:
//! the core's attempts fail at once, sending nothing, until it does (see
//! `Client::set_path`). A connection that works is never moved.
//!
//! The loop ends when the core is finished: `Closed` after a stop request,
//! a signal or `count` settled reports (returns `Ok`), or `Failed` (e.g. the
//! server's certificate was refused; returns [`DriverError::ClientFailed`]).
//! A second signal while closing ends the loop at once, and so does a close
//! that takes longer than [`ClientOptions::close_grace`] or
//! [`StopHandle::abort`] (which sends nothing more).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use mio::Waker;
use quic_report_core::{
    Client, ClientConfig, ClientEvent, ClientState, ClientStats, CoreRng, DisconnectReason,
    MAX_DATAGRAM_SIZE, Sample, Seq, Verify,
};

use crate::debuglog;
use crate::event_loop::{self, SOCKET, Sources, Steps};
use crate::fetch::{FetchOptions, Fetcher};
use crate::lookup::{self, FIRST_LOOKUP_WAIT, Lookups, ServerLookup};
use crate::observe::SUMMARY_EVERY;
use crate::spool::{Spool, SpoolOptions};
use crate::turn::Wait;
use crate::udp::{Recv, Sent, UdpIo};
use crate::{DriverError, RECV_BUF_SIZE, StopHandle, os_seed};

/// Datagrams read per wake-up before the loop services timers and sends
/// (the rest are read on the next turn, without sleeping).
const RECV_BUDGET: usize = 256;

/// Most addresses remembered as having failed to get a socket (for the
/// warning, once each); past that the memory starts over.
const MAX_SOCKET_WARNED: usize = 64;

/// How often samples the spool could not take are written again.
pub const SPOOL_RETRY: Duration = Duration::from_secs(1);

/// What the client loop needs.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The core's configuration. `config.local` is overwritten with the
    /// socket's address once bound; `config.server` is where the first
    /// attempt goes (`None`: nowhere until `lookup` finds the server).
    pub config: ClientConfig,
    /// The server's name, looked up again whenever a reconnect attempt is
    /// scheduled, and by [`ClientDriver::new`] when `config.server` is `None`
    /// (`None`: `config.server` for good).
    pub lookup: Option<ServerLookup>,
    /// Where and how often to fetch samples (`None`: samples only come
    /// through [`ClientDriver::sample_sender`]).
    pub fetch: Option<FetchOptions>,
    /// Persist the queue in this spool (`None`: in memory only, lost with
    /// the process). Opened and locked by [`ClientDriver::new`].
    pub spool: Option<SpoolOptions>,
    /// Close the client once this many reports are settled: acknowledged
    /// (duplicates included), or rejected or dropped (those are logged).
    /// A sample dropped before it became a report (one the spool never
    /// took, see the module docs) counts too, so a run of `count` samples
    /// ends even when some were lost; reports restored from the spool do
    /// not (they settle besides).
    pub count: Option<u64>,
    /// Catch SIGINT and SIGTERM and close gracefully (default `true`).
    pub handle_signals: bool,
    /// Stops the loop from another thread (closes gracefully).
    pub stop: StopHandle,
    /// Longest wait for the CONNECTION_CLOSE to go out after a stop request
    /// (default 2 s).
    pub close_grace: Duration,
    /// Honour `SSLKEYLOGFILE` and `QLOGDIR` (default `true`; see
    /// [`crate::debuglog`]).
    pub env_debug_logs: bool,
}

impl ClientOptions {
    /// Defaults for a client of the server `lookup` names (`host:port`),
    /// verifying the host's name in its certificate as `verify` says: see
    /// [`ClientOptions::lookup`].
    pub fn named(lookup: ServerLookup, verify: Verify) -> ClientOptions {
        let any = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0));
        let mut opts = ClientOptions::new(any, verify);
        let host = lookup
            .name()
            .rsplit_once(':')
            .map_or(lookup.name(), |(h, _)| h);
        opts.config.server_name = host.to_owned();
        opts.config.server = None;
        opts.lookup = Some(lookup);
        opts
    }

    /// Defaults for a client of `server`, verifying as `verify` says, with
    /// no fetching, no count, and signals caught.
    pub fn new(server: SocketAddr, verify: Verify) -> ClientOptions {
        ClientOptions {
            config: ClientConfig::new(server, crate::udp::unspecified(server), verify),
            lookup: None,
            fetch: None,
            spool: None,
            count: None,
            handle_signals: true,
            stop: StopHandle::new(),
            close_grace: Duration::from_secs(2),
            env_debug_logs: true,
        }
    }
}

/// How a client run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSummary {
    /// The `client` field of its reports.
    pub client_id: String,
    /// The core's counters.
    pub stats: ClientStats,
    /// Reports settled in this run (acknowledged, rejected or dropped),
    /// and samples dropped before they became reports.
    pub settled: u64,
    /// Reports never acknowledged (given up at close).
    pub unacknowledged: usize,
    /// Reports dropped because the queue was full, and samples dropped
    /// because the spool could not take them and too many were held.
    pub dropped: u64,
    /// Samples fetched that the spool never took (a full disk until the
    /// end): never reported, lost with this process.
    pub unspooled: usize,
}

/// Hands samples to a running client loop from any thread (for callers
/// that fetch samples themselves).
#[derive(Debug, Clone)]
pub struct SampleSender {
    tx: Sender<Sample>,
    waker: Arc<Waker>,
}

impl SampleSender {
    /// Samples into `tx`, the loop woken by `waker`.
    pub(crate) fn new(tx: Sender<Sample>, waker: Arc<Waker>) -> SampleSender {
        SampleSender { tx, waker }
    }

    /// Queues `sample` for the loop and wakes it. Gives the sample back if
    /// the loop is gone.
    pub fn send(&self, sample: Sample) -> Result<(), Sample> {
        self.tx.send(sample).map_err(|e| e.0)?;
        self.wake();
        Ok(())
    }

    /// Wakes the loop (with nothing sent: for news it finds itself).
    pub(crate) fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            log::warn!("cannot wake the client loop: {e}");
        }
    }
}

/// A client loop, bound and ready to run.
#[derive(Debug)]
pub struct ClientDriver {
    opts: ClientOptions,
    sources: Sources,
    io: UdpIo,
    samples_tx: Sender<Sample>,
    samples_rx: Receiver<Sample>,
    spool: Option<Spool>,
    /// Lookups of the server's name (with a [`ServerLookup`]); the first
    /// may still be under way.
    lookups: Option<Lookups>,
    /// The lookup in [`ClientDriver::new`] failed or did not answer in
    /// time (and was warned about).
    lookup_failed_at_start: bool,
}

/// Binds, then runs the client until it is finished (see [`ClientDriver`]).
/// `handler` sees every event the core emits, with the client for context.
pub fn run_client(
    opts: ClientOptions,
    handler: &mut dyn FnMut(&ClientEvent, &Client),
) -> Result<ClientSummary, DriverError> {
    ClientDriver::new(opts)?.run(handler)
}

impl ClientDriver {
    /// Binds a UDP socket on an ephemeral port of the server's family,
    /// connects it to the server (if it has an address and a route yet),
    /// opens and locks the spool (if any), and sets up the poll (socket,
    /// waker, signals). Nothing is sent yet.
    pub fn new(mut opts: ClientOptions) -> Result<ClientDriver, DriverError> {
        if let Some(f) = &opts.fetch {
            f.validate().map_err(DriverError::InvalidOption)?;
        }
        if opts.lookup.is_none() && opts.config.server.is_none() {
            return Err(DriverError::InvalidOption(
                "no server address, and no name to look up".into(),
            ));
        }
        let spool = match &opts.spool {
            Some(s) => Some(open_spool(s, &mut opts.config.client_id)?),
            None => None,
        };
        let sources = Sources::new(opts.stop.clone(), opts.handle_signals)?;
        let mut lookups = opts
            .lookup
            .clone()
            .map(|l| Lookups::new(l, Arc::clone(&sources.waker)));
        let mut lookup_failed_at_start = false;
        // Where the first attempt may go, in order of preference.
        let candidates = match (&mut lookups, opts.config.server) {
            (_, Some(server)) => vec![server],
            (None, None) => Vec::new(),
            // On a helper thread, waited for a while only: a resolver that
            // hangs at boot must not keep the client from spooling and
            // fetching (the lookup goes on, and the loop takes its answer).
            (Some(l), None) => {
                l.start(Instant::now());
                match l.wait(FIRST_LOOKUP_WAIT) {
                    Some(Ok(addrs)) => addrs,
                    Some(Err(e)) => {
                        lookup_failed_at_start = true;
                        log::warn!(
                            "cannot look up the server {}: {e}; reporting starts, and the name is \
                             looked up again at each reconnect",
                            l.name()
                        );
                        Vec::new()
                    }
                    None => {
                        lookup_failed_at_start = true;
                        log::warn!(
                            "the lookup of the server {} has not answered in {}s; reporting \
                             starts, and the answer is taken when it comes",
                            l.name(),
                            FIRST_LOOKUP_WAIT.as_secs()
                        );
                        Vec::new()
                    }
                }
            }
        };
        let io = match first_socket(&candidates, &sources) {
            Some(Ok((io, server))) => {
                opts.config.server = Some(server);
                io
            }
            Some(Err(e)) => return Err(e),
            // A placeholder until the server has an address.
            None => UdpIo::bind(
                crate::udp::unspecified(opts.config.local),
                sources.poll.registry(),
                SOCKET,
            )?,
        };
        opts.config.local = io.local_addr();
        let (samples_tx, samples_rx) = mpsc::channel();
        Ok(ClientDriver {
            opts,
            sources,
            io,
            samples_tx,
            samples_rx,
            spool,
            lookups,
            lookup_failed_at_start,
        })
    }

    /// The local address of the socket.
    pub fn local_addr(&self) -> SocketAddr {
        self.io.local_addr()
    }

    /// A handle that stops the loop from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.opts.stop.clone()
    }

    /// A way to hand samples to the loop from another thread.
    pub fn sample_sender(&self) -> SampleSender {
        SampleSender::new(self.samples_tx.clone(), Arc::clone(&self.sources.waker))
    }

    /// Runs the loop until the client is finished. `Ok` when it closed
    /// (stop, signal, `count`); [`DriverError::ClientFailed`] when it failed
    /// for good.
    pub fn run(
        mut self,
        handler: &mut dyn FnMut(&ClientEvent, &Client),
    ) -> Result<ClientSummary, DriverError> {
        let seed = os_seed()?;
        let logs = if self.opts.env_debug_logs {
            debuglog::from_env().map_err(DriverError::io("opening debug logs"))?
        } else {
            None
        };
        let mut client = Client::with_debug_logs(
            self.opts.config.clone(),
            CoreRng::from_seed_bytes(seed),
            Instant::now(),
            logs,
        )?;
        let mut spool = self.spool.take();
        if let Some(s) = &mut spool {
            let restored = s.take_restored();
            if let (Some(first), Some(last)) = (restored.first(), restored.last()) {
                log::info!(
                    "spool {}: {} report(s) not acknowledged before, seq {}..={}, sent first",
                    s.dir().display(),
                    restored.len(),
                    first.0,
                    last.0
                );
            }
            client.resume(Instant::now(), s.next_seq(), restored);
        }
        // Reports restored from the spool settle too, but `count` counts
        // this run's samples.
        let counted_from = client.next_seq();
        log::debug!(
            "client {} on {} -> {} ({})",
            client.client_id(),
            self.io.local_addr(),
            self.opts
                .config
                .server
                .map_or_else(|| "no address yet".into(), |a| a.to_string()),
            self.opts.config.server_name
        );
        let lookups = self.lookups.take();
        let fetch = match &self.opts.fetch {
            Some(f) => {
                Some(Fetcher::spawn(f, self.sample_sender()).map_err(DriverError::InvalidOption)?)
            }
            None => None,
        };
        let mut state = Loop {
            client,
            fetch,
            spool,
            spool_failing: false,
            held: VecDeque::new(),
            held_bytes: 0,
            held_limit: self.opts.config.queue_limit.max(1),
            held_limit_bytes: self.opts.config.queue_limit_bytes,
            held_dropped: 0,
            holding: false,
            retry_at: None,
            handler,
            settled: 0,
            counted: 0,
            counted_from,
            count: self.opts.count,
            closing_since: None,
            failure: None,
            out: vec![0u8; MAX_DATAGRAM_SIZE],
            buf: vec![0u8; RECV_BUF_SIZE],
            // No summary line to log: no wake-up for it either.
            next_summary: log::log_enabled!(log::Level::Info)
                .then(|| Instant::now() + SUMMARY_EVERY),
            last_acked: 0,
            lookups,
            lookup_failing: self.lookup_failed_at_start,
            target: self.opts.config.server,
            connected: false,
            last_attempt_connected: false,
            socket_warned: std::collections::HashSet::new(),
        };
        let res = state.run(&mut self);
        state.fetch = None; // stops the fetch thread
        if let Some(s) = &mut state.spool
            && let Err(e) = s.sync(Instant::now())
        {
            log::warn!("{e}");
        }
        res?;
        let Loop {
            client,
            settled,
            failure,
            held,
            held_dropped,
            ..
        } = state;
        if !held.is_empty() {
            log::warn!(
                "{} sample(s) the spool never took are lost (never reported)",
                held.len()
            );
        }
        if client.state() == ClientState::Failed {
            let reason =
                failure.unwrap_or_else(|| DisconnectReason::HandshakeFailed("unknown".into()));
            return Err(DriverError::ClientFailed(reason));
        }
        Ok(ClientSummary {
            client_id: client.client_id().to_owned(),
            stats: client.stats(),
            settled,
            unacknowledged: client.queued(),
            dropped: client.dropped() + held_dropped,
            unspooled: held.len(),
        })
    }
}

/// The loop's state besides the driver's sources.
struct Loop<'h> {
    client: Client,
    /// The fetch thread (until the client closes).
    fetch: Option<Fetcher>,
    /// Where samples are persisted before they are sent.
    spool: Option<Spool>,
    /// The last spool operation failed (warned once until one succeeds).
    spool_failing: bool,
    /// Samples the spool could not take yet, oldest first: not reported
    /// until it does.
    held: VecDeque<(Sample, usize)>,
    /// The held samples' bytes (each at [`Sample::held_bytes`]).
    held_bytes: usize,
    /// Most samples held (the queue's limit).
    held_limit: usize,
    /// Most bytes held (the queue's byte limit).
    held_limit_bytes: usize,
    /// Held samples dropped because too many were held.
    held_dropped: u64,
    /// The spool refused the oldest held sample (warned once until it
    /// takes it).
    holding: bool,
    /// When to write the held samples again.
    retry_at: Option<Instant>,
    handler: &'h mut dyn FnMut(&ClientEvent, &Client),
    settled: u64,
    /// This run's samples settled (as reports or dropped before), towards
    /// `count`.
    counted: u64,
    /// The first seq of this run (those below were restored from the spool).
    counted_from: Seq,
    /// [`ClientOptions::count`].
    count: Option<u64>,
    closing_since: Option<Instant>,
    failure: Option<DisconnectReason>,
    /// The datagram being sent.
    out: Vec<u8>,
    /// The datagram being read.
    buf: Vec<u8>,
    /// When the next summary line is due (`None`: info logs are off).
    next_summary: Option<Instant>,
    /// Acknowledged reports at the last summary line.
    last_acked: u64,
    /// Lookups of the server's name (with a [`ServerLookup`]).
    lookups: Option<Lookups>,
    /// The last lookup failed (warned once until one succeeds).
    lookup_failing: bool,
    /// Where the next attempt goes: the last lookup's choice, else the
    /// configured address.
    target: Option<SocketAddr>,
    /// The current attempt's handshake completed.
    connected: bool,
    /// The last attempt's handshake had completed when it ended (a lookup
    /// keeps its address then, rather than trying the next one).
    last_attempt_connected: bool,
    /// Addresses a socket could not be made for (warned once each).
    socket_warned: std::collections::HashSet<SocketAddr>,
}

impl Loop<'_> {
    /// The line logged every [`SUMMARY_EVERY`]; returns the acked count
    /// (the reports lost to a reused seq, answered `duplicate`, not
    /// among them).
    fn summary(&self, last_acked: u64) -> u64 {
        let c = &self.client;
        let s = c.stats();
        let acked = s.acknowledged_kept();
        let rtt = c
            .rtt()
            .map_or_else(|| "-".into(), |r| format!("{:.1}ms", r.as_secs_f64() * 1e3));
        log::info!(
            "summary: {:?}, {} acknowledged (+{} in {}s), {} queued, {} dropped, rtt {rtt}, {} connection(s) ({} resumed, {} with 0-RTT)",
            c.state(),
            acked,
            acked.saturating_sub(last_acked),
            SUMMARY_EVERY.as_secs(),
            c.queued(),
            c.dropped(),
            s.connections,
            s.resumed,
            s.early_data_accepted,
        );
        acked
    }

    fn run(&mut self, d: &mut ClientDriver) -> Result<(), DriverError> {
        // Client::new started the first attempt: send it.
        self.drain_core(d, Instant::now());
        if d.opts.count == Some(0) {
            self.close_client(Instant::now(), "count reached");
            self.drain_core(d, Instant::now());
        }
        event_loop::run(self, d)
    }

    /// Queues a sample for the core (dropped once closing); with a spool,
    /// only once it is in the spool, after the samples held before it.
    fn submit(&mut self, now: Instant, sample: Sample) {
        if self.closing_since.is_some() {
            return;
        }
        if self.spool.is_none() {
            let seq = self.client.submit(now, sample);
            log::debug!("sample queued as seq {seq}");
            return;
        }
        let bytes = sample.held_bytes();
        self.held.push_back((sample, bytes));
        self.held_bytes += bytes;
        let (limit, limit_bytes) = (self.held_limit, self.held_limit_bytes);
        while self.held.len() > 1 && (self.held.len() > limit || self.held_bytes > limit_bytes) {
            self.pop_held();
            self.held_dropped += 1;
            log::warn!(
                "a sample the spool could not take was dropped and lost ({} so far; at most {limit} samples and {limit_bytes} bytes are held)",
                self.held_dropped
            );
            self.settle(now);
        }
        if self.retry_at.is_none() {
            self.spool_held(now);
        }
    }

    /// The oldest held sample, no longer held.
    fn pop_held(&mut self) -> Option<Sample> {
        let (sample, bytes) = self.held.pop_front()?;
        self.held_bytes -= bytes;
        Some(sample)
    }

    /// Writes the held samples to the spool, oldest first, and queues each
    /// one that is in it for the core; on a failure the rest wait for the
    /// next retry.
    fn spool_held(&mut self, now: Instant) {
        self.retry_at = None;
        while let Some((sample, _)) = self.held.front() {
            let Some(spool) = &mut self.spool else {
                return;
            };
            let seq = self.client.next_seq();
            match spool.append(now, seq, sample) {
                Ok(()) => {}
                Err(e @ crate::spool::SpoolError::TooLarge { .. }) => {
                    // Never storable: dropped, so the samples behind it go on.
                    self.pop_held();
                    self.held_dropped += 1;
                    log::error!("{e}; the sample is dropped and lost");
                    self.settle(now);
                    continue;
                }
                Err(e) => {
                    self.retry_at = Some(now + SPOOL_RETRY);
                    if self.holding {
                        log::debug!("{e}: {} sample(s) held back", self.held.len());
                    } else {
                        self.holding = true;
                        log::warn!(
                            "{e}: {} sample(s) held back, not reported until they are in the spool (retrying every {}s; at most {} are held, then the oldest is dropped)",
                            self.held.len(),
                            SPOOL_RETRY.as_secs(),
                            self.held_limit
                        );
                    }
                    return;
                }
            }
            let Some(sample) = self.pop_held() else {
                break;
            };
            let queued = self.client.submit(now, sample);
            debug_assert_eq!(queued, seq, "the spool and the core agree on the seq");
            log::debug!("sample spooled and queued as seq {seq}");
            if self.holding {
                self.holding = false;
                log::info!(
                    "the spool takes samples again: the held ones are written and reported, oldest first"
                );
            }
        }
    }

    /// Logs a spool failure once until the spool works again.
    fn spool_result(&mut self, res: Result<(), crate::spool::SpoolError>, then: &str) {
        match res {
            Ok(()) if self.spool_failing => {
                self.spool_failing = false;
                log::info!("the spool works again");
            }
            Ok(()) => {}
            Err(e) if !self.spool_failing => {
                self.spool_failing = true;
                log::warn!("{e}{then}");
            }
            Err(e) => log::debug!("{e}"),
        }
    }

    /// Reads datagrams into the core until WouldBlock or the budget is
    /// spent. Returns whether datagrams may be left.
    fn read(&mut self, d: &mut ClientDriver, now: Instant) -> bool {
        let buf = &mut self.buf;
        let local = d.io.local_addr();
        for _ in 0..RECV_BUDGET {
            match d.io.recv(buf) {
                Ok(None) => return false,
                Ok(Some(Recv::Datagram { len, from })) => {
                    if let Err(e) = self
                        .client
                        .handle_datagram(now, from, local, &mut buf[..len])
                    {
                        log::debug!("datagram of {len} bytes from {from} dropped: {e}");
                    }
                }
                Ok(Some(Recv::Unreachable(e))) => {
                    log::debug!("server unreachable: {e}");
                    self.client.handle_unreachable(now);
                }
                Err(e) => {
                    log::warn!("receiving on the UDP socket: {e}");
                    return false;
                }
            }
        }
        true
    }

    /// Hands the core's events to the handler, sends every datagram it
    /// has, then events again until a drain of events after the transmits
    /// finds none: the core's contract (the crate docs of `quic_report_core`).
    fn drain_core(&mut self, d: &mut ClientDriver, now: Instant) {
        self.handle_events(now);
        loop {
            while let Some(t) = self.client.poll_transmit(now, &mut self.out) {
                if d.io
                    .send(d.sources.poll.registry(), &self.out[..t.len], t.to)
                    == Sent::Unreachable
                {
                    self.client.handle_unreachable(now);
                }
            }
            if !self.handle_events(now) {
                return;
            }
        }
    }

    /// A new socket for the attempt about to start, connected to
    /// [`Loop::target`], and the path that goes with it for the core. Called
    /// right before the attempt (the old socket has sent all the last
    /// connection had to say). Making one can fail (no file descriptors
    /// left; an address this host cannot use, such as IPv6 where it is
    /// disabled): warned once per address, and the attempt goes out on the
    /// old socket and path.
    fn new_socket(&mut self, d: &mut ClientDriver) {
        // No address yet: the placeholder stays, as does the core's path.
        let Some(server) = self.target else {
            return;
        };
        let io = match UdpIo::connect(server, d.sources.poll.registry(), SOCKET) {
            Ok(io) => io,
            Err(e) => {
                if self.socket_warned.len() >= MAX_SOCKET_WARNED {
                    self.socket_warned.clear();
                }
                if self.socket_warned.insert(server) {
                    log::warn!("{e}: the attempt goes out on the old socket");
                } else {
                    log::debug!("{e}");
                }
                return;
            }
        };
        log::debug!("next attempt from {} to {server}", io.local_addr());
        let mut old = std::mem::replace(&mut d.io, io);
        old.deregister(d.sources.poll.registry());
        self.client.set_path(d.io.local_addr(), self.target);
    }

    /// Takes a lookup's answer: the address the next attempt goes to (its
    /// new socket is made when it starts).
    fn on_lookup(&mut self, answer: std::io::Result<Vec<SocketAddr>>) {
        let Some(name) = self.lookups.as_ref().map(|l| l.name().to_owned()) else {
            return;
        };
        let addrs = match answer {
            Ok(addrs) => addrs,
            Err(e) => {
                let keeping = self
                    .target
                    .map_or_else(|| "no address yet".to_owned(), |a| format!("keeping {a}"));
                if !std::mem::replace(&mut self.lookup_failing, true) {
                    log::warn!(
                        "cannot look up the server {name}: {e} ({keeping}; looked up again at each reconnect)"
                    );
                } else {
                    log::debug!("cannot look up the server {name}: {e} ({keeping})");
                }
                return;
            }
        };
        let next = lookup::next_address(&addrs, self.target, !self.last_attempt_connected);
        if std::mem::take(&mut self.lookup_failing) {
            log::info!("the server {name} resolves again: {next}");
        } else if self.target.is_none_or(|t| !addrs.contains(&t)) {
            log::info!(
                "the server {name} is at {next}{}",
                self.target
                    .map_or_else(String::new, |t| format!(" (was {t})"))
            );
        }
        self.target = Some(next);
    }

    /// Hands every event of the core to the handler; false if there were none.
    fn handle_events(&mut self, now: Instant) -> bool {
        let mut any = false;
        while let Some(ev) = self.client.poll_event() {
            any = true;
            self.on_event(&ev, now);
            (self.handler)(&ev, &self.client);
        }
        any
    }

    fn on_event(&mut self, ev: &ClientEvent, now: Instant) {
        log::debug!("client event: {ev:?}");
        match ev {
            ClientEvent::Acknowledged { seq, .. }
            | ClientEvent::Rejected { seq, .. }
            | ClientEvent::ReportDropped { seq } => {
                if let Some(s) = &mut self.spool {
                    let res = s.remove(*seq);
                    self.spool_result(
                        res,
                        " (marking a report done; after a restart it is sent again, and the server answers it as a duplicate)",
                    );
                }
                if *seq >= self.counted_from {
                    self.settle(now);
                } else {
                    self.settled += 1;
                }
            }
            ClientEvent::Failed { reason } => self.failure = Some(reason.clone()),
            ClientEvent::Connecting { .. } => self.connected = false,
            ClientEvent::Connected { .. } => self.connected = true,
            ClientEvent::Disconnected { .. } => self.last_attempt_connected = self.connected,
            ClientEvent::ReconnectScheduled { .. } => {
                if let Some(l) = &mut self.lookups {
                    l.start(now);
                }
            }
            _ => {}
        }
    }

    /// One more of this run's samples settled (its report, or itself
    /// dropped); closes the client once `count` are.
    fn settle(&mut self, now: Instant) {
        self.settled += 1;
        self.counted += 1;
        if self.count.is_some_and(|n| self.counted >= n) && self.closing_since.is_none() {
            self.close_client(now, "count reached");
        }
    }

    fn close_client(&mut self, now: Instant, why: &str) {
        log::debug!("closing the client: {why}");
        self.closing_since = Some(now);
        self.client.close(now);
    }
}

impl Steps for Loop<'_> {
    type Driver = ClientDriver;
    const EVENTS: usize = 64;

    fn sources(d: &mut ClientDriver) -> &mut Sources {
        &mut d.sources
    }

    fn grace(d: &ClientDriver) -> Duration {
        d.opts.close_grace
    }

    fn core_deadline(&self) -> Option<Instant> {
        self.client.poll_timeout()
    }

    /// Logs the summary line when due; wakes for the next one and the
    /// spool's deferred fsync.
    fn wait(&mut self, _: &mut ClientDriver, now: Instant, wait: Wait) -> Wait {
        if let Some(next) = self.next_summary
            && now >= next
        {
            self.last_acked = self.summary(self.last_acked);
            self.next_summary = Some(now + SUMMARY_EVERY);
        }
        wait.until(self.next_summary)
            .until(self.spool.as_ref().and_then(Spool::poll_timeout))
            .until(self.retry_at)
            .until(self.fetch.as_ref().and_then(Fetcher::restart_due))
    }

    fn on_writable(&mut self, d: &mut ClientDriver, now: Instant) {
        if d.io.flush(d.sources.poll.registry()) {
            self.client.handle_unreachable(now);
        }
    }

    fn on_readable(&mut self, d: &mut ClientDriver, now: Instant) -> bool {
        self.read(d, now)
    }

    /// Submits the samples the fetch thread (or a [`SampleSender`]) sent,
    /// and takes a lookup's answer.
    fn on_wake(&mut self, d: &mut ClientDriver, now: Instant) {
        while let Ok(sample) = d.samples_rx.try_recv() {
            self.submit(now, sample);
        }
        if let Some(f) = &mut self.fetch {
            f.restart_if_dead(now);
        }
        if let Some(answer) = self.lookups.as_mut().and_then(Lookups::poll) {
            self.on_lookup(answer);
        }
    }

    fn close(&mut self, _: &mut ClientDriver, now: Instant, why: &str) {
        self.close_client(now, why);
    }

    fn closing_since(&self) -> Option<Instant> {
        self.closing_since
    }

    /// The retry of held samples, the spool's deferred fsync, then the
    /// core's deadline.
    fn on_deadline(&mut self, d: &mut ClientDriver, now: Instant, core_due: bool) {
        if let Some(f) = &mut self.fetch {
            f.restart_if_dead(now);
        }
        if self.retry_at.is_some_and(|t| t <= now) {
            self.spool_held(now);
        }
        if let Some(s) = &mut self.spool
            && let Err(e) = s.handle_timeout(now)
        {
            self.spool_result(Err(e), " (a power loss may lose the last samples)");
        }
        if core_due {
            if self.client.state() == ClientState::Waiting && self.closing_since.is_none() {
                // The backoff is over (Waiting is only ever a reconnect's
                // wait): the attempt starts in this call, on a new socket.
                self.new_socket(d);
            }
            self.client.handle_timeout(now);
        }
    }

    /// The core's contract, then the fetch thread stops once closing.
    fn drain(&mut self, d: &mut ClientDriver, now: Instant) -> Result<(), DriverError> {
        self.drain_core(d, now);
        if self.closing_since.is_some() {
            self.fetch = None; // stops the fetch thread
        }
        Ok(())
    }

    fn done(&mut self, _: &mut ClientDriver) -> bool {
        self.client.is_finished()
    }

    fn closes(&self) -> String {
        "the connection".into()
    }

    fn deadline_name(&self) -> String {
        format!("core deadline {:?}", self.client.deadline().map(|d| d.kind))
    }
}

/// A socket for the first of `candidates` one can be made for (an address
/// of a family this host has, say), and that address; `None` when there
/// are none, else the first error when none works.
fn first_socket(
    candidates: &[SocketAddr],
    sources: &Sources,
) -> Option<Result<(UdpIo, SocketAddr), DriverError>> {
    let mut first_error = None;
    for &server in candidates {
        match UdpIo::connect(server, sources.poll.registry(), SOCKET) {
            Ok(io) => return Some(Ok((io, server))),
            Err(e) => {
                log::debug!("{e}: trying the next address");
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map(Err)
}

/// Opens the spool and makes the client's id its own.
fn open_spool(opts: &SpoolOptions, client_id: &mut Option<String>) -> Result<Spool, DriverError> {
    let mut seed_err = None;
    let spool = Spool::open(opts, || match client_id.clone() {
        Some(id) => id,
        None => match os_seed() {
            Ok(seed) => hex::encode(&seed[..8]),
            Err(e) => {
                seed_err = Some(e);
                String::new()
            }
        },
    });
    if let Some(e) = seed_err {
        return Err(e);
    }
    let spool = spool?;
    if let Some(id) = client_id.as_deref()
        && id != spool.client_id()
    {
        return Err(crate::spool::SpoolError::OtherClient {
            dir: opts.dir.clone(),
            found: spool.client_id().to_owned(),
            configured: id.to_owned(),
        }
        .into());
    }
    let r = spool.recovery();
    if let Some((at, bytes)) = r.skipped {
        let kept = match (&r.kept, &r.kept_later) {
            (Some(k), _) => format!(", moved to {} (not sent)", k.display()),
            (None, Some(why)) => format!(
                ", left at the end of the log for now ({why}): it is moved aside before the \
                 next sample is spooled, and until there is room for it new samples are held \
                 back as on a full disk"
            ),
            (None, None) => String::new(),
        };
        let afresh = match (r.created, client_id.is_some()) {
            (true, false) => {
                " The client id was among them: this spool starts afresh under a new one."
            }
            (true, true) => {
                " The client id was among them: this spool starts afresh, under --client-id."
            }
            (false, _) => "",
        };
        if r.torn {
            log::warn!(
                "spool {}: {bytes} byte(s) from offset {at} look like a record torn at the end (a \
                 crash or power loss mid-write): skipped{kept}; seqs go on past anything they \
                 name.{afresh}",
                opts.dir.display()
            );
        } else {
            log::error!(
                "spool {}: the record at offset {at} is corrupt: the {bytes} byte(s) from there on \
                 (it and the records after it) are skipped{kept}; seqs go on past anything they \
                 name.{afresh}",
                opts.dir.display()
            );
        }
    }
    if r.created {
        log::info!(
            "spool {}: new, client id {}, seqs from {}",
            opts.dir.display(),
            spool.client_id(),
            spool.next_seq()
        );
    } else {
        log::info!(
            "spool {}: client id {}, next seq {}",
            opts.dir.display(),
            spool.client_id(),
            spool.next_seq()
        );
    }
    *client_id = Some(spool.client_id().to_owned());
    Ok(spool)
}
