//! [`ServerLookup`]: the server's name, looked up again when reconnect
//! attempts are scheduled, on a helper thread ([`Lookups`]) so a slow resolver never
//! stalls the loop.
//!
//! A device that boots before its network is up, or whose server moves to
//! another address (a DNS failover, a new host), must find the server again
//! by itself. The client loop starts a lookup whenever an attempt is
//! scheduled (one at a time: another starts beside it only once it has
//! hung for [`LOOKUP_PATIENCE`], and at most [`MAX_LOOKUP_THREADS`] are
//! alive) and takes the answer once it arrives, through the loop's waker.
//! A lookup that fails keeps the last address that was known.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use mio::Waker;

/// What a lookup runs: a name (`host:port`) to its addresses.
pub type LookupFn = dyn Fn(&str) -> io::Result<Vec<SocketAddr>> + Send + Sync;

/// The server's name and how to look it up.
#[derive(Clone)]
pub struct ServerLookup {
    name: String,
    lookup: Arc<LookupFn>,
}

impl ServerLookup {
    /// `name` (`host:port`), looked up with the system's resolver
    /// (`getaddrinfo`: `/etc/hosts`, DNS, ...).
    pub fn system(name: impl Into<String>) -> ServerLookup {
        ServerLookup::with(name, |name| {
            name.to_socket_addrs().map(Iterator::collect::<Vec<_>>)
        })
    }

    /// `name`, looked up by `lookup` (tests, an embedder's own resolver).
    pub fn with(
        name: impl Into<String>,
        lookup: impl Fn(&str) -> io::Result<Vec<SocketAddr>> + Send + Sync + 'static,
    ) -> ServerLookup {
        ServerLookup {
            name: name.into(),
            lookup: Arc::new(lookup),
        }
    }

    /// The name looked up.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Looks the name up now, on this thread: its addresses, at least one.
    pub fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        let addrs = (self.lookup)(&self.name)?;
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "it resolves to no address",
            ));
        }
        Ok(addrs)
    }
}

impl fmt::Debug for ServerLookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerLookup")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// How long a lookup may take before another may start beside it (a
/// resolver that hangs: a stuck NSS module, a DNS server that drops
/// queries with no timeout of its own).
pub const LOOKUP_PATIENCE: Duration = Duration::from_secs(30);

/// How long the client waits for its first lookup before it starts (the
/// spool open, fetching on): past that it starts without an address, and
/// the lookup's answer is taken when it comes.
pub const FIRST_LOOKUP_WAIT: Duration = Duration::from_secs(2);

/// Most lookup threads alive at once (hung ones included): past that no
/// new lookup starts until one ends.
pub const MAX_LOOKUP_THREADS: usize = 4;

/// A lookup's answer.
pub(crate) type Answer = io::Result<Vec<SocketAddr>>;

/// Runs `lookup` on a thread named `name` and hands its answer to
/// `deliver`; a lookup that panics answers an error.
pub(crate) fn on_thread(
    name: &str,
    lookup: impl FnOnce() -> Answer + Send + 'static,
    deliver: impl FnOnce(Answer) + Send + 'static,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let answer = std::panic::catch_unwind(AssertUnwindSafe(lookup))
                .unwrap_or_else(|_| Err(io::Error::other("the lookup panicked")));
            deliver(answer);
        })
        .map(drop)
}

/// Lookups of one name on helper threads, one at a time, each answered
/// through a channel of its own and the loop's waker.
#[derive(Debug)]
pub(crate) struct Lookups {
    lookup: ServerLookup,
    waker: Arc<Waker>,
    /// The lookup that runs: its answer's channel and when it started.
    running: Option<(Receiver<Answer>, Instant)>,
    /// Lookup threads alive (each decrements it as it ends).
    alive: Arc<AtomicUsize>,
    /// A lookup was given up on as hung (warned once until one answers).
    hung: bool,
}

/// Counts a lookup thread out when it ends, however it ends.
struct Alive(Arc<AtomicUsize>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Lookups {
    /// Lookups of `lookup`'s name, waking the loop through `waker`.
    pub(crate) fn new(lookup: ServerLookup, waker: Arc<Waker>) -> Lookups {
        Lookups {
            lookup,
            waker,
            running: None,
            alive: Arc::new(AtomicUsize::new(0)),
            hung: false,
        }
    }

    /// The name looked up.
    pub(crate) fn name(&self) -> &str {
        self.lookup.name()
    }

    /// Starts a lookup unless one runs already (for less than
    /// [`LOOKUP_PATIENCE`]: past that, its answer is no longer waited for).
    pub(crate) fn start(&mut self, now: Instant) {
        if let Some((_, since)) = &self.running {
            if now < *since + LOOKUP_PATIENCE {
                return;
            }
            let alive = self.alive.load(Ordering::SeqCst);
            if alive >= MAX_LOOKUP_THREADS {
                log::debug!("{alive} lookups of {} hang: none more", self.lookup.name());
                return;
            }
            if !std::mem::replace(&mut self.hung, true) {
                log::warn!(
                    "the lookup of {} has not answered in {}s: starting another beside it",
                    self.lookup.name(),
                    LOOKUP_PATIENCE.as_secs()
                );
            }
        }
        let (tx, rx) = mpsc::channel();
        let lookup = self.lookup.clone();
        let waker = Arc::clone(&self.waker);
        self.alive.fetch_add(1, Ordering::SeqCst);
        let alive = Alive(Arc::clone(&self.alive));
        let spawned = on_thread(
            "lookup",
            move || {
                let _alive = alive;
                lookup.resolve()
            },
            move |answer| {
                // The loop may be gone (the client stopped), or have given
                // up on this lookup: nobody to tell.
                if tx.send(answer).is_ok() {
                    let _ = waker.wake();
                }
            },
        );
        match spawned {
            Ok(_) => self.running = Some((rx, now)),
            Err(e) => log::warn!("cannot start a lookup of {}: {e}", self.lookup.name()),
        }
    }

    /// The answer of the lookup that ran, once it is in.
    pub(crate) fn poll(&mut self) -> Option<Answer> {
        self.take(None)
    }

    /// The answer of the lookup that runs, waiting at most `timeout` for
    /// it (the first lookup, before the loop runs).
    pub(crate) fn wait(&mut self, timeout: Duration) -> Option<Answer> {
        self.take(Some(timeout))
    }

    fn take(&mut self, timeout: Option<Duration>) -> Option<Answer> {
        let (rx, _) = self.running.as_ref()?;
        let gone = || Err(io::Error::other("the lookup gave no answer"));
        let answer = match timeout {
            None => match rx.try_recv() {
                Ok(answer) => answer,
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => gone(),
            },
            Some(t) => match rx.recv_timeout(t) {
                Ok(answer) => answer,
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => gone(),
            },
        };
        self.running = None;
        self.hung = false;
        Some(answer)
    }
}

/// The address the next attempt takes from a lookup's `addrs`. `current`
/// when it is among them, or with `rotate` (the last attempt failed) the
/// one after it, so a name with several addresses is tried address by
/// address while attempts fail; else the first.
pub(crate) fn next_address(
    addrs: &[SocketAddr],
    current: Option<SocketAddr>,
    rotate: bool,
) -> SocketAddr {
    let at = current.and_then(|c| addrs.iter().position(|a| *a == c));
    match at {
        Some(i) if rotate => addrs[(i + 1) % addrs.len()],
        Some(i) => addrs[i],
        None => addrs[0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_address_goes_round_the_answer_while_attempts_fail() {
        let a: SocketAddr = "10.0.0.1:4433".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:4433".parse().expect("addr");
        let c: SocketAddr = "[::1]:4433".parse().expect("addr");
        assert_eq!(next_address(&[a, b, c], None, true), a);
        assert_eq!(next_address(&[a, b, c], Some(a), true), b);
        assert_eq!(next_address(&[a, b, c], Some(c), true), a);
        assert_eq!(next_address(&[b], Some(a), true), b);
        assert_eq!(next_address(&[a], Some(a), true), a);
        // After an attempt that connected, the address that worked stays.
        assert_eq!(next_address(&[a, b, c], Some(b), false), b);
        assert_eq!(next_address(&[b, c], Some(a), false), b);
    }

    /// Waits (bounded) for the answer of the lookup under way.
    fn answer(lookups: &mut Lookups, poll: &mut mio::Poll) -> Answer {
        let mut events = mio::Events::with_capacity(4);
        for _ in 0..100 {
            if let Some(a) = lookups.poll() {
                return a;
            }
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .expect("poll");
        }
        panic!("no answer within 10 s");
    }

    #[test]
    fn a_lookup_that_panics_is_an_error_and_the_next_one_runs() {
        let mut poll = mio::Poll::new().expect("a poll");
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).expect("a waker"));
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let at: SocketAddr = "10.0.0.1:4433".parse().expect("addr");
        let lookup = ServerLookup::with("collector.test:4433", move |_| {
            if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("a resolver bug");
            }
            Ok(vec![at])
        });
        let mut lookups = Lookups::new(lookup, waker);
        let now = Instant::now();
        lookups.start(now);
        assert!(answer(&mut lookups, &mut poll).is_err());
        lookups.start(now);
        assert_eq!(
            answer(&mut lookups, &mut poll).expect("an answer"),
            vec![at]
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_lookup_with_no_address_is_an_error() {
        let none = ServerLookup::with("nowhere:1", |_| Ok(Vec::new()));
        assert!(none.resolve().is_err());
        let sys = ServerLookup::system("127.0.0.1:4433");
        assert_eq!(
            sys.resolve().expect("a literal resolves"),
            vec!["127.0.0.1:4433".parse::<SocketAddr>().expect("addr")]
        );
    }
}
