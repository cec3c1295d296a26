//! `quic-report-bench`: the load generator of `make bench` (scripts/bench.sh)
//! on our own core, and the raw UDP echo it is compared with.
//!
//! One thread, one `mio::Poll`, like the driver; one connected UDP socket
//! per connection. The server's flags (`--server`, `--ca`, `--server-name`,
//! `--insecure`) are the client's, from `quic_report_cli`. Modes:
//!
//! - **reports** (default): C connections, each a [`quic_report_core::Client`]
//!   with `max_in_flight = K`, each kept at K reports outstanding (a new
//!   sample is submitted whenever one is acknowledged). Every answer must
//!   echo its report (`Acknowledged`, not a duplicate, right `seq`, `client`
//!   and `value`); anything else counts as an error. Counting starts once
//!   every connection is established and the warm-up is over. Prints
//!   `reports_per_s=.. acked=.. errors=.. p50_ms=.. p99_ms=..`.
//! - **handshakes** (`--handshakes`): C workers each repeating connect (a
//!   fresh client, so a full handshake, no resumption), one report, close.
//!   Prints `handshakes_per_s=..`.
//! - **idle** (`--idle-connections N --hold D`): N connections, one report
//!   each, then held open; with `--server-pid`, the server's VmRSS growth
//!   per connection. Prints `idle_connections=.. server_kb_per_conn=..
//!   client_kb_per_conn=..`.
//! - **udp-echo** (`--udp-echo`): the same shape (C sockets, K in flight,
//!   60-byte payloads) over plain UDP against a trivial echo server: the
//!   machine's limit for small request/response round trips. Prints
//!   `round_trips_per_s=.. p50_ms=.. p99_ms=..`.
//! - **echo server** (`--echo-server ADDR`): just that echo server, as its own
//!   process (to pin it to a CPU); until killed.
//!
//! Latency is per request, from submit to acknowledgement, sorted (nearest
//! rank), never averaged. With `--server-pid`, one more line on stderr,
//! `detail: key=value ...`, gives the server's CPU time per operation (from
//! `/proc/PID/task/*/schedstat`, nanoseconds), both processes' CPU
//! utilisation and the datagrams per operation.

mod echo;
mod quic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser};
use quic_report_cli::cli::{ServerArg, TargetArgs, positive_duration};
use quic_report_cli::tls;
use quic_report_core::{CertFiles, Verify};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Load generator: reports/s, handshakes/s, memory per connection, and the
/// raw UDP echo limit they are compared with (see the README's Benchmarks).
#[derive(Debug, Parser)]
#[command(name = "quic-report-bench", version)]
#[command(group(ArgGroup::new("mode").args(["handshakes", "udp_echo", "idle_connections", "echo_server"])))]
pub struct BenchArgs {
    /// The server to load, and how to verify it (as for `client`).
    #[command(flatten)]
    pub target: TargetArgs,
    /// Connections (reports, udp-echo) or parallel workers (handshakes).
    #[arg(long, short = 'c', value_name = "C", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,
    /// Reports (or datagrams) kept in flight on each connection.
    #[arg(long, short = 'k', value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub in_flight: u32,
    /// How long to measure (after the warm-up).
    #[arg(long, short = 'd', default_value = "2s", value_name = "DURATION", value_parser = positive_duration)]
    pub duration: Duration,
    /// Load applied but not counted, once every connection is up.
    #[arg(long, default_value = "500ms", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Stop measuring after this many acknowledged reports (or handshakes)
    /// instead of after --duration (fixed work, e.g. under callgrind).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Measure this process (the server): CPU time per operation from
    /// /proc/PID/task/*/schedstat, and VmRSS in --idle-connections mode.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Also measure these processes (a database's, e.g. PostgreSQL's
    /// backend): their CPU time and run-queue wait per operation, as
    /// `database_cpu_us_per_op` and `database_wait_us_per_op`.
    #[arg(long, value_name = "PID,...", value_delimiter = ',')]
    pub database_pids: Vec<u32>,
    /// Handshake mode: C workers each repeating connect (full handshake),
    /// one report, close. Prints `handshakes_per_s=`.
    #[arg(long)]
    pub handshakes: bool,
    /// Idle mode: open N connections, one report each, hold them for --hold,
    /// and report memory per connection.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub idle_connections: Option<u32>,
    /// How long --idle-connections holds its connections open.
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = positive_duration)]
    pub hold: Duration,
    /// Raw UDP instead of QUIC: the same shape against an echo server (one
    /// started on a thread, unless --echo-addr names one).
    #[arg(long)]
    pub udp_echo: bool,
    /// With --udp-echo: the address of an echo server run separately
    /// (`quic-report-bench --echo-server ADDR`).
    #[arg(long, value_name = "ADDR", requires = "udp_echo")]
    pub echo_addr: Option<SocketAddr>,
    /// Run only a UDP echo server on ADDR, until killed.
    #[arg(long, value_name = "ADDR")]
    pub echo_server: Option<SocketAddr>,
    /// The echo server reads and writes with recvmmsg/sendmmsg (batches of
    /// 64) instead of one recvfrom/sendto per datagram.
    #[arg(long)]
    pub echo_batch: bool,
    /// The echo server's socket sets SO_REUSEPORT (run several on one port).
    #[arg(long)]
    pub reuseport: bool,
    /// UDP payload of --udp-echo, bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 60, value_parser = clap::value_parser!(u16).range(16..=1400))]
    pub payload: u16,
}

fn main() -> ExitCode {
    // SAFETY: the first thing the process does; no other thread exists.
    unsafe { tls::trust_only_named_cas() };
    let args = BenchArgs::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quic-report-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the mode the arguments name.
fn run(args: &BenchArgs) -> Result<(), Error> {
    raise_fd_limit(u64::from(args.idle_connections.unwrap_or(0)) + 256);
    if let Some(addr) = args.echo_server {
        return echo::serve_forever(addr, args.echo_batch, args.reuseport);
    }
    if args.udp_echo {
        return echo::run_client(args);
    }
    // No default CA store to parse per `Client` (one per handshake): main
    // has emptied it (`tls::trust_only_named_cas`).
    let target = ServerArg::parse(&args.target.server)?;
    let mut dev = None;
    let (verify, server_name) = tls::verification(
        &args.target.tls,
        target.default_name(),
        target.is_loopback(),
        &mut dev,
    )?;
    let server = target.resolve(Duration::from_secs(10))?;
    let target = Target {
        server,
        server_name,
        verify,
        client_cert: tls::client_cert(&args.target.tls)?,
    };
    let res = quic::run(args, &target);
    drop(dev);
    res
}

/// Where the QUIC modes connect, and how they verify the server.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) server: SocketAddr,
    pub(crate) server_name: String,
    pub(crate) verify: Verify,
    /// Our client certificate (`--cert`/`--key`), for a server with
    /// `--client-ca`: handshakes then cost mutual TLS.
    pub(crate) client_cert: Option<CertFiles>,
}

/// Per-request latencies in nanoseconds. Both ends of a latency read the
/// clock when the request is sent and when its answer is handled (not the
/// loop's `now`, which can predate a reply handled in the same pass).
#[derive(Debug, Default)]
pub(crate) struct Latencies(Vec<u64>);

impl Latencies {
    pub(crate) fn push(&mut self, d: Duration) {
        self.0.push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Sorts, then the nearest-rank percentiles, in milliseconds.
    pub(crate) fn percentiles_ms(&mut self, ps: &[f64]) -> Vec<f64> {
        self.0.sort_unstable();
        ps.iter()
            .map(|&p| {
                if self.0.is_empty() {
                    return f64::NAN;
                }
                let rank = (p * self.0.len() as f64).ceil() as usize;
                let i = rank.clamp(1, self.0.len()) - 1;
                self.0[i] as f64 / 1e6
            })
            .collect()
    }
}

/// One thread's (or a group of same-named threads') schedstat: time on
/// a CPU and time waiting on a run queue for one, ns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ThreadTime {
    /// `main` for the process's first thread, else the thread's name.
    pub(crate) name: String,
    pub(crate) cpu: u64,
    pub(crate) wait: u64,
}

/// The threads of a process, summed by name (`main` is the thread whose
/// id is the process's), in name order; `None` if the process is gone.
pub(crate) fn threads(pid: u32) -> Option<Vec<ThreadTime>> {
    let mut by_name = std::collections::BTreeMap::<String, (u64, u64)>::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir: PathBuf = entry.ok()?.path();
        let Ok(stat) = std::fs::read_to_string(dir.join("schedstat")) else {
            continue; // the thread ended meanwhile
        };
        let mut fields = stat.split_whitespace().map(|v| v.parse::<u64>().ok());
        let (Some(Some(cpu)), Some(Some(wait))) = (fields.next(), fields.next()) else {
            continue;
        };
        let name = if dir.file_name().and_then(|n| n.to_str()) == Some(&pid.to_string()) {
            "main".to_string()
        } else {
            std::fs::read_to_string(dir.join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_default()
        };
        let e = by_name.entry(name).or_default();
        e.0 += cpu;
        e.1 += wait;
    }
    Some(
        by_name
            .into_iter()
            .map(|(name, (cpu, wait))| ThreadTime { name, cpu, wait })
            .collect(),
    )
}

/// CPU time and run-queue wait (ns) of `threads`, summed.
fn summed(threads: &[ThreadTime]) -> (u64, u64) {
    threads
        .iter()
        .fold((0, 0), |(c, w), t| (c + t.cpu, w + t.wait))
}

/// VmRSS of a process, KiB.
pub(crate) fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Busy CPU time of the whole machine (every CPU), ns, from /proc/stat:
/// user, nice, system, irq, softirq and steal.
fn machine_busy_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(busy * (1_000_000_000 / hz))
}

/// Samples the CPU time of this process, of the server (per thread) if
/// given, of the database's processes if given, and of the whole machine
/// (to tell how much CPU other processes took).
#[derive(Debug, Clone)]
pub(crate) struct CpuSample {
    at: std::time::Instant,
    /// This process's CPU time and run-queue wait.
    own: Option<(u64, u64)>,
    server: Option<Vec<ThreadTime>>,
    /// CPU and run-queue wait of the database's processes, summed.
    database: Option<(u64, u64)>,
    machine: Option<u64>,
}

impl CpuSample {
    pub(crate) fn take(server_pid: Option<u32>, database_pids: &[u32]) -> CpuSample {
        let database = (!database_pids.is_empty()).then(|| {
            database_pids
                .iter()
                .filter_map(|&p| threads(p))
                .map(|ts| summed(&ts))
                .fold((0, 0), |(c, w), (pc, pw)| (c + pc, w + pw))
        });
        CpuSample {
            at: std::time::Instant::now(),
            own: threads(std::process::id()).map(|ts| summed(&ts)),
            server: server_pid.and_then(threads),
            database,
            machine: machine_busy_ns(),
        }
    }

    fn server_ns(&self) -> Option<u64> {
        self.server.as_ref().map(|ts| summed(ts).0)
    }

    /// `server_cpu_us_per_op`, `server_threads` (each thread's CPU and
    /// run-queue wait per operation, µs: `main:7.31+0.12,sink:4.65+6.29`,
    /// threads under 1 % of the server's CPU left out), both
    /// utilisations, the generator's own run-queue wait, the database's
    /// CPU and wait, and `other_cpu_util` (CPUs' worth taken by other
    /// processes: machine busy time minus ours, the server's and the
    /// database's; /proc/stat counts in clock ticks, so +-0.01 or so),
    /// since `self`.
    pub(crate) fn detail(&self, end: &CpuSample, ops: u64) -> String {
        let wall = end.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let per_op = |ns: u64| ns as f64 / 1e3 / ops.max(1) as f64;
        let diff = |x: Option<u64>, y: Option<u64>| match (x, y) {
            (Some(x), Some(y)) => y.saturating_sub(x),
            _ => 0,
        };
        let database = match (self.database, end.database) {
            (Some(a), Some(b)) => Some((b.0.saturating_sub(a.0), b.1.saturating_sub(a.1))),
            _ => None,
        };
        let mut s = String::new();
        if let (Some(a), Some(b)) = (self.machine, end.machine) {
            let other = b.saturating_sub(a) as f64
                - diff(self.own.map(|o| o.0), end.own.map(|o| o.0)) as f64
                - diff(self.server_ns(), end.server_ns()) as f64
                - database.map_or(0, |d| d.0) as f64;
            s.push_str(&format!(
                " other_cpu_util={:.3}",
                (other / 1e9 / wall).max(0.0)
            ));
        }
        if let (Some(a), Some(b)) = (self.server_ns(), end.server_ns()) {
            let ns = b.saturating_sub(a);
            s.push_str(&format!(
                " server_cpu_us_per_op={:.2} server_cpu_util={:.3}",
                per_op(ns),
                ns as f64 / 1e9 / wall
            ));
            if let (Some(before), Some(after)) = (&self.server, &end.server) {
                let threads: Vec<String> = after
                    .iter()
                    .filter_map(|t| {
                        let b = before.iter().find(|x| x.name == t.name);
                        let cpu = t.cpu.saturating_sub(b.map_or(0, |x| x.cpu));
                        let wait = t.wait.saturating_sub(b.map_or(0, |x| x.wait));
                        (cpu * 100 >= ns)
                            .then(|| format!("{}:{:.2}+{:.2}", t.name, per_op(cpu), per_op(wait)))
                    })
                    .collect();
                s.push_str(&format!(" server_threads={}", threads.join(",")));
            }
        }
        if let (Some((a, a_wait)), Some((b, b_wait))) = (self.own, end.own) {
            let ns = b.saturating_sub(a);
            s.push_str(&format!(
                " generator_cpu_us_per_op={:.2} generator_wait_us_per_op={:.2} generator_cpu_util={:.3}",
                per_op(ns),
                per_op(b_wait.saturating_sub(a_wait)),
                ns as f64 / 1e9 / wall
            ));
        }
        if let Some((cpu, wait)) = database {
            s.push_str(&format!(
                " database_cpu_us_per_op={:.2} database_wait_us_per_op={:.2} database_cpu_util={:.3}",
                per_op(cpu),
                per_op(wait),
                cpu as f64 / 1e9 / wall
            ));
        }
        s
    }
}

/// Lifts the soft limit on open files towards the hard one (a socket per
/// connection).
fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                log::warn!("cannot raise the open-file limit to {want}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// This thread's CPU time, ns.
    fn thread_cpu_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid pointer to a local timespec.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0);
        u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
            + u64::try_from(ts.tv_nsec).unwrap_or(0)
    }

    #[test]
    fn threads_are_summed_by_name_with_the_first_one_as_main() {
        let before = threads(std::process::id()).expect("this process");
        let (spun_tx, spun) = mpsc::channel();
        let mut go_on = Vec::new();
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let spun_tx = spun_tx.clone();
                let (tx, rx) = mpsc::channel::<()>();
                go_on.push(tx);
                std::thread::Builder::new()
                    .name("bench-spin".into())
                    .spawn(move || {
                        // 20 ms of this thread's own CPU time, then wait
                        // (alive: a thread's schedstat goes with it).
                        while thread_cpu_ns() < 20_000_000 {
                            std::hint::black_box(0u64);
                        }
                        spun_tx.send(()).expect("send");
                        let _ = rx.recv();
                    })
                    .expect("spawn")
            })
            .collect();
        for _ in 0..2 {
            spun.recv().expect("spun");
        }
        let during = threads(std::process::id()).expect("this process");
        drop(go_on);
        for w in workers {
            w.join().expect("join");
        }
        let spin_cpu = |ts: &[ThreadTime]| {
            ts.iter()
                .find(|t| t.name == "bench-spin")
                .map_or(0, |t| t.cpu)
        };
        assert_eq!(spin_cpu(&before), 0);
        // Two threads of one name make one entry, with the CPU of both.
        assert_eq!(
            during.iter().filter(|t| t.name == "bench-spin").count(),
            1,
            "{during:?}"
        );
        // (schedstat may not have counted the last few ms of a thread still
        // running: it is brought up to date at ticks and switches.)
        assert!(spin_cpu(&during) >= 30_000_000, "{during:?}");
        // The process's first thread is `main`.
        assert!(during.iter().any(|t| t.name == "main"), "{during:?}");
        assert!(threads(u32::MAX).is_none());
    }
}
