//! The client loop with a server name ([`ServerLookup`]) over real UDP on
//! 127.0.0.1: a name that does not resolve at start, and a server that
//! moves to another address mid-run. The lookups are the test's own
//! functions (no DNS); everything else is real. Bounded by watchdogs;
//! asserts on what the servers recorded and what the client saw.

mod common;

use common::{client_options, sample, start_server, watchdog};

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use quic_report_core::{ClientEvent, DisconnectReason, Report};
use quic_report_mio::{ClientDriver, ServerLookup};

/// Runs `driver` on a thread: its end, and every event it emits with the
/// local port of the socket the client's next attempt takes.
#[allow(clippy::type_complexity)]
fn run_on_a_thread(
    driver: ClientDriver,
) -> (
    thread::JoinHandle<Result<quic_report_mio::ClientSummary, quic_report_mio::DriverError>>,
    mpsc::Receiver<(ClientEvent, u16)>,
) {
    let (events_tx, events) = mpsc::channel();
    let client = thread::spawn(move || {
        driver.run(&mut |ev, c| {
            let _ = events_tx.send((ev.clone(), c.path().0.port()));
        })
    });
    (client, events)
}

fn seqs(recorded: &mpsc::Receiver<Report>) -> Vec<u64> {
    let mut seqs: Vec<u64> = recorded.try_iter().filter_map(|r| r.seq).collect();
    seqs.sort_unstable();
    seqs
}

/// A device that boots before its network (or its DNS) is up: the client
/// starts anyway, sends nothing while the name does not resolve, and
/// reports everything once it does.
#[test]
fn a_server_name_that_does_not_resolve_at_start_is_looked_up_until_it_does() {
    let (addr, server_stop, recorded, server) = start_server();
    let lookups = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&lookups);
    let mut opts = client_options(addr);
    opts.config.server = None;
    opts.lookup = Some(ServerLookup::with("collector.test:4433", move |_| {
        if counted.fetch_add(1, Ordering::SeqCst) < 2 {
            Err(io::Error::new(io::ErrorKind::NotFound, "no network yet"))
        } else {
            Ok(vec![addr])
        }
    }));
    opts.count = Some(3);
    let driver = ClientDriver::new(opts).expect("a client without an address starts");
    let _dog = watchdog(driver.stop_handle(), Duration::from_secs(30));
    let samples = driver.sample_sender();
    for v in [0.25, 0.5, 0.75] {
        samples.send(sample(v)).expect("loop alive");
    }
    let mut reasons = Vec::new();
    let summary = driver
        .run(&mut |ev, _| {
            if let ClientEvent::Disconnected { reason } = ev {
                reasons.push(reason.clone());
            }
        })
        .expect("the client ends after its count");
    server_stop.stop();
    server.join().expect("server thread").expect("server ok");
    assert_eq!(summary.stats.acknowledged, 3, "reasons: {reasons:?}");
    assert_eq!(seqs(&recorded), [1, 2, 3]);
    let no_address = reasons
        .iter()
        .filter(|r| **r == DisconnectReason::NoAddress)
        .count();
    assert!(
        no_address >= 2 && lookups.load(Ordering::SeqCst) >= 3,
        "attempts failed for want of an address until the third lookup: {reasons:?}"
    );
}

/// A resolver that hangs at boot (a stuck NSS module, DNS that drops
/// queries): the client starts anyway, takes samples meanwhile, and once
/// the lookup answers reports them all. Before, `ClientDriver::new` waited
/// for the lookup on the caller's thread, as long as it hung.
#[test]
fn a_lookup_that_hangs_at_start_does_not_keep_the_client_from_starting() {
    let (addr, server_stop, recorded, server) = start_server();
    let (release, released) = mpsc::channel::<()>();
    let released = Mutex::new(released);
    let mut opts = client_options(addr);
    opts.config.server = None;
    opts.lookup = Some(ServerLookup::with("collector.test:4433", move |_| {
        // Hangs until the test lets it answer (or gives up, ending it).
        let _ = released
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .recv();
        Ok(vec![addr])
    }));
    opts.count = Some(3);
    let (built_tx, built) = mpsc::channel();
    thread::spawn(move || {
        let _ = built_tx.send(ClientDriver::new(opts));
    });
    let driver = built
        .recv_timeout(Duration::from_secs(30))
        .expect("ClientDriver::new returns while the lookup hangs")
        .expect("a client whose lookup hangs starts");
    let _dog = watchdog(driver.stop_handle(), Duration::from_secs(30));
    let samples = driver.sample_sender();
    for v in [0.25, 0.5, 0.75] {
        samples.send(sample(v)).expect("loop alive");
    }
    let (client, events) = run_on_a_thread(driver);
    // Attempts fail for want of an address while the lookup hangs.
    loop {
        match events.recv_timeout(Duration::from_secs(20)) {
            Ok((ClientEvent::Disconnected { reason }, _)) => {
                assert_eq!(reason, DisconnectReason::NoAddress);
                break;
            }
            Ok((ClientEvent::Acknowledged { .. }, _)) => panic!("acknowledged with no address"),
            Ok(_) => {}
            Err(e) => panic!("no attempt while the lookup hangs: {e}"),
        }
    }
    release.send(()).expect("the lookup waits");
    let summary = client
        .join()
        .expect("client thread")
        .expect("the client ends after its count");
    server_stop.stop();
    server.join().expect("server thread").expect("server ok");
    assert_eq!(summary.stats.acknowledged, 3);
    assert_eq!(seqs(&recorded), [1, 2, 3]);
}

/// A server that moves (a DNS failover, a new host): once the old one is
/// gone, the next attempts go where the name points now, on a new socket,
/// and every report is recorded once across the two.
#[test]
fn a_server_that_moves_is_found_at_its_new_address() {
    let (old, old_stop, old_recorded, old_server) = start_server();
    let (new, new_stop, new_recorded, new_server) = start_server();
    let points_to = Arc::new(Mutex::new(old));
    let pointer = Arc::clone(&points_to);
    let mut opts = client_options(old);
    opts.lookup = Some(ServerLookup::with("collector.test:4433", move |_| {
        let at: SocketAddr = *pointer.lock().map_err(|_| io::Error::other("poisoned"))?;
        Ok(vec![at])
    }));
    opts.count = Some(6);
    let driver = ClientDriver::new(opts).expect("client binds");
    let stop = driver.stop_handle();
    let _dog = watchdog(stop.clone(), Duration::from_secs(40));
    let samples = driver.sample_sender();
    let (client, events) = run_on_a_thread(driver);
    let acked = |n: usize, what: &str| {
        let mut seen = 0;
        while seen < n {
            match events.recv_timeout(Duration::from_secs(20)) {
                Ok((ClientEvent::Acknowledged { .. }, _)) => seen += 1,
                Ok(_) => {}
                Err(e) => panic!("{what}: {seen} of {n} acknowledged ({e})"),
            }
        }
    };
    for v in [1.0, 2.0, 3.0] {
        samples.send(sample(v)).expect("loop alive");
    }
    acked(3, "at the old address");
    *points_to.lock().expect("not poisoned") = new;
    old_stop.stop();
    old_server
        .join()
        .expect("server thread")
        .expect("server ok");
    for v in [4.0, 5.0, 6.0] {
        samples.send(sample(v)).expect("loop alive");
    }
    acked(3, "at the new address");
    let summary = client
        .join()
        .expect("client thread")
        .expect("the client ends after its count");
    new_stop.stop();
    new_server
        .join()
        .expect("server thread")
        .expect("server ok");
    assert_eq!(seqs(&old_recorded), [1, 2, 3]);
    assert_eq!(seqs(&new_recorded), [4, 5, 6]);
    assert_eq!(summary.stats.acknowledged, 6);
    assert!(summary.stats.connections >= 2);
}

/// A server restarted on the same port under a live connection (killed
/// without a word: `abort`) answers the client's next packet with a
/// stateless reset. The client's next attempt, at once, goes out on its new
/// socket and connects: the socket is renewed before that attempt starts,
/// not under it (an attempt whose socket was replaced after its Initial
/// left timed out: its answer went to the closed port).
#[test]
fn the_attempt_after_a_stateless_reset_connects_on_its_new_socket() {
    use common::{server_options, start_server_with};
    let (tx, recorded) = mpsc::channel();
    let sink = move |r: &Report| -> io::Result<()> {
        let _ = tx.send(r.clone());
        Ok(())
    };
    let (addr, first_stop, first) = start_server_with(server_options(), sink.clone());
    let mut opts = client_options(addr);
    opts.lookup = Some(ServerLookup::with("collector.test:4433", move |_| {
        Ok(vec![addr])
    }));
    let driver = ClientDriver::new(opts).expect("client binds");
    let stop = driver.stop_handle();
    let _dog = watchdog(stop.clone(), Duration::from_secs(40));
    let samples = driver.sample_sender();
    let (client, events) = run_on_a_thread(driver);
    let mut seen = Vec::new();
    let until_acked = |seq: u64, seen: &mut Vec<(ClientEvent, u16)>| loop {
        match events.recv_timeout(Duration::from_secs(20)) {
            Ok((ev, port)) => {
                let done = matches!(ev, ClientEvent::Acknowledged { seq: s, .. } if s == seq);
                seen.push((ev, port));
                if done {
                    return;
                }
            }
            Err(e) => panic!("seq {seq} not acknowledged ({e}): {seen:?}"),
        }
    };
    samples.send(sample(1.0)).expect("loop alive");
    until_acked(1, &mut seen);
    // Let the last acknowledgements go both ways: a datagram of the client
    // to the port while no server holds it would come back as an ICMP
    // error (unreachable), not as the reset this is about. After that the
    // client sends nothing until the next sample (its keep-alive is 5 s).
    thread::sleep(Duration::from_millis(500));
    first_stop.abort();
    first.join().expect("server thread").expect("server ok");
    let mut again = server_options();
    again.listen = addr;
    let (_, second_stop, second) = start_server_with(again, sink);
    let before = seen.len();
    samples.send(sample(2.0)).expect("loop alive");
    until_acked(2, &mut seen);
    stop.stop();
    client
        .join()
        .expect("client thread")
        .expect("the client closes");
    second_stop.stop();
    second.join().expect("server thread").expect("server ok");
    let first_port = seen
        .iter()
        .find(|(e, _)| matches!(e, ClientEvent::Connected { .. }))
        .map(|(_, p)| *p)
        .expect("connected before the restart");
    let after: Vec<&(ClientEvent, u16)> = seen[before..]
        .iter()
        .filter(|(e, _)| {
            matches!(
                e,
                ClientEvent::Disconnected { .. } | ClientEvent::Connected { .. }
            )
        })
        .collect();
    assert!(
        matches!(
            after[..],
            [
                (
                    ClientEvent::Disconnected {
                        reason: DisconnectReason::Reset
                    },
                    _
                ),
                (ClientEvent::Connected { .. }, port),
                ..
            ] if *port != first_port
        ),
        "reset, then connected at the first attempt, from a new socket (first on port \
         {first_port}): {after:?}"
    );
    assert_eq!(seqs(&recorded), [1, 2]);
}

/// No address and no name to look one up by: refused at once, clearly,
/// rather than a client that retries nothing for ever.
#[test]
fn a_client_with_neither_address_nor_name_is_refused() {
    let mut opts = client_options(common::loopback());
    opts.config.server = None;
    match ClientDriver::new(opts) {
        Err(quic_report_mio::DriverError::InvalidOption(why)) => {
            assert!(why.contains("no server address"), "{why}");
        }
        other => panic!("expected InvalidOption, got {other:?}"),
    }
}
