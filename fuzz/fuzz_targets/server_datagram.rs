//! A fresh server gets the input as datagrams from a few peers; see
//! `quic_report_tests::fuzz::server_datagram` for the format and the
//! invariants it checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // quiche loads the system's CA store into every new config
        // (SSL_CTX_set_default_verify_paths): ~30 ms under ASan, for a
        // server that verifies no one. Point it at nothing (a failed load
        // is ignored).
        // SAFETY: LLVMFuzzerInitialize runs once, before any other thread.
        unsafe {
            std::env::set_var("SSL_CERT_FILE", "/nonexistent/quic-report-fuzz");
            std::env::set_var("SSL_CERT_DIR", "/nonexistent/quic-report-fuzz");
        }
    },
    |data: &[u8]| {
        quic_report_tests::fuzz::server_datagram(data);
    }
);
