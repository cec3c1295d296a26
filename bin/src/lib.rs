//! The command line of `quic-report`, as a library so that the bench
//! (`quic-report-bench`, its own crate) parses and checks the same flags:
//! the clap structs and value parsers ([`cli`]), certificate verification
//! from the TLS flags ([`tls`]) and the built-in development certificates
//! ([`devcerts`]). The wiring of each subcommand is in `main.rs`.

pub mod cli;
pub mod devcerts;
pub mod tls;
