//! The command line: one clap struct per subcommand, the value parsers they
//! share, and small helpers that turn flags into driver options.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use quic_report_core::config::default_server_name;

/// A telemetry reporter and collector over QUIC.
///
/// `demo` runs everything in one process on loopback. The other commands run
/// one part each: `source` hands out random values over HTTP, `client`
/// fetches them and reports them over QUIC, `server` records them as JSON
/// lines on stdout. Logs go to stderr (`RUST_LOG=debug` for more).
#[derive(Debug, Parser)]
#[command(name = "quic-report", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Source, server and client in one process on loopback, with labelled output.
    Demo(DemoArgs),
    /// Receive reports over QUIC and write each one to stdout as a JSON line.
    Server(ServerArgs),
    /// Fetch a value from the source every interval and report it to the server.
    Client(ClientArgs),
    /// HTTP endpoint: `GET /` answers `{"value": <random number in [0, 1)>}`.
    Source(SourceArgs),
    /// Fetch a path from a server over HTTP/0.9 on QUIC (ALPN hq-interop):
    /// `/latest` (the latest report of each client) or `/stats` (counters).
    Get(GetArgs),
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// UDP address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:4433")]
    pub listen: SocketAddr,
    /// PEM certificate chain (with --key). Default: the built-in development
    /// certificate for localhost, 127.0.0.1 and ::1, on a loopback --listen
    /// only (its key is public: elsewhere the server refuses to start
    /// without --cert and --key).
    #[arg(long, requires = "key", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, requires = "cert", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Close a connection after this long without traffic (e.g. 500ms, 30s, 1m).
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = positive_duration)]
    pub idle_timeout: Duration,
    /// Most connections at once; further handshakes are ignored.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,
    /// Most connections of one client-certificate identity at once (with
    /// --client-ca); one more is closed after its handshake (EXCESSIVE_LOAD)
    /// and its client retries later. Raise it for a fleet sharing one certificate.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections_per_identity: u64,
    /// Most concurrent report streams per connection.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_streams: u64,
    /// Largest report object in bytes; larger ones are refused.
    #[arg(long, value_name = "N", default_value_t = quic_report_core::config::DEFAULT_MAX_REPORT_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_report_bytes: u64,
    /// Where to record reports: `-` (JSON lines on stdout), `file:PATH`
    /// (JSON lines appended to PATH, as --out), `sqlite:PATH` (an embedded
    /// SQLite database, created if missing) or
    /// `postgres://USER@HOST:PORT/DB?sslmode=...` (PostgreSQL; password
    /// from the URL, PGPASSWORD or ~/.pgpass). With a database, each report
    /// is acknowledged after its row is committed, and the table's key
    /// (identity, client, seq) makes it recorded once across every server
    /// sharing the database. See the README's "Scaling out".
    #[arg(long, value_name = "URL", default_value = "-", conflicts_with = "out")]
    pub sink: quic_report_mio::SinkUrl,
    /// Append each recorded report to FILE as a JSON line, instead of
    /// stdout (created if missing, locked against a second server): the
    /// same as `--sink file:FILE`. At start the (client, seq) of every line
    /// already in FILE is loaded, so a report recorded before a restart is
    /// answered as a duplicate, not recorded twice.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Share --listen with other server processes (SO_REUSEPORT; start one
    /// per core with the same flags and one database sink, but each its
    /// own --metrics address, if any: counters are per process), with a BPF
    /// program that keeps each client on the process holding its
    /// connection when the client's address changes. See the README's
    /// "Scaling out".
    #[arg(long)]
    pub reuseport: bool,
    /// With a database sink: a report not committed within this is answered
    /// `not_recorded` (the client keeps it and sends it again), and a read
    /// (`/latest`, `/stats`) not answered within it is answered
    /// "unavailable". Keep it below the clients' --response-timeout (5 s).
    #[arg(long, default_value = "3s", value_name = "DURATION", value_parser = positive_duration)]
    pub commit_timeout: Duration,
    /// With a database sink: most reports waiting for their commit; past it
    /// (or past --max-waiting-bytes) a report is answered `not_recorded` at
    /// once, and counted (quic_report_sink_busy_total).
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_waiting_reports: u64,
    /// With a database sink: most bytes of report waiting for their commit
    /// (a report is taken when nothing else waits, whatever its size).
    #[arg(long, value_name = "N", default_value_t = 32 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_waiting_bytes: u64,
    /// When to fsync --out or a SQLite sink. Every report is written to the
    /// OS before it is acknowledged, so it survives a crash of the server.
    /// `always`: fsync before acknowledging (once per batch), it survives a
    /// power loss too; `interval`: fsync at most every 100 ms and within
    /// 100 ms of a write, after acknowledging (a power loss can lose the
    /// last 100 ms; SQLite: synchronous=NORMAL, its WAL synced); `never`:
    /// leave it to the OS (SQLite: to its checkpoints and the OS).
    /// Default: interval for a file, always for SQLite.
    #[arg(long, value_enum, value_name = "WHEN")]
    pub fsync: Option<FsyncArg>,
    /// File with the server's 32-byte secret (raw, or 64 hex digits), from
    /// which stateless-reset tokens, session-ticket and retry-token keys are
    /// derived; keep it across restarts. Make one with
    /// `head -c 32 /dev/urandom > FILE`. Default: derived from the private key.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Serve Prometheus metrics over plain HTTP on ADDR (`GET /metrics`):
    /// connections, reports, duplicates, rejections by reason, resets,
    /// retries, bytes, handshake and report latency histograms. No
    /// authentication: use a loopback ADDR (127.0.0.1:9464) or a network
    /// only the scraper reaches.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Address validation: `auto` sends a Retry only while at least
    /// --retry-threshold handshakes are in progress (under load or attack);
    /// `always` validates every client (one extra round trip); `never`.
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = RetryArg::Auto)]
    pub retry: RetryArg,
    /// Handshakes in progress from which `--retry auto` sends Retries.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub retry_threshold: usize,
    /// Most bytes held for one connection (answers not yet sent, a report in
    /// progress); beyond it the connection is closed with EXCESSIVE_LOAD.
    #[arg(long, value_name = "N", default_value_t = 1024 * 1024)]
    pub max_unanswered_bytes: usize,
    /// Drop a connection whose handshake is not done after this long.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = positive_duration)]
    pub handshake_timeout: Duration,
    /// Mutual TLS: every peer must present a client certificate signed by a
    /// CA in FILE (PEM, one or more CAs); its subject common name is the
    /// identity its reports are recorded under. Without it the server is
    /// anonymous: any peer may report under any client id.
    #[arg(long, value_name = "FILE", conflicts_with = "allow_anonymous")]
    pub client_ca: Option<PathBuf>,
    /// An identity (certificate common name) that may read everything
    /// (`/latest`, `/stats`); repeatable. Others read only their own entries.
    #[arg(long, value_name = "NAME", requires = "client_ca")]
    pub reader: Vec<String>,
    /// Without --client-ca, listen on a non-loopback address anyway: any
    /// peer that reaches it may report under any client id (its reads are
    /// refused). Without this flag such a server refuses to start.
    #[arg(long)]
    pub allow_anonymous: bool,
    /// Clients whose duplicate memory is kept per identity; an identity that
    /// uses more forgets its own least recently active ones.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub clients_per_identity: u64,
}

/// `--retry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RetryArg {
    /// Only while many handshakes are in progress.
    Auto,
    /// Every new client.
    Always,
    /// Never.
    Never,
}

/// `quic-report get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// What to fetch: `https://HOST:PORT/PATH`, e.g.
    /// `https://127.0.0.1:4433/latest` (the scheme may be left out).
    #[arg(value_name = "URL")]
    pub url: String,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Give up after this long.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = positive_duration)]
    pub timeout: Duration,
}

/// `https://host:port/path` (or `host:port/path`) -> (`host:port`, `/path`
/// with its query, `/` if none).
pub fn split_url(url: &str) -> Result<(String, String), String> {
    let expected = || format!("{url:?}: expected https://HOST:PORT/PATH");
    let full = if url.contains("://") {
        url.to_owned()
    } else {
        format!("https://{url}")
    };
    let uri: http::Uri = full.parse().map_err(|e| format!("{}: {e}", expected()))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{url:?}: only https:// URLs (QUIC) are supported"));
    }
    let authority = uri.authority().ok_or_else(expected)?;
    let port = authority.port_u16().ok_or_else(expected)?;
    if authority.host().is_empty() || authority.as_str().contains('@') {
        return Err(expected());
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = if path.is_empty() { "/" } else { path };
    Ok((format!("{}:{port}", authority.host()), path.to_owned()))
}

/// `--fsync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FsyncArg {
    /// Before every acknowledgement.
    Always,
    /// At most every 100 ms, within 100 ms of a write.
    Interval,
    /// Never (the OS decides).
    Never,
}

impl From<FsyncArg> for quic_report_mio::Fsync {
    fn from(f: FsyncArg) -> Self {
        match f {
            FsyncArg::Always => quic_report_mio::Fsync::Always,
            FsyncArg::Interval => {
                quic_report_mio::Fsync::Interval(quic_report_mio::DEFAULT_FSYNC_INTERVAL)
            }
            FsyncArg::Never => quic_report_mio::Fsync::Never,
        }
    }
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// URL of the source to GET a JSON object from, `http://` or `https://`.
    ///
    /// An https source is verified against --source-ca, else the system's
    /// CAs. Redirects are followed (at most 5). A proxy is taken from the
    /// environment: HTTP_PROXY for an http source, HTTPS_PROXY for an https
    /// one, else ALL_PROXY (e.g. `http://user:pass@proxy:3128`); it must
    /// allow `CONNECT` to the source's port. NO_PROXY lists the hosts
    /// reached directly (`host`, `.domain`, `*`, comma-separated).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8000/")]
    pub source: String,
    /// PEM file of the CA(s) an https source's certificate must chain to.
    ///
    /// Then the whole trust store for the source. Default: the system's
    /// CAs. (The server's certificate is checked against --ca, not this.)
    #[arg(long, value_name = "FILE")]
    pub source_ca: Option<PathBuf>,
    /// Keep the reports not yet acknowledged in DIR, so that they survive a
    /// crash or a reboot (without it they are in memory only).
    ///
    /// DIR is created if missing, and locked: a second client on it refuses
    /// to start. Every
    /// sample is in DIR before its report is sent; restarted on the same
    /// DIR after a crash, a kill or a reboot, the client keeps its `client`
    /// id, continues its `seq`, and sends what DIR holds first. If DIR
    /// cannot take a sample (disk full), it is held back, not sent, with a
    /// warning, and written again every second. Without --spool the queue
    /// is in memory only: a crash, a kill or a reboot loses every report
    /// not yet acknowledged (all that was fetched during a server outage),
    /// and the client comes back as a new `client` with `seq` from 1.
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,
    /// The `client` id to report under, fixed instead of random: 1 to 64
    /// hex digits, e.g. a device's serial number.
    ///
    /// Upper case is lowered. Its seqs start at 1 (or where --spool left off; a
    /// spool made under another id is refused). Exactly-once is per
    /// identity, client and seq: two clients given the same id share one
    /// namespace (and, under one identity, each other's duplicates).
    #[arg(long, value_name = "HEX", value_parser = client_id)]
    pub client_id: Option<String>,
    /// When to fsync --spool: always, interval or never.
    ///
    /// Under each, every
    /// sample is written to the OS before its report is sent, so it
    /// survives a crash of the client. `always`: fsync each sample before
    /// its report is sent (it survives a power loss too); `interval`: at
    /// most every 100 ms and within 100 ms of a write (a power loss can
    /// lose the last 100 ms); `never`: leave it to the OS.
    #[arg(
        long,
        value_enum,
        value_name = "WHEN",
        default_value_t = FsyncArg::Interval,
        requires = "spool",
        hide_possible_values = true
    )]
    pub spool_fsync: FsyncArg,
    /// Time between two fetches (e.g. 200ms, 2s, 1m).
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = positive_duration)]
    pub interval: Duration,
    /// Fetch this many samples, then exit 0 once each is settled:
    /// acknowledged, or refused or dropped (each logged). Default: run until Ctrl-C.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Close the connection after this long without traffic (a keep-alive is
    /// sent after half of it).
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = positive_duration)]
    pub idle_timeout: Duration,
    /// Give up an attempt the server has not answered within this (a packet
    /// of it processed, or a Retry), and retry.
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = positive_duration)]
    pub connect_timeout: Duration,
    /// Give up a connection whose oldest report has no answer after this long, and reconnect.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = positive_duration)]
    pub response_timeout: Duration,
    /// Most reports kept for (re)sending; past that the oldest is dropped
    /// (and lost), with a warning that counts the drops.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub queue: u64,
    /// Most bytes of reports kept for (re)sending, each counted at its
    /// length, or at the memory its parsed fields take when more (a body
    /// of many small values); past that the oldest are dropped (and lost)
    /// as past --queue. The default, 64 MiB, binds only for samples counted
    /// over 6.7 KiB on average.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(65_536..))]
    pub queue_bytes: u64,
    /// Send a keep-alive after this long without sending, so the connection
    /// survives quiet periods. `0s` disables it. Default: half of --idle-timeout.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub keep_alive: Option<Duration>,
    /// Longest wait between two reconnection attempts (exponential backoff
    /// from 100 ms, with jitter).
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = positive_duration)]
    pub backoff_max: Duration,
}

/// Which server to talk to and how to verify it (`client`, and `quic-report-bench`).
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// The server's UDP address, `host:port`. A host name is the name checked
    /// in the certificate unless --server-name says otherwise; `client` looks
    /// it up again whenever it reconnects (a server that moves is found, and
    /// a name that does not resolve yet is retried).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:4433")]
    pub server: String,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// How to verify the server's certificate (`client`, `get`, and `quic-report-bench`).
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// PEM file of the CA that signs the server's certificate. Default: the
    /// built-in development CA, for a server on loopback (or `localhost`)
    /// only: its key is public, so a server elsewhere needs --ca.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,
    /// Name to check in the server's certificate (and send as SNI). Default:
    /// `localhost` for a loopback address, else the server's hostname, else
    /// its IP.
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// Do not verify the server's certificate (development only).
    #[arg(long)]
    pub insecure: bool,
    /// Our client certificate (PEM, with --key), for a server that requires
    /// one (`server --client-ca`); its common name is our identity. E.g.
    /// `certs/clients/device-1.pem`.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SourceArgs {
    /// TCP address to serve HTTP on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stop everything (and exit 0) after this many acknowledged reports.
    /// Default: run until Ctrl-C.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Time between two fetches (e.g. 200ms, 2s, 1m).
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = positive_duration)]
    pub interval: Duration,
    /// Kill and restart the server at random (every 5-15 s, down for
    /// 0.5-3 s, once longer than the client's idle timeout, lowered to 3 s),
    /// abruptly or gracefully; kill the client too (abruptly, at random,
    /// during outages as well) and restart it on its spool in a temporary
    /// directory; check that every seq is recorded once, without gaps.
    #[arg(long)]
    pub chaos: bool,
}

/// The longest duration a flag takes: far beyond any use, and far from
/// the overflow of a clock reading plus it (which would panic).
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// A duration such as `200ms`, `2s`, `1m` (humantime); zero allowed; at
/// most [`MAX_DURATION`].
pub fn duration(s: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 0s, 200ms, 2s, 1m)"))?;
    if d > MAX_DURATION {
        return Err("must be at most 10 years".into());
    }
    Ok(d)
}

/// A duration such as `200ms`, `2s`, `1m` (humantime), not zero; at most
/// [`MAX_DURATION`].
pub fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 200ms, 2s, 1m)"))?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    if d > MAX_DURATION {
        return Err("must be at most 10 years".into());
    }
    Ok(d)
}

/// Longest `--client-id`.
pub const MAX_CLIENT_ID_LEN: usize = 64;

/// `--client-id`: 1 to [`MAX_CLIENT_ID_LEN`] hex digits, lowered (the ids a
/// client makes itself are lower-case hex).
pub fn client_id(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > MAX_CLIENT_ID_LEN {
        return Err(format!(
            "{} hex digit(s): expected 1 to {MAX_CLIENT_ID_LEN}",
            s.chars().count()
        ));
    }
    if let Some(c) = s.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!("{c:?} is not a hex digit (expected 0-9, a-f)"));
    }
    Ok(s.to_ascii_lowercase())
}

/// Whether `ip` is this host's loopback: `127.0.0.0/8`, `::1`, or an
/// IPv4 loopback address mapped into IPv6 (`::ffff:127.0.0.1`).
pub fn on_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// `--server`: an address, or a name looked up when used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerArg {
    /// An IP address and port.
    Addr(SocketAddr),
    /// `host:port` with a host name.
    Name {
        /// The whole `host:port`, as looked up.
        name: String,
        /// The host, the default certificate name.
        host: String,
    },
}

impl ServerArg {
    /// Parses `host:port` or `ip:port` (`[v6]:port`); the port is required.
    pub fn parse(s: &str) -> Result<ServerArg, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ServerArg::Addr(addr));
        }
        let expected = "expected host:port, e.g. collector.example.net:4433 or 192.0.2.1:4433";
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("--server {s:?} has no port ({expected})"))?;
        port.parse::<u16>()
            .map_err(|_| format!("--server {s:?}: {port:?} is not a port ({expected})"))?;
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || "/[]:".contains(c)) {
            return Err(format!(
                "--server {s:?}: {host:?} is not a host name ({expected})"
            ));
        }
        Ok(ServerArg::Name {
            name: s.to_owned(),
            host: host.to_owned(),
        })
    }

    /// The address: a name looked up now, for at most `timeout`, on a
    /// helper thread (a resolver that hangs does not hold the command past
    /// it), for a command that runs once (`get`, the bench).
    pub fn resolve(&self, timeout: Duration) -> Result<SocketAddr, String> {
        match self {
            ServerArg::Addr(addr) => Ok(*addr),
            ServerArg::Name { name, .. } => {
                quic_report_mio::name_lookups::NameLookups::system(1, "server-lookup")
                    .addresses(name, Some(timeout))
                    .map_err(|e| format!("cannot resolve {name:?}: {e}"))?
                    .first()
                    .copied()
                    .ok_or_else(|| format!("{name:?} resolves to no address"))
            }
        }
    }

    /// Whether the server is on this host's loopback: a loopback address,
    /// or the name `localhost` (the hosts file's, which only root can
    /// change). Where the development CA may be trusted.
    pub fn is_loopback(&self) -> bool {
        match self {
            ServerArg::Addr(addr) => on_loopback(addr.ip()),
            ServerArg::Name { host, .. } => host.eq_ignore_ascii_case("localhost"),
        }
    }

    /// The default certificate name: an IP address gives
    /// [`default_server_name`], a host name itself.
    pub fn default_name(&self) -> String {
        match self {
            ServerArg::Addr(addr) => default_server_name(*addr),
            ServerArg::Name { host, .. } => host.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        Duration, ServerArg, client_id, duration, on_loopback, positive_duration, split_url,
    };

    #[test]
    fn loopback_is_this_host_only() {
        for ip in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"] {
            assert!(on_loopback(ip.parse().expect("an IP")), "{ip}");
        }
        for ip in ["0.0.0.0", "::", "10.0.0.1", "::ffff:10.0.0.1", "192.0.2.1"] {
            assert!(!on_loopback(ip.parse().expect("an IP")), "{ip}");
        }
        assert!(
            ServerArg::parse("localhost:1")
                .expect("parses")
                .is_loopback()
        );
        assert!(
            ServerArg::parse("[::ffff:127.0.0.1]:1")
                .expect("parses")
                .is_loopback()
        );
        assert!(!ServerArg::parse("vm:1").expect("parses").is_loopback());
    }

    #[test]
    fn server_is_an_address_or_a_host_name_with_a_port() {
        let addr = ServerArg::parse("192.0.2.1:4433").expect("an address");
        assert_eq!(addr.default_name(), "192.0.2.1");
        assert!(matches!(
            ServerArg::parse("[::1]:4433"),
            Ok(ServerArg::Addr(_))
        ));
        let name = ServerArg::parse("collector.example.net:4433").expect("a name");
        assert_eq!(
            name,
            ServerArg::Name {
                name: "collector.example.net:4433".into(),
                host: "collector.example.net".into()
            }
        );
        assert_eq!(name.default_name(), "collector.example.net");
        for bad in [
            "collector",
            "collector:",
            "collector:99999",
            ":4433",
            "a b:1",
            "http://x:1",
        ] {
            assert!(ServerArg::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn client_id_is_one_to_64_hex_digits_lowered() {
        assert_eq!(client_id("C0ffee01").as_deref(), Ok("c0ffee01"));
        assert_eq!(client_id(&"a".repeat(64)).map(|s| s.len()), Ok(64));
        for bad in ["", "xyz", "c0 ffee", "c0ffee\n", "é1"] {
            assert!(client_id(bad).is_err(), "{bad:?} accepted");
        }
        assert!(client_id(&"a".repeat(65)).is_err());
    }

    #[test]
    fn split_url_takes_https_host_port_and_path() {
        let ok = |u: &str| split_url(u).expect(u);
        assert_eq!(
            ok("https://127.0.0.1:4433/latest"),
            ("127.0.0.1:4433".into(), "/latest".into())
        );
        assert_eq!(
            ok("localhost:4433/stats?x=1"),
            ("localhost:4433".into(), "/stats?x=1".into())
        );
        assert_eq!(ok("https://[::1]:4433"), ("[::1]:4433".into(), "/".into()));
        for bad in [
            "http://127.0.0.1:4433/latest",
            "https://127.0.0.1/latest",
            "https://:4433/",
            "https://u@h:4433/",
            "",
        ] {
            assert!(split_url(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn durations_past_ten_years_are_refused_not_a_panic_later() {
        assert_eq!(positive_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(duration("0s"), Ok(Duration::ZERO));
        assert_eq!(
            positive_duration("10years"),
            Ok(Duration::from_secs(315_576_000))
        );
        for huge in ["11years", "500000000000years", "18446744073709551615s"] {
            assert!(positive_duration(huge).is_err(), "{huge}");
            assert!(duration(huge).is_err(), "{huge}");
        }
    }
}
