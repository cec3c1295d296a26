//! The PostgreSQL sink's connect against a peer that poses as PostgreSQL
//! on 127.0.0.1 and answers the startup message with an error whose
//! SQLSTATE is garbage (empty, one byte, a character cut by the two-byte
//! class, words): each attempt fails with an error that says what the peer
//! sent, none panics the commit thread, and a well-formed code is still
//! classified by its class. Bounded: one connection per case, with read
//! and write timeouts.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use quic_report_mio::database::postgres::PostgresConnect;
use quic_report_mio::database::{Connect, DbError};

/// An ErrorResponse ('E') with severity FATAL, SQLSTATE `code` and `message`.
fn error_response(code: &[u8], message: &str) -> Vec<u8> {
    let mut fields = Vec::new();
    for (tag, value) in [
        (b'S', &b"FATAL"[..]),
        (b'V', &b"FATAL"[..]),
        (b'C', code),
        (b'M', message.as_bytes()),
    ] {
        fields.push(tag);
        fields.extend_from_slice(value);
        fields.push(0);
    }
    fields.push(0);
    let mut out = vec![b'E'];
    let len = u32::try_from(fields.len() + 4).expect("a short message");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&fields);
    out
}

/// Serves one connection: reads the startup message, answers `answer`.
fn answer_once(listener: &TcpListener, answer: &[u8]) {
    let (mut s, _) = listener.accept().expect("the sink connects");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut len = [0u8; 4];
    s.read_exact(&mut len)
        .expect("the startup message's length");
    let n = u32::from_be_bytes(len) as usize;
    assert!((8..10_000).contains(&n), "a startup message: {n} bytes");
    let mut rest = vec![0u8; n - 4];
    s.read_exact(&mut rest).expect("the startup message");
    assert_eq!(&rest[..4], &196_608u32.to_be_bytes(), "protocol 3.0");
    s.write_all(answer).expect("the answer");
}

#[test]
fn garbage_sqlstates_at_startup_fail_the_attempt_without_a_panic() {
    let cases: [(&[u8], &str); 6] = [
        (b"", "rejected"),
        (b"X", "rejected"),
        ("aé".as_bytes(), "rejected"),
        (b"not a code at all", "rejected"),
        (b"28P01", "connection"),
        (b"08006", "connection"),
    ];
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let answers: Vec<Vec<u8>> = cases
        .iter()
        .map(|(code, _)| error_response(code, "go away"))
        .collect();
    let peer = thread::spawn(move || {
        for a in &answers {
            answer_once(&listener, a);
        }
    });
    let mut connect = PostgresConnect::parse(&format!(
        "postgres://u:pw@127.0.0.1:{port}/db?sslmode=disable&connect_timeout=10"
    ))
    .expect("URL");
    for (code, kind) in cases {
        let shown = String::from_utf8_lossy(code);
        let e = match connect.connect() {
            Ok(_) => panic!("connected to a peer that refuses (code {shown:?})"),
            Err(e) => e,
        };
        let (got, text) = match &e {
            DbError::Connection(m) => ("connection", m),
            DbError::Rejected(m) => ("rejected", m),
            other => panic!("code {shown:?}: {other:?}"),
        };
        assert_eq!(got, kind, "code {shown:?}: {e:?}");
        assert!(text.contains("go away"), "the peer's message: {text}");
    }
    peer.join().expect("the fake peer");
}
