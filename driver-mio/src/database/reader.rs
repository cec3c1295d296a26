//! The read side's helper thread: `/latest` and `/stats` on a connection
//! of their own, so that a read the database is slow to answer (a lock, a
//! table of millions of rows for `/stats`'s row count) never holds the
//! commits back. It answers through the same channel and `mio::Waker` as
//! the commit thread ([`super::writer`], which starts it).
//!
//! **States of its connection:** *none* (at start: it is made at the first
//! read, so a server nobody reads from holds one connection) -> *open* ->
//! (a connection error) -> *none*. A read on a connection that was already
//! open and fails with a connection error (the database restarted since
//! the last read) is run once more on a new one. While the commit thread
//! has no connection, reads are answered at once that the database is
//! down, without connecting (the commit thread owns the outage: its
//! warning, its backoff); a read whose deadline passed while it waited is
//! answered without being run (the loop answered its request by then).
//! The answers do not name the database (its host, port and user): a
//! reader may be a device; the log has them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use mio::Waker;
use quic_report_core::ReportHandle;

use super::writer::{Completion, Read, ReadResult};
use super::{Connect, Database, DbError};

/// A read as the thread receives it: the request, what to read, and the
/// deadline after which the loop has answered it.
pub(super) type ReadJob = (ReportHandle, Read, Instant);

pub(super) struct Reader {
    pub(super) connect: Box<dyn Connect>,
    pub(super) db: Option<Box<dyn Database>>,
    pub(super) inbox: Receiver<ReadJob>,
    pub(super) outbox: Sender<Completion>,
    pub(super) waker: Arc<Waker>,
    /// Whether the commit thread holds a connection.
    pub(super) writer_connected: Arc<AtomicBool>,
}

impl Reader {
    /// Answers reads until the loop is gone.
    pub(super) fn run(mut self) {
        while let Ok((handle, what, deadline)) = self.inbox.recv() {
            let result = if Instant::now() >= deadline {
                Err("not read: its deadline passed".to_owned())
            } else if !self.writer_connected.load(Ordering::Relaxed) {
                Err("the database is down (reconnecting)".to_owned())
            } else {
                self.read(&what, deadline).map_err(|e| {
                    log::debug!("a read failed: {e}");
                    // The reader may be a device reading its own entries:
                    // the database's address is for the log alone.
                    e.to_string()
                        .replace(&self.connect.describe(), "the database")
                })
            };
            if self
                .outbox
                .send(Completion::Read { handle, result })
                .is_err()
            {
                return;
            }
            if let Err(e) = self.waker.wake() {
                log::warn!("cannot wake the server loop: {e}");
            }
        }
    }

    /// Runs `what` by `deadline`, on the open connection or a new one.
    fn read(&mut self, what: &Read, deadline: Instant) -> Result<ReadResult, DbError> {
        let was_open = self.db.is_some();
        match self.read_once(what, deadline) {
            Err(DbError::Connection(e)) if was_open && Instant::now() < deadline => {
                log::debug!("read connection lost ({e}); reading on a new one");
                self.read_once(what, deadline)
            }
            other => other,
        }
    }

    fn read_once(&mut self, what: &Read, deadline: Instant) -> Result<ReadResult, DbError> {
        let db = match &mut self.db {
            Some(db) => db,
            none => none.insert(self.connect.connect()?),
        };
        let result = match what {
            Read::Latest { limit, identity } => db
                .latest(*limit, identity.as_deref(), deadline)
                .map(ReadResult::Latest),
            Read::Counts => db.counts(deadline).map(ReadResult::Counts),
        };
        if let Err(DbError::Connection(_)) = &result {
            self.db = None;
        }
        result
    }
}
