//! Databases as sinks: the schema, the row a report becomes, the two
//! backends ([`sqlite`], [`postgres`]) and the helper thread that commits
//! rows for the server loop ([`writer`]).
//!
//! ## Schema (version [`SCHEMA_VERSION`])
//!
//! Created when missing (PostgreSQL types; SQLite stores `received_at` as
//! ISO-8601 UTC text and `body` as JSON text):
//!
//! ```sql
//! CREATE TABLE quic_report_schema (version integer NOT NULL);   -- one row: 1
//! CREATE TABLE reports (
//!     identity    text        COLLATE "C" NOT NULL,  -- who reported ('' = anonymous)
//!     client      text        COLLATE "C" NOT NULL,  -- the report's `client`
//!     seq         bigint      NOT NULL,  -- the report's `seq`
//!     received_at timestamptz NOT NULL,  -- when the server read it
//!     body        jsonb       NOT NULL,  -- the report object as received
//!     PRIMARY KEY (identity, client, seq));
//! ```
//!
//! Query it with e.g. `SELECT client, seq, body->>'value' FROM reports`
//! (SQLite: `json_extract(body, '$.value')`).
//!
//! - **The key is the duplicate filter.** Rows are inserted with `ON
//!   CONFLICT DO NOTHING`: a row the key refuses was recorded before (by
//!   this process or another one sharing the database) and the report is
//!   answered `duplicate`. Nothing is read back at start.
//! - **A report without `client` or `seq`** is always recorded (the
//!   protocol does not deduplicate it): it gets the key
//!   `client = "keyless-<32 hex digits drawn at start>"`, `seq` = 1, 2, ...
//!   counted by the server process, unique across processes.
//! - A `seq` above 2^63-1 is stored as the `bigint` with the same 64 bits
//!   (negative): the key stays exact.
//! - **A row the database can never store** (PostgreSQL: an error of
//!   SQLSTATE class 22, *data exception*, such as `jsonb` refusing the
//!   valid JSON escape `\u0000` (22P05) or `text` refusing a NUL byte
//!   (22021); SQLite: a value over its length limit) is
//!   [`DbError::Unstorable`]: the report is answered `unstorable`, a
//!   permanent error the client drops the report on, since a resend would
//!   be refused the same way. SQLite stores `\u0000` as it came (its JSON
//!   is text), so the same report is recorded there. Everything else a
//!   database refuses is taken as passing (`not_recorded`, sent again).
//! - **Version check.** A database whose `quic_report_schema` holds a
//!   newer version than this build knows, or that has a `reports` table
//!   without a `quic_report_schema` beside it, is refused at start with a
//!   message saying so; nothing is written to it.

mod latest;
pub mod postgres;
mod reader;
pub mod sqlite;
mod wal_sync;
pub mod writer;

use std::fmt;

use quic_report_core::Report;

pub use latest::{LatestLimit, Taking};

/// The schema version this build creates and understands.
pub const SCHEMA_VERSION: i32 = 1;

/// A row's `received_at` (Unix milliseconds of the server's own clock) as
/// a time, kept within 1970 to 9999 (what both databases can store).
pub fn received_time(unix_ms: i64) -> std::time::SystemTime {
    let ms = u64::try_from(unix_ms).unwrap_or(0).min(253_402_300_799_999);
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

/// `received_at` as SQLite stores it, ISO 8601 in UTC with milliseconds
/// (`2026-12-02T13:05:41.844Z`; what `strftime('%Y-%m-%dT%H:%M:%fZ')`
/// writes).
pub fn iso_millis(unix_ms: i64) -> String {
    humantime::format_rfc3339_millis(received_time(unix_ms)).to_string()
}

/// One report as a row of `reports`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    /// Who reported (`""`: anonymous).
    pub identity: String,
    /// The report's `client` (or the keyless key, see the module doc).
    pub client: String,
    /// The report's `seq`, as the 64 bits of a `bigint`.
    pub seq: i64,
    /// Unix milliseconds when the server read the report.
    pub received_at_ms: i64,
    /// The report object's JSON text.
    pub body: String,
}

/// The identity a report is keyed on: the authenticated identity of the
/// connection that carried it (`""`: anonymous; see
/// `quic_report_core::identity`). The one place that decides it.
pub fn identity_of(report: &Report) -> &str {
    report.identity.as_str()
}

/// Keys for reports that bring no `client`/`seq` of their own: a random
/// per-process name and a counter (see the module doc).
#[derive(Debug, Clone)]
pub struct KeylessKeys {
    client: String,
    next: u64,
}

impl KeylessKeys {
    /// Keys under `keyless-<hex of instance>`.
    pub fn new(instance: [u8; 16]) -> KeylessKeys {
        KeylessKeys {
            client: format!("keyless-{}", hex::encode(instance)),
            next: 1,
        }
    }

    /// The row for `report`, read at `received_at_ms`.
    pub fn row(&mut self, report: &Report, received_at_ms: u64) -> Row {
        let (client, seq) = match report.key() {
            Some((client, seq)) => (client.to_owned(), seq),
            None => {
                let seq = self.next;
                self.next += 1;
                (self.client.clone(), seq)
            }
        };
        Row {
            identity: identity_of(report).to_owned(),
            client,
            // The same 64 bits (see the module doc).
            seq: seq as i64,
            received_at_ms: i64::try_from(received_at_ms).unwrap_or(i64::MAX),
            // A report's JSON is UTF-8 (it was parsed): checked the fast way.
            body: match std::str::from_utf8(report.json()) {
                Ok(s) => s.to_owned(),
                Err(_) => String::from_utf8_lossy(report.json()).into_owned(),
            },
        }
    }
}

/// What the database did with a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Inserted and committed.
    Inserted,
    /// Its key was there already: recorded before.
    Duplicate,
}

/// `/stats`'s numbers from the database ([`Database::counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Rows in the table: counted, or the database's estimate when it
    /// holds more than [`CountLimits::rows`] (`rows_estimated`).
    pub rows: u64,
    /// Whether `rows` is an estimate.
    pub rows_estimated: bool,
    /// Distinct `(identity, client)` among the rows, counted (one index
    /// probe each) up to [`CountLimits::clients`].
    pub clients: u64,
    /// Whether there are more clients than `clients` (the count stopped).
    pub clients_capped: bool,
}

impl Counts {
    /// Every row and every client counted (nothing estimated or capped).
    pub fn counted(rows: u64, clients: u64) -> Counts {
        Counts {
            rows,
            rows_estimated: false,
            clients,
            clients_capped: false,
        }
    }
}

/// How far `/stats` counts. Its answer must come within the read's
/// deadline however large the table grows, or it would never come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountLimits {
    /// Rows counted up to this many. A count reads the whole key index
    /// (10 ms per million rows in SQLite here, 25 in PostgreSQL); above
    /// it the row number is the database's estimate, which takes two
    /// index probes (SQLite) or one catalogue row (PostgreSQL).
    pub rows: u64,
    /// Clients counted up to this many (a client is one index probe:
    /// about 8 µs in PostgreSQL here). A reporter may name as many clients
    /// as it likes.
    pub clients: u64,
}

/// The limits unless a test sets others.
pub const COUNT_LIMITS: CountLimits = CountLimits {
    rows: 10_000_000,
    clients: 100_000,
};

/// Why a database operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    /// The connection is unusable (down, closed, refused, timed out): drop
    /// it and connect again; nothing of the failed batch counts as written.
    #[error("{0}")]
    Connection(String),
    /// The database refused the rows for now (e.g. a constraint it may
    /// stop enforcing); the connection is fine. Sent again later. The
    /// message is the database's, without the database's address: it
    /// goes to the client in the answer.
    #[error("{0}")]
    Rejected(String),
    /// The database can never store this row (a data exception: a value
    /// its column cannot take). The message is the database's, without
    /// the database's address: it goes to the client in the answer.
    #[error("{0}")]
    Unstorable(String),
    /// The database holds a schema this build does not understand: fatal.
    #[error("{0}")]
    Schema(String),
}

/// An open database: inserts rows and answers the read side.
pub trait Database: Send {
    /// Inserts `rows` with `ON CONFLICT DO NOTHING` and commits them; the
    /// answer says, per row in order, whether it was new. On an error,
    /// none of them counts as written (some may have been committed: their
    /// resend is then answered `duplicate`).
    fn insert(&mut self, rows: &[Row]) -> Result<Vec<Written>, DbError>;

    /// Inserts `rows` each on its own, so that a row the database refuses
    /// fails alone: the outer error fails them all (the connection, the
    /// commit), the inner one is why that row was refused. The backends
    /// do it in one transaction with a savepoint per row (one commit);
    /// this default commits each row by itself.
    fn insert_each(&mut self, rows: &[Row]) -> Result<Vec<Result<Written, DbError>>, DbError> {
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            match self.insert(std::slice::from_ref(r)) {
                Ok(w) => out.extend(w.into_iter().map(Ok)),
                Err(e @ (DbError::Connection(_) | DbError::Schema(_))) => return Err(e),
                Err(e) => out.push(Err(e)),
            }
        }
        Ok(out)
    }

    /// The latest report (highest `seq`) of each `(identity, client)`, as
    /// `(identity, client, body)`, in the key's order as far as `limit`
    /// allows (its rows, and its bytes: the rows stop before the first that
    /// would go over); with `identity`,
    /// that identity's alone (selected before the limit, so that its rows
    /// are never crowded out by other identities'). Stopped at `deadline`
    /// (nobody waits for the answer after it) with [`DbError::Rejected`],
    /// the connection kept.
    fn latest(
        &mut self,
        limit: LatestLimit,
        identity: Option<&str>,
        deadline: std::time::Instant,
    ) -> Result<Vec<(String, String, String)>, DbError>;

    /// Rows in the table and distinct `(identity, client)` among them,
    /// as far as the backend's [`CountLimits`] go ([`COUNT_LIMITS`] unless
    /// a test set others); `deadline` as for [`Database::latest`].
    fn counts(&mut self, deadline: std::time::Instant) -> Result<Counts, DbError>;
}

/// Opens connections to one database (again after a failure).
pub trait Connect: Send {
    /// Connects, creates the schema if missing, and checks its version.
    fn connect(&mut self) -> Result<Box<dyn Database>, DbError>;

    /// What to call the database in log lines (no password).
    fn describe(&self) -> String;

    /// Another way to the same database: the read side connects with it,
    /// on a connection of its own.
    fn another(&self) -> Box<dyn Connect>;
}

impl fmt::Debug for dyn Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// What a database holds at start, read in the setup transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// A `quic_report_schema` table, and the highest version in it.
    Versioned(Option<i64>),
    /// A `reports` table without a version table beside it.
    ForeignReports,
    /// Neither table.
    Nothing,
}

/// Whether to create the schema, or why the database is refused.
fn check_schema(found: Found, what: &str) -> Result<bool, DbError> {
    match found {
        Found::Nothing => Ok(true),
        Found::Versioned(Some(v)) if v <= i64::from(SCHEMA_VERSION) => Ok(false),
        Found::Versioned(Some(v)) => Err(DbError::Schema(format!(
            "{what} has schema version {v} (table quic_report_schema), newer than the \
             version {SCHEMA_VERSION} this quic-report understands: upgrade quic-report, or \
             point --sink at another database"
        ))),
        Found::Versioned(None) => Err(DbError::Schema(format!(
            "{what}: table quic_report_schema holds no version: it was not created by \
             quic-report, and is left alone"
        ))),
        Found::ForeignReports => Err(DbError::Schema(format!(
            "{what} has a table `reports` but no quic_report_schema table: it was not \
             created by quic-report, and is left alone; point --sink at another database"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(json: &str) -> Report {
        let serde_json::Value::Object(map) = serde_json::from_str(json).expect("json") else {
            panic!("not an object")
        };
        Report::from_object(map).expect("a valid report")
    }

    #[test]
    fn keyed_reports_keep_their_key_and_keyless_ones_get_unique_keys() {
        let mut keys = KeylessKeys::new([0xab; 16]);
        let r = keys.row(&report(r#"{"client":"c1","seq":7,"value":1}"#), 5);
        assert_eq!(
            (r.identity.as_str(), r.client.as_str(), r.seq),
            ("", "c1", 7)
        );
        assert_eq!(r.received_at_ms, 5);
        let a = keys.row(&report(r#"{"value":1}"#), 5);
        let b = keys.row(&report(r#"{"value":1}"#), 5);
        assert!(a.client.starts_with("keyless-abab"));
        assert_eq!((a.seq, b.seq), (1, 2));
        let big = keys.row(&report(r#"{"client":"c","seq":18446744073709551615}"#), 5);
        assert_eq!(big.seq, -1, "the same 64 bits");
    }
}

/// Test doubles shared by the writer's and the held reports' tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::{Arc, Mutex};

    use super::writer::Writer;
    use super::{Connect, Counts, Database, DbError, LatestLimit, Row, Written};

    /// Never connects.
    pub(crate) struct Down;

    impl Connect for Down {
        fn connect(&mut self) -> Result<Box<dyn Database>, DbError> {
            Err(DbError::Connection("refused".into()))
        }

        fn describe(&self) -> String {
            "down".into()
        }

        fn another(&self) -> Box<dyn Connect> {
            Box::new(Down)
        }
    }

    /// Every statement and every transaction fails for the data (as a
    /// deferred check at COMMIT would): every row is refused for now.
    pub(crate) struct FailsAtCommit;

    impl Database for FailsAtCommit {
        fn insert(&mut self, _: &[Row]) -> Result<Vec<Written>, DbError> {
            Err(DbError::Unstorable("check violated at commit".into()))
        }

        fn insert_each(&mut self, _: &[Row]) -> Result<Vec<Result<Written, DbError>>, DbError> {
            Err(DbError::Unstorable("check violated at commit".into()))
        }

        fn latest(
            &mut self,
            _: LatestLimit,
            _: Option<&str>,
            _: std::time::Instant,
        ) -> Result<Vec<(String, String, String)>, DbError> {
            Ok(Vec::new())
        }

        fn counts(&mut self, _: std::time::Instant) -> Result<Counts, DbError> {
            Ok(Counts::default())
        }
    }

    /// Takes every row as new and reads nothing; its inserts (or its
    /// reads) wait while the test holds `gate`. As a [`Connect`], it
    /// connects to a copy of itself.
    #[derive(Clone)]
    pub(crate) struct Gated {
        pub(crate) gate: Arc<Mutex<()>>,
        pub(crate) inserts: bool,
        pub(crate) reads: bool,
    }

    impl Gated {
        fn pass(&self, gated: bool) {
            if gated {
                drop(self.gate.lock().expect("gate"));
            }
        }
    }

    impl Database for Gated {
        fn insert(&mut self, rows: &[Row]) -> Result<Vec<Written>, DbError> {
            self.pass(self.inserts);
            Ok(vec![Written::Inserted; rows.len()])
        }

        fn latest(
            &mut self,
            _: LatestLimit,
            _: Option<&str>,
            _: std::time::Instant,
        ) -> Result<Vec<(String, String, String)>, DbError> {
            self.pass(self.reads);
            Ok(Vec::new())
        }

        fn counts(&mut self, _: std::time::Instant) -> Result<Counts, DbError> {
            self.pass(self.reads);
            Ok(Counts::default())
        }
    }

    impl Gated {
        /// A [`Writer`] on a `Gated` whose reads (not its inserts) wait
        /// while the returned gate is held, on either thread's connection.
        pub(crate) fn reads_writer(
            waker: Arc<mio::Waker>,
            seed: [u8; 32],
        ) -> (Writer, Arc<Mutex<()>>) {
            let gate = Arc::new(Mutex::new(()));
            let db = Gated {
                gate: Arc::clone(&gate),
                inserts: false,
                reads: true,
            };
            let writer = Writer::start(Box::new(db.clone()), Some(Box::new(db)), waker, seed)
                .expect("writer");
            (writer, gate)
        }
    }

    impl Connect for Gated {
        fn connect(&mut self) -> Result<Box<dyn Database>, DbError> {
            Ok(Box::new(self.clone()))
        }

        fn describe(&self) -> String {
            "gated".into()
        }

        fn another(&self) -> Box<dyn Connect> {
            Box::new(self.clone())
        }
    }
}
