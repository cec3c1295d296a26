//! Mutual TLS in the simulation: who may report, under which identity, and
//! that no identity can make another's reports disappear.
//!
//! The server requires client certificates signed by the development CA
//! (`certs/ca.pem`); the clients present `certs/clients/NAME.pem`.

use std::time::Duration;

use quic_report_core::config::codes;
use quic_report_core::{
    CertFiles, CertRefusal, ClientEvent, DisconnectReason, ServerEvent, ServerSecret,
};
use quic_report_tests::{NetConfig, Sim, cert_path, client_cert, seed_or};

/// A world whose server requires client certificates of the dev CA.
fn mtls_sim(seed: u64) -> Sim {
    let mut sim = Sim::new(seed_or(seed), NetConfig::default());
    sim.server_cfg.client_ca = Some(cert_path("ca.pem"));
    sim.server_cfg.secret = Some(ServerSecret::from_bytes([9; 32]));
    sim.start_server();
    sim
}

/// The test certificate `certs/test/NAME.pem` and its key.
fn test_cert(name: &str) -> CertFiles {
    CertFiles {
        cert_chain: cert_path(&format!("test/{name}.pem")),
        private_key: cert_path(&format!("test/{name}.key")),
    }
}

/// A client presenting `cert` (`None`: none at all) with `reports`
/// reports scheduled 200 ms apart; the world then runs for 10 s.
fn run_client_with(sim: &mut Sim, cert: Option<CertFiles>, reports: usize) -> usize {
    let c = sim.add_client(|cfg| cfg.client_cert = cert);
    sim.schedule_reports(c, reports, Duration::from_millis(200));
    sim.run_for(Duration::from_secs(10));
    c
}

fn failure(sim: &Sim, c: usize) -> Option<DisconnectReason> {
    sim.clients[c].events.iter().find_map(|(_, e)| match e {
        ClientEvent::Failed { reason } => Some(reason.clone()),
        _ => None,
    })
}

fn refusals(sim: &Sim) -> Vec<CertRefusal> {
    sim.server_events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::HandshakeRefused { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

fn nothing_read(sim: &Sim) {
    assert!(sim.records.is_empty(), "nothing recorded{}", sim.context());
    assert!(
        !sim.server_events.iter().any(|e| matches!(
            e,
            ServerEvent::Report { .. }
                | ServerEvent::Request { .. }
                | ServerEvent::StreamRejected { .. }
                | ServerEvent::ConnectionOpened { .. }
        )),
        "no stream of the refused connection was read{}",
        sim.context()
    );
}

#[test]
fn peer_without_certificate_is_refused_at_the_handshake() {
    let mut sim = mtls_sim(300);
    let c = run_client_with(&mut sim, None, 3);
    let Some(DisconnectReason::ClientCertificate(why)) = failure(&sim, c) else {
        panic!(
            "expected a client certificate failure, got {:?}{}",
            failure(&sim, c),
            sim.context()
        );
    };
    assert!(why.contains("certificate_required"), "{why}");
    assert_eq!(refusals(&sim), vec![CertRefusal::Missing]);
    assert_eq!(
        sim.server.as_ref().map(|s| s.stats().handshakes_refused),
        Some(1)
    );
    nothing_read(&sim);
}

#[test]
fn peer_without_certificate_sending_at_once_is_closed_with_certificate_required() {
    // A raw peer queues a report for right after its handshake: the server
    // closes with CRYPTO_ERROR certificate_required and reads none of it.
    let mut sim = mtls_sim(301);
    let r = sim.add_raw(&[quic_report_core::ALPN]);
    sim.raws[r].write(0, br#"{"client":"x","seq":1}"#, true);
    sim.run_for(Duration::from_secs(5));
    let err = sim.raws[r].conn.peer_error().cloned();
    assert!(
        err.as_ref()
            .is_some_and(|e| !e.is_app && e.error_code == codes::CERTIFICATE_REQUIRED),
        "closed with CRYPTO_ERROR 0x174: {err:?}{}",
        sim.context()
    );
    assert!(sim.raws[r].seen(0).data.is_empty(), "no answer");
    nothing_read(&sim);
}

#[test]
fn certificate_from_another_ca_is_refused() {
    let mut sim = mtls_sim(302);
    let c = run_client_with(&mut sim, Some(test_cert("other-ca-client")), 3);
    let Some(DisconnectReason::ClientCertificate(why)) = failure(&sim, c) else {
        panic!(
            "expected a client certificate failure, got {:?}{}",
            failure(&sim, c),
            sim.context()
        );
    };
    assert!(why.contains("unknown_ca"), "{why}");
    assert_eq!(refusals(&sim), vec![CertRefusal::Invalid { alert: 48 }]);
    nothing_read(&sim);
}

/// From review: a client certificate the server refuses for its dates
/// (certificate_expired) stopped the client for good, as a server
/// certificate out of date does not: the server's clock may be the wrong
/// one, and one server with a bad clock would stop a whole fleet. It is
/// retried with backoff; nothing is recorded meanwhile.
#[test]
fn an_expired_client_certificate_is_refused_and_retried() {
    let mut sim = mtls_sim(306);
    let c = run_client_with(&mut sim, Some(test_cert("expired")), 3);
    assert_eq!(failure(&sim, c), None, "gave up{}", sim.context());
    let out_of_date = sim.clients[c]
        .events
        .iter()
        .filter(|(_, e)| {
            matches!(
                e,
                ClientEvent::Disconnected {
                    reason: DisconnectReason::ClientCertificateOutOfDate(_)
                }
            )
        })
        .count();
    assert!(
        out_of_date >= 3,
        "retried {out_of_date} times{}",
        sim.context()
    );
    assert_eq!(refusals(&sim)[0], CertRefusal::Invalid { alert: 45 });
    nothing_read(&sim);
}

#[test]
fn certificate_with_two_common_names_is_refused() {
    let mut sim = mtls_sim(303);
    let c = run_client_with(&mut sim, Some(test_cert("two-cn")), 1);
    assert!(
        matches!(
            failure(&sim, c),
            Some(DisconnectReason::ClientCertificate(_))
        ),
        "{:?}{}",
        failure(&sim, c),
        sim.context()
    );
    assert!(matches!(
        refusals(&sim).as_slice(),
        [CertRefusal::UnusableName(_)]
    ));
    nothing_read(&sim);
}

#[test]
fn records_carry_the_certificate_identity() {
    let mut sim = mtls_sim(304);
    let c = sim.add_client(|cfg| cfg.client_cert = Some(client_cert("device-1")));
    sim.schedule_reports(c, 5, Duration::from_millis(200));
    assert!(
        sim.run_until(Duration::from_secs(30), Sim::all_acked),
        "{}",
        sim.context()
    );
    sim.assert_exactly_once();
    for r in &sim.records {
        assert_eq!(r.identity, "device-1");
        assert_eq!(r.fields["identity"], "device-1", "the record says so");
    }
}

#[test]
fn second_identity_claiming_first_clients_id_and_next_seqs_makes_it_lose_nothing() {
    let mut sim = mtls_sim(305);
    // The attacker (device-2) goes first: 100 reports under the victim's
    // client id, seqs 1..=100, so every seq the victim will use is taken.
    let attacker = sim.add_client(|cfg| {
        cfg.client_cert = Some(client_cert("device-2"));
        cfg.client_id = Some("victim".into());
    });
    sim.schedule_reports(attacker, 100, Duration::from_millis(10));
    assert!(
        sim.run_until(Duration::from_secs(60), Sim::all_acked),
        "{}",
        sim.context()
    );
    let victim = sim.add_client(|cfg| {
        cfg.client_cert = Some(client_cert("device-1"));
        cfg.client_id = Some("victim".into());
    });
    sim.schedule_reports(victim, 60, Duration::from_millis(50));
    assert!(
        sim.run_until(Duration::from_secs(120), Sim::all_acked),
        "{}",
        sim.context()
    );
    let of = |identity: &str| -> Vec<u64> {
        sim.records
            .iter()
            .filter(|r| r.identity == identity)
            .filter_map(|r| r.seq)
            .collect()
    };
    assert_eq!(
        of("device-1"),
        (1..=60).collect::<Vec<_>>(),
        "every one of the victim's reports recorded once, under its identity{}",
        sim.context()
    );
    assert_eq!(of("device-2"), (1..=100).collect::<Vec<_>>());
    let duplicates = sim.clients[victim].duplicate_acks();
    assert_eq!(
        duplicates, 0,
        "none of the victim's reports was a duplicate"
    );
}

#[test]
fn report_claiming_another_identity_is_forbidden() {
    let mut sim = mtls_sim(306);
    let cert = client_cert("device-2");
    let r = sim.add_raw_with(
        &[quic_report_core::ALPN],
        |cfg| {
            cfg.load_cert_chain_from_pem_file(cert.cert_chain.to_str().expect("utf-8"))
                .expect("cert");
            cfg.load_priv_key_from_pem_file(cert.private_key.to_str().expect("utf-8"))
                .expect("key");
        },
        None,
    );
    sim.raws[r].write(
        0,
        br#"{"client":"victim","seq":1,"identity":"device-1"}{"client":"mine","seq":1}"#,
        true,
    );
    sim.run_for(Duration::from_secs(3));
    let answers = sim.raws[r].seen(0).answers();
    assert_eq!(answers.len(), 2, "{answers:?}{}", sim.context());
    assert_eq!(answers[0]["code"], "forbidden", "{answers:?}");
    assert_eq!(answers[1]["ok"], true, "the stream carries on: {answers:?}");
    assert_eq!(answers[1]["received"]["identity"], "device-2");
    assert_eq!(sim.records.len(), 1);
    assert_eq!(sim.records[0].identity, "device-2");
}

#[test]
fn resumed_zero_rtt_connection_keeps_its_identity() {
    let mut sim = mtls_sim(307);
    let c = sim.add_client(|cfg| cfg.client_cert = Some(client_cert("device-1")));
    sim.schedule_reports(c, 40, Duration::from_millis(250));
    sim.run_for(Duration::from_secs(3));
    // The server crashes and comes back (same secret, so the same ticket
    // key): the client resumes its session and sends its queue in 0-RTT.
    sim.kill_server();
    sim.run_for(Duration::from_millis(400));
    let before = sim.server_events.len();
    sim.start_server();
    sim.assert_all_acked_once_resumed_with_zero_rtt(c);
    let after = &sim.server_events[before..];
    let opened = after
        .iter()
        .position(|e| matches!(e, ServerEvent::ConnectionOpened { .. }))
        .expect("a connection opened after the restart");
    let ServerEvent::ConnectionOpened {
        resumed, identity, ..
    } = &after[opened]
    else {
        unreachable!()
    };
    assert!(*resumed, "the server resumed the session{}", sim.context());
    assert_eq!(
        identity.as_str(),
        "device-1",
        "peer_cert() of the resumed session"
    );
    // Sent in 0-RTT, read once the handshake completed (a replayed 0-RTT
    // flight never completes it: `tests/tests/sim_reconnect.rs`).
    assert!(
        !after[..opened]
            .iter()
            .any(|e| matches!(e, ServerEvent::Report { .. })),
        "no report read before the handshake completed{}",
        sim.context()
    );
    let reports: Vec<_> = after[opened..]
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Report { report, .. } => Some(report),
            _ => None,
        })
        .collect();
    assert!(!reports.is_empty(), "{}", sim.context());
    for r in reports {
        assert_eq!(r.identity.as_str(), "device-1", "0-RTT report identity");
    }
    assert!(sim.records.iter().all(|r| r.identity == "device-1"));
}

#[test]
fn anonymous_session_ticket_resumed_against_a_server_now_requiring_certificates_is_refused() {
    // A server without --client-ca hands an anonymous client a session
    // ticket; it restarts with --client-ca and the same secret (so the
    // same ticket key). The client resumes that session and sends its
    // queue in 0-RTT: the session holds no certificate, so the connection
    // is refused and none of its early reports is read.
    let mut sim = Sim::new(seed_or(308), NetConfig::default());
    sim.server_cfg.secret = Some(ServerSecret::from_bytes([9; 32]));
    sim.start_server();
    let c = sim.add_client(|_| {});
    sim.schedule_reports(c, 40, Duration::from_millis(250));
    sim.run_for(Duration::from_secs(3));
    let before = sim.records.len();
    assert!(before > 0, "reported anonymously first{}", sim.context());
    sim.kill_server();
    sim.run_for(Duration::from_millis(400));
    sim.server_cfg.client_ca = Some(cert_path("ca.pem"));
    let events_before = sim.server_events.len();
    let sent_before = sim.clients[c].client.stats().sent;
    sim.start_server();
    sim.run_for(Duration::from_secs(10));

    let stats = sim.clients[c].client.stats();
    assert!(
        stats.sent > sent_before,
        "the client sent reports after the restart{}",
        sim.context()
    );
    let after = &sim.server_events[events_before..];
    assert!(
        after.iter().any(|e| matches!(
            e,
            ServerEvent::HandshakeRefused {
                reason: CertRefusal::Missing,
                ..
            }
        )),
        "refused for want of a certificate{}",
        sim.context()
    );
    assert!(
        !after.iter().any(|e| matches!(
            e,
            ServerEvent::Report { .. }
                | ServerEvent::ConnectionOpened { .. }
                | ServerEvent::StreamRejected { .. }
        )),
        "no report of the resumed session was read, in 0-RTT or after{}",
        sim.context()
    );
    assert_eq!(
        sim.records.len(),
        before,
        "nothing recorded after the restart{}",
        sim.context()
    );
    assert!(
        matches!(
            failure(&sim, c),
            Some(DisconnectReason::ClientCertificate(_))
        ),
        "the client is told it needs a certificate: {:?}{}",
        failure(&sim, c),
        sim.context()
    );
}

/// One identity holds at most `max_connections_per_identity` connections:
/// one more is closed after its handshake (`EXCESSIVE_LOAD`, counted) with
/// nothing of it read, another identity still gets in, and the refused
/// client gets in on a later attempt once a slot is free. Every report
/// arrives once.
#[test]
fn one_identity_cannot_hold_more_connections_than_its_limit() {
    let mut sim = Sim::new(seed_or(330), NetConfig::default());
    sim.server_cfg.client_ca = Some(cert_path("ca.pem"));
    sim.server_cfg.secret = Some(ServerSecret::from_bytes([9; 32]));
    sim.server_cfg.max_connections_per_identity = 2;
    sim.start_server();
    let device = |sim: &mut Sim, name: &str| {
        let c = sim.add_client(|cfg| cfg.client_cert = Some(client_cert(name)));
        sim.schedule_reports(c, 3, Duration::from_millis(200));
        c
    };
    let held = [device(&mut sim, "device-1"), device(&mut sim, "device-1")];
    sim.run_for(Duration::from_secs(2));
    let third = device(&mut sim, "device-1");
    let other = device(&mut sim, "device-2");
    sim.run_for(Duration::from_secs(3));
    let closed_for_load = sim.clients[third].events.iter().any(|(_, e)| {
        matches!(
            e,
            ClientEvent::Disconnected {
                reason: DisconnectReason::PeerClosed { code, app: true, .. }
            } if *code == codes::EXCESSIVE_LOAD
        )
    });
    assert!(closed_for_load, "the third is closed{}", sim.context());
    let stats = sim.server.as_ref().expect("a server").stats();
    assert!(stats.limits.identity_connections >= 1, "{stats:?}");
    let acked = |sim: &Sim, c: usize| sim.clients[c].client.stats().acknowledged;
    for c in held.into_iter().chain([other]) {
        assert_eq!(acked(&sim, c), 3, "client {c}{}", sim.context());
    }
    assert_eq!(acked(&sim, third), 0, "nothing of the third read");
    // One of the two closes; the third gets in on its next attempt.
    let now = sim.clock.now();
    sim.clients[held[0]].client.close(now);
    assert!(
        sim.run_until(Duration::from_secs(120), Sim::all_acked),
        "{}",
        sim.context()
    );
    sim.assert_exactly_once();
}
