//! Every error the core returns, one small enum per boundary, each with a
//! `Display` that reads as a short lowercase sentence.
//!
//! Errors are bad input or an environment the core cannot use; they never
//! mean a broken invariant (those panic with an `expect` that says why).

/// Building a [`crate::Client`] or [`crate::Server`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// quiche refused a setting (e.g. an unreadable certificate file).
    #[error("{what}: {err}")]
    Quiche {
        /// What was being configured.
        what: &'static str,
        /// quiche's error.
        err: quiche::Error,
    },
    /// A certificate, key or CA file could not be loaded.
    #[error("cannot load the {what} {}: missing, unreadable or not PEM ({err})", path.display())]
    File {
        /// Which file it is ("CA file", "private key", ...).
        what: &'static str,
        /// Its path.
        path: std::path::PathBuf,
        /// quiche's (BoringSSL's) error.
        err: quiche::Error,
    },
    /// A value is out of range; the string says which and why.
    #[error("{0}")]
    Invalid(String),
}

/// A datagram the core could not use. The datagram is dropped and the state
/// of every connection is as it was; the caller may log it and carry on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DatagramError {
    /// The QUIC header could not be parsed.
    #[error("bad QUIC header")]
    BadHeader,
    /// A long header of a version we do not speak (answered with Version
    /// Negotiation when it was large enough to be a client's Initial).
    #[error("unsupported QUIC version {0:#x}")]
    UnsupportedVersion(u32),
    /// A packet for a connection we do not know, that cannot open one.
    #[error("packet for an unknown connection")]
    UnknownConnection,
    /// A client Initial smaller than the 1200 bytes RFC 9000 requires.
    #[error("client Initial of {0} bytes (at least 1200 required)")]
    InitialTooSmall(usize),
    /// The server is at its connection limit.
    #[error("connection limit reached")]
    TooManyConnections,
    /// The client's origin has `MAX_HANDSHAKES_FROM` handshakes in
    /// progress.
    #[error("too many handshakes in progress from this address")]
    TooManyHandshakes,
    /// The packet came from an address this endpoint does not talk to.
    #[error("datagram from an unexpected peer")]
    UnexpectedPeer,
    /// quiche rejected the packet (undecryptable, malformed frames, ...).
    #[error("quic: {0}")]
    Quic(quiche::Error),
    /// The datagram arrived while there is no connection to give it to.
    #[error("no connection to receive it")]
    NoConnection,
    /// A client Initial carried an address-validation token we cannot
    /// accept (not ours, for another address, or expired). No connection is
    /// created and nothing is sent.
    #[error("invalid retry token: {0}")]
    InvalidToken(TokenError),
    /// A client Initial we or quiche could not use (a destination
    /// connection ID under 8 bytes, undecryptable, or nothing in it was
    /// processed). No connection is created and nothing is sent.
    #[error("client Initial could not be used")]
    InvalidInitial,
}

/// Why a Retry token was refused (see [`crate::token::RetryTokens`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not in our token format (wrong length or version byte).
    #[error("malformed token")]
    Malformed,
    /// The tag does not match: not minted by this server process, or for
    /// another client address, port or connection ID, or altered.
    #[error("token not issued by this server for this address")]
    Forged,
    /// Ours and intact, but past its expiry.
    #[error("token expired")]
    Expired,
}

/// [`crate::Server::respond`] could not deliver the answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RespondError {
    /// The handle does not name a report waiting for an answer (answered
    /// already, or never issued).
    #[error("no report waits under that handle")]
    UnknownReport,
    /// The report's connection or stream is gone; the client will send the
    /// report again on a new connection.
    #[error("the report's connection or stream is gone")]
    ConnectionGone,
}

/// What was wrong with the bytes on a report stream, as the server tells the
/// client in `{"ok":false,"code":..,"error":..}`.
///
/// [`StreamError::is_fatal`] errors end the stream: the server answers, FINs
/// its side, and reads nothing more (a JSON syntax error cannot be
/// resynchronised). The others reject one object and the stream carries on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The stream ended (FIN) before any byte other than whitespace.
    #[error("empty stream: no JSON object before FIN")]
    Empty,
    /// The bytes of an object are not UTF-8.
    #[error("report is not UTF-8")]
    NotUtf8,
    /// The bytes are not JSON (RFC 8259); the string is serde_json's reason.
    #[error("report is not JSON: {0}")]
    InvalidJson(String),
    /// Valid JSON, but not an object; the string names what it was
    /// (`"array"`, `"number"`, ...).
    #[error("report must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// The stream ended (FIN) in the middle of a JSON value.
    #[error("stream ended inside a JSON value")]
    Truncated,
    /// One object is larger than the limit (bytes).
    #[error("report larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A field the protocol defines has the wrong type (not fatal).
    #[error("field \"{field}\" must be {expected}")]
    InvalidField {
        /// The field's name.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// The report's own `identity` field names another identity than the
    /// connection's (or appears more than once): refused with code
    /// `forbidden`, permanent; the stream carries on (not fatal).
    #[error(
        "forbidden: the report claims identity {claimed:?}, but this connection {}",
        authenticated_as(.identity)
    )]
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

/// How a connection is authenticated, for [`StreamError::Forbidden`].
fn authenticated_as(identity: &crate::identity::Identity) -> String {
    if identity.is_anonymous() {
        "has no client certificate (anonymous)".into()
    } else {
        format!("is authenticated as {identity}")
    }
}
