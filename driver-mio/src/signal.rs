//! SIGINT and SIGTERM as a mio event source (signal-hook-mio), so Ctrl-C
//! becomes a graceful close inside the poll loop instead of killing the
//! process.
//!
//! Note that signal-hook never restores the default disposition: once a
//! driver has registered, SIGINT no longer kills the process, even after
//! the driver returned. The drivers treat a second signal as "stop now".
//!
//! A loop that cannot take its signals (blocked in a write to a stdout
//! nobody reads, or to a hung disk) would make every signal but SIGKILL
//! useless: so a signal that arrives while the one before it has not been
//! taken ([`SignalSource::pending`]) ends the process at once, with status
//! 128 + the signal's number, as the default disposition would have.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use mio::{Interest, Registry, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

/// SIGINT and SIGTERM, registered in a poll.
pub struct SignalSource {
    signals: Signals,
    /// Set by every signal, cleared when the loop takes them: a signal
    /// that finds it set ends the process.
    untaken: Arc<AtomicBool>,
    /// The handlers behind `untaken`, removed on drop.
    handlers: Vec<signal_hook::SigId>,
}

impl Drop for SignalSource {
    fn drop(&mut self) {
        for id in self.handlers.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

impl std::fmt::Debug for SignalSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignalSource(SIGINT, SIGTERM)")
    }
}

impl SignalSource {
    /// Catches SIGINT and SIGTERM and registers them under `token`.
    pub fn register(registry: &Registry, token: Token) -> io::Result<SignalSource> {
        let untaken = Arc::new(AtomicBool::new(false));
        let mut source = SignalSource {
            signals: Signals::new([SIGINT, SIGTERM])?,
            untaken: Arc::clone(&untaken),
            handlers: Vec::new(),
        };
        for sig in [SIGINT, SIGTERM] {
            // In this order: the exit looks at the flag before this signal
            // sets it.
            source
                .handlers
                .push(signal_hook::flag::register_conditional_shutdown(
                    sig,
                    128 + sig,
                    Arc::clone(&untaken),
                )?);
            source
                .handlers
                .push(signal_hook::flag::register(sig, Arc::clone(&untaken))?);
        }
        registry.register(&mut source.signals, token, Interest::READABLE)?;
        Ok(source)
    }

    /// Names of the signals that arrived since the last call (call on the
    /// source's event; empty if it was spurious). The next signal is then
    /// the loop's to handle again.
    pub fn pending(&mut self) -> Vec<&'static str> {
        self.untaken.store(false, Ordering::SeqCst);
        self.signals.pending().map(signal_name).collect()
    }
}

/// "SIGINT", "SIGTERM", or "signal".
pub fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "signal",
    }
}
