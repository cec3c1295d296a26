//! The client's helper thread: GET the source URL on a fixed-rate schedule
//! (ureq, blocking), turn each good answer into a [`Sample`], send it over a
//! channel and wake the driver loop.
//!
//! Schedule: fetch `k` starts at `start + k * interval` (the first at once);
//! a fetch that overruns skips the ticks it missed rather than bunching up,
//! and the schedule never drifts. A failed fetch (connection refused,
//! timeout, non-200 status, not JSON, not an object) is logged as a warning
//! and skipped. The thread stops when the receiver is dropped, when the
//! [`Fetcher`] is stopped or dropped (promptly: it sleeps on a stop
//! channel), or after `count` good samples.

use std::io;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::Waker;
use quic_report_core::Sample;

/// Largest source body we read.
pub const MAX_BODY_BYTES: u64 = 64 * 1024;

/// What to fetch and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchOptions {
    /// The source's URL (`http://` only: the driver is built without TLS for
    /// HTTP).
    pub url: String,
    /// Time between fetch starts (must not be zero).
    pub interval: Duration,
    /// Stop after this many good samples.
    pub count: Option<u64>,
}

impl FetchOptions {
    /// The timeout of one request: `min(interval, 5 s)`, at least 1 s.
    pub fn request_timeout(&self) -> Duration {
        self.interval
            .min(Duration::from_secs(5))
            .max(Duration::from_secs(1))
    }

    /// Checks the URL and the interval.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval.is_zero() {
            return Err("the fetch interval must not be zero".into());
        }
        let uri: ureq::http::Uri = self
            .url
            .parse()
            .map_err(|e| format!("source URL {:?}: {e}", self.url))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "source URL {:?}: scheme {other:?} not supported (use http)",
                    self.url
                ));
            }
            None => {
                return Err(format!(
                    "source URL {:?} has no scheme (e.g. http://host:port/)",
                    self.url
                ));
            }
        }
        if uri.host().is_none() {
            return Err(format!("source URL {:?} has no host", self.url));
        }
        Ok(())
    }
}

/// The running fetch thread. Dropping it stops the thread (without waiting).
#[derive(Debug)]
pub struct Fetcher {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Fetcher {
    /// Starts the thread: each good sample goes to `samples`, then `waker`
    /// is woken.
    pub fn spawn(
        opts: FetchOptions,
        samples: Sender<Sample>,
        waker: Arc<Waker>,
    ) -> io::Result<Fetcher> {
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name("quic-report-fetch".into())
            .spawn(move || {
                fetch_loop(&opts, &samples, &waker, &stop_rx);
                log::debug!("fetch thread stopped");
            })?;
        Ok(Fetcher {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Asks the thread to stop (it finishes a request in progress first).
    pub fn stop(&mut self) {
        self.stop = None;
    }

    /// Stops the thread and waits for it (at most one request timeout).
    pub fn join(mut self) {
        self.stop = None;
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::warn!("the fetch thread panicked");
        }
    }
}

/// Whether the URL's host is an IP address (no DNS lookup needed).
fn source_host_is_ip(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.parse::<std::net::IpAddr>().is_ok()
}

fn fetch_loop(
    opts: &FetchOptions,
    samples: &Sender<Sample>,
    waker: &Waker,
    stop: &mpsc::Receiver<()>,
) {
    let t = Some(opts.request_timeout());
    let builder = ureq::Agent::config_builder().http_status_as_error(false);
    // ureq resolves on a thread of its own for every request when a global
    // timeout is set (to bound a hanging DNS lookup). A source given by IP
    // needs no lookup: bound each phase instead, and no thread is spawned
    // (it cost ~250 us of CPU and 3 context switches per report).
    let config = if source_host_is_ip(&opts.url) {
        builder
            .timeout_connect(t)
            .timeout_send_request(t)
            .timeout_recv_response(t)
            .timeout_recv_body(t)
            .build()
    } else {
        builder.timeout_global(t).build()
    };
    let agent = ureq::Agent::new_with_config(config);
    let mut base = Instant::now();
    let mut k: u32 = 0;
    let mut good: u64 = 0;
    loop {
        match fetch_once(&agent, &opts.url, opts.request_timeout()) {
            Ok(sample) => {
                if samples.send(sample).is_err() {
                    return; // the driver is gone
                }
                if let Err(e) = waker.wake() {
                    log::warn!("cannot wake the driver loop: {e}");
                }
                good += 1;
                if opts.count.is_some_and(|n| good >= n) {
                    log::debug!("fetched {good} samples: done");
                    return;
                }
            }
            Err(why) => log::warn!("fetching {} failed, sample skipped: {why}", opts.url),
        }
        // Next tick on the fixed schedule, skipping ticks already past.
        let now = Instant::now();
        k = k.saturating_add(1);
        let mut next = base + opts.interval.saturating_mul(k);
        if next <= now {
            let behind = now.duration_since(base).as_nanos() / opts.interval.as_nanos().max(1);
            k = u32::try_from(behind + 1).unwrap_or(u32::MAX);
            next = base + opts.interval.saturating_mul(k);
            log::debug!("fetch overran its interval; next fetch at tick {k}");
        }
        if k > 1_000_000 {
            // Rebase so `interval * k` stays far from overflow.
            base = next;
            k = 0;
        }
        match stop.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// One GET: a 200 whose body is a JSON object, as a sample stamped now.
fn fetch_once(agent: &ureq::Agent, url: &str, timeout: Duration) -> Result<Sample, String> {
    let mut resp = agent.get(url).call().map_err(|e| match e {
        ureq::Error::Timeout(_) => format!("no answer within {}", humanize(timeout)),
        other => other.to_string(),
    })?;
    let status = resp.status();
    if status != ureq::http::StatusCode::OK {
        return Err(format!("HTTP status {status}"));
    }
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY_BYTES)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::Timeout(_) => format!("body not complete within {}", humanize(timeout)),
            other => format!("reading the body: {other}"),
        })?;
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    Sample::from_json(&body, ms).map_err(|e| e.to_string())
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

    #[test]
    fn ip_literal_sources_need_no_lookup() {
        assert!(source_host_is_ip("http://127.0.0.1:8000/"));
        assert!(source_host_is_ip("http://[::1]:8000/value"));
        assert!(source_host_is_ip("http://10.1.2.3/"));
        assert!(!source_host_is_ip("http://localhost:8000/"));
        assert!(!source_host_is_ip("http://example.com/x"));
    }
}
