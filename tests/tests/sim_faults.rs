//! The fault matrix: whatever the network or the server does, the set of
//! recorded `(client, seq)` is exactly the set submitted, each once.
//!
//! Each case prints (does not assert) the virtual time from the end of the
//! fault to the first new record; run with `--nocapture` to see the table.

use std::time::Duration;

use quic_report_core::{ClientEvent, DisconnectReason, ServerSecret};
use quic_report_tests::{NetConfig, Sim, seed_or};

const REPORTS: usize = 40;
const INTERVAL: Duration = Duration::from_secs(2);

fn sim(seed: u64, net: NetConfig) -> Sim {
    let mut sim = Sim::new(seed_or(seed), net);
    sim.server_cfg.secret = Some(ServerSecret::from_bytes([7; 32]));
    sim.start_server(); // with the fixed secret
    let c = sim.add_client(|_| {});
    sim.schedule_reports(c, REPORTS, INTERVAL);
    sim
}

fn finish(mut sim: Sim, case: &str, fault_end: Option<Duration>) -> Sim {
    let ok = sim.run_until(Duration::from_secs(3600), Sim::all_acked);
    assert!(
        ok,
        "{case}: not every report was acknowledged{}",
        sim.context()
    );
    sim.assert_exactly_once();
    // Every `duplicate` here answers a resend (an answer lost with its
    // connection): none is a seq the server had before its first send.
    let events = &sim.clients[0].events;
    assert!(
        events
            .iter()
            .all(|(_, e)| !matches!(e, ClientEvent::SeqReused { .. })),
        "{case}: a resend was taken for a reused seq{}",
        sim.context()
    );
    let duplicates = sim.clients[0].duplicate_acks();
    let recovery = fault_end
        .and_then(|t| sim.first_record_after(t))
        .map_or("-".to_owned(), |d| {
            format!("{:.0} ms", d.as_secs_f64() * 1e3)
        });
    println!(
        "| {case:<36} | seed {:>3} | {:>4} records | {duplicates:>3} duplicates | recovery {recovery:>9} | {:>6} pkts lost |",
        sim.seed,
        sim.records.len(),
        sim.net.stats.lost
    );
    sim
}

fn lossy(loss: f64) -> NetConfig {
    NetConfig {
        loss,
        jitter: Duration::from_millis(2),
        ..NetConfig::default()
    }
}

#[test]
fn loss_5_percent_each_way() {
    finish(sim(101, lossy(0.05)), "loss 5%", None);
}

#[test]
fn loss_20_percent_each_way() {
    finish(sim(102, lossy(0.20)), "loss 20%", None);
}

#[test]
fn loss_40_percent_each_way() {
    finish(sim(103, lossy(0.40)), "loss 40%", None);
}

#[test]
fn duplication_10_percent() {
    let s = finish(
        sim(
            104,
            NetConfig {
                duplicate: 0.10,
                ..NetConfig::default()
            },
        ),
        "duplication 10%",
        None,
    );
    assert!(s.net.stats.duplicated > 0);
}

#[test]
fn heavy_reordering() {
    let net = NetConfig {
        reorder: 0.5,
        reorder_delay: Duration::from_millis(40),
        jitter: Duration::from_millis(20),
        ..NetConfig::default()
    };
    finish(sim(105, net), "heavy reordering", None);
}

#[test]
fn blackhole_60s() {
    let mut s = sim(106, NetConfig::default());
    s.run_for(Duration::from_secs(10));
    let until = s.clock.now() + Duration::from_secs(60);
    s.net.blackhole(until);
    s.run_for(Duration::from_secs(60));
    let end = s.clock.elapsed();
    finish(s, "blackhole 60 s", Some(end));
}

/// The server records but its answers are lost for 40 s: the reports it
/// recorded before the client gave the connection up are sent again and
/// answered `duplicate`, and none of those is taken for a reused seq
/// (checked in `finish`).
#[test]
fn answers_lost_for_40s() {
    let mut s = sim(113, NetConfig::default());
    s.run_for(Duration::from_secs(9));
    let until = s.clock.now() + Duration::from_secs(40);
    let server = s.server_addr;
    s.net.silence(server, until);
    s.run_for(Duration::from_secs(40));
    let end = s.clock.elapsed();
    let s = finish(s, "answers lost 40 s", Some(end));
    assert!(
        s.clients[0].duplicate_acks() >= 1,
        "the reports recorded while the answers were lost came back as duplicates{}",
        s.context()
    );
}

#[test]
fn server_crash_and_restart_same_secret() {
    let mut s = sim(107, NetConfig::default());
    s.run_for(Duration::from_secs(11));
    s.kill_server();
    s.run_for(Duration::from_millis(300));
    s.start_server();
    let end = s.clock.elapsed();
    let s = finish(s, "crash + restart, same secret", Some(end));
    let reasons = disconnects(&s);
    assert!(
        reasons.contains(&DisconnectReason::Reset),
        "the restarted server reset the old connection: {reasons:?}{}",
        s.context()
    );
    let resumed = s.clients[0].events.iter().any(|(_, e)| {
        matches!(
            e,
            ClientEvent::Connected {
                resumed: true,
                early_data: true,
                ..
            }
        )
    });
    assert!(
        resumed,
        "the reconnect resumed the session with 0-RTT{}",
        s.context()
    );
}

#[test]
fn server_restart_different_secret() {
    let mut s = sim(108, NetConfig::default());
    s.run_for(Duration::from_secs(11));
    s.kill_server();
    s.run_for(Duration::from_millis(300));
    s.server_cfg.secret = Some(ServerSecret::from_bytes([8; 32]));
    s.start_server();
    let end = s.clock.elapsed();
    let s = finish(s, "restart, different secret", Some(end));
    let reasons = disconnects(&s);
    assert!(
        !reasons.contains(&DisconnectReason::Reset),
        "no valid reset is possible{}",
        s.context()
    );
    assert!(
        !reasons.is_empty(),
        "the dead connection was noticed{}",
        s.context()
    );
}

#[test]
fn server_down_longer_than_idle_timeout() {
    let mut s = sim(109, NetConfig::default());
    s.run_for(Duration::from_secs(10));
    s.kill_server();
    s.run_for(Duration::from_secs(25));
    s.start_server();
    let end = s.clock.elapsed();
    finish(s, "down 25 s (> idle timeout)", Some(end));
}

#[test]
fn client_address_change_mid_connection() {
    let mut s = sim(110, NetConfig::default());
    s.run_for(Duration::from_secs(9));
    s.rebind(0, "127.0.0.99:7777".parse().expect("address"));
    let end = s.clock.elapsed();
    let s = finish(s, "client address change", Some(end));
    let connects = s.clients[0]
        .events
        .iter()
        .filter(|(_, e)| matches!(e, ClientEvent::Connected { .. }))
        .count();
    assert_eq!(
        connects,
        1,
        "the connection survived the move{}",
        s.context()
    );
}

#[test]
fn sink_failing_for_a_while() {
    let mut s = sim(111, NetConfig::default());
    s.run_for(Duration::from_secs(9));
    s.sink_failing = true;
    s.run_for(Duration::from_secs(10));
    s.sink_failing = false;
    let end = s.clock.elapsed();
    let s = finish(s, "sink failing 10 s", Some(end));
    let retried = s.clients[0]
        .events
        .iter()
        .any(|(_, e)| matches!(e, ClientEvent::Retrying { .. }));
    assert!(retried, "the client was told to retry{}", s.context());
}

#[test]
fn reports_the_store_had_already_are_acknowledged_as_duplicates() {
    let mut s = sim(112, NetConfig::default());
    s.stored_elsewhere = true;
    let ok = s.run_until(Duration::from_secs(3600), Sim::all_acked);
    assert!(ok, "every report acknowledged{}", s.context());
    assert!(
        s.records.is_empty(),
        "nothing recorded again{}",
        s.context()
    );
    let acks: Vec<bool> = s.clients[0]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            ClientEvent::Acknowledged { duplicate, .. } => Some(*duplicate),
            _ => None,
        })
        .collect();
    assert_eq!(acks.len(), REPORTS, "{}", s.context());
    assert!(
        acks.iter().all(|d| *d),
        "each answered duplicate{}",
        s.context()
    );
    let stats = s.server.as_ref().map(|sv| sv.stats()).unwrap_or_default();
    assert_eq!(stats.duplicates, REPORTS as u64, "counted as duplicates");
    assert_eq!(
        s.clients[0].client.stats().seq_reused,
        REPORTS as u64,
        "the store had each before its first send: each a reused seq{}",
        s.context()
    );
}

fn disconnects(s: &Sim) -> Vec<DisconnectReason> {
    s.clients[0].disconnect_reasons()
}
