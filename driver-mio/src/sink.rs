//! Where the server records reports.
//!
//! - [`ReportSink`]: the trait the server loop writes through. A report is
//!   acknowledged only after [`ReportSink::record`] and then
//!   [`ReportSink::flush`] succeeded; if either fails the report is answered
//!   `not_recorded` and the client keeps it and sends it again.
//! - [`WriterSink`]: JSON lines to any `io::Write` (stdout).
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

/// Where recorded reports go. A report is acknowledged only after
/// [`ReportSink::record`] and [`ReportSink::flush`] both succeeded.
pub trait ReportSink {
    /// Writes one report.
    fn record(&mut self, report: &Report) -> io::Result<()>;

    /// Writes one report whose JSON line (`report.to_json_line()`) the
    /// caller already made; sinks that write lines use it rather than
    /// serialising the report again.
    fn record_line(&mut self, report: &Report, line: &[u8]) -> io::Result<()> {
        let _ = line;
        self.record(report)
    }

    /// Makes what was recorded since the last flush as durable as the sink
    /// promises before an acknowledgement. On an error none of those
    /// reports counts as recorded (the sink undoes them if it can).
    fn flush(&mut self) -> io::Result<()> {
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

/// Any `FnMut(&Report) -> io::Result<()>` is a sink (handy in tests).
impl<F: FnMut(&Report) -> io::Result<()>> ReportSink for F {
    fn record(&mut self, report: &Report) -> io::Result<()> {
        self(report)
    }
}

/// A sink writing each report as one JSON line ([`Report::to_json_line`]).
#[derive(Debug)]
pub struct WriterSink<W: Write> {
    writer: W,
}

impl<W: Write> WriterSink<W> {
    /// Writes to `writer` (e.g. stdout, a file).
    pub fn new(writer: W) -> WriterSink<W> {
        WriterSink { writer }
    }

    /// The writer back.
    pub fn into_inner(self) -> W {
        self.writer
    }
}

impl<W: Write> ReportSink for WriterSink<W> {
    fn record(&mut self, report: &Report) -> io::Result<()> {
        self.writer.write_all(&report.to_json_line())
    }

    fn record_line(&mut self, _report: &Report, line: &[u8]) -> io::Result<()> {
        self.writer.write_all(line)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
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
    /// of every line (see [`RecordedKeys::read`]).
    pub fn read_recorded(&mut self) -> io::Result<RecordedKeys> {
        self.file.seek(SeekFrom::Start(0))?;
        // Appends go to the end whatever the read position.
        RecordedKeys::read(BufReader::new(&self.file))
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

    fn flush(&mut self) -> io::Result<()> {
        if self.committed == self.written {
            return Ok(());
        }
        if self.fsync == Fsync::Always {
            if let Err(e) = self.file.sync_data() {
                let len = self.committed;
                self.truncate(len);
                return Err(io::Error::new(e.kind(), format!("fsync: {e}")));
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
/// of consecutive seqs, whatever the length of the file.
#[derive(Clone)]
pub struct RecordedKeys {
    /// By `(identity, client)`, least recently seen first.
    clients: LruCache<(String, String), SeqSet>,
    keys: u64,
    lines: u64,
    without_key: u64,
    unparseable: u64,
    first_unparseable: Option<u64>,
}

impl Default for RecordedKeys {
    fn default() -> RecordedKeys {
        RecordedKeys {
            clients: LruCache::new_unbounded(),
            keys: 0,
            lines: 0,
            without_key: 0,
            unparseable: 0,
            first_unparseable: None,
        }
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
        #[derive(serde::Deserialize)]
        struct Key {
            client: Option<serde_json::Value>,
            seq: Option<serde_json::Value>,
            identity: Option<serde_json::Value>,
        }
        let mut keys = RecordedKeys::new();
        let mut reader = reader;
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            keys.lines += 1;
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
        let key = (identity.to_owned(), client.to_owned());
        match self.clients.get_mut(&key) {
            Some(seqs) => {
                seqs.insert(seq);
            }
            None => {
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
        let keys = sink.read_recorded().expect("reads");
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
