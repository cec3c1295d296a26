//! [`WalSync`]: the SQLite sink's `--fsync interval`, a helper thread that
//! makes the write-ahead log durable within one period of each commit.
//!
//! Under `synchronous=NORMAL` SQLite writes a commit's WAL frames without
//! syncing them (it syncs the WAL before each checkpoint, the database file
//! after). A committed batch then survives a crash of the server (the
//! frames are in the OS's cache) but not a power loss. This thread closes
//! that window to about one period, as `--fsync interval` does for a file:
//! after a commit it waits for the period to end and syncs the WAL file
//! (`fdatasync` on a descriptor of its own: the kernel writes back every
//! dirty page of the file, whoever wrote it, and its length). A power loss
//! may then lose the commits of the last period (plus the sync's own
//! time); the WAL's checksums make SQLite's recovery stop at the last
//! whole commit, so no torn batch is ever read. The file stays the same
//! while the connection is open: SQLite deletes or replaces it only under
//! an exclusive lock, which an open connection's shared lock excludes, and
//! a checkpoint only rewinds or truncates it.
//!
//! The commit thread never waits for it. Dropped, it syncs what is left at
//! once and ends before the drop returns.

use std::cell::Cell;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Syncs one WAL file a period after commits; see the module docs.
#[derive(Debug)]
pub(crate) struct WalSync {
    commits: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// Syncs done (for tests and the curious).
    syncs: Arc<AtomicU64>,
    /// The thread is gone (it panicked): warned once.
    gone: Cell<bool>,
}

impl WalSync {
    /// Starts the thread for the WAL file at `wal` (it must exist: a
    /// connection in WAL mode creates it when it opens the database).
    pub(crate) fn start(wal: &Path, period: Duration) -> std::io::Result<WalSync> {
        let file = File::open(wal)?;
        let (tx, rx) = mpsc::channel::<()>();
        let name = wal.display().to_string();
        let syncs = Arc::new(AtomicU64::new(0));
        let done = Arc::clone(&syncs);
        let thread = std::thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || {
                let mut failing = false;
                // Each turn: a first commit since the last sync, then the
                // rest of the period (cut short when the connection goes),
                // then one sync for all of them.
                while rx.recv().is_ok() {
                    let due = Instant::now().checked_add(period);
                    let mut last = false;
                    loop {
                        let left = due.map_or(Duration::MAX, |d| {
                            d.saturating_duration_since(Instant::now())
                        });
                        match rx.recv_timeout(left) {
                            Ok(()) => {}
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => {
                                last = true;
                                break;
                            }
                        }
                    }
                    match file.sync_data() {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                            if std::mem::take(&mut failing) {
                                log::info!(
                                    "{name}: fsync works again (the commits made while it failed \
                                     may not survive a power loss)"
                                );
                            }
                        }
                        Err(e) if !failing => {
                            failing = true;
                            log::warn!(
                                "{name}: fsync: {e} (commits from now on may not survive a power \
                                 loss)"
                            );
                        }
                        Err(e) => log::debug!("{name}: fsync: {e}"),
                    }
                    if last {
                        break;
                    }
                }
            })?;
        Ok(WalSync {
            commits: Some(tx),
            thread: Some(thread),
            syncs,
            gone: Cell::new(false),
        })
    }

    /// A batch was committed: its frames are synced within the period.
    pub(crate) fn committed(&self) {
        let sent = self.commits.as_ref().is_some_and(|tx| tx.send(()).is_ok());
        if !sent && !self.gone.replace(true) {
            log::warn!(
                "the WAL's sync thread is gone: commits are no longer synced (as --fsync never)"
            );
        }
    }

    /// Syncs done so far.
    pub(crate) fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}

impl Drop for WalSync {
    fn drop(&mut self) {
        // The thread syncs what is pending at once, then ends.
        self.commits = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        log::debug!("the WAL was synced {} time(s)", self.syncs());
    }
}
