//! The fuzzing harnesses: what `fuzz/` (cargo-fuzz, libFuzzer) runs on every
//! input, here so that the tests can replay the seed corpus on stable Rust
//! and the input format has one definition.
//!
//! - [`server_datagram`]: a fresh [`Server`] (dev certificate, fixed seed, on
//!   virtual time) gets the input as a sequence of datagrams from a few
//!   peers; every transmit and event is drained, every report answered,
//!   and at the end every connection is closed.
//! - [`server_streams`] (in [`streams`]): a real client completes its
//!   handshake with a fresh server, and the input says what it does on its
//!   streams; answers are checked against what it wrote.
//! - [`stream_parser`]: an [`ObjectSplitter`] gets the input in chunks.
//!
//! Each panics when an invariant breaks (see each function), which libFuzzer
//! reports as a crash.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use quic_report_core::config::RetryMode;
use quic_report_core::stream::{Item, ObjectSplitter};
use quic_report_core::{
    CoreRng, MAX_DATAGRAM_SIZE, Outcome, Report, ReportHandle, RespondError, Response, Server,
    ServerConfig, ServerEvent,
};
use serde_json::{Map, Value};

use crate::{SERVER_ADDR, VirtualClock, cert_path};

pub mod streams;

pub use streams::{Op, encode_ops, server_streams};

/// The seed of the simulation that captures the `server_datagram` corpus.
pub const CORPUS_SIM_SEED: u64 = 0x0f22_5eed;

/// The seed of the server in [`server_datagram`]: the one the `nth` server
/// of a [`crate::Sim`] of seed [`CORPUS_SIM_SEED`] has (see
/// [`crate::Sim::start_server`]; the first is 1, and a world whose server
/// config is changed restarts it, so it runs the second). The fuzzed server
/// then draws the same secret (reset tokens, Retry token key) and the same
/// connection IDs as the server the corpus was captured from: a captured
/// client's later packets reach the connection its captured Initial opens,
/// and a captured Retry token verifies.
/// Once per fuzzing process, before any other thread: point OpenSSL's
/// default CA locations at nothing. quiche loads the system's CA store into
/// every new config (`SSL_CTX_set_default_verify_paths`), slow under
/// ASan, for a server that verifies no one and a client that loads
/// `certs/ca.pem` explicitly (a failed load is ignored).
///
/// # Safety
/// No other thread may be running (it changes the environment).
pub unsafe fn init_process() {
    // SAFETY: the caller guarantees no other thread exists.
    unsafe {
        std::env::set_var("SSL_CERT_FILE", "/nonexistent/quic-report-fuzz");
        std::env::set_var("SSL_CERT_DIR", "/nonexistent/quic-report-fuzz");
    }
}

pub fn server_seed(nth: u64) -> u64 {
    CORPUS_SIM_SEED.wrapping_add(nth.wrapping_mul(0x9e37_79b9))
}

/// The peers a [`server_datagram`] input sends from: the addresses of the
/// simulation's first client, second client, first raw peer and first
/// HTTP/0.9 GET (so captured Retry tokens, bound to an address, verify).
pub const PEERS: [&str; 4] = [
    "127.0.0.2:5000",
    "127.0.0.2:5001",
    "127.0.1.1:6000",
    "127.0.2.1:7000",
];

/// Virtual time that passes before a record, by the record's bits 2..5.
pub const ADVANCE_MS: [u64; 8] = [0, 1, 10, 100, 1_000, 5_000, 11_000, 31_000];

/// `flags` bit: [`RetryMode::Always`] (else the default, `Auto`), and the
/// seed of the corpus's Retry world (`server_seed(2)`, else `server_seed(1)`).
pub const FLAG_RETRY: u8 = 1;
/// `flags` bit: at most one connection.
pub const FLAG_ONE_CONN: u8 = 2;
/// `flags` bit: no HTTP/0.9 ALPN.
pub const FLAG_NO_HTTP09: u8 = 4;

/// One datagram of a [`server_datagram`] input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// Index into [`PEERS`].
    pub peer: usize,
    /// Index into [`ADVANCE_MS`].
    pub advance: usize,
    /// The datagram.
    pub data: &'a [u8],
}

/// Encodes a [`server_datagram`] input:
///
/// ```text
/// input  = flags:u8 record*
/// record = ctl:u8 len:u16be data[len]   (the last one may be short: it takes what is left)
/// ctl    = bits 0-1: peer (PEERS), bits 2-4: time advance before it (ADVANCE_MS), bits 5-7: 0
/// ```
pub fn encode_datagrams(flags: u8, records: &[Record<'_>], out: &mut Vec<u8>) {
    out.push(flags);
    for r in records {
        assert!(r.peer < PEERS.len() && r.advance < ADVANCE_MS.len());
        let len = u16::try_from(r.data.len()).expect("a datagram is under 64 KiB");
        out.push((r.peer | r.advance << 2) as u8);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(r.data);
    }
}

/// Splits a [`server_datagram`] input (after its flags byte) into records.
pub fn decode_datagrams(mut rest: &[u8]) -> Vec<Record<'_>> {
    let mut out = Vec::new();
    while let [ctl, a, b, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*a, *b])).min(tail.len());
        let (data, next) = tail.split_at(len);
        out.push(Record {
            peer: usize::from(ctl & 3),
            advance: usize::from(ctl >> 2 & 7),
            data,
        });
        rest = next;
    }
    out
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a valid address")
}

/// What the server sent and received, per peer address.
#[derive(Debug, Default, Clone, Copy)]
struct Traffic {
    recv: u64,
    sent: u64,
    /// The address is proven (handshake done, or a valid Retry token): the
    /// 3x limit no longer applies.
    validated: bool,
}

/// The server under test and what the harness saw of it.
struct Harness {
    server: Server,
    clock: VirtualClock,
    server_addr: SocketAddr,
    buf: Vec<u8>,
    traffic: BTreeMap<SocketAddr, Traffic>,
    opened: BTreeSet<u64>,
    closed: BTreeSet<u64>,
    /// Connection IDs the server's connections may be reached on: the
    /// destinations of the Initials that opened them, and the source IDs of
    /// their Initial and Handshake packets. (Until a handshake completes the
    /// server issues no others.)
    cids: BTreeSet<Vec<u8>>,
    /// Datagrams the server sent and their destinations, when a peer is
    /// to get them (`server_streams`); else they are only counted.
    outbox: Option<Vec<(Vec<u8>, SocketAddr)>>,
    /// Reports are held (answered by `answer_held`) instead of answered at
    /// once.
    hold: bool,
    held: Vec<ReportHandle>,
    /// How reports are answered.
    outcome: Outcome,
    /// Check the answers to datagrams no connection saw. Off when a client
    /// completes its handshake: it may then use connection IDs `cids` does
    /// not know (issued in encrypted NEW_CONNECTION_ID frames).
    endpoint_checks: bool,
}

impl Harness {
    /// A fresh server on virtual time.
    fn new(cfg: ServerConfig, seed: u64) -> Harness {
        let clock = VirtualClock::install();
        let server = Server::new(cfg, CoreRng::from_seed(seed)).expect("a valid config");
        Harness {
            server,
            clock,
            server_addr: addr(SERVER_ADDR),
            buf: vec![0; 65536],
            traffic: BTreeMap::new(),
            opened: BTreeSet::new(),
            closed: BTreeSet::new(),
            cids: BTreeSet::new(),
            outbox: None,
            hold: false,
            held: Vec::new(),
            outcome: Outcome::Recorded,
            endpoint_checks: true,
        }
    }

    /// Answers every held report with `outcome`.
    fn answer_held(&mut self, outcome: &Outcome) {
        let now = self.clock.now();
        for handle in std::mem::take(&mut self.held) {
            let res = self.server.respond(now, handle, outcome.clone());
            assert!(
                !matches!(res, Err(RespondError::UnknownReport)),
                "respond to a held report: {res:?}"
            );
        }
        self.drain();
    }

    /// Drains events (answering reports), transmits, and events again until
    /// none (the core's contract, as the server loop does). Returns the
    /// bytes sent.
    fn drain(&mut self) -> u64 {
        let now = self.clock.now();
        let mut sent = 0;
        self.events();
        for _ in 0..10_000 {
            while let Some(t) = self.server.poll_transmit(now, &mut self.buf) {
                assert!(
                    t.len > 0 && t.len <= MAX_DATAGRAM_SIZE,
                    "transmit of {} bytes (max {MAX_DATAGRAM_SIZE}) to {}",
                    t.len,
                    t.to
                );
                assert_eq!(t.from, self.server_addr, "sent from our address");
                let tr = self
                    .traffic
                    .get_mut(&t.to)
                    .unwrap_or_else(|| panic!("sent to {}, which never sent anything", t.to));
                tr.sent += t.len as u64;
                sent += t.len as u64;
                if let Some(out) = &mut self.outbox {
                    out.push((self.buf[..t.len].to_vec(), t.to));
                }
                if let Some((ty, _, _)) = header(&self.buf[..t.len])
                    && let Some(scid) = ty
                {
                    self.cids.insert(scid);
                }
            }
            if !self.events() {
                return sent;
            }
        }
        panic!("the server never stops sending or reporting events");
    }

    /// Handles every event of the server; false if there were none.
    fn events(&mut self) -> bool {
        let mut any = false;
        while let Some(ev) = self.server.poll_event() {
            any = true;
            self.event(ev);
        }
        any
    }

    fn event(&mut self, ev: ServerEvent) {
        let now = self.clock.now();
        match ev {
            ServerEvent::ConnectionOpened { conn, peer, .. } => {
                assert!(self.opened.insert(conn.0), "{conn} opened twice");
                assert!(
                    !self.closed.contains(&conn.0),
                    "{conn} opened after closing"
                );
                if let Some(t) = self.traffic.get_mut(&peer) {
                    t.validated = true;
                }
            }
            ServerEvent::ConnectionClosed { conn, .. } => {
                assert!(self.closed.insert(conn.0), "{conn} closed twice");
            }
            ServerEvent::Report { handle, .. } if self.hold => self.held.push(handle),
            ServerEvent::Report { handle, .. } => {
                let res = self.server.respond(now, handle, self.outcome.clone());
                assert!(
                    !matches!(res, Err(RespondError::UnknownReport)),
                    "respond to a fresh Report event: {res:?}"
                );
            }
            ServerEvent::Request { handle, .. } => {
                let res = self.server.respond_request(now, handle, b"{}".to_vec());
                assert!(
                    !matches!(res, Err(RespondError::UnknownReport)),
                    "respond_request to a fresh Request event: {res:?}"
                );
            }
            _ => {}
        }
    }

    /// Runs every timer that is due (as a driver does), and checks that
    /// the server does not ask to be woken again and again at once.
    fn timers(&mut self) {
        let now = self.clock.now();
        for _ in 0..100 {
            match self.server.poll_timeout() {
                Some(t) if t <= now => {
                    self.server.handle_timeout(now);
                    self.drain();
                }
                _ => return,
            }
        }
        panic!("poll_timeout stays due after 100 handle_timeout calls: a busy loop");
    }

    /// Checks the anti-amplification limit: an address the server has not
    /// validated never got more than 3x the bytes it sent.
    fn check_amplification(&self) {
        for (a, t) in &self.traffic {
            assert!(
                t.validated || t.sent <= 3 * t.recv,
                "sent {} bytes to {a}, which sent {} and is not validated",
                t.sent,
                t.recv
            );
        }
    }

    fn datagram(&mut self, from: SocketAddr, data: &[u8]) {
        let now = self.clock.now();
        let before = self.server.stats();
        let hdr = header(data);
        // Whether a connection may see it: its destination is one the
        // server uses (see `cids`).
        let routed = hdr
            .as_ref()
            .is_some_and(|(_, dcid, _)| self.cids.contains(dcid));
        let len = data.len() as u64;
        self.traffic.entry(from).or_default().recv += len;
        let mut d = data.to_vec();
        let res = self
            .server
            .handle_datagram(now, from, self.server_addr, &mut d);
        let after = self.server.stats();
        let created = after.connections_total > before.connections_total;
        if created && let Some((_, dcid, token)) = hdr {
            self.cids.insert(dcid);
            if token {
                // Accepted through our Retry: quiche treats the address as
                // proven.
                if let Some(t) = self.traffic.get_mut(&from) {
                    t.validated = true;
                }
            }
        }
        let answered = self.drain();
        if self.endpoint_checks && !created && !routed {
            // No connection saw it: dropped, or answered (Version
            // Negotiation, Retry, stateless reset) with fewer bytes than it
            // carried. (What a connection sends is bounded per address, in
            // `check_amplification`.)
            assert!(
                answered == 0 || answered < len,
                "{answered} bytes sent in answer to a datagram of {len} no connection saw ({res:?})"
            );
        }
        self.check_amplification();
    }

    /// Closes every connection and checks that they all go, at once for
    /// those whose CONNECTION_CLOSE went out, and within the longest timer
    /// for the others.
    fn shutdown(&mut self) {
        let now = self.clock.now();
        self.server.close_all(now);
        self.drain();
        self.check_amplification();
        for _ in 0..1000 {
            if self.server.is_closed() {
                break;
            }
            let Some(t) = self.server.poll_timeout() else {
                break;
            };
            self.clock.advance_to(t);
            self.timers();
            self.check_amplification();
        }
        assert!(
            self.server.is_closed(),
            "{} connections left after close_all and every timer",
            self.server.connections()
        );
        assert_eq!(
            self.opened.len(),
            self.opened.intersection(&self.closed).count(),
            "every opened connection was reported closed"
        );
    }
}

/// A datagram's first QUIC header, as the server reads it: the source ID
/// of an Initial or Handshake packet (else `None`), the destination ID, and
/// whether it is an Initial with a token.
fn header(data: &[u8]) -> Option<(Option<Vec<u8>>, Vec<u8>, bool)> {
    let mut d = data.to_vec();
    let h = quiche::Header::from_slice(&mut d, quic_report_core::LOCAL_CID_LEN).ok()?;
    let scid =
        matches!(h.ty, quiche::Type::Initial | quiche::Type::Handshake).then(|| h.scid.to_vec());
    let token = h.ty == quiche::Type::Initial && h.token.as_ref().is_some_and(|t| !t.is_empty());
    Some((scid, h.dcid.to_vec(), token))
}

/// The `server_datagram` fuzz target. `input` is encoded as
/// [`encode_datagrams`] says. Panics if:
///
/// - a transmit is empty, larger than [`MAX_DATAGRAM_SIZE`], or addressed to
///   an address that never sent anything;
/// - a datagram no connection saw (dropped, or answered with Version
///   Negotiation, Retry or a stateless reset) is answered with as many bytes
///   as it carried, or more;
/// - an address not validated got more than 3x the bytes it sent (RFC 9000
///   8.1: what a connection sends is bounded by everything received from
///   the address, not datagram by datagram);
/// - `respond` does not know a report just reported; a connection opens or
///   closes twice;
/// - `poll_timeout` stays due after `handle_timeout`;
/// - a connection outlives `close_all` and every timer after it;
/// - anything panics in the server.
pub fn server_datagram(input: &[u8]) {
    let Some((&flags, rest)) = input.split_first() else {
        return;
    };
    let mut cfg = ServerConfig::new(cert_path("localhost.pem"), cert_path("localhost.key"));
    if flags & FLAG_RETRY != 0 {
        cfg.retry = RetryMode::Always;
    }
    if flags & FLAG_ONE_CONN != 0 {
        cfg.max_connections = 1;
    }
    if flags & FLAG_NO_HTTP09 != 0 {
        cfg.http09 = false;
    }
    let nth = if flags & FLAG_RETRY != 0 { 2 } else { 1 };
    let mut h = Harness::new(cfg, server_seed(nth));
    for r in decode_datagrams(rest) {
        h.clock
            .advance(Duration::from_millis(ADVANCE_MS[r.advance]));
        h.timers();
        h.datagram(addr(PEERS[r.peer]), r.data);
    }
    h.shutdown();
}

/// Splits a `stream_parser` input into the object size limit, the chunk
/// sizes and the stream's bytes:
///
/// ```text
/// input = limit:u8 n:u8 sizes:u8[n % 8] data*
/// limit = 0..=254: that many bytes; 255: 64 KiB (the server's default)
/// sizes = chunk lengths, used in turn (0: an empty push); none: one push
/// ```
pub fn decode_stream(input: &[u8]) -> Option<(usize, &[u8], &[u8])> {
    let (&limit, rest) = input.split_first()?;
    let (&n, rest) = rest.split_first()?;
    let n = usize::from(n % 8).min(rest.len());
    let (sizes, data) = rest.split_at(n);
    let limit = if limit == 255 {
        64 * 1024
    } else {
        usize::from(limit)
    };
    Some((limit, sizes, data))
}

/// Encodes a `stream_parser` input (see [`decode_stream`]).
pub fn encode_stream(limit: u8, sizes: &[u8], data: &[u8], out: &mut Vec<u8>) {
    assert!(sizes.len() < 8);
    out.push(limit);
    out.push(sizes.len() as u8);
    out.extend_from_slice(sizes);
    out.extend_from_slice(data);
}

/// Pushes `data` in chunks of `sizes` (in turn), then FIN; every item, and
/// checks on the way that the splitter holds at most `limit` bytes.
fn split(limit: usize, sizes: &[u8], data: &[u8]) -> Vec<Item> {
    let mut s = ObjectSplitter::new(limit);
    let mut items = Vec::new();
    let mut rest = data;
    let mut i = 0;
    loop {
        let n = if sizes.is_empty() {
            rest.len()
        } else {
            usize::from(sizes[i % sizes.len()])
        };
        i += 1;
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        s.push(chunk);
        assert!(
            s.buffered() <= limit,
            "{} bytes buffered, limit {limit}",
            s.buffered()
        );
        items.extend(std::iter::from_fn(|| s.next_item()));
        rest = tail;
        if rest.is_empty() || i > data.len() + 8 {
            // Done, or only empty pushes (every size 0): the rest in one.
            s.push(rest);
            break;
        }
    }
    items.extend(std::iter::from_fn(|| s.next_item()));
    s.finish();
    items.extend(std::iter::from_fn(|| s.next_item()));
    assert!(s.is_done(), "done after FIN once every item is taken");
    assert_eq!(s.buffered(), 0, "nothing buffered after FIN");
    let ok = items.iter().filter(|i| i.is_ok()).count() as u64;
    assert_eq!(s.objects(), ok, "objects() counts the Ok items");
    assert_eq!(
        s.is_failed(),
        ok < items.len() as u64,
        "failed iff an error came"
    );
    // Nothing comes after FIN.
    s.push(b"{}");
    s.finish();
    assert!(s.next_item().is_none(), "an item after FIN");
    items
}

/// The `stream_parser` fuzz target. `input` is encoded as [`decode_stream`]
/// says. Panics if the splitter panics, holds more than its limit, or if:
///
/// - there is more than one error item, or it is not the last item;
/// - an Ok item does not survive a re-serialisation (as the server's answer
///   and its sink write it) unchanged;
/// - the items differ from those of one unsplit push;
/// - an item's server answer (its [`Report`] or error [`Response`]) is not
///   one JSON object line.
pub fn stream_parser(input: &[u8]) {
    let Some((limit, sizes, data)) = decode_stream(input) else {
        return;
    };
    let chunked = split(limit, sizes, data);
    let whole = split(limit, &[], data);
    assert_eq!(chunked, whole, "chunking changed the items");
    let errors = whole.iter().filter(|i| i.is_err()).count();
    assert!(errors <= 1, "{errors} errors");
    if errors == 1 {
        assert!(
            whole.last().is_some_and(Result::is_err),
            "the error is last"
        );
    }
    for item in whole {
        match item {
            Ok(object) => {
                // The kept bytes are one valid JSON object on one line.
                let map: Map<String, Value> =
                    serde_json::from_slice(object.json()).expect("a kept object parses");
                assert!(
                    !object.json().iter().any(|b| matches!(b, b'\n' | b'\r')),
                    "a kept object spans lines"
                );
                match Report::from_json_object(object) {
                    Ok(report) => {
                        let line = report.to_json_line();
                        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
                        let back: Map<String, Value> =
                            serde_json::from_slice(&line).expect("a report line parses");
                        assert_eq!(back, map);
                        if let Some((client, seq)) = report.key() {
                            assert_eq!(back.get("client").and_then(Value::as_str), Some(client));
                            assert_eq!(back.get("seq").and_then(Value::as_u64), Some(seq));
                        }
                        let mut answer = Vec::new();
                        Response::Ok {
                            duplicate: false,
                            received: String::from_utf8_lossy(report.json()).into_owned(),
                        }
                        .encode(&mut answer);
                        check_answer(&answer, true);
                    }
                    Err(e) => {
                        assert!(!e.is_fatal(), "a bad field is not fatal: {e:?}");
                        let mut answer = Vec::new();
                        Response::from_stream_error(&e).encode(&mut answer);
                        check_answer(&answer, false);
                    }
                }
            }
            Err(e) => {
                assert!(e.is_fatal(), "a splitter error ends the stream: {e:?}");
                let mut answer = Vec::new();
                Response::from_stream_error(&e).encode(&mut answer);
                check_answer(&answer, false);
            }
        }
    }
}

/// `answer` is one JSON object and `\n`, with `"ok": ok`.
fn check_answer(answer: &[u8], ok: bool) {
    let Some((b'\n', line)) = answer.split_last() else {
        panic!("an answer ends with a newline");
    };
    assert!(!line.contains(&b'\n'), "an answer is one line");
    let v: Map<String, Value> = serde_json::from_slice(line).expect("an answer is an object");
    assert_eq!(v.get("ok"), Some(&Value::Bool(ok)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagram_records_round_trip() {
        let recs = [
            Record {
                peer: 3,
                advance: 7,
                data: b"abc",
            },
            Record {
                peer: 0,
                advance: 0,
                data: b"",
            },
        ];
        let mut v = Vec::new();
        encode_datagrams(FLAG_RETRY, &recs, &mut v);
        assert_eq!(v[0], FLAG_RETRY);
        assert_eq!(decode_datagrams(&v[1..]), recs);
        // A short last record takes what is left; fewer than 3 bytes are ignored.
        assert_eq!(
            decode_datagrams(&[1, 0xff, 0xff, 9, 9]),
            vec![Record {
                peer: 1,
                advance: 0,
                data: &[9, 9]
            }]
        );
        assert!(decode_datagrams(&[1, 0]).is_empty());
    }

    #[test]
    fn stream_input_round_trips() {
        let mut v = Vec::new();
        encode_stream(255, &[1, 0, 3], b"{}", &mut v);
        assert_eq!(
            decode_stream(&v),
            Some((64 * 1024, &[1u8, 0, 3][..], &b"{}"[..]))
        );
        assert_eq!(decode_stream(&[7]), None);
        assert_eq!(decode_stream(&[7, 3, 1]), Some((7, &[1u8][..], &[][..])));
    }

    #[test]
    fn harnesses_accept_trivial_input() {
        server_datagram(&[]);
        server_datagram(&[0]);
        server_datagram(&[0, 0, 0, 1, 0x40]);
        stream_parser(b"");
        stream_parser(b"\xff\x02\x01\x00{\"a\":1} [1]");
    }
}
