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
