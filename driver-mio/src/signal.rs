//! SIGINT and SIGTERM as a mio event source (signal-hook-mio), so Ctrl-C
//! becomes a graceful close inside the poll loop instead of killing the
//! process.
//!
//! Note that signal-hook never restores the default disposition: once a
//! driver has registered, SIGINT no longer kills the process, even after
//! the driver returned. The drivers treat a second signal as "stop now".

use std::io;

use mio::{Interest, Registry, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

/// SIGINT and SIGTERM, registered in a poll.
pub struct SignalSource {
    signals: Signals,
}

impl std::fmt::Debug for SignalSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignalSource(SIGINT, SIGTERM)")
    }
}

impl SignalSource {
    /// Catches SIGINT and SIGTERM and registers them under `token`.
    pub fn register(registry: &Registry, token: Token) -> io::Result<SignalSource> {
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        registry.register(&mut signals, token, Interest::READABLE)?;
        Ok(SignalSource { signals })
    }

    /// Names of the signals that arrived since the last call (call on the
    /// source's event; empty if it was spurious).
    pub fn pending(&mut self) -> Vec<&'static str> {
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
