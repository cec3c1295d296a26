//! The PostgreSQL backend (`--sink postgres://...`), with `tokio-postgres`
//! driven by a current-thread runtime on the sink's helper thread only
//! (each call blocks that thread until done or past its deadline).
//!
//! **The URL** is libpq's: `postgres://[user[:password]@][host][:port][/dbname][?param=value&...]`
//! (`postgresql://` too), with libpq's defaults for what it leaves out:
//! `PGHOST` or the socket directory `/var/run/postgresql`, `PGPORT` or
//! 5432, `PGUSER` or the OS user, `PGDATABASE` or the user name. A host
//! that starts with `/` (percent-encoded in the URL, or `?host=/dir`) is a
//! Unix socket directory. Host names are looked up on threads of their
//! own, bounded in number, which a timed-out attempt does not leave behind
//! (`hosts`). `connect_timeout` defaults to 5 s; as in libpq
//! it bounds the whole attempt (TCP, TLS, authentication, and here the
//! schema check), per host address, and each name's lookup: a peer that takes the TCP connection and
//! never answers is given up on then. A statement unanswered for
//! [`STATEMENT_DEADLINE`] (30 s) takes the connection for dead too, and it
//! is made again. (The blocking `postgres` crate, which wraps the same
//! client in the same kind of runtime, has no way to give up on either.)
//!
//! **The password**, in libpq's order: the URL, `PGPASSWORD`, then the
//! password file (`PGPASSFILE`, default `~/.pgpass`, lines
//! `host:port:database:user:password` with `*` wildcards; ignored with a
//! warning when group or others can read it, as libpq does).
//!
//! **TLS**, by `sslmode`, with rustls (no OpenSSL): `disable`; `prefer`
//! (the default) and `require` encrypt without checking the server's
//! certificate, as libpq does (`prefer` falls back to plain text if the
//! server has no TLS); `verify-ca` checks the chain against
//! `sslrootcert` (default `~/.postgresql/root.crt`); `verify-full` also
//! checks that the certificate names the host.
//!
//! **Inserts** go in one statement per batch (autocommit):
//! `INSERT ... SELECT * FROM unnest($1, ...) ON CONFLICT DO NOTHING
//! RETURNING identity, client, seq`; the rows not returned were there
//! before. A batch over [`ROWS_PER_STATEMENT`] rows is several statements
//! in one transaction, so a batch commits whole or not at all.
//!
//! **Reads** (`/latest`, `/stats`) run in a read-only transaction whose
//! `statement_timeout` is the time left to the read's deadline: PostgreSQL
//! cancels a read held by a lock (or one over a huge table) then, and the
//! connection goes on.
//!
//! **The key's text columns are `COLLATE "C"`**: `identity` and `client`
//! are identifiers compared byte by byte, not words to sort for people, and
//! an index in the C collation does not depend on the operating system's
//! locale data (an update of glibc's collation can leave an index on a
//! locale's text out of order, which PostgreSQL's documentation warns
//! about).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::runtime::Runtime;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient, Statement};

use crate::name_lookups::NameLookups;

mod hosts;
pub use hosts::MAX_HOST_LOOKUPS;

use super::{
    COUNT_LIMITS, Connect, CountLimits, Counts, Database, DbError, Found, LatestLimit, Row,
    SCHEMA_VERSION, Taking, Written, check_schema, received_time,
};

/// How long one statement (an insert with its commit, a read) may go
/// unanswered before the connection is taken for dead, dropped and made
/// again: a database behind a proxy that still holds the connection, or a
/// host that keeps acknowledging TCP without answering, would otherwise
/// hold the commit thread until the peer speaks. A batch given up on may
/// still commit: its rows are sent again and then answered `duplicate`.
pub const STATEMENT_DEADLINE: Duration = Duration::from_secs(30);

/// `connect_timeout` when the URL has none.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `c`, every (identity, client) of the table in the key's order: a skip
/// scan of the primary key, one index probe per client for the next one
/// (a recursive query is evaluated as far as it is read). A macro, so
/// that the statements built on it stay literals.
macro_rules! clients {
    () => {
        "WITH RECURSIVE c AS (
             (SELECT identity, client FROM reports ORDER BY identity, client LIMIT 1)
             UNION ALL
             SELECT n.identity, n.client FROM c CROSS JOIN LATERAL
                 (SELECT identity, client FROM reports AS r
                  WHERE (r.identity, r.client) > (c.identity, c.client)
                  ORDER BY identity, client LIMIT 1) AS n)"
    };
}

/// Rows of `/latest` fetched at a time (64 KiB reports: 16 MiB at most).
const LATEST_CHUNK: i32 = 256;

/// `/latest` for everyone: [`clients!`], and one index probe per client
/// for its highest seq, no more than `$1` of each, where DISTINCT ON would
/// read the whole table.
const LATEST_ALL: &str = concat!(
    clients!(),
    " SELECT c.identity, c.client, l.body::text FROM c CROSS JOIN LATERAL
         (SELECT body FROM reports AS r
          WHERE r.identity = c.identity AND r.client = c.client
          ORDER BY seq DESC LIMIT 1) AS l
     LIMIT $1"
);

/// `/latest` for the identity `$2`: the same walk within its range of
/// the key, at most `$1` clients.
const LATEST_OF: &str = "WITH RECURSIVE c AS (
         (SELECT client FROM reports WHERE identity = $2 ORDER BY client LIMIT 1)
         UNION ALL
         SELECT n.client FROM c CROSS JOIN LATERAL
             (SELECT client FROM reports AS r
              WHERE r.identity = $2 AND r.client > c.client
              ORDER BY client LIMIT 1) AS n)
     SELECT $2::text, c.client, l.body::text FROM c CROSS JOIN LATERAL
         (SELECT body FROM reports AS r
          WHERE r.identity = $2 AND r.client = c.client
          ORDER BY seq DESC LIMIT 1) AS l
     LIMIT $1";

/// `/stats` in one statement, so that its `statement_timeout` is the
/// read's deadline: the rows, counted unless the planner's estimate (its
/// rows per page at the last `VACUUM` or `ANALYZE`, times the pages now;
/// none before either) is above `$1`; whether they were estimated; and
/// the clients by [`clients!`], at most `$2` (8 ms for 1,000 clients of 2
/// million rows here, where `count(DISTINCT (identity, client))` sorted
/// every row: 1.8 s). The count in `ELSE` is run only when chosen.
const COUNTS: &str = concat!(
    clients!(),
    ", e AS (SELECT (p.reltuples / p.relpages
                     * (pg_relation_size(p.oid) / current_setting('block_size')::bigint))::bigint AS n
             FROM pg_class AS p
             WHERE p.oid = 'reports'::regclass AND p.relpages > 0 AND p.reltuples >= 0)
     SELECT CASE WHEN (SELECT n FROM e) > $1 THEN (SELECT n FROM e)
                 ELSE (SELECT count(*) FROM reports) END,
            coalesce((SELECT n FROM e) > $1, false),
            (SELECT count(*) FROM (SELECT 1 FROM c LIMIT $2) AS l)"
);

/// Most rows in one INSERT statement.
pub const ROWS_PER_STATEMENT: usize = 1000;

const INSERT: &str = "INSERT INTO reports (identity, client, seq, received_at, body) \
     SELECT i, c, s, r, b::jsonb \
     FROM unnest($1::text[], $2::text[], $3::int8[], $4::timestamptz[], $5::text[]) AS t(i, c, s, r, b) \
     ON CONFLICT DO NOTHING RETURNING identity, client, seq";

/// How to secure the connection (`sslmode`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// Plain text.
    Disable,
    /// Encrypted without checking the certificate (`prefer`, `require`).
    Unverified,
    /// The chain is checked against these roots (`verify-ca`), and the
    /// name too when `name` (`verify-full`).
    Verified {
        /// PEM file of the trusted CAs.
        roots: PathBuf,
        /// Also check the host name.
        name: bool,
    },
}

/// A parsed `postgres://` URL, ready to connect.
#[derive(Clone)]
pub struct PostgresConnect {
    config: tokio_postgres::Config,
    tls: Tls,
    shown: String,
    statement_deadline: Duration,
    count_limits: CountLimits,
    /// How the URL's host names are looked up (shared by every attempt and
    /// by [`Connect::another`]'s copies, so their cap holds across them).
    lookups: NameLookups,
}

impl std::fmt::Debug for PostgresConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// A `postgres://` URL the driver cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--sink {url}: {why}")]
pub struct UrlError {
    url: String,
    why: String,
}

impl PostgresConnect {
    /// Parses `url` and fills in libpq's defaults from the environment.
    pub fn parse(url: &str) -> Result<PostgresConnect, UrlError> {
        let shown = crate::redact::password(url);
        let fail = |why: String| UrlError {
            url: shown.clone(),
            why,
        };
        // libpq parameters the postgres crate does not parse.
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        let (mut mode, mut rootcert) = (String::from("prefer"), None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "sslmode" => mode = percent_decode(v),
                "sslrootcert" => rootcert = Some(PathBuf::from(percent_decode(v))),
                _ => kept.push(pair),
            }
        }
        let rebuilt = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config =
            tokio_postgres::Config::from_str(&rebuilt).map_err(|e| fail(e.to_string()))?;
        let tls = match mode.as_str() {
            "disable" => Tls::Disable,
            "allow" | "prefer" | "require" => Tls::Unverified,
            "verify-ca" | "verify-full" => Tls::Verified {
                roots: match rootcert {
                    Some(p) => p,
                    None => home()
                        .map(|h| h.join(".postgresql/root.crt"))
                        .ok_or_else(|| fail("sslrootcert is needed (no home directory)".into()))?,
                },
                name: mode == "verify-full",
            },
            other => {
                return Err(fail(format!(
                    "sslmode={other}: expected disable, allow, prefer, require, verify-ca or verify-full"
                )));
            }
        };
        config.ssl_mode(match tls {
            Tls::Disable => SslMode::Disable,
            _ if mode == "prefer" || mode == "allow" => SslMode::Prefer,
            _ => SslMode::Require,
        });
        fill_defaults(&mut config).map_err(fail)?;
        if config.get_password().is_none() {
            if let Ok(p) = std::env::var("PGPASSWORD") {
                config.password(p);
            } else if let Some(p) = pgpass_password(&config) {
                config.password(p);
            }
        }
        Ok(PostgresConnect {
            config,
            tls,
            shown,
            statement_deadline: STATEMENT_DEADLINE,
            count_limits: COUNT_LIMITS,
            lookups: NameLookups::system(MAX_HOST_LOOKUPS, "db-host-lookup"),
        })
    }

    /// Looks the URL's host names up with `lookups` from now on (tests, an
    /// embedder's own resolver) instead of the system's resolver.
    pub fn set_lookups(&mut self, lookups: NameLookups) {
        self.lookups = lookups;
    }

    /// The TLS mode the URL asked for.
    pub fn tls(&self) -> &Tls {
        &self.tls
    }
}

/// The URL with its password (if any) replaced by `***`.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

/// libpq's defaults for host, port, user and database name.
fn fill_defaults(config: &mut tokio_postgres::Config) -> Result<(), String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if config.get_hosts().is_empty() {
        match env("PGHOST") {
            Some(h) if h.starts_with('/') => config.host_path(h),
            Some(h) => config.host(&h),
            None => config.host_path("/var/run/postgresql"),
        };
    }
    if config.get_ports().is_empty()
        && let Some(p) = env("PGPORT")
    {
        let port = p
            .parse()
            .map_err(|_| format!("PGPORT={p} is not a port number"))?;
        config.port(port);
    }
    if config.get_user().is_none() {
        let user = env("PGUSER")
            .or_else(|| env("USER"))
            .or_else(|| env("LOGNAME"))
            .ok_or("no user in the URL, and neither PGUSER nor USER is set")?;
        config.user(&user);
    }
    if config.get_dbname().is_none() {
        let db = env("PGDATABASE")
            .or_else(|| config.get_user().map(str::to_owned))
            .unwrap_or_default();
        config.dbname(&db);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    // A database that stops answering is noticed within seconds, not hours.
    config.keepalives_idle(Duration::from_secs(10));
    config.tcp_user_timeout(Duration::from_secs(10));
    if config.get_application_name().is_none() {
        config.application_name("quic-report");
    }
    Ok(())
}

/// The password for `config` from the password file, if any line matches.
fn pgpass_password(config: &tokio_postgres::Config) -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".pgpass")))?;
    let text = read_pgpass(&path)?;
    let host = match config.get_hosts().first()? {
        Host::Tcp(h) => h.clone(),
        // libpq matches a socket connection against "localhost".
        Host::Unix(_) => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    pgpass_lookup(
        &text,
        &host,
        port,
        config.get_dbname().unwrap_or_default(),
        config.get_user().unwrap_or_default(),
    )
}

fn read_pgpass(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    if meta.permissions().mode() & 0o077 != 0 {
        log::warn!(
            "password file {} has group or world access; it is ignored (chmod 0600 it)",
            path.display()
        );
        return None;
    }
    std::fs::read_to_string(path).ok()
}

/// The first matching line's password (`*` matches anything; `\:` and
/// `\\` are escapes).
pub fn pgpass_lookup(text: &str, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::with_capacity(5);
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.extend(chars.next()),
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let wanted = [host, port.as_str(), db, user];
        if fields[..4]
            .iter()
            .zip(wanted)
            .all(|(f, w)| f == "*" || f == w)
        {
            return fields.pop();
        }
    }
    None
}

impl PostgresConnect {
    /// `connect_timeout`: how long one host's connection may take, all of
    /// it (its name's lookup; then TCP, TLS, authentication, the schema
    /// check), as in libpq, where it bounds the whole connection too.
    fn per_host(&self) -> Duration {
        self.config
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT)
    }

    /// How long a statement may go unanswered on the connections made from
    /// now on ([`STATEMENT_DEADLINE`] unless set).
    pub fn set_statement_deadline(&mut self, deadline: Duration) {
        self.statement_deadline = deadline;
    }

    /// How far `/stats` counts on the connections made from now on
    /// ([`COUNT_LIMITS`] unless set).
    pub fn set_count_limits(&mut self, limits: CountLimits) {
        self.count_limits = limits;
    }
}

impl Connect for PostgresConnect {
    fn connect(&mut self) -> Result<Box<dyn Database>, DbError> {
        let what = self.shown.clone();
        let per_host = self.per_host();
        let config = hosts::resolve(&self.config, &self.lookups, per_host)
            .map_err(|e| DbError::Connection(format!("{what}: {e}")))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DbError::Connection(format!("{what}: starting its runtime: {e}")))?;
        // Each address to try has its `connect_timeout`.
        let tries = u32::try_from(config.get_hosts().len().max(1)).unwrap_or(u32::MAX);
        let deadline = per_host.saturating_mul(tries);
        let opened = rt
            .block_on(async { tokio::time::timeout(deadline, self.open(&config, &what)).await })
            .map_err(|_| {
                DbError::Connection(format!(
                    "{what}: no answer within {} ms (connect_timeout)",
                    deadline.as_millis()
                ))
            })
            .and_then(|r| r);
        let (client, insert) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                // Dropping the runtime would wait for its blocking tasks: a
                // host name's lookup that the timeout cut short, in the
                // URLs whose names are left to tokio-postgres (see
                // `hosts`), goes on for as long as the resolver takes.
                // Left to finish on its own thread instead.
                rt.shutdown_background();
                return Err(e);
            }
        };
        Ok(Box::new(Postgres {
            rt,
            client,
            insert,
            what,
            deadline: self.statement_deadline,
            count_limits: self.count_limits,
        }))
    }

    fn describe(&self) -> String {
        self.shown.clone()
    }

    fn another(&self) -> Box<dyn Connect> {
        Box::new(self.clone())
    }
}

impl PostgresConnect {
    /// Connects, checks the schema and prepares the insert; on the
    /// runtime of the caller's `block_on`, which drives the connection.
    async fn open(
        &self,
        config: &tokio_postgres::Config,
        what: &str,
    ) -> Result<(Client, Statement), DbError> {
        let err = |e: tokio_postgres::Error| classify(what, &e);
        let mut client = match &self.tls {
            Tls::Disable => {
                let (client, conn) = config.connect(tokio_postgres::NoTls).await.map_err(err)?;
                tokio::spawn(conn);
                client
            }
            tls => {
                let connector = tokio_postgres_rustls::MakeRustlsConnect::new(
                    tls_config(tls).map_err(|e| DbError::Connection(format!("{what}: {e}")))?,
                );
                let (client, conn) = config.connect(connector).await.map_err(err)?;
                tokio::spawn(conn);
                client
            }
        };
        setup(&mut client, what).await?;
        let insert = client.prepare(INSERT).await.map_err(err)?;
        Ok((client, insert))
    }
}

/// rustls settings for `tls` (ring as the crypto provider).
fn tls_config(tls: &Tls) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = match tls {
        Tls::Disable | Tls::Unverified => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::Unverified(provider)))
            .with_no_client_auth(),
        Tls::Verified { roots, name } => {
            let mut store = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(roots)
                .map_err(|e| format!("sslrootcert {}: {e}", roots.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("sslrootcert {}: {e}", roots.display()))?;
                store
                    .add(cert)
                    .map_err(|e| format!("sslrootcert {}: {e}", roots.display()))?;
            }
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(store),
                provider,
            )
            .build()
            .map_err(|e| e.to_string())?;
            let builder = builder.dangerous();
            if *name {
                builder.with_custom_certificate_verifier(webpki)
            } else {
                builder.with_custom_certificate_verifier(Arc::new(verify::ChainOnly(webpki)))
            }
            .with_no_client_auth()
        }
    };
    Ok(config)
}

/// The certificate checks of `sslmode=require` and `verify-ca`.
mod verify {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

    /// `require`: any certificate (the handshake's signatures are still
    /// checked, so the channel is encrypted to whoever holds the key).
    #[derive(Debug)]
    pub(super) struct Unverified(pub(super) Arc<CryptoProvider>);

    impl ServerCertVerifier for Unverified {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// `verify-ca`: the chain must verify; the name is not checked.
    #[derive(Debug)]
    pub(super) struct ChainOnly(pub(super) Arc<dyn ServerCertVerifier>);

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            match self
                .0
                .verify_server_cert(end_entity, intermediates, name, ocsp, now)
            {
                Err(Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

/// Creates the schema if missing and checks its version, under a
/// transaction-scoped advisory lock (servers starting together create it
/// once).
async fn setup(client: &mut Client, what: &str) -> Result<(), DbError> {
    let err = |e: tokio_postgres::Error| classify(what, &e);
    let tx = client.transaction().await.map_err(err)?;
    tx.execute("SELECT pg_advisory_xact_lock(7175312143)", &[])
        .await
        .map_err(err)?;
    let row = tx
        .query_one(
            "SELECT to_regclass('quic_report_schema') IS NOT NULL, to_regclass('reports') IS NOT NULL",
            &[],
        )
        .await
        .map_err(err)?;
    let (has_version, has_reports): (bool, bool) =
        (row.try_get(0).map_err(err)?, row.try_get(1).map_err(err)?);
    let found = if has_version {
        let v: Option<i32> = tx
            .query_one("SELECT max(version) FROM quic_report_schema", &[])
            .await
            .map_err(err)?
            .try_get(0)
            .map_err(err)?;
        Found::Versioned(v.map(i64::from))
    } else if has_reports {
        Found::ForeignReports
    } else {
        Found::Nothing
    };
    if check_schema(found, what)? {
        tx.batch_execute(
            "CREATE TABLE quic_report_schema (version integer NOT NULL);
             CREATE TABLE reports (
                 identity    text        COLLATE \"C\" NOT NULL,
                 client      text        COLLATE \"C\" NOT NULL,
                 seq         bigint      NOT NULL,
                 received_at timestamptz NOT NULL,
                 body        jsonb       NOT NULL,
                 PRIMARY KEY (identity, client, seq));",
        )
        .await
        .map_err(err)?;
        tx.execute(
            "INSERT INTO quic_report_schema (version) VALUES ($1)",
            &[&SCHEMA_VERSION],
        )
        .await
        .map_err(err)?;
        log::info!("{what}: created the reports table (schema version {SCHEMA_VERSION})");
    }
    tx.commit().await.map_err(err)
}

/// Sorts the crate's errors: the connection or the server is gone, busy or
/// refusing us for now (retried on a new connection: class 08 connection,
/// 53 resources such as disk full, 57 operator intervention, 58 system,
/// 40 serialization or deadlock, 28 authorization, 3D no such database,
/// a read-only server; and what refuses every row, not one: 42 a missing
/// table or privilege, 0A an unsupported feature), a value the database can never store (class 22,
/// data exception, and 54, program limit exceeded, such as a key over the
/// index's row size: [`DbError::Unstorable`]), or the rows were refused
/// for another reason.
fn classify(what: &str, e: &tokio_postgres::Error) -> DbError {
    let msg = format!("{what}: {}", describe(e));
    // A column of another type than ours (a table made by someone else,
    // with our version in quic_report_schema): not something a retry fixes.
    if std::error::Error::source(e).is_some_and(|s| {
        s.is::<tokio_postgres::types::WrongType>() || s.is::<tokio_postgres::types::WasNull>()
    }) {
        return DbError::Schema(format!(
            "{msg}: a column this quic-report does not understand (the table was not made by it); \
             point --sink at another database"
        ));
    }
    let Some(code) = e.code() else {
        // No SQLSTATE: I/O, TLS, a closed connection, a timeout.
        return DbError::Connection(msg);
    };
    // A SQLSTATE is five ASCII characters; a server (or a pooler, or
    // anything posing as one) may send anything.
    let class = code.code().get(..2).unwrap_or("");
    let transient = e.is_closed()
        || matches!(
            class,
            "08" | "53" | "57" | "58" | "40" | "28" | "3D" | "42" | "0A"
        )
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION;
    if transient {
        DbError::Connection(msg)
    } else if matches!(class, "22" | "54") {
        DbError::Unstorable(describe(e))
    } else {
        DbError::Rejected(describe(e))
    }
}

/// The server's message when there is one (the crate's `Display` says only
/// "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({}): {detail}", db.message(), db.code().code()),
            None => format!("{} ({})", db.message(), db.code().code()),
        },
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                src = inner.source();
            }
            s
        }
    }
}

/// An open connection, and the runtime that drives it: a current-thread
/// runtime of the sink's thread, run only inside [`Postgres::run`].
struct Postgres {
    rt: Runtime,
    client: Client,
    insert: Statement,
    what: String,
    /// [`PostgresConnect::set_statement_deadline`].
    deadline: Duration,
    /// [`PostgresConnect::set_count_limits`].
    count_limits: CountLimits,
}

/// An operation's failure: the database's error, or no answer in time.
enum Failed {
    Db(tokio_postgres::Error),
    Deadline,
    /// A read that PostgreSQL cancelled at the read's own deadline
    /// ([`Postgres::read`]); the connection goes on.
    Stopped,
}

impl From<tokio_postgres::Error> for Failed {
    fn from(e: tokio_postgres::Error) -> Failed {
        Failed::Db(e)
    }
}

impl Postgres {
    /// Runs `op` on the connection until it is done or [`Postgres::deadline`]
    /// passes (the connection is then taken for dead).
    fn run<T>(
        &mut self,
        op: impl AsyncFnOnce(&mut Client, &Statement) -> Result<T, Failed>,
    ) -> Result<T, DbError> {
        let deadline = self.deadline;
        let outcome = self.rt.block_on(async {
            tokio::time::timeout(deadline, op(&mut self.client, &self.insert))
                .await
                .unwrap_or(Err(Failed::Deadline))
        });
        outcome.map_err(|f| match f {
            Failed::Db(e) => self.err(&e),
            Failed::Deadline => DbError::Connection(format!(
                "{}: no answer within {} s; taken for dead",
                self.what,
                deadline.as_secs_f64()
            )),
            Failed::Stopped => DbError::Rejected(format!("{}: stopped at its deadline", self.what)),
        })
    }

    /// Runs the read `op` in a read-only transaction whose statements
    /// PostgreSQL itself cancels at `deadline` (`SET LOCAL
    /// statement_timeout`, which counts the time waited for a lock too),
    /// so that nobody's read outlives its answer; [`DbError::Rejected`]
    /// then, and the connection goes on. The statement deadline still
    /// bounds a database that does not answer at all.
    fn read<T>(
        &mut self,
        deadline: Instant,
        op: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> Result<T, Failed>,
    ) -> Result<T, DbError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.min(self.deadline).as_millis().max(1);
        self.run(async |client, _| {
            let tx = client.build_transaction().read_only(true).start().await?;
            tx.batch_execute(&format!("SET LOCAL statement_timeout = {ms}"))
                .await?;
            let out = match op(&tx).await {
                Err(Failed::Db(e)) if e.code() == Some(&SqlState::QUERY_CANCELED) => {
                    Err(Failed::Stopped)
                }
                other => other,
            }?;
            tx.commit().await?;
            Ok(out)
        })
    }

    fn err(&self, e: &tokio_postgres::Error) -> DbError {
        match classify(&self.what, e) {
            // A failed statement on a connection that died is a connection error.
            DbError::Rejected(m) | DbError::Unstorable(m) if self.client.is_closed() => {
                DbError::Connection(m)
            }
            other => other,
        }
    }
}

/// Inserts `rows` with one statement; a row is new if the statement
/// returned its key. The first row of a key repeated in `rows` (or in an
/// earlier statement of the same transaction) is the new one.
async fn insert_rows(
    client: &impl GenericClient,
    insert: &Statement,
    rows: &[Row],
) -> Result<Vec<Written>, tokio_postgres::Error> {
    let ids: Vec<&str> = rows.iter().map(|r| r.identity.as_str()).collect();
    let clients: Vec<&str> = rows.iter().map(|r| r.client.as_str()).collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    let at: Vec<SystemTime> = rows
        .iter()
        .map(|r| received_time(r.received_at_ms))
        .collect();
    let bodies: Vec<&str> = rows.iter().map(|r| r.body.as_str()).collect();
    let returned = client
        .query(insert, &[&ids, &clients, &seqs, &at, &bodies])
        .await?;
    let mut new: HashSet<(String, String, i64)> = returned
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect::<Result<_, tokio_postgres::Error>>()?;
    Ok(rows
        .iter()
        .map(|r| {
            let key = (r.identity.clone(), r.client.clone(), r.seq);
            if new.remove(&key) {
                Written::Inserted
            } else {
                Written::Duplicate
            }
        })
        .collect())
}

/// One row's outcome in [`Database::insert_each`]'s pass.
enum Each {
    Written(Vec<Written>),
    Refused(tokio_postgres::Error),
}

impl Database for Postgres {
    fn insert(&mut self, rows: &[Row]) -> Result<Vec<Written>, DbError> {
        self.run(async |client, insert| {
            if rows.len() <= ROWS_PER_STATEMENT {
                return Ok(insert_rows(client, insert, rows).await?);
            }
            // Several statements, one transaction: the batch commits whole or not at all.
            let tx = client.transaction().await?;
            let mut out = Vec::with_capacity(rows.len());
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                out.extend(insert_rows(&tx, insert, chunk).await?);
            }
            tx.commit().await?;
            Ok(out)
        })
    }

    fn insert_each(&mut self, rows: &[Row]) -> Result<Vec<Result<Written, DbError>>, DbError> {
        let what = self.what.clone();
        let outcomes = self.run(async |client, insert| {
            let mut tx = client.transaction().await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let one = tx.savepoint("one_row").await?;
                match insert_rows(&one, insert, std::slice::from_ref(r)).await {
                    Ok(w) => {
                        one.commit().await?;
                        out.push(Each::Written(w));
                    }
                    Err(e) => {
                        // Connection and schema errors end the pass (below);
                        // a row refused alone is rolled back and the pass goes on.
                        let refused = classify(&what, &e);
                        if matches!(refused, DbError::Connection(_) | DbError::Schema(_)) {
                            return Err(Failed::Db(e));
                        }
                        one.rollback().await?;
                        out.push(Each::Refused(e));
                    }
                }
            }
            tx.commit().await?;
            Ok(out)
        })?;
        Ok(outcomes
            .into_iter()
            .flat_map(|o| match o {
                Each::Written(w) => w.into_iter().map(Ok).collect::<Vec<_>>(),
                Each::Refused(e) => vec![Err(classify(&what, &e))],
            })
            .collect())
    }

    /// Stopped at `deadline` ([`Postgres::read`]).
    fn latest(
        &mut self,
        limit: LatestLimit,
        identity: Option<&str>,
        deadline: Instant,
    ) -> Result<Vec<(String, String, String)>, DbError> {
        let rows = i64::try_from(limit.rows).unwrap_or(i64::MAX);
        // A skip scan of the primary key ([`LATEST_ALL`]; for one identity,
        // the same within its range of the key), fetched a few rows at a
        // time through a portal so that the byte limit stops the read
        // instead of all of it arriving first. `statement_timeout` counts
        // each fetch on its own, so the deadline is checked between them.
        self.read(deadline, async |tx| {
            let portal = match identity {
                None => tx.bind(LATEST_ALL, &[&rows]).await?,
                Some(id) => tx.bind(LATEST_OF, &[&rows, &id]).await?,
            };
            let mut out = Vec::new();
            let mut taking = Taking::new(limit);
            while !taking.full() {
                if Instant::now() >= deadline {
                    return Err(Failed::Stopped);
                }
                let chunk = tx.query_portal(&portal, LATEST_CHUNK).await?;
                let last = chunk.len() < usize::try_from(LATEST_CHUNK).unwrap_or(0);
                for r in &chunk {
                    let row: (String, String, String) =
                        (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
                    if !taking.take_row(&row.0, &row.1, row.2.as_bytes()) {
                        break;
                    }
                    out.push(row);
                }
                if last {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// [`COUNTS`], stopped at `deadline` ([`Postgres::read`]).
    fn counts(&mut self, deadline: Instant) -> Result<Counts, DbError> {
        let rows_limit = i64::try_from(self.count_limits.rows).unwrap_or(i64::MAX);
        let clients_limit = i64::try_from(self.count_limits.clients).unwrap_or(i64::MAX - 1);
        let (rows, rows_estimated, clients): (i64, bool, i64) =
            self.read(deadline, async |tx| {
                let row = tx
                    .query_one(COUNTS, &[&rows_limit, &(clients_limit + 1)])
                    .await?;
                Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
            })?;
        Ok(Counts {
            rows: u64::try_from(rows).unwrap_or(0),
            rows_estimated,
            clients: u64::try_from(clients.min(clients_limit)).unwrap_or(0),
            clients_capped: clients > clients_limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgpass_lines_match_with_wildcards_and_escapes() {
        let text = "# comment\n\
                    otherhost:5432:*:alice:wrong\n\
                    127.0.0.1:*:reports:alice:pa\\:ss\n\
                    *:*:*:*:fallback\n";
        assert_eq!(
            pgpass_lookup(text, "127.0.0.1", 6543, "reports", "alice").as_deref(),
            Some("pa:ss")
        );
        assert_eq!(
            pgpass_lookup(text, "db", 5432, "x", "bob").as_deref(),
            Some("fallback")
        );
        assert_eq!(pgpass_lookup("h:1:d:u\n", "h", 1, "d", "u"), None);
    }

    #[test]
    fn urls_keep_libpq_parameters_and_hide_passwords() {
        let c = PostgresConnect::parse(
            "postgres://alice:secret@127.0.0.1:6543/reports?sslmode=verify-full&sslrootcert=/tmp/ca.pem&connect_timeout=2",
        )
        .expect("parses");
        assert_eq!(
            c.tls(),
            &Tls::Verified {
                roots: "/tmp/ca.pem".into(),
                name: true
            }
        );
        assert_eq!(c.config.get_password(), Some(&b"secret"[..]));
        assert_eq!(
            c.config.get_connect_timeout(),
            Some(&Duration::from_secs(2))
        );
        assert!(!c.describe().contains("secret"), "{}", c.describe());
        let e = PostgresConnect::parse("postgres://a@h/db?sslmode=sometimes").expect_err("bad");
        assert!(e.to_string().contains("sslmode=sometimes"), "{e}");
        let c = PostgresConnect::parse("postgres://a@h/db?sslmode=disable").expect("parses");
        assert_eq!(c.tls(), &Tls::Disable);
        // The password as the driver reads it, wherever the URL puts it.
        for (url, password) in [
            ("postgres://a@h/db?password=hunter2", "hunter2"),
            ("postgres://a:pa/ss@h/db", "pa/ss"),
        ] {
            let c = PostgresConnect::parse(url).expect("parses");
            assert_eq!(c.config.get_password(), Some(password.as_bytes()), "{url}");
            assert!(!c.describe().contains(password), "{}", c.describe());
        }
    }
}
