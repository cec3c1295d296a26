//! The sink's helper thread: it owns the database connection, commits the
//! rows the server loop hands it, and hands the outcomes back through a
//! channel and the loop's `mio::Waker`. The loop never waits on it.
//!
//! ```text
//!  loop ──Request::Rows(jobs)──► channel ──► pending ──► one batch: everything
//!   ▲                                          │          pending, at most MAX_BATCH rows
//!   │                                          ▼
//!   └──waker.wake()◄──Completion◄── insert + commit (group commit)
//! ```
//!
//! **Group commit:** while a batch commits, new rows wait in the channel;
//! the next batch takes all of them. A lone report commits at once; under
//! load batches grow by themselves.
//!
//! **States of the connection:** *connected* -> (a connection error) ->
//! *down*: the failed batch goes back to the front of the pending rows,
//! one warning is logged for the whole outage, and connecting is retried
//! with backoff (100 ms doubling to 5 s, with jitter) while rows are
//! pending -> *connected* again, logged once with the outage's length.
//! Rows whose deadline passed are dropped from the pending rows unwritten
//! (the loop has answered them `not_recorded` by then).
//!
//! A batch the database refuses while the connection is fine is retried
//! row by row, so one bad row fails alone. Alone, a row refused for its
//! data ([`DbError::Unstorable`]) is answered so, for good (the client
//! drops it); one refused for another reason is answered `not_recorded`;
//! a connection error on the way stops the row-by-row pass and puts the
//! rows back (the outage path above). A schema this build does not
//! understand is fatal: the thread reports it and ends.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::Waker;
use quic_report_core::backoff::{Backoff, BackoffConfig};
use quic_report_core::{CoreRng, ReportHandle};

use super::{Connect, Database, DbError, Row, Written};

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
    },
}

/// A read of the read side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// The latest report of each `(identity, client)`, at most `limit`;
    /// with `identity`, of that identity only.
    Latest {
        /// Rows at most.
        limit: usize,
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
    Counts(u64, u64),
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
    /// The database cannot be used by this build: the server stops.
    Fatal(DbError),
}

/// The loop's handle on the thread. Dropping it ends the thread once its
/// current batch is done (the thread is not waited for).
#[derive(Debug)]
pub struct Writer {
    requests: Sender<Request>,
    completions: Receiver<Completion>,
    _thread: JoinHandle<()>,
}

impl Writer {
    /// Starts the thread with `db` (if the first connection succeeded) and
    /// the means to connect again; it wakes `waker` after each completion.
    pub fn start(
        connect: Box<dyn Connect>,
        db: Option<Box<dyn Database>>,
        waker: Arc<Waker>,
        seed: [u8; 32],
    ) -> std::io::Result<Writer> {
        let (requests, inbox) = mpsc::channel();
        let (outbox, completions) = mpsc::channel();
        let mut thread = Thread {
            connect,
            db,
            inbox,
            outbox,
            waker,
            pending: VecDeque::new(),
            reads: VecDeque::new(),
            outage: None,
            backoff: Backoff::new(RECONNECT),
            rng: CoreRng::from_seed_bytes(seed),
            next_attempt: Instant::now(),
        };
        if thread.db.is_none() {
            thread.outage = Some(Outage {
                since: Instant::now(),
                attempts: 1,
            });
        }
        let handle = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || thread.run())?;
        Ok(Writer {
            requests,
            completions,
            _thread: handle,
        })
    }

    /// Hands a request to the thread; false if the thread is gone.
    pub fn send(&self, request: Request) -> bool {
        self.requests.send(request).is_ok()
    }

    /// The next completion, if one is ready.
    pub fn try_recv(&self) -> Option<Completion> {
        self.completions.try_recv().ok()
    }
}

struct Outage {
    since: Instant,
    attempts: u32,
}

struct Thread {
    connect: Box<dyn Connect>,
    db: Option<Box<dyn Database>>,
    inbox: Receiver<Request>,
    outbox: Sender<Completion>,
    waker: Arc<Waker>,
    pending: VecDeque<Job>,
    reads: VecDeque<(ReportHandle, Read)>,
    outage: Option<Outage>,
    backoff: Backoff,
    rng: CoreRng,
    next_attempt: Instant,
}

impl Thread {
    fn run(mut self) {
        loop {
            if !self.wait() {
                return;
            }
            let now = Instant::now();
            self.pending.retain(|j| j.deadline > now);
            if self.pending.is_empty() && self.reads.is_empty() {
                continue;
            }
            let Some(db) = self.db.as_mut() else {
                if now >= self.next_attempt && !self.reconnect() {
                    return;
                }
                continue;
            };
            if let Some((handle, what)) = self.reads.pop_front() {
                let result = match what {
                    Read::Latest { limit, identity } => db
                        .latest(limit, identity.as_deref())
                        .map(ReadResult::Latest),
                    Read::Counts => db.counts().map(|(r, c)| ReadResult::Counts(r, c)),
                };
                if let Err(DbError::Connection(e)) = &result {
                    self.lost(e.clone());
                }
                let result = result.map_err(|e| e.to_string());
                if !self.tell(Completion::Read { handle, result }) {
                    return;
                }
                continue;
            }
            let n = self.pending.len().min(MAX_BATCH);
            let batch: Vec<Job> = self.pending.drain(..n).collect();
            if !self.commit(batch) {
                return;
            }
        }
    }

    /// Waits for work: blocks while nothing is pending, else takes what
    /// arrived (and, while the database is down, waits until the next
    /// attempt for more). False when the loop is gone.
    fn wait(&mut self) -> bool {
        let idle = self.pending.is_empty() && self.reads.is_empty();
        let first = if idle {
            match self.inbox.recv() {
                Ok(r) => Some(r),
                Err(_) => return false,
            }
        } else if self.db.is_none() {
            let left = self.next_attempt.saturating_duration_since(Instant::now());
            match self.inbox.recv_timeout(left) {
                Ok(r) => Some(r),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        } else {
            None
        };
        if let Some(r) = first {
            self.take(r);
        }
        loop {
            match self.inbox.try_recv() {
                Ok(r) => self.take(r),
                Err(TryRecvError::Empty) => return true,
                // The loop is gone: finish what is pending (until its deadlines).
                Err(TryRecvError::Disconnected) => return !idle,
            }
        }
    }

    fn take(&mut self, r: Request) {
        match r {
            Request::Rows(jobs) => self.pending.extend(jobs),
            Request::Read { handle, what } => self.reads.push_back((handle, what)),
        }
    }

    /// One connection attempt. False if the schema is refused (fatal).
    fn reconnect(&mut self) -> bool {
        match self.connect.connect() {
            Ok(db) => {
                self.db = Some(db);
                self.backoff.reset();
                if let Some(o) = self.outage.take() {
                    log::warn!(
                        "database {} is back after {:.1}s ({} attempt(s)); recording again",
                        self.connect.describe(),
                        o.since.elapsed().as_secs_f64(),
                        o.attempts
                    );
                }
                true
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

    /// The connection broke: drop it and start (or continue) the outage.
    fn lost(&mut self, e: String) {
        self.db = None;
        self.next_attempt = Instant::now();
        if self.outage.is_none() {
            self.outage_starts(&e);
        }
        self.tell(Completion::Failed);
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
    fn commit(&mut self, batch: Vec<Job>) -> bool {
        let Some(db) = self.db.as_mut() else {
            self.pending.extend(batch);
            return true;
        };
        let rows: Vec<Row> = batch.iter().map(|j| j.row.clone()).collect();
        let started = Instant::now();
        let res = db.insert(&rows);
        let took = started.elapsed();
        let results = match res {
            Ok(written) => batch
                .iter()
                .zip(written)
                .map(|(j, w)| (j.handle, Ok(w)))
                .collect(),
            Err(DbError::Connection(e)) => {
                // Retried on the next connection, until their deadlines.
                for j in batch.into_iter().rev() {
                    self.pending.push_front(j);
                }
                self.lost(e);
                return true;
            }
            Err(DbError::Schema(e)) => {
                self.tell(Completion::Fatal(DbError::Schema(e)));
                return false;
            }
            // Logged by the loop (rate-limited): a client can send these at will.
            Err(e @ DbError::Unstorable(_)) if batch.len() == 1 => {
                vec![(batch[0].handle, Err(e))]
            }
            Err(DbError::Rejected(e)) if batch.len() == 1 => {
                log::warn!("database refused a report: {e}");
                self.tell(Completion::Failed);
                vec![(batch[0].handle, Err(DbError::Rejected(e)))]
            }
            Err(DbError::Rejected(e) | DbError::Unstorable(e)) => {
                log::debug!(
                    "database refused a batch of {} ({e}); one by one",
                    batch.len()
                );
                for j in batch.into_iter().rev() {
                    self.pending.push_front(j);
                }
                return self.one_by_one();
            }
        };
        self.tell(Completion::Committed { results, took })
    }

    /// Commits the pending rows one per batch until the first batch's
    /// length is done, so a refused row fails alone. Rows whose deadline
    /// passed meanwhile are dropped unwritten, as in [`Thread::run`].
    fn one_by_one(&mut self) -> bool {
        let n = self.pending.len().min(MAX_BATCH);
        for _ in 0..n {
            let Some(job) = self.pending.pop_front() else {
                break;
            };
            if job.deadline <= Instant::now() {
                continue;
            }
            if !self.commit(vec![job]) {
                return false;
            }
            if self.db.is_none() {
                break;
            }
        }
        true
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
            _: usize,
            _: Option<&str>,
        ) -> Result<Vec<(String, String, String)>, DbError> {
            Ok(Vec::new())
        }

        fn counts(&mut self) -> Result<(u64, u64), DbError> {
            Ok((0, 0))
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
    }

    fn job(seq: u64, body: &str) -> Job {
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
            deadline: Instant::now() + Duration::from_secs(30),
        }
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
        assert_eq!(failed, 1, "only the passing refusal counts as a sink error");
        let stored: Vec<i64> = table.lock().expect("table").iter().copied().collect();
        assert_eq!(stored, [1, 2, 5]);
    }
}
