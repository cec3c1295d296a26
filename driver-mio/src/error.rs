//! [`DriverError`]: why a driver loop could not start or stopped with a
//! failure. Each variant's `Display` is a short sentence a user can act on.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use quic_report_core::{ConfigError, DisconnectReason};

/// A driver could not start, or stopped on a failure.
#[derive(Debug)]
#[non_exhaustive]
pub enum DriverError {
    /// The UDP socket could not be bound (or connected) to the address.
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The core refused its configuration (unreadable certificate, bad limit).
    Config(ConfigError),
    /// An option given to the driver is unusable (e.g. a zero interval).
    InvalidOption(String),
    /// The client stopped for good: retrying cannot help (e.g. the server's
    /// certificate was refused).
    ClientFailed(DisconnectReason),
    /// A file the driver needs could not be read.
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The server refused a read (`get`): the identity may not read it.
    ReadRefused {
        /// The answer's code (`forbidden`).
        code: String,
        /// The server's reason.
        error: String,
    },
    /// The database sink cannot be used (e.g. its schema is newer than
    /// this build understands).
    Database(String),
    /// The client's spool cannot be used (locked by another client,
    /// unreadable, not a spool).
    Spool(crate::spool::SpoolError),
    /// An I/O operation the loop needs failed.
    Io {
        /// What the driver was doing.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl DriverError {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> DriverError {
        move |source| DriverError::Io { what, source }
    }
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverError::Bind { addr, source } => {
                write!(f, "cannot bind UDP socket to {addr}: {source}")
            }
            DriverError::Config(e) => write!(f, "configuration error: {e}"),
            DriverError::InvalidOption(why) => write!(f, "invalid option: {why}"),
            DriverError::ClientFailed(reason) => write!(f, "client failed: {reason}"),
            DriverError::File { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            DriverError::Spool(e) => write!(f, "{e}"),
            DriverError::Io { what, source } => write!(f, "{what}: {source}"),
            DriverError::ReadRefused { code, error } => {
                write!(f, "the server refused the read ({code}): {error}")
            }
            DriverError::Database(why) => write!(f, "database: {why}"),
        }
    }
}

impl std::error::Error for DriverError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DriverError::Bind { source, .. }
            | DriverError::File { source, .. }
            | DriverError::Io { source, .. } => Some(source),
            DriverError::Config(e) => Some(e),
            DriverError::Spool(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ConfigError> for DriverError {
    fn from(e: ConfigError) -> DriverError {
        DriverError::Config(e)
    }
}

impl From<crate::spool::SpoolError> for DriverError {
    fn from(e: crate::spool::SpoolError) -> DriverError {
        DriverError::Spool(e)
    }
}
