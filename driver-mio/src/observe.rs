//! What the server knows about itself, for people and tools:
//!
//! - the latest report of each client of each identity (HTTP/0.9
//!   `GET /latest`), for those the [`ReadPolicy`] lets read it,
//! - counters and latency histograms (`GET /stats` as JSON, and Prometheus
//!   text on `--metrics ADDR` at `/metrics`),
//! - the summary line logged every 10 s,
//! - [`Throttle`]: log lines for what a peer can make happen often
//!   (refused handshakes, reports and reads), at most one per kind every
//!   10 s, with the count of those not logged.
//!
//! The loop owns an [`Observer`] and tells it what happened; the metrics
//! HTTP thread only reads a snapshot the loop publishes (one mutex, taken
//! once per loop turn at most every 100 ms), so the loop never waits on a
//! scraper.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quic_report_core::per_identity::{IdentityLimits, PerIdentity};
use quic_report_core::report::{CODE_FORBIDDEN, CODE_UNSTORABLE};
use quic_report_core::{Identity, Outcome, Report, Response, ServerEvent, ServerStats};

use crate::database::writer::ReadResult;
use crate::database::{LatestLimit, Taking};
use serde_json::Value;

/// How many latest reports are kept in memory (with an inline sink): per
/// identity (and for the anonymous identity, which every peer without a
/// certificate shares), the least recently reporting client forgotten
/// first; an identity can only push out its own. The anonymous identity's
/// 1,000 clients hold at most 64 MiB of reports; its entries are kept only
/// if someone may read them ([`ReadPolicy`]).
const LATEST_LIMITS: IdentityLimits = IdentityLimits {
    max_identities: 10_000,
    clients_per_identity: 16,
    anonymous_clients: 1_000,
};

/// What one `/latest` answer holds at most, from memory or from a
/// database: 10,000 clients, the first in order of identity and client, and
/// no more of them than 12 MiB; below the default 16 MiB cap on an answer's
/// unsent bytes (`ServerConfig::max_response_bytes`), past which the
/// reader's connection would be closed instead. A lower cap lowers the
/// bytes with it ([`Observer::set_answer_cap`]).
pub const LATEST_READ: LatestLimit = LatestLimit {
    rows: 10_000,
    bytes: 12 << 20,
};

/// Who may read what over HTTP/0.9 (`/latest`, `/stats`).
///
/// - an identity in `readers`: everything;
/// - any other certificate identity: `/latest` with its own entries only,
///   not `/stats`;
/// - the anonymous identity: everything if `anonymous_reads_all` (an
///   anonymous server on a loopback address: everyone there is anonymous
///   and trusted alike), else nothing.
///
/// The default is the closed one: no readers, and anonymous peers read
/// nothing (a certificate identity still reads its own `/latest`). The
/// `server` command opens it as its `--reader` flags and listen address
/// say; a program embedding the driver sets
/// [`ServerOptions::read_policy`](crate::server::ServerOptions::read_policy).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadPolicy {
    /// Identities that may read everything (`--reader`).
    pub readers: BTreeSet<Identity>,
    /// Whether a peer without a certificate may read everything.
    pub anonymous_reads_all: bool,
}

/// What one identity may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    All,
    Own,
    Nothing,
}

impl ReadPolicy {
    fn access(&self, identity: &Identity) -> Access {
        if identity.is_anonymous() {
            if self.anonymous_reads_all {
                Access::All
            } else {
                Access::Nothing
            }
        } else if self.readers.contains(identity) {
            Access::All
        } else {
            Access::Own
        }
    }

    /// Whether anyone may read `identity`'s `/latest` entries: itself, or
    /// a reader of everything.
    fn someone_reads(&self, identity: &Identity) -> bool {
        self.access(identity) != Access::Nothing || !self.readers.is_empty()
    }
}

/// The answer to a read (`GET /path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadAnswer {
    /// The body.
    pub body: Vec<u8>,
    /// The read was refused (the body is a `forbidden` error object).
    pub refused: bool,
}

/// Rate-limits the log lines of one kind of event a peer can cause as
/// often as it likes: the first is logged, then at most one every
/// [`Throttle::EVERY`], saying how many were not.
#[derive(Debug, Default)]
pub struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// At most one line per this period.
    pub const EVERY: Duration = Duration::from_secs(10);

    /// Whether to log now; if so, how many were left out since the last
    /// line.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < Throttle::EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// `" (N more since the last line)"`, or nothing.
pub fn more_since(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more since the last line)")
    }
}

/// How often the summary line is logged.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// Upper bounds of the latency histograms' buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Upper bounds of the batch-size histogram's buckets, in rows.
const ROW_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// A Prometheus-style cumulative histogram (latencies by default).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::with_bounds(&BUCKETS)
    }
}

impl Histogram {
    /// A histogram with these bucket upper bounds (ascending).
    pub fn with_bounds(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            count: 0,
            sum: 0.0,
        }
    }

    /// Adds one duration, in seconds.
    pub fn observe(&mut self, d: Duration) {
        self.observe_value(d.as_secs_f64());
    }

    /// Adds one observation.
    pub fn observe_value(&mut self, v: f64) {
        for (n, le) in self.counts.iter_mut().zip(self.bounds) {
            if v <= *le {
                *n += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The mean observation (0 without any).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }

    fn write_prometheus(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (le, n) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// A database sink's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct DbMetrics {
    /// The last database operation succeeded: the first connection at
    /// start, then each commit (a reconnect counts once an insert works).
    pub up: bool,
    /// Batches committed.
    pub commits: u64,
    /// From a batch's insert to its commit.
    pub commit_latency: Histogram,
    /// Rows per committed batch.
    pub batch_rows: Histogram,
    /// Reports waiting for their commit now.
    pub waiting_reports: u64,
    /// Bytes of those reports.
    pub waiting_bytes: u64,
    /// Database failures (connection lost, a batch or a row refused).
    pub errors: u64,
    /// Reports answered `not_recorded` at once because too many waited.
    pub busy: u64,
    /// Reports answered `not_recorded` because their deadline passed.
    pub expired: u64,
}

impl Default for DbMetrics {
    fn default() -> Self {
        DbMetrics {
            up: false,
            commits: 0,
            commit_latency: Histogram::default(),
            batch_rows: Histogram::with_bounds(&ROW_BUCKETS),
            waiting_reports: 0,
            waiting_bytes: 0,
            errors: 0,
            busy: 0,
            expired: 0,
        }
    }
}

/// Everything `/stats` and `/metrics` show, as of the last publish.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The core's counters.
    pub core: ServerStats,
    /// Connections open now.
    pub connections_open: u64,
    /// Reports written to the sink.
    pub recorded: u64,
    /// Reports the sink could not write.
    pub not_recorded: u64,
    /// Objects or streams refused, by code (`invalid_json`, `forbidden`,
    /// `unstorable`, ...).
    pub rejected: BTreeMap<&'static str, u64>,
    /// Handshakes refused for their client certificate, by reason
    /// (`no_certificate`, `bad_certificate`, `unusable_name`).
    pub handshakes_refused: BTreeMap<&'static str, u64>,
    /// Reads (`GET`) refused to the identity that asked.
    pub reads_refused: u64,
    /// UDP bytes received.
    pub bytes_in: u64,
    /// UDP bytes sent.
    pub bytes_out: u64,
    /// Handshake durations.
    pub handshake: Histogram,
    /// From the loop turn that read a report to its answer (sink included).
    pub report: Histogram,
    /// Seconds since the server started.
    pub uptime: Duration,
    /// The database sink's figures, when the sink is a database.
    pub database: Option<DbMetrics>,
}

/// How often at most the loop publishes its counters to the metrics thread.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// One client's entry of the in-memory `/latest`: the report with the
/// highest `seq` answered recorded (or duplicate) so far, as a database's
/// `/latest` shows it, so that a resend of older seqs (recorded after a
/// newer one, once a failure passed) does not replace it. Reports without
/// a `seq` are not ordered: one replaces the entry, and the entry of one
/// is replaced by the next report, whatever its `seq`.
#[derive(Debug, Default)]
struct Latest {
    /// Its `seq`, if it has one.
    seq: Option<u64>,
    /// Its JSON line.
    line: Vec<u8>,
}

impl Latest {
    /// Whether a report with `seq` replaces this entry.
    fn replaced_by(&self, seq: Option<u64>) -> bool {
        match (self.seq, seq) {
            (Some(kept), Some(new)) => new >= kept,
            _ => true,
        }
    }
}

/// The loop's bookkeeping.
#[derive(Debug)]
pub struct Observer {
    started: Instant,
    snap: Snapshot,
    /// Per identity and client: its latest report (see [`Latest`]).
    latest: PerIdentity<Latest>,
    /// Whether `latest` is kept: not when a database answers `/latest`.
    keep_latest: bool,
    /// What one `/latest` answer holds at most.
    latest_limit: LatestLimit,
    policy: ReadPolicy,
    shared: Arc<Mutex<Snapshot>>,
    published: Option<Instant>,
    next_summary: Instant,
    last_summary: (u64, u64),
}

impl Observer {
    /// A fresh observer, its first summary due [`SUMMARY_EVERY`] from `now`.
    pub fn new(now: Instant) -> Observer {
        Observer {
            started: now,
            snap: Snapshot::default(),
            latest: PerIdentity::new(LATEST_LIMITS),
            keep_latest: true,
            latest_limit: LATEST_READ,
            policy: ReadPolicy::default(),
            shared: Arc::new(Mutex::new(Snapshot::default())),
            published: None,
            next_summary: now + SUMMARY_EVERY,
            last_summary: (0, 0),
        }
    }

    /// Who may read what (default: no readers, anonymous reads refused).
    pub fn set_read_policy(&mut self, policy: ReadPolicy) {
        self.policy = policy;
    }

    /// Answers may hold at most `bytes` unsent (the core's
    /// `max_response_bytes`): `/latest` stops at three quarters of that
    /// when it is below [`LATEST_READ`]'s.
    pub fn set_answer_cap(&mut self, bytes: usize) {
        self.latest_limit.bytes = LATEST_READ.bytes.min(bytes / 4 * 3);
    }

    /// What one `/latest` answer may hold ([`LATEST_READ`], or less after
    /// [`Observer::set_answer_cap`]).
    pub fn latest_limit(&self) -> LatestLimit {
        self.latest_limit
    }

    /// `/latest` is read from a database from now on: no latest reports
    /// are kept in memory.
    pub fn read_latest_from_database(&mut self) {
        self.keep_latest = false;
        self.latest = PerIdentity::new(LATEST_LIMITS);
    }

    /// The snapshot the metrics thread reads.
    pub fn shared(&self) -> Arc<Mutex<Snapshot>> {
        Arc::clone(&self.shared)
    }

    /// Datagram bytes in and out.
    pub fn bytes(&mut self, received: usize, sent: usize) {
        self.snap.bytes_in += received as u64;
        self.snap.bytes_out += sent as u64;
    }

    /// A core event (reports are counted by [`Observer::answered`]).
    pub fn event(&mut self, ev: &ServerEvent) {
        match ev {
            ServerEvent::ConnectionOpened { handshake, .. } => {
                self.snap.handshake.observe(*handshake)
            }
            ServerEvent::StreamRejected { error, .. } => {
                *self.snap.rejected.entry(error.code()).or_default() += 1;
            }
            ServerEvent::HandshakeRefused { reason, .. } => {
                *self
                    .snap
                    .handshakes_refused
                    .entry(reason.label())
                    .or_default() += 1;
            }
            _ => {}
        }
    }

    /// The database sink's figures, kept from now on.
    pub fn database(&mut self) -> &mut DbMetrics {
        self.snap.database.get_or_insert_with(DbMetrics::default)
    }

    /// A report was answered, `took` after its loop turn began; `line` is
    /// its JSON line (kept as the client's latest if recorded and its seq
    /// is not below the kept one's: see [`Latest`]).
    pub fn answered(&mut self, report: &Report, line: Vec<u8>, outcome: &Outcome, took: Duration) {
        self.snap.report.observe(took);
        match outcome {
            Outcome::NotRecorded(_) => {
                self.snap.not_recorded += 1;
                return;
            }
            Outcome::Unstorable(_) => {
                *self.snap.rejected.entry(CODE_UNSTORABLE).or_default() += 1;
                return;
            }
            Outcome::Duplicate => {}
            Outcome::Recorded => self.snap.recorded += 1,
        }
        // Only what someone may read (the anonymous identity's entries, on
        // a server with no reader and no anonymous reads, nobody may).
        if self.keep_latest && self.policy.someone_reads(&report.identity) {
            let client = report.client.as_deref().unwrap_or("-");
            let entry = self.latest.entry(&report.identity, client, Latest::default);
            if entry.replaced_by(report.seq) {
                *entry = Latest {
                    seq: report.seq,
                    line,
                };
            }
        }
    }

    /// Publishes the counters for the metrics thread (at most every
    /// [`PUBLISH_EVERY`]) and logs the summary line when it is due. Returns
    /// when it next wants to run: by the next publish if this call left
    /// counters unpublished, so that `/metrics` is never more than
    /// [`PUBLISH_EVERY`] behind, even when the loop has nothing else to do.
    pub fn tick(
        &mut self,
        now: Instant,
        core: ServerStats,
        open: usize,
        rtt: impl FnOnce() -> Option<Duration>,
    ) -> Instant {
        self.snap.core = core;
        self.snap.connections_open = open as u64;
        self.snap.uptime = now.saturating_duration_since(self.started);
        let unpublished = match self.published {
            Some(t) if now.saturating_duration_since(t) < PUBLISH_EVERY => Some(t + PUBLISH_EVERY),
            _ => {
                if let Ok(mut s) = self.shared.lock() {
                    *s = self.snap.clone();
                }
                self.published = Some(now);
                None
            }
        };
        if now >= self.next_summary {
            let (rec, conns) = (self.snap.recorded, core.connections_total);
            let rtt =
                rtt().map_or_else(|| "-".into(), |r| format!("{:.1}ms", r.as_secs_f64() * 1e3));
            log::info!(
                "summary: {open} connection(s) open (+{} in {}s), {} report(s) recorded (+{}), {} duplicate(s), {} rejected, {} not recorded, mean rtt {rtt}",
                conns - self.last_summary.1,
                SUMMARY_EVERY.as_secs(),
                rec,
                rec - self.last_summary.0,
                core.duplicates,
                core.rejected,
                self.snap.not_recorded,
            );
            self.last_summary = (rec, conns);
            self.next_summary = now + SUMMARY_EVERY;
        }
        unpublished.map_or(self.next_summary, |t| t.min(self.next_summary))
    }

    /// What `identity` may read of `path`, as the [`ReadPolicy`] says:
    /// `Ok(None)` everything, `Ok(Some(identity))` only its own entries,
    /// or the refusal to send (`{"ok":false,"code":"forbidden",...}`),
    /// counted in `reads_refused`.
    pub fn authorize(
        &mut self,
        path: &str,
        identity: &Identity,
    ) -> Result<Option<Identity>, ReadAnswer> {
        match (self.policy.access(identity), path) {
            (Access::All, _) => Ok(None),
            (Access::Own, "/stats") | (Access::Nothing, _) => {
                self.snap.reads_refused += 1;
                let why = if identity.is_anonymous() {
                    format!("{path} may not be read without a client certificate here")
                } else {
                    format!("identity {identity} may not read {path} (only a --reader may)")
                };
                let mut body = Vec::new();
                Response::Error {
                    code: CODE_FORBIDDEN.into(),
                    error: why,
                }
                .encode(&mut body);
                Err(ReadAnswer {
                    body,
                    refused: true,
                })
            }
            (Access::Own, _) => Ok(Some(identity.clone())),
        }
    }

    /// The answer to an HTTP/0.9 `GET path` from `identity`:
    /// [`Observer::authorize`], then `/latest`, `/stats`, else `not found`.
    pub fn read(&mut self, path: &str, identity: &Identity) -> ReadAnswer {
        match self.authorize(path, identity) {
            Err(refused) => refused,
            Ok(only) => ReadAnswer {
                body: self.body(path, only.as_ref()),
                refused: false,
            },
        }
    }

    /// The body of an authorized read (`only`: of that identity alone).
    pub fn body(&self, path: &str, only: Option<&Identity>) -> Vec<u8> {
        match path {
            "/latest" => self.latest_body(only),
            "/stats" => Self::json_body(&stats_json(&self.snap)),
            _ => b"not found\n".to_vec(),
        }
    }

    /// `{"<identity>":{"<client>":<its latest record>,...},...}`, of every
    /// identity or only of `only`; sorted by name.
    fn latest_body(&self, only: Option<&Identity>) -> Vec<u8> {
        let mut rows: Vec<(&str, &str, &[u8])> = Vec::new();
        let identities: Vec<&Identity> = match only {
            Some(i) => vec![i],
            None => self.latest.identities().collect(),
        };
        for identity in identities {
            for (client, Latest { line, .. }) in self.latest.clients_of(identity.as_str()) {
                rows.push((
                    identity.as_str(),
                    client,
                    line.strip_suffix(b"\n").unwrap_or(line),
                ));
            }
        }
        latest_json(rows, self.latest_limit)
    }
}

/// `{"<identity>":{"<client>":<record>,...},...}\n` from rows of records
/// that are JSON objects already, sorted by identity and client, as many
/// as `limit` allows.
fn latest_json(mut rows: Vec<(&str, &str, &[u8])>, limit: LatestLimit) -> Vec<u8> {
    rows.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut body = vec![b'{'];
    let mut current: Option<&str> = None;
    let mut taking = Taking::new(limit);
    for (identity, client, record) in rows {
        if !taking.take_row(identity, client, record) {
            break;
        }
        if current != Some(identity) {
            if current.is_some() {
                body.extend_from_slice(b"},");
            }
            body.extend_from_slice(&serde_json::to_vec(identity).unwrap_or_default());
            body.extend_from_slice(b":{");
            current = Some(identity);
        } else {
            body.push(b',');
        }
        body.extend_from_slice(&serde_json::to_vec(client).unwrap_or_default());
        body.push(b':');
        body.extend_from_slice(record);
    }
    if current.is_some() {
        body.push(b'}');
    }
    body.extend_from_slice(b"}\n");
    body
}

impl Observer {
    /// The body for a read the database answered: `/latest` from its rows
    /// (complete across every server sharing it), `/stats` with its counts.
    /// `only`: the entries of that identity alone (see
    /// [`Observer::authorize`]).
    pub fn http_body_from(&self, read: ReadResult, only: Option<&Identity>) -> Vec<u8> {
        match read {
            ReadResult::Latest(rows) => latest_json(
                rows.iter()
                    .filter(|(identity, _, _)| only.is_none_or(|o| o.as_str() == identity))
                    .map(|(identity, client, body)| {
                        (identity.as_str(), client.as_str(), body.as_bytes())
                    })
                    .collect(),
                self.latest_limit,
            ),
            ReadResult::Counts(counts) => {
                let mut stats = stats_json(&self.snap);
                stats["database_rows"] = counts.rows.into();
                stats["database_rows_estimated"] = counts.rows_estimated.into();
                stats["database_clients"] = counts.clients.into();
                stats["database_clients_capped"] = counts.clients_capped.into();
                Self::json_body(&stats)
            }
        }
    }

    /// The body for a read the database could not answer (`why`):
    /// `/stats` (`stats`) still answers the server's own counters, with
    /// `database_error` saying why (a monitor that scrapes it keeps its
    /// numbers through an outage); `/latest`, the line.
    pub fn read_failed(&self, stats: bool, why: &str) -> Vec<u8> {
        if !stats {
            return format!("{why}\n").into_bytes();
        }
        let mut body = stats_json(&self.snap);
        body["database_error"] = why.into();
        Self::json_body(&body)
    }

    fn json_body(stats: &Value) -> Vec<u8> {
        let mut body = serde_json::to_vec(stats).unwrap_or_default();
        body.push(b'\n');
        body
    }
}

/// The counters as a JSON object (`/stats`).
pub fn stats_json(s: &Snapshot) -> Value {
    let c = &s.core;
    serde_json::json!({
        "uptime_s": s.uptime.as_secs(),
        "connections_open": s.connections_open,
        "connections_total": c.connections_total,
        "reports_recorded": s.recorded,
        "reports_not_recorded": s.not_recorded,
        "duplicates": c.duplicates,
        "rejected": s.rejected,
        "handshakes_refused": s.handshakes_refused,
        "reads_refused": s.reads_refused,
        "stateless_resets_sent": c.resets_sent,
        "retries_sent": c.retries_sent,
        "invalid_tokens": c.invalid_tokens,
        "version_negotiations": c.version_negotiations,
        "datagrams_dropped": c.dropped_datagrams,
        "bytes_in": s.bytes_in,
        "bytes_out": s.bytes_out,
        "database": s.database.as_ref().map(|d| serde_json::json!({
            "up": d.up,
            "commits": d.commits,
            "mean_batch_rows": d.batch_rows.mean(),
            "mean_commit_ms": d.commit_latency.mean() * 1e3,
            "waiting_reports": d.waiting_reports,
            "waiting_bytes": d.waiting_bytes,
            "errors": d.errors,
            "busy": d.busy,
            "expired": d.expired,
        })),
    })
}

/// The counters in Prometheus text exposition format (`/metrics`).
pub fn prometheus(s: &Snapshot) -> String {
    let c = &s.core;
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP quic_report_{name} {help}\n# TYPE quic_report_{name} {kind}\nquic_report_{name} {value}"
        );
    };
    metric(
        "connections_open",
        "gauge",
        "Connections open now (handshakes included).",
        s.connections_open,
    );
    metric(
        "connections_total",
        "counter",
        "Connections accepted since the start.",
        c.connections_total,
    );
    metric(
        "reports_recorded_total",
        "counter",
        "Reports written to the sink and acknowledged.",
        s.recorded,
    );
    metric(
        "reports_not_recorded_total",
        "counter",
        "Reports the sink could not write (the client resends).",
        s.not_recorded,
    );
    metric(
        "duplicates_total",
        "counter",
        "Reports seen before, answered duplicate and not recorded.",
        c.duplicates,
    );
    metric(
        "stateless_resets_sent_total",
        "counter",
        "Stateless resets sent.",
        c.resets_sent,
    );
    metric(
        "retries_sent_total",
        "counter",
        "Retry packets sent (address validation).",
        c.retries_sent,
    );
    metric(
        "invalid_tokens_total",
        "counter",
        "Initials with a bad or expired token.",
        c.invalid_tokens,
    );
    metric(
        "version_negotiations_total",
        "counter",
        "Version negotiation packets sent.",
        c.version_negotiations,
    );
    metric(
        "datagrams_dropped_total",
        "counter",
        "Datagrams the server could not use.",
        c.dropped_datagrams,
    );
    metric(
        "bytes_received_total",
        "counter",
        "UDP payload bytes received.",
        s.bytes_in,
    );
    metric(
        "bytes_sent_total",
        "counter",
        "UDP payload bytes sent.",
        s.bytes_out,
    );
    metric(
        "reads_refused_total",
        "counter",
        "HTTP/0.9 reads refused to the identity that asked (code forbidden).",
        s.reads_refused,
    );
    let _ = writeln!(
        out,
        "# HELP quic_report_handshakes_refused_total Handshakes refused for their client certificate, by reason.\n# TYPE quic_report_handshakes_refused_total counter"
    );
    for reason in ["no_certificate", "bad_certificate", "unusable_name"] {
        let n = s.handshakes_refused.get(reason).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "quic_report_handshakes_refused_total{{reason=\"{reason}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP quic_report_rejected_total Objects or streams refused, by reason.\n# TYPE quic_report_rejected_total counter"
    );
    // forbidden reports are always listed, so an alert can watch the series.
    let forbidden = s.rejected.get(CODE_FORBIDDEN).copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "quic_report_rejected_total{{reason=\"{CODE_FORBIDDEN}\"}} {forbidden}"
    );
    for (code, n) in s.rejected.iter().filter(|(c, _)| **c != CODE_FORBIDDEN) {
        let _ = writeln!(out, "quic_report_rejected_total{{reason=\"{code}\"}} {n}");
    }
    s.handshake.write_prometheus(
        &mut out,
        "quic_report_handshake_seconds",
        "Handshake durations.",
    );
    s.report.write_prometheus(
        &mut out,
        "quic_report_report_seconds",
        "From reading a report to answering it (the sink write included).",
    );
    if let Some(d) = &s.database {
        write_database(&mut out, d);
    }
    out
}

/// The database sink's families.
fn write_database(out: &mut String, d: &DbMetrics) {
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP quic_report_{name} {help}\n# TYPE quic_report_{name} {kind}\nquic_report_{name} {value}"
        );
    };
    metric(
        "sink_up",
        "gauge",
        "1 if the database's last operation succeeded.",
        u64::from(d.up),
    );
    metric(
        "sink_commits_total",
        "counter",
        "Batches committed to the database.",
        d.commits,
    );
    metric(
        "sink_waiting_reports",
        "gauge",
        "Reports waiting for their commit.",
        d.waiting_reports,
    );
    metric(
        "sink_waiting_bytes",
        "gauge",
        "Bytes of the reports waiting for their commit.",
        d.waiting_bytes,
    );
    metric(
        "sink_errors_total",
        "counter",
        "Database failures: connection lost or refused, rows refused.",
        d.errors,
    );
    metric(
        "sink_busy_total",
        "counter",
        "Reports answered not_recorded at once because too many waited (backpressure).",
        d.busy,
    );
    metric(
        "sink_expired_total",
        "counter",
        "Reports answered not_recorded because no commit came within the deadline.",
        d.expired,
    );
    d.commit_latency.write_prometheus(
        out,
        "quic_report_sink_commit_seconds",
        "From a batch's insert to its commit.",
    );
    d.batch_rows.write_prometheus(
        out,
        "quic_report_sink_batch_rows",
        "Rows per committed batch (group commit).",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_left_unpublished_are_published_by_the_next_tick_it_asks_for() {
        let t0 = Instant::now();
        let mut o = Observer::new(t0);
        let shared = o.shared();
        assert_eq!(
            o.tick(t0, ServerStats::default(), 0, || None),
            o.next_summary
        );
        let refused = o.authorize("/stats", &Identity::anonymous());
        assert!(refused.is_err(), "no read policy: anonymous reads nothing");
        let soon = t0 + Duration::from_millis(10);
        let next = o.tick(soon, ServerStats::default(), 0, || None);
        assert_eq!(next, t0 + PUBLISH_EVERY, "asks to run again to publish");
        assert_eq!(shared.lock().expect("lock").reads_refused, 0, "not yet");
        assert_eq!(
            o.tick(next, ServerStats::default(), 0, || None),
            o.next_summary
        );
        assert_eq!(shared.lock().expect("lock").reads_refused, 1, "published");
    }

    #[test]
    fn latest_stops_before_its_byte_limit_in_key_order() {
        // 400 clients of 60 KB records (a database's rows, or a reader's
        // view of memory): the answer keeps the first ones within 12 MiB, as JSON.
        let record = format!(r#"{{"v":"{}"}}"#, "x".repeat(60_000));
        let clients: Vec<String> = (0..400).map(|k| format!("c{k:03}")).collect();
        let rows = clients
            .iter()
            .rev()
            .map(|c| ("", c.as_str(), record.as_bytes()))
            .collect();
        let body = latest_json(rows, LATEST_READ);
        assert!(body.len() <= LATEST_READ.bytes, "{} bytes", body.len());
        let v: Value = serde_json::from_slice(&body).expect("JSON");
        let shown: Vec<&String> = v[""].as_object().expect("one identity").keys().collect();
        let fit = LATEST_READ.bytes / LatestLimit::row_bytes("", "c000", record.as_bytes());
        assert_eq!(shown.len(), fit);
        assert_eq!(
            shown,
            clients[..fit].iter().collect::<Vec<_>>(),
            "the first"
        );
    }

    #[test]
    fn latest_keeps_only_what_someone_may_read() {
        let report = |identity: &Identity| {
            Report::from_object(serde_json::from_str(r#"{"client":"c","seq":1}"#).expect("object"))
                .expect("report")
                .bind_identity(identity)
                .expect("bound")
        };
        let (anon, alice) = (
            Identity::anonymous(),
            Identity::named("alice").expect("name"),
        );
        let answer = |o: &mut Observer, who: &Identity| {
            let r = report(who);
            let line = r.to_json_line();
            o.answered(&r, line, &Outcome::Recorded, Duration::ZERO);
        };
        let kept = |o: &Observer| {
            let body: Value = serde_json::from_slice(&o.body("/latest", None)).expect("JSON");
            body.as_object()
                .expect("object")
                .keys()
                .cloned()
                .collect::<Vec<_>>()
        };
        // No reader and no anonymous reads: the anonymous entry is not kept
        // (nobody could read it); alice reads her own.
        let mut o = Observer::new(Instant::now());
        answer(&mut o, &anon);
        answer(&mut o, &alice);
        assert_eq!(kept(&o), ["alice"]);
        // With a reader, both.
        let mut o = Observer::new(Instant::now());
        o.set_read_policy(ReadPolicy {
            readers: [Identity::named("ops").expect("name")].into(),
            ..ReadPolicy::default()
        });
        answer(&mut o, &anon);
        answer(&mut o, &alice);
        assert_eq!(kept(&o), ["", "alice"]);
        // A lower cap on answers lowers /latest's bytes with it.
        assert_eq!(o.latest_limit(), LATEST_READ);
        o.set_answer_cap(1 << 20);
        assert_eq!(o.latest_limit().bytes, 3 << 18);
        assert_eq!(kept(&o), ["", "alice"], "both small entries still fit");
        // A database answers /latest: nothing in memory.
        o.read_latest_from_database();
        answer(&mut o, &alice);
        assert!(kept(&o).is_empty());
    }

    #[test]
    fn latest_shows_the_highest_seq_even_if_a_lower_one_is_answered_after() {
        let mut o = Observer::new(Instant::now());
        o.set_read_policy(ReadPolicy {
            anonymous_reads_all: true,
            ..ReadPolicy::default()
        });
        let answer = |o: &mut Observer, client: &str, seq: Option<u64>, outcome: Outcome| {
            let mut object = serde_json::Map::new();
            object.insert("client".into(), client.into());
            if let Some(seq) = seq {
                object.insert("seq".into(), seq.into());
            }
            let r = Report::from_object(object).expect("report");
            let line = r.to_json_line();
            o.answered(&r, line, &outcome, Duration::ZERO);
        };
        let shown = |o: &Observer, client: &str| {
            let body: Value = serde_json::from_slice(&o.body("/latest", None)).expect("JSON");
            body[""][client]["seq"].clone()
        };
        // Seq 7 recorded, then the resends of 5 and 6 (not recorded the
        // first time): /latest keeps 7, as a database's does.
        answer(&mut o, "a", Some(7), Outcome::Recorded);
        answer(&mut o, "a", Some(5), Outcome::Recorded);
        answer(&mut o, "a", Some(6), Outcome::Duplicate);
        assert_eq!(shown(&o, "a"), 7);
        answer(&mut o, "a", Some(7), Outcome::Duplicate);
        answer(&mut o, "a", Some(8), Outcome::Recorded);
        assert_eq!(shown(&o, "a"), 8);
        answer(&mut o, "a", Some(9), Outcome::NotRecorded("full".into()));
        assert_eq!(shown(&o, "a"), 8, "not recorded: not shown");
        // Without a seq, the last one answered.
        answer(&mut o, "b", Some(3), Outcome::Recorded);
        answer(&mut o, "b", None, Outcome::Recorded);
        assert_eq!(shown(&o, "b"), Value::Null);
        answer(&mut o, "b", Some(1), Outcome::Recorded);
        assert_eq!(shown(&o, "b"), 1);
    }

    #[test]
    fn histogram_is_cumulative() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(5));
        assert_eq!(h.count(), 3);
        assert_eq!(h.counts[0], 1, "<= 100us");
        assert_eq!(h.counts[5], 2, "<= 5ms");
        assert_eq!(h.counts[BUCKETS.len() - 1], 2, "<= 1s; 5 s only in +Inf");
    }

    #[test]
    fn database_families_appear_with_a_database_sink() {
        let mut s = Snapshot::default();
        assert!(!prometheus(&s).contains("sink_"));
        let mut d = DbMetrics::default();
        d.batch_rows.observe_value(100.0);
        d.commit_latency.observe(Duration::from_millis(2));
        d.waiting_reports = 3;
        s.database = Some(d);
        let text = prometheus(&s);
        for needle in [
            "quic_report_sink_batch_rows_bucket{le=\"128\"} 1",
            "quic_report_sink_batch_rows_bucket{le=\"64\"} 0",
            "quic_report_sink_commit_seconds_count 1",
            "quic_report_sink_waiting_reports 3",
            "quic_report_sink_errors_total 0",
        ] {
            assert!(text.contains(needle), "{needle} in:\n{text}");
        }
    }

    #[test]
    fn prometheus_text_has_every_family() {
        let mut s = Snapshot {
            recorded: 7,
            ..Snapshot::default()
        };
        s.rejected.insert("invalid_json", 2);
        s.handshake.observe(Duration::from_millis(1));
        let text = prometheus(&s);
        for needle in [
            "quic_report_reports_recorded_total 7",
            "quic_report_rejected_total{reason=\"invalid_json\"} 2",
            "quic_report_handshake_seconds_count 1",
            "quic_report_report_seconds_bucket{le=\"+Inf\"} 0",
            "# TYPE quic_report_connections_open gauge",
        ] {
            assert!(text.contains(needle), "{needle} in:\n{text}");
        }
    }
}
