//! The QUIC modes of `quic-report-bench` (reports, handshakes, idle
//! connections): C [`Client`] cores, each on its own connected UDP socket,
//! in one mio loop (read every datagram, `handle_timeout` when due, drain).
//!
//! It drains transmits before events, the one loop that does not keep the
//! core's stated order (the crate docs of `quic_report_core`), on purpose:
//! the generator submits the next report when it handles an
//! acknowledgement, which a real client never does (its reports come from
//! the fetch timer). Sending first keeps that next report out of the packet
//! that ACKs the answer, so each report travels as a real client's does,
//! and the figures stay comparable with earlier runs.
//!
//! The generator uses the real client core rather than raw quiche: it costs
//! the generator some CPU (a `serde_json` map per sample, a parse per
//! answer), but each report then travels exactly as a real client sends it
//! (a fresh stream per report, the same fields, the same flow control).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use quic_report_core::{
    Client, ClientConfig, ClientEvent, CoreRng, DebugLogs, MAX_DATAGRAM_SIZE, Response, Sample, Seq,
};
use quic_report_mio::debuglog::EnvDebugLogs;
use quic_report_mio::fetch::unix_ms;
use quic_report_mio::show;
use quic_report_mio::turn::{self, Wait};
use serde_json::{Map, Value};

use super::{BenchArgs, CpuSample, Error, Latencies, Target, rss_kb};

/// The fields of an echoed report the generator checks (one typed parse;
/// the rest of the object is skipped).
#[derive(serde::Deserialize)]
struct Echo<'a> {
    seq: Option<u64>,
    value: Option<u64>,
    #[serde(borrow)]
    client: Option<std::borrow::Cow<'a, str>>,
}

/// Handshakes in progress at once while opening idle connections.
const IDLE_OPEN_CONCURRENCY: usize = 32;
/// How long the idle connections settle before memory is read.
const IDLE_SETTLE: Duration = Duration::from_millis(300);
/// Longest wait for the CONNECTION_CLOSEs at the end.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Reports,
    Handshakes,
    Idle(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Opening connections; nothing is counted.
    Opening,
    /// Load applied, not counted.
    Warmup {
        until: Instant,
    },
    /// Counted.
    Measure {
        until: Instant,
    },
    /// Idle mode: every connection is up and answered; memory is read then.
    Settle {
        until: Instant,
    },
    /// Idle mode: connections held open.
    Hold {
        until: Instant,
    },
    /// Closing every connection.
    Closing {
        until: Instant,
    },
    Done,
}

struct Slot {
    sock: UdpSocket,
    local: SocketAddr,
    client: Client,
    /// Datagrams the socket would not take yet.
    held: VecDeque<Vec<u8>>,
    writable: bool,
    /// Submitted and not answered: seq, the value sent, when.
    pending: VecDeque<(Seq, u64, Instant)>,
    next_value: u64,
    connected_once: bool,
    /// Handshake mode: when this connection's cycle started.
    cycle_start: Instant,
    answered: bool,
    closed: bool,
    dirty: bool,
}

struct Gen<'a> {
    args: &'a BenchArgs,
    target: &'a Target,
    mode: Mode,
    poll: Poll,
    slots: Vec<Slot>,
    rng: CoreRng,
    /// SSLKEYLOGFILE / QLOGDIR, for every connection.
    debug_logs: Option<EnvDebugLogs>,
    out: Vec<u8>,
    buf: Vec<u8>,
    dirty: Vec<usize>,
    phase: Phase,
    /// Connections whose first handshake completed.
    established: usize,
    /// Idle mode: connections whose report was answered.
    answered: usize,
    // Counted while measuring.
    measure_start: Option<Instant>,
    measure_end: Option<Instant>,
    ops: u64,
    errors: u64,
    lat: Latencies,
    dgrams_out: u64,
    dgrams_in: u64,
    cpu_start: Option<CpuSample>,
    cpu_end: Option<CpuSample>,
    // Idle mode memory, KiB.
    server_rss_before: Option<u64>,
    own_rss_before: Option<u64>,
    server_rss_after: Option<u64>,
    own_rss_after: Option<u64>,
}

pub(super) fn run(args: &BenchArgs, target: &Target) -> Result<(), Error> {
    let mode = if args.handshakes {
        Mode::Handshakes
    } else if let Some(n) = args.idle_connections {
        Mode::Idle(n as usize)
    } else {
        Mode::Reports
    };
    let seed: [u8; 32] = rand::random();
    let mut g = Gen {
        args,
        target,
        mode,
        poll: Poll::new()?,
        slots: Vec::new(),
        rng: CoreRng::from_seed_bytes(seed),
        debug_logs: EnvDebugLogs::from_env()?,
        out: vec![0u8; MAX_DATAGRAM_SIZE],
        buf: vec![0u8; 65535],
        dirty: Vec::new(),
        phase: Phase::Opening,
        established: 0,
        answered: 0,
        measure_start: None,
        measure_end: None,
        ops: 0,
        errors: 0,
        lat: Latencies::default(),
        dgrams_out: 0,
        dgrams_in: 0,
        cpu_start: None,
        cpu_end: None,
        server_rss_before: args.server_pid.and_then(rss_kb),
        own_rss_before: rss_kb(std::process::id()),
        server_rss_after: None,
        own_rss_after: None,
    };
    g.run()?;
    g.report();
    Ok(())
}

impl Gen<'_> {
    fn total(&self) -> usize {
        match self.mode {
            Mode::Idle(n) => n,
            _ => self.args.connections as usize,
        }
    }

    fn measuring(&self) -> bool {
        matches!(self.phase, Phase::Measure { .. })
    }

    fn loading(&self) -> bool {
        matches!(self.phase, Phase::Warmup { .. } | Phase::Measure { .. })
    }

    fn new_client(&mut self, local: SocketAddr, now: Instant) -> Result<Client, Error> {
        let mut cfg = ClientConfig::new(self.target.server, local, self.target.verify.clone());
        cfg.server_name = self.target.server_name.clone();
        cfg.client_cert = self.target.client_cert.clone();
        cfg.max_in_flight = self.args.in_flight as usize;
        cfg.queue_limit = self.args.in_flight as usize * 4 + 64;
        // A loaded (or valgrind-slowed) server may take a while to answer.
        cfg.connect_timeout = Duration::from_secs(5);
        cfg.response_timeout = Duration::from_secs(10);
        let logs = self
            .debug_logs
            .clone()
            .map(|l| Box::new(l) as Box<dyn DebugLogs>);
        Ok(Client::with_debug_logs(cfg, self.rng.fork(), now, logs)?)
    }

    fn open_slot(&mut self, now: Instant) -> Result<(), Error> {
        let i = self.slots.len();
        let any: SocketAddr = if self.target.server.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let mut sock = UdpSocket::bind(any)?;
        sock.connect(self.target.server)?;
        let local = sock.local_addr()?;
        self.poll
            .registry()
            .register(&mut sock, Token(i), Interest::READABLE)?;
        let client = self.new_client(local, now)?;
        self.slots.push(Slot {
            sock,
            local,
            client,
            held: VecDeque::new(),
            writable: false,
            pending: VecDeque::new(),
            next_value: 1,
            connected_once: false,
            cycle_start: now,
            answered: false,
            closed: false,
            dirty: false,
        });
        self.mark(i);
        Ok(())
    }

    fn mark(&mut self, i: usize) {
        if !self.slots[i].dirty {
            self.slots[i].dirty = true;
            self.dirty.push(i);
        }
    }

    fn run(&mut self) -> Result<(), Error> {
        let mut events = Events::with_capacity(1024);
        let start = Instant::now();
        let first = match self.mode {
            Mode::Idle(n) => n.min(IDLE_OPEN_CONCURRENCY),
            _ => self.total(),
        };
        for _ in 0..first {
            self.open_slot(start)?;
        }
        loop {
            let now = Instant::now();
            self.service(now)?;
            self.advance(now)?;
            if self.phase == Phase::Done {
                return Ok(());
            }
            let wait = self.slots.iter().fold(
                Wait::new(Instant::now(), self.phase_deadline(), Duration::ZERO),
                |w, s| w.until(s.client.poll_timeout()),
            );
            if !turn::poll(&mut self.poll, &mut events, wait)? {
                continue;
            }
            let now = Instant::now();
            for ev in events.iter() {
                let i = ev.token().0;
                if i >= self.slots.len() {
                    continue;
                }
                if ev.is_writable() {
                    self.flush_held(i, now);
                }
                if ev.is_readable() || ev.is_error() {
                    self.read(i, now);
                }
            }
        }
    }

    fn phase_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Warmup { until }
            | Phase::Measure { until }
            | Phase::Settle { until }
            | Phase::Hold { until }
            | Phase::Closing { until } => Some(until),
            Phase::Opening | Phase::Done => None,
        }
    }

    /// Timers, then drains every connection touched.
    fn service(&mut self, now: Instant) -> Result<(), Error> {
        for i in 0..self.slots.len() {
            if self.slots[i]
                .client
                .poll_timeout()
                .is_some_and(|t| t <= now)
            {
                self.slots[i].client.handle_timeout(now);
                self.mark(i);
            }
        }
        while let Some(i) = self.dirty.pop() {
            self.slots[i].dirty = false;
            self.drain(i, now)?;
        }
        Ok(())
    }

    fn read(&mut self, i: usize, now: Instant) {
        let server = self.target.server;
        let measuring = self.measuring();
        loop {
            let slot = &mut self.slots[i];
            match slot.sock.recv(&mut self.buf) {
                Ok(n) => {
                    if measuring {
                        self.dgrams_in += 1;
                    }
                    let local = slot.local;
                    // Datagrams of a connection we already closed are refused; fine.
                    let _ = slot
                        .client
                        .handle_datagram(now, server, local, &mut self.buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    log::warn!("connection {i}: server unreachable");
                    slot.client.handle_unreachable(now);
                    self.errors += 1;
                    break;
                }
                Err(e) => {
                    log::warn!("connection {i}: receive: {e}");
                    break;
                }
            }
        }
        self.mark(i);
    }

    fn send(&mut self, i: usize, len: usize, now: Instant) {
        let slot = &mut self.slots[i];
        if !slot.held.is_empty() {
            slot.held.push_back(self.out[..len].to_vec());
            return;
        }
        match slot.sock.send(&self.out[..len]) {
            Ok(_) => {
                if matches!(self.phase, Phase::Measure { .. }) {
                    self.dgrams_out += 1;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                slot.held.push_back(self.out[..len].to_vec());
                if !slot.writable {
                    slot.writable = true;
                    let _ = self.poll.registry().reregister(
                        &mut slot.sock,
                        Token(i),
                        Interest::READABLE | Interest::WRITABLE,
                    );
                }
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                slot.client.handle_unreachable(now);
                self.errors += 1;
            }
            Err(e) => log::debug!("connection {i}: send: {e}"),
        }
    }

    fn flush_held(&mut self, i: usize, now: Instant) {
        let slot = &mut self.slots[i];
        while let Some(d) = slot.held.front() {
            match slot.sock.send(d) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    slot.client.handle_unreachable(now);
                }
                Err(_) => {}
            }
            slot.held.pop_front();
        }
        slot.writable = false;
        let _ = self
            .poll
            .registry()
            .reregister(&mut slot.sock, Token(i), Interest::READABLE);
        self.mark(i);
    }

    /// Transmits, then events, until the client has neither (see the module
    /// docs for why not events first).
    fn drain(&mut self, i: usize, now: Instant) -> Result<(), Error> {
        loop {
            while let Some(t) = self.slots[i].client.poll_transmit(now, &mut self.out) {
                self.send(i, t.len, now);
            }
            let mut any = false;
            while let Some(ev) = self.slots[i].client.poll_event() {
                any = true;
                self.on_event(i, ev, now)?;
            }
            if !any {
                return Ok(());
            }
        }
    }

    fn submit(&mut self, i: usize, now: Instant) {
        let slot = &mut self.slots[i];
        let value = slot.next_value;
        slot.next_value += 1;
        let mut fields = Map::new();
        fields.insert("value".into(), Value::from(value));
        let sampled_at_ms = unix_ms();
        let seq = slot.client.submit(
            now,
            Sample {
                fields,
                sampled_at_ms,
            },
        );
        // The clock, not the loop's `now`: see `Latencies`.
        slot.pending.push_back((seq, value, Instant::now()));
    }

    fn on_event(&mut self, i: usize, ev: ClientEvent, now: Instant) -> Result<(), Error> {
        let failed = match &ev {
            ClientEvent::Rejected { .. }
            | ClientEvent::Retrying { .. }
            | ClientEvent::ReportDropped { .. } => true,
            ClientEvent::Disconnected { .. } => !matches!(self.phase, Phase::Closing { .. }),
            _ => false,
        };
        if failed {
            let line = show::client_event(&ev, &self.slots[i].client.stats());
            log::warn!("connection {i}: {}", line.text());
            self.errors += 1;
        }
        match ev {
            ClientEvent::Connected { .. } => {
                if !self.slots[i].connected_once {
                    self.slots[i].connected_once = true;
                    self.established += 1;
                }
                match self.mode {
                    Mode::Reports => {} // the warm-up submits once all are up
                    Mode::Handshakes if self.loading() || self.phase == Phase::Opening => {
                        self.submit(i, now);
                    }
                    Mode::Idle(_)
                        if self.slots[i].pending.is_empty() && !self.slots[i].answered =>
                    {
                        self.submit(i, now);
                    }
                    _ => {}
                }
            }
            ClientEvent::Acknowledged {
                seq,
                duplicate,
                response,
            } => {
                let slot = &mut self.slots[i];
                let found = slot
                    .pending
                    .iter()
                    .position(|(s, _, _)| *s == seq)
                    .and_then(|p| slot.pending.remove(p));
                let ok = match (&found, &response) {
                    (Some((_, value, _)), Response::Ok { received, .. }) => {
                        !duplicate
                            && serde_json::from_str::<Echo>(received).is_ok_and(|e| {
                                e.seq == Some(seq)
                                    && e.value == Some(*value)
                                    && e.client.as_deref() == Some(slot.client.client_id())
                            })
                    }
                    _ => false,
                };
                if !ok {
                    log::warn!(
                        "connection {i}: answer to seq {seq} does not echo its report \
                         (duplicate={duplicate}): {response:?}"
                    );
                    self.errors += 1;
                }
                match self.mode {
                    Mode::Reports => {
                        if ok && self.measuring() {
                            self.ops += 1;
                            if let Some((_, _, at)) = found {
                                self.lat.push(at.elapsed());
                            }
                        }
                        if self.loading() {
                            self.submit(i, now);
                        }
                    }
                    Mode::Handshakes => {
                        self.slots[i].client.close(now);
                    }
                    Mode::Idle(_) => {
                        if !self.slots[i].answered {
                            self.slots[i].answered = true;
                            self.answered += 1;
                        }
                    }
                }
            }
            ClientEvent::Rejected { seq, .. } => {
                self.slots[i].pending.retain(|(s, _, _)| *s != seq);
                if self.mode == Mode::Reports && self.loading() {
                    self.submit(i, now);
                }
            }
            ClientEvent::Closed => {
                self.slots[i].closed = true;
                if self.mode == Mode::Handshakes && (self.loading() || self.phase == Phase::Opening)
                {
                    if self.measuring() {
                        self.ops += 1;
                        self.lat.push(now.duration_since(self.slots[i].cycle_start));
                    }
                    // The next cycle: a fresh client (no session ticket, so
                    // a full handshake) on the same socket.
                    let local = self.slots[i].local;
                    let client = self.new_client(local, now)?;
                    let slot = &mut self.slots[i];
                    slot.client = client;
                    slot.cycle_start = now;
                    slot.pending.clear();
                    slot.next_value = 1;
                    slot.closed = false;
                }
            }
            ClientEvent::Failed { reason } => {
                return Err(format!("connection {i} failed: {reason}").into());
            }
            _ => {}
        }
        Ok(())
    }

    /// Moves between phases.
    fn advance(&mut self, now: Instant) -> Result<(), Error> {
        let count_reached = self.args.count.is_some_and(|n| self.ops >= n);
        match self.phase {
            Phase::Opening => match self.mode {
                Mode::Reports | Mode::Handshakes => {
                    let ready = match self.mode {
                        Mode::Reports => self.established == self.total(),
                        _ => self.established >= self.total(),
                    };
                    if ready {
                        log::info!("{} connection(s) established", self.established);
                        self.phase = Phase::Warmup {
                            until: now + self.args.warmup,
                        };
                        if self.mode == Mode::Reports {
                            for i in 0..self.slots.len() {
                                for _ in 0..self.args.in_flight {
                                    self.submit(i, now);
                                }
                                self.mark(i);
                            }
                            self.service(now)?;
                        }
                    }
                }
                Mode::Idle(n) => {
                    // Keep IDLE_OPEN_CONCURRENCY handshakes in progress.
                    let in_progress = self.slots.len() - self.answered;
                    let want = (IDLE_OPEN_CONCURRENCY.saturating_sub(in_progress))
                        .min(n - self.slots.len());
                    for _ in 0..want {
                        self.open_slot(now)?;
                    }
                    if want > 0 {
                        self.service(now)?;
                    }
                    if self.answered == n {
                        log::info!("{n} idle connection(s) open, one report each");
                        self.phase = Phase::Settle {
                            until: now + IDLE_SETTLE,
                        };
                    }
                }
            },
            Phase::Warmup { until } if until <= now => {
                self.phase = Phase::Measure {
                    until: now + self.args.duration,
                };
                self.measure_start = Some(now);
                self.cpu_start = Some(CpuSample::take(
                    self.args.server_pid,
                    &self.args.database_pids,
                ));
            }
            Phase::Measure { until } if until <= now || count_reached => {
                self.measure_end = Some(now);
                self.cpu_end = Some(CpuSample::take(
                    self.args.server_pid,
                    &self.args.database_pids,
                ));
                self.close_all(now)?;
            }
            Phase::Settle { until } if until <= now => {
                self.server_rss_after = self.args.server_pid.and_then(rss_kb);
                self.own_rss_after = rss_kb(std::process::id());
                self.phase = Phase::Hold {
                    until: now + self.args.hold,
                };
            }
            Phase::Hold { until } if until <= now => self.close_all(now)?,
            Phase::Closing { until } if until <= now || self.slots.iter().all(|s| s.closed) => {
                self.phase = Phase::Done;
            }
            _ => {}
        }
        Ok(())
    }

    fn close_all(&mut self, now: Instant) -> Result<(), Error> {
        self.phase = Phase::Closing {
            until: now + CLOSE_GRACE,
        };
        for i in 0..self.slots.len() {
            if !self.slots[i].closed {
                self.slots[i].client.close(now);
                self.mark(i);
            }
        }
        self.service(now)
    }

    /// Prints the result line (stdout) and the detail line (stderr).
    fn report(&mut self) {
        let wall = match (self.measure_start, self.measure_end) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        let rate = if wall > 0.0 {
            self.ops as f64 / wall
        } else {
            0.0
        };
        let p = self.lat.percentiles_ms(&[0.5, 0.99]);
        let ops = self.ops.max(1) as f64;
        let mut detail = format!(
            "detail: mode={} connections={} in_flight={} wall_s={wall:.3} ops={} errors={} \
             dgrams_out_per_op={:.2} dgrams_in_per_op={:.2}",
            match self.mode {
                Mode::Reports => "reports",
                Mode::Handshakes => "handshakes",
                Mode::Idle(_) => "idle",
            },
            self.total(),
            self.args.in_flight,
            self.ops,
            self.errors,
            self.dgrams_out as f64 / ops,
            self.dgrams_in as f64 / ops,
        );
        if let (Some(a), Some(b)) = (&self.cpu_start, &self.cpu_end) {
            detail.push_str(&a.detail(b, self.ops));
        }
        match self.mode {
            Mode::Reports => {
                println!(
                    "reports_per_s={rate:.1} acked={} errors={} p50_ms={:.3} p99_ms={:.3}",
                    self.ops, self.errors, p[0], p[1]
                );
            }
            Mode::Handshakes => {
                detail.push_str(&format!(" p50_ms={:.3} p99_ms={:.3}", p[0], p[1]));
                println!("handshakes_per_s={rate:.1}");
            }
            Mode::Idle(n) => {
                let per = |before: Option<u64>, after: Option<u64>| match (before, after) {
                    (Some(b), Some(a)) => (a as f64 - b as f64) / n as f64,
                    _ => f64::NAN,
                };
                let server = per(self.server_rss_before, self.server_rss_after);
                let client = per(self.own_rss_before, self.own_rss_after);
                let kb = |v: Option<u64>| v.map_or_else(|| "-".into(), |v| v.to_string());
                detail.push_str(&format!(
                    " server_rss_kb_before={} server_rss_kb_after={} client_rss_kb_before={} \
                     client_rss_kb_after={}",
                    kb(self.server_rss_before),
                    kb(self.server_rss_after),
                    kb(self.own_rss_before),
                    kb(self.own_rss_after)
                ));
                println!(
                    "idle_connections={n} server_kb_per_conn={server:.1} client_kb_per_conn={client:.1} errors={}",
                    self.errors
                );
            }
        }
        eprintln!("{detail}");
    }
}
