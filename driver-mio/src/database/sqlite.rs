//! The SQLite backend (`--sink sqlite:PATH`), embedded through rusqlite.
//!
//! The file is opened in WAL mode, and several server processes on one
//! host may share it (each commit takes the write lock for one
//! transaction; a process waits up to 5 s for it). A committed batch
//! survives a crash of the server; whether it survives a power loss before
//! it is acknowledged is `--fsync` ([`Fsync`]): `always` (the default) is
//! `synchronous=FULL`, the WAL synced in every commit; `interval` is
//! `synchronous=NORMAL` with the WAL synced within the period after a
//! commit ([`WalSync`]), which may be acknowledged first; `never` leaves it
//! to SQLite's checkpoints and the kernel's writeback. A
//! batch is one `BEGIN IMMEDIATE` transaction of `INSERT ... ON CONFLICT DO
//! NOTHING` statements, one per row, whose change count (0 or 1) says
//! whether the row was new.
//!
//! The table is an ordinary rowid table (the primary key is then an index
//! beside it): the rows of a batch append to the table's last pages and
//! only the small index entries go to each client's place in the key, so a
//! commit writes fewer pages to the WAL than it did when the table was
//! `WITHOUT ROWID` (every client's leaf holding whole rows, and splitting
//! often): the commit thread spent 10.2 µs per row instead of 11.3 (C=16
//! K=8, 45 rows per commit, medians of 6 interleaved trials). A table made
//! `WITHOUT ROWID` by an earlier build is used as it is.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use super::wal_sync::WalSync;
use super::{
    COUNT_LIMITS, Connect, CountLimits, Counts, Database, DbError, Found, LatestLimit, Row,
    SCHEMA_VERSION, Taking, Written, check_schema,
};
use crate::sink::Fsync;

const INSERT: &str = "INSERT INTO reports (identity, client, seq, received_at, body) \
     VALUES (?1, ?2, ?3, ?4, ?5) \
     ON CONFLICT DO NOTHING";

/// [`INSERT`] for the anonymous identity, `''` written in the statement
/// instead of bound: rusqlite binds an empty string as the dangling
/// pointer `0x1` (`SQLITE_STATIC`), and every comparison of the key's
/// first column in the index then calls `memcmp(0x1, .., 0)`. glibc's
/// AVX-512 `memcmp` (`__memcmp_evex_movbe`) reads that address with a
/// masked load, which on this machine's CPU (AMD EPYC, family 26) costs
/// about 150 ns, a fault-suppression assist each time: 22 % of the
/// commit thread's time at C=16 K=8 went to it (docs/benchmarks.md).
const INSERT_ANONYMOUS: &str = "INSERT INTO reports (identity, client, seq, received_at, body) \
     VALUES ('', ?1, ?2, ?3, ?4) \
     ON CONFLICT DO NOTHING";

// `/latest` and `/stats` walk the clients with a skip scan of the
// primary key, driven from here ([`Clients`]): one index probe per client
// for the next (identity, client), and for `/latest` one more for its
// highest seq. SQLite does not skip through an index by itself (a row
// value `>` is a range on `identity` alone), and one query that keeps
// each client's last row reads every row of the table: 0.4 s per million
// rows here, however few the clients.

/// The highest rowid less the lowest plus one (0 for an empty table):
/// two probes of the table's b-tree.
const ROWID_SPAN: &str = "SELECT coalesce((SELECT max(rowid) FROM reports) \
     - (SELECT min(rowid) FROM reports) + 1, 0)";

/// The first (identity, client) of the table.
const CLIENTS_FIRST: &str = "SELECT identity, client FROM reports \
     ORDER BY identity, client LIMIT 1";
/// The first client of identity `?1`.
const CLIENTS_FIRST_OF: &str = "SELECT identity, client FROM reports WHERE identity = ?1 \
     ORDER BY client LIMIT 1";
/// The client after `?2` in identity `?1`.
const CLIENTS_NEXT: &str = "SELECT identity, client FROM reports \
     WHERE identity = ?1 AND client > ?2 ORDER BY client LIMIT 1";
/// The first client of the identity after `?1`.
const CLIENTS_NEXT_IDENTITY: &str = "SELECT identity, client FROM reports WHERE identity > ?1 \
     ORDER BY identity, client LIMIT 1";
/// The body of client `?2`'s highest seq in identity `?1`.
const LATEST_LAST: &str = "SELECT body FROM reports WHERE identity = ?1 AND client = ?2 \
     ORDER BY seq DESC LIMIT 1";

/// Steps of SQLite's virtual machine between two looks at a read's
/// deadline (a look is a clock read: tens of nanoseconds per thousand
/// steps).
const PROGRESS_OPS: std::ffi::c_int = 1000;

/// Opens `PATH` (created if missing).
#[derive(Debug, Clone)]
pub struct SqliteConnect {
    path: PathBuf,
    count_limits: CountLimits,
    fsync: Fsync,
}

impl SqliteConnect {
    /// For the database file at `path`, synced in every commit
    /// ([`Fsync::Always`]).
    pub fn new(path: &Path) -> SqliteConnect {
        SqliteConnect {
            path: path.to_owned(),
            count_limits: COUNT_LIMITS,
            fsync: Fsync::Always,
        }
    }

    /// When the connections made from now on make their commits durable
    /// (see the module docs). A zero interval is [`Fsync::Always`].
    pub fn set_fsync(&mut self, fsync: Fsync) {
        self.fsync = match fsync {
            Fsync::Interval(d) if d.is_zero() => Fsync::Always,
            other => other,
        };
    }

    /// What [`SqliteConnect::set_fsync`] promises, for the log.
    pub fn durability(&self) -> String {
        match self.fsync {
            Fsync::Always => {
                "every commit synced before it is acknowledged (synchronous=FULL)".into()
            }
            Fsync::Interval(d) => format!(
                "each commit synced within {d:?} of it, maybe after its acknowledgement \
                 (synchronous=NORMAL, --fsync interval): a power loss may lose the last {d:?}"
            ),
            Fsync::Never => "commits synced only by SQLite's checkpoints and the kernel's \
                 writeback (synchronous=NORMAL, --fsync never): a power loss may lose \
                 acknowledged reports"
                .into(),
        }
    }

    /// How far `/stats` counts on the connections made from now on
    /// ([`COUNT_LIMITS`] unless set).
    pub fn set_count_limits(&mut self, limits: CountLimits) {
        self.count_limits = limits;
    }
}

impl Connect for SqliteConnect {
    fn connect(&mut self) -> Result<Box<dyn Database>, DbError> {
        Ok(Box::new(self.open()?))
    }

    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    /// For the read thread: the same file; its connection commits nothing,
    /// so it needs no sync of the log.
    fn another(&self) -> Box<dyn Connect> {
        Box::new(SqliteConnect {
            fsync: Fsync::Never,
            ..self.clone()
        })
    }
}

impl SqliteConnect {
    /// [`Connect::connect`], unboxed.
    fn open(&self) -> Result<Sqlite, DbError> {
        let what = self.describe();
        let mut conn = Connection::open(&self.path).map_err(|e| classify(&what, e))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| classify(&what, e))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| classify(&what, e))?;
        let synchronous = if self.fsync == Fsync::Always {
            "FULL"
        } else {
            "NORMAL"
        };
        conn.pragma_update(None, "synchronous", synchronous)
            .map_err(|e| classify(&what, e))?;
        setup(&mut conn, &what)?;
        // A table made `WITHOUT ROWID` by an earlier build has no rowids.
        let rowids = conn.prepare("SELECT rowid FROM reports LIMIT 0").is_ok();
        let wal_sync = match self.fsync {
            Fsync::Interval(period) => {
                // SQLite's own name of the file (symlinks resolved), whose
                // log this connection created when it opened it in WAL mode.
                let mut wal = conn
                    .path()
                    .map_or_else(|| self.path.clone().into_os_string(), Into::into);
                wal.push("-wal");
                let wal = PathBuf::from(wal);
                Some(WalSync::start(&wal, period).map_err(|e| {
                    DbError::Connection(format!(
                        "{what}: opening {} to sync it: {e}",
                        wal.display()
                    ))
                })?)
            }
            Fsync::Always | Fsync::Never => None,
        };
        Ok(Sqlite {
            conn,
            what,
            count_limits: self.count_limits,
            rowids,
            wal_sync,
        })
    }
}

/// Creates the schema if missing and checks its version, in one
/// transaction that holds the write lock (two servers starting at once
/// create it once).
fn setup(conn: &mut Connection, what: &str) -> Result<(), DbError> {
    let err = |e| classify(what, e);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(err)?;
    let exists = |name: &str| -> Result<bool, DbError> {
        tx.query_row(
            // Table names are case-insensitive: `Reports` is `reports`.
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1 COLLATE NOCASE",
            [name],
            |_| Ok(()),
        )
        .optional()
        .map(|o| o.is_some())
        .map_err(err)
    };
    let found = if exists("quic_report_schema")? {
        Found::Versioned(
            tx.query_row("SELECT max(version) FROM quic_report_schema", [], |r| {
                r.get(0)
            })
            .map_err(err)?,
        )
    } else if exists("reports")? {
        Found::ForeignReports
    } else {
        Found::Nothing
    };
    if check_schema(found, what)? {
        tx.execute_batch(
            "CREATE TABLE quic_report_schema (version integer NOT NULL);
             CREATE TABLE reports (
                 identity    text    NOT NULL,
                 client      text    NOT NULL,
                 seq         integer NOT NULL,
                 received_at text    NOT NULL,
                 body        text    NOT NULL,
                 PRIMARY KEY (identity, client, seq));",
        )
        .map_err(err)?;
        tx.execute(
            "INSERT INTO quic_report_schema (version) VALUES (?1)",
            [SCHEMA_VERSION],
        )
        .map_err(err)?;
        log::info!("{what}: created the reports table (schema version {SCHEMA_VERSION})");
    }
    tx.commit().map_err(err)
}

/// Sorts rusqlite's errors: a busy, broken, full, read-only or forbidden
/// database (what refuses every row, not one) is retried on a new
/// connection with backoff, a value over SQLite's length limit can never
/// be stored, anything else refused the rows for now.
fn classify(what: &str, e: rusqlite::Error) -> DbError {
    let msg = format!("{what}: {e}");
    // Our table gone or changed under us (dropped, a column renamed): it
    // refuses every row, like PostgreSQL's undefined table (42P01), so it
    // is an outage, warned about once and retried with backoff, not a
    // refusal of each row that only the debug log would show.
    if e.sqlite_error_code() == Some(ErrorCode::Unknown)
        && ["no such table", "no such column", "has no column named"]
            .iter()
            .any(|m| msg.contains(m))
    {
        return DbError::Connection(msg);
    }
    match e.sqlite_error_code() {
        Some(ErrorCode::TooBig) => DbError::Unstorable(e.to_string()),
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::CannotOpen
            | ErrorCode::SystemIoFailure
            | ErrorCode::NotADatabase
            | ErrorCode::DatabaseCorrupt
            | ErrorCode::DiskFull
            | ErrorCode::ReadOnly
            | ErrorCode::PermissionDenied,
        ) => DbError::Connection(msg),
        _ => DbError::Rejected(e.to_string()),
    }
}

struct Sqlite {
    conn: Connection,
    what: String,
    /// [`SqliteConnect::set_count_limits`].
    count_limits: CountLimits,
    /// Whether `reports` has rowids, which the row estimate is made of (a
    /// table without them is always counted).
    rowids: bool,
    /// Under `--fsync interval`: syncs the WAL after commits.
    wal_sync: Option<WalSync>,
}

/// `received_at`'s text, made once for the rows of a batch that share
/// their millisecond (all the rows one loop turn read).
#[derive(Default)]
struct Stamp {
    ms: Option<i64>,
    text: String,
}

impl Stamp {
    fn text(&mut self, ms: i64) -> &str {
        if self.ms != Some(ms) {
            self.ms = Some(ms);
            self.text = super::iso_millis(ms);
        }
        &self.text
    }
}

/// The prepared inserts of one transaction: [`INSERT`], and
/// [`INSERT_ANONYMOUS`] for the anonymous identity's rows.
struct Inserts<'c> {
    named: rusqlite::CachedStatement<'c>,
    anonymous: rusqlite::CachedStatement<'c>,
    stamp: Stamp,
}

impl<'c> Inserts<'c> {
    fn new(tx: &'c rusqlite::Transaction<'_>) -> rusqlite::Result<Inserts<'c>> {
        Ok(Inserts {
            named: tx.prepare_cached(INSERT)?,
            anonymous: tx.prepare_cached(INSERT_ANONYMOUS)?,
            stamp: Stamp::default(),
        })
    }

    /// One row: its change count (0 or 1) says whether it was new.
    fn row(&mut self, r: &Row) -> rusqlite::Result<Written> {
        let at = self.stamp.text(r.received_at_ms);
        let n = if r.identity.is_empty() {
            self.anonymous
                .execute(rusqlite::params![r.client, r.seq, at, r.body])?
        } else {
            self.named
                .execute(rusqlite::params![r.identity, r.client, r.seq, at, r.body])?
        };
        Ok(if n == 1 {
            Written::Inserted
        } else {
            Written::Duplicate
        })
    }
}

impl Database for Sqlite {
    fn insert(&mut self, rows: &[Row]) -> Result<Vec<Written>, DbError> {
        let what = &self.what;
        let err = |e| classify(what, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let mut out = Vec::with_capacity(rows.len());
        {
            let mut inserts = Inserts::new(&tx).map_err(err)?;
            for r in rows {
                out.push(inserts.row(r).map_err(err)?);
            }
        }
        tx.commit().map_err(err)?;
        if let Some(w) = &self.wal_sync {
            w.committed();
        }
        Ok(out)
    }

    fn insert_each(&mut self, rows: &[Row]) -> Result<Vec<Result<Written, DbError>>, DbError> {
        let what = &self.what;
        let err = |e| classify(what, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let mut out = Vec::with_capacity(rows.len());
        {
            let mut inserts = Inserts::new(&tx).map_err(err)?;
            for r in rows {
                tx.execute_batch("SAVEPOINT one_row").map_err(err)?;
                match inserts.row(r).map_err(err) {
                    Ok(w) => {
                        tx.execute_batch("RELEASE one_row").map_err(err)?;
                        out.push(Ok(w));
                    }
                    Err(e @ (DbError::Connection(_) | DbError::Schema(_))) => return Err(e),
                    Err(e) => {
                        tx.execute_batch("ROLLBACK TO one_row; RELEASE one_row")
                            .map_err(err)?;
                        out.push(Err(e));
                    }
                }
            }
        }
        tx.commit().map_err(err)?;
        if let Some(w) = &self.wal_sync {
            w.committed();
        }
        Ok(out)
    }

    fn latest(
        &mut self,
        limit: LatestLimit,
        identity: Option<&str>,
        deadline: Instant,
    ) -> Result<Vec<(String, String, String)>, DbError> {
        self.read_until(deadline, |conn| {
            let mut clients = Clients::new(conn, identity, deadline)?;
            let mut last = conn.prepare_cached(LATEST_LAST)?;
            let mut out = Vec::new();
            let mut taking = Taking::new(limit);
            while !taking.full() {
                let Some((id, client)) = clients.next()? else {
                    break;
                };
                let body: String = last.query_row([&id, &client], |r| r.get(0))?;
                if !taking.take_row(&id, &client, body.as_bytes()) {
                    break;
                }
                out.push((id, client, body));
            }
            Ok(out)
        })
    }

    fn counts(&mut self, deadline: Instant) -> Result<Counts, DbError> {
        let (limits, rowids) = (self.count_limits, self.rowids);
        self.read_until(deadline, |conn| {
            // At least the rows there are, in two probes: rowids are
            // unique, and a new row's is the highest plus one, so the span
            // is the row count unless rows other than the oldest were
            // deleted.
            let span = if rowids {
                let span: i64 = conn.query_row(ROWID_SPAN, [], |r| r.get(0))?;
                u64::try_from(span).unwrap_or(0)
            } else {
                0
            };
            let (rows, rows_estimated) = if span <= limits.rows {
                // SQLite's count of the key index's entries (10 ms per
                // million rows here; one step of its virtual machine,
                // which the deadline cannot stop, hence the limit).
                let n: i64 = conn.query_row("SELECT count(*) FROM reports", [], |r| r.get(0))?;
                (u64::try_from(n).unwrap_or(0), false)
            } else {
                (span, true)
            };
            let mut walk = Clients::new(conn, None, deadline)?;
            let (mut clients, mut clients_capped) = (0u64, false);
            while walk.next()?.is_some() {
                if clients == limits.clients {
                    clients_capped = true;
                    break;
                }
                clients += 1;
            }
            Ok(Counts {
                rows,
                rows_estimated,
                clients,
                clients_capped,
            })
        })
    }
}

type Key = (String, String);

/// The (identity, client) pairs of the table in the key's order, those of
/// one identity if given, found one index probe each; the read is
/// stopped at `deadline`, which the progress handler would not see (each
/// probe is far shorter than [`PROGRESS_OPS`] steps).
struct Clients<'c> {
    conn: &'c Connection,
    identity: Option<&'c str>,
    deadline: Instant,
    next: Option<Key>,
}

impl<'c> Clients<'c> {
    fn new(
        conn: &'c Connection,
        identity: Option<&'c str>,
        deadline: Instant,
    ) -> rusqlite::Result<Clients<'c>> {
        let next = match identity {
            Some(id) => probe(conn, CLIENTS_FIRST_OF, &[&id])?,
            None => probe(conn, CLIENTS_FIRST, &[])?,
        };
        Ok(Clients {
            conn,
            identity,
            deadline,
            next,
        })
    }

    fn next(&mut self) -> rusqlite::Result<Option<Key>> {
        let Some((id, client)) = self.next.take() else {
            return Ok(None);
        };
        if Instant::now() >= self.deadline {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_INTERRUPT),
                None,
            ));
        }
        self.next = match probe(self.conn, CLIENTS_NEXT, &[&id, &client])? {
            Some(next) => Some(next),
            None if self.identity.is_some() => None,
            None => probe(self.conn, CLIENTS_NEXT_IDENTITY, &[&id])?,
        };
        Ok(Some((id, client)))
    }
}

/// One (identity, client) from `sql`, a cached statement.
fn probe(
    conn: &Connection,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
) -> rusqlite::Result<Option<Key>> {
    conn.prepare_cached(sql)?
        .query_row(params, |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
}

impl Sqlite {
    /// Runs the read `read`, stopped at `deadline` (SQLite's progress
    /// handler, asked every [`PROGRESS_OPS`] steps of its virtual machine).
    fn read_until<T>(
        &mut self,
        deadline: Instant,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, DbError> {
        self.conn
            .progress_handler(PROGRESS_OPS, Some(move || Instant::now() >= deadline));
        let result = read(&self.conn);
        self.conn.progress_handler(0, None::<fn() -> bool>);
        result.map_err(|e| {
            if e.sqlite_error_code() == Some(ErrorCode::OperationInterrupted) {
                DbError::Rejected(format!("{}: stopped at its deadline", self.what))
            } else {
                classify(&self.what, e)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deadline no read here reaches.
    fn far() -> Instant {
        Instant::now() + Duration::from_secs(600)
    }

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "quic-report-sqlite-{}-{name}-{:x}.db",
            std::process::id(),
            rand::random::<u32>()
        ))
    }

    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            for ext in ["", "-wal", "-shm"] {
                let mut p = self.0.clone().into_os_string();
                p.push(ext);
                let _ = std::fs::remove_file(p);
            }
        }
    }

    fn row(client: &str, seq: i64) -> Row {
        Row {
            identity: String::new(),
            client: client.into(),
            seq,
            received_at_ms: 1_700_000_000_123,
            body: format!(r#"{{"client":"{client}","seq":{seq}}}"#),
        }
    }

    /// `synchronous` of a connection (1 NORMAL, 2 FULL).
    fn synchronous(db: &Sqlite) -> i64 {
        db.conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .expect("pragma")
    }

    /// Each `--fsync` as SQLite runs it: `always` FULL with no sync
    /// thread, `never` NORMAL with none, `interval` NORMAL with a thread
    /// that syncs the log after a commit.
    #[test]
    fn fsync_sets_synchronous_and_the_interval_syncs_the_log() {
        let path = temp("modes");
        let _rm = Rm(path.clone());
        let mut connect = SqliteConnect::new(&path);
        let always = connect.open().expect("opens");
        assert_eq!(synchronous(&always), 2);
        assert!(always.wal_sync.is_none());
        connect.set_fsync(Fsync::Never);
        let never = connect.open().expect("opens");
        assert_eq!(synchronous(&never), 1);
        assert!(never.wal_sync.is_none());
        connect.set_fsync(Fsync::Interval(Duration::from_millis(10)));
        let mut interval = connect.open().expect("opens");
        assert_eq!(synchronous(&interval), 1);
        let syncs = |db: &Sqlite| db.wal_sync.as_ref().map(WalSync::syncs);
        assert_eq!(syncs(&interval), Some(0), "nothing to sync yet");
        interval.insert(&[row("a", 1)]).expect("inserts");
        let until = Instant::now() + Duration::from_secs(10);
        while syncs(&interval) == Some(0) {
            assert!(Instant::now() < until, "the log was not synced");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A database reached through a symlink keeps its log beside the file
    /// it points to (SQLite resolves the link): the sync thread opens that
    /// one.
    #[test]
    fn fsync_interval_finds_the_log_of_a_symlinked_database() {
        let target = temp("target");
        let _rm = Rm(target.clone());
        let link = temp("link");
        let _rm_link = Rm(link.clone());
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let mut connect = SqliteConnect::new(&link);
        connect.set_fsync(Fsync::Interval(Duration::from_millis(10)));
        let mut db = connect.open().expect("opens through the link");
        db.insert(&[row("a", 1)]).expect("inserts");
        assert!(db.wal_sync.is_some());
    }

    /// Under `--fsync interval` the connection runs in synchronous=NORMAL
    /// with its WAL synced by a thread of its own: the key still answers
    /// duplicates, a second connection sees the commits, and so does a
    /// reopening after the first is gone (its sync thread ended with it).
    #[test]
    fn fsync_interval_commits_as_always() {
        let path = temp("interval");
        let _rm = Rm(path.clone());
        let mut connect = SqliteConnect::new(&path);
        connect.set_fsync(Fsync::Interval(Duration::from_millis(10)));
        assert!(connect.durability().contains("synchronous=NORMAL"));
        let mut db = connect.connect().expect("opens");
        let first = db.insert(&[row("a", 1), row("a", 2)]).expect("inserts");
        assert_eq!(first, vec![Written::Inserted, Written::Inserted]);
        let each = db
            .insert_each(&[row("a", 2), row("a", 3)])
            .expect("inserts");
        assert_eq!(each, vec![Ok(Written::Duplicate), Ok(Written::Inserted)]);
        let mut other = SqliteConnect::new(&path).connect().expect("opens again");
        assert_eq!(other.counts(far()).expect("counts"), Counts::counted(3, 1));
        drop(db);
        drop(other);
        let mut again = SqliteConnect::new(&path).connect().expect("reopens");
        assert_eq!(again.counts(far()).expect("counts"), Counts::counted(3, 1));
        // A zero interval is a sync in every commit.
        let mut zero = SqliteConnect::new(&path);
        zero.set_fsync(Fsync::Interval(Duration::ZERO));
        assert!(zero.durability().contains("synchronous=FULL"));
    }

    #[test]
    fn inserts_once_and_reports_the_rest_as_duplicates() {
        let path = temp("dup");
        let _rm = Rm(path.clone());
        let mut db = SqliteConnect::new(&path).connect().expect("opens");
        let first = db.insert(&[row("a", 1), row("a", 2)]).expect("inserts");
        assert_eq!(first, vec![Written::Inserted, Written::Inserted]);
        // A second connection (another process) sees the same key.
        let mut other = SqliteConnect::new(&path).connect().expect("opens again");
        let again = other.insert(&[row("a", 2), row("a", 3)]).expect("inserts");
        assert_eq!(again, vec![Written::Duplicate, Written::Inserted]);
        assert_eq!(db.counts(far()).expect("counts"), Counts::counted(3, 1));
        let stamps: Vec<String> = rusqlite::Connection::open(&path)
            .expect("opens")
            .prepare("SELECT DISTINCT received_at FROM reports")
            .expect("query")
            .query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("text");
        assert_eq!(stamps, ["2023-11-14T22:13:20.123Z"], "ISO 8601 UTC, ms");
        let latest = db
            .latest(LatestLimit::rows(10), None, far())
            .expect("latest");
        assert_eq!(latest.len(), 1);
        assert_eq!(latest[0].2, r#"{"client":"a","seq":3}"#);
    }

    /// A read past its deadline is stopped midway, and the connection
    /// still commits (it is not taken for broken).
    #[test]
    fn a_read_past_its_deadline_is_stopped_and_the_commits_go_on() {
        let path = temp("deadline");
        let _rm = Rm(path.clone());
        let mut db = SqliteConnect::new(&path).connect().expect("opens");
        let rows: Vec<Row> = (0..3000)
            .map(|i| row(&format!("c{}", i % 500), i))
            .collect();
        assert!(
            db.insert(&rows)
                .expect("inserts")
                .iter()
                .all(|w| *w == Written::Inserted)
        );
        let past = Instant::now();
        for e in [
            db.latest(LatestLimit::rows(1000), None, past)
                .map(|_| ())
                .expect_err("stopped"),
            db.counts(past).map(|_| ()).expect_err("stopped"),
        ] {
            assert!(
                matches!(&e, DbError::Rejected(m) if m.ends_with(": stopped at its deadline")),
                "{e:?}"
            );
        }
        assert_eq!(
            db.insert(&[row("c0", 3000)]).expect("commits"),
            [Written::Inserted]
        );
        assert_eq!(
            db.latest(LatestLimit::rows(1000), None, far())
                .expect("read")
                .len(),
            500
        );
        assert_eq!(
            db.counts(far()).expect("counted"),
            Counts::counted(3001, 500)
        );
    }

    /// Above the rows' limit, `/stats`'s rows are the rowid span (two
    /// probes) instead of a count of the whole key index, which no
    /// deadline can stop; a key refused as a duplicate takes no rowid,
    /// and a retention job that deletes the oldest rows keeps the span
    /// right. Below the limit the rows are counted. The clients are
    /// counted up to theirs.
    #[test]
    fn counts_past_their_limits_are_estimated_rows_and_capped_clients() {
        let path = temp("estimate");
        let _rm = Rm(path.clone());
        let mut connect = SqliteConnect::new(&path);
        connect.set_count_limits(CountLimits {
            rows: 100,
            clients: 7,
        });
        let mut db = connect.connect().expect("opens");
        let rows: Vec<Row> = (0..300).map(|i| row(&format!("c{}", i % 7), i)).collect();
        db.insert(&rows).expect("inserts");
        let again = db.insert(&rows[..50]).expect("inserts again");
        assert!(again.iter().all(|w| *w == Written::Duplicate));
        let estimated = Counts {
            rows: 300,
            rows_estimated: true,
            clients: 7,
            clients_capped: false,
        };
        assert_eq!(db.counts(far()).expect("counts"), estimated);
        let other = Connection::open(&path).expect("opens");
        other
            .execute("DELETE FROM reports WHERE seq < 150", [])
            .expect("deletes the oldest");
        let estimated = Counts {
            rows: 150,
            ..estimated
        };
        assert_eq!(db.counts(far()).expect("counts"), estimated);
        other
            .execute("DELETE FROM reports WHERE seq < 220 OR seq = 250", [])
            .expect("deletes more");
        assert_eq!(db.counts(far()).expect("counts"), Counts::counted(79, 7));
        connect.set_count_limits(CountLimits {
            rows: 100,
            clients: 6,
        });
        let capped = connect
            .connect()
            .expect("opens")
            .counts(far())
            .expect("counts");
        assert_eq!((capped.clients, capped.clients_capped), (6, true));
    }

    /// A table an earlier build made `WITHOUT ROWID` has no rowids to
    /// estimate from: it is counted (the estimate's query failed there,
    /// and every `/stats` with it).
    #[test]
    fn a_table_without_rowids_is_counted() {
        let path = temp("without-rowid");
        let _rm = Rm(path.clone());
        let c = Connection::open(&path).expect("opens");
        c.execute_batch(
            "CREATE TABLE quic_report_schema (version integer NOT NULL);
             INSERT INTO quic_report_schema (version) VALUES (1);
             CREATE TABLE reports (
                 identity    text    NOT NULL,
                 client      text    NOT NULL,
                 seq         integer NOT NULL,
                 received_at text    NOT NULL,
                 body        text    NOT NULL,
                 PRIMARY KEY (identity, client, seq)) WITHOUT ROWID;",
        )
        .expect("the earlier layout");
        drop(c);
        let mut connect = SqliteConnect::new(&path);
        connect.set_count_limits(CountLimits {
            rows: 1,
            ..COUNT_LIMITS
        });
        let mut db = connect.connect().expect("opens");
        db.insert(&[row("a", 1), row("a", 2), row("b", 1)])
            .expect("inserts");
        assert_eq!(db.counts(far()).expect("counts"), Counts::counted(3, 2));
    }

    #[test]
    fn anonymous_and_named_rows_of_one_client_and_seq_are_two_keys() {
        let path = temp("identities");
        let _rm = Rm(path.clone());
        let mut db = SqliteConnect::new(&path).connect().expect("opens");
        let named = |seq| Row {
            identity: "device-1".into(),
            ..row("a", seq)
        };
        let first = db.insert(&[row("a", 1), named(1)]).expect("inserts");
        assert_eq!(first, vec![Written::Inserted, Written::Inserted]);
        // Each through its own statement, in both orders, in one batch and
        // row by row: each key is found again under its own identity only.
        let again = db
            .insert(&[named(1), row("a", 1), named(2), row("a", 2)])
            .expect("inserts");
        let expect = [Written::Duplicate, Written::Duplicate, Written::Inserted];
        assert_eq!(again, [&expect[..], &[Written::Inserted]].concat());
        let each = db
            .insert_each(&[row("a", 2), named(2), row("a", 3)])
            .expect("inserts");
        assert_eq!(each, expect.map(Ok));
        let keys: Vec<(String, i64)> = rusqlite::Connection::open(&path)
            .expect("opens")
            .prepare("SELECT identity, seq FROM reports ORDER BY identity, seq")
            .expect("query")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("text, not NULL");
        let key = |id: &str, seq| (id.to_owned(), seq);
        assert_eq!(
            keys,
            [
                key("", 1),
                key("", 2),
                key("", 3),
                key("device-1", 1),
                key("device-1", 2)
            ]
        );
    }

    #[test]
    fn latest_of_one_identity_is_selected_before_the_row_limit() {
        let path = temp("latest-of");
        let _rm = Rm(path.clone());
        let mut db = SqliteConnect::new(&path).connect().expect("opens");
        // "a-filler" sorts before "device-1": with a limit of 3, every row
        // read for everyone is another identity's.
        let mut rows: Vec<Row> = (0..5)
            .map(|i| Row {
                identity: "a-filler".into(),
                ..row(&format!("c{i}"), 1)
            })
            .collect();
        rows.push(Row {
            identity: "device-1".into(),
            ..row("mine", 1)
        });
        rows.push(Row {
            identity: "device-1".into(),
            ..row("mine", 2)
        });
        db.insert(&rows).expect("inserts");
        let all = db
            .latest(LatestLimit::rows(3), None, far())
            .expect("latest");
        assert!(all.iter().all(|(id, _, _)| id == "a-filler"), "{all:?}");
        let own = db
            .latest(LatestLimit::rows(3), Some("device-1"), far())
            .expect("latest");
        assert_eq!(
            own,
            vec![(
                "device-1".to_owned(),
                "mine".to_owned(),
                r#"{"client":"mine","seq":2}"#.to_owned()
            )]
        );
        assert!(
            db.latest(LatestLimit::rows(3), Some("nobody"), far())
                .expect("latest")
                .is_empty()
        );
    }

    /// `/latest` and `/stats` cost a few index probes per client however
    /// many rows each has: counted in steps of SQLite's virtual machine
    /// over the probes' statements, not in time. The two `/latest` reads
    /// take 658, where the one query that read every row to keep each
    /// client's last took 335,112.
    #[test]
    fn latest_probes_each_client_instead_of_reading_its_rows() {
        let path = temp("skip-scan");
        let _rm = Rm(path.clone());
        let mut conn = Connection::open(&path).expect("opens");
        setup(&mut conn, "test").expect("schema");
        let mut db = Sqlite {
            conn,
            what: "test".into(),
            count_limits: COUNT_LIMITS,
            rowids: true,
            wal_sync: None,
        };
        let named = |client: &str, seq| Row {
            identity: "device-1".into(),
            ..row(client, seq)
        };
        let mut rows: Vec<Row> = (0..8000)
            .map(|i| row(&format!("c{}", i % 8), i / 8 + 1))
            .collect();
        rows.extend((0..500).map(|i| named(&format!("d{}", i % 2), i / 2 + 1)));
        db.insert(&rows).expect("inserts");
        let latest = db
            .latest(LatestLimit::rows(1000), None, far())
            .expect("latest");
        let keys: Vec<String> = latest
            .iter()
            .map(|(id, client, body)| format!("{id}/{client}: {body}"))
            .collect();
        let mut expect: Vec<String> = (0..8)
            .map(|c| format!(r#"/c{c}: {{"client":"c{c}","seq":1000}}"#))
            .collect();
        expect.extend((0..2).map(|c| format!(r#"device-1/d{c}: {{"client":"d{c}","seq":250}}"#)));
        assert_eq!(keys, expect);
        assert_eq!(
            db.latest(LatestLimit::rows(9), None, far())
                .expect("latest")
                .len(),
            9
        );
        // Bytes for three and a half rows: the first three in the key's order.
        let each = LatestLimit::row_bytes("", "c0", br#"{"client":"c0","seq":1000}"#);
        let limit = LatestLimit {
            rows: 1000,
            bytes: 3 * each + each / 2,
        };
        let first: Vec<String> = db
            .latest(limit, None, far())
            .expect("latest")
            .into_iter()
            .map(|(_, client, _)| client)
            .collect();
        assert_eq!(first, ["c0", "c1", "c2"]);
        assert_eq!(db.counts(far()).expect("counts"), Counts::counted(8500, 10));
        let steps: i32 = [
            CLIENTS_FIRST,
            CLIENTS_NEXT,
            CLIENTS_NEXT_IDENTITY,
            LATEST_LAST,
        ]
        .iter()
        .map(|q| {
            db.conn
                .prepare_cached(q)
                .expect("cached")
                .get_status(rusqlite::StatementStatus::VmStep)
        })
        .sum();
        assert!(
            steps < 29 * 100,
            "{steps} steps for 10 + 9 + 10 clients of 8,500 rows"
        );
    }

    #[test]
    fn a_dropped_reports_table_is_an_outage_not_a_refusal_of_each_row() {
        let path = temp("dropped");
        let _rm = Rm(path.clone());
        let mut db = SqliteConnect::new(&path).connect().expect("opens");
        db.insert(&[row("a", 1)]).expect("inserts");
        rusqlite::Connection::open(&path)
            .expect("opens")
            .execute_batch("DROP TABLE reports")
            .expect("dropped");
        match db.insert(&[row("a", 2)]) {
            Err(DbError::Connection(m)) => assert!(m.contains("no such table"), "{m}"),
            other => panic!("expected an outage, got {other:?}"),
        }
    }

    #[test]
    fn a_schema_from_the_future_is_refused() {
        let path = temp("future");
        let _rm = Rm(path.clone());
        drop(SqliteConnect::new(&path).connect().expect("creates"));
        let c = Connection::open(&path).expect("opens");
        c.execute("UPDATE quic_report_schema SET version = 99", [])
            .expect("updates");
        drop(c);
        let Err(e) = SqliteConnect::new(&path).connect() else {
            panic!("a future schema was accepted")
        };
        assert!(matches!(e, DbError::Schema(_)), "{e:?}");
        assert!(e.to_string().contains("version 99"), "{e}");
    }

    #[test]
    fn a_foreign_reports_table_is_left_alone() {
        let path = temp("foreign");
        let _rm = Rm(path.clone());
        let c = Connection::open(&path).expect("opens");
        c.execute("CREATE TABLE reports (x integer)", [])
            .expect("creates");
        drop(c);
        let Err(e) = SqliteConnect::new(&path).connect() else {
            panic!("a foreign table was accepted")
        };
        assert!(e.to_string().contains("not created by quic-report"), "{e}");
    }

    /// From review: SQLite's table names are case-insensitive, so a
    /// foreign `Reports` is the `reports` table, refused as one (it was
    /// taken for none, and creating ours then failed on every attempt: an
    /// outage that never ended instead of a clear refusal).
    #[test]
    fn a_foreign_table_named_in_other_letters_is_refused_too() {
        let path = temp("foreign-case");
        let _rm = Rm(path.clone());
        let c = Connection::open(&path).expect("opens");
        c.execute("CREATE TABLE Reports (x integer)", [])
            .expect("creates");
        drop(c);
        let Err(e) = SqliteConnect::new(&path).connect() else {
            panic!("a foreign table was accepted")
        };
        assert!(matches!(e, DbError::Schema(_)), "{e:?}");
        assert!(e.to_string().contains("not created by quic-report"), "{e}");
    }
}
