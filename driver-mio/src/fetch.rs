//! The client's helper thread, as the design asks: it GETs the source URL
//! with a [`ureq::Agent`] on a fixed-rate schedule, turns each good answer
//! into a [`Sample`] and hands it to the client loop through the loop's
//! sample channel and its `mio::Waker` ([`crate::SampleSender`]). The loop
//! stays the one owner of the UDP socket, the timers and the reconnects;
//! this thread owns only its HTTP connection.
//!
//! What ureq brings: a kept-alive connection between fetches, `https://`
//! sources (rustls; the trust store is [`SourceTrust`]: `--source-ca FILE`
//! or the system's roots), redirects (at most [`MAX_REDIRECTS`]) and a
//! proxy ([`SourceProxy`], from `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY` and
//! `NO_PROXY`; ureq tunnels through it with `CONNECT`).
//!
//! Schedule ([`Schedule`]): fetch `k` starts at `start + k * interval` (the
//! first at once); a fetch that overruns skips the ticks it missed rather
//! than bunching up, and the schedule never drifts. After `count` good
//! samples the thread stops. Each step of a request (the lookup, the
//! connection, sending, the answer's head, its body) must end within
//! [`FetchOptions::request_timeout`]; the body is at most
//! [`MAX_BODY_BYTES`]. A failed fetch is skipped with a warning naming its
//! cause ([`FetchError`]; at most one line per 10 s, counting the others,
//! for a source that stays down); the schedule goes on. A proxy is named
//! without its password.
//!
//! The thread stops when the loop drops its [`Fetcher`] (promptly: it waits
//! for the next tick on a stop channel; a request in progress finishes
//! first, within its timeout) or when the loop is gone.

use std::fmt;
use std::io;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quic_report_core::Sample;
use quic_report_core::config::DEFAULT_MAX_REPORT_BYTES;
use ureq::http::{StatusCode, Uri};
use ureq::tls::{Certificate, RootCerts, TlsConfig};
use ureq::unversioned::transport::DefaultConnector;
use ureq::{Agent, Proxy};

use crate::source_resolver::SourceResolver;

use crate::client::SampleSender;

/// Largest source body we read: 63 KiB, so that the report made of it
/// (the body's fields plus `id`, `client`, `seq` and `sampled_at_ms`, at
/// most a few hundred bytes) fits the server's default limit of 64 KiB a
/// report. At 64 KiB a body near the limit was fetched, spooled and sent,
/// then refused for good as `too_large`.
pub const MAX_BODY_BYTES: u64 = 63 * 1024;

/// Redirects followed per fetch at most; one more is an error.
pub const MAX_REDIRECTS: u32 = 5;

/// The longest fetch interval (ten years): the schedule adds multiples of
/// it to a clock reading, which must not overflow.
pub const MAX_INTERVAL: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// What to fetch, how often, whom to trust and through which proxy.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The source's URL, `http://` or `https://`.
    pub url: String,
    /// Time between fetch starts (must not be zero).
    pub interval: Duration,
    /// Stop after this many good samples.
    pub count: Option<u64>,
    /// The CAs an `https://` source (or a redirect to one) must chain to.
    pub trust: SourceTrust,
    /// The proxy to reach the source through (`None`: directly).
    pub proxy: Option<SourceProxy>,
    /// How host names are looked up (default: the system's resolver). Its
    /// clones share their lookups under way, so the bound on lookup
    /// threads holds for everything made from these options: every agent
    /// of a [`Fetcher`], the one it builds again after a panic and the
    /// threads it starts again.
    pub resolver: SourceResolver,
}

impl FetchOptions {
    /// Fetch `url` every `interval`, no count, trusting no CA (enough for
    /// `http://`; set [`FetchOptions::trust`] for `https://`), no proxy.
    pub fn new(url: impl Into<String>, interval: Duration) -> FetchOptions {
        FetchOptions {
            url: url.into(),
            interval,
            count: None,
            trust: SourceTrust::none(),
            proxy: None,
            resolver: SourceResolver::default(),
        }
    }

    /// The timeout of each step of a request: `min(interval, 5 s)`, at
    /// least 1 s.
    pub fn request_timeout(&self) -> Duration {
        self.interval
            .min(Duration::from_secs(5))
            .max(Duration::from_secs(1))
    }

    /// Checks the URL, the interval and the proxy.
    pub fn validate(&self) -> Result<(), String> {
        self.uri().map(drop)?;
        self.agent().map(drop)
    }

    /// The URL, checked.
    fn uri(&self) -> Result<Uri, String> {
        if self.interval.is_zero() {
            return Err("the fetch interval must not be zero".into());
        }
        if self.interval > MAX_INTERVAL {
            return Err("the fetch interval must be at most 10 years".into());
        }
        let shown = crate::redact::password(&self.url);
        let uri: Uri = self
            .url
            .parse()
            .map_err(|e| format!("source URL {shown:?}: {e}"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            Some(other) => {
                return Err(format!(
                    "source URL {shown:?}: scheme {other:?} not supported (use http or https)"
                ));
            }
            None => {
                return Err(format!(
                    "source URL {shown:?} has no scheme (e.g. http://host:port/)"
                ));
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("source URL {shown:?} has no host"));
        }
        Ok(uri)
    }

    /// The agent every fetch goes through.
    fn agent(&self) -> Result<Agent, String> {
        self.uri()?;
        let t = Some(self.request_timeout());
        let proxy = match &self.proxy {
            Some(p) => Some(p.to_ureq()?),
            None => None,
        };
        let tls = TlsConfig::builder()
            .root_certs(RootCerts::Specific(Arc::clone(&self.trust.roots)))
            .build();
        let builder = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(MAX_REDIRECTS)
            .max_idle_connections(1)
            .max_idle_connections_per_host(1)
            .user_agent(concat!("quic-report/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls)
            .proxy(proxy);
        // Each phase is bounded, so a timeout names the one that ran out.
        // The lookup too: the agent's own resolver would leave a thread
        // behind at every lookup that times out; ours keeps at most one per
        // name (crate::source_resolver), shared by every agent of these
        // options.
        let config = builder
            .timeout_resolve(t)
            .timeout_connect(t)
            .timeout_send_request(t)
            .timeout_recv_response(t)
            .timeout_recv_body(t)
            .build();
        Ok(Agent::with_parts(
            config,
            DefaultConnector::default(),
            self.resolver.clone(),
        ))
    }
}

/// The CAs that an `https://` source's certificate must chain to.
#[derive(Clone)]
pub struct SourceTrust {
    roots: Arc<Vec<Certificate<'static>>>,
    what: String,
}

impl fmt::Debug for SourceTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SourceTrust({}, {} CAs)", self.what, self.roots.len())
    }
}

impl SourceTrust {
    /// No CA at all: every `https://` source is refused.
    pub fn none() -> SourceTrust {
        SourceTrust {
            roots: Arc::default(),
            what: "no CA (http sources only)".into(),
        }
    }

    /// The system's roots, read now (the file named by `SSL_CERT_FILE` or
    /// the system bundle, and `SSL_CERT_DIR`, as OpenSSL finds them).
    /// Certificates that do not parse are skipped with a warning.
    pub fn system() -> SourceTrust {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            log::warn!("reading the system's CA certificates: {e}");
        }
        let roots: Vec<_> = found
            .certs
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        if roots.is_empty() {
            log::warn!("no CA certificates found on this system: https sources will be refused");
        }
        SourceTrust {
            roots: Arc::new(roots),
            what: "the system's CA certificates".into(),
        }
    }

    /// Exactly the CA certificates in the PEM file `path` (`--source-ca`).
    pub fn ca_file(path: &Path) -> Result<SourceTrust, String> {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut roots = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => roots.push(c),
                Ok(_) => {}
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
        if roots.is_empty() {
            return Err(format!("{}: no PEM certificate in it", path.display()));
        }
        Ok(SourceTrust {
            roots: Arc::new(roots),
            what: format!("the CA in {}", path.display()),
        })
    }
}

/// A proxy for the source: ureq opens a `CONNECT` tunnel through it, for
/// `http://` and `https://` sources alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceProxy {
    /// `http://[user:pass@]host:port` (a missing scheme means `http`).
    pub url: String,
    /// Hosts reached directly: `NO_PROXY` entries (`host`, `.suffix`,
    /// `*.suffix`, `*`).
    pub no_proxy: Vec<String>,
}

impl SourceProxy {
    /// The proxy the environment names for `source_url`, as curl reads it:
    /// `HTTPS_PROXY` (or `https_proxy`) for an `https://` source,
    /// `HTTP_PROXY` (or `http_proxy`) for an `http://` one, else
    /// `ALL_PROXY` (or `all_proxy`); `NO_PROXY` (or `no_proxy`) lists the
    /// hosts reached directly. Empty variables count as unset.
    pub fn from_env(source_url: &str) -> Option<SourceProxy> {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
        };
        let https = source_url
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
        let by_scheme: &[&str] = if https {
            &["HTTPS_PROXY", "https_proxy"]
        } else {
            &["HTTP_PROXY", "http_proxy"]
        };
        let url = var(by_scheme).or_else(|| var(&["ALL_PROXY", "all_proxy"]))?;
        let no_proxy = var(&["NO_PROXY", "no_proxy"])
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Some(SourceProxy { url, no_proxy })
    }

    fn to_ureq(&self) -> Result<Proxy, String> {
        let bad = |e: ureq::Error| format!("proxy {:?}: {e}", crate::redact::password(&self.url));
        let parsed = Proxy::new(&self.url).map_err(bad)?;
        let mut b = Proxy::builder(parsed.protocol())
            .host(parsed.host())
            .port(parsed.port());
        if let Some(u) = parsed.username() {
            b = b.username(u);
        }
        if let Some(p) = parsed.password() {
            b = b.password(p);
        }
        for entry in &self.no_proxy {
            b = b.no_proxy(entry);
        }
        b.build().map_err(bad)
    }
}

/// Why a fetch gave no sample: each names its cause.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The source's host name does not resolve.
    #[error("looking up {host}: no such host")]
    HostNotFound {
        /// The host.
        host: String,
    },
    /// The TCP connection could not be opened.
    #[error("connecting to {host}: {source}")]
    Connect {
        /// The host.
        host: String,
        /// The OS error.
        source: io::Error,
    },
    /// No complete answer within the request timeout.
    #[error("no answer within {after} ({phase})")]
    Timeout {
        /// The request timeout, as written.
        after: String,
        /// The step that ran out of time.
        phase: &'static str,
    },
    /// TLS failed: the certificate was refused, or the handshake broke.
    #[error("TLS with {host}: {why} (trusting {trust})")]
    Tls {
        /// The host.
        host: String,
        /// rustls's words.
        why: String,
        /// What the certificate was checked against.
        trust: String,
    },
    /// The proxy refused or failed the tunnel.
    #[error("proxy {proxy}: {why}")]
    Proxy {
        /// The proxy's URL.
        proxy: String,
        /// What it said.
        why: String,
    },
    /// More than [`MAX_REDIRECTS`] redirects.
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
    /// The final answer was not `200 OK`.
    #[error("HTTP status {0}")]
    Status(StatusCode),
    /// The body is over [`MAX_BODY_BYTES`].
    #[error("body larger than {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    /// The body is within [`MAX_BODY_BYTES`], but the report made of it
    /// may not be within the server's default limit (its fields written out
    /// again, `1e2` as `100.0`, can be longer).
    #[error(
        "the report made of the body could be {bytes} bytes, over the server's limit of \
         {DEFAULT_MAX_REPORT_BYTES} (its JSON written out again is longer than the source's)"
    )]
    ReportTooLarge {
        /// Its length at most.
        bytes: usize,
    },
    /// The answer is not HTTP as we know it.
    #[error("bad response: {0}")]
    Protocol(String),
    /// The connection failed in the middle of the exchange.
    #[error("talking to {host}: {source}")]
    Io {
        /// The host.
        host: String,
        /// The OS error.
        source: io::Error,
    },
    /// The body is not a JSON object.
    #[error(transparent)]
    Sample(#[from] quic_report_core::report::SampleError),
    /// The HTTP client panicked (a bug): the fetch thread goes on with a
    /// new agent.
    #[error("the HTTP client panicked")]
    Panicked,
    /// Anything else ureq reports.
    #[error("{0}")]
    Other(String),
}

/// The fixed-rate schedule of fetch starts (see the module documentation).
#[derive(Debug, Clone)]
pub struct Schedule {
    base: Instant,
    interval: Duration,
    k: u32,
}

impl Schedule {
    /// A schedule whose tick 0 is `start`.
    pub fn new(start: Instant, interval: Duration) -> Schedule {
        Schedule {
            base: start,
            interval,
            k: 0,
        }
    }

    /// The fetch of the current tick ended at `now`: the next tick, skipping
    /// ticks already past.
    pub fn next_after(&mut self, now: Instant) -> Instant {
        self.k = self.k.saturating_add(1);
        let mut next = self.tick(self.k);
        if next <= now {
            let behind = now.duration_since(self.base).as_nanos() / self.interval.as_nanos().max(1);
            self.k = u32::try_from(behind + 1).unwrap_or(u32::MAX);
            next = self.tick(self.k);
            log::debug!("fetch overran its interval; next fetch at tick {}", self.k);
        }
        if self.k > 1_000_000 {
            // Rebase so `interval * k` stays far from overflow.
            self.base = next;
            self.k = 0;
        }
        next
    }

    /// When tick `k` is (the far future if that is past what the clock can
    /// hold: an interval beyond [`MAX_INTERVAL`]).
    fn tick(&self, k: u32) -> Instant {
        let far = self.base.checked_add(MAX_INTERVAL).unwrap_or(self.base);
        self.base
            .checked_add(self.interval.saturating_mul(k))
            .unwrap_or(far)
    }
}

/// The running fetch thread. Dropping it stops the thread (without waiting
/// for a request in progress).
///
/// A panic in a fetch is caught there (the fetch fails, the thread goes on
/// with a new agent). Should the thread end by a panic anyway, it wakes the
/// loop as it ends, and [`Fetcher::restart_if_dead`] logs it and starts
/// another for the samples still wanted, [`restart_pause`] later (so a
/// panic that comes back costs a thread and a line per pause, not a hot
/// loop); a start that fails is tried again after the same pause. A
/// client whose fetching died would otherwise stay up, reporting nothing,
/// with nothing in its logs past the panic.
#[derive(Debug)]
pub struct Fetcher {
    opts: FetchOptions,
    samples: SampleSender,
    /// What every thread this fetcher started shares.
    shared: Arc<Shared>,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// The thread died: when the next one starts.
    restart_at: Option<Instant>,
}

/// The state of the fetch threads that outlives each one.
#[derive(Debug, Default)]
struct Shared {
    /// Good samples sent so far, by every thread.
    sent: AtomicU64,
    /// The failed-fetch warnings' rate limit: a thread started again does
    /// not start a new allowance.
    failures: Mutex<crate::observe::Throttle>,
}

/// How long after the fetch thread died the next one starts: the fetch
/// interval, within 1 s to 60 s.
pub fn restart_pause(interval: Duration) -> Duration {
    interval.clamp(Duration::from_secs(1), Duration::from_secs(60))
}

impl Fetcher {
    /// Builds the agent (a bad proxy URL is an error here) and starts the
    /// thread; each good sample goes to `samples`.
    pub fn spawn(opts: &FetchOptions, samples: SampleSender) -> Result<Fetcher, String> {
        let mut f = Fetcher {
            opts: opts.clone(),
            samples,
            shared: Arc::default(),
            stop: None,
            thread: None,
            restart_at: None,
        };
        f.start()?;
        Ok(f)
    }

    fn start(&mut self) -> Result<(), String> {
        let mut source = Source::new(&self.opts)?;
        let interval = self.opts.interval;
        let shared = Arc::clone(&self.shared);
        let count = self
            .opts
            .count
            .map(|n| n.saturating_sub(shared.sent.load(Ordering::SeqCst)));
        let samples = self.samples.clone();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name("quic-report-fetch".into())
            .spawn(move || {
                // Wakes the loop however the thread ends.
                let _ended = Ended(samples.clone());
                source.run(interval, count, &samples, &shared, &stop_rx);
                log::debug!("fetch thread stopped");
            })
            .map_err(|e| format!("starting the fetch thread: {e}"))?;
        self.stop = Some(stop_tx);
        self.thread = Some(thread);
        Ok(())
    }

    /// Whether the thread has ended (`count` samples, or the loop is gone)
    /// and none is to start again.
    pub fn is_finished(&self) -> bool {
        self.restart_at.is_none() && self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// When [`Fetcher::restart_if_dead`] is next due: a thread to start
    /// again after a death.
    pub fn restart_due(&self) -> Option<Instant> {
        self.restart_at
    }

    /// If the thread ended by a panic: logs it, and [`restart_pause`]
    /// later (call again then: [`Fetcher::restart_due`]) starts another
    /// for the samples still wanted. Returns whether it started one now.
    pub fn restart_if_dead(&mut self, now: Instant) -> bool {
        let pause = restart_pause(self.opts.interval);
        if self.thread.as_ref().is_some_and(JoinHandle::is_finished)
            && let Some(Err(panic)) = self.thread.take().map(JoinHandle::join)
        {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            log::error!(
                "the fetch thread died ({why}): starting another in {}",
                humanize(pause)
            );
            self.restart_at = Some(now + pause);
        }
        if self.restart_at.is_none_or(|at| at > now) {
            return false;
        }
        match self.start() {
            Ok(()) => {
                self.restart_at = None;
                log::warn!("the fetch thread started again");
                true
            }
            Err(e) => {
                log::error!("{e}; trying again in {}", humanize(pause));
                self.restart_at = Some(now + pause);
                false
            }
        }
    }
}

/// Wakes the client loop when dropped (the fetch thread ending).
struct Ended(SampleSender);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.wake();
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.stop = None;
        // Not joined: a request in progress ends once its current step
        // times out at the latest, and its sample finds the loop gone.
        drop(self.thread.take());
    }
}

/// One GET at a time of the source, as the fetch thread does it (also for
/// callers that want a single sample, and for tests).
#[derive(Debug)]
pub struct Source {
    opts: FetchOptions,
    agent: Agent,
    url: String,
    host: String,
    timeout: Duration,
    trust: String,
    proxy: Option<String>,
}

impl Source {
    /// The agent for `opts` (a bad URL or proxy is an error here).
    pub fn new(opts: &FetchOptions) -> Result<Source, String> {
        Ok(Source {
            opts: opts.clone(),
            agent: opts.agent()?,
            url: opts.url.clone(),
            host: opts.uri()?.host().unwrap_or_default().to_owned(),
            timeout: opts.request_timeout(),
            trust: opts.trust.what.clone(),
            // Shown in errors: without its password.
            proxy: opts.proxy.as_ref().map(|p| crate::redact::password(&p.url)),
        })
    }

    fn run(
        &mut self,
        interval: Duration,
        count: Option<u64>,
        samples: &SampleSender,
        shared: &Shared,
        stop: &mpsc::Receiver<()>,
    ) {
        if count == Some(0) {
            return;
        }
        let mut schedule = Schedule::new(Instant::now(), interval);
        let mut good: u64 = 0;
        loop {
            let fetched = std::panic::catch_unwind(AssertUnwindSafe(|| self.fetch()))
                .unwrap_or_else(|_| {
                    // Its pool may be left half-changed: a new agent.
                    if let Ok(agent) = self.opts.agent() {
                        self.agent = agent;
                    }
                    Err(FetchError::Panicked)
                });
            match fetched {
                Ok(sample) => {
                    if samples.send(sample).is_err() {
                        return; // the loop is gone
                    }
                    shared.sent.fetch_add(1, Ordering::SeqCst);
                    good += 1;
                    if count.is_some_and(|n| good >= n) {
                        log::debug!("fetched {good} samples: done");
                        return;
                    }
                }
                // A source that is down fails every tick: one line per
                // 10 s, with the count of those left out.
                Err(why) => {
                    let allowed = shared
                        .failures
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .allow(Instant::now());
                    if let Some(more) = allowed {
                        log::warn!(
                            "fetching {} failed, sample skipped: {why}{}",
                            crate::redact::password(&self.url),
                            crate::observe::more_since(more)
                        );
                    }
                }
            }
            let next = schedule.next_after(Instant::now());
            match stop.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// One GET: a 200 whose body is a JSON object, as a sample stamped now.
    pub fn fetch(&self) -> Result<Sample, FetchError> {
        let mut resp = self
            .agent
            .get(&self.url)
            .call()
            .map_err(|e| self.error(e))?;
        let status = resp.status();
        if status != StatusCode::OK {
            return Err(FetchError::Status(status));
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY_BYTES)
            .read_to_vec()
            .map_err(|e| self.error(e))?;
        let sample = Sample::from_json(&body, unix_ms())?;
        let bytes = sample.max_report_len();
        if bytes > DEFAULT_MAX_REPORT_BYTES {
            return Err(FetchError::ReportTooLarge { bytes });
        }
        Ok(sample)
    }

    /// ureq's error in our words.
    fn error(&self, e: ureq::Error) -> FetchError {
        let host = self.host.clone();
        match e {
            ureq::Error::HostNotFound => FetchError::HostNotFound { host },
            ureq::Error::Timeout(t) => FetchError::Timeout {
                after: humanize(self.timeout),
                phase: timeout_phase(t),
            },
            ureq::Error::TooManyRedirects => FetchError::TooManyRedirects,
            ureq::Error::BodyExceedsLimit(_) => FetchError::BodyTooLarge,
            ureq::Error::StatusCode(s) => match StatusCode::from_u16(s) {
                Ok(s) => FetchError::Status(s),
                Err(_) => FetchError::Protocol(format!("status {s}")),
            },
            ureq::Error::Protocol(p) => FetchError::Protocol(p.to_string()),
            ureq::Error::LargeResponseHeader(n, _) => {
                FetchError::Protocol(format!("response head of {n} bytes is too large"))
            }
            ureq::Error::ConnectProxyFailed(why) => FetchError::Proxy {
                proxy: self.proxy.clone().unwrap_or_default(),
                why,
            },
            ureq::Error::Rustls(e) => self.tls(e.to_string()),
            ureq::Error::Tls(why) => self.tls(why.to_owned()),
            ureq::Error::Io(e) => {
                if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    return self.tls(tls.to_string());
                }
                match e.kind() {
                    io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
                    | io::ErrorKind::AddrNotAvailable => match &self.proxy {
                        Some(proxy) => FetchError::Proxy {
                            proxy: proxy.clone(),
                            why: format!("connecting: {e}"),
                        },
                        None => FetchError::Connect { host, source: e },
                    },
                    _ => FetchError::Io { host, source: e },
                }
            }
            other => FetchError::Other(other.to_string()),
        }
    }

    fn tls(&self, why: String) -> FetchError {
        FetchError::Tls {
            host: self.host.clone(),
            why,
            trust: self.trust.clone(),
        }
    }
}

/// The step of the exchange a ureq timeout names.
fn timeout_phase(t: ureq::Timeout) -> &'static str {
    match t {
        ureq::Timeout::Resolve => "looking the host up",
        ureq::Timeout::Connect => "connecting",
        ureq::Timeout::SendRequest | ureq::Timeout::SendBody => "sending the request",
        ureq::Timeout::RecvResponse => "waiting for the response",
        ureq::Timeout::RecvBody => "reading the body",
        _ => "the whole request",
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

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// An HTTP source on 127.0.0.1 answering every request with one sample.
    fn source() -> std::net::SocketAddr {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                let body = r#"{"value": 5}"#;
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        addr
    }

    /// A fetcher for `opts` whose thread has died of a panic, as if it had
    /// sent `sent` samples; and where its samples go.
    fn died(opts: FetchOptions, sent: u64) -> (Fetcher, mpsc::Receiver<Sample>, mio::Poll) {
        let poll = mio::Poll::new().expect("poll");
        let waker = mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker");
        let (tx, rx) = mpsc::channel();
        let thread = thread::spawn(|| panic!("a bug outside a fetch"));
        while !thread.is_finished() {
            thread::sleep(ms(1));
        }
        let f = Fetcher {
            opts,
            samples: SampleSender::new(tx, Arc::new(waker)),
            shared: Arc::new(Shared {
                sent: AtomicU64::new(sent),
                failures: Mutex::default(),
            }),
            stop: None,
            thread: Some(thread),
            restart_at: None,
        };
        (f, rx, poll)
    }

    #[test]
    fn a_dead_fetch_thread_starts_again_after_a_pause_for_the_samples_still_wanted() {
        let opts = FetchOptions {
            count: Some(3),
            ..FetchOptions::new(format!("http://{}/", source()), ms(50))
        };
        let pause = restart_pause(opts.interval);
        assert_eq!(pause, Duration::from_secs(1));
        let (mut f, samples, _poll) = died(opts, 2);
        let t0 = Instant::now();
        assert!(!f.restart_if_dead(t0), "not at once");
        assert_eq!(f.restart_due(), Some(t0 + pause));
        assert!(!f.is_finished(), "a thread is still to come");
        assert!(!f.restart_if_dead(t0 + pause - ms(1)));
        assert!(f.restart_if_dead(t0 + pause), "started when due");
        assert_eq!(f.restart_due(), None);
        // One sample still wanted of the 3, then the thread ends as it
        // should, and nothing starts again.
        let s = samples
            .recv_timeout(Duration::from_secs(10))
            .expect("a sample");
        assert_eq!(s.fields["value"], 5);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f.is_finished() && Instant::now() < deadline {
            thread::sleep(ms(5));
        }
        assert!(f.is_finished());
        assert!(!f.restart_if_dead(Instant::now() + pause * 2));
        assert_eq!(f.restart_due(), None);
        assert!(samples.try_recv().is_err(), "only the sample still wanted");
    }

    #[test]
    fn a_fetch_thread_that_cannot_start_again_is_tried_again_after_each_pause() {
        // Options that cannot make an agent: every start fails.
        let (mut f, _samples, _poll) = died(FetchOptions::new("ftp://nowhere/", ms(50)), 0);
        let t0 = Instant::now();
        let pause = restart_pause(ms(50));
        assert!(!f.restart_if_dead(t0));
        assert!(!f.restart_if_dead(t0 + pause), "the start fails");
        assert_eq!(f.restart_due(), Some(t0 + pause * 2), "tried again later");
        assert!(!f.is_finished());
    }

    #[test]
    fn the_schedule_is_fixed_rate_without_drift() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, Duration::from_secs(2));
        // Finished late: the next tick stays on the grid.
        assert_eq!(s.next_after(t0 + ms(30)), t0 + ms(2000));
        assert_eq!(s.next_after(t0 + ms(2900)), t0 + ms(4000));
        assert_eq!(s.next_after(t0 + ms(4001)), t0 + ms(6000));
    }

    #[test]
    fn an_overrunning_fetch_skips_the_ticks_it_missed() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, ms(100));
        assert_eq!(
            s.next_after(t0 + ms(350)),
            t0 + ms(400),
            "ticks 1-3 skipped"
        );
        // Ended exactly on a tick: that tick is past, the next one counts.
        assert_eq!(s.next_after(t0 + ms(500)), t0 + ms(600));
    }

    #[test]
    fn an_interval_past_what_the_clock_holds_never_panics() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, Duration::MAX);
        assert!(s.next_after(t0) > t0);
        assert!(
            FetchOptions::new("http://x/", MAX_INTERVAL + ms(1))
                .validate()
                .is_err()
        );
    }

    #[test]
    fn options_are_checked() {
        let ok = FetchOptions::new("http://[::1]:8000/", Duration::from_secs(2));
        assert!(ok.validate().is_ok());
        assert!(
            FetchOptions::new("https://localhost/", ok.interval)
                .validate()
                .is_ok()
        );
        for url in ["ftp://x/", "127.0.0.1:8000", "http://", "http:///x"] {
            let o = FetchOptions::new(url, ok.interval);
            assert!(o.validate().is_err(), "{url} accepted");
        }
        assert!(
            FetchOptions::new("http://x/", Duration::ZERO)
                .validate()
                .is_err()
        );
        let mut bad_proxy = ok.clone();
        bad_proxy.proxy = Some(SourceProxy {
            url: "ftp://proxy:1".into(),
            no_proxy: vec![],
        });
        assert!(bad_proxy.validate().is_err());
    }
}
