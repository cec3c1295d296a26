//! Every error the core returns, one small enum per boundary, each with a
//! `Display` that reads as a short lowercase sentence.
//!
//! Errors are bad input or an environment the core cannot use; they never
//! mean a broken invariant (those panic with an `expect` that says why).

use std::fmt;

/// Building a [`crate::Client`] or [`crate::Server`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// quiche refused a setting (e.g. an unreadable certificate file).
    Quiche {
        /// What was being configured.
        what: &'static str,
        /// quiche's error.
        err: quiche::Error,
    },
    /// A certificate, key or CA file could not be loaded.
    File {
        /// Which file it is ("CA file", "private key", ...).
        what: &'static str,
        /// Its path.
        path: std::path::PathBuf,
        /// quiche's (BoringSSL's) error.
        err: quiche::Error,
    },
    /// A value is out of range; the string says which and why.
    Invalid(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Quiche { what, err } => write!(f, "{what}: {err}"),
            ConfigError::File { what, path, err } => write!(
                f,
                "cannot load the {what} {}: missing, unreadable or not PEM ({err})",
                path.display()
            ),
            ConfigError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A datagram the core could not use. The datagram is dropped and the state
/// of every connection is as it was; the caller may log it and carry on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DatagramError {
    /// The QUIC header could not be parsed.
    BadHeader,
    /// A long header of a version we do not speak (answered with Version
    /// Negotiation when it was large enough to be a client's Initial).
    UnsupportedVersion(u32),
    /// A packet for a connection we do not know, that cannot open one.
    UnknownConnection,
    /// A client Initial smaller than the 1200 bytes RFC 9000 requires.
    InitialTooSmall(usize),
    /// The server is at its connection limit.
    TooManyConnections,
    /// The packet came from an address this endpoint does not talk to.
    UnexpectedPeer,
    /// quiche rejected the packet (undecryptable, malformed frames, ...).
    Quic(quiche::Error),
    /// The datagram arrived while there is no connection to give it to.
    NoConnection,
    /// A client Initial carried an address-validation token we cannot
    /// accept (not ours, for another address, or expired). No connection is
    /// created and nothing is sent.
    InvalidToken(TokenError),
    /// A client Initial we or quiche could not use (a destination
    /// connection ID under 8 bytes, undecryptable, or nothing in it was
    /// processed). No connection is created and nothing is sent.
    InvalidInitial,
}

impl fmt::Display for DatagramError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatagramError::BadHeader => f.write_str("bad QUIC header"),
            DatagramError::UnsupportedVersion(v) => write!(f, "unsupported QUIC version {v:#x}"),
            DatagramError::UnknownConnection => f.write_str("packet for an unknown connection"),
            DatagramError::InitialTooSmall(n) => {
                write!(f, "client Initial of {n} bytes (at least 1200 required)")
            }
            DatagramError::TooManyConnections => f.write_str("connection limit reached"),
            DatagramError::UnexpectedPeer => f.write_str("datagram from an unexpected peer"),
            DatagramError::Quic(e) => write!(f, "quic: {e}"),
            DatagramError::NoConnection => f.write_str("no connection to receive it"),
            DatagramError::InvalidToken(e) => write!(f, "invalid retry token: {e}"),
            DatagramError::InvalidInitial => f.write_str("client Initial could not be used"),
        }
    }
}

impl std::error::Error for DatagramError {}

/// Why a Retry token was refused (see [`crate::token::RetryTokens`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// Not in our token format (wrong length or version byte).
    Malformed,
    /// The tag does not match: not minted by this server process, or for
    /// another client address, port or connection ID, or altered.
    Forged,
    /// Ours and intact, but past its expiry.
    Expired,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenError::Malformed => "malformed token",
            TokenError::Forged => "token not issued by this server for this address",
            TokenError::Expired => "token expired",
        })
    }
}

impl std::error::Error for TokenError {}

/// [`crate::Server::respond`] could not deliver the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RespondError {
    /// The handle does not name a report waiting for an answer (answered
    /// already, or never issued).
    UnknownReport,
    /// The report's connection or stream is gone; the client will send the
    /// report again on a new connection.
    ConnectionGone,
}

impl fmt::Display for RespondError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RespondError::UnknownReport => f.write_str("no report waits under that handle"),
            RespondError::ConnectionGone => {
                f.write_str("the report's connection or stream is gone")
            }
        }
    }
}

impl std::error::Error for RespondError {}

/// What was wrong with the bytes on a report stream, as the server tells the
/// client in `{"ok":false,"code":..,"error":..}`.
///
/// [`StreamError::is_fatal`] errors end the stream: the server answers, FINs
/// its side, and reads nothing more (a JSON syntax error cannot be
/// resynchronised). The others reject one object and the stream carries on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamError {
    /// The stream ended (FIN) before any byte other than whitespace.
    Empty,
    /// The bytes of an object are not UTF-8.
    NotUtf8,
    /// The bytes are not JSON (RFC 8259); the string is serde_json's reason.
    InvalidJson(String),
    /// Valid JSON, but not an object; the string names what it was
    /// (`"array"`, `"number"`, ...).
    NotAnObject(&'static str),
    /// The stream ended (FIN) in the middle of a JSON value.
    Truncated,
    /// One object is larger than the limit (bytes).
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A field the protocol defines has the wrong type (not fatal).
    InvalidField {
        /// The field's name.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// The report's own `identity` field names another identity than the
    /// connection's (or appears more than once): refused with code
    /// `forbidden`, permanent; the stream carries on (not fatal).
    Forbidden {
        /// What the report claimed (shortened).
        claimed: String,
        /// The connection's identity.
        identity: crate::identity::Identity,
    },
}

impl StreamError {
    /// Whether this error ends the stream (everything except
    /// [`StreamError::InvalidField`] and [`StreamError::Forbidden`]).
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            StreamError::InvalidField { .. } | StreamError::Forbidden { .. }
        )
    }

    /// The machine-readable code sent in the error response's `"code"`.
    pub fn code(&self) -> &'static str {
        match self {
            StreamError::Empty => "empty",
            StreamError::NotUtf8 => "not_utf8",
            StreamError::InvalidJson(_) => "invalid_json",
            StreamError::NotAnObject(_) => "not_object",
            StreamError::Truncated => "truncated",
            StreamError::TooLarge { .. } => "too_large",
            StreamError::InvalidField { .. } => "invalid_field",
            StreamError::Forbidden { .. } => crate::report::CODE_FORBIDDEN,
        }
    }
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Empty => f.write_str("empty stream: no JSON object before FIN"),
            StreamError::NotUtf8 => f.write_str("report is not UTF-8"),
            StreamError::InvalidJson(why) => write!(f, "report is not JSON: {why}"),
            StreamError::NotAnObject(kind) => {
                write!(f, "report must be a JSON object, got {kind}")
            }
            StreamError::Truncated => f.write_str("stream ended inside a JSON value"),
            StreamError::TooLarge { limit } => {
                write!(f, "report larger than the limit of {limit} bytes")
            }
            StreamError::InvalidField { field, expected } => {
                write!(f, "field \"{field}\" must be {expected}")
            }
            StreamError::Forbidden { claimed, identity } if identity.is_anonymous() => write!(
                f,
                "forbidden: the report claims identity {claimed:?}, but this connection has no client certificate (anonymous)"
            ),
            StreamError::Forbidden { claimed, identity } => write!(
                f,
                "forbidden: the report claims identity {claimed:?}, but this connection is authenticated as {identity}"
            ),
        }
    }
}

impl std::error::Error for StreamError {}
