//! `pg-cluster CMD [ARGS...]`: starts a private PostgreSQL cluster, runs
//! CMD with `QUIC_REPORT_PG_URL` (a `postgres://` URL of database
//! `postgres`, password included), `QUIC_REPORT_PG_PORT` and
//! `QUIC_REPORT_PG_DATA` set, then stops and removes the cluster, whatever
//! CMD's outcome (also on SIGINT/SIGTERM, which are passed to CMD). Exits
//! with CMD's status. `make bench` runs its database rows under it.

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use quic_report_pg_cluster::PgCluster;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(prog) = args.next() else {
        eprintln!("usage: pg-cluster CMD [ARGS...]");
        return ExitCode::from(2);
    };
    let cluster = match PgCluster::start() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pg-cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    // CMD gets the signals of the terminal's process group too; we wait
    // for it and clean up.
    // SAFETY: setting SIG_IGN has no memory effects.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    let mut cmd = Command::new(&prog);
    cmd.args(args)
        .env("QUIC_REPORT_PG_URL", cluster.url("postgres"))
        .env("QUIC_REPORT_PG_PORT", cluster.port().to_string())
        .env("QUIC_REPORT_PG_DATA", cluster.data());
    // An ignored signal stays ignored across exec: CMD and everything it
    // starts get the default dispositions back, or a script's `kill` of its
    // own children would do nothing (and `make bench` waited for ever).
    // SAFETY: signal() is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            Ok(())
        });
    }
    let status = cmd.status();
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
