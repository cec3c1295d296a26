//! A client completes its handshake with a fresh server, then the input
//! drives what it does on its streams; see
//! `quic_report_tests::fuzz::server_streams` for the format and the
//! invariants it checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // SAFETY: LLVMFuzzerInitialize runs once, before any other thread.
        unsafe { quic_report_tests::fuzz::init_process() }
    },
    |data: &[u8]| {
        quic_report_tests::fuzz::server_streams(data);
    }
);
