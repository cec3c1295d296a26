//! The report-stream splitter gets the input in chunks; see
//! `quic_report_tests::fuzz::stream_parser` for the format and the
//! invariants it checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    quic_report_tests::fuzz::stream_parser(data);
});
