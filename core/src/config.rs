//! [`ClientConfig`] and [`ServerConfig`]: every knob with its default, and
//! their translation into a `quiche::Config` (ALPN `quic-report/1`, limits).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::backoff::BackoffConfig;
use crate::dedup::DedupConfig;
use crate::error::ConfigError;
use crate::token::ServerSecret;

/// The client queue's default byte limit: 64 MiB of reports (with the
/// default 10,000 reports, it binds only for samples over 6.7 KiB on
/// average).
pub const DEFAULT_QUEUE_LIMIT_BYTES: usize = 64 * 1024 * 1024;

/// The ALPN of protocol `quic-report/1`.
pub const ALPN: &[u8] = b"quic-report/1";

/// The ALPN of HTTP/0.9 over QUIC (the interop runner's `hq-interop`), which
/// the server also speaks, read-only, on the same port.
pub const HQ_ALPN: &[u8] = b"hq-interop";

/// Largest UDP payload we send or accept.
pub const MAX_DATAGRAM_SIZE: usize = 1350;

/// Default largest report object, bytes.
pub const DEFAULT_MAX_REPORT_BYTES: usize = 64 * 1024;

/// Application error codes (CONNECTION_CLOSE and STOP_SENDING), listed in the
/// README's protocol section.
pub mod codes {
    /// Normal close: the client is done, or it abandons a connection.
    pub const NO_ERROR: u64 = 0x0;
    /// The server is shutting down.
    pub const SHUTTING_DOWN: u64 = 0x1;
    /// The client gave up waiting for an answer and will reconnect.
    pub const NO_RESPONSE: u64 = 0x2;
    /// The server closed the connection because it holds too many bytes
    /// for it: answers the client does not read (its flow control keeps
    /// them from being sent) plus reports not yet complete, over
    /// `ServerConfig::max_unanswered_bytes`. Other connections carry on.
    pub const EXCESSIVE_LOAD: u64 = 0x3;
    /// STOP_SENDING: the object on this stream is over the size limit.
    pub const REPORT_TOO_LARGE: u64 = 0x10;
    /// STOP_SENDING: the stream had a fatal error; the rest is not read.
    pub const STREAM_REJECTED: u64 = 0x11;
    /// Transport CONNECTION_CLOSE (CRYPTO_ERROR, RFC 9001 4.8: 0x100 + the
    /// TLS alert): a peer without a client certificate, on a server that
    /// requires one (TLS alert 116, certificate_required).
    pub const CERTIFICATE_REQUIRED: u64 = 0x100 + 116;
    /// Transport CONNECTION_CLOSE (CRYPTO_ERROR): a client certificate
    /// whose subject name cannot be an identity (TLS alert 42,
    /// bad_certificate; see [`crate::identity`]).
    pub const BAD_CERTIFICATE: u64 = 0x100 + 42;
}

/// A certificate and its private key, both PEM files: what a client, `get`
/// or the bench presents to a server that requires client certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate chain (the leaf first).
    pub cert_chain: PathBuf,
    /// PEM private key of the leaf.
    pub private_key: PathBuf,
}

impl CertFiles {
    /// Loads the chain and the key into a quiche config.
    pub(crate) fn load(&self, c: &mut quiche::Config) -> Result<(), ConfigError> {
        let cert = utf8_path(&self.cert_chain)?;
        let key = utf8_path(&self.private_key)?;
        c.load_cert_chain_from_pem_file(cert)
            .map_err(|err| ConfigError::File {
                what: "certificate chain",
                path: self.cert_chain.clone(),
                err,
            })?;
        c.load_priv_key_from_pem_file(key)
            .map_err(|err| ConfigError::File {
                what: "private key",
                path: self.private_key.clone(),
                err,
            })
    }
}

/// A path as quiche takes it (UTF-8).
fn utf8_path(p: &std::path::Path) -> Result<&str, ConfigError> {
    p.to_str()
        .ok_or_else(|| ConfigError::Invalid(format!("path {} is not UTF-8", p.display())))
}

/// How the client checks the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// Verify the chain against the CA certificates in this PEM file, and the
    /// server name.
    ///
    /// quiche also loads BoringSSL's default trust store (the file named by
    /// `SSL_CERT_FILE`, else the system bundle, and `SSL_CERT_DIR`) into
    /// every config, and offers no way to leave it out: a process that must
    /// trust only this file points those variables at nothing before it
    /// builds a client, as the `quic-report` binary does
    /// (`bin/src/tls.rs`).
    CaFile(PathBuf),
    /// Do not verify (development only; the caller should warn).
    Insecure,
}

/// Everything a [`crate::Client`] needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server's address; `None` while it is not known (its name does
    /// not resolve yet): attempts then fail at once, with nothing sent,
    /// until [`crate::Client::set_path`] gives one.
    pub server: Option<SocketAddr>,
    /// Our local address (the socket the caller sends from).
    pub local: SocketAddr,
    /// The name to verify in the server's certificate (and to send as SNI).
    pub server_name: String,
    /// Certificate verification.
    pub verify: Verify,
    /// quiche's idle timeout (default 10 s, as the seed's client).
    pub idle_timeout: Duration,
    /// Give up a connection attempt the server has not answered at all
    /// after this long (default 1 s). Once it answers, the handshake has
    /// until the idle timeout.
    pub connect_timeout: Duration,
    /// Give up a connection whose oldest report has no answer after this
    /// long (default 5 s).
    pub response_timeout: Duration,
    /// Send a keep-alive after this long without sending (default: half the
    /// idle timeout; `None` disables it).
    pub keep_alive: Option<Duration>,
    /// Reconnect backoff.
    pub backoff: BackoffConfig,
    /// Reports kept for resending at most (default 10000).
    pub queue_limit: usize,
    /// Bytes of reports kept for resending at most, each counted at its
    /// length at most (default [`DEFAULT_QUEUE_LIMIT_BYTES`]).
    pub queue_limit_bytes: usize,
    /// Reports in flight on one connection at most (default 64).
    pub max_in_flight: usize,
    /// Bytes of reports in flight on one connection at most (default
    /// 256 KiB, a quarter of the server's default unanswered-bytes limit);
    /// one report always goes, whatever its size.
    pub max_in_flight_bytes: usize,
    /// The `client` field; random hex when `None`.
    pub client_id: Option<String>,
    /// Our client certificate, for a server that requires one (`--cert`,
    /// `--key`); `None`: none is presented.
    pub client_cert: Option<CertFiles>,
}

impl ClientConfig {
    /// Defaults for a client of `server`, sending from `local`, verifying
    /// against the CA in `ca`.
    pub fn new(server: SocketAddr, local: SocketAddr, verify: Verify) -> ClientConfig {
        let idle = Duration::from_secs(10);
        ClientConfig {
            server: Some(server),
            local,
            server_name: default_server_name(server),
            verify,
            idle_timeout: idle,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(5),
            keep_alive: Some(idle / 2),
            backoff: BackoffConfig::default(),
            queue_limit: 10_000,
            queue_limit_bytes: DEFAULT_QUEUE_LIMIT_BYTES,
            max_in_flight: 64,
            max_in_flight_bytes: 256 * 1024,
            client_id: None,
            client_cert: None,
        }
    }

    pub(crate) fn quiche_config(&self) -> Result<quiche::Config, ConfigError> {
        let mut c = base_config(self.idle_timeout, &[ALPN])?;
        // The server opens no streams towards us.
        c.set_initial_max_streams_bidi(0);
        c.set_initial_max_streams_uni(0);
        c.set_initial_max_stream_data_bidi_local(256 * 1024);
        c.set_initial_max_stream_data_bidi_remote(0);
        c.set_initial_max_data(4 * 1024 * 1024);
        tls_verify(&mut c, &self.verify)?;
        if let Some(cert) = &self.client_cert {
            cert.load(&mut c)?;
        }
        c.enable_early_data();
        Ok(c)
    }
}

/// Sets up certificate verification on a quiche config.
pub(crate) fn tls_verify(c: &mut quiche::Config, verify: &Verify) -> Result<(), ConfigError> {
    match verify {
        Verify::CaFile(path) => {
            c.verify_peer(true);
            let p = path.to_str().ok_or_else(|| {
                ConfigError::Invalid(format!("CA path {} is not UTF-8", path.display()))
            })?;
            c.load_verify_locations_from_file(p)
                .map_err(|err| ConfigError::File {
                    what: "CA file",
                    path: path.clone(),
                    err,
                })?;
        }
        Verify::Insecure => c.verify_peer(false),
    }
    Ok(())
}

/// The default certificate name for a server address: `localhost` for a
/// loopback address (the development certificate's name), else the address.
pub fn default_server_name(server: SocketAddr) -> String {
    if server.ip().is_loopback() {
        "localhost".into()
    } else {
        server.ip().to_string()
    }
}

/// When the server asks a new client to prove its address with a Retry
/// round trip (RFC 9000 8.1.2) before it creates any state for it.
///
/// Whatever the mode, an Initial that carries a token is accepted only if
/// the token is valid (minted by this server process for this client
/// address, unexpired); otherwise it is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryMode {
    /// Only while at least `threshold` handshakes are in progress
    /// (connections not yet established): under a flood of Initials, most
    /// likely from spoofed addresses, each costs a round trip and no state.
    Auto {
        /// Handshakes in progress from which on new clients get a Retry.
        threshold: usize,
    },
    /// Every new connection (one extra round trip each).
    Always,
    /// Never.
    Never,
}

impl Default for RetryMode {
    /// `Auto { threshold: 1000 }`.
    fn default() -> Self {
        RetryMode::Auto { threshold: 1000 }
    }
}

/// Peer addresses (paths) a server connection may use over its life.
pub const MAX_PEER_PATHS: u64 = 16;

/// Everything a [`crate::Server`] needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// PEM certificate chain.
    pub cert_chain: PathBuf,
    /// PEM private key.
    pub private_key: PathBuf,
    /// Mutual TLS: every peer must present a client certificate that
    /// chains to one of the CAs in this PEM file, and its subject common
    /// name is the connection's identity ([`crate::identity`]). A peer
    /// without one is closed with [`codes::CERTIFICATE_REQUIRED`] before
    /// any of its streams is read; one that does not verify fails the
    /// handshake with a TLS alert. `None` (the default): anonymous mode,
    /// every peer has the anonymous identity.
    ///
    /// quiche also loads BoringSSL's default trust store into every config
    /// (see [`Verify::CaFile`]): a process that must trust only this file
    /// points `SSL_CERT_FILE` and `SSL_CERT_DIR` at nothing first, as the
    /// `quic-report` binary does.
    pub client_ca: Option<PathBuf>,
    /// quiche's idle timeout (default 30 s, as the seed's server).
    pub idle_timeout: Duration,
    /// Connections at most (default 10000).
    pub max_connections: usize,
    /// Established connections of one certificate identity at once
    /// (default 1000): past it, a new connection of that identity is
    /// closed with [`codes::EXCESSIVE_LOAD`] once its handshake is done, so
    /// that one certificate holder (a device in a reconnect loop, a stolen
    /// key) cannot take every connection slot. The anonymous identity is
    /// not limited by it (without `client_ca` every peer shares it, and
    /// [`ServerConfig::max_connections`] is the bound). A fleet that shares
    /// one certificate among more devices raises it.
    pub max_connections_per_identity: usize,
    /// Concurrent client streams per connection (default 100).
    pub max_streams: u64,
    /// Largest report object in bytes (default 64 KiB).
    pub max_report_bytes: usize,
    /// Reap a connection whose handshake is not done after this long
    /// (default 10 s).
    pub handshake_timeout: Duration,
    /// Memory bounds of the duplicate filter.
    pub dedup: DedupConfig,
    /// The long-lived secret (reset tokens, ticket key, retry tokens). The
    /// binary derives it from the private key; `None` draws a random one
    /// (then nothing survives a restart).
    pub secret: Option<ServerSecret>,
    /// Also speak HTTP/0.9 (`hq-interop`: `GET /path`) for reading the
    /// server's state (default `true`).
    pub http09: bool,
    /// Stateless resets sent per second at most (burst of the same size).
    pub max_resets_per_sec: u32,
    /// Address validation with Retry (default `Auto { threshold: 1000 }`).
    pub retry: RetryMode,
    /// How long a Retry token stays valid (default 10 s).
    pub retry_token_lifetime: Duration,
    /// Bytes the server holds for one connection at most: answers encoded
    /// but not yet taken by quiche (the client does not read them) plus
    /// the bytes of reports not yet complete. Over it, the connection is
    /// closed with [`codes::EXCESSIVE_LOAD`] (default 1 MiB; at least
    /// `max_report_bytes`). Answers to HTTP/0.9 reads are counted apart,
    /// against `max_response_bytes`. It is also the connection's read
    /// budget: the reports of one connection in the application's hands
    /// (twice their bytes and 256 each) are held to about this much, the
    /// rest waiting in quiche until some are answered.
    pub max_unanswered_bytes: usize,
    /// Bytes of HTTP/0.9 answers (`/latest`, `/stats`) the server holds
    /// for one connection at most, not yet taken by quiche: a body is
    /// handed over whole and goes out as the reader's flow control allows.
    /// Over it, the connection is closed with [`codes::EXCESSIVE_LOAD`]
    /// (default 16 MiB, what `quic-report get` accepts).
    pub max_response_bytes: usize,
}

impl ServerConfig {
    /// Defaults around a certificate chain and its key.
    pub fn new(cert_chain: PathBuf, private_key: PathBuf) -> ServerConfig {
        ServerConfig {
            cert_chain,
            private_key,
            client_ca: None,
            idle_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_connections_per_identity: 1000,
            max_streams: 100,
            max_report_bytes: DEFAULT_MAX_REPORT_BYTES,
            handshake_timeout: Duration::from_secs(10),
            dedup: DedupConfig::default(),
            secret: None,
            max_resets_per_sec: 100,
            http09: true,
            retry: RetryMode::default(),
            retry_token_lifetime: Duration::from_secs(10),
            max_unanswered_bytes: 1024 * 1024,
            max_response_bytes: 16 * 1024 * 1024,
        }
    }

    pub(crate) fn quiche_config(&self) -> Result<quiche::Config, ConfigError> {
        if self.max_report_bytes == 0
            || self.max_streams == 0
            || self.max_connections == 0
            || self.max_connections_per_identity == 0
        {
            return Err(ConfigError::Invalid(
                "max report bytes, streams, connections and connections per identity must be at least 1"
                    .into(),
            ));
        }
        if self.max_unanswered_bytes < self.max_report_bytes {
            return Err(ConfigError::Invalid(format!(
                "max unanswered bytes ({}) must be at least the max report bytes ({})",
                self.max_unanswered_bytes, self.max_report_bytes
            )));
        }
        if self.retry_token_lifetime.is_zero() {
            return Err(ConfigError::Invalid(
                "the retry token lifetime must be more than zero".into(),
            ));
        }
        let mut c = base_config(self.idle_timeout, &[ALPN])?;
        if self.http09 {
            c.set_application_protos(&[ALPN, HQ_ALPN])
                .map_err(|err| ConfigError::Quiche {
                    what: "setting the ALPNs",
                    err,
                })?;
        }
        CertFiles {
            cert_chain: self.cert_chain.clone(),
            private_key: self.private_key.clone(),
        }
        .load(&mut c)?;
        match &self.client_ca {
            Some(ca) => {
                c.verify_peer(true);
                c.load_verify_locations_from_file(utf8_path(ca)?)
                    .map_err(|err| ConfigError::File {
                        what: "client CA file",
                        path: ca.clone(),
                        err,
                    })?;
            }
            None => c.verify_peer(false),
        }
        c.set_initial_max_streams_bidi(self.max_streams);
        c.set_initial_max_streams_uni(0);
        // quiche keeps a path per peer address it saw, up to this limit, and
        // frees none of them when a client rebinds with the same connection
        // ID (a NAT rebinding): past the limit, packets from a new address
        // are dropped. 16 lets a connection survive 15 rebindings (the client
        // reconnects after that).
        c.set_active_connection_id_limit(MAX_PEER_PATHS);
        // A stream's window holds one whole report; the connection's a few.
        let stream_window = (self.max_report_bytes as u64 + 1024).max(16 * 1024);
        c.set_initial_max_stream_data_bidi_remote(stream_window);
        c.set_initial_max_stream_data_bidi_local(0);
        c.set_initial_max_data((stream_window * 4).max(1024 * 1024));
        c.set_max_stream_window(stream_window);
        c.enable_early_data();
        Ok(c)
    }
}

/// What every config of ours shares: version 1, the ALPNs, idle timeout,
/// datagram sizes, no unidirectional streams, no active migration.
pub(crate) fn base_config(idle: Duration, alpns: &[&[u8]]) -> Result<quiche::Config, ConfigError> {
    let mut c =
        quiche::Config::new(quiche::PROTOCOL_VERSION).map_err(|err| ConfigError::Quiche {
            what: "creating the QUIC config",
            err,
        })?;
    c.set_application_protos(alpns)
        .map_err(|err| ConfigError::Quiche {
            what: "setting the ALPN",
            err,
        })?;
    c.set_max_idle_timeout(u64::try_from(idle.as_millis()).unwrap_or(u64::MAX));
    c.set_max_recv_udp_payload_size(MAX_DATAGRAM_SIZE);
    c.set_max_send_udp_payload_size(MAX_DATAGRAM_SIZE);
    c.set_initial_max_stream_data_uni(0);
    c.set_disable_active_migration(true);
    Ok(c)
}
