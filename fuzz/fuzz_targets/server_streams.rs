//! A client completes its handshake with a fresh server, then the input
//! drives what it does on its streams; see
//! `quic_report_tests::fuzz::server_streams` for the format and the
//! invariants it checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // As in server_datagram: no system CA store in every new config
        // (the client verifies against certs/ca.pem, loaded explicitly).
        // SAFETY: LLVMFuzzerInitialize runs once, before any other thread.
        unsafe {
            std::env::set_var("SSL_CERT_FILE", "/nonexistent/quic-report-fuzz");
            std::env::set_var("SSL_CERT_DIR", "/nonexistent/quic-report-fuzz");
        }
    },
    |data: &[u8]| {
        quic_report_tests::fuzz::server_streams(data);
    }
);
