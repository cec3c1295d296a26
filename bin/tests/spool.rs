//! The client's spool with the real binary: a client SIGKILLed during a
//! server outage and restarted on the same `--spool` loses nothing, keeps
//! its `client` id and continues its `seq`; a torn tail is skipped with a
//! warning; a second client on the same spool refuses to start. Every wait
//! is bounded; every child is killed when its test ends.

mod common;

use common::{LIMIT, Logged, TempPath, client_args, free_udp_port};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The complete JSON lines of `path`.
fn records(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The seqs of the complete Sample records in the spool log at `path`
/// (the format is in `quic_report_mio::spool`: the magic, then records
/// of a u32 LE length of kind + payload, a CRC, the kind, the payload;
/// a Sample's payload starts with its u64 LE seq), in the log's order:
/// what the spool took. Reading stops at a record cut short (being
/// written, or a write that the full disk stopped and the client cuts off
/// again).
fn spooled_seqs(path: &Path) -> Vec<u64> {
    const KIND_SAMPLE: u8 = 2;
    let data = std::fs::read(path).unwrap_or_default();
    let mut seqs = Vec::new();
    if !data.starts_with(b"QRSPOOL1") {
        return seqs;
    }
    let mut at = 8;
    while let Some(head) = data.get(at..at + 8) {
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let Some(record) = data.get(at + 8..at + 8 + len) else {
            break;
        };
        if record.first() == Some(&KIND_SAMPLE)
            && let Some(seq) = record.get(1..9)
        {
            seqs.push(u64::from_le_bytes(seq.try_into().expect("8 bytes")));
        }
        at += 8 + len;
    }
    seqs
}

/// The values the source served so far (its log lines since the last call).
fn served(source: &Logged, into: &mut Vec<f64>) {
    for line in source.drain() {
        if let Some(i) = line.find("{\"value\":")
            && let Ok(v) = serde_json::from_str::<Value>(&line[i..])
            && let Some(x) = v["value"].as_f64()
        {
            into.push(x);
        }
    }
}

fn client(server: &str, url: &str, spool: &str, extra: &[&str]) -> Logged {
    let mut args = client_args(
        server,
        url,
        "100ms",
        &["--spool", spool, "--backoff-max", "200ms"],
    );
    args.extend_from_slice(extra);
    Logged::spawn("client", &args)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < LIMIT, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_sigkilled_during_an_outage_loses_nothing_on_its_spool() {
    let (source, url) = Logged::start_source();
    let dir = TempPath::new("spool");
    let spool = dir.join("spool");
    let out = dir.join("out.jsonl");
    std::fs::create_dir_all(&dir.0).expect("mkdir");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let server_args = ["server", "--listen", &listen, "--out", &out];
    let server = Logged::spawn("server 1", &server_args);
    server.wait_for("listening on ");
    let first = client(&listen, &url, &spool, &[]);
    let out_path = PathBuf::from(&out);
    wait_until("5 records", || records(&out_path).len() >= 5);

    // The server goes away; the client fetches into its spool; then it is
    // killed too.
    server.kill();
    let recorded_before = records(&out_path).len();
    let mut values = Vec::new();
    // At least 5 samples fetched and not recorded: the outage leaves some
    // in the spool.
    wait_until("5 values served past those recorded", || {
        served(&source, &mut values);
        values.len() >= recorded_before + 5
    });
    first.kill();
    served(&source, &mut values);

    // Everything restarted: the spool is sent first.
    let _server = Logged::spawn("server 2", &server_args);
    let second = client(&listen, &url, &spool, &[]);
    let restored = second.wait_for("report(s) not acknowledged before");
    // The last one served may have been on its way when the client died.
    let must = &values[..values.len() - 1];
    wait_until("every value fetched before the kill, recorded", || {
        let got: Vec<f64> = records(&out_path)
            .iter()
            .filter_map(|r| r["value"].as_f64())
            .collect();
        must.iter().all(|v| got.contains(v))
    });
    // And a few new ones after them.
    let last_old = records(&out_path).len();
    wait_until("new records", || records(&out_path).len() >= last_old + 3);
    drop(second);

    let recs = records(&out_path);
    let clients: BTreeSet<_> = recs.iter().filter_map(|r| r["client"].as_str()).collect();
    assert_eq!(
        clients.len(),
        1,
        "one client id across the restart: {clients:?}"
    );
    let mut by_seq = BTreeMap::new();
    for r in &recs {
        let seq = r["seq"].as_u64().expect("a seq");
        assert!(
            by_seq.insert(seq, r["value"].as_f64()).is_none(),
            "seq {seq} recorded twice"
        );
    }
    let max = *by_seq.keys().last().expect("records");
    // Only the last few (in flight when the test stopped) may be missing.
    let missing: Vec<u64> = (1..=max).filter(|s| !by_seq.contains_key(s)).collect();
    assert!(
        missing.iter().all(|s| *s + 64 > max),
        "seqs missing before the end: {missing:?} (restored: {restored})"
    );
    let pre_kill_max = by_seq
        .iter()
        .filter(|(_, v)| v.is_some_and(|v| must.contains(&v)))
        .map(|(s, _)| *s)
        .max()
        .expect("pre-kill records");
    assert!(
        (1..=pre_kill_max).all(|s| by_seq.contains_key(&s)),
        "seq contiguous up to the last sample fetched before the kill"
    );
    assert!(max > pre_kill_max, "the new samples continue the seq");
}

#[test]
fn a_torn_spool_tail_is_skipped_with_a_warning() {
    let (_source, url) = Logged::start_source();
    let dir = TempPath::new("torn");
    let spool = dir.join("spool");
    // Nobody listens: everything stays in the spool.
    let nowhere = format!("127.0.0.1:{}", free_udp_port());
    let first = client(&nowhere, &url, &spool, &["--keep-alive", "0s"]);
    first.wait_for("spool ");
    let log = dir.0.join("spool/spool.log");
    wait_until("3 samples in the spool", || spooled_seqs(&log).len() >= 3);
    first.kill();
    let mut bytes = std::fs::read(&log).expect("the spool log");
    let good = bytes.len();
    bytes.extend_from_slice(&[0x40, 0, 0, 0, 1, 2, 3, 4, 2, b'{']);
    std::fs::write(&log, &bytes).expect("tear the tail");

    let out = dir.join("out.jsonl");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let _server = Logged::spawn("server", &["server", "--listen", &listen, "--out", &out]);
    let second = client(&listen, &url, &spool, &[]);
    let warning = second.wait_for("torn at the end");
    assert!(warning.contains("skipped"), "{warning}");
    let restored = second.wait_for("report(s) not acknowledged before, seq 1..=");
    let n: u64 = restored
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
        .expect("a seq");
    assert!(n >= 3, "{restored}");
    let out_path = PathBuf::from(&out);
    wait_until("the spooled reports", || {
        records(&out_path)
            .iter()
            .filter_map(|r| r["seq"].as_u64())
            .filter(|s| *s <= n)
            .count() as u64
            == n
    });
    assert!(
        std::fs::metadata(&log).expect("log").len() >= good as u64,
        "the good records were kept"
    );
}

#[test]
fn two_clients_on_one_spool_the_second_refuses() {
    let dir = TempPath::new("lock");
    let spool = dir.join("spool");
    let nowhere = format!("127.0.0.1:{}", free_udp_port());
    let url = "http://127.0.0.1:9/";
    let first = client(&nowhere, url, &spool, &[]);
    first.wait_for("spool ");
    let mut second = client(&nowhere, url, &spool, &[]);
    let msg = second.wait_for("error: ");
    assert!(!second.wait(LIMIT).success(), "the second client must exit");
    assert!(msg.contains("in use by another client"), "{msg}");
    assert!(msg.contains("pid "), "{msg}");
}

/// Sets the file size limit (RLIMIT_FSIZE, soft) of process `pid` (0: this
/// one), leaving the hard limit as it is.
fn set_file_size_limit(pid: libc::pid_t, bytes: libc::rlim_t) -> std::io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit(2) reads and writes only the rlimit structs given.
    unsafe {
        if libc::prlimit(pid, libc::RLIMIT_FSIZE, std::ptr::null(), &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = bytes.min(lim.rlim_max);
        if libc::prlimit(pid, libc::RLIMIT_FSIZE, &lim, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A source, a server recording to a file, and a spool directory: what the
/// full-disk tests share.
struct FullDisk {
    source: Logged,
    url: String,
    listen: String,
    spool: String,
    out: String,
    _server: Logged,
    _dir: TempPath,
}

impl FullDisk {
    fn new(name: &str) -> FullDisk {
        let (source, url) = Logged::start_source();
        let dir = TempPath::new(name);
        std::fs::create_dir_all(&dir.0).expect("mkdir");
        let spool = dir.join("spool");
        let out = dir.join("out.jsonl");
        let listen = format!("127.0.0.1:{}", free_udp_port());
        let server = Logged::spawn("server", &["server", "--listen", &listen, "--out", &out]);
        server.wait_for("listening on ");
        FullDisk {
            source,
            url,
            listen,
            spool,
            out,
            _server: server,
            _dir: dir,
        }
    }

    /// A client on the spool with `extra` flags, fetching every
    /// `interval`, whose files may not grow past 1,500 bytes (its pid for
    /// [`set_file_size_limit`]).
    fn client(&self, interval: &str, extra: &[&str]) -> (Logged, libc::pid_t) {
        use std::os::unix::process::CommandExt;
        let mut flags = vec!["--spool", &self.spool];
        flags.extend_from_slice(extra);
        let mut cmd = std::process::Command::new(common::EXE);
        cmd.args(client_args(&self.listen, &self.url, interval, &flags));
        // SAFETY: signal(2) and setrlimit(2) are async-signal-safe; nothing
        // else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // A write past the limit fails with EFBIG instead of killing.
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                set_file_size_limit(0, 1500)
            });
        }
        let client = Logged::spawn_command("client", cmd);
        let pid = libc::pid_t::try_from(client.child.id()).expect("pid fits");
        (client, pid)
    }
}

/// A full disk, as the kernel reports it to a process past its file size
/// limit (RLIMIT_FSIZE: a failed write(2), as ENOSPC is, without needing a
/// small filesystem or root). A sample the spool cannot take is not
/// reported: it is held back with a warning naming the cause, and
/// reported (in order, under the next seq) once the spool takes it.
#[test]
fn a_sample_the_spool_cannot_take_is_held_back_until_it_can() {
    let disk = FullDisk::new("full");
    let source = &disk.source;
    let out_path = PathBuf::from(&disk.out);
    let (mut client, pid) = disk.client("100ms", &[]);
    let rest = client.wait_for("File too large (os error 27): ");
    assert!(
        rest.starts_with("1 sample(s) held back, not reported until they are in the spool"),
        "{rest}"
    );
    // What the spool took before it filled up: seqs 1..=k (the sample
    // held back has no seq yet, and no later sample gets into a log that
    // only grows).
    let spooled = spooled_seqs(&Path::new(&disk.spool).join("spool.log"));
    let k = spooled.len() as u64;
    assert_eq!(spooled, (1..=k).collect::<Vec<_>>(), "the spool's samples");
    assert!(k >= 5, "{k} samples in the spool before it filled up");
    let recorded = || {
        let mut seqs: Vec<u64> = records(&out_path)
            .iter()
            .filter_map(|r| r["seq"].as_u64())
            .collect();
        seqs.sort_unstable();
        seqs
    };
    // Their reports land (the last may still be on its way)...
    wait_until("the reports of the spooled samples", || {
        recorded().len() as u64 >= k
    });
    // ... and nothing more is reported while the spool takes nothing,
    // though the fetches go on (every 100 ms, past a retry of the spool
    // every second): each one is held back.
    let mut values = Vec::new();
    wait_until("15 values served past the one held back", || {
        served(source, &mut values);
        values.len() as u64 > k + 15
    });
    assert_eq!(
        recorded(),
        (1..=k).collect::<Vec<_>>(),
        "reported while the spool could not take them"
    );

    // Room again: the held samples go in and out, in order.
    set_file_size_limit(pid, libc::RLIM_INFINITY).expect("raise the client's limit");
    client.wait_for("the spool takes samples again");
    let must = values.clone();
    wait_until(
        "every value fetched while the spool was full, recorded",
        || {
            let got: Vec<f64> = records(&out_path)
                .iter()
                .filter_map(|r| r["value"].as_f64())
                .collect();
            must.iter().all(|v| got.contains(v))
        },
    );
    client.signal(libc::SIGINT);
    assert!(client.wait(LIMIT).success(), "the client closes on SIGINT");

    let recs = records(&out_path);
    let seqs: Vec<u64> = recs.iter().filter_map(|r| r["seq"].as_u64()).collect();
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), seqs.len(), "a seq recorded twice: {seqs:?}");
    assert_eq!(
        sorted,
        (1..=sorted.len() as u64).collect::<Vec<_>>(),
        "seq contiguous"
    );
    // In fetch order: seq order is value order.
    let by_seq: BTreeMap<u64, f64> = recs
        .iter()
        .filter_map(|r| Some((r["seq"].as_u64()?, r["value"].as_f64()?)))
        .collect();
    let in_order: Vec<f64> = by_seq.values().copied().collect();
    let served_order: Vec<f64> = values
        .iter()
        .copied()
        .filter(|v| in_order.contains(v))
        .collect();
    assert_eq!(
        in_order[..served_order.len()],
        served_order[..],
        "reported in the order fetched"
    );
}

/// A run of `--count` samples ends by itself once every sample is
/// settled, including those dropped because the spool could not take them
/// (a full disk) and more than `--queue` were held: a dropped sample
/// counts as settled. The reports that were made are recorded once, seqs
/// without gaps. An earlier build waited for ever, even once the disk had
/// room again, for reports the dropped samples never became.
#[test]
fn a_counted_run_ends_when_samples_the_spool_never_took_are_dropped() {
    let disk = FullDisk::new("full-count");
    let source = &disk.source;
    let out = &disk.out;
    let (mut client, pid) = disk.client("50ms", &["--queue", "2", "--count", "30"]);
    let mut values = Vec::new();
    wait_until("the source served 30 values", || {
        served(source, &mut values);
        values.len() >= 30
    });
    // The client took the last one (a hold or a drop) before the disk has
    // room again.
    thread::sleep(Duration::from_millis(300));
    set_file_size_limit(pid, libc::RLIM_INFINITY).expect("raise the client's limit");
    let status = client.wait(LIMIT);
    assert!(status.success(), "the client ended with {status}");
    let lines = client.lines_so_far();
    let count = |what: &str| lines.iter().filter(|l| l.contains(what)).count();
    // Dropped before they had a seq, and (a slow first handshake) reports
    // dropped from the full queue of 2.
    let held = count("a sample the spool could not take was dropped and lost");
    let queued = count("queue full: report seq=");
    assert!(held > 0, "no sample was dropped: the test proves nothing");
    let recs = records(Path::new(&out));
    let mut seqs: Vec<u64> = recs.iter().filter_map(|r| r["seq"].as_u64()).collect();
    seqs.sort_unstable();
    let len = seqs.len();
    seqs.dedup();
    assert_eq!(seqs.len(), len, "a report recorded twice: {seqs:?}");
    assert_eq!(
        len + held + queued,
        30,
        "every sample recorded or dropped ({held} held back and dropped, {queued} dropped from the queue): {seqs:?}"
    );
    let numbered = (30 - held) as u64;
    assert!(
        seqs.iter().all(|s| (1..=numbered).contains(s)),
        "seqs 1..={numbered}: {seqs:?}"
    );
}
