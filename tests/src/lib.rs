//! The simulation harness: client and server cores joined by an in-memory
//! network, on virtual time.
//!
//! [`Sim`] is a discrete-event loop: it jumps the virtual clock to the
//! earliest of every peer's `poll_timeout()`, every packet's arrival and
//! every scheduled report, delivers what is due, and drains every peer in
//! the order of the core's contract (the crate docs of `quic_report_core`:
//! events, transmits, events again until none), which is the order of the
//! production loops in `quic-report-mio`. It never sleeps, so a 30 s idle
//! timeout costs microseconds of real time. quiche's own timers follow the
//! same virtual clock (see [`clock`]).
//!
//! Same seed, same outcome: the reports recorded, every event and its
//! virtual time, and every network decision repeat. Packet bytes do not
//! (BoringSSL draws its own randomness). Every failing assertion should
//! print the seed: use [`Sim::context`].

pub mod clock;
pub mod fuzz;
pub mod net;
pub mod raw;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use quic_report_core::{
    ALPN, Client, ClientConfig, ClientEvent, CoreRng, DatagramError, GetConfig, HqGet, Outcome,
    Sample, Seq, Server, ServerConfig, ServerEvent, Verify,
};
use serde_json::{Map, Value};

pub use clock::VirtualClock;
pub use net::{Net, NetConfig};
pub use raw::RawPeer;

/// Path of a file in the repository's `certs/`.
pub fn cert_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("certs")
        .join(name)
}

/// The server's address in every simulation.
pub const SERVER_ADDR: &str = "127.0.0.1:4433";

/// A report as the simulated sink recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// `client` field.
    pub client: Option<String>,
    /// `seq` field.
    pub seq: Option<u64>,
    /// The identity it was recorded under (`""`: anonymous).
    pub identity: String,
    /// The whole object.
    pub fields: Map<String, Value>,
    /// Virtual time of the record.
    pub at: Duration,
}

/// One simulated reporting client and what it saw.
pub struct SimClient {
    /// The core.
    pub client: Client,
    /// Its address.
    pub addr: SocketAddr,
    /// Seqs submitted, in order.
    pub submitted: Vec<Seq>,
    /// Seqs acknowledged (including as duplicate), in order of arrival.
    pub acked: Vec<Seq>,
    /// Every event with its virtual time.
    pub events: Vec<(Duration, ClientEvent)>,
    schedule: Option<(Duration, Instant, usize)>,
}

impl SimClient {
    /// Why each of its connections (or attempts) ended, in order.
    pub fn disconnect_reasons(&self) -> Vec<quic_report_core::DisconnectReason> {
        self.events
            .iter()
            .filter_map(|(_, e)| match e {
                ClientEvent::Disconnected { reason } => Some(reason.clone()),
                _ => None,
            })
            .collect()
    }

    /// How many of its reports were answered `duplicate`.
    pub fn duplicate_acks(&self) -> usize {
        self.events
            .iter()
            .filter(|(_, e)| {
                matches!(
                    e,
                    ClientEvent::Acknowledged {
                        duplicate: true,
                        ..
                    }
                )
            })
            .count()
    }

    /// Whether every submitted report was acknowledged.
    pub fn all_acked(&self) -> bool {
        let acked: BTreeSet<_> = self.acked.iter().collect();
        self.schedule.is_none_or(|(_, _, left)| left == 0)
            && self.submitted.iter().all(|s| acked.contains(s))
    }
}

/// The simulated world.
pub struct Sim {
    /// The seed everything follows.
    pub seed: u64,
    /// Virtual time.
    pub clock: VirtualClock,
    /// The network.
    pub net: Net,
    /// The server, while it runs.
    pub server: Option<Server>,
    /// Its address.
    pub server_addr: SocketAddr,
    /// Config for (re)starting the server.
    pub server_cfg: ServerConfig,
    /// What the sink recorded, in order.
    pub records: Vec<Record>,
    /// While set, the sink fails every write.
    pub sink_failing: bool,
    /// While set, the sink finds every report stored already (a database
    /// whose key has it: another server recorded it) and answers
    /// [`Outcome::Duplicate`].
    pub stored_elsewhere: bool,
    /// While set, the server closes every connection as soon as it opens
    /// (an overloaded server that takes handshakes and sheds them).
    pub close_on_open: bool,
    /// The reporting clients.
    pub clients: Vec<SimClient>,
    /// Raw quiche peers (for protocol tests).
    pub raws: Vec<RawPeer>,
    /// HTTP/0.9 GETs, with their addresses.
    pub gets: Vec<(SocketAddr, HqGet)>,
    /// Every event of every peer with its virtual time, one line each.
    pub trace: Vec<String>,
    /// Every event of the server, in order.
    pub server_events: Vec<ServerEvent>,
    /// Address rewriting (a NAT): a client's local address -> the address
    /// the server sees.
    pub nat: BTreeMap<SocketAddr, SocketAddr>,
    /// Bytes the server sent, by destination address.
    pub server_sent: BTreeMap<SocketAddr, u64>,
    /// While `Some`, a copy of every datagram the network delivers to the
    /// server is kept here (e.g. to replay or mutate real packets).
    pub captured: Option<Vec<net::Packet>>,
    rng: CoreRng,
    servers_started: u64,
    buf: Vec<u8>,
    steps: u64,
}

impl Sim {
    /// A world with a running server, on a fresh virtual clock.
    pub fn new(seed: u64, net: NetConfig) -> Sim {
        let clock = VirtualClock::install();
        let server_cfg = ServerConfig::new(cert_path("localhost.pem"), cert_path("localhost.key"));
        let mut sim = Sim {
            seed,
            clock,
            net: Net::new(net, seed),
            server: None,
            server_addr: SERVER_ADDR.parse().expect("a valid address"),
            server_cfg,
            records: Vec::new(),
            sink_failing: false,
            stored_elsewhere: false,
            close_on_open: false,
            clients: Vec::new(),
            raws: Vec::new(),
            gets: Vec::new(),
            trace: Vec::new(),
            server_events: Vec::new(),
            nat: BTreeMap::new(),
            server_sent: BTreeMap::new(),
            captured: None,
            rng: CoreRng::from_seed(seed),
            servers_started: 0,
            buf: vec![0; 65536],
            steps: 0,
        };
        sim.start_server();
        sim
    }

    /// A line to end every assertion message with: the seed and the trace tail.
    pub fn context(&self) -> String {
        let mut s = format!(
            "\nseed = {} (rerun with SIM_SEED={})\nlast events:\n",
            self.seed, self.seed
        );
        for line in self.trace.iter().rev().take(30).rev() {
            let _ = writeln!(s, "  {line}");
        }
        s
    }

    /// Starts (or restarts) the server: a new `Server` object, nothing
    /// remembered from the last one.
    pub fn start_server(&mut self) {
        self.servers_started += 1;
        let rng = CoreRng::from_seed(self.seed.wrapping_add(self.servers_started * 0x9e37_79b9));
        let server = Server::new(self.server_cfg.clone(), rng).expect("server config is valid");
        let n = self.servers_started;
        self.log("server", format_args!("started (#{n})"));
        self.server = Some(server);
    }

    /// Kills the server: its state is gone, packets to it are dropped.
    pub fn kill_server(&mut self) {
        self.server = None;
        self.log("server", format_args!("killed"));
    }

    /// Client `i`'s NAT binding changes: the server sees it at `public` from
    /// now on (a NAT rebinding, or a move to another network).
    pub fn rebind(&mut self, i: usize, public: SocketAddr) {
        let local = self.clients[i].addr;
        self.nat.insert(local, public);
        self.log(&format!("client{i}"), format_args!("rebound to {public}"));
    }

    /// Virtual time of the first record after `t`, minus `t`.
    pub fn first_record_after(&self, t: Duration) -> Option<Duration> {
        self.records.iter().find(|r| r.at > t).map(|r| r.at - t)
    }

    /// Adds a client with default settings, adjusted by `adjust`.
    pub fn add_client(&mut self, adjust: impl FnOnce(&mut ClientConfig)) -> usize {
        let i = self.clients.len();
        let addr: SocketAddr = format!("127.0.0.{}:{}", 2 + i / 1000, 5000 + i % 1000)
            .parse()
            .expect("a valid address");
        let mut cfg =
            ClientConfig::new(self.server_addr, addr, Verify::CaFile(cert_path("ca.pem")));
        cfg.client_id = Some(format!("client{i}"));
        adjust(&mut cfg);
        let rng = self.rng.fork();
        let now = self.clock.now();
        let client = Client::new(cfg, rng, now).expect("client config is valid");
        self.clients.push(SimClient {
            client,
            addr,
            submitted: Vec::new(),
            acked: Vec::new(),
            events: Vec::new(),
            schedule: None,
        });
        self.drain();
        i
    }

    /// Adds a raw quiche peer (see [`RawPeer`]).
    pub fn add_raw(&mut self, alpn: &[&[u8]]) -> usize {
        self.add_raw_with(alpn, |_| {}, None)
    }

    /// Adds a raw quiche peer whose config `adjust` changes, offering
    /// `session` for resumption (see [`RawPeer::connect_with`]).
    pub fn add_raw_with(
        &mut self,
        alpn: &[&[u8]],
        adjust: impl FnOnce(&mut quiche::Config),
        session: Option<&[u8]>,
    ) -> usize {
        let i = self.raws.len();
        let addr: SocketAddr = format!("127.0.1.1:{}", 6000 + i)
            .parse()
            .expect("a valid address");
        let raw =
            RawPeer::connect_with(addr, self.server_addr, alpn, &mut self.rng, adjust, session);
        self.raws.push(raw);
        self.drain();
        i
    }

    /// A raw quiche peer at `addr` that is not part of the world: the test
    /// carries its packets by hand ([`RawPeer::next_datagram`],
    /// [`Sim::inject`]).
    pub fn detached_raw(&mut self, addr: SocketAddr) -> RawPeer {
        RawPeer::connect(addr, self.server_addr, &[ALPN], &mut self.rng)
    }

    /// Hands the server a datagram from `from` now, as if it had just
    /// arrived (no network), and drains. Returns what the server said.
    pub fn inject(
        &mut self,
        from: SocketAddr,
        data: &mut [u8],
    ) -> Option<Result<(), DatagramError>> {
        let now = self.clock.now();
        let to = self.server_addr;
        let res = self.server.as_mut()?.handle_datagram(now, from, to, data);
        self.drain();
        Some(res)
    }

    /// Starts an HTTP/0.9 GET of `path` (see [`HqGet`]); returns its index.
    pub fn add_get(&mut self, path: &str) -> usize {
        self.add_get_with(path, |_| {})
    }

    /// [`Sim::add_get`] with its config changed by `adjust` (e.g. a client
    /// certificate).
    pub fn add_get_with(&mut self, path: &str, adjust: impl FnOnce(&mut GetConfig)) -> usize {
        let i = self.gets.len();
        let addr: SocketAddr = format!("127.0.2.1:{}", 7000 + i)
            .parse()
            .expect("a valid address");
        let cfg = GetConfig {
            server: self.server_addr,
            local: addr,
            server_name: "localhost".into(),
            verify: Verify::CaFile(cert_path("ca.pem")),
            client_cert: None,
            path: path.into(),
            timeout: Duration::from_secs(5),
        };
        let mut cfg = cfg;
        adjust(&mut cfg);
        let get = HqGet::new(cfg, self.rng.fork(), self.clock.now(), None).expect("valid GET");
        self.gets.push((addr, get));
        self.drain();
        i
    }

    /// Client `i` submits `count` samples, one every `interval`, the first now.
    pub fn schedule_reports(&mut self, i: usize, count: usize, interval: Duration) {
        let now = self.clock.now();
        self.clients[i].schedule = Some((interval, now, count));
    }

    /// Whether every client had every report acknowledged.
    pub fn all_acked(&self) -> bool {
        self.clients.iter().all(SimClient::all_acked)
    }

    /// Runs until `done(self)` holds, at most `limit` of virtual time and
    /// 1,000,000 steps. Returns whether `done` held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.clock.now() + limit;
        for _ in 0..1_000_000 {
            if done(self) {
                return true;
            }
            if !self.step(end) {
                return done(self);
            }
        }
        done(self)
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(d, |_| false);
    }

    /// One step: jump to the next event (not past `end`), deliver, drain.
    /// Returns false when `end` is reached.
    pub fn step(&mut self, end: Instant) -> bool {
        self.steps += 1;
        let mut next: Option<Instant> = self.net.next_arrival();
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        if let Some(s) = &self.server {
            consider(s.poll_timeout());
        }
        for c in &self.clients {
            consider(c.client.poll_timeout());
            if let Some((_, at, left)) = c.schedule
                && left > 0
            {
                consider(Some(at));
            }
        }
        for r in &self.raws {
            consider(r.poll_timeout());
        }
        for (_, g) in &self.gets {
            consider(g.poll_timeout());
        }
        let now_before = self.clock.now();
        let t = match next {
            Some(t) if t <= end => t.max(now_before),
            _ => {
                self.clock.advance_to(end);
                return false;
            }
        };
        self.clock.advance_to(t);
        let now = self.clock.now();
        while let Some(p) = self.net.pop_due(now) {
            self.deliver(now, p);
        }
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
            if let Some((interval, at, left)) = c.schedule
                && left > 0
                && at <= now
            {
                c.schedule = Some((interval, at + interval, left - 1));
                let value = self.rng.unit_f64();
                let mut fields = Map::new();
                fields.insert("value".into(), Value::from(value));
                let ms = u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(0);
                let sample = Sample {
                    fields,
                    sampled_at_ms: 1_700_000_000_000 + ms,
                };
                let seq = self.clients[i].client.submit(now, sample);
                self.clients[i].submitted.push(seq);
            }
        }
        if let Some(s) = &mut self.server
            && s.poll_timeout().is_some_and(|d| d <= now)
        {
            s.handle_timeout(now);
        }
        for c in &mut self.clients {
            if c.client.poll_timeout().is_some_and(|d| d <= now) {
                c.client.handle_timeout(now);
            }
        }
        for r in &mut self.raws {
            if r.poll_timeout().is_some_and(|d| d <= now) {
                r.handle_timeout();
            }
        }
        for (_, g) in &mut self.gets {
            if g.poll_timeout().is_some_and(|d| d <= now) {
                g.handle_timeout(now);
            }
        }
        self.drain();
        true
    }

    fn deliver(&mut self, now: Instant, mut p: net::Packet) {
        if p.to == self.server_addr {
            if let Some(c) = &mut self.captured {
                c.push(p.clone());
            }
            if let Some(s) = &mut self.server {
                let _ = s.handle_datagram(now, p.from, p.to, &mut p.data);
            }
            return;
        }
        let nat = &self.nat;
        let local = nat
            .iter()
            .find(|(_, public)| **public == p.to)
            .map_or(p.to, |(l, _)| *l);
        if nat.get(&p.to).is_some_and(|public| *public != p.to) {
            return; // the old address: the NAT no longer maps it
        }
        if let Some(c) = self.clients.iter_mut().find(|c| c.addr == local) {
            let _ = c.client.handle_datagram(now, p.from, local, &mut p.data);
            return;
        }
        if let Some(r) = self.raws.iter_mut().find(|r| r.addr == p.to) {
            r.handle_datagram(p.from, p.to, &mut p.data);
            return;
        }
        if let Some((_, g)) = self.gets.iter_mut().find(|(a, _)| *a == p.to) {
            let _ = g.handle_datagram(now, p.from, p.to, &mut p.data);
        }
    }

    /// Drains every peer until nothing moves, each in the order of the
    /// core's contract: events, transmits, events again until none.
    pub fn drain(&mut self) {
        let now = self.clock.now();
        loop {
            let mut moved = self.server_events(now);
            loop {
                if let Some(s) = &mut self.server {
                    while let Some(t) = s.poll_transmit(now, &mut self.buf) {
                        *self.server_sent.entry(t.to).or_default() += t.len as u64;
                        self.net.send(now, t.from, t.to, &self.buf[..t.len]);
                        moved = true;
                    }
                }
                if !self.server_events(now) {
                    break;
                }
                moved = true;
            }
            for i in 0..self.clients.len() {
                moved |= self.client_events(i);
                loop {
                    let c = &mut self.clients[i];
                    while let Some(t) = c.client.poll_transmit(now, &mut self.buf) {
                        let from = self.nat.get(&t.from).copied().unwrap_or(t.from);
                        self.net.send(now, from, t.to, &self.buf[..t.len]);
                        moved = true;
                    }
                    if !self.client_events(i) {
                        break;
                    }
                    moved = true;
                }
            }
            for r in &mut self.raws {
                while let Some((len, to)) = r.poll_transmit(&mut self.buf) {
                    self.net.send(now, r.addr, to, &self.buf[..len]);
                    moved = true;
                }
            }
            for (addr, g) in &mut self.gets {
                while let Some(t) = g.poll_transmit(&mut self.buf) {
                    self.net.send(now, *addr, t.to, &self.buf[..t.len]);
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// Handles every event of the server; false if there were none.
    fn server_events(&mut self, now: Instant) -> bool {
        let mut any = false;
        while let Some(ev) = self.server.as_mut().and_then(Server::poll_event) {
            any = true;
            self.on_server_event(now, ev);
        }
        any
    }

    /// Handles every event of client `i`; false if there were none.
    fn client_events(&mut self, i: usize) -> bool {
        let mut any = false;
        while let Some(ev) = self.clients[i].client.poll_event() {
            any = true;
            self.on_client_event(i, ev);
        }
        any
    }

    fn on_server_event(&mut self, now: Instant, ev: ServerEvent) {
        self.server_events.push(ev.clone());
        match &ev {
            ServerEvent::ConnectionOpened { conn, .. } if self.close_on_open => {
                self.log("server", format_args!("opened {conn}, closing it at once"));
                if let Some(s) = &mut self.server {
                    s.close_all(now);
                }
            }
            ServerEvent::Report { handle, report, .. } => {
                let outcome = if self.sink_failing {
                    Outcome::NotRecorded("sink failing".into())
                } else if self.stored_elsewhere {
                    Outcome::Duplicate
                } else {
                    self.records.push(Record {
                        client: report.client.clone(),
                        seq: report.seq,
                        identity: report.identity.as_str().to_owned(),
                        fields: report.fields(),
                        at: self.clock.elapsed(),
                    });
                    Outcome::Recorded
                };
                self.log(
                    "server",
                    format_args!("report {:?} {:?} -> {outcome:?}", report.client, report.seq),
                );
                if let Some(s) = &mut self.server {
                    let _ = s.respond(now, *handle, outcome);
                }
            }
            ServerEvent::ConnectionClosed {
                conn,
                established,
                reason,
                stats,
                ..
            } => {
                self.log(
                    "server",
                    format_args!(
                        "closed {conn} established={established} reason={reason} reports={}",
                        stats.reports
                    ),
                );
            }
            ServerEvent::Request { handle, path, .. } => {
                let body = self.http_body(path);
                self.log("server", format_args!("GET {path} -> {} bytes", body.len()));
                if let Some(s) = &mut self.server {
                    let _ = s.respond_request(now, *handle, body);
                }
            }
            other => self.log("server", format_args!("{other:?}")),
        }
    }

    /// What the simulated application serves over HTTP/0.9: `/latest` (the
    /// latest record of each client), `/stats`, else `not found`.
    fn http_body(&self, path: &str) -> Vec<u8> {
        match path {
            "/latest" => {
                let mut latest = Map::new();
                for r in &self.records {
                    let c = r.client.clone().unwrap_or_default();
                    latest.insert(c, Value::Object(r.fields.clone()));
                }
                serde_json::to_vec(&latest).unwrap_or_default()
            }
            "/stats" => format!("{{\"reports\":{}}}", self.records.len()).into_bytes(),
            _ => b"not found\n".to_vec(),
        }
    }

    fn on_client_event(&mut self, i: usize, ev: ClientEvent) {
        let elapsed = self.clock.elapsed();
        let line = match &ev {
            ClientEvent::Acknowledged { seq, duplicate, .. } => {
                self.clients[i].acked.push(*seq);
                format!("acknowledged seq={seq} duplicate={duplicate}")
            }
            ClientEvent::ReconnectScheduled { at, attempt } => {
                let in_ms = at.saturating_duration_since(self.clock.now()).as_secs_f64() * 1e3;
                format!("reconnect #{attempt} in {in_ms:.3}ms")
            }
            other => format!("{other:?}"),
        };
        self.log(&format!("client{i}"), format_args!("{line}"));
        self.clients[i].events.push((elapsed, ev));
    }

    /// Runs until every report is acknowledged (60 s at most), and asserts
    /// each was recorded once and client `c` resumed a session with 0-RTT
    /// accepted on one of its connections.
    pub fn assert_all_acked_once_resumed_with_zero_rtt(&mut self, c: usize) {
        assert!(
            self.run_until(Duration::from_secs(60), Sim::all_acked),
            "{}",
            self.context()
        );
        self.assert_exactly_once();
        assert!(
            self.clients[c].events.iter().any(|(_, e)| matches!(
                e,
                ClientEvent::Connected {
                    resumed: true,
                    early_data: true,
                    ..
                }
            )),
            "the client resumed with 0-RTT accepted{}",
            self.context()
        );
    }

    /// Appends a line to the trace, stamped with virtual time.
    pub fn log(&mut self, who: &str, what: std::fmt::Arguments<'_>) {
        let t = self.clock.elapsed().as_secs_f64() * 1e3;
        self.trace.push(format!("{t:>12.3}ms {who:<8} {what}"));
    }

    /// `(client, seq)` of every record, in order.
    pub fn recorded_keys(&self) -> Vec<(String, u64)> {
        self.records
            .iter()
            .filter_map(|r| Some((r.client.clone()?, r.seq?)))
            .collect()
    }

    /// Asserts that every submitted report of every client was recorded
    /// exactly once and nothing else was recorded.
    pub fn assert_exactly_once(&self) {
        let mut counts: BTreeMap<(String, u64), usize> = BTreeMap::new();
        for k in self.recorded_keys() {
            *counts.entry(k).or_default() += 1;
        }
        let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            dups.is_empty(),
            "recorded more than once: {dups:?}{}",
            self.context()
        );
        let mut expected = BTreeSet::new();
        for c in &self.clients {
            for s in &c.submitted {
                expected.insert((c.client.client_id().to_owned(), *s));
            }
        }
        let got: BTreeSet<_> = counts.keys().cloned().collect();
        let missing: Vec<_> = expected.difference(&got).collect();
        let extra: Vec<_> = got.difference(&expected).collect();
        assert!(
            missing.is_empty(),
            "never recorded: {missing:?}{}",
            self.context()
        );
        assert!(
            extra.is_empty(),
            "recorded but never submitted: {extra:?}{}",
            self.context()
        );
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }
}

/// The development client certificate `certs/clients/NAME.pem` and its key.
pub fn client_cert(name: &str) -> quic_report_core::CertFiles {
    quic_report_core::CertFiles {
        cert_chain: cert_path(&format!("clients/{name}.pem")),
        private_key: cert_path(&format!("clients/{name}.key")),
    }
}

/// The seed for a test: `SIM_SEED` from the environment, else `default`.
pub fn seed_or(default: u64) -> u64 {
    std::env::var("SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
