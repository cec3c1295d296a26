//! Debugging hooks: the TLS key log and qlog of every connection, on both
//! sides, through the core's `DebugLogs`.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quic_report_core::{DebugLogs, LogWriter};
use quic_report_tests::{NetConfig, Sim, seed_or};

/// A writer into shared memory.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

struct Logs {
    keylog: Shared,
    qlog: Shared,
    names: Arc<Mutex<Vec<String>>>,
}

impl DebugLogs for Logs {
    fn keylog(&mut self) -> Option<LogWriter> {
        Some(Box::new(self.keylog.clone()))
    }
    fn qlog(&mut self, trace_id: &str, is_server: bool) -> Option<LogWriter> {
        if let Ok(mut n) = self.names.lock() {
            n.push(format!(
                "{trace_id}-{}",
                if is_server { "server" } else { "client" }
            ));
        }
        Some(Box::new(self.qlog.clone()))
    }
}

fn logs() -> (Logs, Shared, Shared, Arc<Mutex<Vec<String>>>) {
    let (k, q, n) = (
        Shared::default(),
        Shared::default(),
        Arc::new(Mutex::new(Vec::new())),
    );
    (
        Logs {
            keylog: k.clone(),
            qlog: q.clone(),
            names: Arc::clone(&n),
        },
        k,
        q,
        n,
    )
}

/// Every JSON-SEQ record (RS-separated) parses as JSON.
fn json_seq_records(bytes: &[u8]) -> usize {
    let mut n = 0;
    for rec in bytes
        .split(|b| *b == 0x1e)
        .filter(|r| !r.iter().all(u8::is_ascii_whitespace))
    {
        let v: serde_json::Value = serde_json::from_slice(rec).unwrap_or_else(|e| {
            panic!(
                "qlog record is not JSON ({e}): {}",
                String::from_utf8_lossy(rec)
            )
        });
        assert!(v.is_object());
        n += 1;
    }
    n
}

#[test]
fn keylog_and_qlog_are_written_for_both_sides() {
    let mut sim = Sim::new(seed_or(40), NetConfig::default());
    let (server_logs, skey, sq, snames) = logs();
    sim.server
        .as_mut()
        .expect("running")
        .set_debug_logs(Box::new(server_logs));
    let c = sim.add_client(|_| {});
    let (client_logs, ckey, cq, cnames) = logs();
    // The first connection already started; the hooks apply from the next.
    sim.clients[c].client.set_debug_logs(Box::new(client_logs));
    let now = sim.clock.now();
    sim.clients[c].client.handle_unreachable(now); // force a reconnect
    sim.schedule_reports(c, 2, Duration::from_secs(1));
    assert!(
        sim.run_until(Duration::from_secs(30), Sim::all_acked),
        "{}",
        sim.context()
    );

    for (side, key, q, names) in [("server", skey, sq, snames), ("client", ckey, cq, cnames)] {
        let key = String::from_utf8(key.bytes()).expect("key log is text");
        assert!(
            key.lines()
                .any(|l| l.starts_with("CLIENT_TRAFFIC_SECRET_0 ")),
            "{side} key log has NSS-format secrets:\n{key}"
        );
        let records = json_seq_records(&q.bytes());
        assert!(records > 5, "{side} qlog has events ({records})");
        let names = names.lock().map(|n| n.clone()).unwrap_or_default();
        assert!(names.iter().all(|n| n.ends_with(side)), "{side}: {names:?}");
    }
}
