//! Delivery on a simulated network: every report recorded exactly once.

use std::time::Duration;

use quic_report_tests::{NetConfig, Sim, seed_or};

#[test]
fn reports_arrive_once_on_clean_link() {
    let mut sim = Sim::new(seed_or(1), NetConfig::default());
    let c = sim.add_client(|_| {});
    sim.schedule_reports(c, 20, Duration::from_secs(2));
    let ok = sim.run_until(Duration::from_secs(120), Sim::all_acked);
    assert!(ok, "not every report was acknowledged{}", sim.context());
    sim.assert_exactly_once();
    let values_ok = sim.records.iter().all(|r| {
        r.fields
            .get("value")
            .and_then(|v| v.as_f64())
            .is_some_and(|v| (0.0..1.0).contains(&v))
    });
    assert!(values_ok, "a value outside [0,1){}", sim.context());
}

#[test]
fn no_report_lost_at_10pct_loss_with_reordering() {
    let net = NetConfig {
        loss: 0.10,
        reorder: 0.2,
        jitter: Duration::from_millis(5),
        ..NetConfig::default()
    };
    let mut sim = Sim::new(seed_or(2), net);
    let c = sim.add_client(|_| {});
    sim.schedule_reports(c, 50, Duration::from_secs(2));
    let ok = sim.run_until(Duration::from_secs(600), Sim::all_acked);
    assert!(ok, "not every report was acknowledged{}", sim.context());
    sim.assert_exactly_once();
    assert!(
        sim.net.stats.lost > 0,
        "the network lost nothing: the test tests nothing"
    );
}

#[test]
fn many_clients_share_one_server() {
    let mut sim = Sim::new(
        seed_or(3),
        NetConfig {
            loss: 0.02,
            ..NetConfig::default()
        },
    );
    for _ in 0..20 {
        let c = sim.add_client(|_| {});
        sim.schedule_reports(c, 10, Duration::from_millis(500));
    }
    let ok = sim.run_until(Duration::from_secs(300), Sim::all_acked);
    assert!(ok, "not every report was acknowledged{}", sim.context());
    sim.assert_exactly_once();
}

#[test]
fn permanently_rejected_report_is_dropped_and_the_rest_flow() {
    use quic_report_core::{ClientEvent, Sample};
    use serde_json::{Map, Value};
    let mut sim = Sim::new(seed_or(4), NetConfig::default());
    let c = sim.add_client(|_| {});
    sim.run_for(Duration::from_millis(100));
    // A source that answered a 70 KiB object: over the server's 64 KiB limit.
    let mut fields = Map::new();
    fields.insert("value".into(), Value::from(0.5));
    fields.insert("blob".into(), Value::from("x".repeat(70 * 1024)));
    let now = sim.clock.now();
    let big = sim.clients[c].client.submit(
        now,
        Sample {
            fields,
            sampled_at_ms: 0,
        },
    );
    sim.drain();
    sim.schedule_reports(c, 3, Duration::from_millis(500));
    let ok = sim.run_until(Duration::from_secs(30), |s| s.clients[c].acked.len() == 3);
    assert!(ok, "the other reports were acknowledged{}", sim.context());
    let rejected = sim.clients[c].events.iter().any(|(_, e)| {
        matches!(e, ClientEvent::Rejected { seq, code, .. } if *seq == big && code == "too_large")
    });
    assert!(
        rejected,
        "the oversized report was rejected for good{}",
        sim.context()
    );
    assert_eq!(sim.clients[c].client.queued(), 0, "and is no longer queued");
    assert_eq!(sim.records.len(), 3);
}

/// A client whose numbering started over under an id already used (a
/// reinstalled device with a fixed client id and no spool): its first
/// reports carry seqs the server has, and are answered `duplicate` at
/// their first send. The client says so for each (they are lost) and
/// counts them; its reports past the old numbering are recorded. A resend
/// answered `duplicate` (a lost answer) and a report restored from a
/// spool are not such a loss and are not flagged.
#[test]
fn a_seq_the_server_had_before_its_first_send_is_flagged_lost() {
    use quic_report_core::{ClientEvent, Sample};
    let mut sim = Sim::new(seed_or(19), NetConfig::default());
    let first = sim.add_client(|cfg| cfg.client_id = Some("device".into()));
    sim.schedule_reports(first, 5, Duration::from_millis(200));
    assert!(
        sim.run_until(Duration::from_secs(60), Sim::all_acked),
        "{}",
        sim.context()
    );
    let again = sim.add_client(|cfg| cfg.client_id = Some("device".into()));
    // Restored from a spool: sent by an earlier run, answered duplicate.
    let now = sim.clock.now();
    let restored = Sample::from_json(br#"{"value":0.5}"#, 1).expect("a sample");
    sim.clients[again].client.resume(now, 3, [(2, restored)]);
    sim.schedule_reports(again, 6, Duration::from_millis(200));
    assert!(
        sim.run_until(Duration::from_secs(60), Sim::all_acked),
        "{}",
        sim.context()
    );
    let reused: Vec<u64> = sim.clients[again]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            ClientEvent::SeqReused { seq } => Some(*seq),
            _ => None,
        })
        .collect();
    // seq 2 was restored (not flagged); 3, 4 and 5 were the old run's; 6..8 new.
    assert_eq!(reused, [3, 4, 5], "{}", sim.context());
    assert_eq!(sim.clients[again].client.stats().seq_reused, 3);
    let restored_ack = sim.clients[again].events.iter().find_map(|(_, e)| match e {
        ClientEvent::Acknowledged {
            seq: 2, duplicate, ..
        } => Some(*duplicate),
        _ => None,
    });
    assert_eq!(
        restored_ack,
        Some(true),
        "the restored 2 was answered duplicate (and not flagged){}",
        sim.context()
    );
    assert!(
        sim.clients[first]
            .events
            .iter()
            .all(|(_, e)| !matches!(e, ClientEvent::SeqReused { .. })),
        "{}",
        sim.context()
    );
    let mut keys = sim.recorded_keys();
    keys.sort();
    let want: Vec<(String, u64)> = (1..=8).map(|s| ("device".to_owned(), s)).collect();
    assert_eq!(keys, want, "{}", sim.context());
}

/// From review: a backlog of large reports (an outage with a 40 KB source:
/// 100 of them queued) was never delivered. The client sent every report
/// of its window at once, a packet of each in turn, so the server held a
/// megabyte of reports each in part before any was whole and closed the
/// connection (too many unanswered bytes), again on every reconnect, while
/// new samples piled up behind. Now reports in flight are held to
/// `max_in_flight_bytes` and each is sent whole before the next: all 100
/// arrive, on one connection, once each; and 60 KB ones too.
#[test]
fn a_backlog_of_large_reports_is_delivered() {
    for (size, n) in [(40_000, 100u64), (60_000, 64)] {
        let mut sim = Sim::new(seed_or(40), NetConfig::default());
        let c = sim.add_client(|_| {});
        let now = sim.clock.now();
        for i in 0..n {
            let mut fields = serde_json::Map::new();
            fields.insert("value".into(), "x".repeat(size).into());
            let sample = quic_report_core::Sample {
                fields,
                sampled_at_ms: i,
            };
            let seq = sim.clients[c].client.submit(now, sample);
            sim.clients[c].submitted.push(seq);
        }
        sim.drain();
        let ok = sim.run_until(Duration::from_secs(120), Sim::all_acked);
        let reasons = sim.clients[c].disconnect_reasons();
        assert!(
            ok,
            "{size} B x {n}: acked {} in 120 s; {} disconnects, first: {:?}{}",
            sim.clients[c].acked.len(),
            reasons.len(),
            &reasons[..reasons.len().min(3)],
            sim.context()
        );
        assert!(reasons.is_empty(), "{size} B x {n}: {reasons:?}");
        sim.assert_exactly_once();
    }
}
