//! [`ServerLookup`]: the server's name, looked up again before reconnect
//! attempts, on a helper thread ([`Lookups`]) so a slow resolver never
//! stalls the loop.
//!
//! A device that boots before its network is up, or whose server moves to
//! another address (a DNS failover, a new host), must find the server again
//! by itself. The client loop starts a lookup whenever an attempt is
//! scheduled (at most one runs at a time) and takes the answer once it
//! arrives, through the loop's waker. A lookup that fails keeps the last
//! address that was known.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};

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

/// Lookups of one name on helper threads, one at a time, answered through
/// a channel and the loop's waker.
#[derive(Debug)]
pub(crate) struct Lookups {
    lookup: ServerLookup,
    waker: Arc<Waker>,
    tx: Sender<io::Result<Vec<SocketAddr>>>,
    rx: Receiver<io::Result<Vec<SocketAddr>>>,
    /// A lookup runs (its answer has not been taken yet).
    busy: bool,
}

impl Lookups {
    /// Lookups of `lookup`'s name, waking the loop through `waker`.
    pub(crate) fn new(lookup: ServerLookup, waker: Arc<Waker>) -> Lookups {
        let (tx, rx) = mpsc::channel();
        Lookups {
            lookup,
            waker,
            tx,
            rx,
            busy: false,
        }
    }

    /// The name looked up.
    pub(crate) fn name(&self) -> &str {
        self.lookup.name()
    }

    /// Starts a lookup unless one runs already.
    pub(crate) fn start(&mut self) {
        if self.busy {
            return;
        }
        let lookup = self.lookup.clone();
        let tx = self.tx.clone();
        let waker = Arc::clone(&self.waker);
        let spawned = std::thread::Builder::new()
            .name("lookup".into())
            .spawn(move || {
                // The loop may be gone (the client stopped): nobody to tell.
                if tx.send(lookup.resolve()).is_ok() {
                    let _ = waker.wake();
                }
            });
        match spawned {
            Ok(_) => self.busy = true,
            Err(e) => log::warn!("cannot start a lookup of {}: {e}", self.lookup.name()),
        }
    }

    /// The answer of the lookup that ran, once it is in.
    pub(crate) fn poll(&mut self) -> Option<io::Result<Vec<SocketAddr>>> {
        let answer = self.rx.try_recv().ok()?;
        self.busy = false;
        Some(answer)
    }
}

/// The address the next attempt takes from a lookup's `addrs`: the one after
/// `current` when it is among them (so a name with several addresses is
/// tried address by address while attempts fail), else the first.
pub(crate) fn next_address(addrs: &[SocketAddr], current: Option<SocketAddr>) -> SocketAddr {
    let at = current.and_then(|c| addrs.iter().position(|a| *a == c));
    match at {
        Some(i) => addrs[(i + 1) % addrs.len()],
        None => addrs[0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_address_goes_round_the_answer_and_starts_at_its_head() {
        let a: SocketAddr = "10.0.0.1:4433".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:4433".parse().expect("addr");
        let c: SocketAddr = "[::1]:4433".parse().expect("addr");
        assert_eq!(next_address(&[a, b, c], None), a);
        assert_eq!(next_address(&[a, b, c], Some(a)), b);
        assert_eq!(next_address(&[a, b, c], Some(c)), a);
        assert_eq!(next_address(&[b], Some(a)), b);
        assert_eq!(next_address(&[a], Some(a)), a);
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
