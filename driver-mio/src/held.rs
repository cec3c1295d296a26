//! The server loop's side of a database sink: reports held until their
//! commit, bounded, each with a deadline.
//!
//! A report enters `Held::submit` as a row for the helper thread
//! ([`crate::database::writer`]) and is answered exactly once, by the first
//! of:
//! - its commit: `Recorded` (the row is new) or `Duplicate` (its key was
//!   there: recorded before, by this process or another one);
//! - the database refusing it for its data (a value its column can never
//!   take, see [`crate::database`]): `Unstorable`, permanent: the client
//!   drops it;
//! - the database refusing it otherwise, or its deadline ([`WaitLimits::deadline`],
//!   below the client's answer deadline) passing first: `NotRecorded`, and
//!   the client sends it again later. Should the commit still happen after
//!   that, the resend is answered `duplicate`: never recorded twice, and
//!   never acknowledged before its commit.
//!
//! **Backpressure.** At most [`WaitLimits::max_reports`] reports and
//! [`WaitLimits::max_bytes`] bytes of report wait at once; a report past
//! either bound is answered `not_recorded` at once ("the server is busy",
//! counted as `sink_busy`), so a slow database costs clients a resend, not
//! the server its memory. The bound also counts the rows the helper thread
//! still holds after their reports were answered at their deadline
//! ([`crate::database::writer::Custody`]): a database stalled in one
//! statement cannot make the thread's queue grow while the loop keeps
//! answering `not_recorded`. Before that, each connection's stream credit
//! (100 concurrent streams) bounds what one client has waiting.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quic_report_core::{Outcome, Report, ReportHandle};

use crate::database::writer::{Completion, Job, Read, ReadResult, Request, Writer};
use crate::database::{DbError, KeylessKeys, Written};
use crate::observe::DbMetrics;

/// How long and how much may wait for the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitLimits {
    /// A report not committed within this is answered `not_recorded`
    /// (default 3 s: below the client's 5 s answer deadline).
    pub deadline: Duration,
    /// Reports waiting at most (default 10,000).
    pub max_reports: usize,
    /// Bytes of report waiting at most (default 32 MiB).
    pub max_bytes: usize,
}

impl Default for WaitLimits {
    fn default() -> Self {
        WaitLimits {
            deadline: Duration::from_secs(3),
            max_reports: 10_000,
            max_bytes: 32 << 20,
        }
    }
}

/// A report being recorded: what its answer needs.
#[derive(Debug)]
pub(crate) struct Waiting {
    pub(crate) handle: ReportHandle,
    pub(crate) peer: SocketAddr,
    pub(crate) report: Report,
    /// Its JSON line (kept by `/latest`).
    pub(crate) line: Vec<u8>,
    /// The loop turn that read it.
    pub(crate) turn: Instant,
}

/// What came back.
#[derive(Debug)]
pub(crate) enum Settled {
    /// A report's answer.
    Report(Waiting, Outcome),
    /// A read's result.
    Read(ReportHandle, Result<ReadResult, String>),
}

/// Database reads (`/latest`, `/stats`) the read thread holds at most;
/// more are answered "busy" at once, so that reads cannot pile up without
/// bound behind a slow one. A read not answered within
/// [`WaitLimits::deadline`] is answered "unavailable" at its deadline (a
/// database stalled in a statement does not hold the request open); it
/// still counts here until the thread gives it back.
pub(crate) const MAX_READS: usize = 64;

/// What became of a read asked of the thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadQueued {
    /// It will come back as [`Settled::Read`].
    Sent,
    /// This many wait already: answer "busy".
    Busy(usize),
    /// The thread is gone.
    Gone,
}

/// The reports waiting for their commit.
#[derive(Debug)]
pub(crate) struct Held {
    writer: Writer,
    limits: WaitLimits,
    waiting: HashMap<ReportHandle, Waiting>,
    /// Deadlines in order (all reports get the same wait).
    expiry: VecDeque<(Instant, ReportHandle)>,
    bytes: usize,
    keyless: KeylessKeys,
    /// Reads the thread holds (sent, and not given back).
    reads: usize,
    /// Reads not answered yet, and their deadlines in order.
    reads_waiting: HashSet<ReportHandle>,
    read_expiry: VecDeque<(Instant, ReportHandle)>,
}

impl Held {
    pub(crate) fn new(writer: Writer, limits: WaitLimits, instance: [u8; 16]) -> Held {
        Held {
            writer,
            limits,
            waiting: HashMap::new(),
            expiry: VecDeque::new(),
            bytes: 0,
            keyless: KeylessKeys::new(instance),
            reads: 0,
            reads_waiting: HashSet::new(),
            read_expiry: VecDeque::new(),
        }
    }

    /// Hands `reports` to the thread; those past the bounds (or all, if
    /// the thread is gone) come back in `refused` with their answer.
    pub(crate) fn submit(
        &mut self,
        now: Instant,
        reports: Vec<Waiting>,
        refused: &mut Vec<Settled>,
        m: &mut DbMetrics,
    ) {
        let deadline = now + self.limits.deadline;
        let received_at = crate::fetch::unix_ms();
        let mut jobs = Vec::with_capacity(reports.len());
        for w in reports {
            let size = w.report.json().len();
            // What the thread holds counts too: rows whose reports were
            // answered at their deadline but are still queued there.
            let custody = self.writer.custody();
            let held = self.waiting.len().max(custody.rows());
            let bytes = self.bytes.max(custody.bytes());
            // A report alone is always taken, whatever its size: a bound
            // below the largest report must not refuse it every time.
            if held >= self.limits.max_reports || (held > 0 && bytes + size > self.limits.max_bytes)
            {
                m.busy += 1;
                let why = format!("the server is busy: {held} report(s) wait for the database");
                refused.push(Settled::Report(w, Outcome::NotRecorded(why)));
                continue;
            }
            jobs.push(Job {
                handle: w.handle,
                row: self.keyless.row(&w.report, received_at),
                deadline,
                ticket: self.writer.ticket(size),
            });
            self.bytes += size;
            self.expiry.push_back((deadline, w.handle));
            self.waiting.insert(w.handle, w);
        }
        if !jobs.is_empty() && !self.writer.send(Request::Rows(jobs)) {
            // The thread ended (a fatal error is on its way, or `poll`
            // finds it ended without one): answer now.
            self.expire(Instant::now() + self.limits.deadline, refused, m);
        }
        self.gauges(m);
    }

    /// Asks the thread for a read, unless [`MAX_READS`] wait already.
    pub(crate) fn read(&mut self, now: Instant, handle: ReportHandle, what: Read) -> ReadQueued {
        if self.reads >= MAX_READS {
            return ReadQueued::Busy(self.reads);
        }
        let deadline = now + self.limits.deadline;
        if !self.writer.send(Request::Read {
            handle,
            what,
            deadline,
        }) {
            return ReadQueued::Gone;
        }
        self.reads += 1;
        self.reads_waiting.insert(handle);
        self.read_expiry.push_back((deadline, handle));
        ReadQueued::Sent
    }

    /// Completions that arrived, and reports whose deadline passed, into
    /// `out`. A fatal database error is returned (the server stops).
    pub(crate) fn poll(
        &mut self,
        now: Instant,
        out: &mut Vec<Settled>,
        m: &mut DbMetrics,
    ) -> Result<(), DbError> {
        let mut fatal = None;
        // Looked at before the channel is drained: whatever the thread sent
        // before it ended (its fatal error) is then in the channel.
        let ended = self.writer.ended();
        while let Some(c) = self.writer.try_recv() {
            match c {
                Completion::Committed { results, took } => {
                    // Up if the database took or judged a row; a commit
                    // if a row was written (not a batch refused whole).
                    m.up = results
                        .iter()
                        .any(|(_, r)| matches!(r, Ok(_) | Err(DbError::Unstorable(_))));
                    if results.iter().any(|(_, r)| r.is_ok()) {
                        m.commits += 1;
                        m.commit_latency.observe(took);
                        m.batch_rows.observe_value(results.len() as f64);
                    }
                    for (handle, result) in results {
                        let Some(w) = self.take(handle) else {
                            continue; // answered at its deadline already
                        };
                        let outcome = match result {
                            Ok(Written::Inserted) => Outcome::Recorded,
                            Ok(Written::Duplicate) => Outcome::Duplicate,
                            Err(DbError::Unstorable(e)) => Outcome::Unstorable(e),
                            Err(e) => {
                                m.errors += 1;
                                Outcome::NotRecorded(e.to_string())
                            }
                        };
                        out.push(Settled::Report(w, outcome));
                    }
                }
                Completion::Read { handle, result } => {
                    self.reads = self.reads.saturating_sub(1);
                    // Unless answered at its deadline already.
                    if self.reads_waiting.remove(&handle) {
                        out.push(Settled::Read(handle, result));
                    }
                }
                Completion::Failed => {
                    m.errors += 1;
                    m.up = false;
                }
                Completion::Connected => m.up = true,
                Completion::Fatal(e) => fatal = Some(e),
            }
        }
        if fatal.is_none() && ended {
            // Ended without a fatal error: it panicked (said on stderr).
            fatal = Some(DbError::Schema(
                "the database thread ended unexpectedly; nothing can be recorded".into(),
            ));
        }
        self.expire(now, out, m);
        self.gauges(m);
        match fatal {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The next deadline, if any report or read waits.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let report = self.expiry.front().map(|(t, _)| *t);
        let read = self.read_expiry.front().map(|(t, _)| *t);
        report.into_iter().chain(read).min()
    }

    /// Answers the reports and reads whose deadline passed, and forgets the
    /// deadlines of those answered already (so [`Held::deadline`] is the
    /// next one that matters, and an idle loop does not wake for nothing).
    fn expire(&mut self, now: Instant, out: &mut Vec<Settled>, m: &mut DbMetrics) {
        while let Some(handle) = next_due(&mut self.expiry, now, |h| self.waiting.contains_key(h)) {
            if let Some(w) = self.take(handle) {
                m.expired += 1;
                let why = format!(
                    "the database did not commit it within {:?}",
                    self.limits.deadline
                );
                out.push(Settled::Report(w, Outcome::NotRecorded(why)));
            }
        }
        while let Some(handle) = next_due(&mut self.read_expiry, now, |h| {
            self.reads_waiting.contains(h)
        }) {
            self.reads_waiting.remove(&handle);
            let why = format!("it did not answer within {:?}", self.limits.deadline);
            out.push(Settled::Read(handle, Err(why)));
        }
    }

    fn take(&mut self, handle: ReportHandle) -> Option<Waiting> {
        let w = self.waiting.remove(&handle)?;
        self.bytes -= w.report.json().len();
        Some(w)
    }

    fn gauges(&self, m: &mut DbMetrics) {
        m.waiting_reports = self.waiting.len() as u64;
        m.waiting_bytes = self.bytes as u64;
    }
}

/// Pops the deadlines of `expiry` (in order) up to the first one still
/// ahead of `now`, dropping those of entries no longer `waiting`; returns
/// the next entry whose deadline passed while it waits.
fn next_due(
    expiry: &mut VecDeque<(Instant, ReportHandle)>,
    now: Instant,
    waiting: impl Fn(&ReportHandle) -> bool,
) -> Option<ReportHandle> {
    while let Some(&(at, handle)) = expiry.front() {
        let live = waiting(&handle);
        if at > now && live {
            return None;
        }
        expiry.pop_front();
        if live {
            return Some(handle);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use quic_report_core::ConnKey;

    use super::*;
    use crate::database::testing::{Down, FailsAtCommit, Gated};

    /// A `Held` whose database's reads wait while the gate is held (keep
    /// the `Poll`: the thread wakes it).
    fn gated_reads(limits: WaitLimits) -> (Held, Arc<Mutex<()>>, mio::Poll) {
        let poll = mio::Poll::new().expect("poll");
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker"));
        let (writer, gate) = Gated::reads_writer(waker, [1; 32]);
        (Held::new(writer, limits, [2; 16]), gate, poll)
    }

    fn handle(i: u64) -> ReportHandle {
        ReportHandle {
            conn: ConnKey(1),
            stream: i * 4,
            index: 0,
        }
    }

    fn waiting(i: u64, pad: usize) -> Waiting {
        let mut fields = serde_json::Map::new();
        fields.insert("client".into(), "c".into());
        fields.insert("seq".into(), i.into());
        fields.insert("pad".into(), "x".repeat(pad).into());
        Waiting {
            handle: handle(i),
            peer: "127.0.0.1:9".parse().expect("address"),
            report: Report::from_object(fields).expect("a report"),
            line: Vec::new(),
            turn: Instant::now(),
        }
    }

    /// A batch whose every row the database refuses commits nothing: it is
    /// no commit in the metrics, and the sink is not shown up (both were,
    /// for every refused batch).
    #[test]
    fn a_batch_whose_every_row_is_refused_is_no_commit_and_the_sink_not_up() {
        let poll = mio::Poll::new().expect("poll");
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker"));
        let writer = Writer::start(
            Box::new(Down),
            Some(Box::new(FailsAtCommit)),
            waker,
            [4; 32],
        )
        .expect("writer");
        let mut held = Held::new(writer, WaitLimits::default(), [2; 16]);
        let mut m = DbMetrics {
            up: true,
            ..DbMetrics::default()
        };
        let mut out = Vec::new();
        held.submit(
            Instant::now(),
            vec![waiting(1, 0), waiting(2, 0)],
            &mut out,
            &mut m,
        );
        let until = Instant::now() + Duration::from_secs(10);
        while out.len() < 2 && Instant::now() < until {
            held.poll(Instant::now(), &mut out, &mut m)
                .expect("no fatal");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(out.len(), 2, "both answered");
        for s in &out {
            assert!(
                matches!(s, Settled::Report(_, Outcome::NotRecorded(why)) if why.contains("check violated")),
                "{s:?}"
            );
        }
        assert!(!m.up, "refused rows are no sign of a working sink");
        assert_eq!(m.commits, 0);
        assert_eq!(m.batch_rows.count(), 0);
        assert_eq!(m.errors, 2);
    }

    #[test]
    fn a_report_over_the_byte_bound_is_taken_when_nothing_else_waits() {
        let limits = WaitLimits {
            max_bytes: 1000,
            ..WaitLimits::default()
        };
        let (mut held, _gate, _poll) = gated_reads(limits);
        let (mut refused, mut m) = (Vec::new(), DbMetrics::default());
        // Alone, 2 KB against a 1,000-byte bound: taken.
        held.submit(Instant::now(), vec![waiting(1, 2000)], &mut refused, &mut m);
        assert!(refused.is_empty(), "{refused:?}");
        // With it waiting, the next one is past the bound: busy.
        held.submit(Instant::now(), vec![waiting(2, 10)], &mut refused, &mut m);
        assert_eq!(refused.len(), 1);
        assert_eq!(m.busy, 1);
    }

    #[test]
    fn reads_past_the_bound_are_refused_busy_until_answers_come_back() {
        let (mut held, gate, _poll) = gated_reads(WaitLimits::default());
        let closed = gate.lock().expect("gate");
        for i in 0..MAX_READS as u64 {
            assert_eq!(
                held.read(Instant::now(), handle(i), Read::Counts),
                ReadQueued::Sent
            );
        }
        assert_eq!(
            held.read(Instant::now(), handle(999), Read::Counts),
            ReadQueued::Busy(MAX_READS)
        );
        drop(closed);
        let (mut out, mut m) = (Vec::new(), DbMetrics::default());
        let until = Instant::now() + Duration::from_secs(10);
        let mut answered = 0;
        while answered < MAX_READS {
            assert!(Instant::now() < until, "{answered} reads answered");
            held.poll(Instant::now(), &mut out, &mut m).expect("poll");
            answered += out
                .drain(..)
                .filter(|s| matches!(s, Settled::Read(_, Ok(_))))
                .count();
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(
            held.read(Instant::now(), handle(1000), Read::Counts),
            ReadQueued::Sent
        );
    }

    #[test]
    fn a_read_the_database_does_not_answer_is_answered_at_its_deadline_once() {
        let limits = WaitLimits {
            deadline: Duration::from_millis(100),
            ..WaitLimits::default()
        };
        let (mut held, gate, _poll) = gated_reads(limits);
        let closed = gate.lock().expect("gate");
        let start = Instant::now();
        // The first blocks in the database; the second waits behind it.
        assert_eq!(held.read(start, handle(1), Read::Counts), ReadQueued::Sent);
        assert_eq!(held.read(start, handle(2), Read::Counts), ReadQueued::Sent);
        assert_eq!(held.deadline(), Some(start + limits.deadline));
        let (mut out, mut m) = (Vec::new(), DbMetrics::default());
        held.poll(start, &mut out, &mut m).expect("poll");
        assert!(out.is_empty(), "{out:?}");
        held.poll(start + limits.deadline, &mut out, &mut m)
            .expect("poll");
        let mut answered: Vec<_> = out
            .drain(..)
            .map(|s| match s {
                Settled::Read(h, Err(e)) => {
                    assert!(e.contains("did not answer within 100ms"), "{e}");
                    h
                }
                other => panic!("{other:?}"),
            })
            .collect();
        answered.sort_by_key(|h| h.stream);
        assert_eq!(answered, [handle(1), handle(2)]);
        assert_eq!(held.deadline(), None);
        // Both still count under the bound until the thread gives them
        // back; the late result is not answered a second time.
        assert_eq!(held.reads, 2);
        drop(closed);
        let until = Instant::now() + Duration::from_secs(10);
        while held.reads > 0 {
            assert!(
                Instant::now() < until,
                "{} reads not given back",
                held.reads
            );
            held.poll(Instant::now(), &mut out, &mut m).expect("poll");
            assert!(out.is_empty(), "answered twice: {out:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(
            held.read(Instant::now(), handle(3), Read::Counts),
            ReadQueued::Sent
        );
    }
}
