//! The database's host names, looked up before each connect through
//! [`NameLookups`], so that a resolver that hangs leaves no thread behind.
//!
//! tokio-postgres looks a host name up on a blocking thread of the
//! connect's runtime; a connect that times out there (a stuck NSS module,
//! a DNS server that drops queries) left that thread running, one more per
//! attempt. Here the names are looked up first, all at once and within
//! one `connect_timeout`, by lookups that a later attempt shares, and the connect is given the
//! answer as `hostaddr`s: every address of every host in the URL's order,
//! each under its own name (for TLS's name check and the password file),
//! so a host with several addresses still falls back from one to the next.
//! A host that cannot be looked up is skipped, as libpq skips a host it
//! cannot reach; with none left, the attempt fails with the lookup's error.
//!
//! Left to tokio-postgres as before: a URL with `hostaddr` of its own
//! (nothing to look up), and one that mixes socket directories with host
//! names (a `hostaddr` cannot stand for a socket directory).

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use tokio_postgres::Config;
use tokio_postgres::config::{Host, LoadBalanceHosts};

use crate::name_lookups::NameLookups;

/// Most lookups of database hosts under way at once (hung ones included).
pub const MAX_HOST_LOOKUPS: usize = 4;

/// One host to try: its name and the address it is reached at.
struct Entry {
    name: String,
    addr: IpAddr,
    port: u16,
}

/// `config` with its host names looked up, all at once and waited on for
/// at most `per_host` together; unchanged when there is nothing to look up.
/// The error names the host and says why.
pub(super) fn resolve<'c>(
    config: &'c Config,
    lookups: &NameLookups,
    per_host: Duration,
) -> Result<Cow<'c, Config>, String> {
    let hosts = config.get_hosts();
    let ports = config.get_ports();
    let named = |h: &Host| matches!(h, Host::Tcp(n) if n.parse::<IpAddr>().is_err());
    let unix = hosts.iter().any(|h| !matches!(h, Host::Tcp(_)));
    // A port list that does not match the hosts: tokio-postgres refuses it
    // before any lookup, with its own message.
    let ports_match = ports.len() <= 1 || ports.len() == hosts.len();
    if !config.get_hostaddrs().is_empty() || unix || !ports_match || !hosts.iter().any(named) {
        return Ok(Cow::Borrowed(config));
    }
    let port_of = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    // Every name's lookup starts before any is waited on.
    let deadline = Instant::now() + per_host;
    let begun: Vec<_> = hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let Host::Tcp(name) = host else {
                return None;
            };
            let port = port_of(i);
            match name.parse::<IpAddr>() {
                Ok(_) => None,
                Err(_) => Some(lookups.begin(&format!("{name}:{port}"))),
            }
        })
        .collect();
    let mut groups: Vec<Vec<Entry>> = Vec::new();
    let mut failures = Vec::new();
    for ((i, host), begun) in hosts.iter().enumerate().zip(begun) {
        let Host::Tcp(name) = host else { continue };
        let port = port_of(i);
        let entry = |addr| Entry {
            name: name.clone(),
            addr,
            port,
        };
        let addrs = match (name.parse::<IpAddr>(), begun) {
            (Ok(addr), _) => Ok(vec![addr]),
            (Err(_), Some(Ok(pending))) => lookups
                .wait(&pending, Some(deadline))
                .map(|a| a.iter().map(SocketAddr::ip).collect()),
            (Err(_), Some(Err(e))) => Err(e),
            (Err(_), None) => continue,
        };
        match addrs {
            Ok(addrs) => {
                let mut group: Vec<Entry> = Vec::new();
                for a in addrs {
                    if !group.iter().any(|e| e.addr == a) {
                        group.push(entry(a));
                    }
                }
                if group.is_empty() {
                    failures.push(format!("looking up {name}: no address"));
                }
                groups.push(group);
            }
            Err(e) => failures.push(format!("looking up {name}: {e}")),
        }
    }
    let mut out = without_hosts(config);
    // libpq's order under load_balance_hosts=random: the hosts shuffled,
    // then each host's addresses (not every address alike, which would
    // favour a host with more of them).
    if config.get_load_balance_hosts() == LoadBalanceHosts::Random {
        let mut rng = rand::rng();
        groups.shuffle(&mut rng);
        for g in &mut groups {
            g.shuffle(&mut rng);
        }
        out.load_balance_hosts(LoadBalanceHosts::Disable);
    }
    let entries: Vec<Entry> = groups.into_iter().flatten().collect();
    if entries.is_empty() {
        return Err(if failures.is_empty() {
            "no host to connect to".into()
        } else {
            failures.join("; ")
        });
    }
    for e in &entries {
        out.host(&e.name);
        out.hostaddr(e.addr);
        out.port(e.port);
    }
    Ok(Cow::Owned(out))
}

/// A copy of `config` with no host, host address or port (`Config` can add
/// to those lists but not empty them).
fn without_hosts(config: &Config) -> Config {
    let mut out = Config::new();
    if let Some(v) = config.get_user() {
        out.user(v);
    }
    if let Some(v) = config.get_password() {
        out.password(v);
    }
    if let Some(v) = config.get_dbname() {
        out.dbname(v);
    }
    if let Some(v) = config.get_options() {
        out.options(v);
    }
    if let Some(v) = config.get_application_name() {
        out.application_name(v);
    }
    out.ssl_mode(config.get_ssl_mode());
    out.ssl_negotiation(config.get_ssl_negotiation());
    if let Some(v) = config.get_connect_timeout() {
        out.connect_timeout(*v);
    }
    if let Some(v) = config.get_tcp_user_timeout() {
        out.tcp_user_timeout(*v);
    }
    out.keepalives(config.get_keepalives());
    out.keepalives_idle(config.get_keepalives_idle());
    if let Some(v) = config.get_keepalives_interval() {
        out.keepalives_interval(v);
    }
    if let Some(v) = config.get_keepalives_retries() {
        out.keepalives_retries(v);
    }
    out.target_session_attrs(config.get_target_session_attrs());
    out.channel_binding(config.get_channel_binding());
    out.load_balance_hosts(config.get_load_balance_hosts());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::str::FromStr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn config(url: &str) -> Config {
        Config::from_str(url).expect("a URL")
    }

    /// Every setting but the hosts survives the copy (compared whole, so a
    /// setting a newer tokio-postgres adds and the copy misses fails here).
    #[test]
    fn the_copy_keeps_every_setting_but_the_hosts() {
        let url = "postgres://alice:pw@db.test:6543/reports?options=-c%20x%3Dy\
                   &application_name=app&sslmode=require&sslnegotiation=direct\
                   &connect_timeout=3&tcp_user_timeout=4&keepalives=0\
                   &keepalives_idle=5&keepalives_interval=6&keepalives_retries=7\
                   &target_session_attrs=read-write&channel_binding=require\
                   &load_balance_hosts=random";
        let full = config(url);
        let mut copy = without_hosts(&full);
        copy.host("db.test");
        copy.port(6543);
        assert!(copy == full, "{copy:?} != {full:?}");
    }

    #[test]
    fn each_address_of_each_name_is_tried_under_its_name_in_order() {
        let lookups = NameLookups::with(4, |name| match name {
            "a.test:1" => Ok(vec![
                "10.0.0.1:1".parse().expect("addr"),
                "[fd00::1]:1".parse().expect("addr"),
                "10.0.0.1:1".parse().expect("addr"),
            ]),
            "gone.test:2" => Err(io::Error::other("no such host")),
            _ => Ok(vec!["10.0.0.3:3".parse().expect("addr")]),
        });
        let c = config("postgres://u@a.test:1,gone.test:2,10.0.0.9:3,c.test:3/db");
        let out = resolve(&c, &lookups, Duration::from_secs(5)).expect("resolved");
        let names: Vec<_> = out
            .get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(n) => n.as_str(),
                Host::Unix(_) => "unix",
            })
            .collect();
        assert_eq!(names, ["a.test", "a.test", "10.0.0.9", "c.test"]);
        let addrs: Vec<String> = out.get_hostaddrs().iter().map(|a| a.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1", "fd00::1", "10.0.0.9", "10.0.0.3"]);
        assert_eq!(out.get_ports(), [1, 1, 3, 3]);
    }

    #[test]
    fn nothing_to_look_up_leaves_the_config_alone() {
        let lookups = NameLookups::with(4, |_| panic!("looked up"));
        for url in [
            "postgres://u@127.0.0.1:5/db",
            "postgres://u@%2Ftmp/db",
            "postgres://u@db.test/db?hostaddr=10.0.0.1",
            "postgres://u@db.test,%2Ftmp/db",
            // Three hosts, two ports: tokio-postgres's own error.
            "postgres://u@a.test,b.test,c.test/db?port=1,2",
        ] {
            let c = config(url);
            let out = resolve(&c, &lookups, Duration::from_secs(1)).expect("unchanged");
            assert!(matches!(out, Cow::Borrowed(_)), "{url}");
        }
    }

    #[test]
    fn a_hung_lookup_fails_the_attempt_in_time_and_the_next_attempts_wait_on_it() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = std::sync::Mutex::new(released);
        let lookups = NameLookups::with(4, move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = released
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .recv();
            Ok(vec!["10.0.0.5:5432".parse().expect("addr")])
        });
        let c = config("postgres://u@hung.test/db");
        for _ in 0..10 {
            let e = resolve(&c, &lookups, Duration::from_millis(10)).expect_err("it hangs");
            assert_eq!(
                e,
                "looking up hung.test: no answer from the resolver in time"
            );
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one lookup for 10 attempts"
        );
        release.send(()).expect("the lookup waits");
        let out = resolve(&c, &lookups, Duration::from_secs(5)).expect("its late answer");
        assert_eq!(
            out.get_hostaddrs(),
            ["10.0.0.5".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// Under load_balance_hosts=random the hosts are shuffled and then each
    /// host's addresses: a host's addresses stay together.
    #[test]
    fn random_order_shuffles_hosts_then_their_addresses() {
        let lookups = NameLookups::with(4, |name| {
            let last = if name.starts_with('a') { 1 } else { 2 };
            Ok((0..3)
                .map(|k| format!("10.0.{last}.{k}:5").parse().expect("addr"))
                .collect())
        });
        let c = config("postgres://u@a.test:5,b.test:5/db?load_balance_hosts=random");
        let mut orders = std::collections::HashSet::new();
        for _ in 0..50 {
            let out = resolve(&c, &lookups, Duration::from_secs(5)).expect("resolved");
            assert_eq!(out.get_load_balance_hosts(), LoadBalanceHosts::Disable);
            let names: Vec<_> = out
                .get_hosts()
                .iter()
                .map(|h| match h {
                    Host::Tcp(n) => n.clone(),
                    Host::Unix(_) => String::new(),
                })
                .collect();
            assert!(
                names
                    == ["a.test"; 3]
                        .iter()
                        .chain(&["b.test"; 3])
                        .copied()
                        .collect::<Vec<_>>()
                    || names
                        == ["b.test"; 3]
                            .iter()
                            .chain(&["a.test"; 3])
                            .copied()
                            .collect::<Vec<_>>(),
                "{names:?}"
            );
            orders.insert(out.get_hostaddrs().to_vec());
        }
        assert!(orders.len() > 2, "50 shuffles, {} orders", orders.len());
    }
}
