//! The seed corpus of the fuzz targets in `fuzz/`, made here from real
//! traffic: a simulated client<->server exchange (deterministic seed) whose
//! datagrams to the server are captured, plus hand-made datagrams and
//! report-stream byte strings (good objects, every error case).
//!
//! `cargo test` builds the corpus in memory and runs it through the fuzz
//! harnesses (`quic_report_tests::fuzz`), and replays the corpus checked in
//! under `fuzz/corpus/` (found crashes belong there too). With
//! `QUIC_REPORT_WRITE_CORPUS=1` it also (re)writes the `seed-*` files of
//! `fuzz/corpus/`:
//!
//! ```sh
//! QUIC_REPORT_WRITE_CORPUS=1 cargo test -p quic-report-tests --test fuzz_corpus
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use quic_report_core::Sample;
use quic_report_core::config::RetryMode;
use quic_report_tests::fuzz::streams::{FLAG_HOLD, FLAG_HQ, FLAG_NOT_RECORDED, FLAG_SMALL};
use quic_report_tests::fuzz::{
    self, ADVANCE_MS, CORPUS_SIM_SEED, FLAG_ONE_CONN, FLAG_RETRY, Op, PEERS, Record,
};
use quic_report_tests::raw::put_varint;
use quic_report_tests::{NetConfig, Sim};
use serde_json::{Map, Value};

/// One seed: its file name and bytes.
type Seed = (String, Vec<u8>);

/// A datagram the server received, with when (virtual time since the start).
struct Captured {
    at: Duration,
    from: SocketAddr,
    data: Vec<u8>,
}

/// Runs `sim` until `done` (at most `limit`), capturing every datagram
/// delivered to the server with its time.
fn capture(sim: &mut Sim, limit: Duration, mut done: impl FnMut(&Sim) -> bool) -> Vec<Captured> {
    sim.captured = Some(Vec::new());
    let mut times = Vec::new();
    let ok = sim.run_until(limit, |s| {
        let n = s.captured.as_ref().map_or(0, Vec::len);
        times.resize(n, s.clock.elapsed());
        done(s)
    });
    assert!(ok, "the exchange finished{}", sim.context());
    let packets = sim.captured.take().expect("capturing");
    times.resize(packets.len(), sim.clock.elapsed());
    packets
        .into_iter()
        .zip(times)
        .map(|(p, at)| Captured {
            at,
            from: p.from,
            data: p.data,
        })
        .collect()
}

fn peer_index(a: SocketAddr) -> usize {
    PEERS
        .iter()
        .position(|p| p.parse::<SocketAddr>().ok() == Some(a))
        .unwrap_or_else(|| panic!("{a} is one of fuzz::PEERS"))
}

/// The largest time advance code not over `gap`.
fn advance_code(gap: Duration) -> usize {
    let ms = gap.as_millis();
    ADVANCE_MS
        .iter()
        .rposition(|&a| u128::from(a) <= ms)
        .unwrap_or(0)
}

/// The whole capture as one input (with its time gaps), and each datagram
/// as an input of its own.
fn datagram_seeds(name: &str, flags: u8, caps: &[Captured], out: &mut Vec<Seed>) {
    let mut last = Duration::ZERO;
    let mut records = Vec::new();
    for c in caps {
        records.push(Record {
            peer: peer_index(c.from),
            advance: advance_code(c.at.saturating_sub(last)),
            data: &c.data,
        });
        last = c.at;
    }
    let mut all = Vec::new();
    fuzz::encode_datagrams(flags, &records, &mut all);
    out.push((format!("seed-{name}-all"), all));
    for (i, r) in records.iter().enumerate() {
        let mut one = Vec::new();
        let r = Record {
            advance: 0,
            ..r.clone()
        };
        fuzz::encode_datagrams(flags, &[r], &mut one);
        out.push((format!("seed-{name}-{i:03}"), one));
    }
}

/// A long-header packet of `version` with 8-byte connection IDs, `body`
/// after them, zero-padded to `len`.
fn long(first: u8, version: u32, dcid_len: u8, body: &[u8], len: usize) -> Vec<u8> {
    let mut d = vec![first];
    d.extend_from_slice(&version.to_be_bytes());
    d.push(dcid_len);
    d.extend((0..dcid_len).map(|i| i + 1));
    d.push(8);
    d.extend_from_slice(&[9; 8]);
    d.extend_from_slice(body);
    d.resize(len.max(d.len()), 0);
    d
}

/// Every `server_datagram` seed.
fn server_datagram_seeds() -> Vec<Seed> {
    let mut seeds = Vec::new();

    // A normal exchange: handshake, three reports, acks, an HTTP/0.9 GET.
    let mut sim = Sim::new(CORPUS_SIM_SEED, NetConfig::default());
    let c = sim.add_client(|_| {});
    sim.schedule_reports(c, 3, Duration::from_secs(2));
    let mut caps = capture(&mut sim, Duration::from_secs(60), Sim::all_acked);
    let g = sim.add_get("/stats");
    caps.extend(capture(&mut sim, Duration::from_secs(10), |s| {
        s.gets[g].1.is_finished()
    }));
    sim.assert_exactly_once();
    assert!(caps.len() >= 10, "{} datagrams captured", caps.len());
    let first_initial = caps[0].data.clone();
    datagram_seeds("normal", 0, &caps, &mut seeds);

    // Address validation: the same with a Retry first (a restarted server:
    // fuzz::server_seed(2)).
    let mut sim = Sim::new(CORPUS_SIM_SEED, NetConfig::default());
    sim.server_cfg.retry = RetryMode::Always;
    sim.start_server();
    let c = sim.add_client(|_| {});
    sim.schedule_reports(c, 1, Duration::from_secs(2));
    let caps = capture(&mut sim, Duration::from_secs(60), Sim::all_acked);
    assert!(
        sim.server
            .as_ref()
            .is_some_and(|s| s.stats().retries_sent >= 1)
    );
    datagram_seeds("retry", FLAG_RETRY, &caps, &mut seeds);

    // Hand-made: what the server drops or answers without a connection.
    let mut one = |name: &str, flags: u8, records: &[(usize, Vec<u8>)]| {
        let recs: Vec<Record<'_>> = records
            .iter()
            .map(|(peer, data)| Record {
                peer: *peer,
                advance: 0,
                data,
            })
            .collect();
        let mut v = Vec::new();
        fuzz::encode_datagrams(flags, &recs, &mut v);
        seeds.push((format!("seed-made-{name}"), v));
    };
    let mut initial_body = vec![0]; // no token
    put_varint(&mut initial_body, 1100);
    let mut short = vec![0x41];
    short.extend_from_slice(&[7; 16]);
    short.resize(40, 0);
    one("noise-1", 0, &[(3, vec![0x5a])]);
    one(
        "version-unknown-1200",
        0,
        &[(3, long(0xc0, 0x1a2a_3a4a, 8, b"", 1200))],
    );
    one(
        "version-unknown-1199",
        0,
        &[(3, long(0xc0, 0x1a2a_3a4a, 8, b"", 1199))],
    );
    one(
        "version-negotiation",
        0,
        &[(3, long(0x80, 0, 8, &[0, 0, 0, 1], 1200))],
    );
    one(
        "initial-noise",
        0,
        &[(3, long(0xc0, 1, 8, &initial_body, 1200))],
    );
    one(
        "initial-short-dcid",
        0,
        &[(3, long(0xc0, 1, 4, &initial_body, 1200))],
    );
    one(
        "handshake-unknown",
        0,
        &[(3, long(0xe0, 1, 16, &[0x40, 0x40], 1200))],
    );
    one("short-21", 0, &[(3, short[..21].to_vec())]);
    one("short-40", 0, &[(3, short.clone())]);
    one(
        "initial-1199",
        0,
        &[(0, first_initial[..first_initial.len().min(1199)].to_vec())],
    );
    one(
        "initial-twice-two-peers",
        0,
        &[(0, first_initial.clone()), (1, first_initial.clone())],
    );
    one(
        "initial-two-peers-one-conn",
        FLAG_ONE_CONN,
        &[(0, first_initial.clone()), (1, first_initial.clone())],
    );
    one("initial-under-retry", FLAG_RETRY, &[(0, first_initial)]);
    seeds
}

/// Every `stream_parser` seed: (name, limit, chunk sizes, stream bytes).
fn stream_parser_seeds() -> Vec<Seed> {
    let mut fields = Map::new();
    fields.insert("value".into(), Value::from(0.6815));
    let sample = Sample {
        fields,
        sampled_at_ms: 1_700_000_000_000,
    };
    let mut report = Vec::new();
    sample.encode_report("5b0c3a", "9f2e11", 1, &mut report);
    let mut two = report.clone();
    sample.encode_report("5b0c3a", "9f2e11", 2, &mut two);
    two.push(b'\n');
    let cases: Vec<(&str, u8, &[u8], Vec<u8>)> = vec![
        ("report", 255, &[], report.clone()),
        ("report-bytewise", 255, &[1], report.clone()),
        ("two-reports", 255, &[5, 0, 17], two),
        (
            "tricky-strings",
            255,
            &[3],
            br#"{"a":{"b":[1,{"c":"}{]["}]},"q":"say \"hi\" \\","u":"\u00e9\ud83d\ude00"} {"n":-1.5e3,"t":true,"u":null}"#
                .to_vec(),
        ),
        ("empty", 255, &[], b"".to_vec()),
        ("whitespace", 255, &[2], b" \t\r\n".to_vec()),
        ("not-utf8", 255, &[], b"{\"a\":\"\xff\"}".to_vec()),
        ("invalid-json", 255, &[], b"{\"a\":}".to_vec()),
        ("invalid-json-nan", 255, &[], b"{\"a\":NaN}".to_vec()),
        ("invalid-json-trailing", 255, &[4], b"{\"a\":1}x".to_vec()),
        ("not-object-array", 255, &[], b"[1,2]".to_vec()),
        ("not-object-string", 255, &[], b"\"str\"".to_vec()),
        ("not-object-number", 255, &[1], b"42 ".to_vec()),
        ("not-object-bool", 255, &[], b"true".to_vec()),
        ("not-object-null", 255, &[], b"null".to_vec()),
        ("truncated", 255, &[], b"{\"a\":1}{\"b\":".to_vec()),
        ("too-large", 16, &[], b"{\"k\":\"xxxxxxxxxxxx\"}".to_vec()),
        ("too-large-limit-0", 0, &[], b"{}".to_vec()),
        (
            "invalid-field-client",
            255,
            &[],
            b"{\"client\":7,\"seq\":1}".to_vec(),
        ),
        (
            "invalid-field-seq",
            255,
            &[],
            b"{\"client\":\"c\",\"seq\":-1}".to_vec(),
        ),
        (
            "invalid-field-sampled-at",
            255,
            &[],
            b"{\"sampled_at_ms\":\"now\"}".to_vec(),
        ),
        ("invalid-field-id", 255, &[], b"{\"id\":[]}".to_vec()),
        ("deep", 255, &[], [&[b'['; 64][..], &[b']'; 64][..]].concat()),
    ];
    cases
        .into_iter()
        .map(|(name, limit, sizes, data)| {
            let mut v = Vec::new();
            fuzz::encode_stream(limit, sizes, &data, &mut v);
            (format!("seed-{name}"), v)
        })
        .collect()
}

/// Every `server_streams` seed: what a client does on its streams once
/// connected, one protocol case each.
fn server_streams_seeds() -> Vec<Seed> {
    let report = |stream: u8, client: u8, seq: u8, fin: bool| Op::Report {
        stream,
        client,
        seq,
        fin,
    };
    let write = |stream: u8, data: &'static [u8], fin: bool| Op::Write { stream, data, fin };
    let big: &'static [u8] = b"{\"k\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}";
    let object: &'static [u8] = br#"{"client":"b","seq":7,"v":[1,{"s":"}{\"]["}],"e":"\u00e9"}"#;
    let mut bytewise: Vec<Op<'static>> = object
        .chunks(1)
        .map(|c| Op::Write {
            stream: 2,
            data: c,
            fin: false,
        })
        .collect();
    bytewise.push(write(2, b"", true));
    let cases: Vec<(&str, u8, Vec<Op<'static>>)> = vec![
        ("report", 0, vec![report(0, 1, 1, true)]),
        (
            "reports-one-stream",
            0,
            vec![
                report(0, 1, 1, false),
                report(0, 1, 2, false),
                report(0, 1, 3, true),
            ],
        ),
        (
            "duplicate",
            0,
            vec![report(0, 2, 3, true), report(1, 2, 3, true)],
        ),
        (
            "duplicate-held",
            FLAG_HOLD,
            vec![
                report(0, 1, 5, true),
                report(1, 1, 5, true),
                Op::Answer {
                    not_recorded: false,
                },
            ],
        ),
        (
            "held-not-recorded",
            FLAG_HOLD,
            vec![
                report(0, 1, 5, true),
                report(1, 1, 5, true),
                Op::Answer { not_recorded: true },
            ],
        ),
        (
            "not-recorded",
            FLAG_NOT_RECORDED,
            vec![report(0, 3, 1, true)],
        ),
        (
            "errors",
            0,
            vec![
                write(0, b"{\"a\":}", true),
                write(1, b"[1]", true),
                write(2, b"{\"a\":\"\xff\"}", true),
                write(3, b"{\"a\":1", true),
                write(4, b" \n", true),
                write(5, b"{\"seq\":-1}{\"client\":1}{\"a\":1}", true),
                write(6, b"{\"a\":1}x", true),
                write(7, b"{\"seq\":0}", true),
            ],
        ),
        ("object-bytewise", 0, bytewise),
        (
            "too-large",
            FLAG_SMALL,
            vec![write(0, big, true), report(1, 1, 1, true)],
        ),
        (
            // Answers to bad fields queue behind a held report.
            "unanswered-load",
            FLAG_SMALL | FLAG_HOLD,
            vec![
                report(0, 1, 1, false),
                write(0, b"{\"seq\":-1}{\"seq\":-2}", false),
                write(0, b"{\"seq\":-3}{\"seq\":-4}", false),
                report(1, 1, 2, true),
                Op::Answer {
                    not_recorded: false,
                },
            ],
        ),
        (
            "streams-over-limit",
            FLAG_SMALL,
            (0..8).map(|s| report(s, 4, s + 1, true)).collect(),
        ),
        (
            "reset-mid-object",
            0,
            vec![
                write(0, b"{\"client\":\"r\",\"seq\":1}{\"a\":", false),
                Op::Reset(0),
                report(1, 1, 1, true),
            ],
        ),
        (
            "stop-sending",
            0,
            vec![report(0, 1, 1, false), Op::Stop(0), write(0, b"", true)],
        ),
        (
            "paused-reader",
            0,
            vec![
                Op::Pause,
                report(0, 1, 1, true),
                report(1, 1, 2, true),
                Op::Time(2),
                Op::Pause,
            ],
        ),
        (
            "idle-timeout",
            0,
            vec![report(0, 1, 1, false), Op::Time(7), write(0, b"", true)],
        ),
        (
            "handshake-time",
            0,
            vec![Op::Time(6), report(0, 1, 1, true)],
        ),
        ("client-close", 0, vec![report(0, 1, 1, false), Op::Close]),
        (
            "http09",
            FLAG_HQ,
            vec![
                write(0, b"GET /latest\r\n", true),
                write(1, b"POST /x\r\n", true),
                write(2, b"GET /stats", false),
                write(3, b"GET /stats HTTP/1.1\n", true),
            ],
        ),
    ];
    cases
        .into_iter()
        .map(|(name, flags, ops)| {
            let mut v = Vec::new();
            fuzz::encode_ops(flags, &ops, &mut v);
            (format!("seed-{name}"), v)
        })
        .collect()
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("fuzz")
        .join("corpus")
        .join(target)
}

/// Replaces the `seed-*` files of `target`'s corpus with `seeds`.
fn write(target: &str, seeds: &[Seed]) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).expect("create the corpus directory");
    for e in std::fs::read_dir(&dir).expect("read the corpus directory") {
        let p = e.expect("a directory entry").path();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("seed-"))
        {
            std::fs::remove_file(&p).expect("remove an old seed");
        }
    }
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).expect("write a seed");
    }
    println!("wrote {} seeds to {}", seeds.len(), dir.display());
}

fn writing() -> bool {
    std::env::var_os("QUIC_REPORT_WRITE_CORPUS").is_some_and(|v| v == "1")
}

#[test]
fn server_datagram_seed_corpus() {
    let seeds = server_datagram_seeds();
    let total: usize = seeds.iter().map(|(_, b)| b.len()).sum();
    assert!(
        seeds.len() < 150 && total < 250_000,
        "{} seeds, {total} bytes",
        seeds.len()
    );
    for (name, bytes) in &seeds {
        println!("{name}: {} bytes", bytes.len());
        fuzz::server_datagram(bytes);
    }
    if writing() {
        write("server_datagram", &seeds);
    }
}

#[test]
fn captured_packets_reach_their_connection() {
    // The fuzzed server issues the captured server's connection IDs: the
    // client's second Initial (its ACK of the server's) reaches the
    // connection the first one opened instead of being dropped.
    let seeds = server_datagram_seeds();
    let (_, all) = seeds
        .iter()
        .find(|(n, _)| n == "seed-normal-all")
        .expect("the whole normal exchange");
    let records = fuzz::decode_datagrams(&all[1..]);
    let clock = quic_report_tests::VirtualClock::install();
    let cfg = quic_report_core::ServerConfig::new(
        quic_report_tests::cert_path("localhost.pem"),
        quic_report_tests::cert_path("localhost.key"),
    );
    let mut server = quic_report_core::Server::new(
        cfg,
        quic_report_core::CoreRng::from_seed(fuzz::server_seed(1)),
    )
    .expect("a valid config");
    let now = clock.now();
    let to: SocketAddr = quic_report_tests::SERVER_ADDR.parse().expect("an address");
    let mut buf = vec![0u8; 65536];
    let mut ok = 0;
    for r in records.iter().take(4) {
        let from: SocketAddr = PEERS[r.peer].parse().expect("an address");
        let mut d = r.data.to_vec();
        if server.handle_datagram(now, from, to, &mut d).is_ok() {
            ok += 1;
        }
        while server.poll_event().is_some() {}
        while server.poll_transmit(now, &mut buf).is_some() {}
    }
    assert_eq!(server.stats().connections_total, 1);
    assert!(
        ok >= 2,
        "{ok} of the first 4 datagrams reached the connection"
    );
}

#[test]
fn stream_parser_seed_corpus() {
    let seeds = stream_parser_seeds();
    for (_, bytes) in &seeds {
        fuzz::stream_parser(bytes);
    }
    if writing() {
        write("stream_parser", &seeds);
    }
}

#[test]
fn server_streams_seed_corpus() {
    let seeds = server_streams_seeds();
    let mut checked = 0;
    for (name, bytes) in &seeds {
        let n = fuzz::server_streams(bytes);
        println!("{name}: {} bytes, {n} answers checked", bytes.len());
        checked += n;
    }
    assert!(checked >= 30, "{checked} answers checked");
    if writing() {
        write("server_streams", &seeds);
    }
}

/// Replays every file of `fuzz/corpus/<target>` (seeds, and inputs that
/// once crashed a target) through its harness.
#[test]
fn checked_in_corpus_replays() {
    for (target, run) in [
        ("server_datagram", fuzz::server_datagram as fn(&[u8])),
        ("stream_parser", fuzz::stream_parser),
        ("server_streams", |b| {
            fuzz::server_streams(b);
        }),
    ] {
        let Ok(dir) = std::fs::read_dir(corpus_dir(target)) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = dir.filter_map(|e| Some(e.ok()?.path())).collect();
        paths.sort();
        for p in paths {
            let bytes = std::fs::read(&p).expect("read a corpus file");
            println!("{}", p.display());
            run(&bytes);
        }
    }
}
