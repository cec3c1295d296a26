//! The client's persistent queue (`client --spool DIR`): every sample is
//! written here before its report is first sent, and marked done when the
//! server acknowledges it (or refuses it for good, or the full queue drops
//! it). A client restarted on the same directory comes back with the same
//! `client` id, continues `seq` where it left off (never reusing one), and
//! sends what the spool holds, oldest first, before new samples.
//!
//! # Format: one append-only segment log
//!
//! `DIR/spool.log` starts with the magic `QRSPOOL1`, then records:
//!
//! ```text
//! u32 LE length of kind + payload | u32 LE CRC-32 of kind + payload | u8 kind | payload
//!   kind 1 Identity  u16 LE id length, client id (UTF-8), u64 LE next seq
//!   kind 2 Sample    u64 LE seq, u64 LE sampled_at_ms, the fields as a JSON object
//!   kind 3 Done      u64 LE seq
//!   kind 4 Reserve   u64 LE seq bound, boot id (UTF-8)
//! ```
//!
//! Why a log of our own rather than SQLite: the spool is a FIFO whose every
//! operation is an append (a sample, then its done mark a round trip
//! later), and each must cost the idle client next to nothing. One
//! `write(2)` per record puts it in the OS before the report is sent, so a
//! crash of the process loses nothing, and the CRC of each record makes a
//! tail torn by a power loss (or any corrupt record) detectable: reading
//! stops there, warns, and truncates the file to the last good record,
//! after keeping what it cuts (made durable) in
//! `DIR/spool.log.corrupt-<unix ms>` (on a full disk, where that copy
//! cannot be written, the spool opens anyway: the bytes stay where they
//! are and are kept and cut off before the next record; until then writes
//! fail as on any full disk). Numbering then goes on past the last
//! bound reserved and past any seq or bound the cut part still names
//! (whatever the boot): a sample cut away may have been sent. SQLite
//! would give the same guarantees for a transaction (two B-tree updates and
//! a WAL frame) per sample and per acknowledgement, plus a C library in
//! the driver, for no query we need.
//!
//! The log is rewritten (compacted) when it is at least [`COMPACT_AT`]
//! bytes and at most half of it is still pending: a new file with the
//! identity and the pending samples, renamed over the old one. A
//! compaction that fails (a full disk) is tried again after the log has
//! grown by a quarter of [`COMPACT_AT`].
//!
//! # Durability ([`Fsync`], as the server's `--fsync`)
//!
//! Every record is written to the OS before the report goes out, under
//! every policy: a process crash loses nothing. `Always`: each sample is
//! fsynced before its report is sent. `Interval(d)` (the default, 100 ms):
//! a sample is fsynced at once if the last fsync is at least `d` old, else
//! within `d` ([`Spool::poll_timeout`]); a power loss loses at most the
//! last `d` of samples. `Never`: the OS decides. Done marks are never
//! fsynced on their own: losing one to a power loss only means the report
//! is sent again, and the server answers it as a duplicate.
//!
//! Seqs are never reused, even after a power loss took the last samples
//! (whose reports may have reached the server): before a sample whose seq
//! is not yet covered goes out, a Reserve record with a bound
//! [`RESERVE`] seqs ahead and the kernel's boot id is written and fsynced
//! (unless `Never`). A spool opened in the same boot continues right after
//! its last sample (the OS kept every write); one opened after a reboot
//! continues at the bound, leaving a gap rather than risking a reuse.
//!
//! # Lock
//!
//! `DIR/lock` is held with an exclusive `flock` ([`File::try_lock`]) for
//! the spool's life, with the holder's pid in it: a second client on the
//! same directory refuses to start ([`SpoolError::Locked`]).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use quic_report_core::{Sample, Seq};

use crate::sink::Fsync;

/// How long after a failed deferred fsync it is tried again.
const SYNC_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The first bytes of a spool log.
const MAGIC: &[u8; 8] = b"QRSPOOL1";

/// Bytes before the kind: length and CRC.
const HEADER: usize = 8;

/// Largest record we write or accept (a sample is at most the 63 KiB body
/// limit plus its seq and stamp; [`Spool::append`] refuses a larger one).
const MAX_RECORD: usize = 1024 * 1024;

/// Compact the log once it is at least this large (and half of it done).
pub const COMPACT_AT: u64 = 1024 * 1024;

const KIND_IDENTITY: u8 = 1;
const KIND_SAMPLE: u8 = 2;
const KIND_DONE: u8 = 3;
const KIND_RESERVE: u8 = 4;

/// How many seqs one Reserve record covers.
pub const RESERVE: u64 = 1000;

/// Largest seq a spool holds (2^53 - 1, the largest integer every JSON
/// reader keeps exactly). A record that names a larger one is corrupt,
/// however good its CRC: it would make the numbering overflow.
pub const MAX_SEQ: Seq = (1 << 53) - 1;

/// The kernel's id of this boot (empty if unknown: then every open counts
/// as after a reboot).
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Where the spool is and how durable it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolOptions {
    /// The directory (created if missing).
    pub dir: PathBuf,
    /// When to fsync.
    pub fsync: Fsync,
}

/// Why the spool cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Another process holds the lock.
    #[error(
        "spool {dir} is in use by another client{} (one spool per client)",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The holder's pid, if it wrote one.
        pid: Option<u32>,
    },
    /// The log is not ours.
    #[error("{0} is not a quic-report spool (bad magic); move it away")]
    NotASpool(PathBuf),
    /// The spool belongs to another client id than the one configured.
    #[error(
        "spool {} belongs to client {found}, not to the configured client id {configured}: \
         a spool holds one client's id and seqs (use another directory for {configured})",
        dir.display()
    )]
    OtherClient {
        /// The directory.
        dir: PathBuf,
        /// Its client id.
        found: String,
        /// The one asked for.
        configured: String,
    },
    /// A sample too large for one record: it cannot be kept (nothing was
    /// written, and the seq is not used).
    #[error(
        "sample seq {seq} is {bytes} bytes encoded, over the spool's limit of {max} bytes a record: it cannot be kept",
        max = MAX_RECORD
    )]
    TooLarge {
        /// The seq it was to have.
        seq: Seq,
        /// Its record's kind and payload, bytes.
        bytes: usize,
    },
    /// A file operation failed.
    #[error("spool {}: {what}: {source}", path.display())]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// What opening the spool found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Samples still pending (restored).
    pub pending: usize,
    /// Bytes of a torn or corrupt tail that were skipped, and where it began.
    pub skipped: Option<(u64, u64)>,
    /// Whether the skipped bytes look like a record torn at the end of the
    /// file (a write cut short), rather than a corrupt one.
    pub torn: bool,
    /// Where the skipped bytes were kept (`DIR/spool.log.corrupt-<unix
    /// ms>`): nothing that may hold samples is thrown away.
    pub kept: Option<PathBuf>,
    /// Why the skipped bytes could not be kept aside at open (a full
    /// disk): they stay at the end of the log, and are kept aside and cut
    /// off before the next record is written (until then every write
    /// fails with that error, as on a full disk).
    pub kept_later: Option<String>,
    /// Whether the spool was created now.
    pub created: bool,
}

/// The open, locked spool.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// Held for the spool's life.
    _lock: File,
    fsync: Fsync,
    client_id: String,
    next_seq: Seq,
    /// Pending samples: where their record is in the file.
    pending: BTreeMap<Seq, (u64, u32)>,
    /// The samples read at open, until taken.
    restored: Vec<(Seq, Sample)>,
    len: u64,
    /// Where the log must be cut back to before anything more is written:
    /// a failed write left bytes past `len` that the cut right after could
    /// not remove (the log is opened for appending, so the next record
    /// would land after them, and a reopen would read them as a corrupt
    /// record and cut off everything behind it).
    cut_to: Option<u64>,
    /// Skipped bytes still to be kept aside before [`Spool::cut_to`] may
    /// cut them off ([`Recovery::kept_later`]).
    aside: Option<Vec<u8>>,
    pending_bytes: u64,
    /// This boot's id, and the seq bound durably reserved in it.
    boot: String,
    reserved: Seq,
    /// When the first sample since the last fsync was written (`None`:
    /// nothing to fsync). The deferred fsync is due then if no fsync was
    /// ever done (`last_sync` is `None`).
    dirty_since: Option<Instant>,
    last_sync: Option<Instant>,
    /// After a failed deferred fsync, not before this.
    sync_retry_at: Option<Instant>,
    /// After a failed compaction, not before the log is this long.
    compact_at: u64,
    recovery: Recovery,
    buf: Vec<u8>,
}

impl Spool {
    /// Opens (creating if needed) and locks the spool in `opts.dir`, and
    /// reads back what it holds, skipping a torn or corrupt tail (the file
    /// is truncated there; a corrupt part is kept aside first,
    /// [`Recovery::kept`]). `new_id` names the client of a new spool, or
    /// of one whose identity record is corrupt.
    pub fn open(opts: &SpoolOptions, new_id: impl FnOnce() -> String) -> Result<Spool, SpoolError> {
        let dir = opts.dir.clone();
        let io_err = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| SpoolError::Io { what, path, source }
        };
        fs::create_dir_all(&dir).map_err(io_err("creating the directory", &dir))?;
        let lock_path = dir.join("lock");
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err("opening the lock file", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut s = String::new();
                let _ = lock.read_to_string(&mut s);
                return Err(SpoolError::Locked {
                    dir,
                    pid: s.trim().parse().ok(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io_err("locking", &lock_path)(e)),
        }
        // The pid is for the message of a second client; the lock is the
        // flock. On a full disk it may not fit: start anyway.
        if let Err(e) = lock
            .set_len(0)
            .and_then(|()| lock.write_all(format!("{}\n", std::process::id()).as_bytes()))
        {
            log::debug!("cannot write the pid into {}: {e}", lock_path.display());
        }

        let path = dir.join("spool.log");
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        let meta = file
            .metadata()
            .map_err(io_err("reading the metadata of", &path))?;
        if !meta.is_file() {
            return Err(SpoolError::NotASpool(path));
        }
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .map_err(io_err("reading", &path))?;
        let mut spool = Spool {
            dir,
            path,
            file,
            _lock: lock,
            fsync: opts.fsync,
            client_id: String::new(),
            next_seq: 1,
            pending: BTreeMap::new(),
            restored: Vec::new(),
            len: 0,
            cut_to: None,
            aside: None,
            pending_bytes: 0,
            boot: boot_id(),
            reserved: 0,
            dirty_since: None,
            last_sync: None,
            sync_retry_at: None,
            compact_at: COMPACT_AT,
            recovery: Recovery::default(),
            buf: Vec::new(),
        };
        spool.read_back(&data)?;
        if spool.client_id.is_empty() {
            // New (or torn before its identity was complete): start afresh.
            spool.client_id = new_id();
            spool.recovery.created = true;
            spool.rewrite()?;
        }
        Ok(spool)
    }

    /// Parses the log; keeps what is good, truncates what is not.
    fn read_back(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        if data.is_empty() {
            return Ok(());
        }
        if data.len() < MAGIC.len() {
            if MAGIC.starts_with(data) {
                self.recovery.skipped = Some((0, data.len() as u64));
                return Ok(()); // torn while being created
            }
            return Err(SpoolError::NotASpool(self.path.clone()));
        }
        if &data[..MAGIC.len()] != MAGIC {
            return Err(SpoolError::NotASpool(self.path.clone()));
        }
        let mut samples: BTreeMap<Seq, (u64, u32, Sample)> = BTreeMap::new();
        let mut reserve: Option<(Seq, String)> = None;
        let mut at = MAGIC.len();
        while at < data.len() {
            let Some((kind, payload, rec_len)) = record_at(data, at) else {
                break;
            };
            let ok = match kind {
                KIND_IDENTITY => match decode_identity(payload) {
                    Some((id, next)) => {
                        self.client_id = id;
                        self.next_seq = self.next_seq.max(next);
                        true
                    }
                    None => false,
                },
                KIND_SAMPLE => match decode_sample(payload) {
                    Some((seq, sample)) => {
                        self.next_seq = self.next_seq.max(seq.saturating_add(1));
                        let len = u32::try_from(rec_len).unwrap_or(u32::MAX);
                        samples.insert(seq, (at as u64, len, sample));
                        true
                    }
                    None => false,
                },
                KIND_RESERVE => match decode_reserve(payload) {
                    Some(r) => {
                        reserve = Some(r);
                        true
                    }
                    None => false,
                },
                KIND_DONE => match payload.try_into().map(u64::from_le_bytes) {
                    Ok(seq) => {
                        samples.remove(&seq);
                        true
                    }
                    Err(_) => false,
                },
                _ => false,
            };
            if !ok {
                break;
            }
            at += rec_len;
        }
        if at < data.len() {
            let skipped = (data.len() - at) as u64;
            self.recovery.skipped = Some((at as u64, skipped));
            self.recovery.torn = torn_at(data, at);
            // Kept aside, made durable, before the log is cut: nothing
            // that may hold samples is thrown away (a corrupt length can
            // look like a record torn at the end).
            match self.keep_aside(&data[at..]) {
                Ok(kept) => {
                    self.recovery.kept = Some(kept);
                    self.file
                        .set_len(at as u64)
                        .map_err(|source| SpoolError::Io {
                            what: "truncating a torn tail",
                            path: self.path.clone(),
                            source,
                        })?;
                }
                // Without its identity there is nothing to serve from:
                // starting afresh would replace the log.
                Err(e) if self.client_id.is_empty() => return Err(e),
                Err(e) => {
                    // A full disk: the log is served as read up to `at`;
                    // the bytes after it are kept aside and cut off before
                    // the next record, once there is room for them.
                    self.recovery.kept_later = Some(e.to_string());
                    self.aside = Some(data[at..].to_vec());
                    self.cut_to = Some(at as u64);
                }
            }
            // What was cut may hold samples whose reports went out, and
            // Reserve records past the last one read: never number again
            // below anything it names, nor below the last bound read.
            self.next_seq = self.next_seq.max(highest_named(&data[at..]));
            if let Some((bound, _)) = &reserve {
                self.next_seq = self.next_seq.max(*bound);
            }
        }
        self.len = at as u64;
        if let Some((bound, boot)) = reserve
            && (boot != self.boot || boot.is_empty())
        {
            // Rebooted since: samples past the last fsync may be lost, and
            // their reports may have been recorded. Skip their seqs.
            self.next_seq = self.next_seq.max(bound);
        }
        for (seq, (off, len, sample)) in samples {
            self.pending.insert(seq, (off, len));
            self.pending_bytes += u64::from(len);
            self.restored.push((seq, sample));
        }
        self.recovery.pending = self.pending.len();
        Ok(())
    }

    /// Writes `part` to a new `DIR/spool.log.corrupt-<unix ms>[.N]` and
    /// fsyncs it and the directory.
    fn keep_aside(&self, part: &[u8]) -> Result<PathBuf, SpoolError> {
        #[cfg(test)]
        if tests::ASIDE_FAILS.with(|n| n.replace(n.get().saturating_sub(1)) > 0) {
            return Err(SpoolError::Io {
                what: "keeping a corrupt part aside in",
                path: self.dir.clone(),
                source: io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        let mut n = 0u32;
        loop {
            let name = match n {
                0 => format!("spool.log.corrupt-{ms}"),
                _ => format!("spool.log.corrupt-{ms}.{n}"),
            };
            let path = self.dir.join(name);
            let err = |what| {
                let path = path.clone();
                move |source| SpoolError::Io { what, path, source }
            };
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(part)
                        .and_then(|()| f.sync_all())
                        .map_err(err("keeping a corrupt part aside in"))?;
                    File::open(&self.dir)
                        .and_then(|d| d.sync_all())
                        .map_err(err("fsyncing the directory of"))?;
                    return Ok(path);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(err("keeping a corrupt part aside in")(e)),
            }
        }
    }

    /// The `client` id this spool belongs to.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The lowest seq never used by this client.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// What opening found.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The samples read back at open, oldest first (once).
    pub fn take_restored(&mut self) -> Vec<(Seq, Sample)> {
        std::mem::take(&mut self.restored)
    }

    /// Samples pending (written, not done).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Writes `sample` as report `seq`: in the OS when this returns, and
    /// fsynced as the policy says. A sample over the record limit (1 MiB
    /// encoded) is refused with [`SpoolError::TooLarge`] and nothing is
    /// written: a record that large would be read back as corrupt, and the
    /// records after it cut away with it.
    pub fn append(&mut self, now: Instant, seq: Seq, sample: &Sample) -> Result<(), SpoolError> {
        let fields = serde_json::to_vec(&sample.fields).map_err(|e| SpoolError::Io {
            what: "encoding a sample",
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        let mut payload = Vec::with_capacity(16 + fields.len());
        payload.extend_from_slice(&seq.to_le_bytes());
        payload.extend_from_slice(&sample.sampled_at_ms.to_le_bytes());
        payload.extend_from_slice(&fields);
        let bytes = 1 + payload.len(); // the record's kind and payload
        if bytes > MAX_RECORD {
            return Err(SpoolError::TooLarge { seq, bytes });
        }
        if seq == 0 || seq > MAX_SEQ {
            return Err(SpoolError::Io {
                what: "numbering a sample",
                path: self.path.clone(),
                source: io::Error::other(format!("seq {seq} is out of range 1..={MAX_SEQ}")),
            });
        }
        // All or nothing: a sample whose record (or the fsync its policy
        // asks for) failed is cut off again, so the caller can hold its
        // report back and try again later (a full disk).
        let start = self.len;
        let res = self.append_records(now, seq, &payload);
        if res.is_err() {
            if let Some((_, len)) = self.pending.remove(&seq) {
                self.pending_bytes -= u64::from(len);
            }
            if self.len > start {
                // Never sent twice under two seqs: the seq is not used now.
                self.cut_back(start);
            }
        }
        res
    }

    fn append_records(&mut self, now: Instant, seq: Seq, payload: &[u8]) -> Result<(), SpoolError> {
        // A seq not yet durably reserved: reserve more, fsynced with the
        // sample, before its report can go out.
        let reserve = (seq >= self.reserved).then_some(seq.saturating_add(RESERVE));
        if let Some(bound) = reserve {
            let mut r = bound.to_le_bytes().to_vec();
            r.extend_from_slice(self.boot.as_bytes());
            self.write_record(KIND_RESERVE, &r)?;
        }
        let at = self.len;
        let len = self.write_record(KIND_SAMPLE, payload)?;
        self.pending.insert(seq, (at, len));
        self.pending_bytes += u64::from(len);
        self.dirty_since.get_or_insert(now);
        if let Some(bound) = reserve {
            self.sync(now)?;
            self.reserved = bound;
        } else {
            match self.fsync {
                Fsync::Always => self.sync(now)?,
                Fsync::Interval(d)
                    if self
                        .last_sync
                        .is_none_or(|t| t.checked_add(d).is_none_or(|t| t <= now)) =>
                {
                    self.sync(now)?;
                }
                Fsync::Interval(_) | Fsync::Never => {}
            }
        }
        self.next_seq = self.next_seq.max(seq + 1);
        Ok(())
    }

    /// Report `seq` is settled (acknowledged, refused for good, or
    /// dropped): it will not be sent again.
    pub fn remove(&mut self, seq: Seq) -> Result<(), SpoolError> {
        let Some((_, len)) = self.pending.remove(&seq) else {
            return Ok(());
        };
        self.pending_bytes -= u64::from(len);
        self.write_record(KIND_DONE, &seq.to_le_bytes())?;
        if self.len >= self.compact_at && self.pending_bytes <= self.len / 2 {
            // A compaction that failed (a full disk: the new log is written
            // whole before it replaces the old one) is tried again once the
            // log has grown by a quarter of COMPACT_AT, not at every done
            // mark.
            self.compact_at = self.len + COMPACT_AT / 4;
            self.rewrite()?;
            self.compact_at = COMPACT_AT;
        }
        Ok(())
    }

    /// When [`Spool::handle_timeout`] wants to run: a deferred fsync.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.fsync {
            Fsync::Interval(d) => {
                // Never a fresh `Instant::now()`: always later than the
                // loop's `now`, it would never be due and the loop would spin.
                let since = self.dirty_since?;
                let due = self
                    .last_sync
                    .map_or(since, |t| t.checked_add(d).unwrap_or(t));
                Some(self.sync_retry_at.map_or(due, |r| due.max(r)))
            }
            _ => None,
        }
    }

    /// Runs the deferred fsync if it is due.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SpoolError> {
        if self.poll_timeout().is_some_and(|t| t <= now) {
            self.sync(now)?;
        }
        Ok(())
    }

    /// Fsyncs what was written (unless the policy is `Never`).
    pub fn sync(&mut self, now: Instant) -> Result<(), SpoolError> {
        if self.fsync == Fsync::Never || self.dirty_since.is_none() {
            return Ok(());
        }
        if let Err(source) = self.file.sync_data() {
            // Not again before a while: a file system that fails every
            // fsync (remounted read-only, gone) must not make the loop spin.
            self.sync_retry_at = now.checked_add(SYNC_RETRY);
            return Err(SpoolError::Io {
                what: "fsync",
                path: self.path.clone(),
                source,
            });
        }
        self.dirty_since = None;
        self.last_sync = Some(now);
        self.sync_retry_at = None;
        Ok(())
    }

    /// Appends one record with one `write(2)`; on a failure the file is cut
    /// back to where it was. Returns the record's length.
    fn write_record(&mut self, kind: u8, payload: &[u8]) -> Result<u32, SpoolError> {
        if let Some(part) = &self.aside {
            let kept = self.keep_aside(part)?;
            log::warn!(
                "spool {}: the {} byte(s) skipped at open are now kept in {} (not sent)",
                self.dir.display(),
                part.len(),
                kept.display()
            );
            self.recovery.kept = Some(kept);
            self.aside = None;
        }
        if let Some(to) = self.cut_to {
            self.file.set_len(to).map_err(|source| SpoolError::Io {
                what: "cutting off a torn record",
                path: self.path.clone(),
                source,
            })?;
            self.cut_to = None;
        }
        encode_record(&mut self.buf, kind, payload);
        let res = self.file.write_all(&self.buf);
        if let Err(source) = res {
            self.cut_back(self.len);
            return Err(SpoolError::Io {
                what: "writing",
                path: self.path.clone(),
                source,
            });
        }
        let n = self.buf.len();
        self.len += n as u64;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Cuts the log back to `to` bytes; if that fails, before the next
    /// record ([`Spool::cut_to`]).
    fn cut_back(&mut self, to: u64) {
        self.cut_to = match self.file.set_len(to) {
            Ok(()) => None,
            Err(_) => Some(self.cut_to.map_or(to, |c| c.min(to))),
        };
        self.len = to;
    }

    /// Writes a new log (magic, identity, pending samples), fsyncs it
    /// unless the policy is `Never`, and renames it over the old one. On a
    /// failure before the rename (a full disk) the old log stays in use and
    /// the new one is removed.
    fn rewrite(&mut self) -> Result<(), SpoolError> {
        let tmp = self.dir.join("spool.log.new");
        let res = self.write_new_log(&tmp);
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    fn write_new_log(&mut self, tmp: &Path) -> Result<(), SpoolError> {
        let io_err = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| SpoolError::Io { what, path, source }
        };
        // A stale one (a crash mid-rewrite) goes first: the new one is
        // opened for appending, which cannot truncate.
        match fs::remove_file(tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("removing a stale", tmp)(e));
            }
            _ => {}
        }
        // The handle that wrote it is the one appended to from now on: once
        // renamed into place, nothing below can leave `self.file` on the
        // old, unlinked log.
        let f = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(tmp)
            .map_err(io_err("creating", tmp))?;
        // Written through a buffer, a pending record at a time: a spool of
        // many large samples is not copied into memory whole.
        let mut out = io::BufWriter::with_capacity(256 * 1024, &f);
        let mut len = 0u64;
        let put = |out: &mut io::BufWriter<&File>, len: &mut u64, bytes: &[u8]| {
            *len += bytes.len() as u64;
            out.write_all(bytes).map_err(io_err("writing", tmp))
        };
        put(&mut out, &mut len, MAGIC)?;
        let mut identity = Vec::new();
        let id = self.client_id.as_bytes();
        identity.extend_from_slice(&u16::try_from(id.len()).unwrap_or(u16::MAX).to_le_bytes());
        identity.extend_from_slice(&id[..id.len().min(usize::from(u16::MAX))]);
        identity.extend_from_slice(&self.next_seq.to_le_bytes());
        encode_record(&mut self.buf, KIND_IDENTITY, &identity);
        put(&mut out, &mut len, &self.buf)?;
        if self.reserved > 0 {
            let mut reserve = self.reserved.to_le_bytes().to_vec();
            reserve.extend_from_slice(self.boot.as_bytes());
            encode_record(&mut self.buf, KIND_RESERVE, &reserve);
            put(&mut out, &mut len, &self.buf)?;
        }
        let mut moved = BTreeMap::new();
        let mut rec = Vec::new();
        for (&seq, &(off, rec_len)) in &self.pending {
            rec.resize(rec_len as usize, 0);
            self.file
                .read_exact_at(&mut rec, off)
                .map_err(io_err("reading a pending sample", &self.path))?;
            moved.insert(seq, (len, rec_len));
            put(&mut out, &mut len, &rec)?;
        }
        out.flush().map_err(io_err("writing", tmp))?;
        drop(out);
        // Even under `never` (compactions are rare): a rename that reaches
        // the disk before the new log's bytes could leave an empty log
        // after a power loss, where the old one was whole.
        f.sync_all().map_err(io_err("fsync", tmp))?;
        fs::rename(tmp, &self.path).map_err(io_err("renaming into place", tmp))?;
        self.file = f;
        self.len = len;
        self.cut_to = None;
        self.pending = moved;
        self.dirty_since = None;
        if self.fsync != Fsync::Never {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("fsync", &self.dir))?;
        }
        Ok(())
    }
}

/// `buf` := one record of `kind` with `payload`.
fn encode_record(buf: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    buf.clear();
    let len = u32::try_from(1 + payload.len()).unwrap_or(u32::MAX);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    crc.update(payload);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc.finalize().to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(payload);
}

/// The record at `at`: its kind, payload and whole length, if it is
/// complete and its CRC matches.
/// The lowest seq above everything the intact records in `part` name
/// (sample seqs, Reserve bounds, an identity's next seq), found at any
/// offset: `part` is what follows a corrupt record, so record boundaries
/// are not known. Only records that decode as ours count (a CRC, a kind,
/// a payload in range); one that only looks intact (1 in 2^32 per offset
/// for the CRC alone) can only raise the answer, which costs unused seqs,
/// never a reused one.
fn highest_named(part: &[u8]) -> Seq {
    let mut high = 0;
    for at in 0..part.len() {
        let Some((kind, payload, _)) = record_at(part, at) else {
            continue;
        };
        match kind {
            KIND_SAMPLE => {
                if let Some((seq, _)) = decode_sample(payload) {
                    high = high.max(seq.saturating_add(1));
                }
            }
            KIND_RESERVE => {
                if let Some((bound, _)) = decode_reserve(payload) {
                    high = high.max(bound);
                }
            }
            KIND_IDENTITY => {
                if let Some((_, next)) = decode_identity(payload) {
                    high = high.max(next);
                }
            }
            _ => {}
        }
    }
    high.min(MAX_SEQ.saturating_add(1))
}

/// Whether what is at `at` is a record the file ends inside of (a write
/// cut short), rather than a corrupt one.
fn torn_at(data: &[u8], at: usize) -> bool {
    let Some(head) = data.get(at..at + HEADER) else {
        return true;
    };
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    (1..=MAX_RECORD).contains(&len) && at + HEADER + len > data.len()
}

fn record_at(data: &[u8], at: usize) -> Option<(u8, &[u8], usize)> {
    let head = data.get(at..at + HEADER)?;
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().ok()?);
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let body = data.get(at + HEADER..at + HEADER + len)?;
    (crc32fast::hash(body) == crc).then(|| (body[0], &body[1..], HEADER + len))
}

fn decode_identity(p: &[u8]) -> Option<(String, Seq)> {
    let n = usize::from(u16::from_le_bytes(p.get(..2)?.try_into().ok()?));
    let id = std::str::from_utf8(p.get(2..2 + n)?).ok()?;
    let next = u64::from_le_bytes(p.get(2 + n..2 + n + 8)?.try_into().ok()?);
    (!id.is_empty() && next <= MAX_SEQ.saturating_add(1)).then(|| (id.to_owned(), next))
}

fn decode_reserve(p: &[u8]) -> Option<(Seq, String)> {
    let bound = u64::from_le_bytes(p.get(..8)?.try_into().ok()?);
    let boot = std::str::from_utf8(p.get(8..)?).ok()?;
    (bound <= MAX_SEQ.saturating_add(RESERVE)).then(|| (bound, boot.to_owned()))
}

fn decode_sample(p: &[u8]) -> Option<(Seq, Sample)> {
    let seq = u64::from_le_bytes(p.get(..8)?.try_into().ok()?);
    let at = u64::from_le_bytes(p.get(8..16)?.try_into().ok()?);
    let sample = Sample::from_json(p.get(16..)?, at).ok()?;
    (1..=MAX_SEQ).contains(&seq).then_some((seq, sample))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let p = std::env::temp_dir().join(format!(
                "quic-report-spool-{}-{nanos:x}-{name}",
                std::process::id()
            ));
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn opts(dir: &TempDir, fsync: Fsync) -> SpoolOptions {
        SpoolOptions {
            dir: dir.0.clone(),
            fsync,
        }
    }

    fn sample(v: u64) -> Sample {
        Sample::from_json(format!("{{\"value\": {v}}}").as_bytes(), 1000 + v).expect("object")
    }

    /// A sample of about 4 KB (a value and 4,000 bytes of padding).
    fn padded(v: u64) -> Sample {
        let pad = "x".repeat(4000);
        Sample::from_json(
            format!("{{\"value\": {v}, \"pad\": \"{pad}\"}}").as_bytes(),
            v,
        )
        .expect("object")
    }

    fn values(restored: &[(Seq, Sample)]) -> Vec<(Seq, u64, u64)> {
        restored
            .iter()
            .map(|(s, x)| (*s, x.fields["value"].as_u64().unwrap_or(0), x.sampled_at_ms))
            .collect()
    }

    #[test]
    fn pending_samples_and_the_numbering_survive_a_reopen() {
        let dir = TempDir::new("reopen");
        let now = Instant::now();
        {
            let mut s = Spool::open(&opts(&dir, Fsync::Always), || "c0ffee".into()).expect("open");
            assert!(s.recovery().created);
            assert_eq!((s.client_id(), s.next_seq()), ("c0ffee", 1));
            for seq in 1..=4 {
                s.append(now, seq, &sample(seq)).expect("append");
            }
            s.remove(2).expect("done");
            s.remove(4).expect("done");
        }
        let mut s = Spool::open(&opts(&dir, Fsync::Always), || "other".into()).expect("reopen");
        assert!(!s.recovery().created);
        assert_eq!(s.client_id(), "c0ffee");
        assert_eq!(s.next_seq(), 5, "seq 4 was used, even if done");
        assert_eq!(values(&s.take_restored()), [(1, 1, 1001), (3, 3, 1003)]);
        assert_eq!(s.recovery().skipped, None);
    }

    #[test]
    fn a_sample_over_the_record_limit_is_refused_and_the_next_ones_are_kept() {
        let dir = TempDir::new("too-large");
        let now = Instant::now();
        let big = Sample::from_json(
            format!("{{\"value\": 7, \"pad\": \"{}\"}}", "x".repeat(MAX_RECORD)).as_bytes(),
            7,
        )
        .expect("object");
        {
            let mut s = Spool::open(&opts(&dir, Fsync::Always), || "id".into()).expect("open");
            s.append(now, 1, &sample(1)).expect("append");
            let len = fs::metadata(dir.0.join("spool.log")).expect("stat").len();
            match s.append(now, 2, &big) {
                Err(SpoolError::TooLarge { seq: 2, bytes }) => assert!(bytes > MAX_RECORD),
                other => panic!("expected TooLarge, got {other:?}"),
            }
            let after = fs::metadata(dir.0.join("spool.log")).expect("stat").len();
            assert_eq!(after, len, "nothing written");
            // Seq 2 was not used: the next sample takes it.
            s.append(now, 2, &sample(2))
                .expect("append after the refusal");
        }
        let mut s = Spool::open(&opts(&dir, Fsync::Always), || "id".into()).expect("reopen");
        assert_eq!(values(&s.take_restored()), [(1, 1, 1001), (2, 2, 1002)]);
        assert_eq!(s.recovery().skipped, None, "nothing read back as corrupt");
    }

    #[test]
    fn a_torn_write_that_cannot_be_cut_at_once_is_cut_before_the_next_record() {
        let dir = TempDir::new("uncut");
        let now = Instant::now();
        let path = dir.0.join("spool.log");
        {
            let mut s = Spool::open(&opts(&dir, Fsync::Never), || "id".into()).expect("open");
            s.append(now, 1, &sample(1)).expect("append");
            // A write cut short (a full disk) left half a record behind...
            append_torn_record(&path);
            // ... and neither the write nor the cut works for now (a
            // handle that can do neither stands in for the failing disk).
            let good = std::mem::replace(&mut s.file, File::open(&path).expect("read-only"));
            assert!(s.append(now, 2, &sample(2)).is_err());
            s.file = good;
            // The disk works again: the next record cuts the torn bytes
            // off first.
            s.append(now, 2, &sample(2)).expect("append");
            s.append(now, 3, &sample(3)).expect("append");
            s.remove(3).expect("done");
        }
        let mut s = Spool::open(&opts(&dir, Fsync::Never), || "id".into()).expect("reopen");
        assert_eq!(s.recovery().skipped, None, "no torn record mid-log");
        assert_eq!(values(&s.take_restored()), [(1, 1, 1001), (2, 2, 1002)]);
        assert_eq!(s.next_seq(), 4);
    }

    /// Appends the first half of a sample record to the log at `path` (a
    /// write cut short); returns those bytes.
    fn append_torn_record(path: &Path) -> Vec<u8> {
        let mut torn = Vec::new();
        encode_record(&mut torn, KIND_SAMPLE, b"0123456789abcdef{}");
        torn.truncate(torn.len() / 2);
        OpenOptions::new()
            .append(true)
            .open(path)
            .expect("open")
            .write_all(&torn)
            .expect("tear");
        torn
    }

    thread_local! {
        /// How many of this thread's next [`Spool::keep_aside`] calls fail
        /// as on a full disk.
        pub(super) static ASIDE_FAILS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }

    /// A torn tail that cannot be kept aside at open (a full disk) does
    /// not stop the spool: what was read is served, writes fail until the
    /// part can be kept, and then it is kept and cut off first.
    #[test]
    fn a_tail_that_cannot_be_kept_aside_at_open_is_kept_and_cut_before_the_next_record() {
        let dir = TempDir::new("aside");
        let now = Instant::now();
        let path = dir.0.join("spool.log");
        {
            let mut s = Spool::open(&opts(&dir, Fsync::Always), || "id".into()).expect("open");
            s.append(now, 1, &sample(1)).expect("append");
        }
        let tail = append_torn_record(&path);
        let whole = fs::metadata(&path).expect("stat").len();
        ASIDE_FAILS.with(|n| n.set(2));
        let mut s = Spool::open(&opts(&dir, Fsync::Always), || "id".into())
            .expect("opens though the tail cannot be kept aside");
        assert_eq!(values(&s.take_restored()), [(1, 1, 1001)]);
        let r = s.recovery().clone();
        assert!(r.torn && r.kept.is_none(), "{r:?}");
        assert!(r.kept_later.is_some_and(|w| w.contains("No space left")));
        assert_eq!(
            fs::metadata(&path).expect("stat").len(),
            whole,
            "not cut yet"
        );
        // Still no room: the write fails, and the tail is still there.
        assert!(s.append(now, 2, &sample(2)).is_err());
        assert_eq!(fs::metadata(&path).expect("stat").len(), whole);
        // Room again: the tail is kept aside, cut off, and the record follows.
        s.append(now, 2, &sample(2)).expect("append");
        let kept = s.recovery().kept.clone().expect("kept aside now");
        assert_eq!(fs::read(&kept).expect("the kept part"), tail);
        drop(s);
        let mut s = Spool::open(&opts(&dir, Fsync::Always), || "id".into()).expect("reopen");
        assert_eq!(values(&s.take_restored()), [(1, 1, 1001), (2, 2, 1002)]);
        assert_eq!(s.recovery().skipped, None, "nothing left to skip");
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_skipped_and_cut_off() {
        let dir = TempDir::new("torn");
        let now = Instant::now();
        let path = dir.0.join("spool.log");
        {
            let mut s = Spool::open(&opts(&dir, Fsync::Never), || "id".into()).expect("open");
            for seq in 1..=3 {
                s.append(now, seq, &sample(seq)).expect("append");
            }
        }
        let good = fs::read(&path).expect("read");
        // A record cut in the middle (a crash mid-write, a power loss).
        fs::write(&path, &good[..good.len() - 5]).expect("tear");
        {
            let mut s = Spool::open(&opts(&dir, Fsync::Never), || "x".into()).expect("reopen");
            let skipped = s.recovery().skipped.expect("a torn tail");
            assert!(s.recovery().torn);
            assert!(s.recovery().kept.is_some(), "a torn record is kept too");
            assert_eq!(values(&s.take_restored()).len(), 2);
            assert_eq!(skipped.1, good.len() as u64 - 5 - skipped.0);
            // Appending goes on after the last good record.
            s.append(now, 7, &sample(7)).expect("append");
        }
        let mut s = Spool::open(&opts(&dir, Fsync::Never), || "x".into()).expect("reopen");
        assert_eq!(s.recovery().skipped, None, "cut off the first time");
        let seqs: Vec<_> = s.take_restored().into_iter().map(|(q, _)| q).collect();
        assert_eq!(seqs, [1, 2, 7]);
        drop(s);

        // A flipped byte in the last record: its CRC fails.
        let mut bad = fs::read(&path).expect("read");
        let n = bad.len();
        bad[n - 3] ^= 0x55;
        fs::write(&path, &bad).expect("corrupt");
        let mut s = Spool::open(&opts(&dir, Fsync::Never), || "x".into()).expect("reopen");
        let (at, n) = s.recovery().skipped.expect("skipped");
        let kept = s
            .recovery()
            .kept
            .clone()
            .expect("a corrupt record is kept aside");
        assert_eq!(
            fs::read(&kept).expect("the kept part"),
            &bad[at as usize..],
            "the corrupt record, byte for byte"
        );
        assert_eq!(n as usize, bad.len() - at as usize);
        let seqs: Vec<_> = s.take_restored().into_iter().map(|(q, _)| q).collect();
        assert_eq!(seqs, [1, 2]);
        assert!(!s.recovery().torn, "a complete record with a bad CRC");
        assert_eq!(
            s.next_seq(),
            7 + RESERVE,
            "seq 7 may have been sent: numbering goes on past the bound reserved for it"
        );
        assert_eq!(s.client_id(), "id");
    }

    #[test]
    fn a_corrupt_record_mid_log_never_lets_a_seq_after_it_be_used_again() {
        let dir = TempDir::new("midlog");
        let now = Instant::now();
        let path = dir.0.join("spool.log");
        {
            let mut s = Spool::open(&opts(&dir, Fsync::Never), || "id".into()).expect("open");
            for seq in 1..=3 {
                s.append(now, seq, &sample(seq)).expect("append");
            }
        }
        let mut log = fs::read(&path).expect("read");
        let second = {
            // Where sample 2's record starts: after magic, identity,
            // reserve and sample 1 (walk the records).
            let mut at = MAGIC.len();
            let mut found = None;
            while let Some((kind, payload, len)) = record_at(&log, at) {
                if kind == KIND_SAMPLE && payload[..8] == 2u64.to_le_bytes() {
                    found = Some(at);
                }
                at += len;
            }
            found.expect("sample 2")
        };
        // Later records, as a client that went on would have left them: a
        // further reservation and a sample numbered up to it.
        let mut p = (3 * RESERVE).to_le_bytes().to_vec();
        p.extend_from_slice(boot_id().as_bytes());
        let mut rec = Vec::new();
        encode_record(&mut rec, KIND_RESERVE, &p);
        log.extend_from_slice(&rec);
        let mut p = (3 * RESERVE - 7).to_le_bytes().to_vec();
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(br#"{"value":1}"#);
        encode_record(&mut rec, KIND_SAMPLE, &p);
        log.extend_from_slice(&rec);
        // Sample 2's payload changes on the disk.
        log[second + HEADER + 5] ^= 0x40;
        fs::write(&path, &log).expect("corrupt");
        let s = Spool::open(&opts(&dir, Fsync::Never), || "x".into()).expect("reopen");
        assert_eq!(s.client_id(), "id");
        assert!(s.recovery().kept.is_some());
        assert_eq!(
            s.next_seq(),
            3 * RESERVE,
            "past the reservation found in the part kept aside, in the same boot"
        );
    }

    #[test]
    fn a_corrupt_identity_starts_afresh_and_keeps_the_old_log_aside() {
        let dir = TempDir::new("identity");
        let now = Instant::now();
        let path = dir.0.join("spool.log");
        {
            let mut s = Spool::open(&opts(&dir, Fsync::Never), || "old-id".into()).expect("open");
            for seq in 1..=3 {
                s.append(now, seq, &sample(seq)).expect("append");
            }
        }
        let mut bad = fs::read(&path).expect("read");
        // A byte of the identity record's client id (after magic and header).
        bad[MAGIC.len() + HEADER + 4] ^= 0x01;
        fs::write(&path, &bad).expect("corrupt");
        let mut s = Spool::open(&opts(&dir, Fsync::Never), || "new-id".into()).expect("reopen");
        assert!(s.recovery().created);
        assert_eq!(s.client_id(), "new-id");
        assert!(s.take_restored().is_empty());
        assert!(
            s.next_seq() > 3,
            "past the old samples, should the new id be the old one (--client-id)"
        );
        let kept = s.recovery().kept.clone().expect("kept aside");
        assert_eq!(
            fs::read(&kept).expect("the kept part"),
            &bad[MAGIC.len()..],
            "every record of the old log, samples included"
        );
        drop(s);
        let s = Spool::open(&opts(&dir, Fsync::Never), || "other".into()).expect("reopen");
        assert_eq!(s.client_id(), "new-id", "the new identity was written");
        assert!(kept.exists(), "and the kept part stays");
    }

    #[test]
    fn after_a_reboot_numbering_skips_to_the_reserved_bound() {
        let dir = TempDir::new("reboot");
        let now = Instant::now();
        {
            let mut s = Spool::open(&opts(&dir, Fsync::Interval(Duration::from_secs(1))), || {
                "id".into()
            })
            .expect("open");
            s.append(now, 1, &sample(1)).expect("append");
            s.append(now, 2, &sample(2)).expect("append");
        }
        let o = opts(&dir, Fsync::Interval(Duration::from_secs(1)));
        let s = Spool::open(&o, || "x".into()).expect("same boot");
        assert_eq!(s.next_seq(), 3, "same boot: right after the last sample");
        drop(s);
        // The same log, as a later boot sees it: its last Reserve record
        // names an earlier boot.
        let mut log = fs::read(dir.0.join("spool.log")).expect("read");
        let mut p = (1 + RESERVE).to_le_bytes().to_vec();
        p.extend_from_slice(b"an earlier boot");
        let mut rec = Vec::new();
        encode_record(&mut rec, KIND_RESERVE, &p);
        log.extend_from_slice(&rec);
        fs::write(dir.0.join("spool.log"), &log).expect("write");
        let s = Spool::open(&o, || "x".into()).expect("after a reboot");
        assert_eq!(s.next_seq(), 1 + RESERVE);
        assert_eq!(s.pending(), 2);
    }

    /// Opens the spool in `dir` holding exactly `log`: never a panic, and
    /// what it restores is some of `expected` (a prefix of the log was
    /// good). Returns the next seq.
    fn open_holding(dir: &TempDir, log: &[u8], expected: &[Seq]) -> Option<Seq> {
        fs::write(dir.0.join("spool.log"), log).expect("write");
        match Spool::open(&opts(dir, Fsync::Never), || "new".into()) {
            Ok(mut s) => {
                for (seq, _) in s.take_restored() {
                    assert!(expected.contains(&seq), "seq {seq} came from nowhere");
                }
                assert!(s.next_seq() <= MAX_SEQ + 1);
                Some(s.next_seq())
            }
            Err(SpoolError::NotASpool(_)) => None,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn no_corrupt_log_of_any_shape_panics() {
        let dir = TempDir::new("shapes");
        let now = Instant::now();
        {
            let mut s = Spool::open(&opts(&dir, Fsync::Never), || "id".into()).expect("open");
            for seq in 1..=3 {
                s.append(now, seq, &sample(seq)).expect("append");
            }
            s.remove(2).expect("done");
        }
        let good = fs::read(dir.0.join("spool.log")).expect("read");
        // Cut at every byte, and every byte flipped in three ways.
        for cut in 0..good.len() {
            open_holding(&dir, &good[..cut], &[1, 2, 3]);
        }
        for i in 0..good.len() {
            for mask in [0x01, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= mask;
                let opened = open_holding(&dir, &bad, &[1, 2, 3]);
                assert!(opened.is_some() || i < MAGIC.len(), "byte {i} refused");
            }
        }
        // Records whose CRC is good but whose content is not: absurd seqs,
        // lengths and kinds. Each is skipped from there on.
        let absurd: Vec<(u8, Vec<u8>)> = vec![
            (KIND_SAMPLE, {
                let mut p = u64::MAX.to_le_bytes().to_vec();
                p.extend_from_slice(&0u64.to_le_bytes());
                p.extend_from_slice(b"{}");
                p
            }),
            (KIND_SAMPLE, {
                let mut p = 9u64.to_le_bytes().to_vec();
                p.extend_from_slice(&0u64.to_le_bytes());
                p.extend_from_slice(b"[1, 2]");
                p
            }),
            (KIND_SAMPLE, 9u64.to_le_bytes().to_vec()),
            (KIND_IDENTITY, {
                let mut p = 2u16.to_le_bytes().to_vec();
                p.extend_from_slice(b"id");
                p.extend_from_slice(&u64::MAX.to_le_bytes());
                p
            }),
            (KIND_IDENTITY, u16::MAX.to_le_bytes().to_vec()),
            (KIND_RESERVE, {
                let mut p = u64::MAX.to_le_bytes().to_vec();
                p.extend_from_slice(b"another boot");
                p
            }),
            (KIND_RESERVE, vec![0xff; 12]),
            (KIND_DONE, vec![1, 2, 3]),
            (99, vec![]),
        ];
        for (kind, payload) in absurd {
            let mut log = good.clone();
            let mut rec = Vec::new();
            encode_record(&mut rec, kind, &payload);
            log.extend_from_slice(&rec);
            let next = open_holding(&dir, &log, &[1, 3]);
            // Skipped from there on; numbering goes on past the bound the
            // log reserved (what was skipped may have been sent), and no
            // further: an absurd record does not count.
            assert_eq!(next, Some(1 + RESERVE), "kind {kind} {payload:?}: skipped");
        }
        // A length field past the largest record, or zero.
        for len in [0u32, u32::MAX, MAX_RECORD as u32 + 1] {
            let mut log = good.clone();
            log.extend_from_slice(&len.to_le_bytes());
            log.extend_from_slice(&[0; 64]);
            assert_eq!(open_holding(&dir, &log, &[1, 3]), Some(1 + RESERVE));
        }
        // Not a file at all.
        fs::remove_file(dir.0.join("spool.log")).expect("rm");
        fs::create_dir(dir.0.join("spool.log")).expect("mkdir");
        let e = Spool::open(&opts(&dir, Fsync::Never), || "x".into()).expect_err("a directory");
        assert!(
            matches!(e, SpoolError::Io { .. } | SpoolError::NotASpool(_)),
            "{e}"
        );
    }

    #[test]
    fn a_foreign_file_is_refused_not_overwritten() {
        let dir = TempDir::new("foreign");
        fs::create_dir_all(&dir.0).expect("mkdir");
        fs::write(dir.0.join("spool.log"), b"hello, world\n").expect("write");
        let e = Spool::open(&opts(&dir, Fsync::Never), || "x".into()).expect_err("refused");
        assert!(matches!(e, SpoolError::NotASpool(_)), "{e}");
        assert_eq!(
            fs::read(dir.0.join("spool.log")).expect("read"),
            b"hello, world\n"
        );
    }

    #[test]
    fn a_second_spool_on_the_same_directory_is_refused() {
        let dir = TempDir::new("lock");
        let _first = Spool::open(&opts(&dir, Fsync::Never), || "x".into()).expect("open");
        let e = Spool::open(&opts(&dir, Fsync::Never), || "y".into()).expect_err("locked");
        match e {
            SpoolError::Locked { pid, .. } => assert_eq!(pid, Some(std::process::id())),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn the_log_is_compacted_and_keeps_what_is_pending() {
        let dir = TempDir::new("compact");
        let now = Instant::now();
        let path = dir.0.join("spool.log");
        {
            let mut s = Spool::open(&opts(&dir, Fsync::Never), || "id".into()).expect("open");
            s.append(now, 1, &padded(1)).expect("append");
            for seq in 2..=600 {
                s.append(now, seq, &padded(seq)).expect("append");
                s.remove(seq).expect("done");
            }
            assert!(
                fs::metadata(&path).expect("stat").len() < COMPACT_AT + 10_000,
                "compacted"
            );
        }
        let mut s = Spool::open(&opts(&dir, Fsync::Never), || "x".into()).expect("reopen");
        let restored = s.take_restored();
        assert_eq!(restored.len(), 1);
        assert_eq!(restored[0].0, 1);
        assert_eq!(
            restored[0].1.fields["pad"].as_str().map(str::len),
            Some(4000)
        );
        assert_eq!(s.next_seq(), 601);
    }

    #[test]
    fn a_compaction_that_fails_is_not_tried_again_at_every_done_mark() {
        let dir = TempDir::new("compact-fails");
        let now = Instant::now();
        // The new log cannot be created: a directory holds its name.
        let mut s = Spool::open(&opts(&dir, Fsync::Never), || "id".into()).expect("open");
        let blocker = dir.0.join("spool.log.new");
        fs::create_dir(&blocker).expect("mkdir");
        let mut failed = Vec::new();
        for seq in 1..=400 {
            s.append(now, seq, &padded(seq)).expect("append");
            if s.remove(seq).is_err() {
                failed.push(seq);
            }
        }
        // About 1 MiB at seq 250, then every 256 KiB: three attempts, not
        // one per done mark past the first.
        assert_eq!(failed.len(), 3, "{failed:?}");
        assert!(failed.windows(2).all(|w| w[1] - w[0] > 60), "{failed:?}");
        let path = dir.0.join("spool.log");
        assert!(fs::metadata(&path).expect("stat").len() > COMPACT_AT);
        fs::remove_dir(&blocker).expect("rmdir");
        for seq in 401..=500 {
            s.append(now, seq, &padded(seq)).expect("append");
            s.remove(seq).expect("done, and compacted once possible");
        }
        assert!(
            fs::metadata(&path).expect("stat").len() < COMPACT_AT,
            "compacted"
        );
        drop(s);
        let s = Spool::open(&opts(&dir, Fsync::Never), || "x".into()).expect("reopen");
        assert_eq!((s.client_id(), s.next_seq(), s.pending()), ("id", 501, 0));
    }

    #[test]
    fn interval_fsync_is_deferred_within_the_interval() {
        let dir = TempDir::new("interval");
        let t0 = Instant::now();
        let d = Duration::from_millis(100);
        let mut s = Spool::open(&opts(&dir, Fsync::Interval(d)), || "id".into()).expect("open");
        s.append(t0, 1, &sample(1)).expect("append");
        assert_eq!(s.poll_timeout(), None, "first sample: fsynced at once");
        s.append(t0 + Duration::from_millis(10), 2, &sample(2))
            .expect("append");
        assert_eq!(s.poll_timeout(), Some(t0 + d), "within the interval");
        s.remove(1).expect("done");
        s.handle_timeout(t0 + d).expect("sync");
        assert_eq!(s.poll_timeout(), None);
        s.remove(2).expect("done");
        assert_eq!(s.poll_timeout(), None, "a done mark alone needs no fsync");
    }

    /// Samples written, and no fsync ever done (the first one failed, e.g.
    /// on a dying disk): the deferred fsync is due from the first write on,
    /// at a fixed time. (It was a fresh `Instant::now()` at every call,
    /// always later than the loop's `now`: never due, and the loop woke
    /// again at once, about a thousand times a second.)
    #[test]
    fn a_deferred_fsync_with_none_done_yet_is_due_at_a_fixed_time() {
        let dir = TempDir::new("never-synced");
        let t0 = Instant::now();
        let d = Duration::from_millis(100);
        let mut s = Spool::open(&opts(&dir, Fsync::Interval(d)), || "id".into()).expect("open");
        s.append(t0, 1, &sample(1)).expect("append");
        // As after a failed first fsync whose retry time has passed.
        s.dirty_since = Some(t0);
        s.last_sync = None;
        s.sync_retry_at = None;
        let later = t0 + Duration::from_millis(1);
        assert_eq!(s.poll_timeout(), Some(t0));
        assert_eq!(s.poll_timeout(), Some(t0), "the same at every call");
        s.handle_timeout(later).expect("sync");
        assert_eq!(s.poll_timeout(), None, "done: fsynced");
    }
}
