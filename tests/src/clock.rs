//! Virtual time for the simulation: a `clock_gettime` that returns the
//! simulation's clock on threads that asked for it.
//!
//! quiche reads `Instant::now()` itself (its idle timer, loss recovery and
//! draining follow it), so to run quiche on virtual time the test binary
//! defines the C function `clock_gettime`. The static linker prefers this
//! definition to libc's, so Rust's `Instant::now()` (and quiche's) land
//! here. While the calling thread has virtual time enabled, the monotonic
//! clocks (`CLOCK_MONOTONIC`, `_COARSE`, `_RAW`, `CLOCK_BOOTTIME`) return it;
//! every other clock, and every other thread, gets the real time through the
//! raw system call. `CLOCK_REALTIME` stays real (BoringSSL's ticket ages use
//! it).
//!
//! The thread-local is a const-initialised `Cell`, so reading the clock
//! never allocates.

use std::cell::Cell;
use std::time::{Duration, Instant};

thread_local! {
    static VIRTUAL_NS: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Replaces libc's `clock_gettime` in any binary that links this crate.
///
/// # Safety
/// Same contract as libc's: `tp` must point to a writable `timespec`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn clock_gettime(
    clk: libc::clockid_t,
    tp: *mut libc::timespec,
) -> libc::c_int {
    let monotonic = matches!(
        clk,
        libc::CLOCK_MONOTONIC
            | libc::CLOCK_MONOTONIC_COARSE
            | libc::CLOCK_MONOTONIC_RAW
            | libc::CLOCK_BOOTTIME
    );
    if monotonic && let Some(ns) = VIRTUAL_NS.try_with(Cell::get).ok().flatten() {
        // SAFETY: the caller passes a valid timespec pointer (libc contract).
        unsafe {
            (*tp).tv_sec = (ns / 1_000_000_000) as libc::time_t;
            (*tp).tv_nsec = (ns % 1_000_000_000) as libc::c_long;
        }
        return 0;
    }
    // SAFETY: forwarding the caller's arguments to the real system call.
    unsafe { libc::syscall(libc::SYS_clock_gettime, clk, tp) as libc::c_int }
}

/// The virtual clock of one simulation, on the thread that made it.
///
/// Starts at an arbitrary large value (so `Instant` arithmetic never goes
/// below zero) and only moves when told. Dropping it gives the thread its
/// real clock back.
#[derive(Debug)]
pub struct VirtualClock {
    start: Instant,
    start_ns: u64,
    ns: u64,
}

/// Virtual time starts here (about 11.6 days after "boot").
const START_NS: u64 = 1_000_000 * 1_000_000_000;

impl VirtualClock {
    /// Switches this thread to virtual time.
    pub fn install() -> VirtualClock {
        VIRTUAL_NS.with(|c| c.set(Some(START_NS)));
        let start = Instant::now();
        assert!(
            VIRTUAL_NS.with(Cell::get) == Some(START_NS) && Instant::now() == start,
            "virtual clock not in effect: is clock_gettime interposed?"
        );
        VirtualClock {
            start,
            start_ns: START_NS,
            ns: START_NS,
        }
    }

    /// The current virtual instant.
    pub fn now(&self) -> Instant {
        self.start + Duration::from_nanos(self.ns - self.start_ns)
    }

    /// Virtual time since the clock was installed.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.ns - self.start_ns)
    }

    /// Moves the clock forward to `t` (never backwards).
    pub fn advance_to(&mut self, t: Instant) {
        let target = self.start_ns
            + u64::try_from(t.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX);
        if target > self.ns {
            self.ns = target;
            VIRTUAL_NS.with(|c| c.set(Some(self.ns)));
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&mut self, d: Duration) {
        let t = self.now() + d;
        self.advance_to(t);
    }
}

impl Drop for VirtualClock {
    fn drop(&mut self) {
        VIRTUAL_NS.with(|c| c.set(None));
    }
}
