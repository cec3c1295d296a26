//! [`DriverError`]: why a driver loop could not start or stopped with a
//! failure. Each variant's `Display` is a short sentence a user can act on.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use quic_report_core::{ConfigError, DisconnectReason};

/// A driver could not start, or stopped on a failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The UDP socket could not be bound (or connected) to the address.
    #[error("cannot bind UDP socket to {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The core refused its configuration (unreadable certificate, bad limit).
    #[error("configuration error: {0}")]
    Config(#[from] ConfigError),
    /// An option given to the driver is unusable (e.g. a zero interval).
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The client stopped for good: retrying cannot help (e.g. the server's
    /// certificate was refused).
    #[error("client failed: {0}")]
    ClientFailed(DisconnectReason),
    /// A file the driver needs could not be read.
    #[error("cannot read {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The server refused a read (`get`): the identity may not read it.
    #[error("the server refused the read ({code}): {error}")]
    ReadRefused {
        /// The answer's code (`forbidden`).
        code: String,
        /// The server's reason.
        error: String,
    },
    /// The database sink cannot be used (e.g. its schema is newer than
    /// this build understands).
    #[error("database: {0}")]
    Database(String),
    /// The client's spool cannot be used (locked by another client,
    /// unreadable, not a spool).
    #[error("{0}")]
    Spool(#[from] crate::spool::SpoolError),
    /// An I/O operation the loop needs failed.
    #[error("{what}: {source}")]
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
