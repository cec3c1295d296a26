//! `quic-report`: argument parsing and wiring only. The protocol lives in
//! `quic-report-core`, the event loops in `quic-report-mio`.
//!
//! - `server`: records reports as JSON lines on stdout.
//! - `client`: one line per acknowledged report on stdout.
//! - `source`: the HTTP endpoint of random values.
//! - `demo`: all three on loopback, labelled lines on stdout.
//!
//! Logs go to stderr (`RUST_LOG`; default `info`, `warn` for the demo).

mod demo;
mod source;

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::process::ExitCode;

use clap::Parser;
use quic_report_cli::cli::{self, Cli, ClientArgs, Command, ServerArgs, SourceArgs};
use quic_report_cli::devcerts::DevCerts;
use quic_report_cli::tls;
use quic_report_core::dedup::DedupConfig;
use quic_report_core::{ClientEvent, Identity, RetryMode};
use quic_report_mio::database::postgres::PostgresConnect;
use quic_report_mio::database::sqlite::SqliteConnect;
use quic_report_mio::show::{self, Shown};
use quic_report_mio::{
    ClientOptions, DatabaseSink, FetchOptions, FileSink, RecordedKeys, ServerOptions, SinkUrl,
    SourceProxy, SourceTrust, SpoolOptions, WaitLimits, WriterSink, read_secret_file, run_client,
    run_server,
};

use crate::source::Source;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The system's CAs for an https source, read before the environment
    // that names them is pointed elsewhere (just below).
    let source_trust = match &cli.command {
        Command::Client(args) if args.source_ca.is_none() => Some(SourceTrust::system()),
        _ => None,
    };
    // SAFETY: no other thread exists yet (parsing the command line and
    // reading the CA files start none).
    unsafe { tls::trust_only_named_cas() };
    if !matches!(cli.command, Command::Server(_)) {
        // What these print is for people: when stdout goes away (`| head`),
        // end quietly as other Unix tools do, not with a panic of
        // `println!`. The server keeps SIGPIPE ignored: its stdout is a
        // sink, and a write that fails there is answered not_recorded.
        // SAFETY: no other thread exists yet; SIG_DFL is a valid handler.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let level = if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .target(env_logger::Target::Stderr)
        .init();
    let res = match &cli.command {
        Command::Server(args) => server(args),
        Command::Client(args) => client(args, source_trust),
        Command::Source(args) => source(args),
        Command::Get(args) => get(args),
        Command::Demo(args) => demo::run(args),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quic-report: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn server(args: &ServerArgs) -> Result<(), Error> {
    let mut _dev = None;
    let (cert, key) = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => {
            readable(cert, "--cert")?;
            readable(key, "--key")?;
            if std::fs::read(key).is_ok_and(|pem| quic_report_cli::devcerts::is_dev_key(&pem)) {
                log::warn!(
                    "--key {} is the development key, which is public: anyone can pose as \
                     this server{}; not for production",
                    key.display(),
                    if args.secret_file.is_none() {
                        ", and forge the session tickets, retry tokens and stateless resets \
                         derived from it (give --secret-file)"
                    } else {
                        ""
                    }
                );
            }
            (cert.clone(), key.clone())
        }
        (None, None) => {
            log::warn!(
                "no --cert/--key: using the built-in development certificate \
                 (localhost, 127.0.0.1, ::1; its key is public, not for production)"
            );
            let dev = _dev.insert(DevCerts::write()?);
            (dev.cert(), dev.key())
        }
        _ => return Err("--cert and --key go together".into()),
    };
    let mut opts = ServerOptions::new(args.listen, cert, key);
    opts.config.idle_timeout = args.idle_timeout;
    opts.config.max_connections = to_usize(args.max_connections, "--max-connections")?;
    opts.config.max_connections_per_identity = to_usize(
        args.max_connections_per_identity,
        "--max-connections-per-identity",
    )?;
    opts.config.max_streams = args.max_streams;
    opts.config.max_report_bytes = to_usize(args.max_report_bytes, "--max-report-bytes")?;
    opts.config.max_unanswered_bytes = args.max_unanswered_bytes;
    opts.config.handshake_timeout = args.handshake_timeout;
    opts.config.retry = match args.retry {
        cli::RetryArg::Auto => RetryMode::Auto {
            threshold: args.retry_threshold,
        },
        cli::RetryArg::Always => RetryMode::Always,
        cli::RetryArg::Never => RetryMode::Never,
    };
    opts.metrics = args.metrics;
    opts.config.dedup.clients_per_identity =
        to_usize(args.clients_per_identity, "--clients-per-identity")?;
    access(args, &mut opts)?;
    if _dev.is_some() && !cli::on_loopback(args.listen.ip()) {
        // Checked after `access`, whose refusal says more about exposure.
        return Err(format!(
            "refusing to listen on {} with the built-in development certificate: its key is \
             public, so anyone could pose as this server and forge the session tickets \
             (and with them client identities), retry tokens and stateless resets derived \
             from it; give --cert FILE --key FILE",
            args.listen
        )
        .into());
    }
    opts.reuseport = args.reuseport;
    if args.reuseport && matches!(url_of(args), SinkUrl::Stdout | SinkUrl::File(_)) {
        log::warn!(
            "--reuseport without a database sink: each process has its own duplicate filter, \
             so a client that lands on another process may have a report recorded twice"
        );
    }
    if let Some(path) = &args.secret_file {
        opts.config.secret = Some(read_secret_file(path)?);
        log::info!("server secret read from {}", path.display());
    }
    let url = url_of(args);
    if matches!(url, SinkUrl::Stdout | SinkUrl::Postgres(_)) && args.fsync.is_some() {
        return Err(
            "--fsync is for a file or SQLite sink (--out FILE, --sink file:PATH or \
                    --sink sqlite:PATH); PostgreSQL's durability is its own setting \
                    (synchronous_commit)"
                .into(),
        );
    }
    let limits = WaitLimits {
        deadline: args.commit_timeout,
        max_reports: to_usize(args.max_waiting_reports, "--max-waiting-reports")?,
        max_bytes: to_usize(args.max_waiting_bytes, "--max-waiting-bytes")?,
    };
    match url {
        SinkUrl::File(path) => {
            let fsync = args.fsync.unwrap_or(cli::FsyncArg::Interval);
            let mut sink = FileSink::open(&path, fsync.into())?;
            opts.recorded = load_recorded(&mut sink, opts.config.dedup)?;
            run_server(opts, &mut sink, &mut |_| {})?;
        }
        SinkUrl::Stdout => {
            // A duplicate of stdout's descriptor, unbuffered: the sink
            // gathers a batch and writes it in one go at its flush, and no
            // buffer (a BufWriter, std's own for stdout) may keep bytes of
            // reports answered not_recorded to write them later.
            let stdout = std::fs::File::from(io::stdout().as_fd().try_clone_to_owned()?);
            let mut sink = WriterSink::new(stdout);
            run_server(opts, &mut sink, &mut |_| {})?;
        }
        SinkUrl::Sqlite(path) => {
            let mut connect = Box::new(SqliteConnect::new(&path));
            // Unlike a file's, a database's commits are durable by default.
            connect.set_fsync(args.fsync.unwrap_or(cli::FsyncArg::Always).into());
            log::info!("sqlite:{}: {}", path.display(), connect.durability());
            run_server(opts, DatabaseSink { connect, limits }, &mut |_| {})?;
        }
        SinkUrl::Postgres(url) => {
            let connect = Box::new(PostgresConnect::parse(&url)?);
            run_server(opts, DatabaseSink { connect, limits }, &mut |_| {})?;
        }
    }
    Ok(())
}

/// Who may report and read: mutual TLS with `--client-ca` and its
/// `--reader`s, or anonymous mode (loopback only unless `--allow-anonymous`,
/// reads closed off loopback), with a warning.
fn access(args: &ServerArgs, opts: &mut quic_report_mio::ServerOptions) -> Result<(), Error> {
    let mut policy = quic_report_mio::ReadPolicy::default();
    match &args.client_ca {
        Some(ca) => {
            let pem =
                std::fs::read(ca).map_err(|e| format!("--client-ca {}: {e}", ca.display()))?;
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(format!(
                    "--client-ca {}: no PEM certificate in it (expected one or more CA certificates)",
                    ca.display()
                )
                .into());
            }
            opts.config.client_ca = Some(ca.clone());
            for name in &args.reader {
                let id = Identity::named(name).map_err(|e| format!("--reader {name:?}: {e}"))?;
                policy.readers.insert(id);
            }
            log::info!(
                "mutual TLS: client certificates signed by {} required; readers: {}",
                ca.display(),
                if args.reader.is_empty() {
                    "none (each identity reads only its own entries)".to_owned()
                } else {
                    args.reader.join(", ")
                }
            );
        }
        None => {
            let loopback = cli::on_loopback(args.listen.ip());
            if !loopback && !args.allow_anonymous {
                return Err(format!(
                    "refusing to listen on {} without --client-ca: any peer that reaches it could \
                     report under any client id (and so make other clients' reports count as \
                     duplicates); give --client-ca FILE for mutual TLS, or --allow-anonymous to \
                     accept that",
                    args.listen
                )
                .into());
            }
            policy.anonymous_reads_all = loopback;
            log::warn!(
                "no --client-ca: anonymous mode, any peer may report under any client id{}",
                if loopback {
                    " (loopback only)"
                } else {
                    "; --allow-anonymous on a non-loopback address: reads (/latest, /stats) are refused"
                }
            );
        }
    }
    opts.read_policy = policy;
    Ok(())
}

/// `--sink`, or `--out` as its synonym.
fn url_of(args: &ServerArgs) -> SinkUrl {
    match &args.out {
        Some(path) => SinkUrl::File(path.clone()),
        None => args.sink.clone(),
    }
}

/// The keys of the reports already in `--out`, with a log line (and one
/// warning for unparseable lines, such as a line torn by a crash).
fn load_recorded(sink: &mut FileSink, limits: DedupConfig) -> Result<RecordedKeys, Error> {
    let keys = sink.read_recorded(limits)?;
    let path = sink.path().display();
    if keys.unparseable() > 0 {
        log::warn!(
            "{path}: {} line(s) that are not JSON objects skipped (first: line {}; a line torn by a crash?)",
            keys.unparseable(),
            keys.first_unparseable_line().unwrap_or_default()
        );
    }
    log::info!(
        "{path}: {} recorded report key(s) of {} client(s) loaded from {} line(s); \
         they will be answered as duplicates ({})",
        keys.len(),
        keys.clients(),
        keys.lines(),
        sink.fsync()
    );
    Ok(keys)
}

/// `quic-report get URL`: the body on stdout.
fn get(args: &cli::GetArgs) -> Result<(), Error> {
    let (authority, path) = cli::split_url(&args.url)?;
    let deadline = std::time::Instant::now() + args.timeout;
    let target = cli::ServerArg::parse(&authority)?;
    let mut _dev = None;
    let (verify, server_name) = tls::verification(
        &args.tls,
        target.default_name(),
        target.is_loopback(),
        &mut _dev,
    )?;
    let server = target.resolve(args.timeout)?;
    let body = quic_report_mio::run_get(quic_report_mio::GetOptions {
        server,
        server_name,
        verify,
        client_cert: tls::client_cert(&args.tls)?,
        path,
        // What the lookup left of --timeout.
        timeout: deadline.saturating_duration_since(std::time::Instant::now()),
    })?;
    let mut out = io::stdout().lock();
    out.write_all(&body)?;
    out.flush()?;
    Ok(())
}

/// `client`; `system_trust`: the system's CAs, read at start (when there is
/// no --source-ca).
fn client(args: &ClientArgs, system_trust: Option<SourceTrust>) -> Result<(), Error> {
    let target = cli::ServerArg::parse(&args.target.server)?;
    let mut _dev = None;
    let (verify, server_name) = tls::verification(
        &args.target.tls,
        target.default_name(),
        target.is_loopback(),
        &mut _dev,
    )?;
    let mut opts = match &target {
        cli::ServerArg::Addr(addr) => ClientOptions::new(*addr, verify),
        // A name is looked up again whenever the client reconnects, so a
        // server that moves is found; one that does not resolve yet (no
        // network at boot) is no reason to stop.
        cli::ServerArg::Name { name, .. } => {
            ClientOptions::named(quic_report_mio::ServerLookup::system(name.clone()), verify)
        }
    };
    opts.config.server_name = server_name;
    opts.config.client_cert = tls::client_cert(&args.target.tls)?;
    opts.config.idle_timeout = args.idle_timeout;
    opts.config.keep_alive = match args.keep_alive {
        None => Some(args.idle_timeout / 2),
        Some(d) if d.is_zero() => None,
        Some(d) => {
            if d >= args.idle_timeout {
                log::warn!(
                    "--keep-alive is not below --idle-timeout: idle connections will time out"
                );
            }
            Some(d)
        }
    };
    opts.config.backoff.max = args.backoff_max;
    opts.config.backoff.initial = opts.config.backoff.initial.min(args.backoff_max);
    opts.config.connect_timeout = args.connect_timeout;
    opts.config.response_timeout = args.response_timeout;
    opts.config.queue_limit = to_usize(args.queue, "--queue")?;
    opts.config.queue_limit_bytes = to_usize(args.queue_bytes, "--queue-bytes")?;
    opts.config.client_id = args.client_id.clone();
    if let (Some(id), None) = (&args.client_id, &args.spool) {
        log::warn!(
            "--client-id {id} without --spool: seqs start at 1 again on every start, and the \
             server answers `duplicate` to (and does not record) the reports whose seq an earlier \
             run already used; give --spool DIR to carry the numbering over"
        );
    }
    let trust = match (&args.source_ca, system_trust) {
        (Some(ca), _) => SourceTrust::ca_file(ca).map_err(|e| format!("--source-ca {e}"))?,
        (None, Some(system)) => system,
        (None, None) => SourceTrust::system(),
    };
    let proxy = SourceProxy::from_env(&args.source);
    if let Some(p) = &proxy {
        log::info!(
            "fetching through the proxy {} (from the environment)",
            quic_report_mio::redact::password(&p.url)
        );
    }
    opts.fetch = Some(FetchOptions {
        count: args.count,
        trust,
        proxy,
        ..FetchOptions::new(args.source.clone(), args.interval)
    });
    opts.count = args.count;
    opts.spool = args.spool.clone().map(|dir| SpoolOptions {
        dir,
        fsync: args.spool_fsync.into(),
    });
    log::info!(
        "reporting {} every {} to {} (certificate name {:?})",
        quic_report_mio::redact::password(&args.source),
        humantime::format_duration(args.interval),
        args.target.server,
        opts.config.server_name
    );
    let queue = args.queue;
    let mut lines = show::ClientLog::default();
    let summary = run_client(opts, &mut |ev, c| match lines.line(ev, &c.stats()) {
        Shown::Ack(line) => println!("{line}"),
        Shown::Info(line) => log::info!("{line}"),
        Shown::Warn(line) if matches!(ev, ClientEvent::ReportDropped { .. }) => log::warn!(
            "{line} and lost ({} dropped so far; --queue {queue} or --queue-bytes is full while the server is away)",
            c.dropped()
        ),
        // A permanent refusal: the report is dropped, never sent again.
        Shown::Warn(line) if matches!(ev, ClientEvent::Rejected { .. }) => {
            log::error!("{line}; the report is dropped")
        }
        // A lost report.
        Shown::Warn(line) if matches!(ev, ClientEvent::SeqReused { .. }) => log::error!("{line}"),
        Shown::Warn(line) => log::warn!("{line}"),
        Shown::Debug(line) => log::debug!("{line}"),
    })?;
    log::info!(
        "done: {} acknowledged, {} lost (seq reused), {} rejected (dropped), {} not acknowledged, {} dropped (queue full), {} connection(s), {} attempt(s)",
        summary.stats.acknowledged_kept(),
        summary.stats.seq_reused,
        summary.stats.rejected,
        summary.unacknowledged,
        summary.dropped,
        summary.stats.connections,
        summary.stats.attempts
    );
    if summary.stats.seq_reused > 0 {
        log::error!(
            "{} report(s) lost: the server had their seq before they were first sent \
             (another client uses client id {}, or its numbering started over: give each \
             client its own id, and a --spool that survives)",
            summary.stats.seq_reused,
            summary.client_id
        );
    }
    Ok(())
}

fn source(args: &SourceArgs) -> Result<(), Error> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let source = Source::start(args.listen, |a| log::info!("{}", a.long()))?;
    log::info!("serving GET / on http://{}/", source.addr());
    if let Some(sig) = signals.forever().next() {
        log::info!("{}: stopping", quic_report_mio::signal::signal_name(sig));
    }
    drop(source);
    Ok(())
}

/// Checks that a file named by a flag can be opened, for a clearer message
/// than the TLS library gives.
fn readable(path: &std::path::Path, flag: &str) -> Result<(), Error> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| format!("{flag} {}: {e}", path.display()).into())
}

fn to_usize(v: u64, flag: &str) -> Result<usize, Error> {
    usize::try_from(v).map_err(|_| format!("{flag} {v} is too large for this platform").into())
}
