//! `pg-cluster CMD [ARGS...]`: starts a private PostgreSQL cluster, runs
//! CMD with `QUIC_REPORT_PG_URL` (a `postgres://` URL of database
//! `postgres`, password included), `QUIC_REPORT_PG_PORT` and
//! `QUIC_REPORT_PG_DATA` set, then stops and removes the cluster, whatever
//! CMD's outcome (also on SIGINT, which a terminal sends CMD too, and
//! SIGTERM, which is passed on to CMD; either while the cluster starts
//! stops it and ends here). Exits with CMD's status. `make bench` runs its database rows under it.

use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use quic_report_pg_cluster::PgCluster;

/// The last SIGINT or SIGTERM that arrived (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn note_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(prog) = args.next() else {
        eprintln!("usage: pg-cluster CMD [ARGS...]");
        return ExitCode::from(2);
    };
    // Noted, from before the cluster starts: a signal while it starts
    // stops it and ends here, instead of killing us with the cluster left
    // running. A handler (not SIG_IGN) is reset by exec: CMD and what it
    // starts get the default dispositions.
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, note_signal as *const () as libc::sighandler_t);
        libc::signal(
            libc::SIGTERM,
            note_signal as *const () as libc::sighandler_t,
        );
    }
    let cluster = match PgCluster::start() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pg-cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    if SIGNAL.load(Ordering::SeqCst) != 0 {
        drop(cluster);
        eprintln!("pg-cluster: stopped by a signal before running CMD");
        return ExitCode::from(130);
    }
    let mut cmd = Command::new(&prog);
    cmd.args(args)
        .env("QUIC_REPORT_PG_URL", cluster.url("postgres"))
        .env("QUIC_REPORT_PG_PORT", cluster.port().to_string())
        .env("QUIC_REPORT_PG_DATA", cluster.data());
    let status = cmd.spawn().and_then(|mut child| {
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            // SIGTERM sent to us alone is passed on; SIGINT from a terminal
            // reaches CMD's process group by itself.
            if SIGNAL.swap(0, Ordering::SeqCst) == libc::SIGTERM
                && let Ok(pid) = libc::pid_t::try_from(child.id())
            {
                // SAFETY: kill(2) has no memory effects.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    drop(cluster);
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("pg-cluster: {} exited with {s}", prog.to_string_lossy());
            ExitCode::from(u8::try_from(s.code().unwrap_or(1)).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("pg-cluster: cannot run {}: {e}", prog.to_string_lossy());
            ExitCode::FAILURE
        }
    }
}
