//! The server driver with a [`FileSink`]: keys read back from the file make
//! a restarted server answer old reports as duplicates; a sink that cannot
//! write (a full disk) makes the client keep its report; an aborted server
//! sends no CONNECTION_CLOSE. Real UDP on 127.0.0.1, bounded in time.

mod common;

use common::{sample, server_options, start_server_with, watchdog};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use quic_report_core::{ClientEvent, DisconnectReason, Report};
use quic_report_mio::{ClientDriver, ClientOptions, FileSink, Fsync};

/// A temporary file, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> TempFile {
        let p = std::env::temp_dir().join(format!(
            "quic-report-mio-{}-{name}-{:x}.jsonl",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = std::fs::remove_file(&p);
        TempFile(p)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// [`common::client_options`] with the client id `id`.
fn client_options(server: SocketAddr, id: &str) -> ClientOptions {
    let mut opts = common::client_options(server);
    opts.config.client_id = Some(id.to_owned());
    opts
}

fn seqs_in(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .expect("read the file")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["seq"].as_u64())
        .collect()
}

#[test]
fn keys_read_back_from_the_file_are_answered_as_duplicates() {
    let file = TempFile::new("dedup");
    // A previous process recorded seq 1..=3 of client "c0ffee" (their acks
    // were lost in its crash), and died while writing a fourth line.
    let before: String = (1..=3)
        .map(|s| format!("{{\"value\":0.5,\"client\":\"c0ffee\",\"seq\":{s}}}\n"))
        .collect();
    std::fs::write(&file.0, format!("{before}{{\"value\":0.5,\"cli")).expect("write");

    let mut sink = FileSink::open(&file.0, Fsync::Always).expect("opens");
    let keys = sink
        .read_recorded(quic_report_core::dedup::DedupConfig::default())
        .expect("reads");
    assert_eq!((keys.len(), keys.unparseable()), (3, 1));
    let mut opts = server_options();
    opts.recorded = keys;
    let (addr, server_stop, server) = start_server_with(opts, sink);

    let mut opts = client_options(addr, "c0ffee");
    opts.count = Some(5);
    let driver = ClientDriver::new(opts).expect("client binds");
    let _dog = watchdog(driver.stop_handle(), Duration::from_secs(20));
    let samples = driver.sample_sender();
    for i in 0..5 {
        samples
            .send(sample(f64::from(i) / 10.0))
            .expect("loop alive");
    }
    let mut acks = Vec::new();
    driver
        .run(&mut |ev, _| {
            if let ClientEvent::Acknowledged { seq, duplicate, .. } = ev {
                acks.push((*seq, *duplicate));
            }
        })
        .expect("client closes cleanly");
    server_stop.stop();
    server.join().expect("server thread").expect("server ok");

    acks.sort_unstable();
    assert_eq!(
        acks,
        [(1, true), (2, true), (3, true), (4, false), (5, false)]
    );
    assert_eq!(seqs_in(&file.0), [1, 2, 3, 4, 5], "each seq once, in order");
}

#[test]
fn a_full_disk_is_not_acknowledged_and_the_client_keeps_the_report() {
    let full = Path::new("/dev/full");
    if !full.exists() {
        eprintln!("no /dev/full: skipped");
        return;
    }
    let sink = FileSink::open(full, Fsync::Always).expect("opens /dev/full");
    let (addr, server_stop, server) = start_server_with(server_options(), sink);

    let driver = ClientDriver::new(client_options(addr, "f11")).expect("client binds");
    let stop = driver.stop_handle();
    let _dog = watchdog(stop.clone(), Duration::from_secs(20));
    driver
        .sample_sender()
        .send(sample(0.5))
        .expect("loop alive");
    let mut retrying = Vec::new();
    let mut acked = 0;
    let summary = driver
        .run(&mut |ev, _| match ev {
            ClientEvent::Retrying { seq, reason } => {
                retrying.push((*seq, reason.clone()));
                stop.stop();
            }
            ClientEvent::Acknowledged { .. } => acked += 1,
            _ => {}
        })
        .expect("client closes cleanly");
    server_stop.stop();
    server.join().expect("server thread").expect("server ok");

    assert_eq!(acked, 0);
    let (seq, reason) = retrying.first().expect("a not_recorded answer");
    assert_eq!(*seq, 1);
    assert!(reason.contains("space"), "{reason}");
    assert_eq!(summary.unacknowledged, 1, "the client kept the report");
}

#[test]
fn an_aborted_server_sends_no_connection_close() {
    let (addr, server_stop, server) = start_server_with(server_options(), |_: &Report| Ok(()));
    let driver = ClientDriver::new(client_options(addr, "ab")).expect("client binds");
    let samples = driver.sample_sender();
    let client_stop = driver.stop_handle();
    let _dog = watchdog(client_stop.clone(), Duration::from_secs(20));
    let mut disconnected = None;
    let mut server_stop = Some((server_stop, server));
    driver
        .run(&mut |ev, _| match ev {
            ClientEvent::Connected { .. } => {
                if let Some((stop, thread)) = server_stop.take() {
                    stop.abort();
                    thread.join().expect("server thread").expect("server ok");
                    // A report now meets a closed port.
                    samples.send(sample(0.5)).expect("loop alive");
                }
            }
            ClientEvent::Disconnected { reason } => {
                disconnected = Some(reason.clone());
                client_stop.stop();
            }
            _ => {}
        })
        .expect("client closes cleanly");
    // Not PeerClosed: the server said nothing.
    let reason = disconnected.expect("the client noticed");
    assert!(
        !matches!(reason, DisconnectReason::PeerClosed { .. }),
        "{reason}"
    );
}
