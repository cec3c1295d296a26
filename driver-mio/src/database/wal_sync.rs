//! [`WalSync`]: the SQLite sink's `--fsync interval`, a helper thread that
//! makes the write-ahead log durable within one period of each commit.
//!
//! Under `synchronous=NORMAL` SQLite writes a commit's WAL frames without
//! syncing them (it syncs the WAL before each checkpoint, the database file
//! after). A committed batch then survives a crash of the server (the
//! frames are in the OS's cache) but not a power loss. This thread closes
//! that window to one period, as `--fsync interval` does for a file: after
//! a commit it waits for the period to end and syncs the WAL file
//! (`fdatasync` on a descriptor of its own; the kernel writes back every
//! page of the file, whoever wrote it). A power loss may then lose the
//! commits of the last period, and the WAL's checksums make SQLite's
//! recovery stop at the last whole frame: no torn batch is ever read.
//!
//! The commit thread never waits for it.

use std::fs::File;
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// Syncs one WAL file a period after commits; stops (after a last sync)
/// when dropped.
#[derive(Debug)]
pub(crate) struct WalSync {
    commits: Sender<()>,
}

impl WalSync {
    /// Starts the thread for the WAL file at `wal` (it must exist: the
    /// connection in WAL mode has written to the database).
    pub(crate) fn start(wal: &Path, period: Duration) -> std::io::Result<WalSync> {
        let file = File::open(wal)?;
        let (tx, rx) = mpsc::channel::<()>();
        let name = wal.display().to_string();
        std::thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || {
                let mut failing = false;
                // Each turn: a first commit since the last sync, then the
                // rest of the period, then one sync for all of them.
                while rx.recv().is_ok() {
                    let due = Instant::now() + period;
                    let mut last = false;
                    loop {
                        let left = due.saturating_duration_since(Instant::now());
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
                        Ok(()) if failing => {
                            failing = false;
                            log::info!("{name}: fsync works again");
                        }
                        Ok(()) => {}
                        Err(e) if !failing => {
                            failing = true;
                            log::warn!(
                                "{name}: fsync: {e} (the last commits may not survive a power loss)"
                            );
                        }
                        Err(e) => log::debug!("{name}: fsync: {e}"),
                    }
                    if last {
                        break;
                    }
                }
            })?;
        Ok(WalSync { commits: tx })
    }

    /// A batch was committed: its frames are synced within the period.
    pub(crate) fn committed(&self) {
        // The thread is gone only if it panicked; nothing to tell then.
        let _ = self.commits.send(());
    }
}
