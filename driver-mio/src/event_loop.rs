//! The skeleton of the client and server loops, written once: what a loop
//! waits on besides its socket ([`Sources`]: the poll, the waker, SIGINT
//! and SIGTERM, the stop handle), the steps a loop has ([`Steps`]), and the
//! order one turn takes them in ([`run`]). Each loop implements only its
//! own steps; the waiting, the token dispatch, the stop/abort/signal
//! handling, the close grace and the stuck-deadline floor live here.
//!
//! One turn:
//!
//! ```text
//! done? ─► close grace spent? ─► wait (core deadline, the loop's own, the grace)
//!   ─► abort? ─► writable: on_writable ─► readable (or input left): on_readable
//!   ─► waker: on_wake ─► signal: close (a second one: return) ─► stop: close
//!   ─► on_deadline (the core's deadline if due, the loop's timers) ─► drain
//!   ─► stuck-deadline check
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token, Waker};

use crate::signal::SignalSource;
use crate::turn::{self, StopRequest, StuckDeadline, Wait};
use crate::{DriverError, StopHandle};

/// The token of the loop's UDP socket.
pub const SOCKET: Token = Token(0);
/// The token of the [`Waker`] (stop handle, samples, helper threads).
pub const WAKER: Token = Token(1);
/// The token of the SIGINT/SIGTERM source.
pub const SIGNALS: Token = Token(2);

/// What a loop waits on besides its socket (registered by the loop under
/// [`SOCKET`] on `poll`).
#[derive(Debug)]
pub struct Sources {
    /// The loop's poll.
    pub poll: Poll,
    /// Wakes the loop from other threads; `stop` is attached to it.
    pub waker: Arc<Waker>,
    /// SIGINT and SIGTERM, when caught.
    pub signals: Option<SignalSource>,
    /// Stops or aborts the loop from another thread.
    pub stop: StopHandle,
}

impl Sources {
    /// A poll with a waker that `stop` wakes, and SIGINT/SIGTERM caught if
    /// `handle_signals`.
    pub fn new(stop: StopHandle, handle_signals: bool) -> Result<Sources, DriverError> {
        let poll = Poll::new().map_err(DriverError::io("creating the poll"))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), WAKER).map_err(DriverError::io("creating the waker"))?,
        );
        stop.attach(Arc::clone(&waker));
        let signals = if handle_signals {
            Some(
                SignalSource::register(poll.registry(), SIGNALS)
                    .map_err(DriverError::io("catching SIGINT and SIGTERM"))?,
            )
        } else {
            None
        };
        Ok(Sources {
            poll,
            waker,
            signals,
            stop,
        })
    }
}

/// A loop's own steps, taken by [`run`] in its order.
pub trait Steps {
    /// What the loop runs on (its socket and [`Sources`]).
    type Driver;
    /// Capacity of the loop's `mio::Events`.
    const EVENTS: usize;

    /// The driver's [`Sources`].
    fn sources(d: &mut Self::Driver) -> &mut Sources;
    /// How long a close may take before the loop returns anyway.
    fn grace(d: &Self::Driver) -> Duration;

    /// The core's next deadline.
    fn core_deadline(&self) -> Option<Instant>;
    /// Before waiting: does what is due of the loop's own periodic work and
    /// adds the loop's own deadlines to `wait` (the core's is in it).
    fn wait(&mut self, d: &mut Self::Driver, now: Instant, wait: Wait) -> Wait;
    /// The socket may take datagrams again.
    fn on_writable(&mut self, d: &mut Self::Driver, now: Instant);
    /// The socket is readable (or datagrams were left last turn): reads
    /// them; returns whether some may be left.
    fn on_readable(&mut self, d: &mut Self::Driver, now: Instant) -> bool;
    /// The waker fired (the stop handle is read by [`run`] itself).
    fn on_wake(&mut self, d: &mut Self::Driver, now: Instant);
    /// Starts closing gracefully (`why`: a signal's name, "stop requested").
    fn close(&mut self, d: &mut Self::Driver, now: Instant, why: &str);
    /// When the close started, if it did.
    fn closing_since(&self) -> Option<Instant>;
    /// The loop's timers: `core_due` says whether the core's deadline is
    /// due (then `handle_timeout` it).
    fn on_deadline(&mut self, d: &mut Self::Driver, now: Instant, core_due: bool);
    /// Hands the core's events on and sends what it has (the core's
    /// contract), and what the loop does after that each turn.
    fn drain(&mut self, d: &mut Self::Driver, now: Instant) -> Result<(), DriverError>;
    /// The loop is finished (checked before every turn).
    fn done(&mut self, d: &mut Self::Driver) -> bool;
    /// What a close closes, for the log ("the connection", "3 connection(s)").
    fn closes(&self) -> String;
    /// Names the core's deadline for the stuck-deadline warning.
    fn deadline_name(&self) -> String;
}

/// Runs `steps` on `d` until [`Steps::done`], an abort, a second signal
/// while closing, or a close that outlasts [`Steps::grace`].
pub fn run<S: Steps>(steps: &mut S, d: &mut S::Driver) -> Result<(), DriverError> {
    let mut events = Events::with_capacity(S::EVENTS);
    let mut more_to_read = false;
    let mut stuck = StuckDeadline::default();
    let grace = S::grace(d);
    loop {
        if steps.done(d) {
            return Ok(());
        }
        let now = Instant::now();
        if let Some(since) = steps.closing_since()
            && now.duration_since(since) >= grace
        {
            log::warn!(
                "{} not closed within {grace:?}; stopping anyway",
                steps.closes()
            );
            return Ok(());
        }
        let wait = Wait::new(now, steps.core_deadline(), stuck.floor())
            .until(steps.closing_since().map(|since| since + grace))
            .at_once_if(more_to_read);
        let wait = steps.wait(d, now, wait);
        if !turn::poll(&mut S::sources(d).poll, &mut events, wait)? {
            continue;
        }
        let stop = S::sources(d).stop.this_turn();
        if stop == StopRequest::Abort {
            log::info!("aborted: stopping without closing {}", steps.closes());
            return Ok(());
        }
        let now = Instant::now();
        let (mut readable, mut writable, mut woken, mut signalled) =
            (more_to_read, false, false, false);
        for ev in events.iter() {
            match ev.token() {
                SOCKET => {
                    readable |= ev.is_readable() || ev.is_error();
                    writable |= ev.is_writable();
                }
                WAKER => woken = true,
                SIGNALS => signalled = true,
                t => log::warn!("event for an unknown token {t:?}"),
            }
        }
        if writable {
            steps.on_writable(d, now);
        }
        more_to_read = readable && steps.on_readable(d, now);
        if woken {
            steps.on_wake(d, now);
        }
        if signalled
            && let Some(sig) = S::sources(d)
                .signals
                .as_mut()
                .and_then(|s| s.pending().first().copied())
        {
            if steps.closing_since().is_some() {
                log::warn!(
                    "{sig} again: stopping without waiting for {} to close",
                    steps.closes()
                );
                return Ok(());
            }
            log::info!("{sig}: closing {}", steps.closes());
            steps.close(d, now, sig);
        }
        if stop == StopRequest::Stop && steps.closing_since().is_none() {
            log::info!("stop requested: closing {}", steps.closes());
            steps.close(d, now, "stop requested");
        }
        let due = steps.core_deadline().filter(|t| *t <= now);
        steps.on_deadline(d, now, due.is_some());
        steps.drain(d, now)?;
        stuck.check(due, steps.core_deadline(), || steps.deadline_name());
    }
}
