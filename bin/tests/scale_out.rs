//! Scaling out, end to end: two `server --reuseport` processes on one UDP
//! port sharing one PostgreSQL (a private cluster), three clients, one of
//! them behind a small UDP relay in the test that switches its source port
//! now and then (a NAT rebinding), and one server SIGKILLed and restarted
//! mid-run. Every report must be in the table exactly once and
//! acknowledged exactly once; and while both servers run, the rebinding
//! client must keep its connection (the steering program sends its packets
//! to its process whatever its port), where the kernel's hash alone would
//! reset it half of the time per switch.

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Logged, client_args, free_udp_port};
use quic_report_pg_cluster::PgCluster;

/// A UDP relay: the client talks to `front`; the relay talks to the
/// server from an upstream socket that [`Relay::rebind`] replaces (a new
/// source port, as a NAT rebinding gives).
struct Relay {
    front: SocketAddr,
    rebinds: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Relay {
    fn start(server: SocketAddr) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").expect("relay front");
        front
            .set_read_timeout(Some(Duration::from_millis(2)))
            .expect("timeout");
        let addr = front.local_addr().expect("addr");
        let rebinds = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (Arc::clone(&rebinds), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let upstream = || {
                let u = UdpSocket::bind("127.0.0.1:0").expect("relay upstream");
                u.set_nonblocking(true).expect("nonblocking");
                u
            };
            let mut up = upstream();
            let mut seen = 0;
            let mut client: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 65536];
            let end = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                if r.load(Ordering::Relaxed) != seen {
                    seen = r.load(Ordering::Relaxed);
                    up = upstream();
                }
                if let Ok((n, from)) = front.recv_from(&mut buf) {
                    client = Some(from);
                    let _ = up.send_to(&buf[..n], server);
                }
                while let Ok((n, _)) = up.recv_from(&mut buf) {
                    if let Some(c) = client {
                        let _ = front.send_to(&buf[..n], c);
                    }
                }
            }
        });
        Relay {
            front: addr,
            rebinds,
            stop,
            thread: Some(thread),
        }
    }

    fn rebind(&self) {
        self.rebinds.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn server(name: &'static str, listen: &str, sink: &str) -> Logged {
    let s = Logged::spawn(
        name,
        &["server", "--listen", listen, "--reuseport", "--sink", sink],
    );
    s.wait_for("reuseport: this process is worker ");
    s
}

fn client(name: &'static str, server: &str, url: &str, n: u64) -> Logged {
    let n = n.to_string();
    Logged::spawn(
        name,
        &client_args(
            server,
            url,
            "50ms",
            &[
                "--idle-timeout",
                "3s",
                "--backoff-max",
                "300ms",
                "--count",
                &n,
            ],
        ),
    )
}

/// How many of `lines` say the client connected.
fn connects(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.contains("connected, id "))
        .count()
}

#[test]
fn two_reuseport_servers_one_database_a_rebinding_client_and_a_crash() {
    let pg = PgCluster::start().unwrap_or_else(|e| panic!("a private PostgreSQL cluster: {e}"));
    let sink = pg.url("postgres");
    let source = Logged::spawn("source", &["source", "--listen", "127.0.0.1:0"]);
    let url = source.wait_for("serving GET / on ");
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let a = server("server a", &listen, &sink);
    let mut b = Some(server("server b", &listen, &sink));

    let relay = Relay::start(listen.parse().expect("addr"));
    let front = relay.front.to_string();
    let n = 80;
    let c1 = client("client 1", &listen, &url, n);
    let c2 = client("client 2", &listen, &url, n);
    let moving = client("client 3 (relayed)", &front, &url, n);
    moving.wait_for("connected, id ");

    // Phase 1, both servers up: the relayed client's port changes every
    // 250 ms, and it must stay on its connection (quiche keeps up to 8
    // paths per connection: at most 15 rebindings each).
    for _ in 0..5 {
        thread::sleep(Duration::from_millis(250));
        relay.rebind();
    }
    thread::sleep(Duration::from_millis(300));
    let phase1 = moving.lines_so_far();
    assert_eq!(
        connects(&phase1),
        0,
        "the relayed client reconnected while its port changed:\n{}",
        phase1.join("\n")
    );

    // Phase 2: server b is SIGKILLed mid-run and restarted; the relay
    // keeps rebinding.
    b.take().expect("b runs").kill();
    thread::sleep(Duration::from_millis(500));
    relay.rebind();
    b = Some(server("server b2", &listen, &sink));
    for _ in 0..2 {
        thread::sleep(Duration::from_millis(250));
        relay.rebind();
    }

    let mut outs = Vec::new();
    for c in [c1, c2, moving] {
        let (status, out) = c.finish();
        assert!(status.success(), "client: {status}");
        outs.push(out);
    }
    drop(a);
    drop(b);

    // Every client's seqs 1..=n once in the table, and acknowledged once.
    let rows = pg
        .psql("postgres", "SELECT client, seq FROM reports")
        .expect("psql");
    let mut per_client: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in rows.lines() {
        let (c, s) = line.split_once('|').expect("client|seq");
        per_client
            .entry(c.to_owned())
            .or_default()
            .push(s.parse().expect("a seq"));
    }
    assert_eq!(per_client.len(), 3, "three clients in {per_client:?}");
    for (c, mut seqs) in per_client {
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "client {c}: each seq once"
        );
    }
    for out in &outs {
        let mut acks: Vec<u64> = out
            .lines()
            .filter(|l| l.starts_with("ack "))
            .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("seq=")))
            .map(|s| s.parse().expect("a seq"))
            .collect();
        acks.sort_unstable();
        assert_eq!(acks, (1..=n).collect::<Vec<_>>(), "acknowledged once each");
    }
    drop(source);
}
