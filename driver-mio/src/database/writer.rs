//! The sink's commit thread: it owns the database connection that
//! commits, commits the rows the server loop hands it, and hands the
//! outcomes back through a channel and the loop's `mio::Waker`. The loop
//! never waits on it. Reads (`/latest`, `/stats`) go to the read thread
//! ([`super::reader`]), started beside it, on a connection of their own.
//!
//! ```text
//!  loop ──Request::Rows(jobs)──► channel ──► pending ──► one batch: everything
//!   ▲                                          │          pending, at most MAX_BATCH rows
//!   │                                          ▼
//!   ├──waker.wake()◄──Completion◄── insert + commit (group commit)
//!   │
//!   │ ──Request::Read──► channel ──► read thread: one read at a time
//!   └──waker.wake()◄──Completion::Read◄──┘
//! ```
//!
//! **Group commit:** while a batch commits, new rows wait in the channel;
//! the next batch takes all of them. A lone report commits at once; under
//! load batches grow by themselves.
//!
//! **States of the connection:** *connected* -> (a connection error) ->
//! *down*: the failed batch goes back to the front of the pending rows,
//! one warning is logged for the whole outage, and connecting is retried
//! with backoff (100 ms doubling to 5 s, with jitter), with rows pending
//! or not (the read thread waits for it too) -> *connected, unconfirmed*
//! (told to the loop, which shows the sink up) -> (the first insert that works)
//! -> *connected* again, logged once with the outage's length. A
//! database that takes connections but fails every insert (a standby, a
//! full disk, INSERT revoked), even one that still answers reads,
//! therefore stays in one outage, with one warning and a growing backoff,
//! instead of a reconnect per batch. Rows whose deadline passed are
//! dropped from the pending rows unwritten (the loop has answered them
//! `not_recorded` by then). While this thread has no connection, the read
//! thread answers reads at once ("down").
//!
//! **Custody:** every [`Job`] carries a [`Ticket`] that counts its row
//! and bytes in the [`Custody`] the loop checks its waiting bound
//! against, until the thread drops it (committed, refused, or past its
//! deadline). A report the loop has answered `not_recorded` at its
//! deadline still counts while its row waits here, so a database that
//! stalls in a statement cannot make the thread's queue grow without
//! bound.
//!
//! A batch the database refuses while the connection is fine is retried
//! row by row (that batch's rows only, in one transaction with a
//! savepoint per row: [`Database::insert_each`]), so one bad row fails
//! alone and the batch still costs one commit. Alone, a row refused for its
//! data ([`DbError::Unstorable`]) is answered so, for good (the client
//! drops it); one refused for another reason is answered `not_recorded`;
//! a connection error on the way stops the row-by-row pass and puts the
//! rows back (the outage path above). A schema this build does not
//! understand is fatal: the thread reports it and ends.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::Waker;
use quic_report_core::backoff::{Backoff, BackoffConfig};
use quic_report_core::{CoreRng, ReportHandle};

use super::reader::{ReadJob, Reader};
use super::{Connect, Counts, Database, DbError, LatestLimit, Row, Written};

/// Most rows committed in one batch.
pub const MAX_BATCH: usize = 4096;

/// Reconnection backoff.
const RECONNECT: BackoffConfig = BackoffConfig {
    initial: Duration::from_millis(100),
    max: Duration::from_secs(5),
};

/// A row to commit for one report, answered by its deadline.
#[derive(Debug)]
pub struct Job {
    /// The report.
    pub handle: ReportHandle,
    /// Its row.
    pub row: Row,
    /// After this the loop has answered it `not_recorded`: don't write it.
    pub deadline: Instant,
    /// Counts it in the [`Custody`] while it lives ([`Writer::ticket`]).
    pub ticket: Ticket,
}

/// The rows (and their body bytes) the thread holds: sent and not yet
/// dropped, whether or not the loop still waits for them.
#[derive(Debug, Default)]
pub struct Custody {
    rows: AtomicUsize,
    bytes: AtomicUsize,
}

impl Custody {
    /// Rows held.
    pub fn rows(&self) -> usize {
        self.rows.load(Ordering::Relaxed)
    }

    /// Bytes of body held.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Counts one more row of `bytes`, until the ticket is dropped.
    fn ticket(custody: &Arc<Custody>, bytes: usize) -> Ticket {
        custody.rows.fetch_add(1, Ordering::Relaxed);
        custody.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ticket {
            custody: Arc::clone(custody),
            bytes,
        }
    }
}

/// One row's share of the [`Custody`], given back when dropped.
#[derive(Debug)]
pub struct Ticket {
    custody: Arc<Custody>,
    bytes: usize,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.custody.rows.fetch_sub(1, Ordering::Relaxed);
        self.custody.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// What the loop asks of the thread.
#[derive(Debug)]
pub enum Request {
    /// Rows to commit.
    Rows(Vec<Job>),
    /// A read for the HTTP/0.9 side.
    Read {
        /// The request to answer.
        handle: ReportHandle,
        /// What to read.
        what: Read,
        /// After this the loop has answered it: it is not run.
        deadline: Instant,
    },
}

/// A read of the read side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// The latest report of each `(identity, client)`, as far as `limit`
    /// allows; with `identity`, of that identity only.
    Latest {
        /// Rows and bytes at most.
        limit: LatestLimit,
        /// Only this identity's clients (a reader that may read only its own).
        identity: Option<String>,
    },
    /// Rows and distinct clients.
    Counts,
}

/// What a read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadResult {
    /// `(identity, client, body)` per client.
    Latest(Vec<(String, String, String)>),
    /// Rows, distinct `(identity, client)`.
    Counts(Counts),
}

/// What the thread tells the loop.
#[derive(Debug)]
pub enum Completion {
    /// A batch was committed (or some of its rows refused).
    Committed {
        /// Per report: inserted, duplicate, or why the database refused it
        /// ([`DbError::Unstorable`]: for good; [`DbError::Rejected`]: for now).
        results: Vec<(ReportHandle, Result<Written, DbError>)>,
        /// From the start of the insert to its commit.
        took: Duration,
    },
    /// A read's result.
    Read {
        /// The request.
        handle: ReportHandle,
        /// What was read, or why not.
        result: Result<ReadResult, String>,
    },
    /// The database failed (counted as a sink error; the rows wait on).
    Failed,
    /// A connection was made after an outage, or after the loop stopped
    /// waiting for the first one.
    Connected,
    /// The database cannot be used by this build: the server stops.
    Fatal(DbError),
}

/// The loop's handle on the commit thread and the read thread. Dropping
/// it ends each once its current batch or read is done (they are not
/// waited for).
#[derive(Debug)]
pub struct Writer {
    rows: Sender<Vec<Job>>,
    reads: Sender<ReadJob>,
    completions: Receiver<Completion>,
    custody: Arc<Custody>,
    thread: JoinHandle<()>,
}

/// How long a dropped [`Writer`] waits for its commit thread to end.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

impl Drop for Writer {
    /// Tells the commit thread the loop is gone and gives it
    /// [`SHUTDOWN_WAIT`] to finish and close its connection (SQLite's log
    /// is then synced under `--fsync interval`); a database that hangs does
    /// not hold the server's exit longer.
    fn drop(&mut self) {
        drop(std::mem::replace(&mut self.rows, mpsc::channel().0));
        let until = Instant::now() + SHUTDOWN_WAIT;
        while !self.thread.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Writer {
    /// Starts the threads, the commit thread with `db` (if the first
    /// connection succeeded) and the means to connect again, the read
    /// thread with [`Connect::another`]; they wake `waker` after each
    /// completion.
    pub fn start(
        connect: Box<dyn Connect>,
        db: Option<Box<dyn Database>>,
        waker: Arc<Waker>,
        seed: [u8; 32],
    ) -> std::io::Result<Writer> {
        Writer::start_with(connect, db, None, waker, seed)
    }

    fn start_with(
        connect: Box<dyn Connect>,
        db: Option<Box<dyn Database>>,
        first: Option<Sender<Result<(), DbError>>>,
        waker: Arc<Waker>,
        seed: [u8; 32],
    ) -> std::io::Result<Writer> {
        let (rows, inbox) = mpsc::channel();
        let (reads, read_inbox) = mpsc::channel();
        let (outbox, completions) = mpsc::channel();
        let connected = Arc::new(AtomicBool::new(db.is_some()));
        let reader = Reader {
            connect: connect.another(),
            db: None,
            inbox: read_inbox,
            outbox: outbox.clone(),
            waker: Arc::clone(&waker),
            writer_connected: Arc::clone(&connected),
        };
        let mut thread = Thread {
            connect,
            db,
            connected,
            inbox,
            outbox,
            waker,
            pending: VecDeque::new(),
            outage: None,
            backoff: Backoff::new(RECONNECT),
            rng: CoreRng::from_seed_bytes(seed),
            next_attempt: Instant::now(),
            refusals: (None, 0),
            first,
        };
        if thread.db.is_none() && thread.first.is_none() {
            thread.outage = Some(Outage {
                since: Instant::now(),
                attempts: 1,
            });
        }
        std::thread::Builder::new()
            .name("sink-read".into())
            .spawn(move || reader.run())?;
        let handle = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || thread.run())?;
        Ok(Writer {
            rows,
            reads,
            completions,
            custody: Arc::new(Custody::default()),
            thread: handle,
        })
    }

    /// Starts the thread, which connects first: the outcome of that first
    /// attempt comes on the receiver. The caller may stop waiting for it (a
    /// database that takes the TCP connection and never answers would
    /// hold a connect on the caller's thread); the thread then logs the
    /// outcome itself, and a schema it does not understand still ends it
    /// ([`Completion::Fatal`]).
    pub fn start_connecting(
        connect: Box<dyn Connect>,
        waker: Arc<Waker>,
        seed: [u8; 32],
    ) -> std::io::Result<(Writer, Receiver<Result<(), DbError>>)> {
        let (tx, rx) = mpsc::channel();
        let writer = Writer::start_with(connect, None, Some(tx), waker, seed)?;
        Ok((writer, rx))
    }

    /// What the thread holds (the loop's waiting bound counts it).
    pub fn custody(&self) -> &Custody {
        &self.custody
    }

    /// The custody ticket of a row of `bytes` about to be sent.
    pub fn ticket(&self, bytes: usize) -> Ticket {
        Custody::ticket(&self.custody, bytes)
    }

    /// Hands rows to the commit thread, a read to the read thread; false
    /// if that thread is gone.
    pub fn send(&self, request: Request) -> bool {
        match request {
            Request::Rows(jobs) => self.rows.send(jobs).is_ok(),
            Request::Read {
                handle,
                what,
                deadline,
            } => self.reads.send((handle, what, deadline)).is_ok(),
        }
    }

    /// The next completion, if one is ready.
    pub fn try_recv(&self) -> Option<Completion> {
        self.completions.try_recv().ok()
    }

    /// Whether the commit thread has ended: after a [`Completion::Fatal`],
    /// or (with none sent) because it panicked.
    pub fn ended(&self) -> bool {
        self.thread.is_finished()
    }
}

struct Outage {
    since: Instant,
    attempts: u32,
}

struct Thread {
    connect: Box<dyn Connect>,
    /// Set through [`Thread::set_db`], which keeps `connected` in step.
    db: Option<Box<dyn Database>>,
    /// Whether `db` is some: the read thread answers "down" while not.
    connected: Arc<AtomicBool>,
    inbox: Receiver<Vec<Job>>,
    outbox: Sender<Completion>,
    waker: Arc<Waker>,
    pending: VecDeque<Job>,
    outage: Option<Outage>,
    backoff: Backoff,
    rng: CoreRng,
    next_attempt: Instant,
    /// When a refused row was last logged, and how many since.
    refusals: (Option<Instant>, u64),
    /// Set by [`Writer::start_connecting`]: where the first connection's
    /// outcome goes, once it is known.
    first: Option<Sender<Result<(), DbError>>>,
}

/// At most one "refused a report" line per this.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl Thread {
    fn run(mut self) {
        if let Some(first) = self.first.take()
            && !self.connect_first(&first)
        {
            return;
        }
        loop {
            if !self.wait() {
                return;
            }
            let now = Instant::now();
            self.pending.retain(|j| j.deadline > now);
            // Reconnected even with nothing to commit: the reads wait for
            // it, and an idle server is not down.
            if self.db.is_none() {
                if now >= self.next_attempt && !self.reconnect() {
                    return;
                }
                continue;
            }
            if self.pending.is_empty() {
                continue;
            }
            let n = self.pending.len().min(MAX_BATCH);
            let batch: Vec<Job> = self.pending.drain(..n).collect();
            if !self.commit(batch) {
                return;
            }
        }
    }

    /// Waits for work: while the database is down, until the next
    /// attempt at most; else blocks while nothing is pending, and takes
    /// what arrived. False when the loop is gone.
    fn wait(&mut self) -> bool {
        let idle = self.pending.is_empty();
        let first = if self.db.is_none() {
            let left = self.next_attempt.saturating_duration_since(Instant::now());
            match self.inbox.recv_timeout(left) {
                Ok(r) => Some(r),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        } else if idle {
            match self.inbox.recv() {
                Ok(r) => Some(r),
                Err(_) => return false,
            }
        } else {
            None
        };
        if let Some(jobs) = first {
            self.pending.extend(jobs);
        }
        loop {
            match self.inbox.try_recv() {
                Ok(jobs) => self.pending.extend(jobs),
                Err(TryRecvError::Empty) => return true,
                // The loop is gone: finish what is pending (until its deadlines).
                Err(TryRecvError::Disconnected) => return !idle,
            }
        }
    }

    /// Takes `db` as the connection (or none), and tells the read thread.
    fn set_db(&mut self, db: Option<Box<dyn Database>>) {
        self.connected.store(db.is_some(), Ordering::Relaxed);
        self.db = db;
    }

    /// One connection attempt. False if the schema is refused (fatal).
    fn reconnect(&mut self) -> bool {
        match self.connect.connect() {
            Ok(db) => {
                // Back once an insert works on it (`confirmed`); up now.
                self.set_db(Some(db));
                self.tell(Completion::Connected)
            }
            Err(DbError::Schema(e)) => {
                log::error!("{e}");
                self.tell(Completion::Fatal(DbError::Schema(e)));
                false
            }
            Err(e) => {
                if let Some(o) = self.outage.as_mut() {
                    o.attempts += 1;
                    log::debug!("database still unavailable: {e}");
                } else {
                    self.outage_starts(&e.to_string());
                }
                self.next_attempt = Instant::now() + self.backoff.next_delay(&mut self.rng);
                true
            }
        }
    }

    /// The first connection, its outcome sent on `first`; if nobody waits
    /// for it any more, logged here, and a schema error told as fatal.
    /// False if the thread must end.
    fn connect_first(&mut self, first: &Sender<Result<(), DbError>>) -> bool {
        let what = self.connect.describe();
        match self.connect.connect() {
            Ok(db) => {
                self.set_db(Some(db));
                if first.send(Ok(())).is_err() {
                    log::warn!("database {what} answered at last: recording into it");
                    return self.tell(Completion::Connected);
                }
                true
            }
            Err(DbError::Schema(e)) => {
                if first.send(Err(DbError::Schema(e.clone()))).is_err() {
                    log::error!("{e}");
                    self.tell(Completion::Fatal(DbError::Schema(e)));
                }
                false
            }
            Err(e) => {
                self.outage = Some(Outage {
                    since: Instant::now(),
                    attempts: 1,
                });
                self.next_attempt = Instant::now() + self.backoff.next_delay(&mut self.rng);
                let msg = e.to_string();
                if first.send(Err(e)).is_err() {
                    log::warn!("database {what} unavailable: {msg}; reconnecting with backoff");
                }
                true
            }
        }
    }

    /// The connection broke: drop it and start (or continue) the outage.
    /// The first retry of an outage comes soon (the backoff's first step);
    /// a connection that breaks again before anything worked on it is
    /// retried later each time.
    fn lost(&mut self, e: String) {
        self.set_db(None);
        match self.outage.as_mut() {
            Some(o) => {
                o.attempts += 1;
                log::debug!("database still unavailable: {e}");
            }
            None => self.outage_starts(&e),
        }
        self.next_attempt = Instant::now() + self.backoff.next_delay(&mut self.rng);
        self.tell(Completion::Failed);
    }

    /// An insert worked: the outage, if one was on, is over.
    fn confirmed(&mut self) {
        self.backoff.reset();
        if let Some(o) = self.outage.take() {
            log::warn!(
                "database {} is back after {:.1}s ({} attempt(s)); recording again",
                self.connect.describe(),
                o.since.elapsed().as_secs_f64(),
                o.attempts
            );
        }
    }

    fn outage_starts(&mut self, e: &str) {
        log::warn!(
            "database unavailable: {e}; reports are answered not_recorded (the clients keep \
             them) until it is back; reconnecting with backoff"
        );
        self.outage = Some(Outage {
            since: Instant::now(),
            attempts: 1,
        });
    }

    /// Commits `batch`; false when the loop is gone or the schema refused.
    /// A batch the database refuses (for a row's data or for now) goes
    /// again row by row ([`Thread::one_by_one`]), so a bad row fails alone.
    fn commit(&mut self, mut batch: Vec<Job>) -> bool {
        let Some((res, took)) = self.timed(&mut batch, |db, rows| db.insert(rows)) else {
            self.pending.extend(batch);
            return true;
        };
        match res {
            Ok(written) => {
                self.confirmed();
                let results = batch.iter().zip(written).map(|(j, w)| (j.handle, Ok(w)));
                self.tell(Completion::Committed {
                    results: results.collect(),
                    took,
                })
            }
            Err(DbError::Rejected(e) | DbError::Unstorable(e)) => {
                log::debug!(
                    "database refused a batch of {} ({e}); one by one",
                    batch.len()
                );
                self.one_by_one(batch)
            }
            Err(e) => self.failed(batch, e, took),
        }
    }

    /// Commits `batch` (a refused one) each row on its own
    /// ([`Database::insert_each`]: one transaction, a savepoint per row),
    /// so a refused row fails alone: a row refused for its data is
    /// answered so for good (logged by the loop, rate-limited: a client can
    /// send these at will), one refused for now is answered `not_recorded`.
    /// Rows whose deadline passed meanwhile are dropped unwritten, as in
    /// [`Thread::run`]. False when the loop is gone or the schema refused.
    fn one_by_one(&mut self, mut batch: Vec<Job>) -> bool {
        let now = Instant::now();
        batch.retain(|j| j.deadline > now);
        if batch.is_empty() {
            return true;
        }
        let Some((res, took)) = self.timed(&mut batch, |db, rows| db.insert_each(rows)) else {
            self.pending.extend(batch);
            return true;
        };
        let each = match res {
            Ok(each) => each,
            // Only a row's own statement may refuse it for good: the
            // transaction around them failing for the data (a deferred
            // check at COMMIT) refuses them for now, and they come again.
            Err(DbError::Unstorable(m)) => {
                let m = format!("the rows' transaction: {m}");
                self.refused(&m);
                return self.failed(batch, DbError::Rejected(m), took);
            }
            Err(e) => return self.failed(batch, e, took),
        };
        let mut results = Vec::with_capacity(batch.len());
        for (j, r) in batch.iter().zip(each) {
            match &r {
                Ok(_) => self.confirmed(),
                Err(DbError::Rejected(e)) => self.refused(e),
                Err(_) => {}
            }
            results.push((j.handle, r));
        }
        self.tell(Completion::Committed { results, took })
    }

    /// Runs `op` on the rows of `batch` and times it; `None` without a
    /// connection. The rows are lent to `op` (moved out and back, not
    /// copied): a failed batch goes back to the pending rows whole.
    fn timed<T>(
        &mut self,
        batch: &mut [Job],
        op: impl FnOnce(&mut dyn Database, &[Row]) -> T,
    ) -> Option<(T, Duration)> {
        let db = self.db.as_mut()?;
        let rows: Vec<Row> = batch
            .iter_mut()
            .map(|j| std::mem::take(&mut j.row))
            .collect();
        let started = Instant::now();
        let res = op(db.as_mut(), &rows);
        let took = started.elapsed();
        for (j, row) in batch.iter_mut().zip(rows) {
            j.row = row;
        }
        Some((res, took))
    }

    /// `batch` failed as a whole with `e` after `took`: the connection (its
    /// rows wait for the next one, until their deadlines), the schema
    /// (fatal), or the commit refused (each row answered so). False when
    /// the loop is gone or the schema refused.
    fn failed(&mut self, batch: Vec<Job>, e: DbError, took: Duration) -> bool {
        match e {
            DbError::Connection(m) => {
                for j in batch.into_iter().rev() {
                    self.pending.push_front(j);
                }
                self.lost(m);
                true
            }
            DbError::Schema(m) => {
                self.tell(Completion::Fatal(DbError::Schema(m)));
                false
            }
            e => {
                let results = batch.iter().map(|j| (j.handle, Err(e.clone())));
                self.tell(Completion::Committed {
                    results: results.collect(),
                    took,
                })
            }
        }
    }

    /// A row refused for now, with the connection fine (counted as a sink
    /// error by the loop, from its result): logged at most once per
    /// [`REFUSAL_LOG_EVERY`] with the number since (a database refusing
    /// every row would otherwise log each one).
    fn refused(&mut self, e: &str) {
        let now = Instant::now();
        let (last, since) = &mut self.refusals;
        *since += 1;
        if last.is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_EVERY) {
            log::warn!(
                "database {} refused a report ({since} since the last such line): {e}",
                self.connect.describe()
            );
            *last = Some(now);
            *since = 0;
        }
    }

    /// Sends a completion and wakes the loop; false if the loop is gone.
    fn tell(&self, c: Completion) -> bool {
        if self.outbox.send(c).is_err() {
            return false;
        }
        if let Err(e) = self.waker.wake() {
            log::warn!("cannot wake the server loop: {e}");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Mutex;

    use quic_report_core::ConnKey;

    use super::*;
    use crate::database::testing::{Down, FailsAtCommit, Gated};

    /// A table in memory that, as PostgreSQL does, refuses a whole
    /// statement for one row it cannot store (a body with `\u0000`) or one
    /// it refuses for now (a body with `later`).
    #[derive(Default)]
    struct Table(Arc<Mutex<BTreeSet<i64>>>);

    impl Database for Table {
        fn insert(&mut self, rows: &[Row]) -> Result<Vec<Written>, DbError> {
            if rows.iter().any(|r| r.body.contains("\\u0000")) {
                return Err(DbError::Unstorable("unsupported Unicode escape".into()));
            }
            if rows.iter().any(|r| r.body.contains("later")) {
                return Err(DbError::Rejected("not now".into()));
            }
            let mut t = self.0.lock().expect("table");
            Ok(rows
                .iter()
                .map(|r| {
                    if t.insert(r.seq) {
                        Written::Inserted
                    } else {
                        Written::Duplicate
                    }
                })
                .collect())
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

    struct Again(Arc<Mutex<BTreeSet<i64>>>);

    impl Connect for Again {
        fn connect(&mut self) -> Result<Box<dyn Database>, DbError> {
            Ok(Box::new(Table(Arc::clone(&self.0))))
        }

        fn describe(&self) -> String {
            "memory".into()
        }

        fn another(&self) -> Box<dyn Connect> {
            Box::new(Again(Arc::clone(&self.0)))
        }
    }

    fn job(seq: u64, body: &str) -> Job {
        job_in(
            seq,
            body,
            &Arc::new(Custody::default()),
            Duration::from_secs(30),
        )
    }

    fn job_in(seq: u64, body: &str, custody: &Arc<Custody>, wait: Duration) -> Job {
        Job {
            handle: ReportHandle {
                conn: ConnKey(1),
                stream: seq * 4,
                index: 0,
            },
            row: Row {
                identity: String::new(),
                client: "c".into(),
                seq: seq as i64,
                received_at_ms: 0,
                body: body.into(),
            },
            deadline: Instant::now() + wait,
            ticket: Custody::ticket(custody, body.len()),
        }
    }

    fn waker() -> (mio::Poll, Arc<Waker>) {
        let poll = mio::Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).expect("waker"));
        (poll, waker)
    }

    /// Connects every time, and every insert fails as a lost connection
    /// would (a standby that takes connections but no writes).
    struct TakesNoWrites(Arc<AtomicUsize>);

    impl Database for TakesNoWrites {
        fn insert(&mut self, _: &[Row]) -> Result<Vec<Written>, DbError> {
            Err(DbError::Connection("read-only".into()))
        }

        fn latest(
            &mut self,
            _: LatestLimit,
            _: Option<&str>,
            _: std::time::Instant,
        ) -> Result<Vec<(String, String, String)>, DbError> {
            Err(DbError::Connection("read-only".into()))
        }

        fn counts(&mut self, _: std::time::Instant) -> Result<Counts, DbError> {
            Err(DbError::Connection("read-only".into()))
        }
    }

    impl Connect for TakesNoWrites {
        fn connect(&mut self) -> Result<Box<dyn Database>, DbError> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(Box::new(TakesNoWrites(Arc::clone(&self.0))))
        }

        fn describe(&self) -> String {
            "read-only".into()
        }

        fn another(&self) -> Box<dyn Connect> {
            Box::new(TakesNoWrites(Arc::clone(&self.0)))
        }
    }

    #[test]
    fn a_database_that_connects_but_takes_no_writes_is_retried_with_backoff() {
        let (_poll, waker) = waker();
        let connects = Arc::new(AtomicUsize::new(0));
        let writer = Writer::start(
            Box::new(TakesNoWrites(Arc::clone(&connects))),
            Some(Box::new(TakesNoWrites(Arc::clone(&connects)))),
            waker,
            [3; 32],
        )
        .expect("writer");
        let custody = Arc::new(Custody::default());
        assert!(writer.send(Request::Rows(vec![job_in(
            1,
            "{}",
            &custody,
            Duration::from_secs(30)
        )])));
        std::thread::sleep(Duration::from_millis(1500));
        let n = connects.load(Ordering::Relaxed);
        // 100 ms doubling (with jitter, at least half of each step): at
        // most 5 attempts in 1.5 s; without the backoff, thousands.
        assert!((1..=6).contains(&n), "{n} connections in 1.5 s");
        let (mut failed, mut connected) = (0, 0);
        while let Some(c) = writer.try_recv() {
            match c {
                Completion::Failed => failed += 1,
                Completion::Connected => connected += 1,
                other => panic!("{other:?}"),
            }
        }
        // Each reconnect is told (the loop shows the sink up until the
        // insert on it fails).
        assert!(
            connected == n - 1 || connected == n,
            "{connected} told, {n} connects"
        );
        // One sink error per failed insert (the last may be on its way).
        assert!(
            failed == n || failed == n + 1,
            "{failed} errors, {n} connects"
        );
    }

    #[test]
    fn rows_whose_transaction_fails_for_the_data_are_refused_for_now_not_for_good() {
        let (_poll, waker) = waker();
        let writer = Writer::start(
            Box::new(Down),
            Some(Box::new(FailsAtCommit)),
            waker,
            [8; 32],
        )
        .expect("writer");
        assert!(writer.send(Request::Rows(vec![job(1, "{}"), job(2, "{}")])));
        let until = Instant::now() + Duration::from_secs(10);
        let results = loop {
            match writer.try_recv() {
                Some(Completion::Committed { results, .. }) => break results,
                Some(other) => panic!("{other:?}"),
                None => {
                    assert!(Instant::now() < until, "no answer");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        };
        assert_eq!(results.len(), 2);
        for (_, r) in results {
            assert!(matches!(r, Err(DbError::Rejected(_))), "{r:?}");
        }
    }

    /// Sends a `/stats` read due in 60 s; its request's handle.
    fn send_counts(writer: &Writer) -> ReportHandle {
        let handle = ReportHandle {
            conn: ConnKey(9),
            stream: 0,
            index: 0,
        };
        assert!(writer.send(Request::Read {
            handle,
            what: Read::Counts,
            deadline: Instant::now() + Duration::from_secs(60),
        }));
        handle
    }

    #[test]
    fn a_read_while_the_database_is_down_is_answered_at_once() {
        let (_poll, waker) = waker();
        let writer = Writer::start(Box::new(Down), None, waker, [4; 32]).expect("writer");
        let handle = send_counts(&writer);
        let until = Instant::now() + Duration::from_secs(5);
        let answer = loop {
            if let Some(c) = writer.try_recv() {
                break c;
            }
            assert!(Instant::now() < until, "no answer while down");
            std::thread::sleep(Duration::from_millis(5));
        };
        match answer {
            Completion::Read { handle: h, result } => {
                assert_eq!(h, handle);
                let e = result.expect_err("unavailable");
                assert_eq!(e, "the database is down (reconnecting)");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A read the database does not answer (a lock, a long count) holds
    /// its own connection only: rows sent after it are committed while it
    /// waits, and it is answered once the database answers it.
    #[test]
    fn a_read_that_waits_in_the_database_does_not_hold_the_commits_back() {
        let (_poll, waker) = waker();
        let (writer, gate) = Gated::reads_writer(waker, [6; 32]);
        let closed = gate.lock().expect("gate");
        let handle = send_counts(&writer);
        std::thread::sleep(Duration::from_millis(50));
        assert!(writer.send(Request::Rows(vec![job(1, "{}"), job(2, "{}")])));
        let next = |what: &str| {
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(c) = writer.try_recv() {
                    break c;
                }
                assert!(Instant::now() < until, "no {what}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        match next("commit while the read waits") {
            Completion::Committed { results, .. } => {
                let seqs: Vec<u64> = results.iter().map(|(h, _)| h.stream / 4).collect();
                assert_eq!(seqs, [1, 2]);
                assert!(results.iter().all(|(_, r)| r == &Ok(Written::Inserted)));
            }
            other => panic!("{other:?}"),
        }
        drop(closed);
        match next("answer to the read") {
            Completion::Read { handle: h, result } => {
                assert_eq!(h, handle);
                assert_eq!(result, Ok(ReadResult::Counts(Counts::default())));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rows_past_their_deadline_count_in_the_custody_until_the_thread_drops_them() {
        let (_poll, waker) = waker();
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().expect("gate");
        let writer = Writer::start(
            Box::new(Down),
            Some(Box::new(Gated {
                gate: Arc::clone(&gate),
                inserts: true,
                reads: false,
            })),
            waker,
            [5; 32],
        )
        .expect("writer");
        let short = Duration::from_millis(50);
        assert!(writer.send(Request::Rows(vec![writer_job(&writer, 1, short)])));
        std::thread::sleep(Duration::from_millis(100));
        // The first is stuck in its insert; three more queue behind it, and
        // pass their deadline there.
        let more = (2..=4).map(|s| writer_job(&writer, s, short)).collect();
        assert!(writer.send(Request::Rows(more)));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(writer.custody().rows(), 4, "all four still held");
        assert_eq!(writer.custody().bytes(), 4 * r#"{"v":1}"#.len());
        drop(held);
        let until = Instant::now() + Duration::from_secs(5);
        while writer.custody().rows() > 0 {
            assert!(
                Instant::now() < until,
                "{} still held",
                writer.custody().rows()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(writer.custody().bytes(), 0);
    }

    fn writer_job(writer: &Writer, seq: u64, wait: Duration) -> Job {
        let mut j = job_in(seq, r#"{"v":1}"#, &Arc::new(Custody::default()), wait);
        j.ticket = writer.ticket(j.row.body.len());
        j
    }

    #[test]
    fn a_batch_refused_for_one_row_commits_the_others_and_refuses_that_one_for_good() {
        let poll = mio::Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).expect("waker"));
        let table = Arc::new(Mutex::new(BTreeSet::new()));
        let db = Table(Arc::clone(&table));
        let writer = Writer::start(
            Box::new(Again(Arc::clone(&table))),
            Some(Box::new(db)),
            waker,
            [7; 32],
        )
        .expect("writer");
        let bodies = [
            r#"{"v":1}"#,
            r#"{"v":2}"#,
            r#"{"v":"a\u0000b"}"#,
            r#"{"v":"later"}"#,
            r#"{"v":5}"#,
        ];
        let jobs = (1..).zip(bodies).map(|(s, b)| job(s, b)).collect();
        assert!(writer.send(Request::Rows(jobs)));
        let mut answers = BTreeMap::new();
        let mut failed = 0;
        let until = Instant::now() + Duration::from_secs(10);
        while answers.len() < bodies.len() && Instant::now() < until {
            match writer.try_recv() {
                Some(Completion::Committed { results, .. }) => {
                    for (h, r) in results {
                        assert!(answers.insert(h.stream / 4, r).is_none(), "answered once");
                    }
                }
                Some(Completion::Failed) => failed += 1,
                Some(other) => panic!("{other:?}"),
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        let inserted = Ok(Written::Inserted);
        assert_eq!(answers.get(&1), Some(&inserted));
        assert_eq!(answers.get(&2), Some(&inserted));
        assert!(
            matches!(answers.get(&3), Some(Err(DbError::Unstorable(_)))),
            "{answers:?}"
        );
        assert!(
            matches!(answers.get(&4), Some(Err(DbError::Rejected(_)))),
            "{answers:?}"
        );
        assert_eq!(answers.get(&5), Some(&inserted));
        assert_eq!(
            failed, 0,
            "the database stayed up: refusals count by their results"
        );
        let stored: Vec<i64> = table.lock().expect("table").iter().copied().collect();
        assert_eq!(stored, [1, 2, 5]);
    }
}
