//! Where the server records reports.
//!
//! - [`ReportSink`]: the trait the server loop writes through; its doc is
//!   the contract between the loop and a sink (when a report is
//!   acknowledged, and what a sink must not leave behind for a report
//!   answered `not_recorded`).
//! - [`WriterSink`]: JSON lines to any unbuffered `io::Write` (stdout's
//!   descriptor), each batch written at its flush.
//! - [`FileSink`]: JSON lines appended to a file, with an [`Fsync`] policy,
//!   and undone (truncated away) when a write or an fsync fails, so a report
//!   answered `not_recorded` is not in the file either.
//! - [`RecordedKeys`]: the `(identity, client, seq)` keys of a file written before,
//!   read back at start ([`FileSink::read_recorded`]) and handed to the core
//!   ([`crate::ServerOptions::recorded`]), so a report recorded by a previous
//!   process whose acknowledgement was lost is answered `duplicate`.
//!
//! - [`SinkUrl`]: `--sink URL`, which of them (or which database, see
//!   [`crate::database`]) a server records into.
//!
//! The server loop records every report of one batch (one turn of the
//! loop), then flushes once, then answers them: under [`Fsync::Always`]
//! that is one fsync per batch, not per report.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hashlink::LruCache;
use quic_report_core::dedup::DedupConfig;
use quic_report_core::{Identity, RecordKey, Report, SeqSet, Server};

/// A `--sink URL`: where a server records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkUrl {
    /// `-`: JSON lines on stdout.
    Stdout,
    /// `file:PATH`: JSON lines appended to PATH ([`FileSink`]).
    File(PathBuf),
    /// `sqlite:PATH`: an embedded SQLite database.
    Sqlite(PathBuf),
    /// `postgres://...` or `postgresql://...`: a PostgreSQL server.
    Postgres(String),
}

impl std::str::FromStr for SinkUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<SinkUrl, String> {
        let path = |p: &str, scheme: &str| {
            if p.is_empty() {
                Err(format!("{s:?}: expected {scheme}:PATH"))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        if s == "-" {
            Ok(SinkUrl::Stdout)
        } else if let Some(p) = s.strip_prefix("file:") {
            path(p, "file").map(SinkUrl::File)
        } else if let Some(p) = s.strip_prefix("sqlite:") {
            path(p, "sqlite").map(SinkUrl::Sqlite)
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(SinkUrl::Postgres(s.to_owned()))
        } else {
            Err(format!(
                "{:?}: expected -, file:PATH, sqlite:PATH or postgres://USER@HOST:PORT/DB",
                crate::redact::password(s)
            ))
        }
    }
}

/// Where recorded reports go.
///
/// **The contract.** The server loop records each report of a batch
/// ([`ReportSink::record_line`]), then, if any record succeeded, calls
/// [`ReportSink::flush`] once, then answers every report of the batch. A
/// report is answered `recorded` only if its record succeeded and the flush
/// kept it: every one on `Ok`, the first [`FlushError::kept`] of them (in
/// the order recorded) on an error. Every other report is answered
/// `not_recorded`, and the client keeps it and sends it again; so a sink
/// must not let such a report reach its output later (that would be a
/// duplicate of its resend): it undoes it if it can, and its docs say
/// what it cannot undo.
pub trait ReportSink {
    /// Writes one report (or fails: that report is answered
    /// `not_recorded`).
    fn record(&mut self, report: &Report) -> io::Result<()>;

    /// Writes one report whose JSON line (`report.to_json_line()`) the
    /// caller already made; sinks that write lines use it rather than
    /// serialising the report again.
    fn record_line(&mut self, report: &Report, line: &[u8]) -> io::Result<()> {
        let _ = line;
        self.record(report)
    }

    /// Makes what was recorded since the last flush as durable as the sink
    /// promises before an acknowledgement. On an error, only the first
    /// [`FlushError::kept`] of those reports count as recorded.
    fn flush(&mut self) -> Result<(), FlushError> {
        Ok(())
    }

    /// When the sink wants [`ReportSink::sync`] called (deferred durability
    /// work such as a periodic fsync); `None`: not now.
    fn sync_deadline(&self) -> Option<Instant> {
        None
    }

    /// Does the deferred work. Called when [`ReportSink::sync_deadline`]
    /// passed, and once when the loop ends. Reports acknowledged before are
    /// not affected by an error, which the loop logs.
    fn sync(&mut self, now: Instant) -> io::Result<()> {
        let _ = now;
        Ok(())
    }
}

/// A failed [`ReportSink::flush`]: the error, and how many of the reports
/// recorded since the previous flush (the first ones, in the order
/// recorded) were made as durable as the sink promises before it.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct FlushError {
    /// Reports kept: answered `recorded`. The others are answered
    /// `not_recorded`.
    pub kept: usize,
    /// What failed (said to the clients of the reports not kept).
    pub error: io::Error,
}

/// None of the reports was kept.
impl From<io::Error> for FlushError {
    fn from(error: io::Error) -> FlushError {
        FlushError { kept: 0, error }
    }
}

/// Records one batch as the contract says ([`ReportSink`]): each report,
/// then one flush if any record succeeded. Per report, in order: `Ok` if it
/// is recorded (to be acknowledged), else why not (to be answered
/// `not_recorded`).
pub fn record_batch<'r>(
    sink: &mut dyn ReportSink,
    reports: impl IntoIterator<Item = (&'r Report, &'r [u8])>,
) -> Vec<Result<(), String>> {
    let mut answers: Vec<Result<(), String>> = reports
        .into_iter()
        .map(|(report, line)| sink.record_line(report, line).map_err(|e| e.to_string()))
        .collect();
    if answers.iter().any(Result::is_ok)
        && let Err(e) = sink.flush()
    {
        let why = e.to_string();
        for answer in answers.iter_mut().filter(|a| a.is_ok()).skip(e.kept) {
            *answer = Err(why.clone());
        }
    }
    answers
}

/// Any `FnMut(&Report) -> io::Result<()>` is a sink (handy in tests).
impl<F: FnMut(&Report) -> io::Result<()>> ReportSink for F {
    fn record(&mut self, report: &Report) -> io::Result<()> {
        self(report)
    }
}

/// A sink writing each report as one JSON line ([`Report::to_json_line`])
/// to a writer (the server's stdout).
///
/// - It owns the lines of the batch being recorded: they are gathered here
///   and written at [`ReportSink::flush`], straight to the writer, so no
///   buffer holds bytes of a batch after its answers. The writer must not
///   buffer either (a `File`, such as a duplicate of stdout's descriptor;
///   not `io::Stdout` or a `BufWriter`): bytes a buffering writer keeps
///   after an error reach the output later, after their reports were
///   answered `not_recorded`, and then once more with their resend.
/// - When a write fails, the lines written whole before it are kept
///   ([`FlushError::kept`]); the rest of the batch is dropped (answered
///   `not_recorded`, sent again).
/// - A write that stopped in the middle of a line (a disk filling up)
///   leaves a prefix of it in the output, which cannot be taken back from a
///   pipe: the next write starts with a `\n`, so that the torn prefix is a
///   line of its own. A consumer sees one line that is not JSON, for a
///   report that was answered `not_recorded` and comes again whole later
///   ([`RecordedKeys::read`] skips such lines; a [`FileSink`] truncates
///   them away instead). A failed `flush` of the writer itself counts as
///   such a stop (nothing kept; the next write starts with `\n`, perhaps
///   making a blank line).
pub struct WriterSink<W: Write> {
    writer: W,
    /// The lines recorded since the last flush, one after another.
    pending: Vec<u8>,
    /// Where each of those lines ends in `pending`.
    ends: Vec<usize>,
    /// The output may end in a torn line: a `\n` goes first.
    torn: bool,
}

impl<W: Write> fmt::Debug for WriterSink<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriterSink")
            .field("pending_lines", &self.ends.len())
            .field("torn", &self.torn)
            .finish_non_exhaustive()
    }
}

/// What [`WriterSink`] keeps between batches of at most this many bytes
/// (a larger batch's buffer is given back).
const KEEP_PENDING: usize = 1 << 20;

impl<W: Write> WriterSink<W> {
    /// Writes to `writer`, which should not buffer (see [`WriterSink`]).
    pub fn new(writer: W) -> WriterSink<W> {
        WriterSink {
            writer,
            pending: Vec::new(),
            ends: Vec::new(),
            torn: false,
        }
    }

    /// The writer back; lines recorded since the last flush (never
    /// acknowledged) are dropped.
    pub fn into_inner(self) -> W {
        self.writer
    }

    /// Writes the pending lines, then flushes the writer.
    fn write_pending(&mut self) -> Result<(), FlushError> {
        if self.torn {
            write_counting(&mut self.writer, b"\n").map_err(|(_, e)| FlushError::from(e))?;
            self.torn = false;
        }
        if let Err((done, error)) = write_counting(&mut self.writer, &self.pending) {
            let kept = self.ends.partition_point(|&end| end <= done);
            let whole = if kept == 0 { 0 } else { self.ends[kept - 1] };
            self.torn = done > whole;
            return Err(FlushError { kept, error });
        }
        self.writer.flush().map_err(|e| {
            self.torn = true;
            FlushError::from(e)
        })
    }
}

/// `write_all`, saying on an error how many bytes were written before it.
fn write_counting(writer: &mut impl Write, buf: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < buf.len() {
        match writer.write(&buf[done..]) {
            Ok(0) => {
                return Err((
                    done,
                    io::Error::new(io::ErrorKind::WriteZero, "the output took no more bytes"),
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

impl<W: Write> ReportSink for WriterSink<W> {
    fn record(&mut self, report: &Report) -> io::Result<()> {
        self.record_line(report, &report.to_json_line())
    }

    /// Gathers the line; written at the flush.
    fn record_line(&mut self, _report: &Report, line: &[u8]) -> io::Result<()> {
        self.pending.extend_from_slice(line);
        self.ends.push(self.pending.len());
        Ok(())
    }

    fn flush(&mut self) -> Result<(), FlushError> {
        let result = if self.ends.is_empty() {
            Ok(())
        } else {
            self.write_pending()
        };
        self.pending.clear();
        self.ends.clear();
        self.pending.shrink_to(KEEP_PENDING);
        result
    }
}

/// The default period of [`Fsync::Interval`].
pub const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_millis(100);

/// When a [`FileSink`] calls fsync. Under every policy a report is written
/// to the OS (one `write(2)`, no user-space buffer) before it is
/// acknowledged, so it survives a crash of the server process. The SQLite
/// sink takes the same policies for its commits
/// ([`crate::database::sqlite::SqliteConnect::set_fsync`], where a zero
/// interval means `Always`; a file refuses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Before every acknowledgement (once per batch of reports): an
    /// acknowledged report survives a power loss.
    Always,
    /// At most once per period, and within one period of a write, after the
    /// acknowledgement: a power loss may lose the last period's reports.
    Interval(Duration),
    /// Never: the OS writes the file back when it likes.
    Never,
}

impl fmt::Display for Fsync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fsync::Always => f.write_str("fsync before every acknowledgement"),
            Fsync::Interval(d) => write!(f, "fsync at most every {d:?}"),
            Fsync::Never => f.write_str("no fsync"),
        }
    }
}

/// Appends reports to a file as JSON lines.
///
/// - The file is opened in append mode (created if missing) and locked
///   (`flock`, exclusive): a second server on the same file is refused,
///   since two writers would break the duplicate filter.
/// - A file that does not end with `\n` (a line torn by a crash) gets one,
///   so the next record starts on its own line; the torn line is kept and
///   skipped by [`FileSink::read_recorded`].
/// - A failed write or fsync truncates the file back to where it was before
///   the reports that are answered `not_recorded`. If even that fails,
///   every later record fails until the truncation succeeds, so the file
///   never holds a report the client was told to send again.
pub struct FileSink {
    file: File,
    path: PathBuf,
    fsync: Fsync,
    /// End of the last record written whole.
    written: u64,
    /// End of the records flushed (acknowledged or about to be).
    committed: u64,
    /// A truncation that failed and must succeed before the next write.
    repair: Option<u64>,
    /// Written but not fsynced.
    unsynced: bool,
    last_sync: Instant,
}

impl fmt::Debug for FileSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSink")
            .field("path", &self.path)
            .field("fsync", &self.fsync)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl FileSink {
    /// Opens (or creates) `path` for appending, locks it, and ends a torn
    /// last line. Errors name the file.
    pub fn open(path: &Path, fsync: Fsync) -> io::Result<FileSink> {
        if let Fsync::Interval(d) = fsync
            && d.is_zero()
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the fsync interval must not be zero",
            ));
        }
        let existed = path.exists();
        let annotate = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(annotate)?;
        lock(&file).map_err(annotate)?;
        let mut len = file.metadata().map_err(annotate)?.len();
        if len > 0 && file.metadata().map_err(annotate)?.is_file() {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1)).map_err(annotate)?;
            file.read_exact(&mut last).map_err(annotate)?;
            if last[0] != b'\n' {
                log::warn!(
                    "{} ends in a partial line (a crash during a write?): it is kept, and new records start on the next line",
                    path.display()
                );
                file.write_all(b"\n").map_err(annotate)?;
                len += 1;
            }
        }
        if !existed
            && fsync != Fsync::Never
            && let Some(dir) = path.parent()
        {
            // Make the new file's directory entry durable too.
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
                log::warn!("cannot fsync directory {}: {e}", dir.display());
            }
        }
        Ok(FileSink {
            file,
            path: path.to_owned(),
            fsync,
            written: len,
            committed: len,
            repair: None,
            unsynced: false,
            last_sync: Instant::now(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The policy.
    pub fn fsync(&self) -> Fsync {
        self.fsync
    }

    /// Reads the file from the start and collects the `(identity, client, seq)` key
    /// of every line (see [`RecordedKeys::read`]), within the duplicate
    /// memory's `limits`.
    pub fn read_recorded(&mut self, limits: DedupConfig) -> io::Result<RecordedKeys> {
        self.file.seek(SeekFrom::Start(0))?;
        // Appends go to the end whatever the read position.
        RecordedKeys::read_within(BufReader::new(&self.file), limits)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", self.path.display())))
    }

    /// Truncates the file to `len`, or remembers to try again.
    fn truncate(&mut self, len: u64) {
        match self.file.set_len(len) {
            Ok(()) => {
                self.repair = None;
                self.written = len;
                self.committed = self.committed.min(len);
            }
            Err(e) => {
                log::error!(
                    "cannot truncate {} back to {len} bytes after a failed write: {e}; \
                     refusing to record until it can",
                    self.path.display()
                );
                self.repair = Some(len);
            }
        }
    }
}

impl ReportSink for FileSink {
    fn record(&mut self, report: &Report) -> io::Result<()> {
        self.record_line(report, &report.to_json_line())
    }

    fn record_line(&mut self, _report: &Report, line: &[u8]) -> io::Result<()> {
        if let Some(len) = self.repair {
            self.truncate(len);
            if self.repair.is_some() {
                // Said to the client: no path.
                return Err(io::Error::other(
                    "the output file holds a partial write that cannot be removed",
                ));
            }
        }
        match self.file.write_all(line) {
            Ok(()) => {
                self.written += line.len() as u64;
                self.unsynced = true;
                Ok(())
            }
            Err(e) => {
                let len = self.written;
                self.truncate(len);
                Err(e)
            }
        }
    }

    /// Nothing is kept on an error: the fsync covers the whole batch, and
    /// the file is truncated back to before it.
    fn flush(&mut self) -> Result<(), FlushError> {
        if self.committed == self.written {
            return Ok(());
        }
        if self.fsync == Fsync::Always {
            if let Err(e) = self.file.sync_data() {
                let len = self.committed;
                self.truncate(len);
                return Err(io::Error::new(e.kind(), format!("fsync: {e}")).into());
            }
            self.unsynced = false;
            self.last_sync = Instant::now();
        }
        self.committed = self.written;
        Ok(())
    }

    fn sync_deadline(&self) -> Option<Instant> {
        match self.fsync {
            Fsync::Interval(d) if self.unsynced => Some(self.last_sync + d),
            _ => None,
        }
    }

    fn sync(&mut self, now: Instant) -> io::Result<()> {
        if !self.unsynced || self.fsync == Fsync::Never {
            return Ok(());
        }
        // On an error, try again one period later, not at once.
        self.last_sync = now;
        self.file.sync_data().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "fsync of {}: {e}; reports acknowledged since the last fsync may not survive a power loss",
                    self.path.display()
                ),
            )
        })?;
        self.unsynced = false;
        Ok(())
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        if let Err(e) = self.sync(Instant::now()) {
            log::error!("{e}");
        }
    }
}

/// Takes an exclusive lock on `file` (`flock` on Linux, released when the
/// file is closed), failing at once if it is held.
fn lock(file: &File) -> io::Result<()> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "locked by another process (is another server writing to it?)",
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The `(identity, client, seq)` keys of the reports recorded in a file,
/// with what reading it found. Memory: a few words per client and per run
/// of consecutive seqs, whatever the length of the file, and no more
/// clients and runs than the server's duplicate memory can take
/// ([`RecordedKeys::with_limits`]): past them the least recently seen
/// client, and a client's oldest run, are forgotten here as the core would
/// forget them.
#[derive(Clone)]
pub struct RecordedKeys {
    /// By `(identity, client)`, least recently seen first.
    clients: LruCache<(String, String), SeqSet>,
    limits: DedupConfig,
    keys: u64,
    lines: u64,
    without_key: u64,
    unparseable: u64,
    first_unparseable: Option<u64>,
}

impl Default for RecordedKeys {
    fn default() -> RecordedKeys {
        RecordedKeys::with_limits(DedupConfig::default())
    }
}

/// The longest line [`RecordedKeys::read`] looks at: a report at the
/// largest size the server takes (64 KiB by default) and its identity fit
/// many times over; a longer line (not one the server wrote) is skipped as
/// unparseable, without being held.
const MAX_LINE: usize = 4 << 20;

impl RecordedKeys {
    /// No keys, held within the duplicate memory's `limits`.
    pub fn with_limits(limits: DedupConfig) -> RecordedKeys {
        RecordedKeys {
            clients: LruCache::new_unbounded(),
            limits,
            keys: 0,
            lines: 0,
            without_key: 0,
            unparseable: 0,
            first_unparseable: None,
        }
    }

    /// Clients the duplicate memory holds at most.
    fn max_clients(&self) -> usize {
        let l = &self.limits;
        l.max_identities
            .saturating_mul(l.clients_per_identity)
            .saturating_add(l.anonymous_clients)
    }
}

impl fmt::Debug for RecordedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordedKeys")
            .field("keys", &self.keys)
            .field("clients", &self.clients.len())
            .field("lines", &self.lines)
            .field("unparseable", &self.unparseable)
            .finish()
    }
}

impl RecordedKeys {
    /// No keys.
    pub fn new() -> RecordedKeys {
        RecordedKeys::default()
    }

    /// Reads JSON lines: every line that is a JSON object with a string
    /// `client` and an unsigned `seq` gives a key, under its string
    /// `identity` (a line without one, written before identities existed,
    /// is the anonymous identity's `""`). Blank lines are ignored;
    /// objects without both fields are counted in
    /// [`RecordedKeys::without_key`]; lines that are not JSON objects (a
    /// line torn by a crash) are skipped and counted in
    /// [`RecordedKeys::unparseable`]. Only I/O errors fail.
    pub fn read(reader: impl BufRead) -> io::Result<RecordedKeys> {
        RecordedKeys::read_within(reader, DedupConfig::default())
    }

    /// [`RecordedKeys::read`], held within `limits` (those of the server
    /// the keys are for).
    pub fn read_within(reader: impl BufRead, limits: DedupConfig) -> io::Result<RecordedKeys> {
        #[derive(serde::Deserialize)]
        struct Key {
            client: Option<serde_json::Value>,
            seq: Option<serde_json::Value>,
            identity: Option<serde_json::Value>,
        }
        let mut keys = RecordedKeys::with_limits(limits);
        let mut reader = reader;
        let mut line = Vec::new();
        loop {
            line.clear();
            let Some(whole) = read_line_within(&mut reader, &mut line, MAX_LINE)? else {
                break;
            };
            keys.lines += 1;
            if !whole {
                keys.unparseable += 1;
                keys.first_unparseable.get_or_insert(keys.lines);
                continue;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Key>(&line) {
                Ok(Key {
                    client: Some(serde_json::Value::String(client)),
                    seq: Some(seq),
                    identity,
                }) if seq.is_u64() && identity.as_ref().is_none_or(|i| i.is_string()) => {
                    let identity = identity.as_ref().and_then(|i| i.as_str()).unwrap_or("");
                    keys.insert(identity, &client, seq.as_u64().unwrap_or_default());
                }
                Ok(_) => keys.without_key += 1,
                Err(_) => {
                    keys.unparseable += 1;
                    keys.first_unparseable.get_or_insert(keys.lines);
                }
            }
        }
        Ok(keys)
    }

    /// Adds a key (`identity` `""`: the anonymous identity).
    pub fn insert(&mut self, identity: &str, client: &str, seq: u64) {
        self.keys += 1;
        let max_runs = if identity.is_empty() {
            self.limits.anonymous_per_client
        } else {
            self.limits.per_client
        };
        let key = (identity.to_owned(), client.to_owned());
        match self.clients.get_mut(&key) {
            Some(seqs) => {
                seqs.insert(seq);
                while seqs.runs_len() > max_runs.max(1)
                    && let Some(first) = seqs.first()
                {
                    seqs.remove_run_at(first);
                }
            }
            None => {
                if self.clients.len() >= self.max_clients() {
                    self.clients.remove_lru();
                }
                self.clients.insert(key, std::iter::once(seq).collect());
            }
        }
    }

    /// Keys added (a key seen twice counts twice).
    pub fn len(&self) -> u64 {
        self.keys
    }

    /// No keys.
    pub fn is_empty(&self) -> bool {
        self.keys == 0
    }

    /// Distinct `(identity, client)` pairs.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Lines read (by [`RecordedKeys::read`]).
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// JSON objects without both `client` and `seq` (never deduplicated).
    pub fn without_key(&self) -> u64 {
        self.without_key
    }

    /// Lines that were not JSON objects, skipped.
    pub fn unparseable(&self) -> u64 {
        self.unparseable
    }

    /// The 1-based number of the first unparseable line.
    pub fn first_unparseable_line(&self) -> Option<u64> {
        self.first_unparseable
    }

    /// Marks every key recorded in `server`, least recently seen client
    /// first (the core forgets the least recently active clients first
    /// when it holds too many).
    pub fn mark_recorded(self, server: &mut Server) {
        for ((identity, client), seqs) in self.clients {
            let mut key = RecordKey {
                identity: Identity::from_stored(&identity),
                client,
                seq: 0,
            };
            for seq in seqs.iter() {
                key.seq = seq;
                server.mark_recorded(&key);
            }
        }
    }
}

/// Reads one line (up to and with its `\n`) into `line`, holding at most
/// `max` bytes of it: `None` at the end of the input, `Some(false)` for a
/// line longer than `max` (read to its end and dropped).
fn read_line_within(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    max: usize,
) -> io::Result<Option<bool>> {
    let mut any = false;
    let mut whole = true;
    loop {
        let (done, used) = {
            let buf = reader.fill_buf()?;
            if buf.is_empty() {
                break;
            }
            any = true;
            let (part, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..=i], true),
                None => (buf, false),
            };
            if whole && line.len() + part.len() <= max {
                line.extend_from_slice(part);
            } else {
                whole = false;
                line.clear();
            }
            (done, part.len())
        };
        reader.consume(used);
        if done {
            break;
        }
    }
    Ok(any.then_some(whole))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(client: &str, seq: u64) -> Report {
        let v = serde_json::json!({ "value": 0.5, "client": client, "seq": seq });
        let serde_json::Value::Object(map) = v else {
            unreachable!()
        };
        Report::from_object(map).expect("a valid report")
    }

    fn temp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "quic-report-sink-{}-{name}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = std::fs::remove_file(&p);
        p
    }

    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Records `reports` as one batch (as the server loop does): whether
    /// each is recorded.
    fn batch(sink: &mut dyn ReportSink, reports: &[&Report]) -> Vec<bool> {
        let lines: Vec<Vec<u8>> = reports.iter().map(|r| r.to_json_line()).collect();
        record_batch(
            sink,
            reports.iter().copied().zip(lines.iter().map(Vec::as_slice)),
        )
        .iter()
        .map(Result::is_ok)
        .collect()
    }

    /// An output that takes `room` more bytes, then fails with ENOSPC (a
    /// disk filling up), until `room` is raised.
    struct Room {
        out: Vec<u8>,
        room: std::rc::Rc<std::cell::Cell<usize>>,
    }

    impl Room {
        fn new(room: usize) -> (Room, std::rc::Rc<std::cell::Cell<usize>>) {
            let room = std::rc::Rc::new(std::cell::Cell::new(room));
            let out = Room {
                out: Vec::new(),
                room: std::rc::Rc::clone(&room),
            };
            (out, room)
        }
    }

    impl Write for Room {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.room.get());
            if n == 0 && !buf.is_empty() {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.room.set(self.room.get() - n);
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The output's lines.
    fn lines_of(sink: WriterSink<Room>) -> Vec<String> {
        let out = sink.into_inner().out;
        let text = String::from_utf8(out).expect("utf-8");
        text.lines().map(str::to_owned).collect()
    }

    /// `report`'s line, without its newline.
    fn line(report: &Report) -> String {
        let line = String::from_utf8(report.to_json_line()).expect("utf-8");
        line.trim_end().to_owned()
    }

    #[test]
    fn a_report_answered_not_recorded_is_in_the_output_once_after_its_resend() {
        let (out, room) = Room::new(0);
        let mut sink = WriterSink::new(out);
        let (a, b) = (report("x", 1), report("x", 2));
        assert_eq!(batch(&mut sink, &[&a, &b]), [false, false], "disk full");
        room.set(usize::MAX);
        assert_eq!(batch(&mut sink, &[&a, &b]), [true, true], "room again");
        assert_eq!(lines_of(sink), [line(&a), line(&b)], "each line once");
    }

    #[test]
    fn lines_written_whole_before_a_failure_are_recorded_and_the_rest_resent() {
        let (a, b, c) = (report("x", 1), report("x", 2), report("x", 3));
        // Room for a's line and half of b's.
        let (out, room) = Room::new(a.to_json_line().len() + 10);
        let mut sink = WriterSink::new(out);
        assert_eq!(batch(&mut sink, &[&a, &b, &c]), [true, false, false]);
        room.set(usize::MAX);
        assert_eq!(batch(&mut sink, &[&b, &c]), [true, true], "the resend");
        let lines = lines_of(sink);
        // b's torn prefix is a line of its own, then b and c whole.
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0], line(&a));
        assert!(line(&b).starts_with(&lines[1]) && lines[1].len() == 10);
        assert_eq!(lines[2..], [line(&b), line(&c)]);
    }

    #[test]
    fn a_torn_report_is_not_glued_to_the_next_acknowledged_one() {
        let (out, room) = Room::new(10_000);
        let mut sink = WriterSink::new(out);
        let mut big = serde_json::Map::new();
        big.insert("client".into(), "x".into());
        big.insert("seq".into(), 1.into());
        big.insert("pad".into(), "p".repeat(20_000).into());
        let big = Report::from_object(big).expect("report");
        assert_eq!(batch(&mut sink, &[&big]), [false], "disk full");
        room.set(usize::MAX);
        let next = report("y", 1);
        assert_eq!(batch(&mut sink, &[&next]), [true], "recorded");
        let lines = lines_of(sink);
        assert_eq!(lines.len(), 2, "{} lines", lines.len());
        // The torn prefix: one unparseable line of a not_recorded report.
        assert_eq!(lines[0].len(), 10_000);
        assert!(serde_json::from_str::<serde_json::Value>(&lines[0]).is_err());
        assert_eq!(lines[1], line(&next), "the acknowledged report, whole");
    }

    #[test]
    fn a_failed_newline_before_a_batch_fails_the_whole_batch() {
        let (out, room) = Room::new(5);
        let mut sink = WriterSink::new(out);
        let a = report("x", 1);
        assert_eq!(batch(&mut sink, &[&a]), [false], "torn after 5 bytes");
        assert_eq!(batch(&mut sink, &[&a]), [false], "still full: no newline");
        room.set(usize::MAX);
        assert_eq!(batch(&mut sink, &[&a]), [true]);
        let lines = lines_of(sink);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[1], line(&a));
    }

    #[test]
    fn sink_urls() {
        let p = |s: &str| s.parse::<SinkUrl>();
        assert_eq!(p("-"), Ok(SinkUrl::Stdout));
        assert_eq!(p("file:/tmp/x"), Ok(SinkUrl::File("/tmp/x".into())));
        assert_eq!(p("sqlite:r.db"), Ok(SinkUrl::Sqlite("r.db".into())));
        assert_eq!(
            p("postgresql://u@h/db"),
            Ok(SinkUrl::Postgres("postgresql://u@h/db".into()))
        );
        assert!(p("sqlite:").is_err());
        assert!(p("mysql://h").expect_err("unknown").contains("expected"));
    }

    /// From review: the keys read back from a file were held without
    /// bound before the core's limits applied (a file filled by anonymous
    /// peers each inventing client ids made a restart take gigabytes), and
    /// a line was read whole however long. Now no more clients and runs
    /// than the duplicate memory takes are held (the least recently seen
    /// client and a client's oldest runs go first), and a line past
    /// `MAX_LINE` is skipped as unparseable without being held.
    #[test]
    fn keys_read_back_are_held_within_the_duplicate_memory() {
        let limits = DedupConfig {
            max_identities: 2,
            clients_per_identity: 2,
            anonymous_clients: 3,
            per_client: 4,
            anonymous_per_client: 2,
        };
        let mut text = String::new();
        for c in 0..10 {
            text.push_str(&format!("{{\"client\":\"c{c}\",\"seq\":1}}\n"));
        }
        for seq in (1..40).step_by(2) {
            text.push_str(&format!(
                "{{\"client\":\"d\",\"seq\":{seq},\"identity\":\"dev\"}}\n"
            ));
        }
        text.push_str(&format!("{{\"pad\":\"{}\"}}\n", "x".repeat(MAX_LINE)));
        text.push_str("{\"client\":\"c9\",\"seq\":2}\n");
        let k = RecordedKeys::read_within(text.as_bytes(), limits).expect("reads");
        // 2 x 2 + 3 clients at most: the oldest anonymous ones went.
        assert_eq!(k.clients(), 7);
        assert!(k.clients.peek(&(String::new(), "c0".into())).is_none());
        let c9 = k.clients.peek(&(String::new(), "c9".into())).expect("c9");
        assert_eq!(c9.runs().collect::<Vec<_>>(), [(1, 2)]);
        // 4 runs at most, the newest.
        let d = k.clients.peek(&("dev".into(), "d".into())).expect("d");
        assert_eq!(
            d.runs().collect::<Vec<_>>(),
            [(33, 33), (35, 35), (37, 37), (39, 39)]
        );
        assert_eq!(k.unparseable(), 1);
        assert_eq!(k.first_unparseable_line(), Some(31));
        assert_eq!(k.lines(), 32);
    }

    #[test]
    fn reads_keys_and_skips_torn_lines() {
        let text = "{\"client\":\"a\",\"seq\":1}\n\
                    {\"client\":\"a\",\"seq\":2,\"value\":1}\n\
                    \n\
                    {\"value\":3}\n\
                    {\"client\":\"b\",\"seq\":7}\n\
                    {\"client\":\"a\",\"seq\":-1}\n\
                    {\"client\":\"a\",\"se";
        let k = RecordedKeys::read(text.as_bytes()).expect("reads");
        assert_eq!(k.len(), 3);
        assert_eq!(k.clients(), 2);
        assert_eq!(k.lines(), 7);
        assert_eq!(k.without_key(), 2);
        assert_eq!(k.unparseable(), 1);
        assert_eq!(k.first_unparseable_line(), Some(7));
        let a = k.clients.peek(&(String::new(), "a".into())).expect("a");
        assert_eq!(a.runs().collect::<Vec<_>>(), [(1, 2)]);
    }

    #[test]
    fn runs_stay_compact() {
        let mut k = RecordedKeys::new();
        for s in (1..=1000).chain([2000, 2001, 5]) {
            k.insert("", "c", s);
        }
        // Keys added, a repeat included; the set holds each once.
        assert_eq!(k.len(), 1003);
        let c = k.clients.peek(&(String::new(), "c".into())).expect("c");
        assert_eq!(c.runs().collect::<Vec<_>>(), [(1, 1000), (2000, 2001)]);
    }

    #[test]
    fn file_sink_appends_ends_torn_lines_and_reads_back() {
        let path = temp("append");
        let _rm = Rm(path.clone());
        std::fs::write(
            &path,
            "{\"client\":\"x\",\"seq\":1}\n{\"client\":\"x\",\"se",
        )
        .expect("write");
        let mut sink = FileSink::open(&path, Fsync::Always).expect("opens");
        sink.record(&report("x", 2)).expect("records");
        sink.record(&report("x", 3)).expect("records");
        sink.flush().expect("flushes");
        assert_eq!(sink.sync_deadline(), None, "fsynced already");
        let keys = sink.read_recorded(DedupConfig::default()).expect("reads");
        assert_eq!((keys.len(), keys.unparseable()), (3, 1));
        drop(sink);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(text.ends_with("\"seq\":3}\n"), "{text}");
    }

    #[test]
    fn interval_asks_for_a_sync_within_the_period() {
        let path = temp("interval");
        let _rm = Rm(path.clone());
        let mut sink =
            FileSink::open(&path, Fsync::Interval(Duration::from_millis(100))).expect("opens");
        assert_eq!(sink.sync_deadline(), None);
        let before = Instant::now();
        sink.record(&report("x", 1)).expect("records");
        sink.flush().expect("flushes");
        let due = sink.sync_deadline().expect("a sync is due");
        assert!(due <= Instant::now() + Duration::from_millis(100));
        assert!(due >= before);
        sink.sync(Instant::now()).expect("syncs");
        assert_eq!(sink.sync_deadline(), None);
    }

    #[test]
    fn a_second_sink_on_the_same_file_is_refused() {
        let path = temp("lock");
        let _rm = Rm(path.clone());
        let _first = FileSink::open(&path, Fsync::Never).expect("opens");
        let e = FileSink::open(&path, Fsync::Never).expect_err("locked");
        assert!(e.to_string().contains("another"), "{e}");
    }

    #[test]
    fn a_full_disk_fails_the_record() {
        let path = Path::new("/dev/full");
        if !path.exists() {
            return;
        }
        let mut sink = FileSink::open(path, Fsync::Never).expect("opens /dev/full");
        let e = sink.record(&report("x", 1)).expect_err("no space");
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    }
}
