//! [`NameLookups`]: host names looked up on helper threads that a caller
//! waits on for a bounded time, with the number of threads bounded.
//!
//! `getaddrinfo` cannot be cancelled, so a lookup that must end within a
//! deadline runs on a thread of its own. A caller that gives up on it
//! abandons nothing: the lookup is kept, and the next caller asking for
//! the same name waits for that lookup's answer instead of starting
//! another. So a name has at most one lookup under way, and at most the
//! cap are under way at once (hung ones included); past that, a name that
//! needs a new lookup fails at once as a timeout. A lookup that panics is
//! an error. Clones share their lookups, and so their cap.
//!
//! Used by the fetch thread's resolver ([`crate::source_resolver`]) and by
//! the PostgreSQL sink's connects ([`crate::database::postgres`]), whose
//! libraries would otherwise start a thread per lookup and leave it behind
//! on a timeout.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::lookup::{Answer, LookupFn};

/// Why a name has no addresses.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    /// The lookup did not answer in time (it goes on, for the next caller).
    #[error("no answer from the resolver in time")]
    TimedOut,
    /// As many lookups as the cap allows hang: this name was not looked up.
    #[error("{0} lookups hang: not looked up")]
    Full(usize),
    /// The resolver answered with an error, or the lookup thread could not
    /// start or panicked.
    #[error("{0}")]
    Failed(io::Error),
}

/// Lookups of names, shared per name and capped in number.
#[derive(Clone)]
pub struct NameLookups {
    lookup: Arc<LookupFn>,
    cap: usize,
    /// Lookups under way that a caller gave up waiting for, by name: the
    /// next caller for that name takes its answer.
    pending: Arc<Mutex<HashMap<String, Receiver<Answer>>>>,
}

impl fmt::Debug for NameLookups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NameLookups")
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

impl NameLookups {
    /// The system's resolver (`getaddrinfo`), at most `cap` lookups at once.
    pub fn system(cap: usize) -> NameLookups {
        NameLookups::with(cap, |name| name.to_socket_addrs().map(Iterator::collect))
    }

    /// Names (`host:port`) looked up by `lookup` (tests, an embedder's own
    /// resolver), at most `cap` at once.
    pub fn with(
        cap: usize,
        lookup: impl Fn(&str) -> io::Result<Vec<SocketAddr>> + Send + Sync + 'static,
    ) -> NameLookups {
        NameLookups {
            lookup: Arc::new(lookup),
            cap,
            pending: Arc::default(),
        }
    }

    /// The addresses of `name` (`host:port`), waiting at most `timeout`
    /// (`None`: as long as it takes).
    pub fn addresses(
        &self,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<Vec<SocketAddr>, NameError> {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        // Lookups of other names that have ended since (their answers are
        // stale by now): they no longer count against the cap.
        pending.retain(|n, rx| n == name || matches!(rx.try_recv(), Err(TryRecvError::Empty)));
        let rx = match pending.remove(name) {
            Some(rx) => rx,
            None if pending.len() >= self.cap => {
                log::debug!("{} lookups hang: {name} is not looked up", pending.len());
                return Err(NameError::Full(pending.len()));
            }
            None => self.start(name).map_err(NameError::Failed)?,
        };
        // Not held while waiting: the lock guards the map only.
        drop(pending);
        let answer = match timeout {
            Some(t) => rx.recv_timeout(t),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match answer {
            Ok(answer) => answer.map_err(NameError::Failed),
            Err(RecvTimeoutError::Timeout) => {
                self.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(name.to_owned(), rx);
                Err(NameError::TimedOut)
            }
            Err(RecvTimeoutError::Disconnected) => Err(NameError::Failed(io::Error::other(
                "the lookup gave no answer",
            ))),
        }
    }

    /// Starts a lookup of `name` on a thread of its own.
    fn start(&self, name: &str) -> io::Result<Receiver<Answer>> {
        let (tx, rx) = mpsc::sync_channel(1);
        let lookup = Arc::clone(&self.lookup);
        let owned = name.to_owned();
        crate::lookup::on_thread(
            "name-lookup",
            move || lookup(&owned),
            // The caller may have gone: nobody to tell.
            move |answer| drop(tx.send(answer)),
        )?;
        Ok(rx)
    }
}
