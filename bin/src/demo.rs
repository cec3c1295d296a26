//! `quic-report demo`: source, server and client in one process on
//! loopback, each on a free port, every output line labelled `[source]`,
//! `[server]` or `[client]` on stdout.
//!
//! The source and the server run on their own threads; the client runs on
//! the main thread and catches Ctrl-C. When the client is done (`--count`
//! reached, or Ctrl-C), the server and the source are stopped and joined.

use std::net::{Ipv4Addr, SocketAddr};
use std::thread;

use quic_report_core::{ClientEvent, Report, ServerEvent, Verify};
use quic_report_mio::{
    ClientOptions, FetchOptions, ServerDriver, ServerOptions, StopHandle, run_client,
};

use crate::cli::{DemoArgs, Shown, show_client_event};
use crate::devcerts::DevCerts;
use crate::source::Source;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// `0.6815` for a float, the JSON otherwise, `-` when absent.
fn show_value(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::Number(n)) if n.is_f64() => n
            .as_f64()
            .map_or_else(|| n.to_string(), |f| format!("{f:.4}")),
        Some(v) => v.to_string(),
        None => "-".to_owned(),
    }
}

fn server_line(ev: &ServerEvent) -> Option<String> {
    Some(match ev {
        // The demo's "sink" is this line: it is printed before the answer is sent.
        ServerEvent::Report { peer, report, .. } => {
            let seq = report.seq.map_or_else(|| "-".to_owned(), |s| s.to_string());
            let client = report.client.as_deref().unwrap_or("-");
            let value = show_value(report.fields.get("value"));
            format!("recorded seq={seq} value={value} from client {client} ({peer})")
        }
        ServerEvent::ConnectionOpened {
            conn,
            peer,
            resumed,
        } => {
            let resumed = if *resumed { " (session resumed)" } else { "" };
            format!("connection {conn} opened from {peer}{resumed}")
        }
        ServerEvent::ConnectionClosed {
            conn,
            reason,
            stats,
            ..
        } => {
            format!(
                "connection {conn} closed: {reason} ({} reports)",
                stats.reports
            )
        }
        ServerEvent::Duplicate { seq, .. } => {
            format!("duplicate seq={seq}: acknowledged, not recorded again")
        }
        ServerEvent::StreamRejected {
            conn,
            stream,
            error,
        } => {
            format!("connection {conn} stream {stream} rejected: {error}")
        }
        _ => return None,
    })
}

fn client_line(ev: &ClientEvent, server: SocketAddr) -> Option<String> {
    match (ev, show_client_event(ev)) {
        (ClientEvent::Connecting { attempt }, _) => {
            Some(format!("connecting to {server} (attempt {attempt})"))
        }
        (_, Shown::Ack(s) | Shown::Info(s) | Shown::Warn(s)) => Some(s),
        (_, Shown::Debug(_)) => None,
    }
}

/// Runs the demo until `--count` acknowledgements or Ctrl-C.
pub fn run(args: &DemoArgs) -> Result<(), Error> {
    let certs = DevCerts::write()?;
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));

    let source = Source::bind(loopback)?;
    let source_url = format!("http://{}/", source.addr());
    let source_stop = source.stopper();

    let mut server_opts = ServerOptions::new(loopback, certs.cert(), certs.key());
    server_opts.handle_signals = false; // the client catches Ctrl-C, then stops us
    let server = ServerDriver::bind(server_opts)?;
    let server_addr = server.local_addr();
    let server_stop = server.stop_handle();

    println!("[source] listening on {source_url}");
    println!("[server] listening on {server_addr} (development certificate)");

    let source_thread = thread::Builder::new()
        .name("source".into())
        .spawn(move || {
            source.serve(&mut |a| println!("[source] {}", a.short()));
        })?;

    let client_stop = StopHandle::new();
    let stop_client_on_failure = client_stop.clone();
    let server_thread = thread::Builder::new()
        .name("server".into())
        .spawn(move || {
            let res = server.run(&mut |_: &Report| Ok(()), &mut |ev| {
                if let Some(line) = server_line(ev) {
                    println!("[server] {line}");
                }
            });
            if res.is_err() {
                stop_client_on_failure.stop();
            }
            res
        })?;

    let mut client_opts = ClientOptions::new(server_addr, Verify::CaFile(certs.ca()));
    client_opts.fetch = Some(FetchOptions {
        url: source_url,
        interval: args.interval,
        count: args.count,
    });
    client_opts.count = args.count;
    client_opts.stop = client_stop;
    let client_res = run_client(client_opts, &mut |ev, _| {
        if let Some(line) = client_line(ev, server_addr) {
            println!("[client] {line}");
        }
    });
    if let Ok(summary) = &client_res {
        println!(
            "[client] done: {} acknowledged, {} not acknowledged, {} connection(s)",
            summary.stats.acknowledged, summary.unacknowledged, summary.stats.connections
        );
    }

    server_stop.stop();
    let server_res: Result<(), Error> = match server_thread.join() {
        Ok(res) => res.map_err(Into::into),
        Err(_) => Err("the server thread panicked".into()),
    };
    source_stop.stop();
    if source_thread.join().is_err() {
        log::warn!("the source thread panicked");
    }
    println!("[server] stopped");
    println!("[source] stopped");
    drop(certs);

    client_res?;
    server_res?;
    Ok(())
}
