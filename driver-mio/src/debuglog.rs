//! The debugging hooks people expect from a QUIC program, as quiche's own
//! apps have them, from the environment:
//!
//! - `SSLKEYLOGFILE=path`: TLS secrets of every connection, appended in
//!   NSS key-log format, so Wireshark can decrypt a capture;
//! - `QLOGDIR=dir`: one qlog file per connection (JSON-SEQ),
//!   `dir/<trace id>-<client|server>.sqlog`.
//!
//! [`from_env`] builds the core's [`DebugLogs`] hook when either is set.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use quic_report_core::{DebugLogs, LogWriter};

/// The environment variable naming the key-log file.
pub const SSLKEYLOGFILE: &str = "SSLKEYLOGFILE";
/// The environment variable naming the qlog directory.
pub const QLOGDIR: &str = "QLOGDIR";

/// Key log and qlog destinations (cheap to clone: one per connection, all
/// writing to the same key-log file).
#[derive(Debug, Clone)]
pub struct EnvDebugLogs {
    keylog: Option<SharedFile>,
    qlog_dir: Option<PathBuf>,
}

/// One file written by every connection (lines stay whole: each write is
/// one key-log line, under the lock).
#[derive(Debug, Clone)]
struct SharedFile(Arc<Mutex<File>>);

impl Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut f = self
            .0
            .lock()
            .map_err(|_| io::Error::other("key-log lock poisoned"))?;
        f.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("key-log lock poisoned"))?
            .flush()
    }
}

/// The hooks `SSLKEYLOGFILE` and `QLOGDIR` ask for, or `None` when neither
/// is set. A file or directory that cannot be opened is an error naming it.
pub fn from_env() -> io::Result<Option<Box<dyn DebugLogs>>> {
    Ok(EnvDebugLogs::from_env()?.map(|l| Box::new(l) as Box<dyn DebugLogs>))
}

impl EnvDebugLogs {
    /// As [`from_env`], for a program that makes many connections (clone
    /// it for each).
    pub fn from_env() -> io::Result<Option<EnvDebugLogs>> {
        env_logs()
    }
}

fn env_logs() -> io::Result<Option<EnvDebugLogs>> {
    let keylog = match std::env::var_os(SSLKEYLOGFILE).filter(|v| !v.is_empty()) {
        Some(path) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("{SSLKEYLOGFILE}={}: {e}", PathBuf::from(&path).display()),
                    )
                })?;
            log::warn!(
                "{SSLKEYLOGFILE}: writing TLS secrets to {} (anyone with it can decrypt the traffic)",
                PathBuf::from(&path).display()
            );
            Some(SharedFile(Arc::new(Mutex::new(f))))
        }
        None => None,
    };
    let qlog_dir = match std::env::var_os(QLOGDIR).filter(|v| !v.is_empty()) {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir).map_err(|e| {
                io::Error::new(e.kind(), format!("{QLOGDIR}={}: {e}", dir.display()))
            })?;
            log::info!("{QLOGDIR}: one qlog per connection in {}", dir.display());
            Some(dir)
        }
        None => None,
    };
    if keylog.is_none() && qlog_dir.is_none() {
        return Ok(None);
    }
    Ok(Some(EnvDebugLogs { keylog, qlog_dir }))
}

impl DebugLogs for EnvDebugLogs {
    fn keylog(&mut self) -> Option<LogWriter> {
        self.keylog.clone().map(|f| Box::new(f) as LogWriter)
    }

    fn qlog(&mut self, trace_id: &str, is_server: bool) -> Option<LogWriter> {
        let dir = self.qlog_dir.as_ref()?;
        let role = if is_server { "server" } else { "client" };
        let path = dir.join(format!("{trace_id}-{role}.sqlog"));
        match File::create(&path) {
            Ok(f) => Some(Box::new(io::BufWriter::new(f))),
            Err(e) => {
                log::warn!("qlog {}: {e}", path.display());
                None
            }
        }
    }
}
