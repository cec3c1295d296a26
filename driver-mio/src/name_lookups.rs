//! [`NameLookups`]: host names looked up on helper threads that a caller
//! waits on for a bounded time, with the number of threads bounded.
//!
//! `getaddrinfo` cannot be cancelled, so a lookup that must end within a
//! deadline runs on a thread of its own. Callers of one name wait on one
//! lookup together, and a caller that gives up abandons nothing: the
//! lookup is kept, and the next caller of that name waits for its answer
//! instead of starting another (an answer nobody took within
//! [`ANSWER_KEPT`] is not given: a new lookup starts). So a name has at
//! most one lookup under way, and at most the cap are under way at once
//! (hung ones included); past that, a name that needs a new lookup fails
//! at once. A lookup that panics is an error. Clones share their lookups,
//! and so their cap.
//!
//! Used by the fetch thread's resolver ([`crate::source_resolver`]) and by
//! the PostgreSQL sink's connects ([`crate::database::postgres`]), whose
//! libraries would otherwise start a thread per lookup and leave it behind
//! on a timeout.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::lookup::LookupFn;

/// How long an answer nobody has taken yet may still be given: a lookup
/// that ended longer ago than this is started again (its addresses may be
/// out of date: a failover since).
pub const ANSWER_KEPT: Duration = Duration::from_secs(10);

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

/// A lookup's answer as kept for every caller waiting on it.
type Kept = Result<Vec<SocketAddr>, (io::ErrorKind, String)>;

/// One lookup under way (or ended, its answer not yet taken): the callers
/// of its name wait on it together.
#[derive(Default)]
struct Slot {
    /// The answer, and when it came.
    answer: Mutex<Option<(Instant, Kept)>>,
    came: Condvar,
}

impl Slot {
    fn answer(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Kept)>> {
        self.answer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the lookup still runs.
    fn running(&self) -> bool {
        self.answer().is_none()
    }

    /// Whether the answer came longer than [`ANSWER_KEPT`] before `now`.
    fn stale(&self, now: Instant) -> bool {
        self.answer()
            .as_ref()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > ANSWER_KEPT)
    }
}

/// A lookup that a caller waits on: see [`NameLookups::begin`].
pub struct Pending {
    name: String,
    slot: Arc<Slot>,
}

/// Lookups of names, shared per name and capped in number.
#[derive(Clone)]
pub struct NameLookups {
    lookup: Arc<LookupFn>,
    cap: usize,
    thread_name: &'static str,
    /// Lookups under way, and ended ones whose answer nobody has taken, by
    /// name.
    slots: Arc<Mutex<HashMap<String, Arc<Slot>>>>,
}

impl fmt::Debug for NameLookups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NameLookups")
            .field("cap", &self.cap)
            .field("thread_name", &self.thread_name)
            .finish_non_exhaustive()
    }
}

impl NameLookups {
    /// The system's resolver (`getaddrinfo`), at most `cap` lookups at
    /// once, on threads named `thread_name`.
    pub fn system(cap: usize, thread_name: &'static str) -> NameLookups {
        NameLookups::with(cap, |name| name.to_socket_addrs().map(Iterator::collect))
            .named(thread_name)
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
            thread_name: "name-lookup",
            slots: Arc::default(),
        }
    }

    /// The same, its threads named `thread_name`.
    pub fn named(mut self, thread_name: &'static str) -> NameLookups {
        self.thread_name = thread_name;
        self
    }

    /// The addresses of `name` (`host:port`), waiting at most `timeout`
    /// (`None`: as long as it takes).
    pub fn addresses(
        &self,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<Vec<SocketAddr>, NameError> {
        let pending = self.begin(name)?;
        self.wait(&pending, timeout.map(|t| Instant::now() + t))
    }

    /// The lookup of `name`: the one under way (or ended within
    /// [`ANSWER_KEPT`], its answer not yet taken), or a new one.
    pub fn begin(&self, name: &str) -> Result<Pending, NameError> {
        self.begin_at(name, Instant::now())
    }

    /// [`NameLookups::begin`] at `now`.
    fn begin_at(&self, name: &str, now: Instant) -> Result<Pending, NameError> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.retain(|_, slot| !slot.stale(now));
        if let Some(slot) = slots.get(name) {
            return Ok(Pending {
                name: name.to_owned(),
                slot: Arc::clone(slot),
            });
        }
        let running = slots.values().filter(|s| s.running()).count();
        if running >= self.cap {
            log::debug!("{running} lookups hang: {name} is not looked up");
            return Err(NameError::Full(running));
        }
        let slot = Arc::new(Slot::default());
        let filled = Arc::clone(&slot);
        let lookup = Arc::clone(&self.lookup);
        let owned = name.to_owned();
        crate::lookup::on_thread(
            self.thread_name,
            move || lookup(&owned),
            move |answer| {
                let kept = answer.map_err(|e| (e.kind(), e.to_string()));
                *filled.answer() = Some((Instant::now(), kept));
                filled.came.notify_all();
            },
        )
        .map_err(NameError::Failed)?;
        slots.insert(name.to_owned(), Arc::clone(&slot));
        Ok(Pending {
            name: name.to_owned(),
            slot,
        })
    }

    /// Waits for `pending`'s answer until `deadline` (`None`: as long as it
    /// takes). An answer given is taken: the next caller for the name
    /// starts a new lookup (the callers waiting with this one get it too).
    pub fn wait(
        &self,
        pending: &Pending,
        deadline: Option<Instant>,
    ) -> Result<Vec<SocketAddr>, NameError> {
        let mut answer = pending.slot.answer();
        loop {
            if let Some((_, kept)) = answer.as_ref() {
                let kept = kept.clone();
                drop(answer);
                let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
                if slots
                    .get(&pending.name)
                    .is_some_and(|s| Arc::ptr_eq(s, &pending.slot))
                {
                    slots.remove(&pending.name);
                }
                return kept.map_err(|(kind, e)| NameError::Failed(io::Error::new(kind, e)));
            }
            answer = match deadline {
                None => pending
                    .slot
                    .came
                    .wait(answer)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(NameError::TimedOut);
                    }
                    pending
                        .slot
                        .came
                        .wait_timeout(answer, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    /// Lookups that block until released, counted.
    fn blocking(cap: usize) -> (NameLookups, mpsc::Sender<()>, Arc<AtomicUsize>) {
        let (release, released) = mpsc::channel::<()>();
        let released = Mutex::new(released);
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let lookups = NameLookups::with(cap, move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = released
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .recv();
            Ok(vec!["10.0.0.1:1".parse().expect("addr")])
        });
        (lookups, release, calls)
    }

    /// Two threads asking for one name at the same time share one lookup,
    /// and both take its answer; a caller after that starts a new one.
    #[test]
    fn callers_of_one_name_at_once_share_its_lookup() {
        let (lookups, release, calls) = blocking(1);
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let l = lookups.clone();
                std::thread::spawn(move || l.addresses("a:1", Some(Duration::from_secs(10))))
            })
            .collect();
        // Both hold the one lookup (the second would fail at once as Full,
        // the cap being 1, had it started one of its own): its slot is held
        // by the table, the lookup thread and the two callers.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let holders = lookups
                .slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get("a:1")
                .map_or(0, Arc::strong_count);
            if holders >= 4 {
                break;
            }
            assert!(Instant::now() < deadline, "the two callers never shared it");
            std::thread::sleep(Duration::from_millis(5));
        }
        release.send(()).expect("the lookup waits");
        for w in waiters {
            let addrs = w.join().expect("a waiter").expect("the answer");
            assert_eq!(addrs, ["10.0.0.1:1".parse().expect("addr")]);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        release.send(()).expect("for the next lookup");
        lookups
            .addresses("a:1", Some(Duration::from_secs(10)))
            .expect("a new lookup");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// Waits (10 s at most) until the lookup of `name` has answered,
    /// without taking the answer.
    fn answered(lookups: &NameLookups, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let slot = lookups
                .slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(name)
                .map(Arc::clone)
                .expect("the lookup is kept");
            if !slot.running() {
                return;
            }
            assert!(Instant::now() < deadline, "the lookup never answered");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// An answer nobody took (its caller gave up) is given to the next
    /// caller of the name within [`ANSWER_KEPT`]; after that it is out of
    /// date and a new lookup starts.
    #[test]
    fn an_answer_nobody_took_is_given_within_answer_kept_and_not_after() {
        let (lookups, release, calls) = blocking(1);
        let wait = Some(Instant::now() + Duration::from_secs(10));
        for name in ["a:1", "b:1"] {
            assert!(matches!(
                lookups.addresses(name, Some(Duration::from_millis(10))),
                Err(NameError::TimedOut)
            ));
            release.send(()).expect("the lookup waits");
            answered(&lookups, name);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        let fresh = lookups
            .begin_at("a:1", Instant::now() + ANSWER_KEPT / 2)
            .expect("the kept lookup");
        assert!(lookups.wait(&fresh, wait).is_ok());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the kept answer, no lookup"
        );

        let later = lookups
            .begin_at("b:1", Instant::now() + ANSWER_KEPT + Duration::from_secs(1))
            .expect("a new lookup");
        release.send(()).expect("the new lookup waits");
        assert!(lookups.wait(&later, wait).is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 3, "looked up again");
    }

    /// Hung lookups fill the cap; a name waited on already does not count
    /// twice, and a new name fails at once.
    #[test]
    fn hung_lookups_fill_the_cap() {
        let (lookups, release, calls) = blocking(2);
        for name in ["a:1", "b:1", "a:1"] {
            assert!(matches!(
                lookups.addresses(name, Some(Duration::from_millis(10))),
                Err(NameError::TimedOut)
            ));
        }
        assert!(matches!(
            lookups.addresses("c:1", Some(Duration::from_millis(10))),
            Err(NameError::Full(2))
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        for _ in 0..3 {
            let _ = release.send(());
        }
    }
}
