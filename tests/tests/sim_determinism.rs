//! Same seed, same outcome: the trace of events with their virtual times,
//! and the records, repeat exactly.

use std::time::Duration;

use quic_report_tests::{NetConfig, Sim, seed_or};

fn run(seed: u64) -> (Vec<String>, Vec<(String, u64)>) {
    let net = NetConfig {
        loss: 0.1,
        duplicate: 0.05,
        reorder: 0.1,
        jitter: Duration::from_millis(3),
        ..NetConfig::default()
    };
    let mut sim = Sim::new(seed, net);
    for _ in 0..3 {
        let c = sim.add_client(|_| {});
        sim.schedule_reports(c, 15, Duration::from_secs(2));
    }
    sim.run_for(Duration::from_secs(12));
    sim.kill_server();
    sim.run_for(Duration::from_secs(15));
    sim.start_server();
    let ok = sim.run_until(Duration::from_secs(300), Sim::all_acked);
    assert!(ok, "not every report was acknowledged{}", sim.context());
    sim.assert_exactly_once();
    (sim.trace.clone(), sim.recorded_keys())
}

#[test]
fn same_seed_same_trace() {
    let seed = seed_or(42);
    let (a, ra) = run(seed);
    let (b, rb) = run(seed);
    assert_eq!(ra, rb, "same records, in the same order (seed {seed})");
    if a != b {
        let first = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len()));
        panic!(
            "traces differ at line {first} (seed {seed}):\n  first run:  {:?}\n  second run: {:?}",
            a.get(first),
            b.get(first)
        );
    }
    let (c, _) = run(seed + 1);
    assert_ne!(a, c, "a different seed takes a different path");
}
