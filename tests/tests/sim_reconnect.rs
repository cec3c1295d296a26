//! Outages on a simulated network: the client reconnects by itself and
//! every report still arrives, once.

use std::time::Duration;

use quic_report_core::{ClientEvent, DisconnectReason};
use quic_report_tests::{NetConfig, Sim, seed_or};

#[test]
fn client_reconnects_after_server_gone_longer_than_idle_timeout() {
    let mut sim = Sim::new(seed_or(10), NetConfig::default());
    let c = sim.add_client(|_| {});
    sim.schedule_reports(c, 60, Duration::from_secs(2));
    sim.run_for(Duration::from_secs(20));
    let before = sim.records.len();
    assert!(
        before >= 9,
        "reports flowed before the outage{}",
        sim.context()
    );
    sim.kill_server();
    // Five virtual minutes with no server: far past the 10 s idle timeout.
    sim.run_for(Duration::from_secs(300));
    assert_eq!(
        sim.records.len(),
        before,
        "nothing recorded while down{}",
        sim.context()
    );
    sim.start_server();
    let ok = sim.run_until(Duration::from_secs(120), Sim::all_acked);
    assert!(
        ok,
        "not every report was acknowledged after the restart{}",
        sim.context()
    );
    sim.assert_exactly_once();
    let events = &sim.clients[c].events;
    let disconnects = events
        .iter()
        .filter(|(_, e)| matches!(e, ClientEvent::Disconnected { .. }))
        .count();
    let connects = events
        .iter()
        .filter(|(_, e)| matches!(e, ClientEvent::Connected { .. }))
        .count();
    assert!(
        disconnects >= 1 && connects >= 2,
        "reconnected{}",
        sim.context()
    );
    let reasons = sim.clients[c].disconnect_reasons();
    assert!(
        reasons.iter().all(|r| !r.is_permanent()),
        "no permanent failure: {reasons:?}{}",
        sim.context()
    );
    assert!(
        reasons.iter().any(|r| matches!(
            r,
            DisconnectReason::NoResponse | DisconnectReason::IdleTimeout
        )),
        "the dead server was noticed by timeout: {reasons:?}{}",
        sim.context()
    );
}

#[test]
fn graceful_shutdown_closes_every_connection_and_clients_come_back() {
    use quic_report_core::config::codes;
    let mut sim = Sim::new(seed_or(11), NetConfig::default());
    for _ in 0..3 {
        let c = sim.add_client(|_| {});
        sim.schedule_reports(c, 10, Duration::from_secs(1));
    }
    sim.run_for(Duration::from_secs(3));
    let now = sim.clock.now();
    let server = sim.server.as_mut().expect("running");
    assert_eq!(server.connections(), 3);
    server.close_all(now);
    sim.drain();
    let server = sim.server.as_ref().expect("running");
    assert!(
        server.is_closed(),
        "every CONNECTION_CLOSE sent and reported{}",
        sim.context()
    );
    let closed = sim
        .trace
        .iter()
        .filter(|l| l.contains("closed c") && l.contains("closed by us (0x1"))
        .count();
    assert_eq!(
        closed,
        3,
        "one ConnectionClosed per connection{}",
        sim.context()
    );
    sim.kill_server();
    sim.run_for(Duration::from_millis(500));
    sim.start_server();
    let ok = sim.run_until(Duration::from_secs(60), Sim::all_acked);
    assert!(
        ok,
        "every report acknowledged after the restart{}",
        sim.context()
    );
    sim.assert_exactly_once();
    for c in &sim.clients {
        let told = c.events.iter().any(|(_, e)| {
            matches!(e, ClientEvent::Disconnected { reason: DisconnectReason::PeerClosed { code, .. } } if *code == codes::SHUTTING_DOWN)
        });
        assert!(
            told,
            "each client was told the server is shutting down{}",
            sim.context()
        );
    }
}

/// A server that takes every handshake and closes the connection at once
/// (overloaded, shedding load): the client's delay between attempts grows
/// as after any failed attempt, since no connection carried an answer. It
/// started over at every handshake, so such a server met a reconnect at
/// every first step (about ten a second per client) for as long as it
/// lasted. Once the server works again, every report arrives, once.
#[test]
fn a_server_that_closes_at_once_meets_a_growing_backoff() {
    let mut sim = Sim::new(seed_or(12), NetConfig::default());
    sim.close_on_open = true;
    let c = sim.add_client(|_| {});
    sim.schedule_reports(c, 3, Duration::from_millis(100));
    sim.run_for(Duration::from_secs(10));
    let delays: Vec<Duration> = sim.clients[c]
        .events
        .iter()
        .filter_map(|(at, e)| match e {
            ClientEvent::ReconnectScheduled { at: when, .. } => Some((*at, *when)),
            _ => None,
        })
        .map(|(at, when)| {
            let then = sim.clock.now() - (sim.clock.elapsed() - at);
            when.saturating_duration_since(then)
        })
        .collect();
    let opened = sim
        .server_events
        .iter()
        .filter(|e| matches!(e, quic_report_core::ServerEvent::ConnectionOpened { .. }))
        .count();
    assert!(opened >= 3, "the server took handshakes{}", sim.context());
    assert!(
        delays.len() <= 16,
        "{} attempts in 10 s: {delays:?}{}",
        delays.len(),
        sim.context()
    );
    assert!(
        delays
            .iter()
            .rev()
            .take(3)
            .all(|d| *d >= Duration::from_millis(500)),
        "the last delays are near the cap: {delays:?}{}",
        sim.context()
    );
    sim.close_on_open = false;
    let ok = sim.run_until(Duration::from_secs(30), Sim::all_acked);
    assert!(ok, "every report acknowledged{}", sim.context());
    sim.assert_exactly_once();
}

/// An on-path copy of a client's resumed connection (its ClientHello and
/// 0-RTT reports, and the rest of its packets), replayed to a server with
/// the same ticket key: 0-RTT keys come from the session alone, so the
/// server can read those reports, but the copy cannot finish the handshake
/// (its Finished answers another server's key share), and nothing is read
/// before the handshake completes. Nothing is recorded a second time, even
/// by a server whose duplicate filter is empty.
#[test]
fn a_replayed_zero_rtt_flight_records_nothing() {
    let mut sim = Sim::new(seed_or(13), NetConfig::default());
    sim.server_cfg.secret = Some(quic_report_core::ServerSecret::from_bytes([7; 32]));
    sim.start_server();
    let c = sim.add_client(|_| {});
    sim.schedule_reports(c, 40, Duration::from_millis(250));
    sim.run_for(Duration::from_secs(3));
    // A restart: the client resumes, with 0-RTT. Everything it sends the
    // new server is captured.
    sim.kill_server();
    sim.run_for(Duration::from_millis(400));
    sim.start_server();
    sim.captured = Some(Vec::new());
    sim.assert_all_acked_once_resumed_with_zero_rtt(c);
    let captured = sim.captured.take().expect("captured");
    let recorded = sim.records.len();
    // The replay, to a fresh server (same secret, empty filter).
    sim.kill_server();
    sim.start_server();
    let before = sim.server_events.len();
    for mut p in captured {
        let _ = sim.inject(p.from, &mut p.data);
    }
    sim.run_for(Duration::from_secs(15));
    let replayed = &sim.server_events[before..];
    // The replay reached the server: a handshake began and was given up.
    assert!(
        replayed.iter().any(|e| matches!(
            e,
            quic_report_core::ServerEvent::ConnectionClosed {
                established: false,
                ..
            }
        )),
        "the replayed connection was never seen{}",
        sim.context()
    );
    assert!(
        !replayed
            .iter()
            .any(|e| matches!(e, quic_report_core::ServerEvent::Report { .. })),
        "no replayed report read{}",
        sim.context()
    );
    assert_eq!(sim.records.len(), recorded, "nothing recorded again");
}

/// A datagram from the server's address that quiche drops (it cannot be
/// decrypted: a stray packet of an old connection, garbage) does not count
/// as the server answering: the attempt still ends at the connect timeout
/// (1 s), not at the idle timeout.
#[test]
fn a_stray_datagram_does_not_stretch_the_connect_timeout() {
    let mut sim = Sim::new(seed_or(14), NetConfig::default());
    sim.kill_server();
    let c = sim.add_client(|_| {});
    sim.schedule_reports(c, 1, Duration::from_millis(10));
    sim.run_for(Duration::from_millis(100));
    let (now, from, to) = (sim.clock.now(), sim.server_addr, sim.clients[c].addr);
    let mut stray = vec![0x40u8; 60];
    stray[1..]
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = i as u8);
    // It reached the connection (an error would mean it stopped before:
    // no connection, another peer), where quiche takes and drops it.
    let taken = sim.clients[c]
        .client
        .handle_datagram(now, from, to, &mut stray);
    assert!(taken.is_ok(), "the stray reached quiche: {taken:?}");
    sim.run_for(Duration::from_secs(3));
    let at = |want: fn(&ClientEvent) -> bool| {
        sim.clients[c]
            .events
            .iter()
            .find(|(_, e)| want(e))
            .map(|(t, _)| *t)
    };
    let started = at(|e| matches!(e, ClientEvent::Connecting { .. })).expect("an attempt");
    let ended = at(|e| matches!(e, ClientEvent::Disconnected { .. }));
    assert!(
        ended.is_some_and(|t| t - started < Duration::from_millis(1500)),
        "the first attempt ended at its connect timeout: {started:?} .. {ended:?}{}",
        sim.context()
    );
}

/// A restarted server answers each packet of the client's old connection
/// with a stateless reset. The client's next connection resumes the old
/// session, and quiche takes the old connection's reset token from it, so
/// a reset meant for the old connection can close the new one while it
/// connects. That is a failed attempt (backoff), not "the server
/// restarted, come back at once" again and again.
#[test]
fn a_reset_while_connecting_is_a_failed_attempt() {
    let mut sim = Sim::new(seed_or(15), NetConfig::default());
    sim.server_cfg.secret = Some(quic_report_core::ServerSecret::from_bytes([5; 32]));
    sim.start_server();
    let c = sim.add_client(|_| {});
    sim.schedule_reports(c, 400, Duration::from_millis(5));
    sim.run_for(Duration::from_millis(600));
    sim.kill_server();
    sim.run_for(Duration::from_millis(30));
    sim.start_server();
    assert!(
        sim.run_until(Duration::from_secs(60), Sim::all_acked),
        "{}",
        sim.context()
    );
    sim.assert_exactly_once();
    // The scenario happened: an attempt was closed by a reset meant for
    // the connection before.
    assert!(
        sim.clients[c].events.iter().any(|(_, e)| matches!(
            e,
            ClientEvent::Disconnected {
                reason: DisconnectReason::HandshakeFailed(why)
            } if why.contains("stateless reset while connecting")
        )),
        "no attempt met a stale reset: the test tests nothing{}",
        sim.context()
    );
    // Every Reset closed an established connection.
    let mut established = false;
    for (t, e) in &sim.clients[c].events {
        match e {
            ClientEvent::Connecting { .. } => established = false,
            ClientEvent::Connected { .. } => established = true,
            ClientEvent::Disconnected {
                reason: DisconnectReason::Reset,
            } => assert!(
                established,
                "a Reset of a connection still connecting, at {t:?}{}",
                sim.context()
            ),
            _ => {}
        }
    }
}

/// A server that answers every first Initial with a Retry, across a link
/// whose round trip (600 ms) makes the Retry, the new Initial and the
/// server's reply take longer than the 1 s connect timeout: the Retry is
/// the server answering, so the attempt goes on instead of timing out
/// every time (each new attempt would get a Retry again).
#[test]
fn a_retry_counts_as_the_server_answering() {
    let net = NetConfig {
        delay: Duration::from_millis(300),
        ..NetConfig::default()
    };
    let mut sim = Sim::new(seed_or(17), net);
    sim.server_cfg.retry = quic_report_core::RetryMode::Always;
    sim.start_server();
    let c = sim.add_client(|_| {});
    sim.schedule_reports(c, 3, Duration::from_millis(500));
    assert!(
        sim.run_until(Duration::from_secs(60), Sim::all_acked),
        "{}",
        sim.context()
    );
    sim.assert_exactly_once();
    let timed_out = sim.clients[c].events.iter().any(|(_, e)| {
        matches!(
            e,
            ClientEvent::Disconnected {
                reason: DisconnectReason::ConnectTimeout
            }
        )
    });
    assert!(!timed_out, "an attempt timed out{}", sim.context());
}

/// A server that resets every connection before answering anything (a
/// stale steering byte, forged resets): the first reset after an answer
/// brings the client back at once, as a restart should; the next ones,
/// with no answer between, wait out the growing backoff (each was an
/// immediate reconnect, a storm for as long as it lasted).
#[test]
fn resets_with_no_answer_between_meet_the_backoff() {
    let mut sim = Sim::new(seed_or(16), NetConfig::default());
    sim.server_cfg.secret = Some(quic_report_core::ServerSecret::from_bytes([6; 32]));
    sim.start_server();
    let c = sim.add_client(|_| {});
    sim.schedule_reports(c, 1, Duration::from_millis(5));
    assert!(
        sim.run_until(Duration::from_secs(10), Sim::all_acked),
        "{}",
        sim.context()
    );
    sim.captured = Some(Vec::new());
    let from = sim.clients[c].addr;
    let mut delays = Vec::new();
    for round in 0..4 {
        // The client's latest 1-RTT datagram, to hand a server that does
        // not know its connection.
        let connected = |s: &Sim| {
            s.captured
                .as_ref()
                .and_then(|p| {
                    p.iter()
                        .rev()
                        .find(|p| p.from == from && p.data[0] & 0x80 == 0)
                })
                .is_some()
        };
        assert!(
            sim.run_until(Duration::from_secs(30), connected),
            "round {round}: no 1-RTT datagram{}",
            sim.context()
        );
        let mut packet = sim
            .captured
            .replace(Vec::new())
            .and_then(|p| {
                p.into_iter()
                    .rev()
                    .find(|p| p.from == from && p.data[0] & 0x80 == 0)
            })
            .expect("found above")
            .data;
        let events = sim.clients[c].events.len();
        sim.kill_server();
        sim.start_server();
        sim.inject(from, &mut packet);
        let reset = |s: &Sim| {
            s.clients[c].events[events..]
                .iter()
                .any(|(_, e)| matches!(e, ClientEvent::ReconnectScheduled { .. }))
        };
        assert!(
            sim.run_until(Duration::from_secs(5), reset),
            "round {round}: not reset{}",
            sim.context()
        );
        let (at, e) = sim.clients[c].events[events..]
            .iter()
            .find(|(_, e)| matches!(e, ClientEvent::ReconnectScheduled { .. }))
            .expect("found above");
        assert!(
            sim.clients[c].events[events..]
                .iter()
                .any(|(_, e)| matches!(
                    e,
                    ClientEvent::Disconnected {
                        reason: DisconnectReason::Reset
                    }
                )),
            "round {round}: closed by the reset{}",
            sim.context()
        );
        if let ClientEvent::ReconnectScheduled { at: when, .. } = e {
            let then = sim.clock.now() - (sim.clock.elapsed() - *at);
            delays.push(when.saturating_duration_since(then));
        }
    }
    assert_eq!(delays[0], Duration::ZERO, "the first: at once ({delays:?})");
    assert!(
        delays[1..].iter().all(|d| *d > Duration::ZERO),
        "the next ones wait: {delays:?}"
    );
    assert!(
        delays[3] > delays[1],
        "and wait longer each time: {delays:?}"
    );
    assert_eq!(sim.clients[c].acked.len(), 1);
}

/// A client whose server has no address yet (its name does not resolve at
/// boot) sends nothing: each attempt fails at once and the backoff grows.
/// Once the driver gives it a path, every report submitted meanwhile
/// arrives, once.
#[test]
fn a_client_without_a_server_address_sends_nothing_until_it_has_one() {
    let mut sim = Sim::new(seed_or(17), NetConfig::default());
    let c = sim.add_client(|cfg| cfg.server = None);
    sim.schedule_reports(c, 10, Duration::from_secs(2));
    sim.run_for(Duration::from_secs(40));
    let from = sim.clients[c].addr;
    assert_eq!(
        sim.net.stats.sent,
        0,
        "a datagram went out{}",
        sim.context()
    );
    assert!(sim.records.is_empty(), "{}", sim.context());
    let events = &sim.clients[c].events;
    let reasons = sim.clients[c].disconnect_reasons();
    assert!(
        reasons.len() >= 3 && reasons.iter().all(|r| *r == DisconnectReason::NoAddress),
        "every attempt failed for want of an address: {reasons:?}{}",
        sim.context()
    );
    // The backoff grows to its cap (1 s; each delay at least half of it):
    // no attempt every few milliseconds.
    let scheduled: Vec<Duration> = events
        .iter()
        .filter_map(|(t, e)| matches!(e, ClientEvent::ReconnectScheduled { .. }).then_some(*t))
        .collect();
    let gaps: Vec<Duration> = scheduled.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.len() > 20 && gaps[5..].iter().all(|g| *g >= Duration::from_millis(500)),
        "attempts at {scheduled:?}{}",
        sim.context()
    );
    sim.clients[c].client.set_path(from, Some(sim.server_addr));
    assert!(
        sim.run_until(Duration::from_secs(90), Sim::all_acked),
        "not every report arrived once the address was known{}",
        sim.context()
    );
    sim.assert_exactly_once();
}

/// A new path given while connected leaves the connection on its own: the
/// server's datagrams are still taken and reports flow. The next attempt,
/// after the server went away, takes the new path (here an address where
/// nothing answers), and the one after the path is set back reaches the
/// server again.
#[test]
fn a_new_path_is_taken_by_the_next_attempt_not_the_connection_under_way() {
    let mut sim = Sim::new(seed_or(18), NetConfig::default());
    let c = sim.add_client(|_| {});
    sim.schedule_reports(c, 30, Duration::from_secs(1));
    sim.run_for(Duration::from_secs(5));
    let before = sim.records.len();
    assert!(before >= 3, "reports flowed{}", sim.context());
    let local = sim.clients[c].addr;
    let nowhere: std::net::SocketAddr = "127.0.0.9:4433".parse().expect("an address");
    sim.clients[c].client.set_path(local, Some(nowhere));
    sim.run_for(Duration::from_secs(5));
    assert!(
        sim.records.len() >= before + 4,
        "the connection under way kept its path: {} -> {} records{}",
        before,
        sim.records.len(),
        sim.context()
    );
    let events = sim.clients[c].events.len();
    sim.kill_server();
    sim.start_server();
    // The restarted server does not know the connection; the next attempts
    // go to `nowhere` and are not answered.
    sim.run_for(Duration::from_secs(30));
    let recorded = sim.records.len();
    assert!(
        sim.clients[c].events[events..]
            .iter()
            .all(|(_, e)| !matches!(e, ClientEvent::Connected { .. })),
        "connected while the path led nowhere{}",
        sim.context()
    );
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.records.len(), recorded, "{}", sim.context());
    sim.clients[c].client.set_path(local, Some(sim.server_addr));
    assert!(
        sim.run_until(Duration::from_secs(90), Sim::all_acked),
        "{}",
        sim.context()
    );
    sim.assert_exactly_once();
}
