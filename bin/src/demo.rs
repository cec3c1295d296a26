//! `quic-report demo`: source, server and client in one process on
//! loopback, each on a free port, every output line labelled `[source]`,
//! `[server]` or `[client]` on stdout.
//!
//! The source and the server run on their own threads; the client runs on
//! the main thread. Ctrl-C (SIGINT or SIGTERM) is caught by the demo for its
//! whole life ([`catch_signals`]), not by each client run, so it is never
//! lost between two runs: the first closes the client gracefully (or ends
//! the pause before a restart), a second stops it without waiting for the
//! close, a third exits at once. When the client is done (`--count`
//! reached, or Ctrl-C), the server and the source are stopped and joined,
//! and (with `--chaos`) the ledger is checked.
//!
//! The server's sink is a [`Ledger`] in memory, kept across server restarts
//! as `server --out FILE` keeps its file: each new server is given its keys
//! ([`ServerOptions::recorded`]). It says out loud when a report is
//! recorded twice, and notes a seq that overtakes an earlier one.
//!
//! `--chaos`: a controller thread kills the server every 5-15 s, abruptly
//! ([`StopHandle::abort`]: no CONNECTION_CLOSE, as a crash) or gracefully,
//! keeps it down 0.5-3 s (one of the first two outages outlasts the
//! client's idle timeout, lowered to 3 s), and binds a new server on the
//! same address. It kills the client too, at random (every 4-20 s, so
//! also during outages), as a crash would ([`StopHandle::abort`]: no
//! CONNECTION_CLOSE, nothing saved on the way out), and starts a new one
//! on the same spool in a temporary directory: it comes back with the same
//! `client` id and sends what the spool holds first. At the end the
//! ledger is checked against the client's acknowledgements and its spool:
//! every acknowledged seq recorded exactly once, and every seq up to the
//! last one recorded, or still in the spool (not yet acknowledged).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use quic_report_cli::cli::DemoArgs;
use quic_report_cli::devcerts::DevCerts;
use quic_report_core::{ClientEvent, ClientStats, Report, SeqSet, ServerEvent, Verify};
use quic_report_mio::show::{self, Shown};
use quic_report_mio::{
    ClientOptions, ClientSummary, DriverError, FetchOptions, Fsync, RecordedKeys, ServerDriver,
    ServerOptions, Spool, SpoolOptions, StopHandle, run_client,
};
use rand::Rng;

use crate::source::Source;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The demo's line of a server event (the server's log line), if it shows
/// one: a report when the demo's sink has recorded it, and what the
/// server logs at info or above.
fn server_line(ev: &ServerEvent) -> Option<String> {
    match ev {
        // The demo's "sink" is this line: it is printed before the answer is sent.
        ServerEvent::Report {
            handle,
            peer,
            report,
        } => Some(
            show::Recorded {
                conn: handle.conn,
                report,
                peer: *peer,
            }
            .to_string(),
        ),
        _ => match show::server_event(ev) {
            Shown::Debug(_) => None,
            Shown::Ack(s) | Shown::Info(s) | Shown::Warn(s) => Some(s),
        },
    }
}

/// The demo's line of a client event (the `client` command's line), if it
/// shows one; the first attempt names the server.
fn client_line(ev: &ClientEvent, stats: &ClientStats, server: SocketAddr) -> Option<String> {
    match (ev, show::client_event(ev, stats)) {
        (ClientEvent::Connecting { attempt }, _) => {
            Some(format!("connecting to {server} (attempt {attempt})"))
        }
        (_, Shown::Ack(s) | Shown::Info(s) | Shown::Warn(s)) => Some(s),
        (_, Shown::Debug(_)) => None,
    }
}

/// The client's idle timeout under `--chaos`.
const CHAOS_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// What the server recorded, per client, across its restarts (the demo's
/// stand-in for `--out FILE`).
#[derive(Debug, Default)]
struct Ledger {
    seqs: BTreeMap<String, SeqSet>,
    duplicates: u64,
}

impl Ledger {
    /// Records `report`; returns an alarm if it was recorded before, or a
    /// note if it skips seqs. (Reports travel on separate streams, so after
    /// a reconnect one may overtake another: a gap is only a loss if it is
    /// still there at the end, which [`check`] says.)
    fn record(&mut self, report: &Report) -> Option<String> {
        let (client, seq) = report.key()?;
        let seqs = self.seqs.entry(client.to_owned()).or_default();
        let next = seqs.last().map_or(1, |m| m + 1);
        if !seqs.insert(seq) {
            self.duplicates += 1;
            return Some(format!(
                "!!! DUPLICATE: seq={seq} from client {client} recorded a second time"
            ));
        }
        (seq > next).then(|| {
            let missing = if seq - 1 == next {
                format!("seq={next}")
            } else {
                format!("seq={next}..={}", seq - 1)
            };
            format!("gap: seq={seq} arrived before {missing} (overtaken; still on its way)")
        })
    }

    fn len(&self) -> u64 {
        self.seqs.values().map(SeqSet::len).sum()
    }

    /// The keys, for the next server.
    fn keys(&self) -> RecordedKeys {
        let mut keys = RecordedKeys::new();
        for (client, seqs) in &self.seqs {
            for seq in seqs.iter() {
                // The demo is anonymous (loopback): identity "".
                keys.insert("", client, seq);
            }
        }
        keys
    }
}

type SharedLedger = Arc<Mutex<Ledger>>;

fn lock(ledger: &SharedLedger) -> std::sync::MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A server loop on its own thread.
struct RunningServer {
    stop: StopHandle,
    thread: JoinHandle<Result<(), DriverError>>,
}

impl RunningServer {
    /// Stops it (abruptly: no CONNECTION_CLOSE) and joins it.
    fn end(self, abrupt: bool) -> Result<(), Error> {
        if abrupt {
            self.stop.abort();
        } else {
            self.stop.stop();
        }
        match self.thread.join() {
            Ok(res) => res.map_err(Into::into),
            Err(_) => Err("the server thread panicked".into()),
        }
    }
}

/// How to start a server, again and again.
#[derive(Clone)]
struct ServerPlan {
    cert: PathBuf,
    key: PathBuf,
    ledger: SharedLedger,
    /// Stopped when a server fails, so the demo ends.
    on_failure: StopHandle,
}

impl ServerPlan {
    /// Binds a server on `addr` (retrying briefly if the old socket is not
    /// gone yet) that knows every report in the ledger, and runs it.
    fn start(&self, addr: SocketAddr) -> Result<(RunningServer, SocketAddr), Error> {
        let mut opts = ServerOptions::new(addr, self.cert.clone(), self.key.clone());
        opts.handle_signals = false; // the client catches Ctrl-C, then stops us
        opts.recorded = lock(&self.ledger).keys();
        let give_up = Instant::now() + Duration::from_secs(2);
        let server = loop {
            match ServerDriver::bind(opts.clone()) {
                Ok(s) => break s,
                Err(DriverError::Bind { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse
                        && Instant::now() < give_up =>
                {
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let bound = server.local_addr();
        let stop = server.stop_handle();
        let ledger = Arc::clone(&self.ledger);
        let on_failure = self.on_failure.clone();
        let thread = thread::Builder::new()
            .name("server".into())
            .spawn(move || {
                // The demo's "sink": the ledger, written before the answer is sent.
                let mut sink = |r: &Report| {
                    if let Some(alarm) = lock(&ledger).record(r) {
                        println!("[server] {alarm}");
                    }
                    Ok(())
                };
                let res = server.run(&mut sink, &mut |ev| {
                    if let Some(line) = server_line(ev) {
                        println!("[server] {line}");
                    }
                });
                if res.is_err() {
                    on_failure.stop();
                }
                res
            })?;
        Ok((RunningServer { stop, thread }, bound))
    }
}

/// Waits `d`; `true` if the demo is ending (the sender is gone).
fn ending(quit: &mpsc::Receiver<()>, d: Duration) -> bool {
    !matches!(quit.recv_timeout(d), Err(RecvTimeoutError::Timeout))
}

/// The server's life until the demo ends: without chaos, just run; with
/// chaos, kill and restart it at random. Returns the last server's result.
fn control(
    plan: &ServerPlan,
    addr: SocketAddr,
    first: RunningServer,
    chaos: bool,
    quit: &mpsc::Receiver<()>,
) -> Result<(), Error> {
    let mut server = first;
    if !chaos {
        let _ = quit.recv();
        return server.end(false);
    }
    let mut rng = rand::rng();
    // One of the first two outages outlasts the client's idle timeout.
    let long_outage = rng.random_range(1..=2u32);
    for outage in 1u32.. {
        let up = Duration::from_millis(rng.random_range(5_000..=15_000));
        if ending(quit, up) {
            break;
        }
        let long = outage == long_outage;
        let abrupt = long || rng.random_bool(0.5);
        let down = if long {
            CHAOS_IDLE_TIMEOUT + Duration::from_secs(1)
        } else {
            Duration::from_millis(rng.random_range(500..=3_000))
        };
        server.end(abrupt)?;
        let how = if abrupt {
            "killed abruptly (no CONNECTION_CLOSE)"
        } else {
            "stopped gracefully (CONNECTION_CLOSE sent)"
        };
        let longer = if long {
            " (longer than the client's idle timeout)"
        } else {
            ""
        };
        println!(
            "[server] {how}; down for {:.1} s{longer}",
            down.as_secs_f64()
        );
        if ending(quit, down) {
            return Ok(());
        }
        let (next, _) = plan.start(addr).inspect_err(|_| plan.on_failure.stop())?;
        server = next;
        println!(
            "[server] restarted on {addr} (restart {outage}; remembers {} recorded reports)",
            lock(&plan.ledger).len()
        );
    }
    server.end(false)
}

/// Checks the ledger against the client's acknowledgements and what its
/// spool still holds (`pending`): every acknowledged seq recorded, none
/// twice, and no seq below the last recorded one missing unless it is
/// still pending. Prints the verdict.
fn check(
    ledger: &Ledger,
    client: &str,
    acked: &BTreeSet<u64>,
    pending: &BTreeSet<u64>,
) -> Result<(), Error> {
    let recorded = ledger.seqs.get(client).cloned().unwrap_or_default();
    let lost: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|s| !recorded.contains(*s))
        .collect();
    let (first, last) = (recorded.first().unwrap_or(0), recorded.last().unwrap_or(0));
    let holes: Vec<u64> = (1..=last).filter(|s| !recorded.contains(*s)).collect();
    let gaps: Vec<u64> = holes
        .iter()
        .copied()
        .filter(|s| !pending.contains(s))
        .collect();
    if lost.is_empty() && ledger.duplicates == 0 && gaps.is_empty() {
        let holes = if holes.is_empty() {
            String::new()
        } else {
            format!(" (still in the client's spool, not yet acknowledged: {holes:?})")
        };
        println!(
            "[server] check: {} reports recorded, seq {first}..={last}, each exactly once{holes}",
            recorded.len()
        );
        return Ok(());
    }
    println!(
        "[server] !!! CHECK FAILED: {} duplicate(s); acknowledged but not recorded: {lost:?}; \
         neither recorded nor in the spool: {gaps:?}",
        ledger.duplicates
    );
    Err("the server recorded a report twice or lost one".into())
}

/// Runs the demo until `--count` acknowledgements or Ctrl-C.
pub fn run(args: &DemoArgs) -> Result<(), Error> {
    let certs = DevCerts::write()?;
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));

    let source = Source::start(loopback, |a| println!("[source] {}", a.short()))?;
    let source_url = format!("http://{}/", source.addr());

    let client_stop = StopHandle::new();
    let signals = catch_signals(&client_stop)?;
    let plan = ServerPlan {
        cert: certs.cert(),
        key: certs.key(),
        ledger: Arc::default(),
        on_failure: client_stop.clone(),
    };
    let (server, server_addr) = plan.start(loopback)?;

    println!("[source] listening on {source_url}");
    println!("[server] listening on {server_addr} (development certificate)");
    if args.chaos {
        println!(
            "[server] chaos: killed and restarted at random; the client's idle timeout is {}",
            humantime::format_duration(CHAOS_IDLE_TIMEOUT)
        );
    }

    let (quit_tx, quit_rx) = mpsc::channel::<()>();
    let controller = {
        let plan = plan.clone();
        let chaos = args.chaos;
        thread::Builder::new()
            .name("chaos".into())
            .spawn(move || control(&plan, server_addr, server, chaos, &quit_rx))?
    };

    // Removed however `run` ends; a name no later demo meets again, should
    // the process be killed first (the third Ctrl-C, SIGKILL).
    let spool = args.chaos.then(|| {
        Removed(std::env::temp_dir().join(format!(
            "quic-report-demo-spool-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        )))
    });
    let spool_dir = spool.as_ref().map(|r| r.0.clone());
    let mut acked = BTreeSet::new();
    let client_res = run_clients(
        args,
        &ClientPlan {
            server: server_addr,
            ca: certs.ca(),
            source_url: &source_url,
            spool: spool_dir.as_deref(),
            stop: &client_stop,
        },
        &mut acked,
    );
    signals.close();
    if let Ok(summary) = &client_res {
        println!(
            "[client] done: {} acknowledged, {} not acknowledged, {} connection(s)",
            summary.stats.acknowledged_kept(),
            summary.unacknowledged,
            summary.stats.connections
        );
    }

    drop(quit_tx);
    let server_res: Result<(), Error> = match controller.join() {
        Ok(res) => res,
        Err(_) => Err("the server controller panicked".into()),
    };
    drop(source);
    println!("[server] stopped");
    println!("[source] stopped");

    let summary: ClientSummary = client_res?;
    server_res?;
    if let Some(dir) = &spool_dir {
        check(
            &lock(&plan.ledger),
            &summary.client_id,
            &acked,
            &pending_in(dir)?,
        )?;
    }
    drop(spool);
    drop(certs);
    Ok(())
}

/// A directory removed when this is dropped.
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where the demo's client runs, and what stops it.
struct ClientPlan<'a> {
    server: SocketAddr,
    ca: PathBuf,
    source_url: &'a str,
    /// With `--chaos`: the spool it restarts on.
    spool: Option<&'a std::path::Path>,
    stop: &'a StopHandle,
}

/// Runs the client, printing its events, until `--count` or a stop; with
/// `--chaos`, kills it at random and restarts it on its spool after a
/// pause. Every acknowledged seq goes into `acked`.
fn run_clients(
    args: &DemoArgs,
    plan: &ClientPlan<'_>,
    acked: &mut BTreeSet<u64>,
) -> Result<ClientSummary, Error> {
    let server_addr = plan.server;
    let mut rng = rand::rng();
    loop {
        let mut client_opts = ClientOptions::new(server_addr, Verify::CaFile(plan.ca.clone()));
        client_opts.handle_signals = false; // caught for the whole demo, in `run`
        client_opts.fetch = Some(FetchOptions {
            count: args.count,
            ..FetchOptions::new(plan.source_url.to_owned(), args.interval)
        });
        client_opts.count = args.count.map(|n| n.saturating_sub(acked.len() as u64));
        client_opts.spool = plan.spool.map(|dir| SpoolOptions {
            dir: dir.to_path_buf(),
            fsync: Fsync::Never, // a process crash, not a power loss
        });
        let killer = if args.chaos {
            client_opts.config.idle_timeout = CHAOS_IDLE_TIMEOUT;
            client_opts.config.keep_alive = Some(CHAOS_IDLE_TIMEOUT / 2);
            let after = Duration::from_millis(rng.random_range(4_000..=20_000));
            Some(Killer::start(plan.stop, &client_opts.stop, after)?)
        } else {
            client_opts.stop = plan.stop.clone();
            None
        };
        let res = run_client(client_opts, &mut |ev, c| {
            if let ClientEvent::Acknowledged { seq, .. } = ev {
                acked.insert(*seq);
            }
            if let Some(line) = client_line(ev, &c.stats(), server_addr) {
                if matches!(ev, ClientEvent::ReportDropped { .. }) {
                    println!("[client] {line} and lost ({} dropped so far)", c.dropped());
                } else {
                    println!("[client] {line}");
                }
            }
        });
        if let Some(k) = killer
            && k.end()
            && res.is_ok()
        {
            let down = Duration::from_millis(rng.random_range(200..=1_500));
            println!(
                "[client] killed abruptly (as by SIGKILL); restarting on its spool in {:.1} s",
                down.as_secs_f64()
            );
            if stopped_within(plan.stop, down) {
                // Ctrl-C (or a failed server) during the pause: the demo
                // ends here, with the run that was just killed.
                return Ok(res?);
            }
            continue;
        }
        return Ok(res?);
    }
}

/// The seqs still in the spool in `dir`.
fn pending_in(dir: &std::path::Path) -> Result<BTreeSet<u64>, Error> {
    let opts = SpoolOptions {
        dir: dir.to_path_buf(),
        fsync: Fsync::Never,
    };
    let mut spool = Spool::open(&opts, String::new)?;
    Ok(spool.take_restored().into_iter().map(|(s, _)| s).collect())
}

/// Catches SIGINT and SIGTERM for the whole demo on a thread of their own:
/// the first stops `stop` (a graceful close of the client, or the end of a
/// pause between two client runs), the second aborts it (no waiting for the
/// close), the third exits the process at once.
fn catch_signals(stop: &StopHandle) -> Result<signal_hook::iterator::Handle, Error> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let handle = signals.handle();
    let stop = stop.clone();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for (n, sig) in signals.forever().enumerate() {
                let name = quic_report_mio::signal::signal_name(sig);
                match n {
                    0 => {
                        println!("[client] {name}: stopping");
                        stop.stop();
                    }
                    1 => {
                        println!("[client] {name} again: stopping without waiting for the close");
                        stop.abort();
                    }
                    _ => {
                        println!("[client] {name} a third time: exiting now");
                        std::process::exit(130);
                    }
                }
            }
        })?;
    Ok(handle)
}

/// Waits `d` unless `stop` is stopped first (checked every 20 ms); whether
/// it was.
fn stopped_within(stop: &StopHandle, d: Duration) -> bool {
    let end = Instant::now() + d;
    loop {
        if stop.is_stopped() {
            return true;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        thread::sleep(left.min(Duration::from_millis(20)));
    }
}

/// Aborts one client run after a while, as a crash would; passes a stop
/// (and an abort) of the whole demo on to it.
struct Killer {
    done: mpsc::Sender<()>,
    thread: JoinHandle<bool>,
}

impl Killer {
    fn start(demo: &StopHandle, run: &StopHandle, after: Duration) -> Result<Killer, Error> {
        let (done, rx) = mpsc::channel::<()>();
        let (demo, run) = (demo.clone(), run.clone());
        let thread = thread::Builder::new()
            .name("client killer".into())
            .spawn(move || {
                let at = Instant::now() + after;
                let mut passed_on = false;
                loop {
                    if demo.is_aborted() {
                        run.abort();
                        return false;
                    }
                    if demo.is_stopped() && !passed_on {
                        // The run closes gracefully: no crash any more,
                        // but a second Ctrl-C is still passed on.
                        run.stop();
                        passed_on = true;
                    }
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() && !passed_on {
                        run.abort();
                        return true;
                    }
                    let tick = if passed_on {
                        Duration::from_millis(50)
                    } else {
                        left.min(Duration::from_millis(50))
                    };
                    match rx.recv_timeout(tick) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return false,
                    }
                }
            })?;
        Ok(Killer { done, thread })
    }

    /// The run ended: whether it was killed.
    fn end(self) -> bool {
        drop(self.done);
        self.thread.join().unwrap_or(false)
    }
}
