//! The client never reports to a server it has not verified, unless told
//! to: each certificate problem fails the client for good, with a message
//! that names it, and nothing is recorded; except a certificate out of
//! date, which is retried until the server (or our clock) is right.

use std::time::Duration;

use quic_report_core::{ClientEvent, ClientState, DisconnectReason, Verify};
use quic_report_tests::{NetConfig, Sim, cert_path, seed_or};

/// Runs a client against a server with the given certificate; returns the
/// sim and the client's failure, if it failed.
fn attempt(
    seed: u64,
    cert: &str,
    key: &str,
    server_name: Option<&str>,
) -> (Sim, Option<DisconnectReason>) {
    let mut sim = Sim::new(seed_or(seed), NetConfig::default());
    sim.server_cfg.cert_chain = cert_path(cert);
    sim.server_cfg.private_key = cert_path(key);
    sim.start_server();
    let c = sim.add_client(|cfg| {
        if let Some(n) = server_name {
            cfg.server_name = n.into();
        }
    });
    sim.schedule_reports(c, 3, Duration::from_millis(500));
    sim.run_for(Duration::from_secs(20));
    let failed = sim.clients[c].events.iter().find_map(|(_, e)| match e {
        ClientEvent::Failed { reason } => Some(reason.clone()),
        _ => None,
    });
    (sim, failed)
}

fn assert_refused(sim: &Sim, failed: Option<DisconnectReason>, names: &str) {
    let Some(DisconnectReason::Certificate(why)) = failed else {
        panic!(
            "expected a certificate failure, got {failed:?}{}",
            sim.context()
        );
    };
    assert!(
        why.contains(names),
        "the message names the problem ({names}): {why}"
    );
    let c = &sim.clients[0];
    assert_eq!(c.client.state(), ClientState::Failed, "the client stopped");
    assert_eq!(
        c.client.stats().attempts,
        1,
        "no retry loop on a certificate failure"
    );
    assert!(sim.records.is_empty(), "nothing recorded");
}

#[test]
fn unverified_server_refused_with_clear_error_unknown_issuer() {
    let (sim, failed) = attempt(50, "test/untrusted.pem", "test/untrusted.key", None);
    assert_refused(&sim, failed, "unknown issuer");
}

#[test]
fn unverified_server_refused_with_clear_error_name_mismatch() {
    let (sim, failed) = attempt(
        51,
        "localhost.pem",
        "localhost.key",
        Some("reports.example.com"),
    );
    assert_refused(&sim, failed, "reports.example.com");
}

/// An expired certificate is refused every time, but the client keeps
/// trying (the server's certificate may be renewed, our clock may be
/// wrong); once the server has a valid one, every report arrives once.
#[test]
fn an_expired_server_certificate_is_refused_and_retried_until_renewed() {
    let mut sim = Sim::new(seed_or(52), NetConfig::default());
    sim.server_cfg.cert_chain = cert_path("test/expired.pem");
    sim.server_cfg.private_key = cert_path("test/expired.key");
    sim.start_server();
    let c = sim.add_client(|_| {});
    sim.schedule_reports(c, 3, Duration::from_millis(500));
    sim.run_for(Duration::from_secs(20));
    let refused: Vec<String> = sim.clients[c]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            ClientEvent::Disconnected {
                reason: DisconnectReason::CertificateOutOfDate(why),
            } => Some(why.clone()),
            ClientEvent::Failed { reason } => panic!("gave up: {reason}{}", sim.context()),
            _ => None,
        })
        .collect();
    assert!(refused.len() >= 3, "retried: {refused:?}{}", sim.context());
    assert!(refused.iter().all(|w| w.contains("expired")), "{refused:?}");
    assert!(sim.records.is_empty(), "nothing recorded");
    assert_ne!(sim.clients[c].client.state(), ClientState::Failed);

    sim.kill_server();
    sim.server_cfg.cert_chain = cert_path("localhost.pem");
    sim.server_cfg.private_key = cert_path("localhost.key");
    sim.start_server();
    assert!(
        sim.run_until(Duration::from_secs(60), Sim::all_acked),
        "{}",
        sim.context()
    );
    sim.assert_exactly_once();
}

#[test]
fn insecure_client_reports_to_an_unverified_server() {
    let mut sim = Sim::new(seed_or(53), NetConfig::default());
    sim.server_cfg.cert_chain = cert_path("test/untrusted.pem");
    sim.server_cfg.private_key = cert_path("test/untrusted.key");
    sim.start_server();
    let c = sim.add_client(|cfg| cfg.verify = Verify::Insecure);
    sim.schedule_reports(c, 3, Duration::from_millis(500));
    assert!(
        sim.run_until(Duration::from_secs(20), Sim::all_acked),
        "{}",
        sim.context()
    );
    sim.assert_exactly_once();
}
