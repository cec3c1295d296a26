//! A one-shot HTTP/0.9 (`hq-interop`) GET over QUIC: connect, send
//! `GET /path\r\n` + FIN on stream 0, read the body until the server's FIN.
//! What `quic-report get https://host:port/latest` runs.
//!
//! ```text
//!   new() ──► Connecting ──established──► Requesting ──FIN──► Done(body)
//!                 │                           │
//!                 └──── closed, timeout ──────┴──► Failed(reason)
//! ```
//!
//! Same Sans-IO shape as [`crate::Client`]: `handle_datagram`,
//! `handle_timeout`, then drain `poll_transmit`; [`HqGet::outcome`] says
//! when it is over.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::client::{DisconnectReason, classify_close};
use crate::config::{CertFiles, HQ_ALPN, Verify, base_config, tls_verify};
use crate::error::{ConfigError, DatagramError};
use crate::rng::CoreRng;
use crate::{DebugLogs, LOCAL_CID_LEN, Transmit, attach_debug_logs};

/// Largest body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// What to fetch, and from where.
#[derive(Debug, Clone)]
pub struct GetConfig {
    /// The server's address.
    pub server: SocketAddr,
    /// Our local address.
    pub local: SocketAddr,
    /// The name to verify in the server's certificate.
    pub server_name: String,
    /// Certificate verification.
    pub verify: Verify,
    /// Our client certificate, for a server that requires one.
    pub client_cert: Option<CertFiles>,
    /// The path, e.g. `/latest`.
    pub path: String,
    /// Give up after this long (default 5 s).
    pub timeout: Duration,
}

/// How the GET ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetOutcome {
    /// The whole body.
    Done(Vec<u8>),
    /// It failed.
    Failed(DisconnectReason),
}

/// The Sans-IO GET.
pub struct HqGet {
    quic: quiche::Connection,
    path: String,
    server_name: String,
    deadline: Instant,
    sent: bool,
    body: Vec<u8>,
    outcome: Option<GetOutcome>,
    closing: bool,
}

impl std::fmt::Debug for HqGet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HqGet")
            .field("path", &self.path)
            .field("outcome", &self.outcome)
            .finish()
    }
}

impl HqGet {
    /// Starts the connection: drain [`HqGet::poll_transmit`] after this.
    pub fn new(
        cfg: GetConfig,
        mut rng: CoreRng,
        now: Instant,
        logs: Option<Box<dyn DebugLogs>>,
    ) -> Result<HqGet, ConfigError> {
        if !cfg.path.starts_with('/') || cfg.path.contains(['\r', '\n', ' ']) {
            return Err(ConfigError::Invalid(format!(
                "bad path {:?}: must start with /",
                cfg.path
            )));
        }
        let mut qc = base_config(cfg.timeout, &[HQ_ALPN])?;
        qc.set_initial_max_data(MAX_BODY as u64);
        qc.set_initial_max_stream_data_bidi_local(MAX_BODY as u64);
        qc.set_initial_max_streams_bidi(0);
        qc.set_initial_max_streams_uni(0);
        tls_verify(&mut qc, &cfg.verify)?;
        if let Some(cert) = &cfg.client_cert {
            cert.load(&mut qc)?;
        }
        let mut logs = logs;
        if logs.is_some() {
            qc.log_keys();
        }
        let mut scid = [0u8; LOCAL_CID_LEN];
        rng.fill(&mut scid);
        let cid = quiche::ConnectionId::from_ref(&scid);
        let mut quic =
            quiche::connect(Some(&cfg.server_name), &cid, cfg.local, cfg.server, &mut qc).map_err(
                |err| ConfigError::Quiche {
                    what: "starting the connection",
                    err,
                },
            )?;
        attach_debug_logs(&mut logs, &mut quic);
        Ok(HqGet {
            quic,
            path: cfg.path,
            server_name: cfg.server_name,
            deadline: now + cfg.timeout,
            sent: false,
            body: Vec::new(),
            outcome: None,
            closing: false,
        })
    }

    /// A datagram arrived.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        to: SocketAddr,
        data: &mut [u8],
    ) -> Result<(), DatagramError> {
        let res = self.quic.recv(data, quiche::RecvInfo { from, to });
        self.progress(now);
        match res {
            Ok(_) | Err(quiche::Error::Done) => Ok(()),
            Err(e) => Err(DatagramError::Quic(e)),
        }
    }

    /// The deadline from [`HqGet::poll_timeout`] passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.quic.timeout_instant().is_some_and(|t| t <= now) {
            self.quic.on_timeout();
        }
        if now >= self.deadline && self.outcome.is_none() {
            self.finish(GetOutcome::Failed(DisconnectReason::ConnectTimeout));
        }
        self.progress(now);
    }

    /// The next datagram to send. Call until `None`.
    #[must_use]
    pub fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        match self.quic.send(buf) {
            Ok((len, info)) => Some(Transmit::sent(len, &info)),
            Err(_) => None,
        }
    }

    /// When to call [`HqGet::handle_timeout`].
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_finished() {
            return None;
        }
        let q = self.quic.timeout_instant();
        Some(q.map_or(self.deadline, |q| q.min(self.deadline)))
    }

    /// The result, once there is one.
    pub fn outcome(&self) -> Option<&GetOutcome> {
        self.outcome.as_ref()
    }

    /// Whether there is an outcome and the CONNECTION_CLOSE is sent.
    pub fn is_finished(&self) -> bool {
        self.outcome.is_some() && (self.quic.is_draining() || self.quic.is_closed())
    }

    fn finish(&mut self, outcome: GetOutcome) {
        if self.outcome.is_none() {
            self.outcome = Some(outcome);
        }
        if !self.closing {
            self.closing = true;
            let _ = self
                .quic
                .close(true, crate::config::codes::NO_ERROR, b"done");
        }
    }

    fn progress(&mut self, _now: Instant) {
        if self.quic.is_closed() && self.outcome.is_none() {
            let reason = classify_close(&self.quic, self.quic.is_established(), &self.server_name);
            self.outcome = Some(GetOutcome::Failed(reason));
            return;
        }
        if self.quic.is_established() && !self.sent {
            let req = format!("GET {}\r\n", self.path);
            if self.quic.stream_send(0, req.as_bytes(), true).is_ok() {
                self.sent = true;
            }
        }
        if !self.quic.stream_readable(0) {
            return;
        }
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.quic.stream_recv(0, &mut buf) {
                Ok((n, fin)) => {
                    self.body.extend_from_slice(&buf[..n]);
                    if self.body.len() > MAX_BODY {
                        let why = format!("body larger than {MAX_BODY} bytes");
                        self.finish(GetOutcome::Failed(DisconnectReason::Protocol(why)));
                        return;
                    }
                    if fin {
                        let body = std::mem::take(&mut self.body);
                        self.finish(GetOutcome::Done(body));
                        return;
                    }
                }
                Err(quiche::Error::Done) => return,
                Err(e) => {
                    let why = format!("stream 0: {e}");
                    self.finish(GetOutcome::Failed(DisconnectReason::Protocol(why)));
                    return;
                }
            }
        }
    }
}
