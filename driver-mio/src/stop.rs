//! [`StopHandle`]: asks a running driver loop, from any thread, to shut
//! down gracefully (the client closes its connection, the server closes
//! all of its connections), as SIGINT would; or, with
//! [`StopHandle::abort`], to return at once without closing anything, as
//! if the process had crashed (the peers learn it from a stateless reset,
//! an ICMP error or their idle timeout).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use mio::Waker;

/// A cloneable request to stop a driver loop. Create one, put it in the
/// options (or take it from a `*Driver`), and call [`StopHandle::stop`] from
/// any thread. Stopping before the loop runs is fine: the loop stops as soon
/// as it starts.
#[derive(Debug, Clone, Default)]
pub struct StopHandle {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    stopped: AtomicBool,
    aborted: AtomicBool,
    waker: Mutex<Option<Arc<Waker>>>,
}

impl StopHandle {
    /// A handle not yet stopped and not yet attached to a loop.
    pub fn new() -> StopHandle {
        StopHandle::default()
    }

    /// Asks the loop to stop, and wakes it if it is running.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        let waker = self
            .inner
            .waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = waker.as_ref()
            && let Err(e) = w.wake()
        {
            log::warn!("cannot wake the driver loop to stop it: {e}");
        }
    }

    /// Asks the loop to return at once, sending nothing more (no
    /// CONNECTION_CLOSE), and wakes it: a crash, for tests and the demo's
    /// chaos mode. A server's sink is still synced.
    pub fn abort(&self) {
        self.inner.aborted.store(true, Ordering::SeqCst);
        self.stop();
    }

    /// Whether [`StopHandle::stop`] (or [`StopHandle::abort`]) was called.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }

    /// Whether [`StopHandle::abort`] was called.
    pub fn is_aborted(&self) -> bool {
        self.inner.aborted.load(Ordering::SeqCst)
    }

    /// Attaches the loop's waker. A stop requested before (or while) it is
    /// attached wakes the loop at once, so it is not lost.
    pub(crate) fn attach(&self, waker: Arc<Waker>) {
        let mut slot = self
            .inner
            .waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.is_stopped()
            && let Err(e) = waker.wake()
        {
            log::warn!("cannot wake the driver loop to stop it: {e}");
        }
        *slot = Some(waker);
    }
}
