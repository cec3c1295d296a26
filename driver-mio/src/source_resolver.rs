//! [`SourceResolver`]: how the fetch thread's [`ureq::Agent`] looks up the
//! source's host name (and a proxy's, or a redirect's), with the number
//! of lookup threads bounded.
//!
//! ureq's own resolver starts a thread for every new connection and
//! abandons it on timeout: under a resolver that hangs (a stuck NSS
//! module, a DNS server that drops queries) the fetch thread left one more
//! thread behind every interval, until `spawn` failed and took the fetch
//! thread down with it. Here the lookups are [`NameLookups`]: a name has at
//! most one lookup under way, whose late answer the next fetch takes, and
//! at most [`MAX_SOURCE_LOOKUPS`] are under way at once (a redirect to
//! another host, a proxy); past that a fetch that needs a new lookup fails
//! at once as a timeout of its lookup. An IP address needs no lookup and no
//! thread.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};

use crate::name_lookups::{NameError, NameLookups};
use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// Most lookups under way at once (hung ones included).
pub const MAX_SOURCE_LOOKUPS: usize = 2;

/// A [`Resolver`] whose lookups of one name share one thread; clones share
/// their lookups.
#[derive(Clone)]
pub struct SourceResolver {
    lookups: NameLookups,
}

impl fmt::Debug for SourceResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceResolver").finish_non_exhaustive()
    }
}

impl Default for SourceResolver {
    /// The system's resolver (`getaddrinfo`).
    fn default() -> SourceResolver {
        SourceResolver {
            lookups: NameLookups::system(MAX_SOURCE_LOOKUPS, "source-lookup"),
        }
    }
}

impl SourceResolver {
    /// Names looked up by `lookup` (tests, an embedder's own resolver).
    pub fn with(
        lookup: impl Fn(&str) -> io::Result<Vec<SocketAddr>> + Send + Sync + 'static,
    ) -> SourceResolver {
        SourceResolver {
            lookups: NameLookups::with(MAX_SOURCE_LOOKUPS, lookup).named("source-lookup"),
        }
    }

    /// The addresses of `name` (`host:port`), waiting at most `timeout`
    /// (`None`: as long as it takes).
    fn addresses(
        &self,
        name: &str,
        timeout: Option<std::time::Duration>,
    ) -> Result<Vec<SocketAddr>, ureq::Error> {
        self.lookups.addresses(name, timeout).map_err(|e| match e {
            NameError::TimedOut | NameError::Full(_) => {
                ureq::Error::Timeout(ureq::Timeout::Resolve)
            }
            NameError::Failed(e) => ureq::Error::Io(e),
        })
    }
}

impl Resolver for SourceResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(ureq::Error::BadUri(format!("{uri} has no scheme or host")));
        };
        let name = DefaultResolver::host_and_port(scheme, authority)
            .ok_or_else(|| ureq::Error::BadUri(format!("{uri}: unknown scheme")))?;
        let host = authority.host();
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        let addrs = match literal {
            Some(ip) => {
                // `name` ends in the port, the scheme's default if none is given.
                let port = name
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                vec![SocketAddr::new(ip, port)]
            }
            None => {
                let wait = (!timeout.after.is_not_happening()).then(|| *timeout.after);
                self.addresses(&name, wait)?
            }
        };
        let mut result = self.empty();
        for addr in config.ip_family().keep_wanted(addrs.into_iter()) {
            if result.try_push(addr).is_err() {
                break; // as many as ureq keeps
            }
        }
        if result.is_empty() {
            return Err(ureq::Error::HostNotFound);
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, PoisonError, mpsc};
    use std::time::Duration;
    use ureq::unversioned::transport::time;

    fn within(ms: u64) -> NextTimeout {
        NextTimeout {
            after: time::Duration::Exact(Duration::from_millis(ms)),
            ..NextTimeout::default()
        }
    }

    fn uri(s: &str) -> Uri {
        s.parse().expect("a URI")
    }

    /// A resolver that hangs until told the answer, counting its lookups.
    fn hanging() -> (SourceResolver, mpsc::Sender<()>, Arc<AtomicUsize>) {
        let (release, released) = mpsc::channel::<()>();
        let released = Mutex::new(released);
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let r = SourceResolver::with(move |name| {
            counted.fetch_add(1, Ordering::SeqCst);
            if name.starts_with("source.test") {
                let _ = released
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .recv();
            }
            Ok(vec!["10.0.0.7:8000".parse().expect("addr")])
        });
        (r, release, calls)
    }

    #[test]
    fn fetches_of_a_hung_name_share_one_lookup_and_take_its_late_answer() {
        let (r, release, calls) = hanging();
        let cfg = Config::default();
        for _ in 0..20 {
            let e = r
                .resolve(&uri("http://source.test:8000/"), &cfg, within(10))
                .expect_err("the lookup hangs");
            assert!(matches!(e, ureq::Error::Timeout(_)), "{e:?}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one lookup for 20 fetches");
        release.send(()).expect("the lookup waits");
        let addrs = r
            .resolve(&uri("http://source.test:8000/"), &cfg, within(5_000))
            .expect("the answer that came late");
        assert_eq!(&addrs[..], &["10.0.0.7:8000".parse().expect("addr")]);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// As many names as the cap allows, each a lookup that hangs.
    fn fill_the_cap(r: &SourceResolver, cfg: &Config) {
        for i in 0..MAX_SOURCE_LOOKUPS {
            let u = uri(&format!("http://source.test{i}:8000/"));
            assert!(r.resolve(&u, cfg, within(10)).is_err());
        }
    }

    #[test]
    fn past_the_cap_of_hung_lookups_a_new_name_fails_at_once() {
        let (r, release, calls) = hanging();
        let cfg = Config::default();
        fill_the_cap(&r, &cfg);
        let e = r
            .resolve(&uri("http://source.testx:8000/"), &cfg, within(10))
            .expect_err("no room for another lookup");
        assert!(matches!(e, ureq::Error::Timeout(_)), "{e:?}");
        assert_eq!(calls.load(Ordering::SeqCst), MAX_SOURCE_LOOKUPS);
        // A name that answers once the hung ones are done.
        for _ in 0..MAX_SOURCE_LOOKUPS {
            release.send(()).expect("a lookup waits");
        }
        for i in 0..MAX_SOURCE_LOOKUPS {
            let u = uri(&format!("http://source.test{i}:8000/"));
            assert!(r.resolve(&u, &cfg, within(5_000)).is_ok());
        }
        assert!(
            r.resolve(&uri("http://other:80/"), &cfg, within(5_000))
                .is_ok()
        );
    }

    #[test]
    fn hung_lookups_that_end_stop_counting_against_the_cap() {
        let (r, release, _) = hanging();
        let cfg = Config::default();
        fill_the_cap(&r, &cfg);
        for _ in 0..MAX_SOURCE_LOOKUPS {
            release.send(()).expect("a lookup waits");
        }
        // Those names are never fetched again; a new one is looked up.
        let mut ok = false;
        for _ in 0..100 {
            if r.resolve(&uri("http://other:80/"), &cfg, within(100))
                .is_ok()
            {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(ok, "ended lookups still fill the cap");
    }

    #[test]
    fn an_ip_address_is_not_looked_up_and_a_panic_is_an_error() {
        let r = SourceResolver::with(|_| panic!("a resolver bug"));
        let cfg = Config::default();
        let v4 = r
            .resolve(&uri("http://127.0.0.1:8000/"), &cfg, within(10))
            .expect("a literal");
        assert_eq!(&v4[..], &["127.0.0.1:8000".parse().expect("addr")]);
        let v6 = r
            .resolve(&uri("https://[::1]/"), &cfg, within(10))
            .expect("a literal");
        assert_eq!(&v6[..], &["[::1]:443".parse().expect("addr")]);
        let e = r
            .resolve(&uri("http://source.test/"), &cfg, within(5_000))
            .expect_err("the lookup panicked");
        assert!(e.to_string().contains("panicked"), "{e}");
    }
}
