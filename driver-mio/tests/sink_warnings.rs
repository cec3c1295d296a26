//! The server's log while an inline sink (a file, stdout) fails: the
//! warning for a report it could not record is rate-limited, not one per
//! report and per resend. A binary of its own: it installs a logger, which
//! is global to the process. Real UDP on 127.0.0.1, bounded in time.

mod common;

use common::{sample, server_options, start_server_with, watchdog};

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use quic_report_core::{ClientEvent, Report};
use quic_report_mio::ClientDriver;

/// Counts the warnings that a report could not be recorded.
struct CountNotRecorded(AtomicUsize);

impl log::Log for CountNotRecorded {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.level() <= log::Level::Warn
            && record.args().to_string().contains("could not record")
        {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self) {}
}

static WARNINGS: CountNotRecorded = CountNotRecorded(AtomicUsize::new(0));

#[test]
fn a_failing_sink_is_not_one_warning_per_report_and_resend() {
    log::set_logger(&WARNINGS).expect("the only logger of this binary");
    log::set_max_level(log::LevelFilter::Warn);
    let full = |_: &Report| -> io::Result<()> { Err(io::Error::from_raw_os_error(libc::ENOSPC)) };
    let (addr, server_stop, server) = start_server_with(server_options(), full);

    let mut opts = common::client_options(addr);
    opts.config.client_id = Some("w4rn".to_owned());
    let driver = ClientDriver::new(opts).expect("client binds");
    let stop = driver.stop_handle();
    let _dog = watchdog(stop.clone(), Duration::from_secs(20));
    let samples = driver.sample_sender();
    for i in 0..20 {
        samples
            .send(sample(f64::from(i) / 10.0))
            .expect("loop alive");
    }
    // Each report answered not_recorded, and again at each resend.
    let mut retrying = 0;
    driver
        .run(&mut |ev, _| {
            if let ClientEvent::Retrying { .. } = ev {
                retrying += 1;
                if retrying == 60 {
                    stop.stop();
                }
            }
        })
        .expect("client closes cleanly");
    server_stop.stop();
    server.join().expect("server thread").expect("server ok");

    assert!(retrying >= 60, "{retrying} not_recorded answers");
    let warnings = WARNINGS.0.load(Ordering::Relaxed);
    // The first, and one more if the test took over the throttle's period.
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} warnings for {retrying} not_recorded answers"
    );
}
