//! Why the core wants to wake up: [`TimerKind`] and [`Deadline`].

use std::time::Instant;

/// The reason behind a deadline, for logs and for simulations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerKind {
    /// quiche's own timer (loss recovery, idle timeout, draining).
    Quic,
    /// The client waits out a backoff delay before the next attempt.
    Backoff,
    /// The client gives up on a handshake that takes too long.
    Connect,
    /// The client gives up on a connection whose answer is overdue.
    AckWait,
    /// The client sends a keep-alive so an idle connection stays open.
    KeepAlive,
    /// The server reaps a handshake that takes too long.
    Handshake,
}

/// The earliest deadline and its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// When.
    pub at: Instant,
    /// Why.
    pub kind: TimerKind,
}

/// Keeps the earliest of several candidate deadlines.
pub(crate) fn earliest(a: Option<Deadline>, b: Option<Deadline>) -> Option<Deadline> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.at < x.at { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Shorthand to build an optional deadline.
pub(crate) fn at(at: Option<Instant>, kind: TimerKind) -> Option<Deadline> {
    at.map(|at| Deadline { at, kind })
}
