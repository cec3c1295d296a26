//! What every loop's turn has in common, written once: what to wait for
//! ([`Wait`], the earliest of the core's deadline and the loop's own),
//! waiting ([`poll`], taking a signal's EINTR as an empty turn), the stop
//! handle read once per turn ([`StopHandle::this_turn`]), and the floor
//! that keeps a core deadline which does not move from spinning the loop
//! ([`StuckDeadline`]). The loop skeleton that takes them in order is
//! [`crate::event_loop`].

use std::io;
use std::time::{Duration, Instant};

use mio::{Events, Poll};

use crate::{DriverError, StopHandle};

/// How long a turn waits: until the earliest deadline, never less than
/// the stuck-deadline floor for the core's, at once if input is left.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct Wait {
    now: Instant,
    timeout: Option<Duration>,
}

impl Wait {
    /// Until the core's deadline (`None`: no deadline), at least `floor`
    /// away ([`StuckDeadline::floor`]).
    pub fn new(now: Instant, core: Option<Instant>, floor: Duration) -> Wait {
        let timeout = core.map(|t| t.saturating_duration_since(now).max(floor));
        Wait { now, timeout }
    }

    /// No later than `at`, if there is one.
    pub fn until(mut self, at: Option<Instant>) -> Wait {
        if let Some(at) = at {
            let left = at.saturating_duration_since(self.now);
            self.timeout = Some(self.timeout.map_or(left, |t| t.min(left)));
        }
        self
    }

    /// Not at all when `now` is true (input is left from the last turn).
    pub fn at_once_if(mut self, now: bool) -> Wait {
        if now {
            self.timeout = Some(Duration::ZERO);
        }
        self
    }

    /// The timeout for `Poll::poll` (`None`: block).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }
}

/// Waits for events; `Ok(false)` when a signal interrupted the wait (the
/// loop then takes another turn).
pub fn poll(poll: &mut Poll, events: &mut Events, wait: Wait) -> Result<bool, DriverError> {
    match poll.poll(events, wait.timeout()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(source) => Err(DriverError::Io {
            what: "waiting for events",
            source,
        }),
    }
}

/// What the stop handle asks of this turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// Nothing: carry on.
    None,
    /// Close gracefully ([`StopHandle::stop`]).
    Stop,
    /// Return at once, closing nothing ([`StopHandle::abort`]).
    Abort,
}

impl StopHandle {
    /// Reads the handle once for this turn, its stop flag first:
    /// [`StopHandle::abort`] sets its own flag before the stop flag, so a
    /// stop that came from an abort is always seen as one, never turned
    /// into a graceful close.
    pub fn this_turn(&self) -> StopRequest {
        let stopped = self.is_stopped();
        if self.is_aborted() {
            StopRequest::Abort
        } else if stopped {
            StopRequest::Stop
        } else {
            StopRequest::None
        }
    }
}

/// A core deadline that stays in the past after `handle_timeout` would
/// make the loop spin: from then on the loop waits at least 1 ms for it,
/// and says so once.
#[derive(Debug, Default)]
pub struct StuckDeadline {
    floor: Duration,
    warned: bool,
}

impl StuckDeadline {
    /// The least wait for the core's deadline ([`Wait::new`]).
    pub fn floor(&self) -> Duration {
        self.floor
    }

    /// After a turn: `due` is the deadline `handle_timeout` ran for (if
    /// any), `after` the core's deadline now; `what` names it for the
    /// warning.
    pub fn check(
        &mut self,
        due: Option<Instant>,
        after: Option<Instant>,
        what: impl FnOnce() -> String,
    ) {
        self.floor = Duration::ZERO;
        if due.is_some() && after == due {
            self.floor = Duration::from_millis(1);
            if !self.warned {
                self.warned = true;
                log::warn!(
                    "{} did not move after handle_timeout; polling at 1 ms",
                    what()
                );
            }
        }
    }
}
