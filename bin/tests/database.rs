//! The real binary with database sinks: `server --sink sqlite:PATH` and
//! `--sink postgres://...` on a private PostgreSQL cluster (initdb in a
//! temporary directory; see the `quic-report-pg-cluster` crate), through
//! crashes of the server and of the database. Each test asserts on what
//! the table holds and on what the client was told: every seq once in the
//! table, every seq acknowledged once. Every wait is bounded; every child
//! and the cluster are stopped when the test ends, also on failure.

mod common;

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{LIMIT, Logged, TempPath, free_udp_port};
use quic_report_mio::database::postgres::{PostgresConnect, ROWS_PER_STATEMENT};
use quic_report_mio::database::sqlite::SqliteConnect;
use quic_report_mio::database::{Connect, CountLimits, Counts, DbError, LatestLimit, Row, Written};
use quic_report_mio::name_lookups::NameLookups;
use quic_report_pg_cluster::PgCluster;

fn start_source() -> (Logged, String) {
    let source = Logged::spawn("source", &["source", "--listen", "127.0.0.1:0"]);
    let url = source.wait_for("serving GET / on ");
    (source, url)
}

/// A source on 127.0.0.1 whose answer to its `n`-th request (from 1) is
/// `answer(n)`: a status line's tail and a JSON body; one request per
/// connection. Its URL.
fn scripted_source(answer: impl Fn(u64) -> (&'static str, String) + Send + 'static) -> String {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the source");
    let addr = l.local_addr().expect("source address");
    thread::spawn(move || {
        for (n, conn) in (1u64..).zip(l.incoming()) {
            let Ok(mut s) = conn else { return };
            let Ok(r) = s.try_clone() else { continue };
            let mut r = BufReader::new(r);
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|k| k > 2) {
                line.clear();
            }
            let (status, body) = answer(n);
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}/")
}

/// A source whose `bad`-th answer is `{"value":"a\u0000b"}` (valid JSON
/// that PostgreSQL's `jsonb` cannot take) and every other one
/// `{"value":N}`. Its URL.
fn source_with_a_nul_escape(bad: u64) -> String {
    scripted_source(move |n| {
        let body = if n == bad {
            r#"{"value":"a\u0000b"}"#.to_owned()
        } else {
            format!(r#"{{"value":{n}}}"#)
        };
        ("200 OK", body)
    })
}

/// The seq of the report the client logged as refused `unstorable` (its
/// one ERROR line), after checking that the line says it was dropped.
fn unstorable_seq(client: &Logged) -> u64 {
    let line = client.wait_for(" ERROR ");
    assert!(
        line.contains("rejected by the server (unstorable)") && line.contains("dropped"),
        "{line}"
    );
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("seq="))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a seq in {line:?}"))
}

fn start_client(listen: &str, url: &str, count: u64, interval: &str) -> Logged {
    let count = count.to_string();
    Logged::spawn(
        "client",
        &[
            "client",
            "--server",
            listen,
            "--source",
            url,
            "--interval",
            interval,
            "--idle-timeout",
            "2s",
            "--backoff-max",
            "300ms",
            "--count",
            &count,
        ],
    )
}

fn server(name: &'static str, listen: &str, sink: &str) -> Logged {
    Logged::spawn(name, &["server", "--listen", listen, "--sink", sink])
}

/// The seqs the client printed as acknowledged, in order.
fn acked(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter(|l| l.starts_with("ack "))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("seq=")))
        .map(|s| s.parse().expect("a seq"))
        .collect()
}

/// Asserts that `seqs` (each row's seq, in any order) is 1..=n once each,
/// and that the client acknowledged each of 1..=n exactly once.
fn assert_exactly_once(seqs: &[u64], n: u64, client_stdout: &str) {
    let mut counts = BTreeMap::new();
    for s in seqs {
        *counts.entry(*s).or_insert(0u32) += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "rows recorded more than once: {twice:?}");
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>(),
        "every seq 1..={n} in the table"
    );
    let mut acks = acked(client_stdout);
    acks.sort_unstable();
    assert_eq!(
        acks,
        (1..=n).collect::<Vec<_>>(),
        "every seq acknowledged exactly once:\n{client_stdout}"
    );
}

/// A SQLite file (and its -wal and -shm) in the temporary directory,
/// removed when dropped.
struct TempDb(PathBuf);

impl TempDb {
    fn new(name: &str) -> TempDb {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        TempDb(std::env::temp_dir().join(format!(
            "quic-report-test-{}-{nanos:x}-{name}.db",
            std::process::id()
        )))
    }

    fn url(&self) -> String {
        format!("sqlite:{}", self.0.display())
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for ext in ["", "-wal", "-shm"] {
            let mut p = self.0.clone().into_os_string();
            p.push(ext);
            let _ = std::fs::remove_file(p);
        }
    }
}

fn sqlite_seqs(path: &Path) -> Vec<u64> {
    let Ok(c) = rusqlite::Connection::open(path) else {
        return Vec::new();
    };
    let _ = c.busy_timeout(Duration::from_secs(5));
    let Ok(mut stmt) = c.prepare("SELECT seq FROM reports") else {
        return Vec::new(); // not created yet
    };
    stmt.query_map([], |r| r.get::<_, i64>(0))
        .map(|rows| {
            rows.filter_map(Result::ok)
                .map(|s| s.cast_unsigned())
                .collect()
        })
        .unwrap_or_default()
}

fn pg_seqs(pg: &PgCluster) -> Vec<u64> {
    pg.psql("postgres", "SELECT seq FROM reports")
        .map(|out| out.lines().filter_map(|l| l.parse().ok()).collect())
        .unwrap_or_default()
}

/// Waits (bounded) until `count()` reaches `n`.
fn wait_rows(what: &str, n: usize, mut count: impl FnMut() -> usize) {
    let started = Instant::now();
    loop {
        let got = count();
        if got >= n {
            return;
        }
        assert!(
            started.elapsed() < LIMIT,
            "{what} holds {got} rows, not {n}, after {LIMIT:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn cluster() -> PgCluster {
    PgCluster::start().unwrap_or_else(|e| panic!("a private PostgreSQL cluster: {e}"))
}

#[test]
fn sqlite_survives_sigkilled_servers_mid_write() {
    sigkilled_sqlite_servers(&[], "every commit synced before it is acknowledged");
}

/// The same under `--fsync interval` (synchronous=NORMAL, the WAL synced
/// after the acknowledgement): a committed batch is in the OS's cache, so a
/// crash of the server loses none of it either.
#[test]
fn sqlite_with_fsync_interval_survives_sigkilled_servers_mid_write() {
    sigkilled_sqlite_servers(
        &["--fsync", "interval"],
        "each commit synced within 100ms of it",
    );
}

/// `--fsync` is refused for a sink whose durability is not ours to set.
#[test]
fn fsync_is_refused_for_postgres_and_stdout() {
    for sink in ["postgres://quic@127.0.0.1:1/quic", "-"] {
        // Bounded: a server that takes the flag serves on, and is killed.
        let out = common::run_to_end(&[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--sink",
            sink,
            "--fsync",
            "always",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sink}: {err}");
        assert!(
            err.contains("--fsync is for a file or SQLite sink"),
            "{sink}: {err}"
        );
    }
}

/// A source that answers `{"value":N}` to its first `open` requests,
/// then 503 until `release` is set, then `{"value":N}` again. Its URL.
fn gated_source(open: u64, release: Arc<AtomicBool>) -> String {
    let served = std::sync::atomic::AtomicU64::new(0);
    scripted_source(move |_| {
        if served.load(Ordering::SeqCst) < open || release.load(Ordering::SeqCst) {
            let n = served.fetch_add(1, Ordering::SeqCst) + 1;
            ("200 OK", format!(r#"{{"value":{n}}}"#))
        } else {
            (
                "503 Service Unavailable",
                r#"{"error":"not yet"}"#.to_owned(),
            )
        }
    })
}

fn sigkilled_sqlite_servers(extra: &[&str], durability: &str) {
    // The client fetches at most `open` of its `n` samples before the
    // kills are over: it cannot have finished at any kill, however slow
    // the restarts (with the whole run fetched during one, the backlog
    // landed at once and the client ended before the last kill).
    let n = 400;
    let open = n - 100;
    let release = Arc::new(AtomicBool::new(false));
    let url = gated_source(open, Arc::clone(&release));
    let db = TempDb::new("sigkill");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let sink = db.url();
    let server = |name: &'static str, listen: &str, sink: &str| {
        let mut args = vec!["server", "--listen", listen, "--sink", sink];
        args.extend_from_slice(extra);
        Logged::spawn(name, &args)
    };
    let mut srv = Some(server("server 1", &listen, &sink));
    srv.as_ref().expect("a server").wait_for(durability);
    srv.as_ref()
        .expect("a server")
        .wait_for("recording into sqlite:");
    // Reports every 10 ms: the kills land while batches are being written
    // (20 rows into each server's run; at the gate, where the source holds
    // the rest back, if a slow restart let the backlog in at once).
    let mut client = start_client(&listen, &url, n, "10ms");
    let gate = usize::try_from(open).expect("fits");
    for round in 2..=4 {
        let before = sqlite_seqs(&db.0).len();
        wait_rows("the SQLite file", (before + 20).min(gate), || {
            sqlite_seqs(&db.0).len()
        });
        srv.take().expect("a server").kill();
        assert!(
            client.running(),
            "the client exited while the server was down"
        );
        thread::sleep(Duration::from_millis(300));
        let next = server(
            ["", "", "server 2", "server 3", "server 4"][round],
            &listen,
            &db.url(),
        );
        next.wait_for("recording into sqlite:");
        srv = Some(next);
    }
    release.store(true, Ordering::SeqCst);
    let (status, out) = client.finish();
    assert!(status.success(), "client: {status}");
    drop(srv);
    assert_exactly_once(&sqlite_seqs(&db.0), n, &out);
}

#[test]
fn postgres_killed_and_restarted_mid_run_loses_and_doubles_nothing() {
    let pg = cluster();
    let (_source, url) = start_source();
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let srv = server("server", &listen, &pg.url("postgres"));
    srv.wait_for("recording into postgres://");
    let n = 120;
    let client = start_client(&listen, &url, n, "20ms");
    wait_rows("reports", 30, || pg_seqs(&pg).len());
    pg.kill().expect("PostgreSQL killed");
    srv.wait_for("database unavailable: ");
    // Down longer than the commit timeout: reports are answered
    // not_recorded, and the client keeps them.
    client.wait_for("will be sent again: ");
    thread::sleep(Duration::from_secs(2));
    pg.start_server().expect("PostgreSQL restarted");
    srv.wait_for("is back after ");
    let (status, out) = client.finish();
    assert!(status.success(), "client: {status}");
    assert_exactly_once(&pg_seqs(&pg), n, &out);
}

#[test]
fn a_database_down_at_start_is_waited_for() {
    let pg = cluster();
    pg.stop().expect("PostgreSQL stopped");
    let (_source, url) = start_source();
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let srv = server("server", &listen, &pg.url("postgres"));
    srv.wait_for("database unavailable at start: ");
    srv.wait_for("listening on ");
    let n = 20;
    let client = start_client(&listen, &url, n, "50ms");
    // The client's reports are answered not_recorded, and kept.
    client.wait_for("will be sent again: ");
    thread::sleep(Duration::from_secs(1));
    pg.start_server().expect("PostgreSQL started");
    srv.wait_for("is back after ");
    let (status, out) = client.finish();
    assert!(status.success(), "client: {status}");
    assert_exactly_once(&pg_seqs(&pg), n, &out);
}

/// A server nobody reports to reconnects by itself once the database is
/// back (before, the commit thread retried only with rows to commit, so
/// its reads were answered "down" for ever): `/stats` is read from the
/// table again, and the sink is shown up, before any report.
#[test]
fn an_idle_server_reconnects_once_the_database_is_back() {
    let pg = cluster();
    pg.stop().expect("PostgreSQL stopped");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let srv = server("server", &listen, &pg.url("postgres"));
    srv.wait_for("database unavailable at start: ");
    srv.wait_for("listening on ");
    let stats = || -> serde_json::Value {
        serde_json::from_str(&get(&format!("https://{listen}/stats"))).expect("JSON")
    };
    let down = stats();
    // Said without the database's address (a reader may be a device).
    assert!(
        down["database_error"]
            .as_str()
            .is_some_and(|e| e.contains("the database is down") && !e.contains("postgres://")),
        "{down}"
    );
    assert_eq!(down["database"]["up"], false, "{down}");
    pg.start_server().expect("PostgreSQL started");
    let until = Instant::now() + LIMIT;
    loop {
        let v = stats();
        if v["database_rows"] == 0 {
            assert_eq!(v["database"]["up"], true, "{v}");
            break;
        }
        assert!(
            Instant::now() < until,
            "/stats never read the database again: {v}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    drop(srv);
}

/// A server started on `pg`'s database after `sql` made its tables: it
/// must exit non-zero; its error line, and every line it wrote.
fn refused_at_start(pg: &PgCluster, sql: &str) -> (String, Vec<String>) {
    pg.psql("postgres", sql).expect("the tables");
    let mut srv = server("server", "127.0.0.1:0", &pg.url("postgres"));
    let msg = srv.wait_for("error: ");
    assert!(!srv.wait(LIMIT).success(), "the server must exit non-zero");
    (msg, srv.lines_so_far())
}

#[test]
fn a_schema_from_the_future_is_refused_at_start() {
    let pg = cluster();
    let (msg, _) = refused_at_start(
        &pg,
        "CREATE TABLE quic_report_schema (version integer NOT NULL); \
         INSERT INTO quic_report_schema VALUES (2)",
    );
    assert!(
        msg.contains("schema version 2") && msg.contains("upgrade quic-report"),
        "{msg}"
    );
    // Nothing was created beside it.
    assert_eq!(
        pg.psql("postgres", "SELECT to_regclass('reports') IS NULL")
            .expect("psql"),
        "t"
    );
}

#[test]
fn a_schema_table_of_another_make_is_refused_at_start_not_a_panic() {
    let pg = cluster();
    // Our table names, another program's column type.
    let (msg, lines) = refused_at_start(
        &pg,
        "CREATE TABLE quic_report_schema (version bigint NOT NULL); \
         INSERT INTO quic_report_schema VALUES (1)",
    );
    assert!(msg.contains("does not understand"), "{msg}");
    assert!(!lines.iter().any(|l| l.contains("panicked")), "{lines:?}");
}

/// `quic-report get URL` against a server: its stdout.
fn get(url: &str) -> String {
    let out = std::process::Command::new(common::EXE)
        .args(["get", url])
        .output()
        .expect("get runs");
    assert!(
        out.status.success(),
        "get {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn latest_and_stats_come_from_the_shared_database() {
    let pg = cluster();
    let (_source, url) = start_source();
    let a = format!("127.0.0.1:{}", free_udp_port());
    let b = format!("127.0.0.1:{}", free_udp_port());
    let sa = server("server a", &a, &pg.url("postgres"));
    let sb = server("server b", &b, &pg.url("postgres"));
    sa.wait_for("recording into ");
    sb.wait_for("recording into ");
    // One client on each server.
    let (sa_status, _) = start_client(&a, &url, 5, "20ms").finish();
    let (sb_status, _) = start_client(&b, &url, 7, "20ms").finish();
    assert!(sa_status.success() && sb_status.success());
    // Server a's read side shows both clients, from the table.
    let latest: serde_json::Value =
        serde_json::from_str(&get(&format!("https://{a}/latest"))).expect("JSON");
    // Keyed by identity ("": these clients are anonymous), then client.
    let map = latest[""].as_object().expect("an object");
    assert_eq!(map.len(), 2, "both servers' clients: {latest}");
    let mut last: Vec<u64> = map.values().filter_map(|r| r["seq"].as_u64()).collect();
    last.sort_unstable();
    assert_eq!(last, vec![5, 7], "each client's latest report: {latest}");
    let stats: serde_json::Value =
        serde_json::from_str(&get(&format!("https://{a}/stats"))).expect("JSON");
    assert_eq!(stats["database_rows"], 12, "{stats}");
    assert_eq!(stats["database_rows_estimated"], false, "{stats}");
    assert_eq!(stats["database_clients"], 2, "{stats}");
    assert_eq!(
        stats["reports_recorded"], 5,
        "server a's own count: {stats}"
    );
    drop((sa, sb));
}

/// A read the database cannot answer (the table locked by another
/// session) is answered "unavailable" at the server's `--commit-timeout`,
/// not held open; once the lock is gone the same read is answered from
/// the table again.
#[test]
fn a_read_behind_a_lock_is_answered_at_its_deadline() {
    let pg = cluster();
    let (_source, url) = start_source();
    let a = format!("127.0.0.1:{}", free_udp_port());
    let sink = pg.url("postgres");
    let sa = Logged::spawn(
        "server",
        &[
            "server",
            "--listen",
            &a,
            "--sink",
            &sink,
            "--commit-timeout",
            "1s",
        ],
    );
    sa.wait_for("recording into ");
    let stats = || -> serde_json::Value {
        serde_json::from_str(&get(&format!("https://{a}/stats"))).expect("JSON")
    };
    let idle = stats();
    assert_eq!(idle["database"]["up"], true, "up before any commit: {idle}");
    assert_eq!(idle["database_rows"], 0, "{idle}");
    let (status, _) = start_client(&a, &url, 3, "20ms").finish();
    assert!(status.success());
    assert_eq!(stats()["database_rows"], 3);
    thread::scope(|s| {
        let unlock = Unlock::new(&pg);
        let locker = s.spawn(|| lock_reports(&pg));
        wait_for_the_lock(&pg);
        // The server's own counters, and why the database's are missing:
        // the loop's answer at the deadline, or PostgreSQL's cancel of
        // the read at the same deadline, whichever came first.
        let v = stats();
        let error = v["database_error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("database unavailable: ")
                && (error.contains("did not answer within 1s")
                    || error.ends_with("stopped at its deadline"))
                && !error.contains("postgres://"),
            "{v}"
        );
        assert_eq!(v["reports_recorded"], 3, "{v}");
        assert_eq!(v["database_rows"], serde_json::Value::Null, "{v}");
        drop(unlock);
        locker.join().expect("locker").expect("the lock's session");
    });
    // Once the lock is gone, from the table again.
    let until = Instant::now() + LIMIT;
    loop {
        let v = stats();
        if v["database_rows"] == 3 {
            break;
        }
        assert!(Instant::now() < until, "/stats after the lock: {v}");
        thread::sleep(Duration::from_millis(50));
    }
    drop(sa);
}

/// Holds `reports` locked from another session until the [`Unlock`] made
/// before is dropped; `Err` if that took more than a minute (a test that
/// fails before it lets go still ends).
fn lock_reports(pg: &PgCluster) -> Result<String, String> {
    pg.psql(
        "postgres",
        "BEGIN; LOCK TABLE reports IN ACCESS EXCLUSIVE MODE; \
         DO $$ BEGIN \
           FOR i IN 1..6000 LOOP \
             EXIT WHEN EXISTS (SELECT 1 FROM test_unlocked); \
             PERFORM pg_sleep(0.01); \
           END LOOP; \
           IF NOT EXISTS (SELECT 1 FROM test_unlocked) THEN \
             RAISE EXCEPTION 'the lock was held for a minute'; \
           END IF; \
         END $$; \
         COMMIT;",
    )
}

/// Lets go of the lock [`lock_reports`] holds when dropped (also when the
/// test fails, so that the lock's thread ends).
struct Unlock<'a>(&'a PgCluster);

impl<'a> Unlock<'a> {
    /// Made before [`lock_reports`] starts.
    fn new(pg: &'a PgCluster) -> Unlock<'a> {
        pg.psql(
            "postgres",
            "CREATE TABLE IF NOT EXISTS test_unlocked (x integer); TRUNCATE test_unlocked",
        )
        .expect("the unlock flag");
        Unlock(pg)
    }
}

impl Drop for Unlock<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .psql("postgres", "INSERT INTO test_unlocked VALUES (1)");
    }
}

/// Waits until [`lock_reports`] holds its lock.
fn wait_for_the_lock(pg: &PgCluster) {
    wait_rows("pg_locks (the lock held)", 1, || {
        pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_locks \
             WHERE relation = 'reports'::regclass AND mode = 'AccessExclusiveLock' AND granted",
        )
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
    });
}

/// The backend on its own: a read behind a lock is cancelled by
/// PostgreSQL at the read's deadline (not run until the lock goes, up to
/// the 30 s statement deadline, holding the read thread), and the same
/// connection reads the table once the lock is gone.
#[test]
fn a_postgres_read_behind_a_lock_is_stopped_at_its_deadline_and_the_connection_goes_on() {
    let pg = cluster();
    let mut db = PostgresConnect::parse(&pg.url("postgres"))
        .expect("URL")
        .connect()
        .expect("connect");
    db.insert(&[row("", "a", 1, "{}"), row("d", "b", 1, "{}")])
        .expect("insert");
    let soon = || Instant::now() + Duration::from_millis(300);
    let stopped = |e: DbError| {
        assert!(
            matches!(&e, DbError::Rejected(m) if m.ends_with(": stopped at its deadline")),
            "{e:?}"
        )
    };
    thread::scope(|s| {
        let unlock = Unlock::new(&pg);
        let locker = s.spawn(|| lock_reports(&pg));
        wait_for_the_lock(&pg);
        stopped(db.counts(soon()).expect_err("/stats stopped"));
        stopped(
            db.latest(LatestLimit::rows(10), None, soon())
                .expect_err("/latest stopped"),
        );
        stopped(
            db.latest(LatestLimit::rows(10), Some("d"), soon())
                .expect_err("/latest?identity stopped"),
        );
        // (each read failed, stopped at its deadline: the lock, held until
        // here, was in its way)
        drop(unlock);
        locker.join().expect("locker").expect("the lock's session");
    });
    assert_eq!(db.counts(far()).expect("/stats"), Counts::counted(2, 2));
    let latest = db
        .latest(LatestLimit::rows(10), Some("d"), far())
        .expect("/latest");
    assert_eq!(latest, [("d".into(), "b".into(), "{}".into())]);
}

/// A host name in the URL is looked up by the sink's own lookups (not on a
/// thread of tokio-postgres that a timed-out attempt would leave behind),
/// and every address it has is tried in turn: the first refuses, the
/// second is the cluster. Each connect looks the name up again.
#[test]
fn a_postgres_host_name_is_looked_up_by_the_sink_and_each_of_its_addresses_tried() {
    let pg = cluster();
    let port = pg.port();
    let looked_up = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&looked_up);
    let mut connect = PostgresConnect::parse(&format!(
        "postgres://postgres:{}@db.test:{port}/postgres?sslmode=disable&connect_timeout=5",
        pg.password()
    ))
    .expect("URL");
    connect.set_lookups(NameLookups::with(2, move |name| {
        seen.lock().expect("names").push(name.to_owned());
        // 127.0.0.2 is loopback too, where nothing listens on the port.
        Ok(vec![
            format!("127.0.0.2:{port}").parse().expect("addr"),
            format!("127.0.0.1:{port}").parse().expect("addr"),
        ])
    }));
    let mut db = connect
        .connect()
        .expect("connect through the second address");
    db.insert(&[row("", "named", 1, "{}")]).expect("insert");
    drop(db);
    let mut again = connect.connect().expect("connect again");
    assert_eq!(again.counts(far()).expect("/stats"), Counts::counted(1, 1));
    assert_eq!(
        *looked_up.lock().expect("names"),
        [format!("db.test:{port}"), format!("db.test:{port}")]
    );
}

#[test]
fn tls_to_postgres_is_verified_when_the_url_asks() {
    let pg = cluster();
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../certs");
    pg.enable_tls(&certs.join("localhost.pem"), &certs.join("localhost.key"))
        .expect("TLS on");
    let url = format!(
        "postgres://postgres:{}@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.password(),
        pg.port(),
        certs.join("ca.pem").display()
    );
    let (_source, source) = start_source();
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let srv = server("server", &listen, &url);
    srv.wait_for("recording into ");
    let (status, out) = start_client(&listen, &source, 3, "20ms").finish();
    assert!(status.success(), "client: {status}");
    assert_exactly_once(&pg_seqs(&pg), 3, &out);
    let tls = pg
        .psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE ssl AND application_name = 'quic-report'",
        )
        .expect("psql");
    assert_eq!(tls, "1", "the server's connection is encrypted");
    drop(srv);

    // A CA that did not sign the database's certificate: refused, and said.
    let wrong = format!(
        "postgres://postgres:{}@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.password(),
        pg.port(),
        certs.join("localhost.pem").display()
    );
    let srv = server("server", "127.0.0.1:0", &wrong);
    let msg = srv.wait_for("database unavailable at start: ");
    assert!(msg.contains("certificate"), "{msg}");
    drop(srv);

    // Through a host name the server looks up itself (given to the connect
    // as hostaddr): the certificate is checked against the name, not the
    // address it was reached at.
    let by_name = |host: &str| {
        let mut c = PostgresConnect::parse(&format!(
            "postgres://postgres:{}@{host}:{}/postgres?sslmode=verify-full&sslrootcert={}",
            pg.password(),
            pg.port(),
            certs.join("ca.pem").display()
        ))
        .expect("URL");
        let port = pg.port();
        c.set_lookups(NameLookups::with(2, move |_| {
            Ok(vec![format!("127.0.0.1:{port}").parse().expect("addr")])
        }));
        c.connect()
    };
    by_name("localhost").expect("the certificate names localhost");
    match by_name("db.test") {
        Ok(_) => panic!("a certificate for localhost taken for db.test"),
        Err(e) => assert!(e.to_string().contains("certificate"), "{e}"),
    }
}

/// Waits (bounded) until the server's /metrics says `line`.
fn wait_metric(metrics: &str, line: &str) {
    let started = Instant::now();
    loop {
        let body = common::http_get(&format!("http://{metrics}/metrics")).map(|(_, b)| b);
        if body
            .as_deref()
            .is_some_and(|b| b.lines().any(|l| l == line))
        {
            return;
        }
        assert!(
            started.elapsed() < LIMIT,
            "no {line:?} in /metrics after {LIMIT:?}: {body:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_report_postgres_can_never_store_is_refused_for_good_and_the_rest_recorded_once() {
    let pg = cluster();
    let source = source_with_a_nul_escape(3);
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let metrics = format!("127.0.0.1:{}", common::free_tcp_port());
    let srv = Logged::spawn(
        "server",
        &[
            "server",
            "--listen",
            &listen,
            "--sink",
            &pg.url("postgres"),
            "--metrics",
            &metrics,
        ],
    );
    srv.wait_for("recording into postgres://");
    let n = 8;
    let client = start_client(&listen, &source, n, "50ms");
    let bad = unstorable_seq(&client);
    let why = srv.wait_for("refused (unstorable, the client drops it): ");
    assert!(why.contains("22P05"), "PostgreSQL's reason: {why}");
    let (status, out) = client.finish();
    assert!(
        status.success(),
        "the client goes on and ends well: {status}"
    );
    // Every other seq once in the table and acknowledged once; the bad one
    // neither, and answered once: it was never sent again.
    let mut rows = pg_seqs(&pg);
    rows.sort_unstable();
    let others: Vec<u64> = (1..=n).filter(|s| *s != bad).collect();
    assert_eq!(rows, others, "every other report recorded once");
    let mut acks = acked(&out);
    acks.sort_unstable();
    assert_eq!(acks, others, "every other report acknowledged once:\n{out}");
    assert!(bad < n, "reports came after the refused one (seq {bad})");
    // Refused once: a resend would be refused and counted again.
    wait_metric(
        &metrics,
        "quic_report_rejected_total{reason=\"unstorable\"} 1",
    );
    drop(srv);
}

#[test]
fn sqlite_records_the_report_postgres_refuses() {
    let db = TempDb::new("nul");
    let source = source_with_a_nul_escape(2);
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let srv = server("server", &listen, &db.url());
    srv.wait_for("recording into sqlite:");
    let n = 4;
    let (status, out) = start_client(&listen, &source, n, "50ms").finish();
    assert!(status.success(), "client: {status}");
    assert_exactly_once(&sqlite_seqs(&db.0), n, &out);
    let c = rusqlite::Connection::open(&db.0).expect("the SQLite file");
    let mut stmt = c
        .prepare("SELECT json_extract(body, '$.value') FROM reports WHERE json_type(body, '$.value') = 'text'")
        .expect("a query");
    let texts: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("text values");
    assert_eq!(texts, ["a\u{0}b"], "stored as it came");
}

/// Above the rows' limit `/stats`'s rows are PostgreSQL's estimate (its
/// rows per page at the last `ANALYZE`, times the pages now), where a
/// count would read the whole key index; before any `ANALYZE` there is no
/// estimate, and the rows are counted. The clients are counted up to
/// theirs.
#[test]
fn postgres_counts_past_their_limits_are_the_planners_estimate_and_capped_clients() {
    let pg = cluster();
    let mut connect = PostgresConnect::parse(&pg.url("postgres")).expect("URL");
    connect.set_count_limits(CountLimits {
        rows: 100,
        clients: 7,
    });
    let mut db = connect.connect().expect("connect");
    let rows: Vec<Row> = (1..=300)
        .map(|s| row("", &format!("c{}", s % 7), s, "{}"))
        .collect();
    db.insert(&rows).expect("insert");
    assert_eq!(db.counts(far()).expect("counts"), Counts::counted(300, 7));
    pg.psql("postgres", "ANALYZE reports").expect("ANALYZE");
    assert_eq!(
        db.counts(far()).expect("counts"),
        Counts {
            rows: 300,
            rows_estimated: true,
            clients: 7,
            clients_capped: false,
        }
    );
    connect.set_count_limits(CountLimits {
        rows: 100,
        clients: 6,
    });
    let capped = connect
        .connect()
        .expect("connect")
        .counts(far())
        .expect("counts");
    assert_eq!((capped.clients, capped.clients_capped), (6, true));
}

/// A deadline no read here reaches.
fn far() -> Instant {
    Instant::now() + Duration::from_secs(600)
}

fn row(identity: &str, client: &str, seq: i64, body: &str) -> Row {
    Row {
        identity: identity.into(),
        client: client.into(),
        seq,
        received_at_ms: 1_796_000_000_000 + seq,
        body: body.into(),
    }
}

/// The backend on its own, below the server: a batch longer than one
/// statement commits whole or not at all, a key repeated in a batch is new
/// once, `/latest`'s skip scan finds each client's highest seq, and its
/// byte limit stops it at a prefix of the key's order.
#[test]
fn a_postgres_batch_of_several_statements_commits_whole_and_latest_finds_every_client() {
    let pg = cluster();
    let mut db = PostgresConnect::parse(&pg.url("postgres"))
        .expect("URL")
        .connect()
        .expect("connect");
    let n = ROWS_PER_STATEMENT as i64 * 2 + 500;
    let good = |s: i64| row("", &format!("c{}", s % 7), s, &format!(r#"{{"v":{s}}}"#));
    // One row PostgreSQL can never store, in the third statement.
    let mut rows: Vec<Row> = (1..=n).map(good).collect();
    rows[ROWS_PER_STATEMENT * 2 + 100].body = r#"{"v":"a\u0000b"}"#.into();
    assert!(
        matches!(db.insert(&rows), Err(DbError::Unstorable(_))),
        "the NUL escape is refused"
    );
    assert_eq!(
        pg_seqs(&pg).len(),
        0,
        "the first two statements were rolled back"
    );
    // The same batch without it, and a key repeated across statements.
    let mut rows: Vec<Row> = (1..=n).map(good).collect();
    rows.push(good(5));
    let written = db.insert(&rows).expect("insert");
    let inserted = written.iter().filter(|w| **w == Written::Inserted).count();
    assert_eq!(inserted as i64, n);
    assert_eq!(written.last(), Some(&Written::Duplicate), "seq 5 again");
    assert_eq!(written[4], Written::Inserted, "seq 5 the first time");
    let again = db.insert(&rows[..10]).expect("insert again");
    assert!(again.iter().all(|w| *w == Written::Duplicate), "{again:?}");
    assert_eq!(pg_seqs(&pg).len() as i64, n);
    // Each row's received_at is the millisecond it was given.
    let stamps = pg
        .psql(
            "postgres",
            "SELECT count(*) FROM reports \
             WHERE received_at = to_timestamp((1796000000000 + seq) / 1000.0)",
        )
        .expect("psql");
    assert_eq!(stamps.trim(), n.to_string(), "received_at of every row");
    // Two identities; the latest of each client is its highest seq.
    db.insert(&[
        row("device-1", "d", 3, r#"{"v":"d3"}"#),
        row("device-1", "d", 9, r#"{"v":"d9"}"#),
        row("device-1", "e", 1, r#"{"v":"e1"}"#),
    ])
    .expect("insert");
    let latest = db
        .latest(LatestLimit::rows(100), None, far())
        .expect("latest");
    assert_eq!(
        latest.len(),
        9,
        "7 anonymous clients and 2 of device-1: {latest:?}"
    );
    for (identity, client, body) in &latest {
        let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
        let expected = match (identity.as_str(), client.as_str()) {
            ("device-1", "d") => serde_json::json!("d9"),
            ("device-1", "e") => serde_json::json!("e1"),
            ("", c) => {
                let k: i64 = c[1..].parse().expect("c<k>");
                serde_json::json!((1..=n).filter(|s| s % 7 == k).max())
            }
            other => panic!("unexpected client {other:?}"),
        };
        assert_eq!(v["v"], expected, "{identity:?} {client:?}");
    }
    let own = db
        .latest(LatestLimit::rows(100), Some("device-1"), far())
        .expect("latest of device-1");
    let own: Vec<(&str, &str)> = own
        .iter()
        .map(|(i, c, _)| (i.as_str(), c.as_str()))
        .collect();
    assert_eq!(own, [("device-1", "d"), ("device-1", "e")]);
    assert_eq!(
        db.latest(LatestLimit::rows(4), None, far())
            .expect("latest")
            .len(),
        4,
        "at most limit"
    );
    assert_eq!(
        db.counts(far()).expect("counts"),
        Counts::counted(n as u64 + 3, 9)
    );
    // Row by row in one transaction: the row it cannot store fails alone.
    let each = db
        .insert_each(&[
            row("e", "x", 1, r#"{"v":1}"#),
            row("e", "x", 2, r#"{"v":"a\u0000b"}"#),
            row("e", "x", 3, r#"{"v":3}"#),
            row("e", "x", 1, r#"{"v":1}"#),
        ])
        .expect("insert_each");
    assert_eq!(each[0], Ok(Written::Inserted));
    assert!(matches!(each[1], Err(DbError::Unstorable(_))), "{each:?}");
    assert_eq!(each[2], Ok(Written::Inserted));
    assert_eq!(each[3], Ok(Written::Duplicate));
    let e: Vec<u64> = pg
        .psql(
            "postgres",
            "SELECT seq FROM reports WHERE identity = 'e' ORDER BY seq",
        )
        .expect("psql")
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    assert_eq!(e, [1, 3]);
    // The byte limit stops `/latest` at a prefix of the key's order, past
    // the portal's first chunks of rows.
    let big: Vec<Row> = (0..600)
        .map(|k| {
            let body = format!(r#"{{"v":"{}"}}"#, "x".repeat(100));
            row("big", &format!("c{k:03}"), 1, &body)
        })
        .collect();
    db.insert(&big).expect("insert");
    // Sized as read back (jsonb writes its own spacing).
    let one = db
        .latest(LatestLimit::rows(1), Some("big"), far())
        .expect("latest");
    let each = LatestLimit::row_bytes("big", "c000", one[0].2.as_bytes());
    let limit = LatestLimit {
        rows: 1000,
        bytes: 400 * each + each / 2,
    };
    let latest = db.latest(limit, Some("big"), far()).expect("latest");
    let clients: Vec<&str> = latest.iter().map(|(_, c, _)| c.as_str()).collect();
    let expected: Vec<String> = (0..400).map(|k| format!("c{k:03}")).collect();
    assert_eq!(clients, expected, "the first 400 clients, and only they");
    let all = db.latest(limit, None, far()).expect("latest");
    let size: usize = all
        .iter()
        .map(|(i, c, b)| LatestLimit::row_bytes(i, c, b.as_bytes()))
        .sum();
    assert!(size <= limit.bytes, "{size} bytes");
    // In the key's order "" < "big" < "device-1" < "e": it stops in "big".
    let ids: BTreeMap<&str, usize> = all.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.0.as_str()).or_default() += 1;
        m
    });
    assert_eq!(ids.keys().copied().collect::<Vec<_>>(), ["", "big"]);
    assert!(ids["big"] < 600, "{ids:?}");
}

/// Backpressure past the waiting bound, end to end: a client whose
/// backlog of 12 reports lands at once on a server that lets 1 report wait
/// for its commit. The rest are answered `not_recorded` ("busy") at once,
/// the client keeps them and sends them again, and every one ends in the
/// table once; `/stats` counts the busy answers.
#[test]
fn reports_past_the_waiting_bound_are_answered_busy_and_sent_again_until_recorded_once() {
    const N: u64 = 12;
    let db = TempDb::new("busy");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let (source, url) = start_source();
    // No server yet: the client queues its reports, all of them once the
    // source has served its N fetches.
    let client = start_client(&listen, &url, N, "10ms");
    let mut fetched = 0;
    wait_rows(
        "the source's log of values served",
        usize::try_from(N).expect("fits"),
        || {
            fetched += source
                .drain()
                .iter()
                .filter(|l| l.contains(" GET / -> 200 {\"value\":"))
                .count();
            fetched
        },
    );
    let srv = Logged::spawn(
        "server",
        &[
            "server",
            "--listen",
            &listen,
            "--sink",
            &db.url(),
            "--max-waiting-reports",
            "1",
        ],
    );
    srv.wait_for("listening on ");
    let why = client.wait_for(" will be sent again: ");
    assert!(why.contains("the server is busy"), "{why}");
    let (status, out) = client.finish();
    assert!(status.success(), "client: {status}\n{out}");
    assert_exactly_once(&sqlite_seqs(&db.0), N, &out);
    let stats: serde_json::Value =
        serde_json::from_str(&get(&format!("https://{listen}/stats"))).expect("JSON");
    let busy = stats["database"]["busy"].as_u64().expect("a busy count");
    assert!(busy >= 1, "{stats}");
    assert!(
        stats["reports_not_recorded"].as_u64() >= Some(busy),
        "{stats}"
    );
    assert_eq!(stats["reports_recorded"], N, "{stats}");
    drop(srv);
}

/// A row the database refuses for now (here a trigger someone added):
/// the client is told the database's reason in a `not_recorded` answer
/// that does not name the database (its path here; a PostgreSQL URL's
/// host, port and user), keeps the reports, and once the trigger is gone
/// every one is recorded once.
#[test]
fn a_refused_row_is_answered_without_the_databases_address() {
    const N: u64 = 6;
    let db = TempDb::new("refusing");
    drop(
        SqliteConnect::new(&db.0)
            .connect()
            .expect("the schema made"),
    );
    let c = rusqlite::Connection::open(&db.0).expect("open");
    c.execute_batch(
        "CREATE TRIGGER refuse BEFORE INSERT ON reports \
         BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END;",
    )
    .expect("the trigger");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let srv = server("server", &listen, &db.url());
    srv.wait_for("listening on ");
    let (_source, url) = start_source();
    let client = start_client(&listen, &url, N, "100ms");
    let why = client.wait_for(" will be sent again: ");
    assert!(why.contains("refused by a trigger"), "{why}");
    let path = db.0.display().to_string();
    assert!(!why.contains(&path), "the answer names the database: {why}");
    c.execute_batch("DROP TRIGGER refuse")
        .expect("the trigger dropped");
    let (status, out) = client.finish();
    assert!(status.success(), "{out}");
    assert_exactly_once(&sqlite_seqs(&db.0), N, &out);
    srv.kill();
}

#[test]
fn sqlite_rows_each_on_their_own_commit_together() {
    let path = TempPath::new("each.db");
    let mut db = SqliteConnect::new(&path.0).connect().expect("connect");
    let each = db
        .insert_each(&[
            row("", "c", 1, r#"{"v":1}"#),
            row("", "c", 2, r#"{"v":2}"#),
            row("", "c", 1, r#"{"v":1}"#),
        ])
        .expect("insert_each");
    assert_eq!(
        each,
        [
            Ok(Written::Inserted),
            Ok(Written::Inserted),
            Ok(Written::Duplicate)
        ]
    );
    drop(db);
    assert_eq!(sqlite_seqs(&path.0), [1, 2]);
}

/// A database that takes the TCP connection and never answers (a pooler
/// whose backend is gone, a stopped postmaster): the server does not hang
/// at start. It serves after its wait for the first answer, and its
/// clients' reports are answered `not_recorded` (kept, sent again).
#[test]
fn a_database_that_never_answers_does_not_hold_the_server_at_start() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("a TCP port");
    let port = silent.local_addr().expect("its address").port();
    // Accepts and holds every connection, never writes a byte.
    let held = thread::spawn(move || {
        let mut conns = Vec::new();
        for c in silent.incoming().take(4) {
            conns.push(c);
        }
        thread::sleep(Duration::from_secs(60));
    });
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let srv = server(
        "server",
        &listen,
        &format!("postgres://u@127.0.0.1:{port}/db?password=p"),
    );
    // (wait_for fails the test after LIMIT without the line: a server
    // held at start never writes it)
    let rest = srv.wait_for("database unavailable at start: ");
    assert!(
        rest.contains("no answer within 5000 ms (connect_timeout)")
            && rest.contains("serving anyway"),
        "{rest}"
    );
    let (_source, url) = common::Logged::start_source();
    let client = Logged::spawn(
        "client",
        &[
            "client",
            "--server",
            &listen,
            "--insecure",
            "--source",
            &url,
            "--interval",
            "50ms",
        ],
    );
    // (wait_for fails the test after LIMIT without the line)
    let why = client.wait_for("not recorded");
    assert!(why.contains("did not commit"), "{why}");
    client.kill();
    srv.kill();
    drop(held);
}

/// A TCP relay to a local port that can go silent: then it cuts the
/// connections it forwards and takes new ones without ever forwarding a
/// byte (a proxy in front of a database host that vanished). Frozen, it
/// keeps the connections it forwards open and forwards nothing on them.
struct Relay {
    port: u16,
    silent: Arc<AtomicBool>,
    frozen: Arc<AtomicBool>,
    forwarded: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(to: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a TCP port");
        let port = listener.local_addr().expect("its address").port();
        let silent = Arc::new(AtomicBool::new(false));
        let frozen = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(Mutex::new(Vec::new()));
        let (quiet, still, cut) = (
            Arc::clone(&silent),
            Arc::clone(&frozen),
            Arc::clone(&forwarded),
        );
        thread::spawn(move || {
            let mut held = Vec::new();
            for down in listener.incoming().take(200).flatten() {
                if quiet.load(Ordering::SeqCst) {
                    held.push(down);
                    continue;
                }
                let Ok(up) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let pair = [&down, &up].map(|s| s.try_clone().expect("a clone"));
                let mut kept = cut.lock().expect("the list");
                kept.extend(pair);
                for (mut from, mut to) in [
                    (
                        down.try_clone().expect("a clone"),
                        up.try_clone().expect("a clone"),
                    ),
                    (up, down),
                ] {
                    let still = Arc::clone(&still);
                    thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 16384];
                        while let Ok(n @ 1..) = from.read(&mut buf) {
                            if !still.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay {
            port,
            silent,
            frozen,
            forwarded,
        }
    }

    fn go_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
        for s in self.forwarded.lock().expect("the list").drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn speak(&self) {
        self.silent.store(false, Ordering::SeqCst);
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

/// A connection whose peer stops answering mid-statement (it still holds
/// the connection, and TCP still acknowledges): the insert is given up on
/// at the statement deadline as a lost connection, instead of holding the
/// commit thread until the peer speaks.
#[test]
fn a_statement_without_an_answer_is_given_up_on_as_a_lost_connection() {
    let pg = cluster();
    let relay = Relay::start(pg.port());
    let mut connect = PostgresConnect::parse(&format!(
        "postgres://postgres:{}@127.0.0.1:{}/postgres?sslmode=disable",
        pg.password(),
        relay.port
    ))
    .expect("a URL");
    connect.set_statement_deadline(Duration::from_millis(500));
    let mut db = connect.connect().expect("connects through the relay");
    assert_eq!(
        db.insert(&[row("", "a", 1, "{}")]).expect("inserted"),
        [Written::Inserted]
    );
    relay.freeze();
    // On a thread, so that an insert that never returns fails the test.
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(db.insert(&[row("", "a", 2, "{}")]));
    });
    let e = rx
        .recv_timeout(LIMIT)
        .expect("the insert returns")
        .expect_err("no answer");
    assert!(
        matches!(&e, DbError::Connection(m) if m.contains("no answer within 0.5 s; taken for dead")),
        "{e:?}"
    );
    assert_eq!(pg_seqs(&pg), [1]);
}

/// The database's host vanishes mid-run behind a proxy that still takes
/// connections: the reconnect's attempt gets no answer, is given up on at
/// `connect_timeout`, and a later attempt reaches the database once it is
/// back. Every report is recorded and acknowledged once.
#[test]
fn a_database_that_stops_answering_mid_run_is_connected_to_again() {
    let pg = cluster();
    let relay = Relay::start(pg.port());
    let sink = format!(
        "postgres://postgres:{}@127.0.0.1:{}/postgres?sslmode=disable&connect_timeout=1",
        pg.password(),
        relay.port
    );
    let (_source, url) = start_source();
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let srv = server("server", &listen, &sink);
    srv.wait_for("recording into postgres://");
    let n = 60;
    let client = start_client(&listen, &url, n, "50ms");
    wait_rows("reports", 10, || pg_seqs(&pg).len());
    relay.go_silent();
    srv.wait_for("database unavailable: ");
    // Attempts that reach the silent proxy are given up on, and retried.
    client.wait_for("will be sent again: ");
    thread::sleep(Duration::from_secs(2));
    relay.speak();
    srv.wait_for("is back after ");
    let (status, out) = client.finish();
    assert!(status.success(), "client: {status}");
    assert_exactly_once(&pg_seqs(&pg), n, &out);
}
